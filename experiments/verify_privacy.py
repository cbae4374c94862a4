"""Re-derive every client's epsilon in a run's metrics.json with an independent accountant.

For each client record (noise_multiplier, sample_rate, steps, delta) this composes `steps` Poisson-subsampled
Gaussian mechanisms (the reported epsilon is the one the server re-derived with the run's Opacus accountant)
with Google's dp_accounting, which shares no code with Opacus, and compares the result with the epsilon the run
reported: its privacy-loss-distribution (PLD) accountant for the PRV accountant's epsilons (both near-exact),
its RDP accountant for the RDP accountant's (the same, looser, bound: PLD would lie 10-15% below it).

    python scripts/verify_privacy.py outputs/latest/metrics.json [--tolerance 0.02]

With user-level DP (strategy.user_dp), each round's user-level epsilon is re-derived too, with dp_accounting's RDP
accountant: `releases` Gaussian mechanisms of noise multiplier `noise_multiplier` (DP-FedAvg, sampling=fixed: no
amplification, the method Flower's wrapper reports), or, where the record has a `sample_rate` (sampling=poisson),
`releases` Poisson-subsampled Gaussian mechanisms at that rate.

Exits with status 1 if any reported epsilon differs from the re-derived one by more than the tolerance
(relative), or if a reported epsilon exceeds the run's target. Opacus' PRV accountant reports the upper end of
its estimate, up to its `eps_error` (0.01, absolute) above it: a PRV epsilon may lie that much further above
the re-derived one (it overstates what was spent, never understates it), which matters at small epsilons
(0.32 against 0.31 after one round at epsilon 1).
"""

from __future__ import annotations

import argparse
import json
from functools import cache

import dp_accounting
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting's RDP notes on orders it drops at small sigma

PRV_EPS_ERROR = 0.01  # opacus.accountants.PRVAccountant.get_epsilon's default eps_error, which the runs use


def sampled_gaussian_steps(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


@cache
def pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(sampled_gaussian_steps(noise_multiplier, sample_rate, steps))
    return float(accountant.get_epsilon(delta))


@cache
def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(sampled_gaussian_steps(noise_multiplier, sample_rate, steps))
    return float(accountant.get_epsilon(delta))


@cache
def user_level_epsilon(noise_multiplier: float, releases: int, delta: float, sample_rate: float | None = None
                       ) -> float:
    mechanism = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate is not None:
        mechanism = dp_accounting.PoissonSampledDpEvent(sample_rate, mechanism)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(mechanism, releases))
    return float(accountant.get_epsilon(delta))


def verify_user_level(metrics: dict, tolerance: float) -> list[dict]:
    """One row per round with a user-level record."""
    rows = []
    for entry in metrics["rounds"]:
        user = entry.get("user_level")
        if not user or not user["releases"]:
            continue
        derived = user_level_epsilon(user["noise_multiplier"], user["releases"], user["delta"],
                                     user.get("sample_rate"))
        rel = abs(user["epsilon"] - derived) / derived
        rows.append({"round": entry["round"], "reported": user["epsilon"], "rederived": derived,
                     "relative_difference": rel, "ok": rel <= tolerance})
    return rows


def verify(metrics: dict, tolerance: float) -> list[dict]:
    """One row per (round, client) with the reported and re-derived epsilon."""
    target = metrics["config"]["privacy"]["target_epsilon"]
    prv = metrics["config"]["privacy"]["accountant"] == "prv"
    rederive, above = (pld_epsilon, PRV_EPS_ERROR) if prv else (rdp_epsilon, 0.0)
    rows = []
    for entry in metrics["rounds"]:
        for client in entry["clients"] + entry.get("refused", []):
            if client["epsilon"] is None:  # trained without DP: nothing to verify
                continue
            derived = rederive(client["noise_multiplier"], client["sample_rate"], client["steps"], client["delta"])
            rel = abs(client["epsilon"] - derived) / derived
            ok = derived * (1 - tolerance) <= client["epsilon"] <= derived * (1 + tolerance) + above and \
                (target is None or client["epsilon"] <= target)
            rows.append({"round": entry["round"], "node_id": client["node_id"], "reported": client["epsilon"],
                         "rederived": derived, "relative_difference": rel, "ok": ok})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="a run's metrics.json")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative difference (default 0.02)")
    args = parser.parse_args(argv)
    with open(args.metrics, encoding="utf-8") as f:
        metrics = json.load(f)
    rows = verify(metrics, args.tolerance)
    accountant = metrics["config"]["privacy"]["accountant"]
    independent = "re-derived (PLD)" if accountant == "prv" else "re-derived (RDP)"
    print(f"{'round':>5} {'node_id':>20} {'reported (' + accountant + ')':>16} {independent:>17} {'diff':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['node_id']:>20} {r['reported']:>16.4f} {r['rederived']:>17.4f} "
              f"{100 * r['relative_difference']:>6.2f}%{'' if r['ok'] else '  MISMATCH'}")
    if not rows:
        print("no DP client records to verify")
    bad = [r for r in rows if not r["ok"]]
    slack = f" (PRV: up to {PRV_EPS_ERROR:g} more above, its eps_error)" if accountant == "prv" else ""
    print(f"{len(rows) - len(bad)} of {len(rows)} client epsilons re-derived within {100 * args.tolerance:g}%{slack}")
    user_rows = verify_user_level(metrics, args.tolerance)
    for r in user_rows:
        print(f"user-level, round {r['round']}: reported {r['reported']:.4f}, re-derived (RDP) {r['rederived']:.4f} "
              f"({100 * r['relative_difference']:.2f}%){'' if r['ok'] else '  MISMATCH'}")
    bad += [r for r in user_rows if not r["ok"]]
    return 1 if bad else 0

