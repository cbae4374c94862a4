"""Command-line entry point of experiments/wire_format.py (its docstring says what it does and how to run it)."""

import sys

from experiments.wire_format import main

if __name__ == "__main__":
    sys.exit(main())
