"""Collect a sweep into a table and a privacy-utility plot.

    python scripts/report.py multirun/<date>/<time> --out DIR [--before OLD_DIR | OLD/results.csv]

Reads every `*/metrics.json` below the folder (a sweep, or a folder holding several sweeps) and writes
DIR/results.csv and DIR/results.md (final accuracy and macro-F1, mean +- std over seeds, per dataset x
partitioner x target epsilon, with the epsilon actually spent and the wall-clock per job) and
DIR/privacy_utility.png (one panel per dataset: accuracy vs epsilon with error bars, a line per partitioner, the
non-private level and the majority class as labelled horizontal lines). A dataset kept as a subsample
(dataset.max_train) is its own dataset, named with the size: sst2-2000. With `--before`, an earlier sweep's
jobs (a folder) or an earlier report (its results.csv) are drawn beside them (hollow markers, thin lines) and
tabulated in DIR/before.md. DIR/targets.md holds the privacy-utility targets (TARGETS) as this sweep meets or
misses them, and as the earlier one did. Jobs that failed are listed, not hidden.
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
          "macro_f1_mean", "macro_f1_std", "epsilon_spent_max", "seconds_mean", "majority"]

# The privacy-utility targets (docs/RESULTS.md): on IID shares, the DP arm at `epsilon` at most `points` below the
# non-private arm ("non-private") or at least `points` above the majority class ("majority"), mean over seeds.
TARGETS = [("fpb", 8.0, "non-private", 3.0), ("fpb", 1.0, "majority", 5.0), ("sst2-2000", 8.0, "non-private", 8.0)]


def target_lines(rows: list[dict], before: list[dict] | None = None) -> list[str]:
    """DIR/targets.md: each target with the numbers that meet or miss it, after (and before)."""
    majority = {r["dataset"]: r["majority"] for r in [*(before or []), *rows] if r.get("majority") is not None}

    def measure(table, dataset, epsilon, reference, points):  # (the same test split before and after)
        found = {r["target_epsilon"]: r for r in table if r["dataset"] == dataset and r["partitioner"] == "iid"}
        dp, level = found.get(epsilon), found.get(None) if reference == "non-private" else None
        if dp is None or (level is None if reference == "non-private" else dataset not in majority):
            return "not run", None
        ref = 100 * (level["accuracy_mean"] if reference == "non-private" else majority[dataset])
        acc = 100 * dp["accuracy_mean"]
        if reference == "non-private":
            return f"{acc:.1f} vs {ref:.1f}: {ref - acc:.1f} below ({dp['seeds']}/{level['seeds']} seeds)", \
                ref - acc <= points
        return f"{acc:.1f} vs {ref:.1f}: {round(acc - ref, 1) + 0.0:+.1f} ({dp['seeds']} seeds)", acc - ref >= points

    lines = ["| target (IID shares, mean over seeds) | before | after | met |", "| --- | --- | --- | --- |"]
    for dataset, epsilon, reference, points in TARGETS:
        what = (f"{dataset}, epsilon {epsilon:g} within {points:g} points of non-private" if reference == "non-private"
                else f"{dataset}, epsilon {epsilon:g} at least {points:g} points above the majority class")
        old = measure(before, dataset, epsilon, reference, points)[0] if before is not None else "-"
        now, met = measure(rows, dataset, epsilon, reference, points)
        lines.append(f"| {what} | {old} | {now} | {'-' if met is None else 'yes' if met else 'no'} |")
    return lines


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
        jobs.append({"dataset": dataset_label(cfg["dataset"]), "partitioner": cfg["partitioner"]["name"],
                     "target_epsilon": cfg["privacy"]["target_epsilon"], "seed": cfg["seed"],
                     "accuracy": final["accuracy"], "macro_f1": final["macro_f1"], "epsilon": final["epsilon"],
                     "seconds": final["seconds"], "settings": _settings(cfg), "folder": str(path.parent),
                     "majority": (m.get("evaluation_split") or {}).get("majority_class")})
    failed += [str(p.parent) for p in sorted(sweep_dir.rglob("FAILED"))
               if not (p.parent / "metrics.json").exists()]
    return jobs, failed


def dataset_label(dataset_cfg: dict) -> str:
    """The dataset's name, with the subsample size when dataset.max_train keeps one (sst2-2000, sst2-10000)."""
    size = dataset_cfg.get("max_train")
    return f"{dataset_cfg['name']}-{size}" if size else dataset_cfg["name"]


