"""What privacy costs in time, memory and bandwidth, and what Flower costs: every figure a ratio measured
side by side in this one run (docs/PERFORMANCE.md).

    python scripts/bench.py --out bench.json            # the full suite (~28 min on a 2-core CPU)
    python scripts/bench.py --out bench.json --quick    # a reduced version (~2 min)
    python scripts/bench.py --out steps.json --skip-flower   # sections 1-3 only (~4 min)
    DPLORA_CACHE=0 python scripts/bench.py --out f.json --models   # sections 4-5 only, without the cache
    python scripts/bench.py --out llm.json --llm                # section 7 only, SmolLM2-135M-Instruct (~6 min)

1. step time: one DP-SGD step / the same step without DP (same model, batch, sequence length, data), for
   MiniLM classification and tiny-llama causal LM, per Opacus grad_sample_mode; interleaved repeats, medians.
2. memory: peak resident memory of a client's training with DP / without (each in a fresh process).
3. upload: bytes of the adapter a client sends per round / bytes of the full model's weights, for each wire
   format (transport.dtype fp32, fp16, int8), with LoRA and with FFA-LoRA (model.lora.train_a=false) of rank 8,
   and for the default (the DP recipe's adapter in its wire format: upload_fraction).
4. Flower overhead: wall time of `flwr run` (a local simulation) / the same training, aggregation and
   evaluation in a plain Python loop (a separate process, calling the same dplora functions).
5. round time vs number of sampled clients (fixed data per client), with a least-squares line.
6. padding: for FPB and SST-2 (../shared/data; the synthetic set where absent), token positions computed per
   real token, and training examples per second, with each Poisson batch computed as length-sorted
   micro-batches (the product) against one pass padded to the batch's longest example (before); the same
   batches for both (non-private, seeded), interleaved repeats; and the DP / non-private ratio of the
   micro-batched training.
7. LLM levers (--llm): DP and non-private training examples/s of a causal LM on FPB prompts for each lever
   (answer-only logits, micro-batches, LoRA on the top k layers only) against today's path, and DP / non-private.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import RecordDict

from dplora import client, config, data, models, transport
from dplora.config import TRANSPORT_DTYPES
from dplora.privacy import (
    GRAD_SAMPLE_MODES,
    PrivacyAccount,
    grad_sample_mode,
    mean_backward,
)
from dplora.evaluation import evaluate
from dplora.train import (
    device,
    make_optimizer,
    micro_batches,
    padded_tokens,
    sequence_losses,
    train_round,
    trim_padding,
)
from experiments import simulation

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
MODES = [m for m in GRAD_SAMPLE_MODES if m != "auto"]
MODELS = ("minilm", "tiny-llama")
HEADLINE = ("dp_step_ratio", "dp_memory_ratio", "upload_fraction", "flower_overhead_ratio")
# The measurements set their own batch sizes on config.yaml's values (LoRA with A trained), as docs/PERFORMANCE.md
# reports them; the training recipes (conf/recipe/) would set a sample rate and FFA-LoRA over them.
PLAIN = "recipe=plain"
PADDED = 10**6  # train.micro_batch_size that makes a batch one pass, padded to its longest example (before)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fpb_overrides() -> str:
    """FPB from ../shared/data when it is there, else the built-in synthetic set (said in the output)."""
    if (SHARED_DATA / "fpb" / "train.jsonl").is_file():
        return f"dataset=fpb dataset.path={SHARED_DATA / 'fpb'}"
    log(f"FPB not found under {SHARED_DATA}: using the synthetic dataset")
    return "dataset=synthetic"


# ------------------------------------------------------------------------------------ 1. step time

def fixed_batch(cfg, tokenizer, size: int) -> list[torch.Tensor]:
    """The first `size` training examples, tokenized, padding columns no example uses cut off (as in training)."""
    train_split = data.load_split(cfg.dataset, "train").select(range(size))
    return trim_padding(list(data.encode(train_split, tokenizer, cfg).tensors), device())


class Stepper:
    """One training step of one variant: `None` = no DP, else an Opacus grad_sample_mode."""

    def __init__(self, model, cfg, batch, mode: str | None, answer_logits_only: bool = True):
        self.cfg, self.batch, self.mode, self.answer_logits_only = cfg, batch, mode, answer_logits_only
        self.model = copy.deepcopy(model)
        optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg.train)
        self.backward = mean_backward
        self.module, self.optimizer = self.model, optimizer
        if mode is not None:  # the product's path: PrivacyAccount.make_private, at sigma=1 and q=1/16
            account = PrivacyAccount(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, accountant="prv",
                                     noise_multiplier=1.0, sample_rate=1 / 16, planned_steps=10**6)
            dataset = torch.utils.data.TensorDataset(torch.zeros(16 * len(batch[0])))
            self.module, self.optimizer, _, self.accountant, self.backward = account.make_private(
                self.model, optimizer, dataset, len(batch[0]), 1, mode)
        self.module.train()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(sequence_losses(self.module, self.batch, self.cfg.model.task, self.answer_logits_only))
        self.optimizer.step()


def step_times(model_name: str, overrides: str, batch_size: int, repeats: int, steps: int) -> dict:
    cfg = config.compose(f"{PLAIN} model={model_name} {overrides} train.batch_size={batch_size}")
    model, tokenizer = models.build_model(cfg, device())
    batch = fixed_batch(cfg, tokenizer, batch_size)
    variants: dict[str, Stepper | str] = {"non_private": Stepper(model, cfg, batch, None)}
    for mode in MODES:
        try:
            variants[mode] = Stepper(model, cfg, batch, mode)
            variants[mode].step()  # fails here if the mode cannot handle this model
        except Exception as err:  # noqa: BLE001 - a mode that does not work here is reported, not fatal
            variants[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if cfg.model.task == "causal_lm":  # what computing logits for the answer positions only saves
        variants["non_private_all_logits"] = Stepper(model, cfg, batch, None, answer_logits_only=False)
    runnable = {k: v for k, v in variants.items() if isinstance(v, Stepper)}
    for stepper in runnable.values():  # warm-up
        stepper.step()
    seconds: dict[str, list[float]] = {k: [] for k in runnable}
    for _ in range(repeats):  # interleaved, so that drift in the machine's speed hits every variant alike
        for name, stepper in runnable.items():
            start = time.perf_counter()
            for _ in range(steps):
                stepper.step()
            seconds[name].append((time.perf_counter() - start) / steps)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"batch_size": batch_size, "sequence_length": batch[0].shape[1], "repeats": repeats,
              "steps_per_repeat": steps, "seconds_per_step": median,
              "ratio": {m: median[m] / median["non_private"] for m in MODES if m in median},
              "failed_modes": {k: v for k, v in variants.items() if isinstance(v, str)}}
    result["best_mode"] = min(result["ratio"], key=result["ratio"].get)
    if "non_private_all_logits" in median:
        result["answer_logits_speedup"] = median["non_private_all_logits"] / median["non_private"]
    result["auto_mode"] = grad_sample_mode("auto")[0]
    return result


# ---------------------------------------------------------------------------------------- 2. memory

def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(model_name: str, overrides: str, batch_size: int, steps: int, mode: str) -> dict:
    """In a fresh process: peak memory while training `steps` steps (mode 'none' = no DP)."""
    cfg = config.compose(f"{PLAIN} model={model_name} {overrides} train.batch_size={batch_size}")
    model, tokenizer = models.build_model(cfg, device())
    batch = fixed_batch(cfg, tokenizer, batch_size)
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to now
            f.write("5")
        before = _rss_mb("VmRSS")
    stepper = Stepper(model, cfg, batch, None if mode == "none" else mode)
    for _ in range(steps):
        stepper.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device().type == "cuda" else _rss_mb("VmHWM")
    return {"peak_mb": peak, "before_training_mb": before}


def memory(model_name: str, overrides: str, batch_size: int, steps: int, mode: str) -> dict:
    def child(variant: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "experiments.bench", "_memory", model_name, overrides,
                              str(batch_size), str(steps), variant], capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"memory measurement failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    plain, private = child("none"), child(mode)
    return {"mode": mode, "non_private": plain, "private": private,
            "ratio": private["peak_mb"] / plain["peak_mb"],
            "training_ratio": ((private["peak_mb"] - private["before_training_mb"])
                               / max(plain["peak_mb"] - plain["before_training_mb"], 1e-9))}


# ---------------------------------------------------------------------------------------- 3. upload

def upload_bytes(cfg) -> dict:
    """Bytes of one reply's arrays (as the ArrayRecord carries them) in every wire format, for the adapter `cfg`
    builds, and the bytes of the model without the adapter. The update encoded is a real-sized random one."""
    model, _ = models.build_model(cfg, "cpu")
    full = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if "lora_" not in name and "modules_to_save" not in name)  # the model without the adapter
    start = models.adapter_state(model)
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in start.items()}
    sent = {dtype: transport.wire_bytes(transport.encode(trained, start, dtype)) for dtype in TRANSPORT_DTYPES}
    return {"upload_bytes": sent, "model_bytes": full, "fraction": {dtype: b / full for dtype, b in sent.items()},
            "tensors": len(start), "values": sum(v.numel() for v in start.values())}


def upload(model_name: str, overrides: str) -> dict:
    """Upload / full model for every wire format: LoRA r 8 and FFA-LoRA r 8 (recipe=plain's adapter, without and
    with A frozen), and what a user gets by default (the DP recipe's adapter in its wire format)."""
    result = {variant: upload_bytes(config.compose(f"{PLAIN} model={model_name} {overrides}{extra}"))
              for variant, extra in (("lora", ""), ("ffa", " model.lora.train_a=false"))}
    default = config.compose(f"model={model_name} {overrides}")  # what a user gets: the DP recipe
    sizes = upload_bytes(default)
    dtype = default.transport.dtype
    result["default"] = {"variant": "lora" if default.model.lora.train_a else "ffa", "rank": default.model.lora.r,
                         "dtype": dtype, "values": sizes["values"], "upload_bytes": sizes["upload_bytes"][dtype],
                         "fraction": sizes["fraction"][dtype]}
    return result


# -------------------------------------------------------------------------- 4-5. Flower vs a plain loop

def plain_loop_child(overrides: str, num_clients: int) -> dict:
    """The same rounds as the simulation, without Flower: clients train in turn, average, evaluate."""
    start = time.perf_counter()
    cfg = config.compose(f"{PLAIN} {overrides}")
    model, tokenizer = models.build_model(cfg, device())
    test_sets, test_labels = data.test_sets(cfg, tokenizer)
    evaluate(model, test_sets, test_labels, cfg)
    arrays, states, rounds = models.to_arrays(model), [RecordDict() for _ in range(num_clients)], []
    ledgers = tempfile.mkdtemp(prefix="dplora-plain-")  # the owners keep ledgers, as in the simulation
    nodes = [client.node_settings({"partition-id": i, "num-partitions": num_clients}, ledgers)
             for i in range(num_clients)]
    for server_round in range(1, cfg.num_rounds + 1):
        replies = [client.train(cfg, arrays, states[i], node_config=nodes[i], server_round=server_round,
                                run_key="plain") for i in range(num_clients)]
        tensors = [r["arrays"].to_torch_state_dict() for r in replies]
        average = {k: sum(t[k] for t in tensors) / len(tensors) for k in tensors[0]}  # uniform, as the server
        models.load_adapter_state(model, average)
        arrays = models.to_arrays(model)
        rounds.append(evaluate(model, test_sets, test_labels, cfg)["accuracy"])
    return {"seconds": time.perf_counter() - start, "accuracy": rounds}


def plain_loop(overrides: str, num_clients: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "experiments.bench", "_plain", overrides, str(num_clients)],
                         capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"plain loop failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flower_run(overrides: str, num_clients: int, env: dict, work: Path, name: str) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = simulation.flwr_run(overrides, work / name, num_clients, env)
    return time.perf_counter() - start, metrics


def round_seconds(metrics: dict) -> float:
    """The last round's wall time (metrics.json's `seconds` are cumulative from the ServerApp's start)."""
    rounds = metrics["rounds"]
    return rounds[-1]["seconds"] - rounds[-2]["seconds"]


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    slope, intercept = statistics.linear_regression(xs, ys)
    return {"seconds_per_client": slope, "intercept_seconds": intercept,
            "r_squared": statistics.correlation(xs, ys) ** 2}


# ------------------------------------------------------------------------------------------- 6. padding

def dataset_overrides(name: str) -> str:
    if (SHARED_DATA / name / "train.jsonl").is_file():
        return f"dataset={name} dataset.path={SHARED_DATA / name}"
    log(f"{name} not found under {SHARED_DATA}: using the synthetic dataset for it")
    return "dataset=synthetic"


def padding(name: str, quick: bool, micro: int | None = None) -> dict:
    """Tokens computed per real token, and examples per second, micro-batched vs padded, for one dataset.
    `micro`: examples per micro-batch (default: the product's train.micro_batch_size)."""
    batch, steps, repeats = (64, 2, 1) if quick else (64, 6, 3)
    cfg = config.compose(f"{PLAIN} {dataset_overrides(name)} train.batch_size={batch}")
    micro = micro or cfg.train.micro_batch_size
    model, tokenizer = models.build_model(cfg, device())
    train_split = data.load_split(cfg.dataset, "train")
    train_split = train_split.select(range(min(len(train_split), 20 * batch)))
    train_set = data.encode(train_split, tokenizer, cfg)
    q = batch / len(train_set)
    # token positions over 50 Poisson batches
    generator, computed, padded, real = torch.Generator().manual_seed(0), 0, 0, 0
    for _ in range(50):
        drawn = torch.rand(len(train_set), generator=generator) < q
        rows = [t[drawn] for t in train_set.tensors]
        real += int(rows[1].sum())
        padded += padded_tokens([trim_padding(rows, torch.device("cpu"))])
        computed += padded_tokens(micro_batches(rows, micro, torch.device("cpu")))
    start_state = models.adapter_state(model)
    seconds: dict[str, list[float]] = {"micro_batched": [], "padded": [], "dp_micro_batched": []}
    for repeat in range(repeats):  # interleaved
        for variant, times in seconds.items():
            private = variant.startswith("dp")
            run_cfg = config.compose(
                f"{PLAIN} {dataset_overrides(name)} train.batch_size={batch} train.sample_rate={q} "
                f"train.micro_batch_size={PADDED if variant == 'padded' else micro} "
                + ("" if private else "privacy=none"))
            models.load_adapter_state(model, start_state)
            account = PrivacyAccount.plan(run_cfg.privacy, q, steps)
            result = train_round(model, train_set, run_cfg, account, seed=repeat, steps=steps)
            times.append(result["seconds"] / (steps * batch))  # per expected example
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"dataset": cfg.dataset.name, "batch_size": batch, "micro_batch_size": micro, "steps": steps,
            "repeats": repeats, "real_tokens": real, "tokens_padded": padded, "tokens_micro_batched": computed,
            "tokens_computed_per_real_token": computed / real, "tokens_padded_per_real_token": padded / real,
            "examples_per_second": {k: 1 / v for k, v in median.items()},
            "train_speedup_vs_padded": median["padded"] / median["micro_batched"],
            "dp_ratio_micro_batched": median["dp_micro_batched"] / median["micro_batched"]}


