"""The server's strategy: the aggregator conf/strategy/ names, with the project's duties composed around it.

From the outside in (each a small wrapper, server_app/wrapper.py, that records what it sets aside):

  ScreenReplies      missing, failed, unsolicited, duplicate and malformed replies out; the wire format decoded
  RederiveEpsilons   each privacy record checked against the run's public plan (plan.py); its epsilon re-derived
  BoundUpdates       equal weights; each update's norm clipped to (or rejected beyond) a bound (influence.py)
  GuardAggregate     min_clients, a failing aggregator or an unusable aggregate keep the adapter (influence.py)
  [user-level DP]    with strategy.user_dp: user-level clipping and noise, Flower's DP-FedAvg wrapper
                     (sampling=fixed) or PoissonUserDP (sampling=poisson, owner_sampling.py: amplified)
  the aggregator     Flower's FedAvg, FedProx, FedAvgM, FedAdam, FedMedian, Krum, ... (hydra.utils.instantiate)

So the aggregator sees only well-formed, honestly accounted, bounded adapters with equal weights, and no reply
can make a round raise. Server-side evaluation replaces federated evaluation: owners never report metrics
computed on their data.
"""

from __future__ import annotations

import hydra.utils
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from omegaconf import DictConfig

from dplora.protocol import METRICS
from dplora.results import RunRecorder
from dplora.user_level import user_level_accountant, user_level_noise
from server_app.influence import WEIGHT, BoundUpdates, GuardAggregate
from server_app.owner_sampling import PoissonUserDP
from server_app.plan import PrivacyPlan
from server_app.screening import RederiveEpsilons, ScreenReplies


def privacy_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's train metrics, as Flower logs them: how many clients trained, and the largest (re-derived)
    epsilon to 3 decimals (metrics.json keeps every client's full value)."""
    metrics = [r[METRICS] for r in records]
    return MetricRecord({"clients": len(metrics), "epsilon-max": round(max(float(m["epsilon"]) for m in metrics), 3)})


def build_aggregator(cfg: DictConfig) -> Strategy:
    """The configured Flower aggregator (conf/strategy/), wrapped for user-level DP if it is on: in Flower's
    DP-FedAvg wrapper (sampling=fixed) or in PoissonUserDP (sampling=poisson). Every owner has the same weight, as
    Flower's wrappers require for their noise calibration."""
    common = {"fraction_train": cfg.strategy.fraction_train, "fraction_evaluate": 0.0,
              "min_train_nodes": cfg.strategy.min_clients, "min_available_nodes": cfg.strategy.min_clients,
              "weighted_by_key": WEIGHT, "train_metrics_aggr_fn": privacy_summary}
    aggregator = hydra.utils.instantiate(cfg.strategy.aggregator, **common)
    user = cfg.strategy.user_dp
    if not user.enabled:
        return aggregator
    owners = int(user.owners_per_round)
    rate = owners / user.population if user.sampling == "poisson" else None
    sigma = user.noise_multiplier
    if sigma is None:
        sigma = user_level_noise(user.target_epsilon, cfg.num_rounds, user.delta, rate)
    if rate is not None:
        return PoissonUserDP(aggregator, noise_multiplier=float(sigma), clipping_norm=float(user.clipping_norm),
                             owners_per_round=owners, sample_rate=rate, delta=float(user.delta))
    wrapper = (DifferentialPrivacyServerSideFixedClipping if user.side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(aggregator, noise_multiplier=float(sigma), clipping_norm=float(user.clipping_norm),
                   num_sampled_clients=owners, accountant=user_level_accountant(user.delta, owners))


def build_strategy(cfg: DictConfig, recorder: RunRecorder, reference: ArrayRecord, round_offset: int = 0
                   ) -> Strategy:
    """The aggregator inside the server's duties, in the order above. `reference`: the initial global adapter
    (names, shapes, dtypes); `round_offset`: the rounds a resumed run already did."""
    user = cfg.strategy.user_dp
    # Poisson-sampled user-level DP releases every round, however few owners were sampled (a round skipped for
    # too few would depend on who was sampled).
    poisson = user.enabled and user.sampling == "poisson"
    strategy = GuardAggregate(build_aggregator(cfg), recorder, reference,
                              min_clients=0 if poisson else cfg.strategy.min_clients)
    strategy = BoundUpdates(strategy, recorder, reference, cfg.train, max_update_norm=cfg.strategy.max_update_norm,
                            action=cfg.strategy.update_norm_action, per_owner=user.enabled)
    strategy = RederiveEpsilons(strategy, recorder, PrivacyPlan(cfg))
    return ScreenReplies(strategy, recorder, reference, transport_dtype=cfg.transport.dtype,
                         timeout=cfg.strategy.round_timeout, round_offset=round_offset)
