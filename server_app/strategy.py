"""FedAvg over LoRA adapters that keeps going when clients refuse or fail, and records each client's privacy."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from dplora.client import METRICS, STATUS
from dplora.results import RunRecorder, client_record

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`


def privacy_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's train metrics: how many clients trained, on how many examples, and the largest epsilon."""
    metrics = [r[METRICS] for r in records]
    return MetricRecord({"clients": len(metrics), "examples": sum(int(m[weighted_by_key]) for m in metrics),
                         "epsilon-max": max(float(m["epsilon"]) for m in metrics)})


class AdapterFedAvg(FedAvg):
    """Message-API FedAvg that averages the adapter tensors weighted by `num-examples`.

    Before averaging it sets aside replies that carry an error (the ClientApp raised or timed out) and
    replies that refuse to train (privacy budget spent); both are logged and recorded, and the round goes on
    with the rest. Server-side evaluation replaces federated evaluation (`fraction_evaluate=0`), so clients
    never report metrics computed on their private data.
    """

    def __init__(self, recorder: RunRecorder, **kwargs):
        super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=privacy_summary, **kwargs)
        self.recorder = recorder

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained, clients, refused, failed = [], [], [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                failed.append({"node_id": node, "reason": msg.error.reason})
            elif STATUS in msg.content.config_records:
                reason = str(msg.content[STATUS]["refused"])
                log.warning("round %d: node %d refused: %s", server_round, node, reason)
                refused.append({**client_record(node, msg.content[METRICS]), "reason": reason})
            else:
                trained.append(msg)
                clients.append(client_record(node, msg.content[METRICS]))
        self.recorder.record_clients(clients, refused, failed)
        if not trained:
            log.warning("round %d: no client trained; the global adapter is unchanged", server_round)
            return None, None
        return super().aggregate_train(server_round, trained)
