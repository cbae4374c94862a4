"""What a reply may be: exactly the protocol, in the run's wire format, with a privacy record that re-derives.

`ScreenReplies` (outermost) sets aside nodes that sent no reply within the round's timeout, replies that carry
an error (the ClientApp raised, or the SuperLink answered in the node's place: the node stopped mid-round), replies from a node that was not sampled this round or that already replied,
and every reply that is not exactly what dplora/protocol.py allows: records,
record types, metric keys and numbers, and adapter arrays in the configured wire format (names, dtypes, shapes,
finite values), which it decodes to the fp32 adapter. The server evaluates the global adapter itself, so no
owner is ever asked for metrics computed on its data (no federated evaluation).

`RederiveEpsilons` checks every reply's privacy record against the run's public plan (server_app/plan.py: the
delta, sample rate, noise multiplier and steps so far the server itself configured) before any accountant runs,
re-derives its epsilon (the plan's), sets aside a record the plan does not allow or whose claim differs by more
than EPSILON_TOLERANCE, records refusals with their re-derived epsilon, and passes on the trained replies with the
re-derived value in place of the claim. Neither wrapper lets an exception escape: a reply that makes a check
raise is set aside with the error as its reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID

from dplora import protocol, transport
from dplora.results import client_record
from server_app.plan import PrivacyPlan
from server_app.wrapper import StrategyWrapper, log


class ScreenReplies(StrategyWrapper):
    """Sets aside missing, failed and malformed replies; decodes the wire format to the fp32 adapter."""

    def __init__(self, strategy, recorder, reference: ArrayRecord, *, transport_dtype: str = "fp32",
                 timeout: float = 3600, round_offset: int = 0):
        """`round_offset`: a resumed run's rounds continue the numbering of the first (every inner strategy
        sees the run's own round numbers)."""
        super().__init__(strategy, recorder)
        self.transport_dtype, self.timeout, self.round_offset = transport_dtype, timeout, round_offset
        self.current = reference.to_torch_state_dict()  # the global adapter the owners received
        self.sent: set[int] | None = None  # the nodes sampled this round (None: configure_train not called)
        self.instructions: list[Message] = []  # this round's messages (the Grid gives them their ids as it sends)

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        try:
            messages = list(self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid))
        except ValueError as err:  # e.g. user-level DP: fewer owners connected than owners_per_round
            log.error("round %d: %s could not configure the round (%s); no owner trains in it",
                      server_round + self.round_offset, type(self.strategy).__name__, err)
            messages = []
        self.sent = {msg.metadata.dst_node_id for msg in messages}
        self.instructions = messages
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates the global adapter itself

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.start_round()
        sampled = self.sent if self.sent is not None else {msg.metadata.src_node_id for msg in replies}
        nodes = [self.sender(msg) for msg in replies]
        for node in sorted(sampled - set(nodes)):
            self.set_aside(server_round, node, f"no reply within the round timeout ({self.timeout}s)", "sent")
        good, seen = [], set()
        for msg, node in zip(replies, nodes, strict=True):
            if node not in sampled or node in seen:
                self.set_aside(server_round, node, "a second reply from this node" if node in seen else
                               "a reply from a node not sampled this round", "sent an unexpected reply")
                continue
            seen.add(node)
            if msg.has_error():
                self.set_aside(server_round, node, str(msg.error.reason), "failed")
                continue
            try:
                problem = protocol.check_reply(msg.content)
                if problem is None and not protocol.is_refusal(msg.content):
                    # exactly the configured format, finite, the adapter's names and shapes
                    state = transport.decode(msg.content[protocol.ARRAYS], self.current, self.transport_dtype)
                    msg.content[protocol.ARRAYS] = ArrayRecord(state)
            except Exception as err:  # noqa: BLE001 - whatever a client sends must not crash the server
                problem = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
            if problem is not None:
                self.set_aside(server_round, node, f"invalid reply: {problem}", "sent an invalid reply")
                continue
            good.append(msg)
        self.sent, self.instructions = None, []
        return self.strategy.aggregate_train(server_round, good)

    def sender(self, msg: Message) -> int:
        """The node a reply speaks for: its sender, or, for an error the SuperLink itself returns in a node's place
        (e.g. "Node Unavailable": the node stopped sending heartbeats mid-round), the node that instruction went
        to."""
        if msg.metadata.src_node_id == SUPERLINK_NODE_ID and msg.has_error():
            for sent in self.instructions:
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def set_aside(self, server_round: int, node: int, reason: str, what: str) -> None:
        log.warning("round %d: node %d %s, excluded: %s", server_round, node, what, reason)
        self.recorder.failed(node, reason)


class RederiveEpsilons(StrategyWrapper):
    """Checks each privacy record against the run's public plan and re-derives its epsilon; sets aside the rest."""

    def __init__(self, strategy, recorder, plan: PrivacyPlan):
        super().__init__(strategy, recorder)
        self.plan = plan

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        trained = []
        for msg in replies:
            node, metrics = msg.metadata.src_node_id, msg.content[protocol.METRICS]
            refused = protocol.is_refusal(msg.content)
            try:
                derived, problem = self.plan.check(node, metrics, server_round, trained=not refused)
            except Exception as err:  # noqa: BLE001 - no privacy record may end the run
                derived, problem = None, f"{type(err).__name__}: {err}"
            if problem is not None:
                log.warning("round %d: node %d sent an invalid reply, excluded: %s", server_round, node, problem)
                self.recorder.failed(node, f"invalid reply: {problem}")
            elif refused:
                reason = str(msg.content[protocol.STATUS][protocol.REFUSED])
                log.warning("round %d: node %d refused: %s", server_round, node, reason)
                self.recorder.refused({**client_record(node, metrics, derived), "reason": reason})
            else:
                msg.content[protocol.METRICS] = MetricRecord(
                    {**metrics, "epsilon": math.inf if derived is None else derived})
                trained.append(msg)
        return self.strategy.aggregate_train(server_round, trained)
