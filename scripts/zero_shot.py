"""Command-line entry point of experiments/zero_shot.py (its docstring says what it does and how to run it)."""

import sys

from experiments.zero_shot import main

if __name__ == "__main__":
    sys.exit(main())
