"""The run's record on disk: `<output-dir>/metrics.json` (rewritten after every round) and adapter folders.

metrics.json:
  {"config": <resolved config>, "initial": {accuracy, loss, macro_f1},
   "rounds": [{"round", "accuracy", "loss", "macro_f1", "epsilon" (max over clients so far; null = no DP),
               "clients": [{"node_id", "epsilon" (re-derived by the server), "noise_multiplier", "sample_rate",
                            "steps", "delta", "update_norm", ["clipped_to"]}],
               "refused": [{"node_id", "reason", ...privacy record}], "failed": [{"node_id", "reason"}],
               "aggregated" (false: fewer than min_clients trained, the adapter stayed), "seconds",
               "user_level" (with strategy.user_dp: {"epsilon", "delta", "releases", "noise_multiplier",
                             "clipping_norm", "owners_per_round", "accounting"}, and with sampling=poisson
                             "sample_rate", "sampled" (owners sampled this round))}],
   "run_key", "resumed_at": [rounds after which a killed run was resumed],
   "accountant": which accountant computed every client epsilon}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from .protocol import PRIVACY_KEYS

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

ACCOUNTANTS = {"prv": "Opacus PRVAccountant (privacy random variables)", "rdp": "Opacus RDPAccountant (Renyi DP)"}


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isinf(value) else value


def client_record(node_id: int, metrics: dict, epsilon: float | None) -> dict:
    """One client's entry in metrics.json: its reply's privacy parameters, with the epsilon the server
    re-derived from them (None: no DP)."""
    record = {"node_id": node_id, **{k: metrics[k] for k in PRIVACY_KEYS}}
    record["epsilon"] = _finite_or_none(epsilon)
    record["steps"] = int(record["steps"])
    return record


class RunRecorder:
    """Collects each round's client records and evaluation, and writes metrics.json after every round."""

    def __init__(self, out_dir: str | Path, config: dict, num_rounds: int, run_key: str,
                 previous: dict | None = None):
        """`previous`: a resumed run's metrics.json, cut to its checkpoint's round; the record goes on from it."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = num_rounds
        accountant = (config.get("privacy") or {}).get("accountant", "prv")
        self.data = previous or {"config": config, "initial": None, "rounds": [], "run_key": run_key,
                                 "resumed_at": [], "accountant": f"{ACCOUNTANTS.get(accountant, accountant)}, "
                                 "re-derived by the server from each reply's own parameters"}
        self.epsilons: dict[int, float | None] = {}  # node_id -> latest epsilon
        for entry in self.data["rounds"]:
            for record in entry["clients"] + entry["refused"]:
                self.epsilons[record["node_id"]] = record["epsilon"]
        self.pending: dict = {}
        self.start = time.time() - (self.data["rounds"][-1]["seconds"] if self.data["rounds"] else 0)

    @property
    def path(self) -> Path:
        return self.out_dir / "metrics.json"

    # -- the round's replies, recorded by the server's wrappers as they decide (server_app/) -------------------

    def start_round(self) -> None:
        """A new round's replies arrive: forget an unfinished earlier one's."""
        self.pending = {"clients": [], "refused": [], "failed": [], "aggregated": False}

    def trained(self, record: dict) -> None:
        """A reply that goes to the aggregator: its privacy record, re-derived epsilon and update norm."""
        self.pending.setdefault("clients", []).append(record)
        self.epsilons[record["node_id"]] = record["epsilon"]

    def refused(self, record: dict) -> None:
        """An owner that declined the round: its privacy record (with the re-derived epsilon) and reason."""
        self.pending.setdefault("refused", []).append(record)
        self.epsilons[record["node_id"]] = record["epsilon"]

    def failed(self, node_id: int, reason: str) -> None:
        """A node whose reply was set aside (no reply, an error, an invalid or out-of-bound reply)."""
        self.pending.setdefault("failed", []).append({"node_id": node_id, "reason": reason})

    def aggregated(self, done: bool, user_level: dict | None = None) -> None:
        """Whether the round changed the global adapter; `user_level`: the user-level (DP-FedAvg) guarantee so
        far with its inputs, when that option is on."""
        self.pending["aggregated"] = done
        if user_level is not None:
            self.pending["user_level"] = user_level

    def epsilon(self) -> float | None:
        """The largest epsilon any data owner has spent so far (None if no owner trains with DP)."""
        spent = [e for e in self.epsilons.values() if e is not None]
        return max(spent) if spent else None

    def record_round(self, server_round: int, evaluation: dict) -> None:
        """Called after the round's global evaluation: append the round and rewrite metrics.json.
        A non-finite evaluation value (a destroyed adapter) is recorded as null, with a warning."""
        evaluation = dict(evaluation)
        for key, value in evaluation.items():
            if isinstance(value, float) and not math.isfinite(value):
                log.warning("round %d: %s is %s; recorded as null", server_round, key, value)
                evaluation[key] = None
        if server_round == 0:
            self.data["initial"] = evaluation
        else:
            entry = {"round": server_round, **evaluation, "epsilon": self.epsilon(),
                     **({"clients": [], "refused": [], "failed": [], "aggregated": False} | self.pending),
                     "seconds": round(time.time() - self.start, 2)}
            self.data["rounds"].append(entry)
            self.pending = {}
            eps = entry["epsilon"]
            shown = {k: "n/a" if entry[k] is None else f"{entry[k]:.4f}" for k in ("accuracy", "loss", "macro_f1")}
            log.info("round %d/%d: accuracy %s  loss %s  macro-F1 %s  epsilon %s  (%d trained, %d refused, "
                     "%d failed)", server_round, self.num_rounds, shown["accuracy"], shown["loss"],
                     shown["macro_f1"], "n/a (no DP)" if eps is None else f"{eps:.3f}", len(entry["clients"]),
                     len(entry["refused"]), len(entry["failed"]))
            if "user_level" in entry:
                log.info("round %d/%d: user-level epsilon %.3f (delta %g) after %d releases", server_round,
                         self.num_rounds, entry["user_level"]["epsilon"], entry["user_level"]["delta"],
                         entry["user_level"]["releases"])
        write_json(self.path, self.data)


def write_json(path: Path, obj) -> None:
    """Write atomically: a reader never sees half a file, a crash never loses the previous version."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)
