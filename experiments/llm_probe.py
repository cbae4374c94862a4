"""A one-owner learning-rate probe for the LLM recipes, on FPB's validation split (docs/RESULTS.md, "The LLM").

    python scripts/llm_probe.py OUT.json [--steps 20] [--trials dp:0.03 none:0.01] [--set OVERRIDE ...]
                                 (resumable: trials recorded in OUT.json are not run again)

SmolLM2-135M-Instruct on the LLM DP recipe's settings (conf/recipe/llm-dp.yaml) with the adapter the probe's
records used, FFA-LoRA r 8 on the top 8 layers (the recipes later moved to r 4 on all 30: docs/RESULTS.md),
q = 0.1, FPB's 1,000-sentence subsample with its 20% validation split carved off, owner 0 of 5 (160 records):
`--steps` steps (20: the recipe's two rounds) from the untrained adapter, DP at epsilon 8 (calibrated for those
steps) or non-private, for each (arm, learning rate) in TRIALS (or --trials); then label-likelihood accuracy and
exact match on the 200 validation sentences. `--set` adds config overrides to every trial (e.g.
`dataset.max_train=null train.sample_rate=0.1`: all of FPB's training split, 620 records per owner, expected
batches of 62). One owner alone is a pessimistic stand-in for five averaged (their DP noise averages down): it
ranks learning rates, it does not measure the federation. ~2.5 min per trial on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dplora import config, data, models
from dplora.evaluation import evaluate
from dplora.privacy import PrivacyAccount
from dplora.train import train_round

DATA = Path(os.environ.get("DPLORA_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
BASE = ("model=smollm2-135m-instruct recipe=llm-dp dataset=fpb dataset.max_train=1000 dataset.validation_fraction=0.2 "
        "eval.split=validation model.lora.r=8 model.lora.alpha=16 model.lora.layers=8")  # the adapter its records used
TRIALS = [("dp", 0.01), ("dp", 0.03), ("none", 0.01), ("none", 0.03), ("dp", 0.1), ("none", 0.003)]
STEPS = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON record (read first: recorded trials are skipped)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per trial (default {STEPS})")
    parser.add_argument("--trials", nargs="*", default=None, help="ARM:LR pairs, ARM dp or none (default: TRIALS)")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                        help="config overrides for every trial, e.g. train.sample_rate=0.2 dataset.max_train=null")
    args = parser.parse_args(argv)
    try:
        trials = TRIALS if args.trials is None else [(a, float(lr)) for a, lr in (t.split(":") for t in args.trials)]
    except ValueError:
        parser.error("--trials takes ARM:LR pairs, e.g. dp:0.03 none:0.01")
    if args.steps < 1 or any(a not in ("dp", "none") or lr <= 0 for a, lr in trials):
        parser.error("--steps must be >= 1; each trial is dp:LR or none:LR with LR > 0")
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    extra = " ".join(args.set)
    done = {(r["arm"], r["lr"], r["steps"], r.get("overrides", "")) for r in results}
    base = f"{BASE} data_dir={DATA} {extra}".strip()
    try:
        cfg0 = config.compose(base)
    except config.ConfigError as err:
        parser.error(f"--set: {err}")
    model, tokenizer = models.build_model(cfg0)
    start = models.adapter_state(model)
    validation = data.load_split(cfg0.dataset, "validation")
    sets = [data.encode(validation, tokenizer, cfg0, answer=k) for k in range(len(cfg0.dataset.label_names))]
    labels = torch.tensor(validation["label"])
    train_set = data.encode(data.client_partition(cfg0, 0, 5)[0], tokenizer, cfg0)
    for arm, lr in trials:
        if (arm, lr, args.steps, extra) in done:
            continue
        cfg = config.compose(f"{base} train.learning_rate={lr}" + (" privacy=none" if arm == "none" else ""))
        cfg.train.batch_size = round(cfg.train.sample_rate * len(train_set))
        models.load_adapter_state(model, start)
        account = PrivacyAccount.plan(cfg.privacy, cfg.train.sample_rate, args.steps)
        began = time.perf_counter()
        train_round(model.train(), train_set, cfg, account, seed=0, steps=args.steps)
        results.append({"arm": arm, "lr": lr, "steps": args.steps, "overrides": extra, "owner_records": len(train_set),
                        "expected_batch": cfg.train.batch_size, "noise_multiplier": account.noise_multiplier,
                        "epsilon": account.epsilon(), "validation": evaluate(model, sets, labels, cfg),
                        "seconds": time.perf_counter() - began})
        print(json.dumps(results[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
