"""Command-line entry point of experiments/verify_privacy.py (its docstring says what it does and how to run it)."""

import sys

from experiments.verify_privacy import main

if __name__ == "__main__":
    sys.exit(main())
