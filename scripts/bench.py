"""Command-line entry point of experiments/bench.py (its docstring says what it does and how to run it)."""

import sys

from experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
