"""What one data owner does in one round: load the global adapter, train under its privacy account, reply.

A reply carries the adapter tensors (fp32) and a MetricRecord with `num-examples` (the local data size) and
the privacy record: `epsilon` so far (inf without DP), `noise_multiplier`, `sample_rate`, `steps` (cumulative
DP steps this run) and `delta`. Nothing else about the private data leaves the client: no training loss, no
local accuracy. A client whose budget would be exceeded replies without arrays and with a `status` record.

The owner's node config decides where its data and its ledger are:
  data-path='/secure/owner_a.jsonl'      this owner's own file (JSON Lines, CSV or Parquet, by extension), or
  partition-id=I num-partitions=N        simulation: share I of the configured dataset's training split;
  privacy-ledger='/secure/ledger.json'   optional: the spend across runs and restarts (see dplora/ledger.py),
  privacy-budget=10 [privacy-budget-delta=1e-5]   optional: the owner's total budget, enforced by the ledger.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import DictConfig

from . import config, data, models
from .ledger import PrivacyLedger
from .privacy import (
    STATE_KEY,
    BudgetExhausted,
    PrivacyAccount,
    grad_sample_mode,
    steps_per_epoch,
)
from .train import device, train_round

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

ARRAYS, METRICS, STATUS = "arrays", "metrics", "status"

# A kept ClientApp process (simulation workers, or any long-lived process) builds its base model and
# tokenizes its data once per config, not every round. The model's adapter is overwritten from the global
# arrays every round, so nothing of one round's (or one simulated owner's) training carries over.
# DPLORA_CACHE=0 turns the cache off (scripts/bench.py measures what it saves).
_cache: dict[str, object] = {}


def _cached(kind: str, key: str, build, keep: int = 1):
    if os.environ.get("DPLORA_CACHE", "1") == "0":
        return build()
    full_key = f"{kind}:{key}"
    if full_key not in _cache:
        stale = [k for k in _cache if k.startswith(f"{kind}:")]
        for k in stale[: max(len(stale) - keep + 1, 0)]:
            del _cache[k]
        _cache[full_key] = build()
    return _cache[full_key]


def local_model(cfg: DictConfig):
    """(peft model, tokenizer) for this config, built once per process."""
    def build():
        log.info("building %s (once per process and config)", cfg.model.name)
        return models.build_model(cfg, device())
    return _cached("model", json.dumps(config.to_dict(cfg), sort_keys=True), build)


def local_data(cfg: DictConfig, node_config: dict, tokenizer):
    """(raw split, tokenized TensorDataset, description) of this owner's training data, built once per process."""
    path = Path(str(node_config["data-path"])).expanduser() if "data-path" in node_config else None

    def build():
        if path is not None:
            fmt = path.suffix.lstrip(".") or cfg.dataset.format
            if fmt not in data.FORMATS:
                raise data.DataError(f"{path}: unknown format {fmt!r}; name the file .jsonl, .csv or .parquet")
            local, where = data.from_rows(data.read_rows(path, cfg.dataset, fmt)), str(path)
        else:
            missing = {"partition-id", "num-partitions"} - set(node_config)
            if missing:
                raise config.ConfigError(
                    f"this SuperNode's node config needs data-path (its own data file) or partition-id and "
                    f"num-partitions (simulation), got {dict(node_config)}; e.g. --node-config "
                    "\"data-path='/secure/owner_a.jsonl'\"")
            pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
            local, where = data.client_partition(cfg, pid, n), f"partition {pid} of {n} ({cfg.partitioner.name})"
        return local, data.encode(local, tokenizer, cfg), where
    version = path.stat().st_mtime_ns if path is not None and path.is_file() else ""  # a changed file is reread
    key = json.dumps([config.to_dict(cfg), {k: str(v) for k, v in node_config.items()}, version], sort_keys=True)
    return _cached("data", key, build, keep=64)


