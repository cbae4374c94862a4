"""One data owner's round through dplora.client: its data source, its ledger, its per-process cache."""

import json
import math

import pytest
from flwr.app import RecordDict

from dplora import client, config, data, models, privacy, protocol
from dplora.ledger import LedgerError, PrivacyLedger
from dplora.privacy import PrivacyAccount

from .conftest import TINY

SIM = {"partition-id": 0, "num-partitions": 2}


def _owner_file(path, n=30):
    labels = ["negative", "neutral", "positive"]
    path.write_text("".join(json.dumps({"text": f"review number {i} is fine", "label": labels[i % 3]}) + "\n"
                            for i in range(n)))
    return path


def _owner(tmp_path, n=30, **settings):
    return {"data-path": str(_owner_file(tmp_path / "owner_a.jsonl", n=n)), "privacy-ledger": str(tmp_path / "l.json"),
            "privacy-budget": 50, **settings}


def test_owner_trains_on_its_own_data_file_at_a_public_sample_rate(tiny_cfg, tmp_path, caplog):
    model, _ = models.build_model(tiny_cfg)
    owner = _owner(tmp_path, public_size := 32) | {"public-num-examples": public_size}
    reply = client.train(tiny_cfg, models.to_arrays(model), RecordDict(), node_config=owner, server_round=1)
    assert "num-examples" not in reply[protocol.METRICS]  # the exact record count never leaves the owner
    q = tiny_cfg.train.batch_size / public_size  # from the size the owner published
    assert reply[protocol.METRICS]["sample_rate"] == pytest.approx(q)
    assert reply[protocol.METRICS]["steps"] == math.ceil(tiny_cfg.train.local_epochs / q)
    cfg = config.compose(TINY + " train.sample_rate=0.2")  # or the run sets q for everyone
    reply = client.train(cfg, models.to_arrays(model), RecordDict(), node_config=_owner(tmp_path), server_round=1,
                         run_key="other")
    assert reply[protocol.METRICS]["sample_rate"] == 0.2 and reply[protocol.METRICS]["steps"] == 5


def test_an_owner_without_a_public_sample_rate_is_told_what_to_set(tiny_cfg, tmp_path):
    model, _ = models.build_model(tiny_cfg)
    with pytest.raises(config.ConfigError, match="train.sample_rate.*public-num-examples"):
        client.train(tiny_cfg, models.to_arrays(model), RecordDict(), node_config=_owner(tmp_path), server_round=1)


def test_a_real_owner_trains_only_within_the_limits_it_set(tmp_path):
    dp = config.compose(TINY + " train.sample_rate=0.2")
    model, _ = models.build_model(dp)
    arrays = models.to_arrays(model)
    owner = _owner(tmp_path)
    del owner["privacy-budget"]
    reply = client.train(dp, arrays, RecordDict(), node_config=owner, server_round=1)
    assert "privacy-budget" in reply[protocol.STATUS]["refused"] and protocol.ARRAYS not in reply
    plain = config.compose(TINY + " train.sample_rate=0.2 privacy=none")
    reply = client.train(plain, arrays, RecordDict(), node_config=_owner(tmp_path), server_round=1)
    assert "allow-non-private=true" in reply[protocol.STATUS]["refused"]
    reply = client.train(plain, arrays, RecordDict(), node_config=_owner(tmp_path, **{"allow-non-private": "true"}),
                         server_round=1, run_key="np")
    assert protocol.ARRAYS in reply and math.isinf(reply[protocol.METRICS]["epsilon"])
    # the non-private run has no bound: the ledger's total is now infinite and refuses any further run
    reply = client.train(dp, arrays, RecordDict(), node_config=_owner(tmp_path), server_round=1, run_key="later")
    assert "above the owner's budget" in reply[protocol.STATUS]["refused"]
    # a simulated owner (partition-id) follows the run's configuration
    reply = client.train(plain, arrays, RecordDict(), node_config=SIM, server_round=1)
    assert protocol.ARRAYS in reply


