"""Command-line entry point of experiments/local_federation.py (its docstring says what it does and how to run it)."""

import sys

from experiments.local_federation import main

if __name__ == "__main__":
    sys.exit(main())
