"""What one data owner does in one round: load the global adapter, train under its privacy account, reply.

The reply (dplora/protocol.py) carries the adapter tensors and the privacy record, all functions of the public
configuration (and of the size an owner publishes, where it publishes one), never of its exact record count.
Nothing else about the private data leaves the client: no record count, no training loss, no local accuracy.
A client whose budget would be exceeded, or whose owner's settings forbid the run, sends a refusal instead.

The owner's node config decides where its data and its ledger are, and what it accepts:
  data-path='/secure/owner_a.jsonl'      this owner's own file (JSON Lines, CSV or Parquet, by extension), or
  partition-id=I num-partitions=N        simulation: share I of the configured dataset's training split;
  privacy-ledger='/secure/ledger.json'   the spend across runs and restarts (see dplora/ledger.py),
  privacy-budget=10 [privacy-budget-delta=1e-5]   the owner's total budget, enforced by the ledger: required
                                         for an owner serving its own file (data-path), which refuses every
                                         run without it;
  allow-non-private=true                 an owner with a data-path also refuses non-private runs unless set;
  public-num-examples=800                optional, published: the size the sample rate is derived from
                                         (q = train.batch_size / public-num-examples) when the run does not
                                         set train.sample_rate. Simulated owners use the split's size over the
                                         number of owners.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import zlib
from pathlib import Path

from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig

from . import config, data, models, protocol
from .ledger import PrivacyLedger
from .privacy import (
    STATE_KEY,
    BudgetExhausted,
    PrivacyAccount,
    grad_sample_mode,
    sample_rate,
    steps_per_round,
)
from .train import device, train_round

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

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
    """(raw split, tokenized TensorDataset, description, public size or None) of this owner's training data,
    built once per process. The public size is what the owner publishes (node config public-num-examples),
    or in simulation the training split's size over the number of owners; never the exact local count."""
    path = Path(str(node_config["data-path"])).expanduser() if "data-path" in node_config else None

    def build():
        if path is not None:
            fmt = path.suffix.lstrip(".") or cfg.dataset.format
            if fmt not in data.FORMATS:
                raise data.DataError(f"{path}: unknown format {fmt!r}; name the file .jsonl, .csv or .parquet")
            local, where = data.from_rows(data.read_rows(path, cfg.dataset, fmt)), str(path)
            public = node_config.get("public-num-examples")
        else:
            missing = {"partition-id", "num-partitions"} - set(node_config)
            if missing:
                raise config.ConfigError(
                    f"this SuperNode's node config needs data-path (its own data file) or partition-id and "
                    f"num-partitions (simulation), got {dict(node_config)}; e.g. --node-config "
                    "\"data-path='/secure/owner_a.jsonl'\"")
            pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
            (local, public), where = data.client_partition(cfg, pid, n), f"partition {pid} of {n} ({cfg.partitioner.name})"
        return local, data.encode(local, tokenizer, cfg), where, None if public is None else int(public)
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


def public_sample_rate(cfg: DictConfig, public_size: int | None) -> float:
    """q: `train.sample_rate` if the run sets it, else train.batch_size / the owner's public size."""
    if cfg.train.sample_rate is not None:
        return float(cfg.train.sample_rate)
    if public_size is None:
        raise config.ConfigError(
            "the sample rate must come from public numbers: set train.sample_rate in the run's overrides, or "
            "publish this owner's size in its node config (public-num-examples=N, a number the owner accepts "
            "to disclose; q = train.batch_size / N)")
    return sample_rate(cfg.train.batch_size, public_size)


def with_batch_size(cfg: DictConfig, q: float, public_size: int | None) -> DictConfig:
    """`cfg` with train.batch_size set: as configured, or (train.batch_size=null, a recipe that names the
    expected batch as a share of the local data through train.sample_rate) q x the owner's public size."""
    if cfg.train.batch_size is not None:
        return cfg
    if public_size is None:
        raise config.ConfigError(
            "train.batch_size=null takes the expected batch size (the noisy sum's public normalizer) as "
            "train.sample_rate x this owner's public size, and this owner publishes none: set train.batch_size, "
            "or public-num-examples=N in its node config")
    resolved = copy.deepcopy(cfg)
    resolved.train.batch_size = max(1, round(q * public_size))
    return resolved


