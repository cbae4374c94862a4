"""Command-line entry point of experiments/run_audit.py (its docstring says what it does and how to run it)."""

import sys

from experiments.run_audit import main

if __name__ == "__main__":
    sys.exit(main())
