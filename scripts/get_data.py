"""Command-line entry point of experiments/get_data.py (its docstring says what it does and how to run it)."""

import sys

from experiments.get_data import main

if __name__ == "__main__":
    sys.exit(main())
