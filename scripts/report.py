"""Collect a sweep into a table and a privacy-utility plot.

    python scripts/report.py multirun/<date>/<time> --out DIR

Reads every `*/metrics.json` below the folder (a sweep, or a folder holding several sweeps) and writes DIR/results.csv and DIR/results.md (final
accuracy and macro-F1, mean +- std over seeds, per dataset x partitioner x target epsilon, with the epsilon
actually spent and the wall-clock per job) and DIR/privacy_utility.png (accuracy vs epsilon, one line per
dataset and partitioner, the non-private level as a dashed line). Jobs that failed are listed, not hidden.
Jobs of one table row may differ only in seed (and data paths); other differences are an error.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

FIELDS = ["dataset", "partitioner", "target_epsilon", "seeds", "accuracy_mean", "accuracy_std",
          "macro_f1_mean", "macro_f1_std", "epsilon_spent_max", "seconds_mean"]


def collect(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """(one row per finished job, the folders of failed or unfinished jobs)."""
    jobs, failed = [], []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        m = json.loads(path.read_text())
        cfg = m["config"]
        if (path.parent / "FAILED").exists() or len(m["rounds"]) != cfg["num_rounds"]:
            failed.append(str(path.parent))
            continue
        final = m["rounds"][-1]
        jobs.append({"dataset": cfg["dataset"]["name"], "partitioner": cfg["partitioner"]["name"],
                     "target_epsilon": cfg["privacy"]["target_epsilon"], "seed": cfg["seed"],
                     "accuracy": final["accuracy"], "macro_f1": final["macro_f1"], "epsilon": final["epsilon"],
                     "seconds": final["seconds"], "settings": _settings(cfg), "folder": str(path.parent)})
    failed += [str(p.parent) for p in sorted(sweep_dir.rglob("FAILED"))
               if not (p.parent / "metrics.json").exists()]
    return jobs, failed


# Keys that may differ between the seeds of one table row (everything else must match).
PER_JOB_KEYS = {"seed", "data_dir", "dataset.path", "resume"}


def _settings(cfg: dict, prefix: str = "") -> dict:
    """The job's config as flat dotted keys, without the ones that may differ between seeds."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_settings(value, f"{name}."))
        elif name not in PER_JOB_KEYS:
            flat[name] = value
    return flat


def summarize(jobs: list[dict]) -> list[dict]:
    """One row per dataset x partitioner x target epsilon; raises ValueError if a row would mix settings."""
    groups = defaultdict(list)
    for job in jobs:
        groups[(job["dataset"], job["partitioner"], job["target_epsilon"])].append(job)
    for key, runs in groups.items():
        first = runs[0]
        for other in runs[1:]:
            keys = sorted(k for k in first["settings"].keys() | other["settings"].keys()
                          if first["settings"].get(k) != other["settings"].get(k))
            if keys:
                raise ValueError(f"{first['folder']} and {other['folder']} would share a row of the table but "
                                 f"differ in {', '.join(keys)}: report them separately")

    def order(key):  # datasets, partitioners, then epsilon ascending with non-private last
        return key[0], key[1], float("inf") if key[2] is None else key[2]

    rows = []
    for key in sorted(groups, key=order):
        runs = groups[key]
        acc, f1 = [r["accuracy"] for r in runs], [r["macro_f1"] for r in runs]
        spent = [r["epsilon"] for r in runs if r["epsilon"] is not None]
        rows.append({"dataset": key[0], "partitioner": key[1], "target_epsilon": key[2], "seeds": len(runs),
                     "accuracy_mean": statistics.mean(acc), "accuracy_std": _std(acc),
                     "macro_f1_mean": statistics.mean(f1), "macro_f1_std": _std(f1),
                     "epsilon_spent_max": max(spent) if spent else None,
                     "seconds_mean": statistics.mean(r["seconds"] for r in runs)})
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            eps = row["target_epsilon"]
            writer.writerow({**row, "target_epsilon": "non-private" if eps is None else eps})


def write_markdown(rows: list[dict], failed: list[str], path: Path) -> None:
    lines = ["| dataset | partitioner | target epsilon | seeds | accuracy | macro-F1 | epsilon spent (max) "
             "| seconds per job (rounds) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eps = "non-private" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
        lines.append(f"| {r['dataset']} | {r['partitioner']} | {eps} | {r['seeds']} | "
                     f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | "
                     f"{100 * r['macro_f1_mean']:.2f} ± {100 * r['macro_f1_std']:.2f} | {spent} | "
                     f"{r['seconds_mean']:.0f} |")
    if failed:
        lines += ["", f"Failed or unfinished jobs ({len(failed)}):", *[f"- `{f}`" for f in failed]]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = defaultdict(list)
    for r in rows:
        series[(r["dataset"], r["partitioner"])].append(r)
    for i, ((dataset, partitioner), points) in enumerate(sorted(series.items())):
        color = f"C{i}"
        private = [p for p in points if p["target_epsilon"] is not None]
        if private:
            ax.errorbar([p["target_epsilon"] for p in private], [100 * p["accuracy_mean"] for p in private],
                        yerr=[100 * p["accuracy_std"] for p in private], marker="o", capsize=3, color=color,
                        label=f"{dataset} ({partitioner})")
        for p in points:
            if p["target_epsilon"] is None:
                ax.axhline(100 * p["accuracy_mean"], color=color, linestyle="--", linewidth=1,
                           label=f"{dataset} ({partitioner}), non-private")
    ax.set_xscale("log")
    epsilons = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    if epsilons:  # label the epsilons that were run, as plain numbers
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("target epsilon per data owner (delta fixed)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Privacy-utility trade-off (dashed: non-private)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's folder (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for results.csv, results.md and privacy_utility.png")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    jobs, failed = collect(args.sweep_dir)
    if not jobs:
        print(f"no finished job (metrics.json) below {args.sweep_dir}", file=sys.stderr)
        return 1
    try:
        rows = summarize(jobs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv")
    write_markdown(rows, failed, args.out / "results.md")
    plot(rows, args.out / "privacy_utility.png")
    print((args.out / "results.md").read_text(), end="")
    print(f"wrote {args.out}/results.csv, results.md, privacy_utility.png from {len(jobs)} jobs"
          + (f"; {len(failed)} failed" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
