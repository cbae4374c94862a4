"""What one data owner does in one round: load the global adapter, train under its privacy account, reply.

A reply carries the adapter tensors (fp32) and a MetricRecord with `num-examples` (the partition size) and
the privacy record: `epsilon` so far (inf without DP), `noise_multiplier`, `sample_rate`, `steps` (cumulative
DP steps this run) and `delta`. Nothing else about the private data leaves the client: no training loss, no
local accuracy. A client whose budget would be exceeded replies without arrays and with a `status` record.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import DictConfig

from . import data, models
from .privacy import STATE_KEY, BudgetExhausted, PrivacyAccount, steps_per_epoch
from .train import device, train_round

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`

ARRAYS, METRICS, STATUS = "arrays", "metrics", "status"


def load_account(state: RecordDict, cfg: DictConfig, num_examples: int) -> PrivacyAccount:
    """This owner's account from `context.state`, or a new one calibrated for the whole planned run."""
    if STATE_KEY in state.config_records:
        return PrivacyAccount.from_record(state.config_records[STATE_KEY])
    account = PrivacyAccount.plan(cfg.privacy, num_examples, cfg.train.batch_size,
                                  planned_epochs=cfg.num_rounds * cfg.train.local_epochs)
    log.info("privacy plan: %d examples, q=%.5f, %d planned steps, noise multiplier %.4f for epsilon=%s delta=%g",
             num_examples, account.sample_rate, account.planned_steps, account.noise_multiplier,
             account.target_epsilon, account.delta)
    return account


def train(cfg: DictConfig, arrays: ArrayRecord, state: RecordDict, *, partition_id: int, num_partitions: int,
          server_round: int) -> RecordDict:
    """Train one round on this owner's partition; update `state` (the privacy account) in place."""
    model, tokenizer = models.build_model(cfg, device())
    models.from_arrays(model, arrays)
    local = data.client_partition(cfg, partition_id, num_partitions)
    train_set = data.encode(local, tokenizer, cfg)
    if STATE_KEY not in state.config_records:  # first round: describe the local data in this owner's own log
        log.info("partition %d of %d (%s): %s", partition_id, num_partitions, cfg.partitioner.name,
                 data.label_mix(local, list(cfg.dataset.label_names)))
    account = load_account(state, cfg, len(train_set))
    try:
        account.check_budget(cfg.train.local_epochs * steps_per_epoch(len(train_set), cfg.train.batch_size))
    except BudgetExhausted as refusal:
        log.warning("partition %d, round %d: %s", partition_id, server_round, refusal)
        return RecordDict({METRICS: MetricRecord({"num-examples": 0, **account.metrics()}),
                           STATUS: ConfigRecord({"refused": str(refusal)})})
    seed = hash((cfg.seed, server_round, partition_id)) % 2**31
    result = train_round(model, train_set, cfg, account, seed=seed)
    state.config_records[STATE_KEY] = account.to_record()  # survives until this owner's next round
    log.info("partition %d, round %d: %d steps in %.1fs, epsilon %s", partition_id, server_round,
             result["steps"], result["seconds"], account.epsilon())
    return RecordDict({ARRAYS: models.to_arrays(model),
                       METRICS: MetricRecord({"num-examples": len(train_set), **account.metrics()})})
