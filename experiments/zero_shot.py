"""Which label descriptions start the head best? MiniLM's zero-shot accuracy (model.head_init=descriptions,
before any training: each sentence goes to the nearest description by cosine) for a few candidate sets per
dataset, chosen on a validation split carved from the training data, never on the test split.

    python scripts/zero_shot.py --out docs/results/zero_shot.json     (data: ../shared/data or
                                                                      $DPLORA_SHARED_DATA; about a minute)

For every dataset and candidate: accuracy and macro-F1 on the validation split (dataset.validation_fraction
0.2, the split the recipe search uses) and on the test split, the majority class's share of each, and which
candidate the validation split picks. The chosen descriptions are what conf/dataset/<name>.yaml sets as
`label_descriptions`; the JSON records how many were tried.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dplora import config, data, models
from dplora.evaluation import evaluate

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
CANDIDATES = {
    "fpb": [
        ["negative", "neutral", "positive"],
        ["bad news for the company", "a plain statement of fact about the company", "good news for the company"],
        ["the company's profit fell and its sales decreased", "the company is based in Finland and makes products",
         "the company's profit rose and its sales increased"],
    ],
    "sst2": [
        ["negative", "positive"],
        ["a bad, boring movie", "a good, enjoyable movie"],
        ["a terrible film that I hated", "a wonderful film that I loved"],
    ],
}
VALIDATION_FRACTION = 0.2


def score(name: str, descriptions: list[str]) -> dict:
    overrides = (f"dataset={name} dataset.path={DATA / name} dataset.validation_fraction={VALIDATION_FRACTION} "
                 "model.head_init=descriptions")
    cfg = config.compose(overrides)
    cfg.dataset.label_descriptions = descriptions
    model, tokenizer = models.build_model(cfg)
    result = {"descriptions": descriptions}
    for split in ("validation", "test"):
        sets, labels = data.test_sets(cfg, tokenizer, split)
        metrics = evaluate(model, sets, labels, cfg)
        majority = float(torch.bincount(labels).max()) / len(labels)
        result[split] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "majority": majority,
                         "examples": len(labels)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    for name in CANDIDATES:
        if not (DATA / name / "train.jsonl").is_file():
            parser.error(f"{DATA / name}/train.jsonl not found (set DPLORA_SHARED_DATA)")
    report = {}
    for name, candidates in CANDIDATES.items():
        rows = []
        for descriptions in candidates:
            rows.append(score(name, descriptions))
            r = rows[-1]
            print(f"[zero-shot] {name} {descriptions}: validation {r['validation']['accuracy']:.3f}, test "
                  f"{r['test']['accuracy']:.3f} (majority {r['validation']['majority']:.3f} / "
                  f"{r['test']['majority']:.3f})", flush=True)
        best = max(range(len(rows)), key=lambda i: rows[i]["validation"]["accuracy"])
        report[name] = {"tried": len(rows), "chosen": best, "candidates": rows}
        print(f"[zero-shot] {name}: validation picks {rows[best]['descriptions']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0

