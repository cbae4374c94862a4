"""Does the compact wire format cost accuracy? Uploads in each format on the grid's FPB epsilon-8 cell.

    python scripts/wire_format.py OUT_DIR [--dtypes fp32 int8] [--seeds 0 1 2]

Each wire format is one stage (a scripts/sweep.py multirun over the seeds, full `flwr run` simulations;
resumable: a finished stage, and within a stage a finished job, is skipped): the grid's fpb / iid / epsilon 8
cell (scripts/results.sh: MiniLM, 5 owners, IID shares, the DP recipe conf/recipe/dp.yaml at record-level
epsilon 8, delta 1e-5) with `transport.dtype` set, 20% of the training data held out as a validation split
(`dataset.validation_fraction=0.2`, as the recipe search did): the comparison that picks a default is made on
validation, and the test split is scored at the end beside it (eval.also_test), never used to choose. Quantizing an owner's DP output is
post-processing: the privacy guarantee is the same in every format.

OUT_DIR/wire_format.json and .md: final validation and test accuracy per seed, mean and std per format, the
bytes one reply carries in it (MiniLM's default DP adapter, as the ArrayRecord carries it) and its share of the
model's bytes, and each format's difference from the first (fp32): within noise when it is at most twice the
standard error of the difference of the means, sqrt(s1^2 / n1 + s2^2 / n2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from dplora import config
from dplora.config import TRANSPORT_DTYPES
from experiments.bench import upload_bytes
from experiments.stages import DATA, final
from experiments.stages import sweep as run_stage

CELL = ["model=minilm", "sweep.num_supernodes=5", f"data_dir={DATA}", "privacy.delta=1e-5", "dataset=fpb",
        "partitioner=iid", "privacy=dp", "privacy.target_epsilon=8",  # scripts/results.sh, fpb-iid-dp at 8
        "dataset.validation_fraction=0.2", "eval.split=validation", "eval.also_test=true"]
SPLITS = {"validation": "accuracy", "test": "test_accuracy"}  # metrics.json's key for each split


def reply_bytes() -> dict:
    """Bytes of one reply in each format for the adapter the DP recipe trains (bench.upload_bytes), and the
    model's own bytes."""
    cell = [c for c in CELL if not c.startswith(("sweep.", "eval.", "dataset.validation"))]
    sizes = upload_bytes(config.compose(cell))
    return {"model_bytes": sizes["model_bytes"], "values": sizes["values"], "per_reply": sizes["upload_bytes"],
            "fraction": sizes["fraction"]}


def summarize(accuracies: dict[str, list[float]]) -> dict:
    """Mean and std per format; each format against the first: difference, its standard error, within noise."""
    rows = {d: {"seeds": a, "mean": statistics.mean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0}
            for d, a in accuracies.items()}
    base = next(iter(rows))
    for d, row in rows.items():
        if d == base:
            continue
        error = math.sqrt(row["std"] ** 2 / len(row["seeds"]) + rows[base]["std"] ** 2 / len(rows[base]["seeds"]))
        difference = row["mean"] - rows[base]["mean"]
        row["against"] = {"format": base, "difference": difference, "standard_error": error,
                          "within_noise": abs(difference) <= 2 * error}
    return rows


def table(result: dict) -> str:
    lines = ["| wire format | bytes a reply (share of MiniLM) | validation by seed | validation mean ± std | "
             "difference from fp32 (2 x its standard error) | test mean ± std | test difference |",
             "|---|---:|---|---:|---|---:|---:|"]
    for d in result["formats"]["validation"]:
        val, test = result["formats"]["validation"][d], result["formats"]["test"][d]
        against = val.get("against")
        versus = (f"{100 * against['difference']:+.2f} ({100 * 2 * against['standard_error']:.2f}): "
                  f"{'within noise' if against['within_noise'] else 'outside noise'}") if against else "-"
        test_versus = f"{100 * test['against']['difference']:+.2f}" if "against" in test else "-"
        lines.append(f"| {d} | {result['bytes']['per_reply'][d]:,} ({100 * result['bytes']['fraction'][d]:.3f}%) | "
                     f"{' / '.join(f'{100 * a:.2f}' for a in val['seeds'])} | "
                     f"{100 * val['mean']:.2f} ± {100 * val['std']:.2f} | {versus} | "
                     f"{100 * test['mean']:.2f} ± {100 * test['std']:.2f} | {test_versus} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtypes", nargs="+", choices=TRANSPORT_DTYPES, default=["fp32", "int8"],
                        help="wire formats; the first is the one the others are compared with")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    if len(set(args.dtypes)) != len(args.dtypes) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--dtypes and --seeds take distinct values")
    if not (DATA / "fpb" / "train.jsonl").is_file():
        parser.error(f"{DATA / 'fpb' / 'train.jsonl'} not found: set DPLORA_SHARED_DATA")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    accuracies = {split: {} for split in SPLITS}
    for dtype in args.dtypes:
        folder = out / dtype
        run_stage(folder, [*CELL, f"transport.dtype={dtype}", "seed=" + ",".join(map(str, args.seeds))],
                  "wire-format")
        for split, key in SPLITS.items():
            accuracies[split][dtype] = final(folder, key)
    result = {"cell": CELL, "seeds": args.seeds, "bytes": reply_bytes(),
              "formats": {split: summarize(a) for split, a in accuracies.items()}}
    (out / "wire_format.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "wire_format.md").write_text(table(result))
    print(table(result))
    return 0
