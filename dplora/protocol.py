"""What crosses the wire between the server and a data owner, in one place.

Server -> owner (a train message): the global adapter under ARRAYS and a ConfigRecord under CONFIG with
  RUN_KEY (names the run in every owner's privacy ledger), SERVER_ROUND (set by Flower's strategies),
  PROXIMAL_MU (FedProx only) and TRANSPORT_DTYPE (the format the owner sends its adapter in, transport.py).
Owner -> server (the reply), exactly one of:
  trained:  ARRAYS (the adapter, in the run's wire format) + METRICS (the privacy record: PRIVACY_KEYS);
  refusal:  METRICS (the privacy record) + STATUS, a ConfigRecord {REFUSED: the owner's reason}.
The privacy record is `epsilon` so far (inf without DP), `noise_multiplier`, `sample_rate`, `steps` (DP steps
this run, cumulative) and `delta`: everything that re-derives the epsilon, and nothing that depends on the
owner's exact record count. `check_reply` accepts exactly these shapes; `check_arrays` checks tensors against a
layout (names, dtypes, shapes, finite values) for the transport decoder and the model's own adapter alike.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS, METRICS, STATUS, CONFIG = "arrays", "metrics", "status", "config"
REFUSED = "refused"  # STATUS's one key: why the owner declined the round
PRIVACY_KEYS = ("epsilon", "noise_multiplier", "sample_rate", "steps", "delta")
RUN_KEY, SERVER_ROUND, PROXIMAL_MU, TRANSPORT_DTYPE = "run-key", "server-round", "proximal-mu", "transport-dtype"

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def reply(arrays: ArrayRecord, privacy: dict[str, float]) -> RecordDict:
    """A trained owner's reply: its adapter and its privacy record."""
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(privacy)})


def refusal(privacy: dict[str, float], reason: str) -> RecordDict:
    """An owner declining the round (budget, its own limits): its privacy record and why."""
    return RecordDict({METRICS: MetricRecord(privacy), STATUS: ConfigRecord({REFUSED: reason})})


def is_refusal(content: RecordDict) -> bool:
    return STATUS in content.config_records


def check_reply(content: RecordDict) -> str | None:
    """Why a reply is not exactly what the protocol allows, or None: its records and their types, the privacy
    record's keys and numbers (finite, >= 0; epsilon may be inf). The arrays are checked by `check_arrays`."""
    refused = is_refusal(content)
    expected = {METRICS} | ({STATUS} if refused else {ARRAYS})
    if set(content.keys()) != expected:
        return f"records {sorted(content.keys())}, expected {sorted(expected)}"
    if METRICS not in content.metric_records or (ARRAYS in expected and ARRAYS not in content.array_records):
        return "records of the wrong type"
    if refused and not isinstance(content.config_records[STATUS].get(REFUSED), str):
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
    return None


def layout_of(state: dict[str, torch.Tensor]) -> Layout:
    """The layout of these tensors: each name's dtype and shape."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def check_arrays(state: dict[str, torch.Tensor], layout: Layout, what: str) -> None:
    """ValueError unless `state` holds exactly `layout`'s names, each with its dtype and shape, and floating
    values are finite. `what` names the expected layout in the message (e.g. "the int8 format")."""
    if set(state) != set(layout):
        missing, extra = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
        raise ValueError(f"adapter arrays differ from {what}: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, (dtype, shape) in layout.items():
        value = state[key]
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise ValueError(f"adapter array {key} is {value.dtype}{list(value.shape)}, expected "
                             f"{dtype}{list(shape)} ({what})")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"adapter array {key} has non-finite values")