@pytest.mark.parametrize("node_config, message", [
    ({}, "needs data-path"),
    ({"data-path": "/nonexistent/owner.jsonl"}, "file not found"),
    ({"data-path": "/tmp/owner.txt"}, "unknown format 'txt'"),
])
def test_bad_node_config_fails_with_a_clear_message(tiny_cfg, node_config, message):
    model, _ = models.build_model(tiny_cfg)
    with pytest.raises((config.ConfigError, data.DataError), match=message):
        client.train(tiny_cfg, models.to_arrays(model), RecordDict(), node_config=node_config, server_round=1)


def test_kept_process_builds_the_model_once_and_loads_every_tensor_each_round(tiny_cfg):
    first, _ = client.local_model(tiny_cfg)
    again, _ = client.local_model(tiny_cfg)
    assert first is again
    fresh, _ = models.build_model(tiny_cfg)
    # A round (or another simulated owner) changed every trainable tensor; the next round loads the global ones.
    models.load_adapter_state(first, {k: v + 3.0 for k, v in models.adapter_state(first).items()})
    models.from_arrays(first, models.to_arrays(fresh))
    after, expected = models.adapter_state(first), models.adapter_state(fresh)
    assert all(after[k].equal(expected[k]) for k in expected)  # nothing of an earlier round remains
    other = config.compose("model=tiny-llama dataset.num_train=120 dataset.num_test=40 seed=1")
    assert client.local_model(other)[0] is not first  # another config, another model


def test_simulated_owners_keep_a_ledger_beside_the_results(tmp_path):
    settings = client.node_settings(SIM, str(tmp_path))
    assert settings["privacy-ledger"] == str(tmp_path / "ledgers" / "owner-0.json")
    real = {"data-path": "/secure/a.jsonl", "partition-id": 0, "num-partitions": 2}
    assert "privacy-ledger" not in client.node_settings(real, str(tmp_path))  # a real owner names its own


# ------------------------------------------------------------------------------------------ the ledger

def test_restart_continues_the_account_from_the_ledger(tiny_cfg, tmp_path):
    model, _ = models.build_model(tiny_cfg)
    node = {**SIM, "privacy-ledger": str(tmp_path / "ledger.json")}
    arrays = models.to_arrays(model)
    first = client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=1, run_key="run-a")
    steps = first[protocol.METRICS]["steps"]
    # The ClientApp restarts (a resumed run): empty context.state, same run key.
    second = client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=2, run_key="run-a")
    assert second[protocol.METRICS]["steps"] == 2 * steps
    sigma, q = second[protocol.METRICS]["noise_multiplier"], second[protocol.METRICS]["sample_rate"]
    assert second[protocol.METRICS]["epsilon"] == pytest.approx(privacy.epsilon(sigma, q, 2 * steps, 1e-5, "prv"))
    # A restarted run that repeats a round this owner already trained is refused, not paid for twice.
    again = client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=2, run_key="run-a")
    assert "again" in again[protocol.STATUS]["refused"] and again[protocol.METRICS]["steps"] == 2 * steps
    # The planned run is spent: a third round is refused even from a fresh process.
    third = client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=3, run_key="run-a")
    assert protocol.STATUS in third.config_records
    assert json.loads((tmp_path / "ledger.json").read_text())["runs"]["run-a"]["steps"] == 2 * steps


def test_exhausted_ledger_refuses_whatever_the_server_asks(tiny_cfg, tmp_path):
    model, _ = models.build_model(tiny_cfg)
    arrays, path = models.to_arrays(model), tmp_path / "ledger.json"
    node = {**SIM, "privacy-ledger": str(path)}
    client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=1, run_key="run-a")
    spent = PrivacyLedger(path).epsilon()
    assert spent > 0
    # The owner's total budget leaves room for less than a second such run: a new run (new key) is refused.
    node["privacy-budget"] = 1.1 * spent
    second = client.train(tiny_cfg, arrays, RecordDict(), node_config=node, server_round=1, run_key="run-b")
    assert "above the owner's budget" in second[protocol.STATUS]["refused"]
    assert second[protocol.METRICS]["steps"] == 0 and protocol.ARRAYS not in second
    assert set(json.loads(path.read_text())["runs"]) == {"run-a"}  # nothing was spent


