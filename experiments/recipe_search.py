"""The DP recipe: which training settings make a model worth having at a given epsilon (docs/RESULTS.md,
"The recipe search"). Every choice is made on a validation split carved from the training data, never on the
test split; both arms (epsilon 8 and non-private) get their own best settings from the same grid.

    python scripts/recipe_search.py [OUT_DIR] [--dataset fpb|sst2]   (default results/recipe, both datasets,
                                                                       FPB first; data: ../shared/data)

Every run: MiniLM, 5 owners, IID, seed 0, dataset.validation_fraction=0.2, eval.split=validation (the test
split is recorded beside it, eval.also_test, and never looked at by a choice), AdamW, expected batch = a share
q of each owner's data (train.sample_rate=q, train.batch_size=null), 1 local epoch per round.

FPB, the full search:
1. grid, each arm: q in {0.05, 0.2, 0.5} x learning rate in {1e-3, 3e-3, 1e-2}, 5 rounds (the same 5
   passes over the data: 100, 25 and 10 steps), with FFA-LoRA
   (model.lora.train_a=false) and the head from label descriptions (model.head_init=descriptions).
2. edge and more, at each arm's best: one step past the grid's edge where the best lies on it (learning rate
   x3 or /3, q /2.5 or 1.0); then, at that best and at the grid's best, 10 rounds (twice the steps, the same
   budget: the noise is recalibrated) and, at epsilon 8, clipping norm C = 0.1 (against 1.0); and at the
   edge's best 2 local epochs a round (the steps of 10 rounds in 5 rounds' communication).
3. levers, at each arm's best: a learning rate decaying linearly over the run (train.lr_schedule=linear);
   server momentum (FedAvgM, 0.5) and server Adam (FedAdam, eta 0.1), the settings scripts/strategies.py
   chose on validation at epsilon 8. Epsilon 8 also: plain LoRA (A trains too) at the best rate and a tenth of
   it (the FFA paper uses a 10x larger rate for FFA); a random head; fewer DP-trained coordinates: rank 4
   (alpha 8, the same scaling) and LoRA on query and value only. The best of these and the stage-2 choice (on
   validation) becomes the arm's recipe.
3b. past the edge, at each arm's best: one step past each setting where stages 2-3 chose the last value they
   tried (as stage 2 did for q and the learning rate): 20 rounds past 10, rank 2 (alpha 4) past 4, a 3x
   larger learning rate past the one stage 2 stepped to, 3 local epochs past 2.
4. lower budgets: epsilon 4 with the epsilon-8 recipe at its rate and a third of it; epsilon 1 also with the
   next larger q (more records per noisy step).

SST-2 (2,000 sentences), a check of FPB's recipe on another dataset: stage 1's grid of q x learning rate
with everything else as FPB chose for that arm, then stage 2's step past the grid's edge where an arm's best
lies on it (needs FPB's recipe.json).

OUT_DIR/<dataset>/recipe.json and recipe.md: every run's validation accuracy (and test accuracy beside it),
what was chosen at each stage, and how many settings were tried (a setting tried in two stages counts once). A
finished run is marked and skipped when the script runs again; a run recorded in OUT_DIR/<dataset>/recipe.json
whose folder is gone (a fresh checkout holds only the records, see .gitignore) is read from that record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.stages import DATA, ROOT, final, sweep

# recipe=plain: every training key comes from here and the settings below, not from the defaults' recipe.
COMMON = ["model=minilm", "recipe=plain", "sweep.num_supernodes=5", f"data_dir={DATA}", "partitioner=iid",
          "seed=0", "dataset.validation_fraction=0.2", "eval.split=validation", "eval.also_test=true",
          "train.optimizer=adamw", "train.batch_size=null", "train.local_epochs=1"]
DATASETS = {"fpb": ["dataset=fpb"], "sst2": ["dataset=sst2", "dataset.max_train=2000"]}
ARMS = {"eps8": "privacy.target_epsilon=8", "nonprivate": "privacy.target_epsilon=null"}
BASE = {"model.lora.train_a": "false", "model.head_init": "descriptions", "num_rounds": "5",
        "privacy.max_grad_norm": "1.0"}
# Each lever changes one thing of an arm's best setting (post-processing of the DP steps: no privacy cost).
LEVERS = [{"train.lr_schedule": "linear"},
          {"strategy": "fedavgm", "strategy.aggregator.server_momentum": "0.5"},
          {"strategy": "fedadam", "strategy.aggregator.eta": "0.1", "strategy.aggregator.eta_l": "0.1"}]
SAMPLE_RATES = (0.05, 0.2, 0.5)
RATES = (1e-3, 3e-3, 1e-2)


def training_settings(chosen: dict) -> dict:
    """What a run with the `chosen` settings trains with: every training key the search set, its own and
    COMMON's, as typed values (what composing the config gives)."""
    import yaml

    common = dict(o.split("=", 1) for o in COMMON if o.startswith(("train.", "model.lora.", "num_rounds")))
    return {key: yaml.safe_load(str(value)) for key, value in (common | chosen).items()}


