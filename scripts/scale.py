"""Command-line entry point of experiments/scale.py (its docstring says what it does and how to run it)."""

import sys

from experiments.scale import main

if __name__ == "__main__":
    sys.exit(main())
