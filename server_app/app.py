"""ServerApp: compose the config, build (or resume) the adapter and the strategy, start it, save what it returns."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from dplora import checkpoint, config, data, models
from dplora.protocol import RUN_KEY, TRANSPORT_DTYPE
from dplora.results import RunRecorder
from dplora.evaluation import evaluate
from dplora.train import device
from dplora.user_level import restore_releases
from server_app.strategy import build_strategy

log = logging.getLogger("flwr.dplora.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config.compose(context.run_config["overrides"])
    out_dir = Path(str(context.run_config["output-dir"])).expanduser().resolve()
    log.info("results go to %s", out_dir)

    model, tokenizer = models.build_model(cfg, device())
    test_sets, test_labels = data.test_sets(cfg, tokenizer)
    # eval.also_test: a tuning run (eval.split=validation) also records the test split, as test_*, at the start and
    # after the last round, so the setting chosen on validation can be reported without a second run; the choice
    # never looks at it (and rounds in between skip it: on an LLM scoring a test split costs minutes).
    also_test = data.test_sets(cfg, tokenizer, "test") if cfg.eval.also_test else None
    references = data.reference_answers(cfg)  # free-text answers (dataset.answer_field): ROUGE-L's references
    test_references = data.reference_answers(cfg, "test") if cfg.eval.also_test else None
    trainable, total = models.num_parameters(model)
    log.info("model %s: %d of %d parameters train (%.3f%%); %s split: %d examples", cfg.model.name,
             trainable, total, 100 * trainable / total, cfg.eval.split, len(test_labels))
    # A run key names this experiment in every owner's privacy ledger; a resumed run keeps it, so each
    # owner continues its account instead of starting a new one.
    run_key, done, previous, resumed = secrets.token_hex(8), 0, None, None
    if cfg.resume:
        resumed = checkpoint.load_checkpoint(cfg.resume, out_dir, config.to_dict(cfg))
        models.load_adapter_state(model, resumed.adapter)
        run_key, done, previous = resumed.run_key, resumed.round, resumed.metrics
        log.info("resuming run %s after round %d of %d", run_key, done, cfg.num_rounds)
    recorder = RunRecorder(out_dir, config.to_dict(cfg), cfg.num_rounds, run_key, previous)
    recorder.data["evaluation_split"] = {  # public facts of the split the server scores (plots draw the majority)
        "split": cfg.eval.split, "examples": len(test_labels),
        "majority_class": float(test_labels.bincount().max()) / len(test_labels)}
    initial = models.to_arrays(model)
    strategy = build_strategy(cfg, recorder, initial, round_offset=done)
    if resumed is not None:  # user-level DP: the rounds released before the checkpoint still count
        released = [r["user_level"]["releases"] for r in previous["rounds"] if "user_level" in r]
        restore_releases(strategy, released[-1] if released else 0)
    if resumed is not None and resumed.server_optimizer is not None:
        checkpoint.load_optimizer_state(strategy, resumed.server_optimizer, initial.to_torch_state_dict())
        log.info("restored the server optimizer's state after round %d (%d tensors)", done,
                 len(resumed.server_optimizer))
    elif resumed is not None and checkpoint.has_optimizer_state(strategy):
        log.warning("the checkpoint holds no server-optimizer state for round %d: %s starts its optimizer afresh",
                    done, cfg.strategy.name)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score the global adapter, record the round, and checkpoint it (a crash loses at most one round)."""
        server_round += done
        if server_round == 0 and not cfg.eval.start:
            return None  # eval.start=false: the untrained start is scored by another job of the grid
        models.from_arrays(model, arrays)
        metrics = evaluate(model, test_sets, test_labels, cfg, tokenizer, references)
        if also_test and server_round in (0, cfg.num_rounds):
            metrics |= {f"test_{k}": v for k, v in evaluate(model, *also_test, cfg, tokenizer, test_references).items()}
        if server_round > done or done == 0:  # a resumed run's starting point is already recorded
            recorder.record_round(server_round, metrics)
        if server_round > done:
            state = checkpoint.optimizer_state(strategy) if checkpoint.has_optimizer_state(strategy) else None
            save_adapter(model, out_dir / "checkpoint", {"round": server_round, "run_key": run_key}, state)
        return MetricRecord(metrics)

    final = initial
    if done < cfg.num_rounds:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_rounds - done,
                                timeout=cfg.strategy.round_timeout, evaluate_fn=evaluate_global,
                                train_config=ConfigRecord({RUN_KEY: run_key, TRANSPORT_DTYPE: cfg.transport.dtype}))
        final = result.arrays if len(result.arrays) else initial  # empty: no round changed the adapter
    models.from_arrays(model, final)
    save_adapter(model, out_dir / "adapter", {"round": cfg.num_rounds, "run_key": run_key})
    log.info("done: metrics in %s, final adapter in %s", recorder.path, out_dir / "adapter")


def save_adapter(model, folder: Path, info: dict, optimizer_state: dict | None = None) -> None:
    """peft's save_pretrained (load it with PeftModel.from_pretrained on the same base model) + round info (+ the
    server optimizer's state), replacing `folder` as a whole: a crash mid-way leaves a complete checkpoint."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if optimizer_state is not None:
            checkpoint.save_optimizer_state(tmp, optimizer_state, info["round"])

    checkpoint.replace_checkpoint(folder, write, info)