def read_csv(path: Path) -> list[dict]:
    """Rows of an earlier report's results.csv (e.g. the committed docs/results/before/results.csv)."""
    numbers = ("accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "epsilon_spent_max",
               "seconds_mean", "majority")
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            missing = [k for k in ("dataset", "partitioner", "target_epsilon", "accuracy_mean", "accuracy_std")
                       if not raw.get(k)]
            if missing:
                raise ValueError(f"{path}: a row lacks {', '.join(missing)}")
            row = {k: (float(raw[k]) if raw.get(k) else None) for k in numbers}
            eps = raw["target_epsilon"]
            row |= {"dataset": raw["dataset"], "partitioner": raw["partitioner"], "seeds": int(raw.get("seeds") or 0),
                    "target_epsilon": None if eps == "non-private" else float(eps)}
            rows.append(row)
    return rows


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
                     "seconds_mean": statistics.mean(r["seconds"] for r in runs),
                     "majority": next((r["majority"] for r in runs if r.get("majority") is not None), None)})
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
    lines = [("| dataset | partitioner | target epsilon | seeds | accuracy | macro-F1 | epsilon spent (max) "
              "| seconds per job (rounds) |"),
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


def plot(rows: list[dict], path: Path, before: list[dict] | None = None) -> None:
    """One panel per dataset: final test accuracy vs target epsilon (log scale, the epsilons that were run),
    mean +- std over seeds, a line per partitioner; each partitioner's non-private level (dashed) and the
    majority class (grey, dotted) as horizontal lines, labelled on the line and in the legend below the panel;
    `before` rows beside them, hollow and thin (their lines labelled in the legend only)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("after" if before else None, rows)] + ([("before", before)] if before else [])
    datasets = sorted({r["dataset"] for _, rs in runs for r in rs})
    partitioners = sorted({r["partitioner"] for _, rs in runs for r in rs})
    color = {p: f"C{i}" for i, p in enumerate(partitioners)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        values, epsilons = [], set()
        for tag, rs in runs:
            hollow = tag == "before"
            for partitioner in partitioners:
                points = [r for r in rs if r["dataset"] == dataset and r["partitioner"] == partitioner]
                private = [p for p in points if p["target_epsilon"] is not None]
                name = partitioner + (f", {tag}" if tag else "")
                if private:
                    eps = [p["target_epsilon"] for p in private]
                    epsilons.update(eps)
                    ax.errorbar(eps, [100 * p["accuracy_mean"] for p in private],
                                yerr=[100 * p["accuracy_std"] for p in private], marker="o", capsize=3,
                                color=color[partitioner], linewidth=0.8 if hollow else 1.8,
                                markerfacecolor="white" if hollow else color[partitioner],
                                alpha=0.6 if hollow else 1.0, label=name)
                    values += [100 * (p["accuracy_mean"] + sign * p["accuracy_std"]) for p in private
                               for sign in (-1, 1)]
                for p in points:
                    if p["target_epsilon"] is None:
                        level = 100 * p["accuracy_mean"]
                        values.append(level)
                        label = f"non-private, {name}: {level:.1f}"
                        ax.axhline(level, color=color[partitioner], linestyle="--", label=label,
                                   linewidth=0.8 if hollow else 1.2, alpha=0.6 if hollow else 1.0)
                        if not hollow:  # and on the line (before's lines are named in the legend only)
                            ax.annotate(label, (0.02, level), xycoords=("axes fraction", "data"), fontsize=7,
                                        color=color[partitioner], va="bottom")
        majority = next((r["majority"] for _, rs in runs for r in rs
                         if r["dataset"] == dataset and r.get("majority") is not None), None)
        if majority is not None:
            label = f"majority class: {100 * majority:.1f}"
            ax.axhline(100 * majority, color="grey", linestyle=":", linewidth=1.2, label=label)
            ax.annotate(label, (0.98, 100 * majority),
                        xycoords=("axes fraction", "data"), fontsize=7, color="grey", ha="right", va="top")
            values.append(100 * majority)
        ax.set_xscale("log")
        if epsilons:  # label the epsilons that were run, as plain numbers
            ticks = sorted(epsilons)
            ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
        if values:  # room above the top line and its label, below the lowest error bar and the majority label
            ax.set_ylim(min(values) - 6, max(values) + 6)
        ax.set_title(dataset)
        ax.set_xlabel("target epsilon per data owner")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # below the panel, clear of the lines and their labels
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    axes[0][0].set_ylabel("final test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's folder (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for results.csv, results.md and privacy_utility.png")
    parser.add_argument("--before", type=Path, help="an earlier sweep (a folder of jobs) or an earlier report's "
                        "results.csv, drawn beside this one (and tabulated in before.md)")
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
    before = None
    if args.before is not None:
        if not (args.before.is_dir() or (args.before.is_file() and args.before.suffix == ".csv")):
            parser.error(f"--before {args.before} is not a folder or a results.csv")
        try:
            if args.before.is_dir():
                old_jobs, old_failed = collect(args.before)
                before = summarize(old_jobs) if old_jobs else []
            else:
                before, old_failed = read_csv(args.before), []
        except (ValueError, KeyError) as err:
            print(f"error (--before): {err}", file=sys.stderr)
            return 1
        write_markdown(before, old_failed, args.out / "before.md")
    plot(rows, args.out / "privacy_utility.png", before)
    (args.out / "targets.md").write_text("\n".join(target_lines(rows, before)) + "\n")
    print((args.out / "results.md").read_text(), end="")
    print((args.out / "targets.md").read_text(), end="")
    print(f"wrote {args.out}/results.csv, results.md, targets.md, privacy_utility.png from {len(jobs)} jobs"
          + (f"; {len(failed)} failed" if failed else ""))
    return 0

