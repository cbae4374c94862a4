"""Which aggregation strategy for owners with skewed data: FedAvg against FedProx, FedAvgM and FedAdam on FPB
split among 5 owners by Dirichlet(0.5), non-private and at epsilon 8, three seeds (docs/RESULTS.md).

    python scripts/strategies.py [OUT_DIR]     (default results/strategies; data: ../shared/data or
                                                $DPLORA_SHARED_DATA)

1. tune: every candidate setting of every strategy, for each arm, on seed 0, evaluated on a validation split
   carved from the training data (dataset.validation_fraction=0.2, eval.split=validation), never on the test
   split. The best final validation accuracy picks each strategy's setting per arm (FedAvg has none). These
   runs also record the test split (eval.also_test): the chosen setting's seed-0 test accuracy comes from its
   tuning run, which the choice never looked at.
2. test: each strategy with its chosen setting, for each arm, seeds 1 and 2, on the test split (the same
   validation share held out of training, so the owners' data is the same as in the tuning runs).
3. user-level DP: FedAvg at epsilon 8 inside Flower's DP-FedAvg wrapper (user-level epsilon 8), seeds 0-2 on the
   test split, clipping at the FedAvg tuning run's median update norm.
4. OUT_DIR/strategies.md and .json: accuracy mean +- std per strategy and arm, the chosen settings, and how many
   settings were tried.

Every stage is scripts/sweep.py multiruns (full `flwr run` simulations); a finished multirun is marked
(`stage.done`) and skipped when the script runs again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from experiments.stages import DATA, final
from experiments.stages import sweep as run_stage

# recipe=plain and the random head: the settings below are all there is (the defaults' recipe is not applied).
COMMON = ["model=minilm", "recipe=plain", "model.head_init=random", "num_rounds=3", "sweep.num_supernodes=5",
          f"data_dir={DATA}", "dataset=fpb", "partitioner=dirichlet", "partitioner.alpha=0.5",
          "dataset.validation_fraction=0.2", "train.optimizer=sgd", "train.learning_rate=0.2", "train.momentum=0.9",
          "train.local_epochs=1", "train.batch_size=64"]
ARMS = {"epsilon 8": "privacy.target_epsilon=8", "non-private": "privacy.target_epsilon=null"}
# The settings tried per strategy (each a Hydra override list; FedAvg has nothing to tune).
CANDIDATES = {
    "fedavg": [[]],
    "fedprox": [[f"strategy.aggregator.proximal_mu={mu}"] for mu in (0.01, 0.1, 1.0)],
    "fedavgm": [[f"strategy.aggregator.server_momentum={m}"] for m in (0.5, 0.9)],
    "fedadam": [[f"strategy.aggregator.eta={eta}", f"strategy.aggregator.eta_l={eta}"] for eta in (0.001, 0.01, 0.1)],
}
SEEDS = (1, 2)  # seed 0 is the tuning run


def sweep(folder: Path, overrides: list[str]) -> None:
    run_stage(folder, [*COMMON, *overrides], "strategies")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/strategies").resolve()
    if not (DATA / "fpb" / "train.jsonl").is_file():
        print(f"error: {DATA}/fpb/train.jsonl not found (set DPLORA_SHARED_DATA)", file=sys.stderr)
        return 2
    chosen, tried, seed0 = {}, {}, {}
    for arm, privacy in ARMS.items():
        for name, settings in CANDIDATES.items():
            scores = []
            for i, setting in enumerate(settings):
                folder = out / "tune" / f"{name}-{arm.replace(' ', '')}-{i}"
                sweep(folder, [privacy, f"strategy={name}", *setting, "eval.split=validation",
                               "eval.also_test=true", "seed=0"])
                scores.append(final(folder)[0])
            best = max(range(len(settings)), key=scores.__getitem__)
            seed0[(name, arm)] = final(out / "tune" / f"{name}-{arm.replace(' ', '')}-{best}",
                                                "test_accuracy")[0]
            chosen[(name, arm)], tried[(name, arm)] = settings[best], list(zip(map(" ".join, settings), scores,
                                                                              strict=True))
    rows = []
    for arm, privacy in ARMS.items():
        for name in CANDIDATES:
            folder = out / "test" / f"{name}-{arm.replace(' ', '')}"
            sweep(folder, [privacy, f"strategy={name}", *chosen[(name, arm)], "seed=" + ",".join(map(str, SEEDS))])
            acc = [seed0[(name, arm)], *final(folder)]
            rows.append({"strategy": name, "arm": arm, "setting": " ".join(chosen[(name, arm)]) or "-",
                         "validation_tried": tried[(name, arm)], "seeds": len(acc), "accuracy": acc,
                         "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0})
    rows.append(user_level(out))
    (out / "strategies.json").write_text(json.dumps(rows, indent=2))
    lines = ["| strategy | arm | setting (chosen on validation) | settings tried | seeds | test accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['strategy']} | {r['arm']} | {r['setting']} | {len(r['validation_tried'])} | {r['seeds']} | "
              f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} |" for r in rows]
    (out / "strategies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def user_level(out: Path) -> dict:
    """What user-level DP costs: FedAvg at record-level epsilon 8 inside Flower's server-side DP-FedAvg wrapper
    at user-level epsilon 8 (delta 1e-5) over the 3 rounds, seeds 0-2 on the test split. Clipping norm: the
    median owner update norm of the FedAvg epsilon-8 tuning run (validation split), to 4 digits."""
    tuned = json.loads(next((out / "tune" / "fedavg-epsilon8-0").rglob("metrics.json")).read_text())
    clip = round(statistics.median(c["update_norm"] for r in tuned["rounds"] for c in r["clients"]), 4)
    folder = out / "test" / "fedavg-epsilon8-userlevel8"
    sweep(folder, [ARMS["epsilon 8"], "strategy=fedavg", "strategy.user_dp.enabled=true",
                   "strategy.user_dp.owners_per_round=5",
                   f"strategy.user_dp.clipping_norm={clip}", "strategy.user_dp.target_epsilon=8", "seed=0,1,2"])
    acc = final(folder)
    users = [json.loads(p.read_text())["rounds"][-1]["user_level"] for p in sorted(folder.rglob("metrics.json"))]
    return {"strategy": "fedavg + user-level DP", "arm": "epsilon 8",
            "setting": f"clipping_norm={clip}, noise_multiplier={users[0]['noise_multiplier']:.3f}, user-level "
                       f"epsilon {max(u['epsilon'] for u in users):.3f}",
            "validation_tried": [], "seeds": len(acc), "accuracy": acc, "mean": statistics.mean(acc),
            "std": statistics.stdev(acc)}

