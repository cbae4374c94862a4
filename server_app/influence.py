"""How far one owner can move the global adapter, and what the aggregate may be.

`BoundUpdates` gives every owner the same weight (a reply carries no record count, which would leak the owner's
exact size) and bounds each update (reply minus the current global adapter, L2 over all tensors): clipped to, or
rejected beyond, `strategy.max_update_norm`. `auto` is the public plan's bound on how far an honest AdamW round
can move the adapter (server_app/plan.py), which holds for any number of replies, two included, and, with 3 or
more replies, at most AUTO_BOUND_FACTOR x the round's median norm; with SGD (no plan bound) and fewer than 3
replies, AUTO_BOUND_FACTOR x the median of the previous round's kept norms. With user-level DP (`per_owner`) an
owner's bound depends on its own reply only (the plan's bound or the configured number, never the medians): one
owner's data must not change how another's update is bounded, or the user-level sensitivity would not hold.
Within the bound an attacker still
moves the mean by up to bound / number of owners each round. It records each trained owner's privacy record and
update norm.

`GuardAggregate` (innermost, right around Flower's strategy) keeps the adapter as it was when fewer than
`min_clients` owners trained, when the aggregator raises, or when the aggregate does not fit the adapter (names,
shapes, finite values); it casts the aggregate to the adapter's dtypes (FedOpt strategies compute in float64). It
hands the replies over in node order, never arrival order, so that no aggregator (Krum breaks ties by order) can be
steered by who replies first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from omegaconf import DictConfig

from dplora import protocol
from dplora.privacy import steps_per_round
from dplora.results import client_record
from dplora.user_level import user_level_record
from server_app.plan import adam_update_bound
from server_app.wrapper import StrategyWrapper, log

WEIGHT = "weight"  # the key the aggregator weights by: 1 for every owner (set by the server, not sent by owners)
AUTO_BOUND_FACTOR = 3.0  # max_update_norm=auto: this many times the round's median update norm
AUTO_BOUND_MIN_REPLIES = 3  # ... when at least this many replies make the median meaningful


class BoundUpdates(StrategyWrapper):
    """Equal weights; each update's L2 norm clipped to (or rejected beyond) the round's bound."""

    def __init__(self, strategy, recorder, reference: ArrayRecord, train: DictConfig, *,
                 max_update_norm: float | str | None = None, action: str = "clip", per_owner: bool = False):
        """`train`: the run's training settings (optimizer, learning rate, local epochs), the public plan;
        `per_owner`: bounds from each owner's own reply and the plan only (user-level DP)."""
        super().__init__(strategy, recorder)
        self.train, self.max_update_norm, self.action = train, max_update_norm, action
        self.per_owner = per_owner
        self.current = reference.to_torch_state_dict()
        self.previous: list[float] = []  # the norms kept last round

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        # Two passes, one update in memory at a time: the server holds a round's replies, never their updates too.
        norms = [update_norm(self.update(msg.content[protocol.ARRAYS].to_torch_state_dict())) for msg in replies]
        bounds = self.bounds(norms, [msg.content[protocol.METRICS]["sample_rate"] for msg in replies])
        kept, kept_norms = [], []
        for msg, norm, bound in zip(replies, norms, bounds, strict=True):
            node, metrics = msg.metadata.src_node_id, msg.content[protocol.METRICS]
            update = self.update(msg.content[protocol.ARRAYS].to_torch_state_dict())
            record = {**client_record(node, metrics, metrics["epsilon"]), "update_norm": norm}
            if bound is not None and norm > bound:
                if self.action == "reject":
                    log.warning("round %d: node %d's update norm %.4g exceeds the bound %.4g: excluded",
                                server_round, node, norm, bound)
                    self.recorder.failed(node, f"update norm {norm:.4g} above the bound {bound:.4g}")
                    continue
                log.warning("round %d: node %d's update norm %.4g clipped to %.4g", server_round, node, norm, bound)
                update = {k: u * (bound / norm) for k, u in update.items()}
                record["clipped_to"] = bound
            # What the aggregator sees: the (bounded) adapter, an equal weight and the re-derived epsilon.
            arrays = ArrayRecord({k: (self.current[k] + update[k].float()).contiguous() for k in self.current})
            msg.content = RecordDict({protocol.ARRAYS: arrays,
                                      protocol.METRICS: MetricRecord({WEIGHT: 1, "epsilon": metrics["epsilon"]})})
            self.recorder.trained(record)
            kept.append(msg)
            kept_norms.append(record.get("clipped_to", norm))
        self.previous = kept_norms
        return self.strategy.aggregate_train(server_round, kept)

    def update(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The owner's update, reply minus the current global adapter, in float64 (no overflow in its norm)."""
        return {k: state[k].double() - self.current[k].double() for k in self.current}

    def bounds(self, norms: list[float], sample_rates: list[float]) -> list[float | None]:
        """Each reply's bound (None: none): the configured number, or (auto) the smaller of the plan's bound for
        its sample rate and AUTO_BOUND_FACTOR x the round's median norm (with at least AUTO_BOUND_MIN_REPLIES
        replies); where neither applies, AUTO_BOUND_FACTOR x last round's median kept norm. `per_owner`: the
        plan's bound alone (None without one)."""
        if self.max_update_norm != "auto":
            return [self.max_update_norm] * len(norms)
        global_norm = math.sqrt(sum(float(t.double().square().sum()) for t in self.current.values()))
        size = sum(t.numel() for t in self.current.values())
        plan = {q: adam_update_bound(self.train, steps_per_round(q, self.train.local_epochs), size, global_norm)
                for q in set(sample_rates)}  # once a round per sample rate, not per reply
        if self.per_owner:
            return [plan[q] for q in sample_rates]
        observed = AUTO_BOUND_FACTOR * statistics.median(norms) if len(norms) >= AUTO_BOUND_MIN_REPLIES else None
        earlier = AUTO_BOUND_FACTOR * statistics.median(self.previous) if self.previous else None
        bounds = []
        for q in sample_rates:
            candidates = [b for b in (plan[q], observed) if b is not None] or [earlier]
            bounds.append(None if candidates == [None] else min(candidates))
        return bounds


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """The L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(u.square().sum()) for u in update.values()))


class GuardAggregate(StrategyWrapper):
    """Aggregates only with at least `min_clients` trained replies; a failed or unusable aggregate keeps the
    adapter; the aggregate is cast to the adapter's dtypes."""

    def __init__(self, strategy, recorder, reference: ArrayRecord, *, min_clients: int):
        super().__init__(strategy, recorder)
        self.min_clients = min_clients
        self.layout = protocol.layout_of(reference.to_torch_state_dict())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if len(replies) < self.min_clients:
            log.warning("round %d: %d client(s) trained, fewer than min_clients=%d; the global adapter is "
                        "unchanged", server_round, len(replies), self.min_clients)
        else:
            try:
                replies.sort(key=lambda msg: msg.metadata.src_node_id)  # node order, never arrival order
                result = self.strategy.aggregate_train(server_round, replies)
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
        self.recorder.aggregated(result[0] is not None, user_level_record(self.strategy))
        return result

    def as_adapter(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the adapter's own dtypes; ValueError unless it has the adapter's names and shapes
        and finite values."""
        state = arrays.to_torch_state_dict()
        cast = {k: v.to(self.layout[k][0]) if k in self.layout else v for k, v in state.items()}
        protocol.check_arrays(cast, self.layout, "the model's adapter")
        return ArrayRecord({k: v.contiguous() for k, v in cast.items()})
