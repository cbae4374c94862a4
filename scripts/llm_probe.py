"""Command-line entry point of experiments/llm_probe.py (its docstring says what it does and how to run it)."""

import sys

from experiments.llm_probe import main

if __name__ == "__main__":
    sys.exit(main())
