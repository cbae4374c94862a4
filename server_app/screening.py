"""What a reply may be: exactly the protocol, in the run's wire format, with a privacy record that re-derives.

`ScreenReplies` (outermost) sets aside nodes that sent no reply within the round's timeout, replies that carry
an error (the ClientApp raised) and every reply that is not exactly what dplora/protocol.py allows: records,
record types, metric keys and numbers, and adapter arrays in the configured wire format (names, dtypes, shapes,
finite values), which it decodes to the fp32 adapter. The server evaluates the global adapter itself, so no
owner is ever asked for metrics computed on its data (no federated evaluation).

`RederiveEpsilons` re-derives every reply's epsilon from the reply's own (noise_multiplier, sample_rate, steps,
delta) with the run's accountant, sets aside a reply whose claim differs by more than EPSILON_TOLERANCE or
exceeds the target, records refusals with their re-derived epsilon, and passes on the trained replies with the
re-derived value in place of the claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

from flwr.app import ArrayRecord, Message, MetricRecord
from omegaconf import DictConfig

from dplora import protocol, transport
from dplora.privacy import epsilon as derive_epsilon
from dplora.results import client_record
from server_app.wrapper import StrategyWrapper, log

EPSILON_TOLERANCE = 0.01  # largest relative difference between a claimed and the re-derived epsilon

_epsilon = lru_cache(maxsize=4096)(derive_epsilon)  # the same parameters recur across rounds and owners


class ScreenReplies(StrategyWrapper):
    """Sets aside missing, failed and malformed replies; decodes the wire format to the fp32 adapter."""

    def __init__(self, strategy, recorder, reference: ArrayRecord, *, transport_dtype: str = "fp32",
                 timeout: float = 3600, round_offset: int = 0):
        """`round_offset`: a resumed run's rounds continue the numbering of the first (every inner strategy
        sees the run's own round numbers)."""
        super().__init__(strategy, recorder)
        self.transport_dtype, self.timeout, self.round_offset = transport_dtype, timeout, round_offset
        self.current = reference.to_torch_state_dict()  # the global adapter the owners received
        self.sent: set[int] = set()

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.start_round()
        for node in sorted(self.sent - {msg.metadata.src_node_id for msg in replies}):
            self.set_aside(server_round, node, f"no reply within the round timeout ({self.timeout}s)", "sent")
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.set_aside(server_round, node, str(msg.error.reason), "failed")
                continue
            problem = protocol.check_reply(msg.content)
            if problem is None and not protocol.is_refusal(msg.content):
                try:  # exactly the configured format, finite, the adapter's names and shapes
                    state = transport.decode(msg.content[protocol.ARRAYS], self.current, self.transport_dtype)
                    msg.content[protocol.ARRAYS] = ArrayRecord(state)
                except Exception as err:  # noqa: BLE001 - whatever a client sends must not crash the server
                    problem = str(err)
            if problem is not None:
                self.set_aside(server_round, node, f"invalid reply: {problem}", "sent an invalid reply")
                continue
            good.append(msg)
        return self.strategy.aggregate_train(server_round, good)

    def set_aside(self, server_round: int, node: int, reason: str, what: str) -> None:
        log.warning("round %d: node %d %s, excluded: %s", server_round, node, what, reason)
        self.recorder.failed(node, reason)


class RederiveEpsilons(StrategyWrapper):
    """Re-derives each reply's epsilon with the run's accountant; sets aside false or over-budget claims."""

    def __init__(self, strategy, recorder, privacy: DictConfig):
        """`privacy`: the run's privacy config (target_epsilon, delta, accountant)."""
        super().__init__(strategy, recorder)
        self.privacy = privacy

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        trained = []
        for msg in replies:
            node, metrics = msg.metadata.src_node_id, msg.content[protocol.METRICS]
            derived, problem = self.rederive(metrics)
            if problem is not None:
                log.warning("round %d: node %d sent an invalid reply, excluded: %s", server_round, node, problem)
                self.recorder.failed(node, f"invalid reply: {problem}")
            elif protocol.is_refusal(msg.content):
                reason = str(msg.content[protocol.STATUS][protocol.REFUSED])
                log.warning("round %d: node %d refused: %s", server_round, node, reason)
                self.recorder.refused({**client_record(node, metrics, derived), "reason": reason})
            else:
                msg.content[protocol.METRICS] = MetricRecord(
                    {**metrics, "epsilon": math.inf if derived is None else derived})
                trained.append(msg)
        return self.strategy.aggregate_train(server_round, trained)

    def rederive(self, metrics: MetricRecord) -> tuple[float | None, str | None]:
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