def load_account(state: RecordDict, cfg: DictConfig, public_size: int | None, ledger: PrivacyLedger | None,
                 run_key: str) -> PrivacyAccount:
    """This owner's account: from `context.state` during a run; from its ledger after a restart (resume);
    else a new one, calibrated for the whole planned run from public numbers only."""
    if STATE_KEY in state.config_records:
        return PrivacyAccount.from_record(state.config_records[STATE_KEY])
    if ledger is not None and (account := ledger.account(run_key)) is not None:
        eps = account.epsilon()
        log.info("run %s: continuing the privacy account from the ledger %s: %d steps taken, epsilon %s",
                 run_key, ledger.path, account.steps, "n/a (no DP)" if eps is None else f"{eps:.3f}")
        return account
    q = public_sample_rate(cfg, public_size)
    account = PrivacyAccount.plan(cfg.privacy, q, cfg.num_rounds * steps_per_round(q, cfg.train.local_epochs))
    if account.private:
        mode, why = grad_sample_mode(cfg.privacy.grad_sample_mode)
        log.info("privacy plan: q=%.5f, %d planned steps, noise multiplier %.4f for epsilon=%s delta=%g; "
                 "per-example gradients by Opacus %s mode (%s)", account.sample_rate, account.planned_steps,
                 account.noise_multiplier, account.target_epsilon, account.delta, mode, why)
    return account


def allows_non_private(node_config: dict) -> bool:
    return str(node_config.get("allow-non-private", "false")).lower() == "true"


def owner_limits(cfg: DictConfig, node_config: dict) -> None:
    """An owner serving its own file trains only within the limits it set in its node config: a total
    budget (privacy-budget) always, and non-private runs only with allow-non-private=true. Simulated owners
    (partition-id, no data-path) follow the run's configuration."""
    if "data-path" not in node_config:
        return
    if "privacy-budget" not in node_config:
        raise BudgetExhausted(
            "refusing to train: this owner's node config sets no privacy-budget; set privacy-budget=EPSILON "
            "(with privacy-ledger=FILE) to say how much privacy it may spend over all runs")
    if cfg.privacy.target_epsilon is None and not allows_non_private(node_config):
        raise BudgetExhausted("refusing non-private training: this owner's node config does not set "
                              "allow-non-private=true")


def train(cfg: DictConfig, arrays: ArrayRecord, state: RecordDict, *, node_config: dict, server_round: int,
          run_key: str = "", proximal_mu: float = 0.0) -> RecordDict:
    """Train one round on this owner's data; update `state` (the privacy account) and the ledger.
    `proximal_mu`: FedProx's pull towards the global adapter (sent by the server), applied outside DP."""
    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError(f"proximal-mu from the server must be a finite number >= 0 (got {proximal_mu!r})")
    ledger = PrivacyLedger.from_node_config(node_config)
    model, tokenizer = local_model(cfg)
    models.from_arrays(model, arrays)  # every trainable tensor: nothing of an earlier round remains
    local, train_set, where, public_size = local_data(cfg, node_config, tokenizer)
    owner = owner_name(node_config)
    first = STATE_KEY not in state.config_records
    account = load_account(state, cfg, public_size, ledger, run_key)
    cfg = with_batch_size(cfg, account.sample_rate, public_size)
    next_steps = steps_per_round(account.sample_rate, cfg.train.local_epochs)
    if first:  # describe the local data in the owner's own log (it never leaves the owner)
        log.info("%s, %s: %s", owner, where, data.label_mix(local, list(cfg.dataset.label_names)))
        expected = account.sample_rate * len(train_set)
        if not 0.5 <= expected / cfg.train.batch_size <= 2:
            log.warning("%s: batches will hold %.0f examples on average (q=%.4f x %d local examples) while the "
                        "noisy gradient sum is divided by train.batch_size=%d: set train.sample_rate or "
                        "public-num-examples closer to this owner's size", owner, expected, account.sample_rate,
                        len(train_set), cfg.train.batch_size)
    try:
        owner_limits(cfg, node_config)
        if ledger is not None and ledger.trained_round(run_key) >= server_round:
            raise BudgetExhausted(f"refusing to train round {server_round} of run {run_key} again: this owner "
                                  "trained it before a restart, and will not spend budget on it twice")
        account.check_budget(next_steps)
        if ledger is not None:
            ledger.check(run_key, account, next_steps, allow_non_private=allows_non_private(node_config))
    except BudgetExhausted as refused:
        log.warning("%s, round %d: %s", owner, server_round, refused)
        state.config_records[STATE_KEY] = account.to_record()
        return protocol.refusal(account.metrics(), str(refused))
    seed = zlib.crc32(f"{cfg.seed}/{server_round}/{owner}".encode())  # dropout; DP noise uses OS entropy
    result = train_round(model, train_set, cfg, account, seed=seed, steps=next_steps, proximal_mu=proximal_mu,
                         name=f"{owner}, round {server_round}")
    state.config_records[STATE_KEY] = account.to_record()  # survives until this owner's next round
    if ledger is not None:
        ledger.record(run_key, account, server_round)  # on the owner's disk before the reply leaves
    eps = account.epsilon()
    log.info("%s, round %d: %d steps in %.1fs, epsilon %s", owner, server_round, result["steps"],
             result["seconds"], "n/a (no DP)" if eps is None else f"{eps:.3f}")
    return protocol.reply(models.to_arrays(model), account.metrics())
