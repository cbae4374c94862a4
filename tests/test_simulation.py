"""End to end, as a user runs it: `flwr run .` on a local simulation SuperLink, then the results on disk."""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dplora import config, data, models
from dplora.checkpoint import latest_checkpoint, optimizer_file
from experiments.simulation import (
    SimulationError,
    HTTP_ADDRESS,
    descendants,
    finished_run,
    flwr_run,
    interrupted_run,
    local_superlink,
    running,
)
from dplora.evaluation import evaluate

from .conftest import ROOT


OVERRIDES = ("model=tiny-llama recipe=plain num_rounds=2 dataset.num_train=200 dataset.num_test=60 train.batch_size=16 "
             "train.local_epochs=1")


def test_flwr_run_simulation_end_to_end(superlink_env, tmp_path):
    """A tuning run, as the grids run them: scored on a validation split carved from training (200 of 250
    records train), the test split too (test_*) at the start and after the last round only."""
    out = tmp_path / "run"
    start = time.time()
    lines = []
    overrides = OVERRIDES.replace("num_train=200", "num_train=250") + (
        " dataset.validation_fraction=0.2 eval.split=validation eval.also_test=true")
    metrics = flwr_run(overrides, out, num_supernodes=2, env=superlink_env, on_line=lines.append, timeout=600)
    logs = "\n".join(lines)
    assert time.time() - start < 300
    assert metrics == json.loads((out / "metrics.json").read_text())
    cfg = config.compose(overrides)
    assert metrics["evaluation_split"]["split"] == "validation" and metrics["evaluation_split"]["examples"] == 50
    assert {"accuracy", "test_accuracy", "test_loss"} <= set(metrics["initial"])
    assert "test_accuracy" not in metrics["rounds"][0] and "test_accuracy" in metrics["rounds"][1]
    assert metrics["config"] == config.to_dict(cfg)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert logs.count("round 2/2: accuracy") == 1  # the one-line summary per round, printed once
    assert not re.search(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:INFO:", logs)  # no second copy of each line
    assert not re.search(r"epsilon \d+\.\d{4,}", logs)  # epsilons to 3 decimals
    for entry in metrics["rounds"]:
        assert len(entry["clients"]) == 2 and not entry["refused"] and not entry["failed"]
        assert 0 <= entry["accuracy"] <= 1 and entry["loss"] > 0
        assert entry["epsilon"] == max(c["epsilon"] for c in entry["clients"])
        for c in entry["clients"]:
            assert set(c) == {"node_id", "epsilon", "noise_multiplier", "sample_rate", "steps", "delta", "update_norm"}
            assert c["sample_rate"] == 16 / 100 and c["delta"] == 1e-5 and c["noise_multiplier"] > 0
    first, last = metrics["rounds"][0]["clients"], metrics["rounds"][1]["clients"]
    assert {c["node_id"]: 2 * c["steps"] for c in first} == {c["node_id"]: c["steps"] for c in last}
    assert metrics["rounds"][1]["epsilon"] <= cfg.privacy.target_epsilon
    assert metrics["rounds"][1]["epsilon"] > metrics["rounds"][0]["epsilon"]

    # every epsilon re-derives with an independent accountant
    verify = subprocess.run([sys.executable, "scripts/verify_privacy.py", str(out / "metrics.json")],
                            cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "4 of 4 client epsilons re-derived within 2%" in verify.stdout

    # the final adapter loads with peft onto the same base model and reproduces the final evaluation
    _, tokenizer = models.build_model(cfg)
    base = models.build_base_model(cfg, tokenizer)
    model = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    sets, labels = data.test_sets(cfg, tokenizer)
    final = evaluate(model, sets, labels, cfg)
    assert final["accuracy"] == pytest.approx(metrics["rounds"][-1]["accuracy"], abs=1e-6)
    assert final["loss"] == pytest.approx(metrics["rounds"][-1]["loss"], rel=1e-4)
    assert json.loads((out / "checkpoint" / "round.json").read_text()) == {"round": 2, "run_key": metrics["run_key"]}
    checkpoint = PeftModel.from_pretrained(models.build_base_model(cfg, tokenizer), out / "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), checkpoint.parameters()))


def test_server_killed_after_round_1_resumes_without_losing_a_round_or_a_budget(superlink_env, tmp_path):
    """FedAvgM: the checkpoint also holds the server momentum (tests/test_strategy.py checks that a loaded state
    continues exactly)."""
    overrides = OVERRIDES.replace("num_rounds=2", "num_rounds=3").replace("num_train=200", "num_train=400")
    overrides += " strategy=fedavgm"
    out, killed, finished = tmp_path / "sweep" / "0", [], threading.Event()  # a sweep's first job folder

    def kill_at_first_checkpoint() -> None:  # the simulation process holds the ServerApp: SIGKILL it
        while not finished.is_set():
            if (out / "checkpoint" / "round.json").is_file():
                for pid in descendants(int(superlink_env["DPLORA_SUPERLINK_PID"]), "flwr-simulation"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                if killed:
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_at_first_checkpoint)
    killer.start()
    try:
        with pytest.raises(SimulationError, match="only [12] of 3 rounds"):
            flwr_run(overrides, out, num_supernodes=2, env=superlink_env, timeout=600)
    finally:
        finished.set()
        killer.join()
    assert killed
    first = json.loads((out / "metrics.json").read_text())
    checkpoint = latest_checkpoint(out / "checkpoint")  # the kill may land inside a save's folder swap
    done = json.loads((checkpoint / "round.json").read_text())["round"]
    assert done in (1, 2) and len(first["rounds"]) >= done
    momentum = load_file(optimizer_file(checkpoint, done))
    assert momentum and all(k.startswith("momentum_vector/") for k in momentum)

    with pytest.raises(SimulationError, match="config differs"):  # a resume must continue the same experiment
        flwr_run(overrides + " seed=5 resume=true", out, 2, superlink_env, timeout=600)

    # the sweep, run again over the killed job, resumes it (resume=true) rather than starting it afresh
    (out / "sweep.json").write_text('{"num_supernodes": 2}\n')  # as the sweep writes it when a job starts
    assert interrupted_run(out, overrides, 2) == done and finished_run(out, overrides, 2) is None
    assert interrupted_run(out, overrides + " seed=5", 2) is None and interrupted_run(out, overrides, 3) is None
    port = int(HTTP_ADDRESS.rsplit(":", 1)[1]) + 1  # its own SuperLink, beside this test's
    sweep = subprocess.run([sys.executable, "scripts/sweep.py", "-m", "sweep.num_supernodes=2", *overrides.split(),
                            f"hydra.sweep.dir={out.parent}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "DPLORA_SUPERLINK_PORT": str(port)})
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
    assert f"resuming the run killed in {out} after its round {done}" in sweep.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_at"] == [done]
    assert finished_run(out, overrides, 2) == metrics and interrupted_run(out, overrides, 2) is None
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and metrics["resumed_at"] == [done]
    assert metrics["run_key"] == first["run_key"] and metrics["rounds"][:done] == first["rounds"][:done]
    epsilons = [r["epsilon"] for r in metrics["rounds"]]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 8.0  # accountants continued, never reset
    ledgers = [json.loads(p.read_text())["runs"][metrics["run_key"]] for p in (out / "ledgers").glob("*.json")]
    assert len(ledgers) == 2
    for entry in ledgers:  # no owner spent more than the run planned, and both went on after the restart
        assert entry["round"] > done and 0 < entry["steps"] <= entry["planned_steps"]
    assert json.loads((out / "adapter" / "round.json").read_text())["round"] == 3
    assert [p.name for p in (out / "checkpoint").glob("server_optimizer-*")] == ["server_optimizer-3.safetensors"]
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()


def test_fedprox_with_user_level_dp_ffa_lora_and_int8_upload_end_to_end(superlink_env, tmp_path):
    """Another Flower strategy by config, inside Flower's DP-FedAvg wrapper with Flower's clipping mod on the
    owners: both guarantees are recorded and re-derive with the independent accountants. FFA-LoRA and int8
    upload ride along: the transport mod wraps the clipping mod, and every reply is accepted. eval.start=false
    skips scoring round 0."""
    overrides = (f"{OVERRIDES} strategy=fedprox strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2 "
                 "strategy.user_dp.target_epsilon=10 strategy.user_dp.clipping_norm=0.5 strategy.user_dp.side=client "
                 "model.lora.train_a=false transport.dtype=int8 eval.start=false")
    metrics = flwr_run(overrides, tmp_path / "run", num_supernodes=2, env=superlink_env, timeout=600)
    assert metrics["initial"] is None and [r["round"] for r in metrics["rounds"]] == [1, 2]  # eval.start=false
    assert metrics["config"]["strategy"]["aggregator"]["_target_"] == "flwr.serverapp.strategy.FedProx"
    users = [r["user_level"] for r in metrics["rounds"]]
    assert [u["releases"] for u in users] == [1, 2] and users[0]["epsilon"] < users[1]["epsilon"] <= 10
    assert all(len(r["clients"]) == 2 and r["aggregated"] and not r["failed"] for r in metrics["rounds"])
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    fresh = get_peft_model_state_dict(models.build_model(config.compose(overrides))[0])
    a_keys = [k for k in fresh if "lora_A" in k]
    assert a_keys and all(torch.equal(saved[k], fresh[k]) for k in a_keys)  # FFA: A never moved
    assert any(not torch.equal(saved[k], fresh[k]) for k in fresh if "lora_B" in k)
    verify = subprocess.run([sys.executable, "scripts/verify_privacy.py", str(tmp_path / "run" / "metrics.json")],
                            cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "user-level, round 2" in verify.stdout


def test_the_default_dp_recipe_runs_end_to_end_and_its_accounting_re_derives(superlink_env, tmp_path):
    """The DP recipe (conf/recipe/dp.yaml: the expected batch a public share q of each owner's data,
    FFA-LoRA) through `flwr run`: every owner samples at the recipe's q, takes ceil(local_epochs / q) steps a
    round, and each epsilon re-derives with the independent accountant from what metrics.json records."""
    overrides = "model=tiny-llama num_rounds=2 dataset.num_train=200 dataset.num_test=60"
    cfg = config.compose(overrides)
    assert cfg.train.batch_size is None and not cfg.model.lora.train_a  # the recipe's, not config.yaml's
    metrics = flwr_run(overrides, tmp_path / "run", num_supernodes=2, env=superlink_env, timeout=600)
    q = cfg.train.sample_rate
    steps = math.ceil(cfg.train.local_epochs / q - 1e-9)
    for number, entry in enumerate(metrics["rounds"], start=1):
        assert len(entry["clients"]) == 2 and not entry["refused"] and not entry["failed"]
        assert all(c["sample_rate"] == q and c["steps"] == number * steps for c in entry["clients"])
    assert 0.9 * cfg.privacy.target_epsilon < metrics["rounds"][-1]["epsilon"] <= cfg.privacy.target_epsilon
    verify = subprocess.run([sys.executable, "scripts/verify_privacy.py", str(tmp_path / "run" / "metrics.json")],
                            cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "4 of 4 client epsilons re-derived within 2%" in verify.stdout


def test_impossible_min_clients_fails_before_flower_starts(tmp_path):
    with pytest.raises(config.ConfigError, match="strategy.min_clients=3 is more than the 2 simulated"):
        flwr_run(f"{OVERRIDES} strategy.min_clients=3", tmp_path, num_supernodes=2, env={})
    with pytest.raises(config.ConfigError, match="num_rounds"):
        flwr_run("num_rounds=0", tmp_path, num_supernodes=2, env={})


def test_stopping_the_superlink_stops_everything_it_started(tmp_path):
    """Its SuperExec runs in a session of its own; left alive, it would serve the next SuperLink's runs."""
    with local_superlink(tmp_path / "flwr-home") as env:
        deadline = time.time() + 30
        while not (spawned := descendants(int(env["DPLORA_SUPERLINK_PID"]))) and time.time() < deadline:
            time.sleep(0.2)
        assert spawned
    assert not [pid for pid in spawned if running(pid)]


def test_client_resources_come_from_the_environment_and_bad_values_are_refused():
    """DPLORA_CLIENT_CPUS / DPLORA_CLIENT_GPUS become Flower's per-ClientApp resources on `flwr run`."""
    from experiments.simulation import SimulationError, federation_config
    assert federation_config(5, {}) == "num-supernodes=5"
    assert federation_config(200, {"DPLORA_CLIENT_CPUS": "1", "DPLORA_CLIENT_GPUS": "0.25"}) == (
        "num-supernodes=200 client-resources-num-cpus=1 client-resources-num-gpus=0.25")
    for bad in ({"DPLORA_CLIENT_CPUS": "0"}, {"DPLORA_CLIENT_CPUS": "1.5"}, {"DPLORA_CLIENT_GPUS": "-1"},
                {"DPLORA_CLIENT_GPUS": "a quarter"}, {"DPLORA_CLIENT_GPUS": "nan"}):
        with pytest.raises(SimulationError, match=next(iter(bad))):
            federation_config(2, bad)