def test_ledger_composes_runs_with_one_accountant_not_a_sum(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget=100)
    account = PrivacyAccount(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, accountant="prv",
                             noise_multiplier=1.0, sample_rate=0.1, planned_steps=100, steps=50)
    ledger.record("a", account, server_round=1)
    one = ledger.epsilon()
    ledger.record("b", account, server_round=1)
    two = PrivacyLedger(tmp_path / "ledger.json", budget=100).epsilon()  # read back from disk
    assert one == pytest.approx(account.epsilon(), rel=0.02)
    assert one < two < 2 * one


def test_ledger_refuses_non_private_training_and_rejects_bad_files(tiny_cfg, tmp_path):
    cfg = config.compose("model=tiny-llama dataset.num_train=120 dataset.num_test=40 privacy=none")
    model, _ = models.build_model(cfg)
    node = {**SIM, "privacy-ledger": str(tmp_path / "ledger.json"), "privacy-budget": 10}
    reply = client.train(cfg, models.to_arrays(model), RecordDict(), node_config=node, server_round=1)
    assert "non-private" in reply[protocol.STATUS]["refused"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LedgerError, match="bad.json"):
        PrivacyLedger(tmp_path / "bad.json")
    with pytest.raises(LedgerError, match="privacy-budget needs privacy-ledger"):
        PrivacyLedger.from_node_config({"privacy-budget": 3})
    with pytest.raises(LedgerError, match="positive"):
        PrivacyLedger.from_node_config({"privacy-ledger": str(tmp_path / "l.json"), "privacy-budget": -1})


def test_fedprox_pull_is_applied_outside_dp_after_every_step(tiny_cfg):
    """mu = 1 / learning rate pulls the adapter all the way back to the global one after each step: the reply is
    the global adapter, while the DP mechanism still ran (steps, noise) and was accounted in full."""
    model, _ = models.build_model(tiny_cfg)
    arrays = models.to_arrays(model)
    mu = 1 / tiny_cfg.train.learning_rate
    reply = client.train(tiny_cfg, arrays, RecordDict(), node_config=SIM, server_round=1, proximal_mu=mu)
    back, start = reply[protocol.ARRAYS].to_torch_state_dict(), arrays.to_torch_state_dict()
    assert all(back[k].allclose(start[k], atol=1e-6) for k in start)
    assert reply[protocol.METRICS]["steps"] > 0 and reply[protocol.METRICS]["noise_multiplier"] > 0
    free = client.train(tiny_cfg, arrays, RecordDict(), node_config=SIM, server_round=1)
    assert any(not free[protocol.ARRAYS].to_torch_state_dict()[k].allclose(start[k]) for k in start)
    with pytest.raises(ValueError, match="proximal-mu"):
        client.train(tiny_cfg, arrays, RecordDict(), node_config=SIM, server_round=1, proximal_mu=float("nan"))


def test_each_log_line_appears_once():
    """Opacus' logging.basicConfig would print every Flower line a second time, through the root logger."""
    import subprocess
    import sys
    code = "import logging; from dplora import client; logging.getLogger('flwr.dplora.x').info('one line')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (out.stdout + out.stderr).count("one line") == 1


def test_a_recipe_can_name_the_batch_as_a_share_of_the_local_data(tmp_path):
    """train.batch_size=null with train.sample_rate=q: the expected batch (the noisy sum's public normalizer) is
    q x the owner's public size; an owner publishing no size is told what to set; the config says what is
    missing when neither is set."""
    cfg = config.compose("model=tiny-llama dataset.num_train=120 num_rounds=1 train.local_epochs=1 "
                         "train.batch_size=null train.sample_rate=0.5")
    assert client.with_batch_size(cfg, 0.5, 60).train.batch_size == 30
    assert cfg.train.batch_size is None  # the run's config itself is left alone
    reply = client.train(cfg, models.to_arrays(models.build_model(cfg)[0]), RecordDict(), server_round=1,
                         node_config={"partition-id": 0, "num-partitions": 2})
    assert reply["metrics"]["sample_rate"] == 0.5 and reply["metrics"]["steps"] == 2
    with pytest.raises(config.ConfigError, match="publishes none"):
        client.with_batch_size(cfg, 0.5, None)
    with pytest.raises(config.ConfigError, match="train.batch_size=null needs train.sample_rate"):
        config.compose("train.batch_size=null train.sample_rate=null")