def node_settings(node_config: dict, output_dir: str) -> dict:
    """The node config, plus a ledger for simulated owners (partition-id, no data-path): they keep it beside
    the run's results, `<output-dir>/ledgers/owner-<partition-id>.json`, so that a resumed simulation
    continues their accounts. A real owner names its own ledger (node config privacy-ledger) or has none."""
    settings = dict(node_config)
    if "partition-id" in settings and "data-path" not in settings and "privacy-ledger" not in settings:
        settings["privacy-ledger"] = str(Path(output_dir).expanduser().resolve() / "ledgers"
                                         / f"owner-{settings['partition-id']}.json")
    return settings


def owner_name(node_config: dict) -> str:
    return (f"owner {node_config['partition-id']}" if "partition-id" in node_config
            else f"owner {Path(str(node_config.get('data-path', '?'))).name}")


def load_account(state: RecordDict, cfg: DictConfig, num_examples: int, ledger: PrivacyLedger | None,
                 run_key: str) -> PrivacyAccount:
    """This owner's account: from `context.state` during a run; from its ledger after a restart (resume);
    else a new one, calibrated for the whole planned run."""
    if STATE_KEY in state.config_records:
        return PrivacyAccount.from_record(state.config_records[STATE_KEY])
    if ledger is not None and (account := ledger.account(run_key)) is not None:
        log.info("run %s: continuing the privacy account from the ledger %s: %d steps taken, epsilon %s",
                 run_key, ledger.path, account.steps, account.epsilon())
        return account
    account = PrivacyAccount.plan(cfg.privacy, num_examples, cfg.train.batch_size,
                                  planned_epochs=cfg.num_rounds * cfg.train.local_epochs)
    if account.private:
        mode, why = grad_sample_mode(cfg.privacy.grad_sample_mode)
        log.info("privacy plan: %d examples, q=%.5f, %d planned steps, noise multiplier %.4f for epsilon=%s "
                 "delta=%g; per-example gradients by Opacus %s mode (%s)", num_examples, account.sample_rate,
                 account.planned_steps, account.noise_multiplier, account.target_epsilon, account.delta, mode, why)
    return account


def refusal(account: PrivacyAccount, reason: str) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({"num-examples": 0, **account.metrics()}),
                       STATUS: ConfigRecord({"refused": reason})})


def train(cfg: DictConfig, arrays: ArrayRecord, state: RecordDict, *, node_config: dict, server_round: int,
          run_key: str = "") -> RecordDict:
    """Train one round on this owner's data; update `state` (the privacy account) and the ledger."""
    ledger = PrivacyLedger.from_node_config(node_config)
    model, tokenizer = local_model(cfg)
    models.from_arrays(model, arrays)  # every trainable tensor: nothing of an earlier round remains
    local, train_set, where = local_data(cfg, node_config, tokenizer)
    owner = owner_name(node_config)
    if STATE_KEY not in state.config_records:  # first round here: describe the local data in the owner's log
        log.info("%s, %s: %s", owner, where, data.label_mix(local, list(cfg.dataset.label_names)))
    account = load_account(state, cfg, len(train_set), ledger, run_key)
    next_steps = cfg.train.local_epochs * steps_per_epoch(len(train_set), cfg.train.batch_size)
    try:
        if ledger is not None and ledger.trained_round(run_key) >= server_round:
            raise BudgetExhausted(f"refusing to train round {server_round} of run {run_key} again: this owner "
                                  "trained it before a restart, and will not spend budget on it twice")
        account.check_budget(next_steps)
        if ledger is not None:
            ledger.check(run_key, account, next_steps)
    except BudgetExhausted as refused:
        log.warning("%s, round %d: %s", owner, server_round, refused)
        state.config_records[STATE_KEY] = account.to_record()
        return refusal(account, str(refused))
    seed = zlib.crc32(f"{cfg.seed}/{server_round}/{owner}".encode())  # dropout; DP noise uses OS entropy
    result = train_round(model, train_set, cfg, account, seed=seed)
    state.config_records[STATE_KEY] = account.to_record()  # survives until this owner's next round
    if ledger is not None:
        ledger.record(run_key, account, server_round)  # on the owner's disk before the reply leaves
    log.info("%s, round %d: %d steps in %.1fs, epsilon %s", owner, server_round, result["steps"],
             result["seconds"], account.epsilon())
    return RecordDict({ARRAYS: models.to_arrays(model),
                       METRICS: MetricRecord({"num-examples": len(train_set), **account.metrics()})})
