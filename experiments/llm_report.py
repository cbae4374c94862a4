"""The LLM grid's table (docs/RESULTS.md, "The LLM"): one row per dataset x adapter x privacy arm, over seeds.

    python scripts/llm_report.py results/llm [--out results/llm/report]

Reads every `*/metrics.json` below the folder (scripts/llm_results.sh's jobs: the server scored the validation
split carved from training, and the test split as test_*). Per row: the zero-shot start (round 0) and the final
round on the test split (label-likelihood accuracy, macro-F1, exact match; ROUGE-L for free-text answers), the
final validation accuracy, the largest epsilon an owner spent, and seconds per job. A job run with
eval.start=false (the grid scores each dataset's zero-shot start once) takes its zero-shot from another job of the
same dataset and model: at round 0 every such job is the base model itself (LoRA's B starts at zero), on the same
test split. Writes OUT/llm.md and OUT/llm.json; prints the table. Unfinished jobs are listed, not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l")


def adapter(lora: dict) -> str:
    """The LoRA adapter a job trained, in a few words: e.g. `FFA r4, q_proj+v_proj, all layers`."""
    layers = "all layers" if lora.get("layers") is None else f"top {lora['layers']} layers"
    return (f"{'FFA ' if lora.get('train_a') is False else ''}r{lora['r']}, {'+'.join(lora['target_modules'])}, "
            f"{layers}")


def job_row(metrics: dict) -> dict:
    cfg = metrics["config"]
    first, last = metrics.get("initial") or {}, metrics["rounds"][-1]  # the zero-shot start: round 0
    dataset = cfg["dataset"]["name"] + (f"-{cfg['dataset']['max_train']}" if cfg["dataset"].get("max_train") else "")
    eps = [c["epsilon"] for r in metrics["rounds"] for c in r.get("clients", []) if c.get("epsilon") is not None]
    return {"dataset": dataset, "model": cfg["model"]["name"], "adapter": adapter(cfg["model"]["lora"]),
            "target_epsilon": cfg["privacy"]["target_epsilon"],
            "seed": cfg["seed"], "rounds": last["round"],
            "zero_shot": {m: first.get(f"test_{m}") for m in METRICS if f"test_{m}" in first},
            "final": {m: last.get(f"test_{m}") for m in METRICS if f"test_{m}" in last},
            "validation_accuracy": last.get("accuracy"), "epsilon_spent": max(eps) if eps else None,
            "seconds": last.get("seconds") or 0}  # metrics.json records seconds since the run began


def collect(folder: Path) -> tuple[list[dict], list[str]]:
    rows, unfinished = [], []
    for path in sorted(folder.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if not metrics["rounds"] or metrics["rounds"][-1]["round"] < metrics["config"]["num_rounds"]:
            unfinished.append(str(path.parent))
            continue
        rows.append(job_row(metrics) | {"job": str(path.parent)})
    starts = {}  # (dataset, model) -> the first job that scored the zero-shot start
    for row in rows:
        if row["zero_shot"]:
            starts.setdefault((row["dataset"], row["model"]), row)
    for row in rows:
        start = starts.get((row["dataset"], row["model"]))
        row["zero_shot_from"] = row["job"] if row["zero_shot"] else start and start["job"]
        if not row["zero_shot"] and start:
            row["zero_shot"] = start["zero_shot"]
    return rows, unfinished


def summarize(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["model"], row["adapter"], row["target_epsilon"])].append(row)
    table = []
    for (dataset, model, lora, eps), jobs in sorted(groups.items(),
                                                    key=lambda kv: (kv[0][:3], kv[0][3] is None, kv[0][3] or 0)):
        def stat(part: str, metric: str) -> tuple[float, float] | None:
            values = [j[part][metric] for j in jobs if j[part].get(metric) is not None]
            if not values:
                return None
            return 100 * statistics.mean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)
        table.append({"dataset": dataset, "model": model, "adapter": lora, "target_epsilon": eps, "seeds": len(jobs),
                      **{f"zero_shot_{m}": stat("zero_shot", m) for m in METRICS},
                      **{f"final_{m}": stat("final", m) for m in METRICS},
                      "validation_accuracy": 100 * statistics.mean(j["validation_accuracy"] for j in jobs),
                      "epsilon_spent": max((j["epsilon_spent"] or 0) for j in jobs) or None,
                      "seconds": statistics.mean(j["seconds"] for j in jobs)})
    return table


def markdown(table: list[dict]) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"
    lines = ["| dataset | adapter | target epsilon | seeds | zero-shot accuracy | accuracy | macro-F1 | exact match "
             "| ROUGE-L | validation accuracy | epsilon spent (max) | seconds per job |", "|" + " --- |" * 12]
    for r in table:
        eps = "non-private" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        lines.append(f"| {r['dataset']} | {r['adapter']} | {eps} | {r['seeds']} | {cell(r['zero_shot_accuracy'])} | "
                     f"{cell(r['final_accuracy'])} | {cell(r['final_macro_f1'])} | {cell(r['final_exact_match'])} | "
                     f"{cell(r['final_rouge_l'])} | {r['validation_accuracy']:.2f} | {spent} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the LLM grid's folder (scripts/llm_results.sh's OUT_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="where llm.md and llm.json go (default FOLDER/report)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    rows, unfinished = collect(args.folder)
    table = summarize(rows)
    out = args.out or args.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table) + "".join(f"\n\nunfinished: {u}" for u in unfinished)
    (out / "llm.md").write_text(text + "\n")
    (out / "llm.json").write_text(json.dumps({"rows": table, "jobs": rows, "unfinished": unfinished}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
