"""Command-line entry point of experiments/recipe_search.py (its docstring says what it does and how to run it)."""

import sys

from experiments.recipe_search import main

if __name__ == "__main__":
    sys.exit(main())
