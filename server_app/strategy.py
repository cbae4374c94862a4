"""The project's duties around any Flower strategy, by composition (as Flower's DP wrappers wrap a strategy).

`OwnerGuard` wraps the aggregator the config names (FedAvg, FedAvgM, FedProx, FedAdam, FedMedian, Krum, ...,
built by `build_strategy` with `hydra.utils.instantiate`), optionally inside Flower's fixed-clipping DP wrapper
for user-level DP. Before the aggregator sees a round's replies, the guard
- sets aside replies that carry an error (the ClientApp raised), nodes that did not reply within the round's
  timeout, refusals (budget spent, owner's limits) and every reply that is not exactly what the protocol
  allows: records, record types, metric keys, numbers, adapter tensor names, shapes, dtype, finite values;
- re-derives every reply's epsilon from the reply's own (noise_multiplier, sample_rate, steps, delta) with the
  run's accountant, records that value, and excludes a reply whose claim differs from it or exceeds the target;
- bounds each owner's influence: equal weights (a reply carries no record count, which would leak the owner's
  exact size), and each update (reply minus the current global adapter) clipped to, or rejected beyond,
  `strategy.max_update_norm`;
- records all of it in metrics.json with node ids, and keeps the adapter as it was when fewer than
  `min_clients` owners trained or when the aggregator fails. No reply can make a round raise.
Server-side evaluation replaces federated evaluation, so clients never report metrics computed on their data.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable
from functools import lru_cache

import hydra.utils
import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from omegaconf import DictConfig

from dplora import transport
from dplora.client import ARRAYS, METRICS, STATUS
from dplora.models import check_adapter
from dplora.privacy import epsilon as derive_epsilon
from dplora.results import PRIVACY_KEYS, RunRecorder, client_record

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

WEIGHT = "weight"  # the key the aggregator weights by: 1 for every owner (set by the server, not sent by owners)
EPSILON_TOLERANCE = 0.01  # largest relative difference between a claimed and the re-derived epsilon
AUTO_BOUND_FACTOR = 3.0  # max_update_norm=auto: this many times the round's median update norm
AUTO_BOUND_MIN_REPLIES = 3  # ... when at least this many replies make the median meaningful

_epsilon = lru_cache(maxsize=4096)(derive_epsilon)  # the same parameters recur across rounds and owners


def privacy_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's train metrics, as Flower logs them: how many clients trained, and the largest (re-derived)
    epsilon to 3 decimals (metrics.json keeps every client's full value)."""
    metrics = [r[METRICS] for r in records]
    return MetricRecord({"clients": len(metrics), "epsilon-max": round(max(float(m["epsilon"]) for m in metrics), 3)})


def user_level_accountant(delta: float, population: int) -> RdpAccountant:
    """Flower's RDP accountant for DP-FedAvg releases (no amplification: every release counted in full)."""
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def user_level_epsilon(noise_multiplier: float, releases: int, delta: float, population: int = 1) -> float:
    """Epsilon at `delta` of `releases` DP-FedAvg releases with this noise multiplier (Flower's accountant)."""
    accountant = user_level_accountant(delta, population)
    if releases:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier, population, population), releases)
    return accountant.get_epsilon(delta) if releases else 0.0


