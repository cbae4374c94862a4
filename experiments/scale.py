"""What many owners cost: the server's work per reply, its memory, and a round's wall time, as owners grow.

    python scripts/scale.py --out docs/results/scale.json [--quick] [--skip-rounds] [--owners 10 50 100 200]

1. The server's work (no Flower runtime: the product's strategy called as Flower calls it). For each adapter
   (ADAPTERS: MiniLM's, as the default DP recipe trains it, and an LLM-sized one, LoRA rank 16 on q, k, v and o of
   Qwen2.5-0.5B's 24 layers, random weights), each aggregator (FedAvg, FedMedian, Krum) and N replies: N honest
   replies of one DP round (each an adapter moved by a random update, the plan's privacy record) go through
   server_app/strategy.build_strategy's aggregate_train: screening and decoding, re-derived epsilons, update norms
   and their bound, the guard, the aggregator. Seconds (the best of `repeats`), seconds per reply, the aggregator's
   own share (Flower's aggregator alone on the same replies, weights set), and the peak resident memory above what
   the N replies themselves hold (the peak is reset first: /proc/self/clear_refs), against their size.
   With train.sample_rate=null (the default: each owner's q is the batch over its public size), owners of
   different sizes send different rates: the server's per-reply cost for RATES_OWNERS such owners, rounds 1 and 2.
2. A round's wall time: `flwr run` simulations of the tiny causal LM, every owner PER_OWNER synthetic records, for
   N owners all sampled (strategy.fraction_train=1) and a tenth of them (0.1); the second round's seconds, per
   sampled owner.

3. A round's upload: the bytes one reply carries in each wire format (fp32, fp16, int8) for each adapter, times N.

The JSON holds `server_seconds_per_reply` and `round_seconds_per_owner` (objects keyed by N: FedAvg with the
project's screening, MiniLM's adapter, every owner sampled), `server` and `rounds` (every measurement) and `fits`:
for each series the exponent k of seconds ~ N^k (least squares on log-log: 1 is linear, 2 quadratic). A fit's
exponent for the time per reply near 0 is flat; `bytes_per_round` per adapter. Docs: docs/PERFORMANCE.md, section 8.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dplora import config, models, privacy, transport
from dplora.config import TRANSPORT_DTYPES
from dplora.privacy import steps_per_round
from dplora.results import RunRecorder, write_json
from experiments import simulation
from experiments.bench import _rss_mb, round_seconds

OWNERS = (10, 50, 100, 200)
QUICK_OWNERS = (4, 8)
STRATEGIES = ("fedavg", "fedmedian", "krum")
ADAPTERS = {  # name -> (overrides that build a model with that adapter, what it stands for)
    "minilm": ("model=minilm", "MiniLM's adapter as the default DP recipe trains it"),
    "llm": ("model=tiny-llama model.architecture.hidden_size=896 model.architecture.num_hidden_layers=24 "
            "model.architecture.num_attention_heads=14 model.architecture.num_key_value_heads=2 "
            "model.architecture.intermediate_size=64 model.lora.r=16 model.lora.alpha=32 model.lora.train_a=true",
            "Qwen2.5-0.5B's attention shapes (24 layers, hidden 896, 14 heads, 2 KV heads), LoRA r 16 on q, k, v, o "
            "(the MLP width, which no adapter touches, kept small)"),
    "tiny": ("model=tiny-llama", "the tiny test model's adapter (--quick)"),
}
# the round's public plan, 10 steps a round; the server-cost replies are fp32 adapters (the costliest to decode)
PLAN = "train.sample_rate=0.1 train.local_epochs=1 num_rounds=4 transport.dtype=fp32"
PER_OWNER_PLAN = "train.sample_rate=null train.batch_size=16 train.local_epochs=1 num_rounds=4 transport.dtype=fp32"
RATES_OWNERS = 10  # owners with distinct sample rates (each costs the server an accountant evaluation)
PER_OWNER = 16  # records per owner in the round-time simulations
ROUND_BASE = ("model=tiny-llama train.local_epochs=1 train.sample_rate=0.25 train.batch_size=null "
              "dataset.num_test=20 num_rounds=2 eval.start=false")


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def bytes_per_round(layout: dict[str, tuple[int, ...]], owners: tuple[int, ...]) -> dict:
    """Bytes one reply carries in each wire format (transport.encode of a real-sized random update, as the
    ArrayRecord holds it), and a round's upload for N owners: N replies."""
    start = {k: torch.zeros(shape) for k, shape in layout.items()}
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in start.items()}
    per_reply = {dtype: transport.wire_bytes(transport.encode(trained, start, dtype)) for dtype in TRANSPORT_DTYPES}
    return {"per_reply": per_reply, "per_round": {str(n): {d: b * n for d, b in per_reply.items()} for n in owners}}