class Search:
    def __init__(self, out: Path, dataset: str):
        self.out, self.dataset, self.rows, self.chosen = out / dataset, dataset, [], {}
        previous = self.out / "recipe.json"  # the record of an earlier, interrupted search into `out`
        self.recorded = json.loads(previous.read_text())["runs"] if previous.is_file() else []

    def run(self, stage: str, arm: str, settings: dict) -> float:
        """Validation accuracy of one run: run now, read from its folder, or, where its folder is gone (a
        fresh checkout keeps only the records: .gitignore), from the row recipe.json recorded for it."""
        # a folder name Hydra's override grammar reads as one plain value: no '=', brackets or commas
        name = "+".join(f"{k.split('.')[-1]}-{str(v).strip('[]').replace(',', '-')}"
                        for k, v in sorted(settings.items()))
        folder = self.out / arm / name  # the same settings in two stages: one run
        where = str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)
        row = next((r for r in self.recorded if r["arm"] == arm and r["settings"] == settings), None)
        if row is not None and not folder.is_dir():
            accuracy, test = row["validation_accuracy"], row["test_accuracy"]
            print(f"[recipe {self.dataset}] {name}: recorded in recipe.json (validation {accuracy:.4f}), "
                  "not run again", flush=True)
        else:
            privacy = ARMS.get(arm, f"privacy.target_epsilon={arm.removeprefix('eps')}")
            common = [o for o in COMMON if o.split("=")[0] not in settings]  # a setting replaces COMMON's value
            sweep(folder, [*common, *DATASETS[self.dataset], privacy,
                           *(f"{k}={v}" for k, v in settings.items())], f"recipe {self.dataset}")
            accuracy, test = final(folder)[0], final(folder, "test_accuracy")[0]
        if all(r["folder"] != where for r in self.rows):
            self.rows.append({"stage": stage, "arm": arm, "settings": settings, "validation_accuracy": accuracy,
                              "test_accuracy": test, "folder": where})
            self.write(complete=False)  # the runs so far, readable while the search goes on
        return accuracy

    def best(self, stage: str, arm: str, candidates: list[dict]) -> dict:
        scores = [self.run(stage, arm, c) for c in candidates]
        return candidates[max(range(len(candidates)), key=scores.__getitem__)]

    def write(self, complete: bool = True) -> None:
        """recipe.json and recipe.md: every run so far and what each finished stage chose (`complete`: all
        stages ran)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.json").write_text(json.dumps({"complete": complete, "chosen": self.chosen,
                                                          "runs": self.rows, "settings_tried": len(self.rows)},
                                                         indent=2))
        lines = ["| stage | arm | settings | validation accuracy | test accuracy (never used to choose) |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['stage']} | {r['arm']} | {' '.join(f'{k}={v}' for k, v in r['settings'].items())} | "
                  f"{100 * r['validation_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} |" for r in self.rows]
        lines += ["", *self.grid_tables()]
        lines += ["", *(f"- chosen{'' if complete else ' so far'}, {arm}: "
                        f"{' '.join(f'{k}={v}' for k, v in c.items())}" for arm, c in self.chosen.items())]
        (self.out / "recipe.md").write_text("\n".join(lines) + "\n")
        if complete:
            print("\n".join(lines), flush=True)

    def grid_tables(self) -> list[str]:
        """Stage 1 as one table per arm: validation accuracy (test accuracy) per q x learning rate."""
        lines = []
        for arm in ARMS:
            cells = {(r["settings"]["train.sample_rate"], r["settings"]["train.learning_rate"]):
                     f"{100 * r['validation_accuracy']:.1f} ({100 * r['test_accuracy']:.1f})"
                     for r in self.rows if r["arm"] == arm and r["stage"].startswith("1-grid")}
            if not cells:
                continue
            lines += [f"{arm}, stage 1: validation accuracy (test accuracy)", "",
                      "| q | " + " | ".join(f"lr {lr:g}" for lr in RATES) + " |", "| --- |" + " --- |" * len(RATES),
                      *(f"| {q:g} | " + " | ".join(cells.get((q, lr), "-") for lr in RATES) + " |"
                        for q in SAMPLE_RATES), ""]
        return lines


def beyond(best: dict) -> list[dict]:
    """One step past the grid's edge where the best setting lies on it: a 3x larger learning rate, a 2.5x
    smaller q (or larger, at the other end)."""
    lr, q, steps = best["train.learning_rate"], best["train.sample_rate"], []
    if lr == max(RATES):
        steps.append(best | {"train.learning_rate": lr * 3})
    if lr == min(RATES):
        steps.append(best | {"train.learning_rate": lr / 3})
    if q == min(SAMPLE_RATES):
        steps.append(best | {"train.sample_rate": q / 2.5})
    if q == max(SAMPLE_RATES):
        steps.append(best | {"train.sample_rate": 1.0})
    return steps


def past_the_edge(best: dict) -> list[dict]:
    """Stage 3b: one step past each setting where stages 2-3 chose the last value they tried (as stage 2 did
    for q and the learning rate): twice the rounds past 10, rank 2 past 4, a 3x larger learning rate past the
    edge stage 2 already took, 3 local epochs past 2."""
    steps = []
    if best.get("num_rounds") == "10":
        steps.append(best | {"num_rounds": "20"})
    if best.get("model.lora.r") == "4":
        steps.append(best | {"model.lora.r": "2", "model.lora.alpha": "4"})
    if best["train.learning_rate"] == 3 * max(RATES):
        steps.append(best | {"train.learning_rate": 9 * max(RATES)})
    if best.get("train.local_epochs") == "2":
        steps.append(best | {"train.local_epochs": "3"})
    return steps


def search(out: Path, dataset: str) -> dict:
    if dataset != "fpb":
        return check(out, dataset)
    s = Search(out, dataset)
    chosen = s.chosen
    grid = [BASE | {"train.sample_rate": q, "train.learning_rate": lr} for q in SAMPLE_RATES for lr in RATES]
    for arm in ARMS:
        chosen[arm] = s.best("1-grid", arm, grid)
    for arm in ARMS:
        grid_best = chosen[arm]
        edge_best = s.best("2-edge", arm, [grid_best, *beyond(grid_best)])
        more = [edge_best, edge_best | {"train.local_epochs": "2"}]  # the steps of 10 rounds in 5
        for base in [edge_best] if edge_best == grid_best else [edge_best, grid_best]:
            more.append(base | {"num_rounds": "10"})
            if arm == "eps8":
                more.append(base | {"privacy.max_grad_norm": "0.1"})
        chosen[arm] = s.best("2-more", arm, more)
    for arm in ARMS:
        best, lr = chosen[arm], chosen[arm]["train.learning_rate"]
        levers = [best | lever for lever in LEVERS]
        if arm == "eps8":
            levers += [best | {"model.lora.train_a": "true"},
                       best | {"model.lora.train_a": "true", "train.learning_rate": lr / 10},
                       best | {"model.head_init": "random"},
                       best | {"model.lora.r": "4", "model.lora.alpha": "8"},
                       best | {"model.lora.target_modules": "[query,value]"}]
        chosen[arm] = s.best("3-levers", arm, [best, *levers])
    for arm in ARMS:
        chosen[arm] = s.best("3b-past the edge", arm, [chosen[arm], *past_the_edge(chosen[arm])])
    best, lr, q = chosen["eps8"], chosen["eps8"]["train.learning_rate"], chosen["eps8"]["train.sample_rate"]
    for arm in ("eps4", "eps1"):
        candidates = [best, best | {"train.learning_rate": lr / 3}]
        if arm == "eps1" and q < max(SAMPLE_RATES):
            candidates.append(best | {"train.sample_rate": min(r for r in SAMPLE_RATES if r > q)})
        chosen[arm] = s.best("4-budgets", arm, candidates)
    s.write()
    return chosen


def check(out: Path, dataset: str) -> dict:
    """Stage 1's grid of q x learning rate on another dataset, around FPB's recipe for each arm, then one step
    past the grid's edge where an arm's best lies on it (stage 2's first part)."""
    fpb = out / "fpb" / "recipe.json"
    if not fpb.is_file():
        raise SystemExit(f"{fpb} not found: run the FPB search first (--dataset fpb)")
    recipe, s = json.loads(fpb.read_text()), Search(out, dataset)
    if not recipe.get("complete"):
        raise SystemExit(f"{fpb}: the FPB search has not finished: run it first (--dataset fpb)")
    recipe, chosen = recipe["chosen"], s.chosen
    for arm in ARMS:
        grid = [recipe[arm] | {"train.sample_rate": q, "train.learning_rate": lr}
                for q in SAMPLE_RATES for lr in RATES]
        chosen[arm] = s.best("1-grid, FPB's recipe", arm, grid)
    for arm in ARMS:
        chosen[arm] = s.best("2-edge", arm, [chosen[arm], *beyond(chosen[arm])])
    s.write()
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="results/recipe", type=Path)
    parser.add_argument("--dataset", choices=sorted(DATASETS), action="append")
    args = parser.parse_args()
    for name in args.dataset or DATASETS:
        if not (DATA / name / "train.jsonl").is_file():
            parser.error(f"{DATA / name}/train.jsonl not found (set DPLORA_SHARED_DATA)")
        search(args.out.resolve(), name)
    return 0

