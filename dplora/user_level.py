"""User-level DP (DP-FedAvg, `strategy.user_dp`): the accounting beside the owners' record-level DP-SGD.

Flower's fixed-clipping wrappers clip each owner's update and add Gaussian noise of std noise_multiplier x
clipping_norm / owners per round to their mean; each round is one release of the Gaussian mechanism with respect
to adding or removing one owner's whole data. Flower's RDP accountant composes the releases with no amplification
by sampling (every release counted in full). The noise multiplier for a user-level target is calibrated with
dp-accounting's `calibrate_dp_mechanism` on the same RDP accountant, so the planned and the recorded epsilon
agree. scripts/verify_privacy.py re-derives the recorded epsilon.
"""

from __future__ import annotations

import dp_accounting
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

ACCOUNTING = "Flower RdpAccountant, Gaussian mechanism, no amplification by sampling"


def user_level_accountant(delta: float, population: int) -> RdpAccountant:
    """Flower's RDP accountant for DP-FedAvg releases (no amplification: every release counted in full)."""
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def user_level_epsilon(noise_multiplier: float, releases: int, delta: float, population: int = 1) -> float:
    """Epsilon at `delta` of `releases` DP-FedAvg releases with this noise multiplier (Flower's accountant)."""
    if not releases:
        return 0.0
    accountant = user_level_accountant(delta, population)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, population, population), releases)
    return accountant.get_epsilon(delta)


def user_level_noise(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose `releases` Gaussian releases stay within the target:
    dp-accounting's calibration on the RDP accountant that Flower's wraps (the same default orders)."""
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            dp_accounting.rdp.RdpAccountant,
            lambda sigma: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), releases),
            target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-3))
    except dp_accounting.NoBracketIntervalFoundError as err:
        raise ValueError(f"no noise multiplier reaches user-level epsilon {target_epsilon} in {releases} "
                         "rounds") from err


def user_level_record(strategy) -> dict | None:
    """The user-level guarantee so far of a Flower DP wrapper, with the inputs that re-derive it; None for a
    strategy without one."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent()
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
            "noise_multiplier": strategy.noise_multiplier, "clipping_norm": strategy.clipping_norm,
            "owners_per_round": strategy.num_sampled_clients, "accounting": ACCOUNTING}
