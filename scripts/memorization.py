"""Command-line entry point of experiments/memorization.py (its docstring says what it does and how to run it)."""

import sys

from experiments.memorization import main

if __name__ == "__main__":
    sys.exit(main())
