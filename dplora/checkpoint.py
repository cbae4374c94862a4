"""Checkpoints: the latest round's adapter (and the server optimizer's state), replaced atomically, and resume.

`<output-dir>/checkpoint/` holds peft's adapter files, `round.json` ({"round", "run_key"}, written last: a folder
with it is complete) and, for aggregators with a server optimizer (FedAvgM's momentum, FedAdam's moments, ...),
`server_optimizer-<round>.safetensors`. `load_checkpoint` checks the resumed run's config against the
checkpointed one's.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .results import write_json

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

ADAPTER_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes


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
    """The server optimizer's state after `server_round` (`optimizer_state`), beside the checkpoint's
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


def checkpoint_round(folder: Path) -> int | None:
    """The round of the newest complete checkpoint at `folder` (`latest_checkpoint`); None if there is none."""
    return _complete_round(latest_checkpoint(folder))


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


# -- the server optimizer's state ------------------------------------------------------------------------
# What Flower's server optimizers carry from round to round besides the global adapter: FedAvgM's momentum (a
# list in the adapter's order), FedAdam's, FedYogi's and FedAdagrad's moments (dicts by name).
OPTIMIZER_STATE = ("momentum_vector", "m_t", "v_t")


def aggregator(strategy):
    """The innermost strategy: the aggregator inside the server's wrappers and Flower's DP wrappers."""
    while getattr(strategy, "strategy", None) is not None:
        strategy = strategy.strategy
    return strategy


def has_optimizer_state(strategy) -> bool:
    """Whether the aggregator keeps a server optimizer's state between rounds (FedAvgM, FedAdam, ...)."""
    return any(hasattr(aggregator(strategy), name) for name in OPTIMIZER_STATE)


def optimizer_state(strategy) -> dict[str, torch.Tensor]:
    """The aggregator's server-optimizer state as flat tensors, `<attribute>/<name or index>`; empty for a
    stateless aggregator (FedAvg, FedProx, ...) and before the first aggregation."""
    inner, state = aggregator(strategy), {}
    for name in OPTIMIZER_STATE:
        value = getattr(inner, name, None) or {}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        state |= {f"{name}/{key}": torch.from_numpy(np.ascontiguousarray(array)) for key, array in items}
    return state


def load_optimizer_state(strategy, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Restore `optimizer_state()`'s tensors into the aggregator (a resumed run). A state the aggregator does not
    keep, or that does not fit the adapter `reference`, raises ValueError naming it."""
    inner, names = aggregator(strategy), {key.split("/", 1)[0] for key in state}
    for name in sorted(names):
        if name not in OPTIMIZER_STATE or not hasattr(inner, name):
            raise ValueError(f"the checkpoint holds server-optimizer state {name!r}, which "
                             f"{type(inner).__name__} does not keep: resume with the checkpointed run's strategy")
        entries = {key.split("/", 1)[1]: tensor.numpy() for key, tensor in state.items()
                   if key.split("/", 1)[0] == name}
        if name == "momentum_vector":
            value = [entries[str(i)] for i in range(len(entries))] if set(entries) == \
                {str(i) for i in range(len(entries))} else None
            shapes = [tuple(t.shape) for t in reference.values()]
            fits = value is not None and [a.shape for a in value] == shapes
        else:
            value = entries
            fits = {k: a.shape for k, a in value.items()} == {k: tuple(t.shape) for k, t in reference.items()}
        if not fits:
            raise ValueError(f"the checkpoint's server-optimizer state {name!r} does not fit the adapter "
                             "(other names or shapes)")
        setattr(inner, name, value)
