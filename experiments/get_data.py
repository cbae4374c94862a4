"""Build the real datasets (fpb/, sst2/, pubmedqa/) from the Hugging Face Hub, with the splits that
../shared/README.md describes, so that `data_dir=<OUT>` reproduces docs/RESULTS.md on any machine.

    python scripts/get_data.py OUT [--datasets fpb sst2 pubmedqa]

Writes OUT/<name>/train.jsonl and OUT/<name>/test.jsonl (dplora/hub_data.py: sources, conversion, split
seed). Needs internet access to huggingface.co; without it, it stops at once and says so. An existing
folder is left as it is unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path

from dplora import hub_data
from dplora.data import load_hub_split

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None if the Hub can be reached, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set: unset it (HF_HUB_OFFLINE=0) to download"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError as err:
        return f"cannot reach {HUB_HOST}:443 ({err})"
    return None


def write(folder: Path, splits: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = folder / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(folder / f"{split}.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create fpb/, sst2/ and pubmedqa/ in")
    parser.add_argument("--datasets", nargs="+", choices=list(hub_data.RECIPES), default=list(hub_data.RECIPES))
    parser.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    args = parser.parse_args(argv)
    if problem := hub_reachable():
        print(f"error: the datasets come from the Hugging Face Hub and {problem}. Run this on a machine with "
              "internet access, then copy the folder (or use ../shared/data where the project provides it).",
              file=sys.stderr)
        return 2
    for name in args.datasets:
        folder = args.out / name
        if (folder / "train.jsonl").is_file() and not args.force:
            print(f"[get_data] {name}: {folder} exists, kept (--force rebuilds it)")
            continue
        recipe = hub_data.RECIPES[name]
        print(f"[get_data] {name}: {recipe.hub_id} ({recipe.hub_config or 'default'}) ...", flush=True)
        splits = hub_data.build(name, load_hub_split)
        write(folder, splits)
        for split, rows in splits.items():
            print(f"[get_data] {name}/{split}.jsonl: {len(rows)} rows, {dict(sorted(Counter(r['label'] for r in rows).items()))}")
    print(f"[get_data] done: use data_dir={args.out.resolve()}")
    return 0