# ------------------------------------------------------------------------------------- 7. LLM levers

LEVERS = {  # name -> (overrides, answer-only logits): today's causal-LM path first, then one lever changed each
    "baseline": ("", True),                       # answer-only logits, micro-batches of 16, LoRA on every layer
    "all_logits": ("", False),                    # logits at every position (the path before answer-only logits)
    "one_pass": (f"train.micro_batch_size={PADDED}", True),  # the batch in one pass, padded to its longest
    "micro_batch_4": ("train.micro_batch_size=4", True),
    "top_8_layers": ("model.lora.layers=8", True),
    "top_4_layers": ("model.lora.layers=4", True),
    "top_8_layers_micro_batch_4": ("model.lora.layers=8 train.micro_batch_size=4", True),  # two levers at once
}


def llm_levers(model_name: str, quick: bool, only: list[str] | None = None) -> dict:
    """Training examples/s of a causal LM on FPB prompts (../shared/data; synthetic where absent), non-private
    and DP, for each lever in LEVERS (or `only` those) against today's path (`baseline`, always measured);
    interleaved repeats, medians. The same Poisson batches (seeded) for every variant."""
    levers = {k: v for k, v in LEVERS.items() if only is None or k == "baseline" or k in only}
    batch, steps, repeats = (8, 1, 1) if quick else (16, 3, 2)
    fpb = fpb_overrides()
    base = f"{PLAIN} model={model_name} {fpb} train.batch_size={batch}"
    built: dict[str, tuple] = {}
    composed: dict[tuple[str, bool], object] = {}
    seconds: dict[str, list[float]] = {}
    first = 0 if quick else 1  # repeat 0 warms up every variant and is not counted (quick: no warm-up)
    architecture = config.compose(base).model.get("architecture") or {}
    count = architecture.get("num_hidden_layers") if architecture else None  # a tiny test model has 2 layers
    for repeat in range(1 - first, repeats + 1):
        for lever, (overrides, answer_only) in levers.items():
            layers = next((o for o in overrides.split() if o.startswith("model.lora.layers=")), "")
            others = " ".join(o for o in overrides.split() if o != layers)
            if layers:  # at most the model's own layer count
                layers = f"model.lora.layers={min(int(layers.split('=')[1]), count or 10**6)}"
            if layers not in built:
                cfg = config.compose(f"{base} {layers}")
                model, tokenizer = models.build_model(cfg, device())
                split = data.load_split(cfg.dataset, "train")
                built[layers] = (model, data.encode(split.select(range(min(len(split), 20 * batch))), tokenizer, cfg),
                                 models.adapter_state(model))
            model, train_set, start_state = built[layers]
            q = batch / len(train_set)
            for private in (False, True):
                if (lever, private) not in composed:
                    composed[lever, private] = config.compose(
                        f"{base} {layers} {others} train.sample_rate={q} "
                        + ("privacy.target_epsilon=8" if private else "privacy=none"))
                run_cfg = composed[lever, private]
                models.load_adapter_state(model, start_state)
                account = PrivacyAccount.plan(run_cfg.privacy, q, steps)
                result = train_round(model, train_set, run_cfg, account, seed=repeat, steps=steps,
                                     answer_logits_only=answer_only)
                if repeat:
                    seconds.setdefault(f"{'dp' if private else 'non_private'}:{lever}", []).append(
                        result["seconds"] / (steps * batch))
    rate = {k: 1 / statistics.median(v) for k, v in seconds.items()}
    out = {"model": model_name, "dataset": fpb.split()[0], "batch_size": batch, "steps": steps, "repeats": repeats,
           "examples_per_second": rate,
           "dp_ratio": {lever: rate[f"non_private:{lever}"] / rate[f"dp:{lever}"] for lever in levers},
           "dp_speedup_vs_baseline": {lever: rate[f"dp:{lever}"] / rate["dp:baseline"] for lever in levers}}
    log(f"  DP examples/s vs baseline {fmt(out['dp_speedup_vs_baseline'])}; DP / non-private {fmt(out['dp_ratio'])}")
    return out


