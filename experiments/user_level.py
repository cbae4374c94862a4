"""User-level DP at scale: how much noise on the mean a user-level budget costs, with and without sampling owners.

    python scripts/user_level.py plan [--epsilon 8] [--delta 1e-5] [--rounds 20] [--owners 100:10 500:50 ...]

`plan` prints, for each population:owners-per-round pair, the noise multiplier that reaches the user-level
epsilon over the rounds and the Gaussian noise it puts on the averaged update, in clipping norms
(noise_multiplier / owners_per_round): with `sampling: fixed` (Flower's accountant, no amplification; the
population plays no part) and with `sampling: poisson` (each owner with probability owners_per_round / population,
dp-accounting's Poisson-subsampled Gaussian). Both calibrations are dplora/user_level.py's, the ones the server
uses. The clipping norm itself is the user's choice (strategy.user_dp.clipping_norm): the noise is small enough
when it is small against the mean of the clipped updates.
"""

from __future__ import annotations

import argparse

from dplora.user_level import user_level_noise

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
    args = parser.parse_args(argv)
    if args.epsilon <= 0 or not 0 < args.delta < 1 or args.rounds < 1:
        parser.error("--epsilon must be > 0, --delta in (0, 1), --rounds >= 1")
    print(f"user-level epsilon {args.epsilon:g} at delta {args.delta:g} over {args.rounds} rounds; noise on the "
          "mean in clipping norms")
    print("| owners | per round | fixed: noise multiplier | fixed: noise on mean | poisson: noise multiplier | "
          "poisson: noise on mean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in plan_rows(args.epsilon, args.delta, args.rounds, args.owners):
        print(f"| {r['population']} | {r['owners_per_round']} | {r['fixed_noise_multiplier']:.3f} | "
              f"{r['fixed_noise_on_mean']:.4f} | {r['poisson_noise_multiplier']:.3f} | "
              f"{r['poisson_noise_on_mean']:.4f} |")
    return 0
