"""A real deployment on loopback: one SuperLink and eight SuperNodes as separate processes, TLS and SuperNode
authentication, each owner with its own data file and ledger, owners lost and joining mid-run
(scripts/make_certs.sh, experiments/local_federation.py)."""

import json
import subprocess
import time
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
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "9"], check=True,
                   capture_output=True)
    return out


def _run(info, out, overrides):
    """`flwr run` against the TLS federation, in the background (the test changes the federation meanwhile)."""
    env = run_env(Path(info["flwr_home"]))  # this Python's `flwr`, FLWR_HOME with the TLS connection
    return subprocess.Popen(["flwr", "run", ".", info["connection"], "--stream", "--run-config",
                             f"overrides='{overrides}' output-dir='{out}'"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rounds_recorded(path):
    try:
        return len(json.loads(path.read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_tls_federation_of_8_owners_with_churn_authentication_and_owner_data(certs, tmp_path):
    """Six owners start (TLS, registered keys, each with its own data file and ledger); an unregistered key is
    refused. Owners 7 and 8 join once round 1 is under way; once round 1 is recorded, owner 3's machine dies
    mid-run (SIGKILL, no goodbye). Both rounds aggregate; owner 3 is set aside in round 2; the late owners train
    in round 2 with accountants of their own; every owner's ledger holds exactly what the server recorded of it."""
    files = [_owner_file(tmp_path / f"owner_{i}.jsonl", 24 + 4 * (i % 3)) for i in range(1, 9)]
    workdir, out = tmp_path / "federation", tmp_path / "out"
    overrides = f"{OVERRIDES} strategy.min_clients=4"  # num_rounds=2
    pids = []

    def wait_for(done) -> None:
        deadline = time.monotonic() + 600
        while not done() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.25)
        assert done(), run.stdout.read()[-3000:] if run.poll() is not None else "timed out"

    try:
        info = federation.start_federation(certs, files[:6], workdir, privacy_budget=50)
        pids = list(info["pids"].values())
        assert len(pids) == 7 and len(info["node_ids"]) == 6

        # node9's key was generated but never registered: the SuperLink refuses that SuperNode
        status, node_log = federation.try_supernode(certs, certs / "node9", workdir, port=9110)
        assert status == 1 and federation.UNREGISTERED_NODE_LOG_LINE in node_log
        assert "No SuperNode found with the given public key" in (workdir / "superlink.log").read_text()

        run = _run(info, out, overrides)
        wait_for(lambda: (out / "metrics.json").is_file())  # round 0 scored: round 1 is configured next
        ids = dict(zip(range(1, 7), info["node_ids"], strict=True))
        for index in (7, 8):
            ids[index] = federation.join_supernode(certs, files[index - 1], index, workdir, privacy_budget=50)
        wait_for(lambda: _rounds_recorded(out / "metrics.json") >= 1)
        federation.crash_supernode(workdir, 3)  # round 2 has started: it had been sent owner 3 too
        run.communicate(timeout=600)
        metrics = json.loads((out / "metrics.json").read_text())
    finally:
        pids = list(json.loads((workdir / federation.PIDS_FILE).read_text()).values()) \
            if (workdir / federation.PIDS_FILE).is_file() else pids
        federation.stop_federation(workdir)
    assert not federation._marked_pids(workdir.resolve())  # every process we started is gone
    assert all(not federation._alive(pid) for pid in pids)

    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["aggregated"] for r in rounds)
    trained = [{c["node_id"] for c in r["clients"]} for r in rounds]
    assert trained[0] == {ids[i] for i in range(1, 7)}  # the late owners were not there when round 1 began
    assert trained[1] == {ids[i] for i in (1, 2, 4, 5, 6, 7, 8)}  # the late owners in, the lost one out
    assert [f["node_id"] for f in rounds[1]["failed"]] == [ids[3]]  # lost mid-round: set aside under its own id
    per_round = 4  # ceil(local_epochs / sample_rate)
    for index, node in ids.items():
        ledger = json.loads((workdir / f"ledger-node{index}.json").read_text())["runs"][metrics["run_key"]]
        recorded = [c for r in rounds for c in r["clients"] if c["node_id"] == node]
        assert [c["sample_rate"] for c in recorded] == [0.25] * len(recorded)
        assert [c["steps"] for c in recorded] == [per_round * k for k in range(1, len(recorded) + 1)]
        if index == 3:  # killed in round 2, perhaps after its ledger recorded the round, never after a reply
            assert ledger["round"] in (1, 2) and ledger["steps"] == per_round * ledger["round"] >= recorded[-1]["steps"]
        else:  # every round it trained, the server recorded, and no other
            assert (ledger["round"], ledger["steps"]) == (2, recorded[-1]["steps"])
    cfg = config.compose(overrides)
    _, tokenizer = models.build_model(cfg)
    PeftModel.from_pretrained(models.build_base_model(cfg, tokenizer), out / "adapter")