def llm_evaluation(model_name: str, quick: bool) -> dict:
    """The server's scoring of a causal LM on FPB's first test sentences, side by side: each prompt read once for
    every candidate, its shared first tokens once for the whole split (`evaluate`'s default) against one pass
    per candidate (`shared_prompt=False`); seconds, the ratio, and that both score the same."""
    rows = 16 if quick else 64
    cfg = config.compose(f"{PLAIN} model={model_name} {fpb_overrides()}")
    model, tokenizer = models.build_model(cfg, device())
    sets, labels = data.test_sets(cfg, tokenizer, "test")
    sets = [torch.utils.data.TensorDataset(*(t[:rows] for t in s.tensors)) for s in sets]
    labels = labels[:rows]
    evaluate(model, [torch.utils.data.TensorDataset(*(t[:4] for t in s.tensors)) for s in sets], labels[:4], cfg)
    began = time.perf_counter()
    shared = evaluate(model, sets, labels, cfg)
    middle = time.perf_counter()
    separate = evaluate(model, sets, labels, cfg, shared_prompt=False)
    end = time.perf_counter()
    out = {"model": model_name, "rows": rows, "shared_seconds": middle - began, "separate_seconds": end - middle,
           "speedup": (end - middle) / (middle - began),
           "same_predictions": shared["accuracy"] == separate["accuracy"]
           and shared["exact_match"] == separate["exact_match"],
           "loss_relative_difference": abs(shared["loss"] - separate["loss"]) / abs(separate["loss"])}
    log(f"  scoring {rows} FPB test sentences: {out['shared_seconds']:.1f} s shared, {out['separate_seconds']:.1f} s "
        f"one pass per candidate ({out['speedup']:.2f}x)")
    return out