def adapter_layout(name: str) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the adapter an owner sends (models.adapter_state of the configured model)."""
    cfg = config.compose(f"{ADAPTERS[name][0]} {PLAN}")
    model, _ = models.build_model(cfg, "cpu")
    layout = {k: tuple(v.shape) for k, v in models.adapter_state(model).items()}
    del model
    gc.collect()
    return layout


# ------------------------------------------------------------------------------------ 1. the server's work

def _identity() -> None:
    """Messages need the identity of a running task; outside a Flower run this measurement provides one."""
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def privacy_record(cfg, q: float, server_round: int) -> dict:
    """An honest owner's privacy record after `server_round` rounds at sample rate q (its own calibration)."""
    per_round = steps_per_round(q, cfg.train.local_epochs)
    sigma = privacy.PrivacyAccount.plan(cfg.privacy, q, cfg.num_rounds * per_round).noise_multiplier
    steps = server_round * per_round
    return {"epsilon": privacy.epsilon(sigma, q, steps, cfg.privacy.delta, cfg.privacy.accountant),
            "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": cfg.privacy.delta}


def honest_replies(cfg, reference: dict[str, np.ndarray], n: int, records: list[dict] | None = None,
                   seed: int = 0) -> list:
    """N replies as honest owners send them: the adapter moved by a random update (norm 0.1), and the privacy
    record (`records[i]` for owner i; default: round 1 at the run's sample rate, for all)."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    records = records or [privacy_record(cfg, float(cfg.train.sample_rate), 1)] * n
    rng = np.random.default_rng(seed)
    scale = 0.1 / math.sqrt(sum(a.size for a in reference.values()))
    replies = []
    for node, record in zip(range(1, n + 1), records, strict=True):
        arrays = ArrayRecord({k: Array((a + scale * rng.standard_normal(a.shape)).astype(np.float32))
                              for k, a in reference.items()})
        request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(record)}), reply_to=request))
    return replies


def per_owner_rates_cost(layout: dict[str, tuple[int, ...]], n: int) -> dict:
    """train.sample_rate=null (the default: q = batch / the owner's public size): owners of N different sizes
    send N different sample rates, and the server checks each one's noise multiplier against the plan's for its
    q (a calibration, remembered on disk: dplora/calibration.py) and re-derives its epsilon every round. Seconds
    per reply in round 1 and in round 2 (the owners' own calibrations are done before the clock starts)."""
    from flwr.app import Array, ArrayRecord
    from server_app.strategy import build_strategy
    _identity()
    cfg = config.compose(f"{PER_OWNER_PLAN} strategy=fedavg strategy.min_clients=2")
    rates = [cfg.train.batch_size / (160 + 7 * i) for i in range(n)]  # owners of 160, 167, ... records
    reference = {k: np.zeros(s, np.float32) for k, s in layout.items()}
    result = {"replies": n, "distinct_sample_rates": len(set(rates))}
    with tempfile.TemporaryDirectory(prefix="dplora-scale-") as tmp:
        server = build_strategy(cfg, RunRecorder(Path(tmp), {}, cfg.num_rounds, "scale"),
                                ArrayRecord({k: Array(v) for k, v in reference.items()}))
        for server_round in (1, 2):
            replies = honest_replies(cfg, reference, n, [privacy_record(cfg, q, server_round) for q in rates])
            began = time.perf_counter()
            arrays, _ = server.aggregate_train(server_round, replies)
            seconds = time.perf_counter() - began
            if arrays is None:
                raise RuntimeError(f"round {server_round}: {n} honest replies did not aggregate")
            result[f"round_{server_round}_seconds_per_reply"] = seconds / n
    return result


def server_cost(layout: dict[str, tuple[int, ...]], strategy: str, n: int, repeats: int) -> dict:
    """One aggregate_train of N honest replies through the product's server strategy (best of `repeats`), the
    aggregator alone on the same replies, and the peak memory above the replies' own."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from server_app.influence import WEIGHT
    from server_app.strategy import build_aggregator, build_strategy
    _identity()
    cfg = config.compose(f"{PLAN} strategy={strategy} strategy.min_clients=2")
    rng = np.random.default_rng(1)
    reference = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in layout.items()}
    best, aggregator_best, extra_mb = math.inf, math.inf, 0.0
    replies_mb = n * sum(a.nbytes for a in reference.values()) / 2**20
    with tempfile.TemporaryDirectory(prefix="dplora-scale-") as tmp:
        for _ in range(repeats):
            replies = honest_replies(cfg, reference, n)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to now
                f.write("5")
            before = _rss_mb("VmRSS")
            server = build_strategy(cfg, RunRecorder(Path(tmp), {}, cfg.num_rounds, "scale"),
                                    ArrayRecord({k: Array(v) for k, v in reference.items()}))
            began = time.perf_counter()
            arrays, _ = server.aggregate_train(1, replies)
            best = min(best, time.perf_counter() - began)
            extra_mb = max(extra_mb, _rss_mb("VmHWM") - before)
            if arrays is None:
                raise RuntimeError(f"{strategy}: {n} honest replies did not aggregate")
            del replies, server, arrays
            # What the aggregator sees, fresh (FedMedian and Krum pop the arrays of the replies they aggregate):
            # the screened adapter, an equal weight.
            replies = honest_replies(cfg, reference, n)
            for msg in replies:
                msg.content = RecordDict({"arrays": msg.content["arrays"],
                                          "metrics": MetricRecord({WEIGHT: 1, "epsilon": 1.0})})
            aggregator = build_aggregator(cfg)
            began = time.perf_counter()
            aggregator.aggregate_train(1, replies)
            aggregator_best = min(aggregator_best, time.perf_counter() - began)
            del replies
    return {"replies": n, "seconds": best, "seconds_per_reply": best / n, "aggregator_seconds": aggregator_best,
            "duties_seconds_per_reply": max(best - aggregator_best, 0.0) / n,
            "replies_mb": replies_mb, "peak_extra_mb": extra_mb, "peak_extra_over_replies": extra_mb / replies_mb}


def exponent(points: dict[int, float]) -> float | None:
    """k in value ~ N^k, least squares on log-log (None with fewer than two points)."""
    xs, ys = [math.log(n) for n in points], [math.log(max(v, 1e-12)) for v in points.values()]
    return statistics.linear_regression(xs, ys)[0] if len(xs) >= 2 else None


# ------------------------------------------------------------------------------------- 2. a round's time

def round_times(owners: tuple[int, ...], fractions: tuple[float, ...]) -> list[dict]:
    """`flwr run` simulations: the second round's seconds for N owners of PER_OWNER records, a fraction sampled."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dplora-scale-") as tmp, \
            simulation.local_superlink(Path(tmp) / "flwr_home") as env:
        for n in owners:
            for fraction in fractions:
                sampled = max(2, round(fraction * n))
                overrides = (f"{ROUND_BASE} dataset.num_train={n * PER_OWNER} strategy.fraction_train={fraction} "
                             f"strategy.min_clients={sampled}")
                log(f"round time: {n} owners x {PER_OWNER} records, fraction {fraction} ({sampled} sampled)")
                began = time.perf_counter()
                metrics = simulation.flwr_run(overrides, Path(tmp) / f"owners-{n}-{fraction}", n, env)
                seconds = round_seconds(metrics)
                trained = len(metrics["rounds"][-1]["clients"])
                rows.append({"owners": n, "fraction_train": fraction, "sampled": trained, "round_seconds": seconds,
                             "seconds_per_sampled_owner": seconds / max(trained, 1),
                             "run_seconds": time.perf_counter() - began, "overrides": overrides})
                log(f"  {seconds:.1f}s per round, {trained} trained")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--quick", action="store_true", help="the tiny adapter, 4 and 8 owners (about a minute)")
    parser.add_argument("--owners", nargs="+", type=int, default=None, help=f"numbers of owners (default {OWNERS})")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--adapters", nargs="+", choices=list(ADAPTERS), default=None,
                        help="adapters for the server's work (default: minilm llm; --quick: tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per server measurement (the best counts)")
    parser.add_argument("--rates-owners", type=int, default=None,
                        help=f"owners with distinct sample rates (default {RATES_OWNERS}; --quick 3; 0: skip)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1],
                        help="strategy.fraction_train values of the round-time runs (default 1.0 0.1)")
    parser.add_argument("--skip-rounds", action="store_true", help="the server's work only (no Flower runs)")
    args = parser.parse_args(argv)
    owners = tuple(args.owners or (QUICK_OWNERS if args.quick else OWNERS))
    if any(n < 2 for n in owners) or args.repeats < 1 or not all(0 < f <= 1 for f in args.fractions):
        parser.error("every --owners value must be at least 2 (min_clients), --repeats at least 1 and every "
                     "--fractions value in (0, 1]")
    adapters = args.adapters or (["tiny"] if args.quick else ["minilm", "llm"])
    if args.rates_owners is None:
        args.rates_owners = 3 if args.quick else RATES_OWNERS
    if args.rates_owners == 1 or args.rates_owners < 0:
        parser.error("--rates-owners must be 0 (skip) or at least 2")
    result = {"settings": {"owners": list(owners), "strategies": args.strategies, "adapters": {
        a: {"overrides": ADAPTERS[a][0], "what": ADAPTERS[a][1]} for a in adapters}, "plan": PLAN,
        "repeats": args.repeats, "per_owner_records": PER_OWNER, "round_base": ROUND_BASE,
        "command": " ".join(["python scripts/scale.py", *(argv if argv is not None else sys.argv[1:])])},
        "server": [], "rounds": [], "fits": {}, "bytes_per_round": {}}
    for adapter in adapters:
        layout = adapter_layout(adapter)
        coordinates = sum(math.prod(s) for s in layout.values())
        log(f"adapter {adapter}: {len(layout)} tensors, {coordinates:,} coordinates")
        result["bytes_per_round"][adapter] = bytes_per_round(layout, owners)
        for strategy in args.strategies:
            server_cost(layout, strategy, 2, 1)  # warm-up: imports, the plan's first epsilon
            series = {}
            for n in owners:
                row = {"adapter": adapter, "coordinates": coordinates, "strategy": strategy} | server_cost(
                    layout, strategy, n, 1 if strategy == "krum" and n * coordinates > 5e7 else args.repeats)
                result["server"].append(row)
                series[n] = row
                log(f"  {strategy}, {n} replies: {row['seconds']:.3f}s ({1e3 * row['seconds_per_reply']:.2f} ms "
                    f"a reply, aggregator {row['aggregator_seconds']:.3f}s), peak +{row['peak_extra_mb']:.0f} MB "
                    f"over {row['replies_mb']:.0f} MB of replies")
            result["fits"][f"server/{adapter}/{strategy}"] = {
                "seconds_exponent": exponent({n: r["seconds"] for n, r in series.items()}),
                "duties_per_reply_exponent": exponent({n: r["duties_seconds_per_reply"] for n, r in series.items()}),
                "peak_extra_exponent": exponent({n: r["peak_extra_mb"] for n, r in series.items()})}
    if args.rates_owners:
        result["per_owner_sample_rates"] = per_owner_rates_cost(adapter_layout("tiny"), args.rates_owners)
        log(f"per-owner sample rates: {result['per_owner_sample_rates']}")
    main_adapter = "minilm" if "minilm" in adapters else adapters[0]
    result["server_seconds_per_reply"] = {str(r["replies"]): r["seconds_per_reply"] for r in result["server"]
                                          if r["adapter"] == main_adapter and r["strategy"] == "fedavg"}
    if not args.skip_rounds:
        result["rounds"] = round_times(owners, tuple(args.fractions))
        for fraction in args.fractions:
            rows = [r for r in result["rounds"] if r["fraction_train"] == fraction]
            result["fits"][f"rounds/fraction {fraction}"] = {
                "round_seconds_exponent": exponent({r["sampled"]: r["round_seconds"] for r in rows})}
        result["round_seconds_per_owner"] = {str(r["owners"]): r["seconds_per_sampled_owner"]
                                             for r in result["rounds"] if r["fraction_train"] == 1.0}
    write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0
