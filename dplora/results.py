"""The run's record on disk: `<output-dir>/metrics.json` (rewritten after every round) and adapter folders.

metrics.json:
  {"config": <resolved config>, "initial": {accuracy, loss, macro_f1},
   "rounds": [{"round", "accuracy", "loss", "macro_f1", "epsilon" (max over clients so far; null = no DP),
               "clients": [{"node_id", "epsilon", "noise_multiplier", "sample_rate", "steps", "delta",
                            "num_examples"}],
               "refused": [{"node_id", "reason", ...privacy record}], "failed": [{"node_id", "reason"}],
               "seconds"}]}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

PRIVACY_KEYS = ("epsilon", "noise_multiplier", "sample_rate", "steps", "delta")


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isinf(value) else value


def client_record(node_id: int, metrics: dict) -> dict:
    """One client's entry in metrics.json, from its reply's MetricRecord."""
    record = {"node_id": node_id, **{k: metrics[k] for k in PRIVACY_KEYS}, "num_examples": metrics["num-examples"]}
    record["epsilon"] = _finite_or_none(record["epsilon"])
    return record


class RunRecorder:
    """Collects each round's client records and evaluation, and writes metrics.json after every round."""

    def __init__(self, out_dir: str | Path, config: dict, num_rounds: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = num_rounds
        self.data = {"config": config, "initial": None, "rounds": []}
        self.epsilons: dict[int, float | None] = {}  # node_id -> latest epsilon
        self.pending: dict = {}
        self.start = time.time()

    @property
    def path(self) -> Path:
        return self.out_dir / "metrics.json"

    def record_clients(self, clients: list[dict], refused: list[dict], failed: list[dict]) -> None:
        """Called by the strategy after a round's replies arrive."""
        for record in clients + refused:
            self.epsilons[record["node_id"]] = record["epsilon"]
        self.pending = {"clients": clients, "refused": refused, "failed": failed}

    def epsilon(self) -> float | None:
        """The largest epsilon any data owner has spent so far (None if no owner trains with DP)."""
        spent = [e for e in self.epsilons.values() if e is not None]
        return max(spent) if spent else None

    def record_round(self, server_round: int, evaluation: dict) -> None:
        """Called after the round's global evaluation: append the round and rewrite metrics.json."""
        if server_round == 0:
            self.data["initial"] = evaluation
        else:
            entry = {"round": server_round, **evaluation, "epsilon": self.epsilon(),
                     **({"clients": [], "refused": [], "failed": []} | self.pending),
                     "seconds": round(time.time() - self.start, 2)}
            self.data["rounds"].append(entry)
            self.pending = {}
            eps = entry["epsilon"]
            log.info("round %d/%d: accuracy %.4f  loss %.4f  macro-F1 %.4f  epsilon %s  "
                     "(%d trained, %d refused, %d failed)", server_round, self.num_rounds, entry["accuracy"],
                     entry["loss"], entry["macro_f1"], "n/a (no DP)" if eps is None else f"{eps:.3f}",
                     len(entry["clients"]), len(entry["refused"]), len(entry["failed"]))
        write_json(self.path, self.data)


def write_json(path: Path, obj) -> None:
    """Write atomically: a reader never sees half a file, a crash never loses the previous version."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)