# ------------------------------------------------------------------------------------------- the suite

def upload_figures(result: dict, model_names: tuple[str, ...], fpb: str) -> None:
    """Section 3, and its headline figures: the default adapter and format; the default adapter by format."""
    for name in model_names:
        result["upload"][name] = upload(name, fpb)
    result["upload_fraction"] = max(r["default"]["fraction"] for r in result["upload"].values())
    result["upload_fraction_by_format"] = {
        dtype: max(r[r["default"]["variant"]]["fraction"][dtype] for r in result["upload"].values())
        for dtype in TRANSPORT_DTYPES}


def run(quick: bool, model_names: tuple[str, ...] = MODELS, flower: bool = True, micro: int | None = None,
        upload_only: bool = False) -> dict:
    fpb = fpb_overrides()
    if upload_only:
        result = {"quick": quick, "upload": {}}
        upload_figures(result, model_names, fpb)
        return result
    batch, repeats, steps = (16, 3, 1) if quick else (64, 7, 3)
    result: dict = {"quick": quick, "device": str(device()), "torch_threads": torch.get_num_threads(),
                    "cache": os.environ.get("DPLORA_CACHE", "1") != "0",
                    "step_time": {}, "memory": {}, "upload": {}}
    for name in model_names:
        log(f"step time: {name}, batch {batch}, {repeats} interleaved repeats of {steps} step(s)")
        result["step_time"][name] = step_times(name, fpb, batch, repeats, steps)
        log(f"  ratios {fmt(result['step_time'][name]['ratio'])}; failed {result['step_time'][name]['failed_modes']}")
    for name in model_names:
        mode = result["step_time"][name]["auto_mode"]
        log(f"memory: {name}, mode {mode} vs no DP (fresh processes)")
        result["memory"][name] = memory(name, fpb, batch, 2 if quick else 5, mode)
    upload_figures(result, model_names, fpb)
    if model_names:  # headline figures (targets in docs/PERFORMANCE.md): the worse model's where there are two
        result["dp_step_ratio"] = max(r["ratio"][r["best_mode"]] for r in result["step_time"].values())
        result["dp_memory_ratio"] = max(r["ratio"] for r in result["memory"].values())
    result["padding"] = {}
    for name in ("fpb", "sst2"):
        log(f"padding: {name}, micro-batched vs padded")
        result["padding"][name] = padding(name, quick, micro)
        r = result["padding"][name]
        log(f"  tokens computed / real {r['tokens_computed_per_real_token']:.2f} (padded "
            f"{r['tokens_padded_per_real_token']:.2f}); speedup {r['train_speedup_vs_padded']:.2f}x; "
            f"DP / non-private {r['dp_ratio_micro_batched']:.2f}x")
    result["tokens_computed_per_real_token"] = {k: r["tokens_computed_per_real_token"]
                                                for k, r in result["padding"].items()}
    result["train_speedup_vs_padded"] = {k: r["train_speedup_vs_padded"] for k, r in result["padding"].items()}
    if flower:
        result.update(flower_figures(quick, fpb))
    return result


