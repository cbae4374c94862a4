"""Command-line entry point of experiments/user_level.py (its docstring says what it does and how to run it)."""

import sys

from experiments.user_level import main

if __name__ == "__main__":
    sys.exit(main())
