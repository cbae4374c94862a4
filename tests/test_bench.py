"""scripts/bench.py runs end to end and writes every figure (the figures themselves are judged by the benchmark)."""

import json
import math
import subprocess
import sys

from .conftest import ROOT

FIELDS = ("dp_step_ratio", "dp_memory_ratio", "upload_fraction", "flower_overhead_ratio")


def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--models", "tiny-llama", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for field in FIELDS:
        assert math.isfinite(result[field]) and result[field] > 0, field
    assert 0 < result["upload_fraction"] < 1
    by_format = result["upload_fraction_by_format"]  # smaller formats send fewer bytes; FFA fewer than LoRA
    upload = result["upload"]["tiny-llama"]
    assert by_format["int8"] < by_format["fp16"] < by_format["fp32"]
    default = upload["default"]  # the DP recipe: FFA-LoRA r 4 as int8, below FFA r 8 as int8
    assert default["dtype"] == "int8" and default["rank"] == 4 and default["variant"] == "ffa"
    assert result["upload_fraction"] == default["fraction"] < by_format["int8"]
    assert all(upload["ffa"]["upload_bytes"][d] < 0.6 * upload["lora"]["upload_bytes"][d] for d in by_format)
    step = result["step_time"]["tiny-llama"]
    assert step["best_mode"] in step["ratio"] and "hooks" in step["ratio"]
    assert all(math.isfinite(r) and r > 0 for r in step["ratio"].values())
    times = result["round_time_by_clients"]
    assert set(times) == {"1", "2"} and all(s > 0 for s in times.values())
    assert math.isfinite(result["round_time_fit"]["seconds_per_client"])
    assert "| headline |" in run.stdout  # the printed table
    for name in ("fpb", "sst2"):  # padding: micro-batches compute fewer positions than one padded pass
        padding = result["padding"][name]
        assert 1 <= result["tokens_computed_per_real_token"][name] <= padding["tokens_padded_per_real_token"]
        assert math.isfinite(result["train_speedup_vs_padded"][name]) and padding["dp_ratio_micro_batched"] > 0


def test_quick_llm_levers_measure_every_lever_dp_and_non_private(tmp_path):
    """Section 7 (--llm) on tiny-llama: examples/s for every lever, DP and not, and the ratios beside them."""
    out = tmp_path / "llm.json"
    run = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--llm", "tiny-llama", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    levers = result["llm_levers"]
    scoring = result["llm_evaluation"]  # the shared-prompt scoring against one pass per candidate, same scores
    assert scoring["same_predictions"] and scoring["loss_relative_difference"] < 1e-3
    assert scoring["shared_seconds"] > 0 and scoring["separate_seconds"] > 0
    from experiments.bench import LEVERS
    rates = levers["examples_per_second"]
    assert set(rates) == {f"{arm}:{lever}" for arm in ("dp", "non_private") for lever in LEVERS}
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert levers["dp_speedup_vs_baseline"]["baseline"] == 1.0 and set(levers["dp_ratio"]) == set(LEVERS)
    assert "tiny-llama, top_8_layers_micro_batch_4" in run.stdout


def test_llm_levers_subset_keeps_the_baseline_beside_it():
    from experiments.bench import llm_levers
    levers = llm_levers("tiny-llama", quick=True, only=["top_8_layers"])
    assert set(levers["dp_ratio"]) == {"baseline", "top_8_layers"}
    assert set(levers["examples_per_second"]) == {f"{a}:{l}" for a in ("dp", "non_private")
                                                  for l in ("baseline", "top_8_layers")}


def test_levers_without_llm_is_refused():
    run = subprocess.run([sys.executable, "scripts/bench.py", "--levers", "top_8_layers", "--out", "/tmp/x.json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "use it with --llm" in run.stderr
