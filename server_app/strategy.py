"""FedAvg over LoRA adapters that keeps going when clients refuse or fail, and records each client's privacy."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from dplora.client import ARRAYS, METRICS, STATUS
from dplora.models import check_adapter
from dplora.results import PRIVACY_KEYS, RunRecorder, client_record

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`


def privacy_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's train metrics: how many clients trained, on how many examples, and the largest epsilon."""
    metrics = [r[METRICS] for r in records]
    return MetricRecord({"clients": len(metrics), "examples": sum(int(m[weighted_by_key]) for m in metrics),
                         "epsilon-max": max(float(m["epsilon"]) for m in metrics)})


class AdapterFedAvg(FedAvg):
    """Message-API FedAvg that averages the adapter tensors weighted by `num-examples`.

    Before averaging it sets aside replies that carry an error (the ClientApp raised), invalid replies,
    replies that refuse to train (privacy budget spent) and nodes that did not reply within the round's
    timeout; all are logged with the node id and recorded in metrics.json, and the round goes on with the
    rest if at least `min_clients` trained (else the global adapter stays as it was). Server-side evaluation replaces federated evaluation (`fraction_evaluate=0`), so clients
    never report metrics computed on their private data.
    """

    def __init__(self, recorder: RunRecorder, reference: ArrayRecord, *, min_clients: int, round_offset: int = 0,
                 timeout: float = 3600, **kwargs):
        super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=privacy_summary,
                         min_train_nodes=min_clients, min_available_nodes=min_clients, **kwargs)
        self.recorder = recorder
        self.reference = reference.to_torch_state_dict()  # the adapter's keys, shapes and dtypes
        self.min_clients = min_clients  # fewer good replies than this: the round keeps the old adapter
        self.round_offset = round_offset  # a resumed run's rounds continue the numbering of the first
        self.timeout = timeout
        self.sent: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self.sent = {msg.metadata.dst_node_id for msg in messages}
        return messages

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
                failed.append({"node_id": node, "reason": msg.error.reason})
            elif problem := self.invalid(msg.content):
                log.warning("round %d: node %d sent an invalid reply, excluded: %s", server_round, node, problem)
                failed.append({"node_id": node, "reason": f"invalid reply: {problem}"})
            elif STATUS in msg.content.config_records:
                reason = str(msg.content[STATUS]["refused"])
                log.warning("round %d: node %d refused: %s", server_round, node, reason)
                refused.append({**client_record(node, msg.content[METRICS]), "reason": reason})
            else:
                trained.append(msg)
                clients.append(client_record(node, msg.content[METRICS]))
        aggregate = len(trained) >= self.min_clients
        self.recorder.record_clients(clients, refused, failed, aggregated=aggregate)
        if not aggregate:
            log.warning("round %d: %d client(s) trained, fewer than min_clients=%d; the global adapter is "
                        "unchanged", server_round, len(trained), self.min_clients)
            return None, None
        return super().aggregate_train(server_round, trained)

    def invalid(self, content: RecordDict) -> str | None:
        """Why a reply cannot be aggregated or recorded, or None if it is well formed."""
        refusal = STATUS in content.config_records
        expected = {METRICS} | ({STATUS} if refusal else {ARRAYS})
        if set(content.keys()) != expected:
            return f"records {sorted(content.keys())}, expected {sorted(expected)}"
        metrics = content[METRICS]
        for key in ("num-examples", *PRIVACY_KEYS):
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                return f"metric {key}={value!r} is missing, negative or not a number"
            if math.isinf(value) and key != "epsilon":
                return f"metric {key} is infinite"
        if refusal:
            return None
        if metrics["num-examples"] <= 0 or not float(metrics["num-examples"]).is_integer():
            return f"num-examples={metrics['num-examples']!r} must be a positive integer"
        try:
            check_adapter(content[ARRAYS].to_torch_state_dict(), self.reference)
        except Exception as err:  # noqa: BLE001 - whatever a client sends must not crash the server
            return str(err)
        return None
