"""Command-line entry point of experiments/llm_report.py (its docstring says what it does and how to run it)."""

import sys

from experiments.llm_report import main

if __name__ == "__main__":
    sys.exit(main())
