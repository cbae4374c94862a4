"""The run's record on disk: `<output-dir>/metrics.json` (rewritten after every round) and adapter folders.

metrics.json:
  {"config": <resolved config>, "initial": {accuracy, loss, macro_f1},
   "rounds": [{"round", "accuracy", "loss", "macro_f1", "epsilon" (max over clients so far; null = no DP),
               "clients": [{"node_id", "epsilon" (re-derived by the server), "noise_multiplier", "sample_rate",
                            "steps", "delta", "update_norm", ["clipped_to"]}],
               "refused": [{"node_id", "reason", ...privacy record}], "failed": [{"node_id", "reason"}],
               "aggregated" (false: fewer than min_clients trained, the adapter stayed), "seconds",
               "user_level" (with strategy.user_dp: {"epsilon", "delta", "releases", "noise_multiplier",
                             "clipping_norm", "owners_per_round", "accounting"})}],
   "run_key", "resumed_at": [rounds after which a killed run was resumed],
   "accountant": which accountant computed every client epsilon}
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

ADAPTER_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes
PRIVACY_KEYS = ("epsilon", "noise_multiplier", "sample_rate", "steps", "delta")
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

    def record_clients(self, clients: list[dict], refused: list[dict], failed: list[dict],
                       aggregated: bool = True, user_level: dict | None = None) -> None:
        """Called by the strategy after a round's replies arrive. `user_level`: the user-level (DP-FedAvg)
        guarantee so far with its inputs, when that option is on."""
        for record in clients + refused:
            self.epsilons[record["node_id"]] = record["epsilon"]
        self.pending = {"clients": clients, "refused": refused, "failed": failed, "aggregated": aggregated}
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


class ResumeError(RuntimeError):
    """There is no usable checkpoint to resume from; the message says what is missing or differs."""


@dataclass
class Checkpoint:
    round: int
    run_key: str
    adapter: dict[str, torch.Tensor]
    metrics: dict  # metrics.json up to and including `round`
    server_optimizer: dict[str, torch.Tensor] | None  # the server optimizer's state after `round`; None: not saved


def optimizer_file(folder: Path, server_round: int) -> Path:
    return folder / f"server_optimizer-{server_round}.safetensors"


def save_optimizer_state(folder: Path, state: dict[str, torch.Tensor], server_round: int) -> None:
    """The server optimizer's state after `server_round` (OwnerGuard.optimizer_state), beside the checkpoint's
    adapter (written by `replace_checkpoint`'s `write`)."""
    save_file(state, optimizer_file(folder, server_round))


def _siblings(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def replace_checkpoint(folder: Path, write: Callable[[Path], None], info: dict) -> None:
    """Replace the checkpoint `folder` as a whole, so that a crash at any point leaves a complete one.

    `write(tmp)` fills a fresh sibling folder (`<folder>.tmp`: the adapter, the server optimizer's state), then
    round.json goes in last (a folder with round.json is complete), then `folder` is renamed to `<folder>.old`,
    `<folder>.tmp` to `folder`, and `<folder>.old` removed. `latest_checkpoint` picks the newest complete one of
    the three."""
    tmp, old = _siblings(folder)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save's leftover
    tmp.mkdir(parents=True)
    write(tmp)
    write_json(tmp / "round.json", info)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _complete_round(folder: Path) -> int | None:
    try:
        info = json.loads((folder / "round.json").read_text())
        return int(info["round"]) if (folder / ADAPTER_FILE).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(folder: Path) -> Path:
    """`folder`, or the sibling a save that crashed mid-way left complete (`replace_checkpoint`): of `folder`,
    `<folder>.tmp` and `<folder>.old`, the complete one (round.json and the adapter) of the latest round;
    `folder` itself if none is."""
    done = [(r, -i, f) for i, f in enumerate((folder, *_siblings(folder))) if (r := _complete_round(f)) is not None]
    return max(done)[2] if done else folder


def load_checkpoint(resume: bool | str, out_dir: Path, config: dict) -> Checkpoint:
    """The checkpoint to resume from: `<out_dir>/checkpoint` (resume=true) or the folder `resume` names (or the
    complete sibling a crashed save left, `latest_checkpoint`).

    The run's config must equal the checkpointed run's (but for `resume`): a resumed run continues the same
    experiment, with the same owners' accounts, and writes the same metrics.json.
    """
    named = out_dir / "checkpoint" if resume is True else Path(str(resume)).expanduser().resolve()
    folder = latest_checkpoint(named)
    if folder != named:
        log.warning("resuming from %s: a save of %s was interrupted", folder, named)
    info_path, weights = folder / "round.json", folder / ADAPTER_FILE
    metrics_path = out_dir / "metrics.json"
    for path in (info_path, weights, metrics_path):
        if not path.is_file():
            raise ResumeError(f"cannot resume: {path} not found (a run writes its checkpoint after its first "
                              "round; without one, start afresh with resume=false)")
    info, metrics = json.loads(info_path.read_text()), json.loads(metrics_path.read_text())
    done = int(info["round"])
    if len(metrics["rounds"]) < done or "run_key" not in info:
        raise ResumeError(f"cannot resume: {metrics_path} has {len(metrics['rounds'])} rounds but the checkpoint "
                          f"{folder} is at round {done}")
    old = {k: v for k, v in metrics["config"].items() if k != "resume"}
    new = {k: v for k, v in json.loads(json.dumps(config)).items() if k != "resume"}  # as metrics.json holds it
    if old != new:
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ResumeError(f"cannot resume: the config differs from the checkpointed run's in {differ}")
    metrics["rounds"] = metrics["rounds"][:done]  # a round after the checkpoint is redone
    metrics["resumed_at"] = [*metrics.get("resumed_at", []), done]
    optimizer = optimizer_file(folder, done)
    server_optimizer = load_file(optimizer) if optimizer.is_file() else None
    return Checkpoint(round=done, run_key=info["run_key"], adapter=load_file(weights), metrics=metrics,
                      server_optimizer=server_optimizer)


def write_json(path: Path, obj) -> None:
    """Write atomically: a reader never sees half a file, a crash never loses the previous version."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)
