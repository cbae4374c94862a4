"""ServerApp: compose the config, build the initial adapter, run AdapterFedAvg, write results."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from dplora import config, data, models
from dplora.results import RunRecorder, write_json
from dplora.train import device, evaluate
from server_app.strategy import AdapterFedAvg

log = logging.getLogger("flwr.dplora.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config.compose(context.run_config["overrides"])
    out_dir = Path(str(context.run_config["output-dir"])).expanduser().resolve()
    log.info("results go to %s", out_dir)

    model, tokenizer = models.build_model(cfg, device())
    test_sets, test_labels = data.test_sets(cfg, tokenizer)
    trainable, total = models.num_parameters(model)
    log.info("model %s: %d of %d parameters train (%.3f%%); test split: %d examples", cfg.model.name,
             trainable, total, 100 * trainable / total, len(test_labels))
    recorder = RunRecorder(out_dir, config.to_dict(cfg), cfg.num_rounds)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.from_arrays(model, arrays)
        metrics = evaluate(model, test_sets, test_labels, cfg)
        recorder.record_round(server_round, metrics)
        if server_round > 0:  # the latest round's adapter, so that a crash loses at most one round
            save_adapter(model, out_dir / "checkpoint", {"round": server_round})
        return MetricRecord(metrics)

    initial_arrays = models.to_arrays(model)
    strategy = AdapterFedAvg(recorder, initial_arrays, fraction_train=cfg.strategy.fraction_train,
                             min_train_nodes=cfg.strategy.min_clients,
                             min_available_nodes=cfg.strategy.min_clients)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays, num_rounds=cfg.num_rounds,
                            timeout=cfg.strategy.round_timeout, train_config=ConfigRecord(),
                            evaluate_fn=evaluate_global)
    models.from_arrays(model, result.arrays)
    save_adapter(model, out_dir / "adapter", {"round": cfg.num_rounds})
    log.info("done: metrics in %s, final adapter in %s", recorder.path, out_dir / "adapter")


def save_adapter(model, folder: Path, info: dict) -> None:
    """peft's save_pretrained (load it with PeftModel.from_pretrained on the same base model) + round info."""
    model.save_pretrained(folder)
    write_json(folder / "round.json", info)