def flower_figures(quick: bool, fpb: str) -> dict:
    """Sections 4 and 5: `flwr run` against a plain loop, and round time by number of clients."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="dplora-bench-") as tmp:
        work = Path(tmp)
        with simulation.local_superlink(work / "flwr_home") as env:
            if quick:  # tiny-llama on small synthetic data; the overhead run is also the 2-client point
                base = f"{PLAIN} model=tiny-llama dataset.num_test=40 train.local_epochs=1 train.batch_size=16"
                per_client, clients, overhead_clients = 32, [1, 2], 2
                overhead = f"{base} dataset.num_train={2 * per_client} num_rounds=2 strategy.min_clients=2"
            else:  # MiniLM on FPB, as users run it
                base = f"{PLAIN} dataset.num_test=200 train.local_epochs=1"
                per_client, clients, overhead_clients = 128, [2, 5, 10, 20], 5
                overhead = f"{PLAIN} {fpb} num_rounds=2"
            log(f"Flower overhead: `flwr run` with {overhead_clients} clients vs a plain loop: {overhead}")
            flwr_s, overhead_metrics = flower_run(overhead, overhead_clients, env, work, "overhead")
            plain = plain_loop(overhead, overhead_clients)
            result["flower_overhead"] = {"overrides": overhead, "clients": overhead_clients,
                                         "flower_seconds": flwr_s, "plain_seconds": plain["seconds"],
                                         "flower_accuracy": [r["accuracy"] for r in overhead_metrics["rounds"]],
                                         "plain_accuracy": plain["accuracy"]}
            log(f"  flwr run {flwr_s:.1f}s, plain loop {plain['seconds']:.1f}s")
            by_clients = {}
            for n in clients:
                overrides = (f"{base} dataset.num_train={n * per_client} num_rounds=2 "
                             f"strategy.min_clients={min(n, 2)}")
                if overrides == overhead:
                    metrics = overhead_metrics
                else:
                    log(f"round time: {n} clients x {per_client} examples")
                    _, metrics = flower_run(overrides, n, env, work, f"clients-{n}")
                by_clients[n] = round_seconds(metrics)
                log(f"  {n} clients: {by_clients[n]:.1f}s per round")
    result["round_time_by_clients"] = {str(n): s for n, s in by_clients.items()}
    result["round_time_fit"] = linear_fit([float(n) for n in by_clients], list(by_clients.values()))
    result["round_time_fit"]["examples_per_client"] = per_client
    result["flower_overhead_ratio"] = flwr_s / plain["seconds"]
    return result


def fmt(ratios: dict) -> str:
    return ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())


def table(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for name, r in result.get("step_time", {}).items():
        lines.append(f"| DP step time / non-private, {name} (batch {r['batch_size']}, {r['sequence_length']} tokens) "
                     f"| {fmt(r['ratio'])}; best: {r['best_mode']} |")
        if "answer_logits_speedup" in r:
            lines.append(f"| step time with all logits / answer logits only, {name} (non-private) "
                         f"| {r['answer_logits_speedup']:.2f}x |")
    for name, r in result.get("memory", {}).items():
        lines.append(f"| DP peak memory / non-private, {name} ({r['mode']}) | {r['ratio']:.3f}x "
                     f"({r['private']['peak_mb']:.0f} vs {r['non_private']['peak_mb']:.0f} MB; "
                     f"training's own: {r['training_ratio']:.2f}x) |")
    for name, r in result.get("upload", {}).items():
        for variant, label in (("lora", "LoRA"), ("ffa", "FFA-LoRA")):
            v = r[variant]
            sizes = ", ".join(f"{d} {100 * v['fraction'][d]:.3f}% ({v['upload_bytes'][d] / 1e3:.0f} kB)"
                              for d in TRANSPORT_DTYPES)
            lines.append(f"| upload / full model ({v['model_bytes'] / 1e6:.1f} MB), {name}, {label} r 8 | {sizes} |")
        d = r["default"]
        lines.append(f"| upload / full model, {name}, the default (DP recipe: {d['variant']} r {d['rank']}, "
                     f"{d['dtype']}) | {100 * d['fraction']:.3f}% ({d['upload_bytes'] / 1e3:.0f} kB) |")
    if "flower_overhead" in result:
        o, fit = result["flower_overhead"], result["round_time_fit"]
        lines.append(f"| `flwr run` / plain loop ({o['clients']} clients) | {result['flower_overhead_ratio']:.3f}x "
                     f"({o['flower_seconds']:.1f} vs {o['plain_seconds']:.1f} s) |")
        times = ", ".join(f"{n}: {s:.1f}s" for n, s in result["round_time_by_clients"].items())
        lines.append(f"| round time by clients | {times}; {fit['seconds_per_client']:.2f} s/client + "
                     f"{fit['intercept_seconds']:.1f} s, R^2 {fit['r_squared']:.3f} |")
    for name, r in result.get("padding", {}).items():
        lines.append(f"| {name}: token positions computed / real tokens | {r['tokens_computed_per_real_token']:.2f} "
                     f"micro-batched, {r['tokens_padded_per_real_token']:.2f} padded |")
        lines.append(f"| {name}: training examples/s, micro-batched / padded | {r['train_speedup_vs_padded']:.2f}x; "
                     f"DP / non-private (micro-batched) {r['dp_ratio_micro_batched']:.2f}x |")
    if "llm_levers" in result:
        r = result["llm_levers"]
        for lever in r["dp_ratio"]:
            lines.append(f"| {r['model']}, {lever}: examples/s non-private / DP | "
                         f"{r['examples_per_second']['non_private:' + lever]:.2f} / "
                         f"{r['examples_per_second']['dp:' + lever]:.2f}; DP {r['dp_speedup_vs_baseline'][lever]:.2f}x "
                         f"baseline's; DP / non-private step {r['dp_ratio'][lever]:.2f}x |")
    if "llm_evaluation" in result:
        r = result["llm_evaluation"]
        lines.append(f"| {r['model']}, scoring {r['rows']} test sentences: shared prompt / one pass per candidate | "
                     f"{r['shared_seconds']:.1f} s / {r['separate_seconds']:.1f} s ({r['speedup']:.2f}x), same "
                     f"predictions: {r['same_predictions']} |")
    lines.append("| headline | " + ", ".join(f"{k} {result[k]:.5g}" for k in HEADLINE if k in result) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":  # child processes
        name, overrides, batch, steps, mode = sys.argv[2:]
        print(json.dumps(memory_child(name, overrides, int(batch), int(steps), mode)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        print(json.dumps(plain_loop_child(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a reduced version (~2 min)")
    parser.add_argument("--skip-flower", action="store_true", help="sections 1-3 only (no Flower runs)")
    parser.add_argument("--upload-only", action="store_true", help="section 3 only (bytes on the wire; seconds)")
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS),
                        help="models for the step-time, memory and upload figures (default: both; "
                             "none: the Flower figures only)")
    parser.add_argument("--llm", nargs="?", const="smollm2-135m-instruct", default=None, metavar="MODEL",
                        help="section 7 only: the LLM levers on a causal LM (default smollm2-135m-instruct; ~5 min)")
    parser.add_argument("--levers", nargs="+", choices=[k for k in LEVERS if k != "baseline"], default=None,
                        help="with --llm: only these levers (beside the baseline, always measured)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="examples per micro-batch in the padding figures (default: train.micro_batch_size)")
    args = parser.parse_args()
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error("--micro-batch-size must be >= 1")
    if args.levers and not args.llm:
        parser.error("--levers picks LLM levers: use it with --llm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.llm:
        log(f"LLM levers: {args.llm}")
        result = {"quick": args.quick, "llm_evaluation": llm_evaluation(args.llm, args.quick),
                  "llm_levers": llm_levers(args.llm, args.quick, args.levers)}
    else:
        result = run(args.quick, tuple(args.models), flower=not args.skip_flower, micro=args.micro_batch_size,
                     upload_only=args.upload_only)
    result["seconds"] = time.perf_counter() - start
    bad = [k for k in HEADLINE if k in result and not (math.isfinite(result[k]) and result[k] > 0)]
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    log(f"wrote {args.out} in {result['seconds']:.0f}s")
    if bad:
        sys.exit(f"non-finite or non-positive figures: {bad}")


if __name__ == "__main__":  # scripts/bench.py; also `python -m experiments.bench _memory|_plain ...` (children)
    main()
