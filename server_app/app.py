"""ServerApp: compose the config, build (or resume) the adapter, run the configured Flower strategy inside the
project's OwnerGuard, write results."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from dplora import config, data, models, transport
from dplora.results import RunRecorder, load_checkpoint, replace_checkpoint, save_optimizer_state
from dplora.train import device, evaluate
from server_app.strategy import OwnerGuard, build_strategy

log = logging.getLogger("flwr.dplora.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config.compose(context.run_config["overrides"])
    out_dir = Path(str(context.run_config["output-dir"])).expanduser().resolve()
    log.info("results go to %s", out_dir)

    model, tokenizer = models.build_model(cfg, device())
    test_sets, test_labels = data.test_sets(cfg, tokenizer)
    # eval.also_test: a tuning run (eval.split=validation) also records the test split, as test_*, so the setting
    # chosen on validation can be reported without a second run; the choice never looks at it.
    also_test = data.test_sets(cfg, tokenizer, "test") if cfg.eval.also_test else None
    trainable, total = models.num_parameters(model)
    log.info("model %s: %d of %d parameters train (%.3f%%); %s split: %d examples", cfg.model.name,
             trainable, total, 100 * trainable / total, cfg.eval.split, len(test_labels))
    # A run key names this experiment in every owner's privacy ledger; a resumed run keeps it, so each
    # owner continues its account instead of starting a new one.
    run_key, done, previous, checkpoint = secrets.token_hex(8), 0, None, None
    if cfg.resume:
        checkpoint = load_checkpoint(cfg.resume, out_dir, config.to_dict(cfg))
        models.load_adapter_state(model, checkpoint.adapter)
        run_key, done, previous = checkpoint.run_key, checkpoint.round, checkpoint.metrics
        log.info("resuming run %s after round %d of %d", run_key, done, cfg.num_rounds)
    recorder = RunRecorder(out_dir, config.to_dict(cfg), cfg.num_rounds, run_key, previous)
    recorder.data["evaluation_split"] = {  # public facts of the split the server scores (plots draw the majority)
        "split": cfg.eval.split, "examples": len(test_labels),
        "majority_class": float(test_labels.bincount().max()) / len(test_labels)}
    latest = {"arrays": models.to_arrays(model)}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += done
        latest["arrays"] = arrays
        models.from_arrays(model, arrays)
        metrics = evaluate(model, test_sets, test_labels, cfg)
        if also_test:
            metrics |= {f"test_{k}": v for k, v in evaluate(model, *also_test, cfg).items()}
        if server_round > done or done == 0:  # a resumed run's starting point is already recorded
            recorder.record_round(server_round, metrics)
        if server_round > done:  # the latest round's adapter, so that a crash loses at most one round
            state = strategy.optimizer_state() if strategy.has_optimizer_state() else None  # FedAvgM's momentum...
            save_adapter(model, out_dir / "checkpoint", {"round": server_round, "run_key": run_key}, state)
        return MetricRecord(metrics)

    strategy = OwnerGuard(build_strategy(cfg), recorder, latest["arrays"], privacy=cfg.privacy,
                          min_clients=cfg.strategy.min_clients, round_offset=done, timeout=cfg.strategy.round_timeout,
                          max_update_norm=cfg.strategy.max_update_norm,
                          update_norm_action=cfg.strategy.update_norm_action, transport_dtype=cfg.transport.dtype)
    if checkpoint is not None and checkpoint.server_optimizer is not None:
        strategy.load_optimizer_state(checkpoint.server_optimizer)
        log.info("restored the server optimizer's state after round %d (%d tensors)", done,
                 len(checkpoint.server_optimizer))
    elif checkpoint is not None and strategy.has_optimizer_state():
        log.warning("the checkpoint holds no server-optimizer state for round %d: %s starts its optimizer afresh",
                    done, cfg.strategy.name)
    if done < cfg.num_rounds:
        strategy.start(grid=grid, initial_arrays=latest["arrays"], num_rounds=cfg.num_rounds - done,
                       timeout=cfg.strategy.round_timeout, train_config=ConfigRecord({"run-key": run_key, transport.CONFIG_KEY: cfg.transport.dtype}),
                       evaluate_fn=evaluate_global)
    models.from_arrays(model, latest["arrays"])
    save_adapter(model, out_dir / "adapter", {"round": cfg.num_rounds, "run_key": run_key})
    log.info("done: metrics in %s, final adapter in %s", recorder.path, out_dir / "adapter")


def save_adapter(model, folder: Path, info: dict, optimizer_state: dict | None = None) -> None:
    """peft's save_pretrained (load it with PeftModel.from_pretrained on the same base model) + round info (+ the
    server optimizer's state), replacing `folder` as a whole: a crash mid-way leaves a complete checkpoint."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if optimizer_state is not None:
            save_optimizer_state(tmp, optimizer_state, info["round"])

    replace_checkpoint(folder, write, info)
