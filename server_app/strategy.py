"""FedAvg over LoRA adapters that keeps going when clients refuse or fail, and records each client's privacy.

Owners are weighted uniformly: a reply carries no record count (it would leak the owner's exact size, which
the DP guarantee does not cover). Every reply's epsilon is re-derived on the server from the reply's own
(noise_multiplier, sample_rate, steps, delta) with the run's accountant; the re-derived value is recorded,
and a reply whose claim differs from it, or that exceeds the run's target, is excluded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from functools import lru_cache

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from dplora.client import ARRAYS, METRICS, STATUS
from dplora.models import check_adapter
from dplora.privacy import epsilon as derive_epsilon
from dplora.results import PRIVACY_KEYS, RunRecorder, client_record

WEIGHT = "weight"  # the key FedAvg weights by: 1 for every owner (set by the server, not sent by owners)
EPSILON_TOLERANCE = 0.01  # largest relative difference between a claimed and the re-derived epsilon

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`


def privacy_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's train metrics: how many clients trained, and the largest (re-derived) epsilon."""
    metrics = [r[METRICS] for r in records]
    return MetricRecord({"clients": len(metrics), "epsilon-max": max(float(m["epsilon"]) for m in metrics)})


_epsilon = lru_cache(maxsize=4096)(derive_epsilon)  # the same parameters recur across rounds and owners


class AdapterFedAvg(FedAvg):
    """Message-API FedAvg that averages the adapter tensors, every owner with the same weight.

    Before averaging it sets aside replies that carry an error (the ClientApp raised), invalid replies,
    replies that refuse to train (privacy budget spent) and nodes that did not reply within the round's
    timeout; all are logged with the node id and recorded in metrics.json, and the round goes on with the
    rest if at least `min_clients` trained (else the global adapter stays as it was). Server-side evaluation replaces federated evaluation (`fraction_evaluate=0`), so clients
    never report metrics computed on their private data.
    """

    def __init__(self, recorder: RunRecorder, reference: ArrayRecord, *, min_clients: int, privacy,
                 round_offset: int = 0, timeout: float = 3600, **kwargs):
        """`privacy`: the run's privacy config (target_epsilon, delta, accountant), which every reply's
        privacy record is checked against."""
        super().__init__(fraction_evaluate=0.0, train_metrics_aggr_fn=privacy_summary, weighted_by_key=WEIGHT,
                         min_train_nodes=min_clients, min_available_nodes=min_clients, **kwargs)
        self.privacy = privacy
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
                continue
            problem = self.invalid(msg.content)
            derived = None
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
            # What the Flower strategy sees: the adapter, a uniform weight and the re-derived epsilon.
            msg.content = RecordDict({ARRAYS: msg.content[ARRAYS], METRICS: MetricRecord(
                {WEIGHT: 1, "epsilon": math.inf if derived is None else derived})})
            trained.append(msg)
            clients.append(record)
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
        if refusal:
            return None
        try:
            check_adapter(content[ARRAYS].to_torch_state_dict(), self.reference)
        except Exception as err:  # noqa: BLE001 - whatever a client sends must not crash the server
            return str(err)
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