def user_level_noise(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose `releases` Gaussian releases stay within the target."""
    low, high = 0.01, 1.0
    while user_level_epsilon(high, releases, delta) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches user-level epsilon {target_epsilon} in {releases} rounds")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if user_level_epsilon(mid, releases, delta) > target_epsilon else (low, mid)
    return high


def build_strategy(cfg: DictConfig) -> Strategy:
    """The configured Flower aggregator (conf/strategy/), wrapped in Flower's DP-FedAvg wrapper if user-level DP
    is on. Every owner has the same weight, as Flower's wrappers require for their noise calibration."""
    common = {"fraction_train": cfg.strategy.fraction_train, "fraction_evaluate": 0.0,
              "min_train_nodes": cfg.strategy.min_clients, "min_available_nodes": cfg.strategy.min_clients,
              "weighted_by_key": WEIGHT, "train_metrics_aggr_fn": privacy_summary}
    aggregator = hydra.utils.instantiate(cfg.strategy.aggregator, **common)
    user = cfg.strategy.user_dp
    if not user.enabled:
        return aggregator
    owners = int(user.owners_per_round)
    sigma = user.noise_multiplier
    if sigma is None:
        sigma = user_level_noise(user.target_epsilon, cfg.num_rounds, user.delta)
    wrapper = (DifferentialPrivacyServerSideFixedClipping if user.side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(aggregator, noise_multiplier=float(sigma), clipping_norm=float(user.clipping_norm),
                   num_sampled_clients=owners, accountant=user_level_accountant(user.delta, owners))


# What Flower's server optimizers carry from round to round besides the global adapter: FedAvgM's momentum
# (a list in the adapter's order), FedAdam's, FedYogi's and FedAdagrad's moments (dicts by name). A checkpoint
# holds it (`OwnerGuard.optimizer_state`), so that a resumed run continues the same optimizer.
OPTIMIZER_STATE = ("momentum_vector", "m_t", "v_t")


def aggregator(strategy: Strategy) -> Strategy:
    """The aggregator inside Flower's DP wrappers (and inside OwnerGuard)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


class OwnerGuard(Strategy):
    """Screens, bounds and records the replies of every round, then lets `strategy` aggregate the good ones."""

    def __init__(self, strategy: Strategy, recorder: RunRecorder, reference: ArrayRecord, *, privacy: DictConfig,
                 min_clients: int, round_offset: int = 0, timeout: float = 3600,
                 max_update_norm: float | str | None = None, update_norm_action: str = "clip",
                 transport_dtype: str = "fp32"):
        """`privacy`: the run's privacy config (target_epsilon, delta, accountant), which every reply's privacy
        record is checked against. `round_offset`: a resumed run's rounds continue the numbering of the first.
        `transport_dtype`: the one format (dplora/transport.py) the owners' adapters may arrive in."""
        self.strategy, self.recorder, self.privacy = strategy, recorder, privacy
        self.transport_dtype = transport_dtype
        self.reference = reference.to_torch_state_dict()  # the adapter's keys, shapes and dtypes
        self.min_clients, self.round_offset, self.timeout = min_clients, round_offset, timeout
        self.max_update_norm, self.update_norm_action = max_update_norm, update_norm_action
        self.sent: set[int] = set()
        self.current: dict[str, torch.Tensor] = self.reference

    def summary(self) -> None:
        log.info("OwnerGuard around %s: equal weights, re-derived epsilons, update norm bound %s (%s)",
                 type(self.strategy).__name__, self.max_update_norm, self.update_norm_action)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        try:
            messages = list(self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid))
        except ValueError as err:  # e.g. user-level DP: fewer owners connected than owners_per_round
            log.error("round %d: %s could not configure the round (%s); no owner trains in it",
                      server_round + self.round_offset, type(self.strategy).__name__, err)
            messages = []
        self.sent = {msg.metadata.dst_node_id for msg in messages}
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates the global adapter itself

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        trained, clients, refused, failed = [], [], [], []
        for node in sorted(self.sent - {msg.metadata.src_node_id for msg in replies}):
            log.warning("round %d: node %d sent no reply within %ss", server_round, node, self.timeout)
            failed.append({"node_id": node, "reason": f"no reply within the round timeout ({self.timeout}s)"})
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                failed.append({"node_id": node, "reason": str(msg.error.reason)})
                continue
            problem = self.invalid(msg.content)
            derived, state = None, None
            if problem is None and ARRAYS in msg.content.array_records:
                try:  # exactly the configured format, finite, the adapter's names and shapes
                    state = transport.decode(msg.content[ARRAYS], self.current, self.transport_dtype)
                    check_adapter(state, self.reference)
                except Exception as err:  # noqa: BLE001 - whatever a client sends must not crash the server
                    problem = str(err)
            if problem is None:
                derived, problem = self.rederived_epsilon(msg.content[METRICS])
            if problem is not None:
                log.warning("round %d: node %d sent an invalid reply, excluded: %s", server_round, node, problem)
                failed.append({"node_id": node, "reason": f"invalid reply: {problem}"})
                continue
            record = client_record(node, msg.content[METRICS], derived)
            if STATUS in msg.content.config_records:
                reason = str(msg.content[STATUS]["refused"])
                log.warning("round %d: node %d refused: %s", server_round, node, reason)
                refused.append({**record, "reason": reason})
                continue
            trained.append((msg, record, self.update(state), derived))
        trained = self.bound_updates(server_round, trained, failed)
        for msg, record, update, derived in trained:
            # What the aggregator sees: the (bounded) adapter, an equal weight and the re-derived epsilon.
            arrays = ArrayRecord({k: (self.current[k] + update[k].float()).contiguous() for k in self.current})
            msg.content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord(
                {WEIGHT: 1, "epsilon": math.inf if derived is None else derived})})
            clients.append(record)
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if len(trained) < self.min_clients:
            log.warning("round %d: %d client(s) trained, fewer than min_clients=%d; the global adapter is "
                        "unchanged", server_round, len(trained), self.min_clients)
        else:
            try:
                result = self.strategy.aggregate_train(server_round, [t[0] for t in trained])
            except Exception as err:  # noqa: BLE001 - the round is lost, not the run
                log.error("round %d: %s failed to aggregate (%s: %s); the global adapter is unchanged",
                          server_round, type(self.strategy).__name__, type(err).__name__, err)
            if result[0] is not None:
                try:
                    result = (self.as_adapter(result[0]), result[1])
                except ValueError as err:
                    log.error("round %d: the aggregate is unusable (%s); the global adapter is unchanged",
                              server_round, err)
                    result = (None, None)
        self.recorder.record_clients(clients, refused, failed, aggregated=result[0] is not None,
                                     user_level=self.user_level())
        return result

    # -- the server optimizer's state, for checkpoints ----------------------------------------------------

    def has_optimizer_state(self) -> bool:
        """Whether the aggregator keeps a server optimizer's state between rounds (FedAvgM, FedAdam, ...)."""
        return any(hasattr(aggregator(self.strategy), name) for name in OPTIMIZER_STATE)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The aggregator's server-optimizer state as flat tensors, `<attribute>/<name or index>`; empty for a
        stateless aggregator (FedAvg, FedProx, ...) and before the first aggregation."""
        inner, state = aggregator(self.strategy), {}
        for name in OPTIMIZER_STATE:
            value = getattr(inner, name, None) or {}
            items = value.items() if isinstance(value, dict) else enumerate(value)
            state |= {f"{name}/{key}": torch.from_numpy(np.ascontiguousarray(array)) for key, array in items}
        return state

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `optimizer_state()`'s tensors into the aggregator (a resumed run). A state the aggregator
        does not keep, or that does not fit the adapter, raises ValueError naming it."""
        inner, names = aggregator(self.strategy), {key.split("/", 1)[0] for key in state}
        for name in sorted(names):
            if name not in OPTIMIZER_STATE or not hasattr(inner, name):
                raise ValueError(f"the checkpoint holds server-optimizer state {name!r}, which "
                                 f"{type(inner).__name__} does not keep: resume with the checkpointed run's strategy")
            entries = {key.split("/", 1)[1]: tensor.numpy() for key, tensor in state.items()
                       if key.split("/", 1)[0] == name}
            if name == "momentum_vector":
                value = [entries[str(i)] for i in range(len(entries))] if set(entries) == \
                    {str(i) for i in range(len(entries))} else None
                shapes = [tuple(t.shape) for t in self.reference.values()]
                fits = value is not None and [a.shape for a in value] == shapes
            else:
                value = entries
                fits = {k: a.shape for k, a in value.items()} == {k: tuple(t.shape) for k, t in self.reference.items()}
            if not fits:
                raise ValueError(f"the checkpoint's server-optimizer state {name!r} does not fit the adapter "
                                 "(other names or shapes)")
            setattr(inner, name, value)

    # -- influence ---------------------------------------------------------------------------------------

    def update(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The owner's update, reply minus the current global adapter, in float64 (no overflow in its norm)."""
        return {k: state[k].double() - self.current[k].double() for k in self.current}

    def bound_updates(self, server_round: int, trained: list, failed: list) -> list:
        """Clip (or reject) every update whose L2 norm exceeds the round's bound; record the norms."""
        norms = [math.sqrt(sum(float((u * u).sum()) for u in update.values())) for _, _, update, _ in trained]
        bound = self.max_update_norm
        if bound == "auto":
            bound = (AUTO_BOUND_FACTOR * statistics.median(norms) if len(norms) >= AUTO_BOUND_MIN_REPLIES
                     else None)
        kept = []
        for (msg, record, update, derived), norm in zip(trained, norms, strict=True):
            record["update_norm"] = norm
            if bound is not None and norm > bound:
                node = msg.metadata.src_node_id
                if self.update_norm_action == "reject":
                    log.warning("round %d: node %d's update norm %.4g exceeds the bound %.4g: excluded",
                                server_round, node, norm, bound)
                    failed.append({"node_id": node, "reason": f"update norm {norm:.4g} above the bound {bound:.4g}"})
                    continue
                log.warning("round %d: node %d's update norm %.4g clipped to %.4g", server_round, node, norm, bound)
                update = {k: u * (bound / norm) for k, u in update.items()}
                record["clipped_to"] = bound
            kept.append((msg, record, update, derived))
        return kept

    def user_level(self) -> dict | None:
        """The user-level (DP-FedAvg) guarantee so far, with the inputs that re-derive it, or None."""
        accountant = getattr(self.strategy, "accountant", None)
        if accountant is None:
            return None
        spent = accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                "noise_multiplier": self.strategy.noise_multiplier, "clipping_norm": self.strategy.clipping_norm,
                "owners_per_round": self.strategy.num_sampled_clients,
                "accounting": "Flower RdpAccountant, Gaussian mechanism, no amplification by sampling"}

    def as_adapter(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the adapter's own dtypes (FedOpt strategies compute in float64); ValueError unless
        it has the adapter's names and shapes and finite values."""
        state = arrays.to_torch_state_dict()
        cast = {k: v.to(self.reference[k].dtype) if k in self.reference else v for k, v in state.items()}
        check_adapter(cast, self.reference)
        return ArrayRecord({k: v.contiguous() for k, v in cast.items()})

    # -- screening ---------------------------------------------------------------------------------------

    def invalid(self, content: RecordDict) -> str | None:
        """Why a reply cannot be aggregated or recorded, or None if it is well formed."""
        refusal = STATUS in content.config_records
        expected = {METRICS} | ({STATUS} if refusal else {ARRAYS})
        if set(content.keys()) != expected:
            return f"records {sorted(content.keys())}, expected {sorted(expected)}"
        if METRICS not in content.metric_records or (ARRAYS in expected and ARRAYS not in content.array_records):
            return "records of the wrong type"
        if refusal and not isinstance(content.config_records[STATUS].get("refused"), str):
            return "a refusal without a reason"
        metrics = content[METRICS]
        if set(metrics.keys()) != set(PRIVACY_KEYS):
            return f"metrics {sorted(metrics.keys())}, expected exactly {sorted(PRIVACY_KEYS)}"
        for key in PRIVACY_KEYS:
            value = metrics[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                return f"metric {key}={value!r} is negative or not a number"
            if math.isinf(value) and key != "epsilon":
                return f"metric {key} is infinite"
        return None

    def rederived_epsilon(self, metrics: MetricRecord) -> tuple[float | None, str | None]:
        """(the epsilon the reply's own privacy parameters give with the run's accountant, None) or
        (None, why the reply's privacy record is not acceptable). None as epsilon: the run has no DP."""
        sigma, q, steps, delta, claimed = (metrics[k] for k in ("noise_multiplier", "sample_rate", "steps",
                                                                 "delta", "epsilon"))
        target = self.privacy.target_epsilon
        if delta != self.privacy.delta:
            return None, f"delta {delta} is not the run's {self.privacy.delta}"
        if not float(steps).is_integer():
            return None, f"steps={steps!r} is not an integer"
        if target is None:  # a non-private run: nothing to account
            if sigma != 0 or not math.isinf(claimed):
                return None, "a privacy record in a non-private run"
            return None, None
        if not 0 < q <= 1 or sigma <= 0:
            return None, f"sample_rate={q!r} / noise_multiplier={sigma!r} outside (0, 1] / (0, inf)"
        derived = _epsilon(sigma, q, int(steps), delta, self.privacy.accountant)
        if abs(claimed - derived) > EPSILON_TOLERANCE * derived + 1e-9:
            return None, (f"claimed epsilon {claimed:.4g} but its own noise_multiplier={sigma:.4g}, sample_rate="
                          f"{q:.4g}, steps={int(steps)}, delta={delta:g} give {derived:.4g} "
                          f"({self.privacy.accountant} accountant)")
        if derived > target * (1 + EPSILON_TOLERANCE):
            return None, f"epsilon {derived:.4g} exceeds the run's target {target}"
        return derived, None
