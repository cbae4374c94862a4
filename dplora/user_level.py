"""User-level DP (DP-FedAvg, `strategy.user_dp`): the accounting beside the owners' record-level DP-SGD.

Each round is one release of the Gaussian mechanism with respect to adding or removing one owner's whole data:
every owner's update clipped to `clipping_norm`, their sum divided by `owners_per_round`, Gaussian noise of std
noise_multiplier x clipping_norm / owners_per_round added.

- `sampling: fixed` (Flower's fixed-clipping wrappers): exactly owners_per_round owners a round, counted in full
  (no amplification by sampling), composed by Flower's RDP accountant.
- `sampling: poisson` (server_app/owner_sampling.py): every owner joins a round independently with probability
  sample_rate = owners_per_round / population, the sum's denominator stays owners_per_round (McMahan et al. 2018's
  fixed-denominator estimator), so a round is a Poisson-subsampled Gaussian mechanism: amplified, composed with
  dp-accounting's RDP accountant.

The noise multiplier for a user-level target is calibrated with dp-accounting's `calibrate_dp_mechanism` on the
same RDP accounting, so the planned and the recorded epsilon agree. scripts/verify_privacy.py re-derives every
recorded epsilon.
"""

from __future__ import annotations

import dp_accounting
from absl import logging as absl_logging
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

ACCOUNTING = "Flower RdpAccountant, Gaussian mechanism, no amplification by sampling"
POISSON_ACCOUNTING = "dp-accounting RdpAccountant, Poisson-subsampled Gaussian mechanism (add or remove one owner)"

# dp-accounting's RDP of a subsampled Gaussian logs a warning for every fractional order it drops (harmless: the
# epsilon is the minimum over the remaining orders); hundreds of lines per calibration otherwise.
absl_logging.set_verbosity(absl_logging.ERROR)


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


def poisson_rounds(noise_multiplier: float, sample_rate: float, releases: int) -> dp_accounting.DpEvent:
    """`releases` rounds that each include every owner with probability `sample_rate`."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), releases)


def poisson_user_level_epsilon(noise_multiplier: float, sample_rate: float, releases: int, delta: float) -> float:
    """Epsilon at `delta` of `releases` Poisson-sampled DP-FedAvg rounds (dp-accounting, RDP)."""
    if not releases:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(poisson_rounds(noise_multiplier, sample_rate, releases))
    return float(accountant.get_epsilon(delta))


def user_level_noise(target_epsilon: float, releases: int, delta: float, sample_rate: float | None = None) -> float:
    """The smallest noise multiplier (to 0.1%) whose `releases` rounds stay within the target: dp-accounting's
    calibration on RDP (for fixed sampling, the accountant that Flower's wraps, with the same default orders);
    `sample_rate`: Poisson sampling of owners at this rate (None: fixed, no amplification)."""
    def rounds(sigma: float) -> dp_accounting.DpEvent:
        if sample_rate is None:
            return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), releases)
        return poisson_rounds(sigma, sample_rate, releases)
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            dp_accounting.rdp.RdpAccountant, rounds, target_epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-3))
    except dp_accounting.NoBracketIntervalFoundError as err:
        raise ValueError(f"no noise multiplier reaches user-level epsilon {target_epsilon} in {releases} "
                         "rounds") from err


def user_level_record(strategy) -> dict | None:
    """The user-level guarantee so far of a user-level DP strategy (Flower's wrapper or the Poisson sampler),
    with the inputs that re-derive it; None for a strategy without one."""
    own = getattr(strategy, "user_level_record", None)
    if own is not None:
        return own()
    accountant = getattr(strategy, "accountant", None)
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent()
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
            "noise_multiplier": strategy.noise_multiplier, "clipping_norm": strategy.clipping_norm,
            "owners_per_round": strategy.num_sampled_clients, "accounting": ACCOUNTING}


def user_level_strategy(strategy):
    """The user-level DP wrapper inside the server's wrappers (Flower's or PoissonUserDP); None without one."""
    while strategy is not None:
        if hasattr(strategy, "user_level_record") or getattr(strategy, "accountant", None) is not None:
            return strategy
        strategy = getattr(strategy, "strategy", None)
    return None


def restore_releases(strategy, releases: int) -> None:
    """Continue a resumed run's user-level account: `releases` rounds were released before the checkpoint (its
    metrics.json says how many), so the guarantee counts them as well as the rounds still to come."""
    wrapper = user_level_strategy(strategy)
    if wrapper is None or not releases:
        return
    if hasattr(wrapper, "user_level_record"):
        wrapper.releases += releases
    else:
        population = wrapper.accountant.config.population_size
        wrapper.accountant.compose(GaussianPrivacyEvent(wrapper.noise_multiplier, population, population), releases)
