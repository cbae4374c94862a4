"""Command-line entry point of experiments/memory.py (its docstring says what it does and how to run it)."""

import sys

from experiments.memory import main

if __name__ == "__main__":
    sys.exit(main())
