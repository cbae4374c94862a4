"""User-level DP at scale: how much noise on the mean a user-level budget costs, with and without sampling owners.

    python scripts/user_level.py plan [--epsilon 8] [--delta 1e-5] [--rounds 20] [--owners 100:10 500:50 ...]
    python scripts/user_level.py run OUT_DIR [--population 500] [--per-round 10 50] [--rounds 3]
                                             [--epsilon 8] [--quick] [--set KEY=VALUE ...]

`plan` prints, for each population:owners-per-round pair, the noise multiplier that reaches the user-level
epsilon over the rounds and the Gaussian noise it puts on the averaged update, per coordinate, in clipping norms
(noise_multiplier / owners_per_round; the noise vector's norm is that times the square root of the adapter's
coordinates, e.g. 170 for MiniLM's 28,803): with `sampling: fixed` (Flower's accountant, no amplification; the
population plays no part) and with `sampling: poisson` (each owner with probability owners_per_round / population,
dp-accounting's Poisson-subsampled Gaussian). Both calibrations are dplora/user_level.py's, the ones the server
uses. The clipping norm itself is the user's choice (strategy.user_dp.clipping_norm): the noise is small enough
when it is small against the mean of the clipped updates.

`run` measures it: SST-2's 67,349 training sentences (a tenth held out as the validation split) over
`--population` owners (iid), MiniLM with the non-private recipe (user-level DP alone, no record-level DP), full
`flwr run` simulations (scripts/sweep.py stages: resumable, a finished stage is skipped):
1. reference-m<M>: FedAvg without user-level DP, Flower sampling M owners a round (fraction_train M /
   population), `--rounds` rounds, seed 0;
2. user-m<M>: `strategy.user_dp.sampling=poisson` at user-level epsilon `--epsilon` (delta 1e-5) over the same
   rounds, M owners a round expected, the clipping norm the median update norm of reference-m<M> (one setting
   tried per M; chosen on training data, never on the test split).
Both arms are scored on the validation split every round and on the test split at the end (eval.also_test).
OUT_DIR/user_level.json and .md: per M the noise multiplier and the noise on the mean (in clipping norms),
the noise vector's norm against the clipping norm (noise on the mean x the square root of the adapter's values),
validation and test accuracy of both arms, the gap, and (where the gap shrinks with M) the log-log fit of the
test gap against M and the M it puts at a 3-point gap, and the start (the adapter before any round: MiniLM's
zero-shot head) on both splits. `--set` adds Hydra overrides to both arms (e.g. a smaller adapter: the noise on
the mean is per coordinate, so its norm grows with the square root of the adapter's size; docs/RESULTS.md's
run: `--set model.lora.layers=1 model.lora.r=2 model.lora.alpha=4 "model.lora.target_modules=[query,value]"`,
42 min here; each round of 50 MiniLM owners takes ~5 min on 2 cores). `--quick`: the tiny model on synthetic data, 20 owners,
2 rounds (minutes; checks the pipeline, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from dplora import config, models
from dplora.user_level import user_level_noise
from experiments.stages import DATA, final
from experiments.stages import sweep as run_stage

OWNERS = ("5:5", "100:10", "100:20", "200:20", "500:50", "500:100", "1000:100")


def plan_rows(epsilon: float, delta: float, rounds: int, owners: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for population, per_round in owners:
        fixed = user_level_noise(epsilon, rounds, delta)
        poisson = user_level_noise(epsilon, rounds, delta, per_round / population)
        rows.append({"population": population, "owners_per_round": per_round,
                     "fixed_noise_multiplier": fixed, "fixed_noise_on_mean": fixed / per_round,
                     "poisson_noise_multiplier": poisson, "poisson_noise_on_mean": poisson / per_round})
    return rows


FULL = {"overrides": ["model=minilm", "privacy=none", "dataset=sst2", f"data_dir={DATA}", "partitioner=iid",
                     "dataset.validation_fraction=0.1", "eval.split=validation", "eval.also_test=true"]}
QUICK = {"overrides": ["model=tiny-llama", "privacy=none", "dataset.num_train=400", "dataset.num_test=60",
                       "dataset.validation_fraction=0.1", "eval.split=validation", "eval.also_test=true"]}
GAP_TARGET = 0.03  # within 3 points of non-private


def fraction_for(per_round: int, population: int) -> float:
    """strategy.fraction_train that makes Flower's FedAvg sample exactly `per_round` of `population` owners
    (it samples int(population x fraction))."""
    fraction = per_round / population
    return fraction if int(population * fraction) == per_round else fraction + 1e-9


def adapter_values(overrides: list[str]) -> int:
    """The coordinates the server clips and noises: the adapter an owner sends (B + head with FFA-LoRA)."""
    model, _ = models.build_model(config.compose([o for o in overrides if not o.startswith("sweep.")]), "cpu")
    return sum(v.numel() for v in models.adapter_state(model).values())


def measure(out: Path, population: int, per_round: list[int], rounds: int, epsilon: float, quick: bool,
            extra: list[str] = ()) -> dict:
    common = [*(QUICK if quick else FULL)["overrides"], f"num_rounds={rounds}", f"sweep.num_supernodes={population}",
              "seed=0", *extra]
    rows, size = [], adapter_values(common)
    for m in per_round:
        reference = out / f"reference-m{m}"
        run_stage(reference, [*common, f"strategy.fraction_train={fraction_for(m, population)}"], "user-level")
        metrics = json.loads(next(reference.rglob("metrics.json")).read_text())
        clip = round(statistics.median(c["update_norm"] for r in metrics["rounds"] for c in r["clients"]), 4)
        user = out / f"user-m{m}"
        run_stage(user, [*common, "eval.start=false", "strategy.fraction_train=1.0", "strategy.user_dp.enabled=true",
                         "strategy.user_dp.sampling=poisson", f"strategy.user_dp.population={population}",
                         f"strategy.user_dp.owners_per_round={m}", f"strategy.user_dp.clipping_norm={clip}",
                         f"strategy.user_dp.target_epsilon={epsilon}"], "user-level")
        record = json.loads(next(user.rglob("metrics.json")).read_text())
        guarantee = record["rounds"][-1]["user_level"]
        rows.append({
            "per_round": m, "sample_rate": guarantee["sample_rate"], "clipping_norm": clip,
            "noise_multiplier": guarantee["noise_multiplier"],
            "noise_on_mean": guarantee["noise_multiplier"] / m, "user_level_epsilon": guarantee["epsilon"],
            "noise_norm_over_clipping_norm": guarantee["noise_multiplier"] / m * math.sqrt(size),
            "sampled": [r["user_level"]["sampled"] for r in record["rounds"]],
            "reference": {"validation": final(reference)[0], "test": final(reference, "test_accuracy")[0]},
            "user_level": {"validation": final(user)[0], "test": final(user, "test_accuracy")[0]}})
        rows[-1]["test_gap"] = rows[-1]["reference"]["test"] - rows[-1]["user_level"]["test"]
    initial = json.loads(next((out / f"reference-m{per_round[0]}").rglob("metrics.json")).read_text())["initial"]
    return {"population": population, "rounds": rounds, "epsilon": epsilon, "delta": 1e-5, "overrides": list(extra),
            "adapter_values": size,
            "majority_class": record["evaluation_split"]["majority_class"],
            "start": {"validation": initial["accuracy"], "test": initial.get("test_accuracy")}, "rows": rows,
            "fit": gap_fit(rows)}


def gap_fit(rows: list[dict]) -> dict | None:
    """log(test gap) = a + b log(M) over the rows with a positive gap, and the M at a GAP_TARGET gap; None
    with fewer than two such rows or a gap that does not shrink."""
    points = [(math.log(r["per_round"]), math.log(r["test_gap"])) for r in rows if r["test_gap"] > 0]
    if len(points) < 2:
        return None
    mx, my = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    fit = {"exponent": slope, "points": len(points)}
    if slope < 0:
        fit["per_round_for_gap_target"] = math.exp(mx + (math.log(GAP_TARGET) - my) / slope)
    return fit


def table(result: dict) -> str:
    lines = [f"User-level epsilon {result['epsilon']:g} (delta {result['delta']:g}, Poisson-sampled owners) over "
             f"{result['rounds']} rounds, {result['population']} owners; majority class "
             f"{100 * result['majority_class']:.1f}%; the start (before any round) "
             f"{100 * result['start']['validation']:.1f} / {100 * result['start']['test']:.1f} (val / test)"
             + (f"; both arms with {' '.join(result['overrides'])}" if result["overrides"] else "")
             + f" ({result['adapter_values']:,} adapter values).", "",
             "| owners a round | noise multiplier | noise on the mean (clipping norms per value) | its norm / "
             "clipping norm | clipping norm | non-private val / test | user-level DP val / test | test gap |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['per_round']} | {r['noise_multiplier']:.3f} | {r['noise_on_mean']:.4f} | "
                     f"{r['noise_norm_over_clipping_norm']:.2f} | {r['clipping_norm']:g} | {100 * r['reference']['validation']:.1f} / "
                     f"{100 * r['reference']['test']:.1f} | {100 * r['user_level']['validation']:.1f} / "
                     f"{100 * r['user_level']['test']:.1f} | {100 * r['test_gap']:.1f} |")
    fit = result["fit"]
    if fit and "per_round_for_gap_target" in fit:
        lines += ["", f"Test gap ~ M^{fit['exponent']:.2f} ({fit['points']} points): about "
                  f"{fit['per_round_for_gap_target']:.0f} owners a round for a {100 * GAP_TARGET:.0f}-point gap."]
    return "\n".join(lines) + "\n"


def _pair(text: str) -> tuple[int, int]:
    try:
        population, per_round = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected POPULATION:OWNERS_PER_ROUND, e.g. 500:50 (got {text!r})")
    if not 1 <= per_round <= population:
        raise argparse.ArgumentTypeError(f"owners per round must lie in 1..population (got {text!r})")
    return population, per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="noise on the mean for a user-level budget, fixed against Poisson")
    plan.add_argument("--epsilon", type=float, default=8.0)
    plan.add_argument("--delta", type=float, default=1e-5)
    plan.add_argument("--rounds", type=int, default=20)
    plan.add_argument("--owners", type=_pair, nargs="+", default=[_pair(o) for o in OWNERS],
                      help="POPULATION:OWNERS_PER_ROUND pairs")
    run = commands.add_parser("run", help="measure accuracy against owners per round (flwr run simulations)")
    run.add_argument("out", type=Path)
    run.add_argument("--population", type=int, default=None, help="owners in the federation (default 500; quick 20)")
    run.add_argument("--per-round", type=int, nargs="+", default=None,
                     help="expected owners a round (default 10 50; quick 4 8)")
    run.add_argument("--rounds", type=int, default=None, help="default 3; quick 2")
    run.add_argument("--epsilon", type=float, default=8.0, help="user-level epsilon over the run (delta 1e-5)")
    run.add_argument("--quick", action="store_true", help="the tiny model on synthetic data: checks the pipeline")
    run.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                     help="Hydra overrides for both arms, e.g. model.lora.layers=1 model.lora.r=2")
    args = parser.parse_args(argv)
    if args.command == "run":
        population = (20 if args.quick else 500) if args.population is None else args.population
        per_round = ([4, 8] if args.quick else [10, 50]) if args.per_round is None else args.per_round
        rounds = (2 if args.quick else 3) if args.rounds is None else args.rounds
        if args.epsilon <= 0 or rounds < 1 or not all(1 <= m <= population for m in per_round):
            parser.error("--epsilon must be > 0, --rounds >= 1, every --per-round in 1..--population")
        if any("=" not in o or o.startswith("=") for o in args.set):
            parser.error(f"--set takes Hydra overrides KEY=VALUE (got {args.set})")
        if not args.quick and not (DATA / "sst2" / "train.jsonl").is_file():
            parser.error(f"{DATA / 'sst2' / 'train.jsonl'} not found: set DPLORA_SHARED_DATA (or run --quick)")
        args.out.mkdir(parents=True, exist_ok=True)
        result = measure(args.out.resolve(), population, sorted(set(per_round)), rounds, args.epsilon, args.quick,
                         args.set)
        (args.out / "user_level.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "user_level.md").write_text(table(result))
        print(table(result))
        return 0
    if args.epsilon <= 0 or not 0 < args.delta < 1 or args.rounds < 1:
        parser.error("--epsilon must be > 0, --delta in (0, 1), --rounds >= 1")
    print(f"user-level epsilon {args.epsilon:g} at delta {args.delta:g} over {args.rounds} rounds; noise on the "
          "mean (std per coordinate) in clipping norms")
    print("| owners | per round | fixed: noise multiplier | fixed: noise on mean | poisson: noise multiplier | "
          "poisson: noise on mean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in plan_rows(args.epsilon, args.delta, args.rounds, args.owners):
        print(f"| {r['population']} | {r['owners_per_round']} | {r['fixed_noise_multiplier']:.3f} | "
              f"{r['fixed_noise_on_mean']:.4f} | {r['poisson_noise_multiplier']:.3f} | "
              f"{r['poisson_noise_on_mean']:.4f} |")
    return 0
