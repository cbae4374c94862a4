"""A real deployment on loopback: one SuperLink and two SuperNodes as separate processes, TLS and SuperNode
authentication, each owner with its own data file and ledger (scripts/make_certs.sh,
experiments/local_federation.py)."""

import json
import subprocess
from pathlib import Path

import pytest
from peft import PeftModel

from dplora import config, models
from experiments import local_federation as federation
from experiments.simulation import run_env

from .conftest import ROOT


LABELS = ["negative", "neutral", "positive"]
OVERRIDES = "model=tiny-llama num_rounds=2 train.batch_size=8 train.sample_rate=0.25 train.local_epochs=1"


def _owner_file(path, n):
    path.write_text("".join(json.dumps({"text": f"owner sentence {i} about the product", "label": LABELS[i % 3]})
                            + "\n" for i in range(n)))
    return path


@pytest.fixture
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "3"], check=True,
                   capture_output=True)
    return out


def test_tls_federation_with_node_authentication_and_owner_data(certs, tmp_path):
    files = [_owner_file(tmp_path / "owner_a.jsonl", 40), _owner_file(tmp_path / "owner_b.jsonl", 24)]
    workdir, out = tmp_path / "federation", tmp_path / "out"
    try:
        info = federation.start_federation(certs, files, workdir, privacy_budget=20)
        pids = list(info["pids"].values())
        assert len(pids) == 3 and len(info["node_ids"]) == 2

        # node3's key was generated but never registered: the SuperLink refuses that SuperNode
        status, node_log = federation.try_supernode(certs, certs / "node3", workdir)
        assert status == 1 and federation.UNREGISTERED_NODE_LOG_LINE in node_log
        assert "No SuperNode found with the given public key" in (workdir / "superlink.log").read_text()

        env = run_env(Path(info["flwr_home"]))  # this Python's `flwr`, FLWR_HOME with the TLS connection
        run = subprocess.run(
            ["flwr", "run", ".", info["connection"], "--stream", "--run-config",
             f"overrides='{OVERRIDES}' output-dir='{out}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        metrics_path = out / "metrics.json"
        assert metrics_path.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
        metrics = json.loads(metrics_path.read_text())
        assert [r["round"] for r in metrics["rounds"]] == [1, 2]
        for entry in metrics["rounds"]:  # each owner trained on its own file, at the run's public sample rate
            assert [c["sample_rate"] for c in entry["clients"]] == [0.25, 0.25]
            assert {c["node_id"] for c in entry["clients"]} == set(info["node_ids"])
            assert not entry["failed"] and not entry["refused"]
        cfg = config.compose(OVERRIDES)
        _, tokenizer = models.build_model(cfg)
        PeftModel.from_pretrained(models.build_base_model(cfg, tokenizer), out / "adapter")
        ledgers = [json.loads((workdir / f"ledger-node{i}.json").read_text()) for i in (1, 2)]
        assert all(ledger["runs"][metrics["run_key"]]["round"] == 2 for ledger in ledgers)
    finally:
        federation.stop_federation(workdir)
    assert not federation._marked_pids(workdir.resolve())  # every process we started is gone
    assert all(not federation._alive(pid) for pid in pids)
