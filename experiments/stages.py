"""Resumable experiment stages for the experiments behind docs/RESULTS.md (strategies.py, recipe_search.py).

A stage is one scripts/sweep.py multirun (full `flwr run` simulations) into its own folder; a finished stage is
marked `stage.done` and skipped when the script runs again, so an interrupted script continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def sweep(folder: Path, overrides: list[str], tag: str) -> None:
    """Run the multirun `overrides` into `folder`, unless it finished before; SystemExit if a job fails."""
    if (folder / "stage.done").exists():
        print(f"[{tag}] {folder.name}: finished before, skipped", flush=True)
        return
    print(f"[{tag}] {folder.name}: {' '.join(overrides)}", flush=True)
    run = subprocess.run([sys.executable, "scripts/sweep.py", "-m", *overrides, f"hydra.sweep.dir={folder}"],
                         cwd=ROOT, check=False)
    if run.returncode:
        raise SystemExit(f"[{tag}] {folder.name} failed; rerun to retry it")
    (folder / "stage.done").touch()


def final(folder: Path, key: str = "accuracy") -> list[float]:
    """The final round's `key` of every job in `folder`, in folder order."""
    return [json.loads(p.read_text())["rounds"][-1][key] for p in sorted(folder.rglob("metrics.json"))]
