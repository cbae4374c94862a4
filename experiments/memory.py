"""Does a long run's memory stay flat? The peak resident memory of one process that plays every data owner
for many rounds, as a simulation's ClientApp worker does (docs/PERFORMANCE.md, "Memory over a long run").

    python scripts/memory.py --out memory.json                 # MiniLM, FPB, 5 owners, epsilon 8, 20 rounds
    python scripts/memory.py --out memory.json --quick         # tiny-llama on the synthetic set, 20 rounds
    python scripts/memory.py --out memory.json --flower        # the same as a real `flwr run` simulation
    python scripts/memory.py --out memory.json --rounds 30 -- dataset=sst2 dataset.max_train=2000

In-process (default): each round, every owner trains through `dplora.client.train` (the function the ClientApp
calls, with its process-wide model and data cache), the server's strategy (server_app.strategy.build_strategy)
screens and averages the replies, and the global adapter is evaluated, all in this one process. The peak
resident set (VmHWM, reset at the start of each round) is recorded per round, with the live Python objects'
count.

--flower: a real `flwr run` simulation on a local SuperLink; the resident memory of its ClientApp worker
processes (Ray's ClientAppActor) is sampled every 0.2 s and each sample is counted in the round that
metrics.json says is running; per round, the largest worker's peak and the workers' summed peak.

The JSON has one row per round and `growth_after_round_2`: the largest round's peak after round 2 over round
2's, minus 1 (the target is <= 0.05).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from dplora import client, config, data, models
from dplora.results import RunRecorder
from dplora.evaluation import evaluate
from dplora.train import device
from experiments import simulation
from server_app.strategy import build_strategy

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def rss_mb(field: str, pid: int | str = "self") -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def flower_curve(overrides: str, owners: int, rounds: int, out: Path) -> list[dict]:
    """Per-round peak resident memory of a real simulation's ClientApp workers (see the module docstring)."""
    run_dir = out.with_suffix(".run")
    metrics_path, done = run_dir / "metrics.json", {}
    with tempfile.TemporaryDirectory(prefix="dplora-memory-") as home, \
            simulation.local_superlink(Path(home)) as env:
        superlink = int(env["DPLORA_SUPERLINK_PID"])
        runner = threading.Thread(target=lambda: done.update(metrics=simulation.flwr_run(
            overrides, run_dir, owners, env, timeout=24 * 3600)), daemon=True)
        runner.start()
        peaks: dict[int, dict] = {}
        while runner.is_alive():
            try:
                finished = len(json.loads(metrics_path.read_text())["rounds"]) if metrics_path.is_file() else 0
            except (OSError, ValueError):  # being rewritten
                finished = None
            workers = []
            for pid in simulation.descendants(superlink, "ClientAppActor"):
                try:
                    workers.append(rss_mb("VmRSS", pid))
                except (OSError, RuntimeError):
                    continue
            if finished is not None and finished < rounds and workers:
                row = peaks.setdefault(finished + 1, {"round": finished + 1, "peak_mb": 0.0, "sum_peak_mb": 0.0,
                                                      "workers": 0})
                row["peak_mb"] = max(row["peak_mb"], max(workers))
                row["sum_peak_mb"] = max(row["sum_peak_mb"], sum(workers))
                row["workers"] = max(row["workers"], len(workers))
            time.sleep(0.2)
        runner.join()
    if "metrics" not in done:
        raise SystemExit(f"the simulation failed; see {run_dir / 'flwr.log'}")
    accuracy = {r["round"]: r["accuracy"] for r in done["metrics"]["rounds"]}
    rows = [peaks[r] | {"accuracy": accuracy.get(r)} for r in sorted(peaks)]
    for row in rows:
        print(f"[memory] round {row['round']}/{rounds}: largest worker {row['peak_mb']:.0f} MB, "
              f"{row['workers']} workers {row['sum_peak_mb']:.0f} MB", flush=True)
    return rows


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # the peak resident set (VmHWM) restarts from now
        f.write("5")


class Nodes:
    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--owners", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny-llama on the synthetic set")
    parser.add_argument("--flower", action="store_true", help="measure a real `flwr run` simulation's workers")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args()
    if args.rounds < 3 or args.owners < 1:
        parser.error("--rounds must be at least 3 and --owners at least 1")
    # recipe=plain: config.yaml's training values, as docs/PERFORMANCE.md reports them
    base = ("recipe=plain model=tiny-llama dataset.num_train=600 dataset.num_test=100 train.batch_size=16"
            if args.quick else f"recipe=plain model=minilm dataset=fpb dataset.path={SHARED_DATA / 'fpb'}")
    overrides = f"{base} num_rounds={args.rounds} {' '.join(args.overrides)}"
    cfg = config.compose(overrides)
    print(f"[memory] {overrides}; {args.owners} owners, {args.rounds} rounds"
          f"{', flwr run' if args.flower else ', in one process'}", flush=True)
    rows = (flower_curve(overrides, args.owners, args.rounds, Path(args.out).resolve()) if args.flower
            else in_process_curve(cfg, args.owners, args.rounds, Path(args.out)))
    if len(rows) < 3:
        raise SystemExit(f"only {len(rows)} rounds were measured")
    second = rows[1]["peak_mb"]
    result = {"overrides": overrides, "owners": args.owners, "mode": "flower" if args.flower else "in-process",
              "rounds": rows, "growth_after_round_2": max(r["peak_mb"] for r in rows[1:]) / second - 1}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"[memory] largest peak after round 2 / round 2's: {1 + result['growth_after_round_2']:.3f}", flush=True)
    return 0


def in_process_curve(cfg, owners: int, rounds: int, out: Path) -> list[dict]:
    """Per-round peak resident memory of this process playing server and every owner."""
    model, tokenizer = models.build_model(cfg, device())
    sets, labels = data.test_sets(cfg, tokenizer)
    arrays = models.to_arrays(model)
    recorder = RunRecorder(out.with_suffix(".run"), {}, rounds, "k")
    guard = build_strategy(OmegaConf.merge(cfg, {"strategy": {"min_clients": 1}}), recorder, arrays)
    for attribute in ("_run_id", "_task_id", "_node_id"):  # Messages made outside a Flower process need these
        setattr(TaskIdentity, attribute, 1)
    states = [RecordDict() for _ in range(owners)]
    rows = []
    for server_round in range(1, rounds + 1):
        gc.collect()
        reset_peak()
        start = time.time()
        guard.configure_train(server_round, arrays, ConfigRecord(), Nodes(owners))
        replies = []
        for i in range(owners):
            content = client.train(cfg, arrays, states[i], server_round=server_round, run_key="memory",
                                   node_config={"partition-id": i, "num-partitions": owners})
            request = Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN)
            replies.append(Message(content, reply_to=request))
        aggregated, _ = guard.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
        models.from_arrays(model, arrays)
        accuracy = evaluate(model, sets, labels, cfg)["accuracy"]
        recorder.record_round(server_round, {"accuracy": accuracy, "loss": None, "macro_f1": None})
        rows.append({"round": server_round, "peak_mb": rss_mb("VmHWM"), "end_mb": rss_mb("VmRSS"),
                     "objects": len(gc.get_objects()), "accuracy": accuracy, "seconds": time.time() - start})
        print(f"[memory] round {server_round}/{rounds}: peak {rows[-1]['peak_mb']:.0f} MB, after "
              f"{rows[-1]['end_mb']:.0f} MB, {rows[-1]['objects']} objects, accuracy {accuracy:.3f}, "
              f"{rows[-1]['seconds']:.0f}s", flush=True)
    return rows

