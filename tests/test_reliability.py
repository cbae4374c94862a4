"""No reply can end a run, cost the server more than a small fixed amount, or move a two-owner round further
than the public plan allows (issue: an independent crafted-reply check). Every case runs under every strategy
in conf/strategy/, with one honest reply beside the crafted one."""

import functools
import math
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dplora import config, privacy
from dplora.results import RunRecorder
from server_app import plan
from server_app.plan import adam_update_bound
from server_app.strategy import build_strategy

from .conftest import ROOT
from .test_strategy import _reply, task_identity  # noqa: F401 - the fixture is used by name

STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))
EXTRA = {"bulyan": "strategy.aggregator.num_malicious_nodes=0"}  # Bulyan needs n >= 4f + 3
PLAN = ("train.sample_rate=0.1 train.local_epochs=1 num_rounds=3 train.learning_rate=0.03"  # 10 AdamW steps a round
        " transport.dtype=fp32")  # the replies built here are fp32 adapters
REFERENCE = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
BOUND = adam_update_bound(config.compose(PLAN).train, 10, 4, 0.0)  # 10 x 0.03 x 3.16 x sqrt(4) = 1.90


@functools.cache
def _cfg(strategy: str, extra: str = ""):
    return config.compose(f"{PLAN} strategy={strategy} strategy.min_clients=1 {EXTRA.get(strategy, '')} {extra}")


@functools.cache
def _sigma():
    return privacy.PrivacyAccount.plan(_cfg("fedavg").privacy, 0.1, 30).noise_multiplier


@functools.cache
def _epsilon(steps):
    return privacy.epsilon(_sigma(), 0.1, steps, 1e-5, "prv")


def _record(steps=10, changes=None):
    """An honest record after `steps` steps, then `changes` (a crafted reply's numbers) written over it."""
    sigma = _sigma()
    return {"epsilon": _epsilon(steps), "noise_multiplier": sigma,
            "sample_rate": 0.1, "steps": steps, "delta": 1e-5, **(changes or {})}


def _trained(node, value, steps=10, changes=None):
    return _reply(node, RecordDict({"arrays": ArrayRecord({"w": Array(np.full((2, 2), value, np.float32))}),
                                    "metrics": MetricRecord(_record(steps, changes))}))


class Nodes:
    """What Flower's configure_train needs of a Grid: the connected nodes."""

    def __init__(self, *ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def _round(tmp_path, strategy, replies, nodes=(1, 2), server_round=1, extra=""):
    recorder = RunRecorder(tmp_path, {}, num_rounds=3, run_key="k")
    guard = build_strategy(_cfg(strategy, extra), recorder, REFERENCE)
    guard.configure_train(server_round, REFERENCE, ConfigRecord(), Nodes(*nodes))
    arrays, _ = guard.aggregate_train(server_round, replies)
    return arrays, recorder.pending


CRAFTED = {  # each found by the independent check; 'eps' claims follow the numbers where noted
    "noise_multiplier 1e-6": {"noise_multiplier": 1e-6},
    "noise_multiplier 1e-300": {"noise_multiplier": 1e-300},
    "steps 1e12": {"steps": 1e12},
    "steps 1.7e308": {"steps": 1.7e308},
    "noise_multiplier 1.7e308, epsilon 0": {"noise_multiplier": 1.7e308, "epsilon": 0.0},
    "noise_multiplier 0.01": {"noise_multiplier": 0.01},
    "noise_multiplier 0.05": {"noise_multiplier": 0.05},
    "sample_rate 1e-300 with its epsilon": {"sample_rate": 1e-300, "epsilon": 0.0099},
    "0 steps, epsilon 0, trained": {"steps": 0, "epsilon": 0.0},
    "delta 0.5": {"delta": 0.5},
    "sample_rate 1": {"sample_rate": 1.0},
}


def _recorded(name, accountant, asked):
    def ask(*args):
        asked.append((name, args))
        return accountant(*args)
    return ask


@pytest.mark.parametrize("case", list(CRAFTED))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extreme_privacy_numbers_are_set_aside_cheaply_and_never_raise(tmp_path, monkeypatch, strategy, case):
    alone, _ = _round(tmp_path / "alone", strategy, [_trained(1, 0.5)])  # (and the plan computed, once per run)
    honest, crafted = ([_trained(2, 0.5, changes=changes), _trained(1, 0.5)] for changes in (None, CRAFTED[case]))
    asked = []  # what the server asks its accountant (calibration and epsilon): cheap only for the plan's numbers
    for name in ("_noise", "_epsilon"):
        monkeypatch.setattr(plan, name, _recorded(name, getattr(plan, name), asked))
    _round(tmp_path / "honest", strategy, honest)
    honest_asks, asked[:] = set(asked), []
    arrays, pending = _round(tmp_path / "crafted", strategy, crafted)
    assert set(asked) <= honest_asks, asked  # no accountant run on a crafted number
    tracemalloc.start()
    _round(tmp_path / "memory", strategy, [_trained(2, 0.5, changes=CRAFTED[case]), _trained(1, 0.5)])
    # (the replies' own construction is traced too, and stays far below the bound)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [f["node_id"] for f in pending["failed"]] == [2] and "invalid reply" in pending["failed"][0]["reason"]
    assert [c["node_id"] for c in pending["clients"]] == [1]
    assert pending["clients"][0]["epsilon"] == pytest.approx(_record()["epsilon"])  # the plan's epsilon
    assert peak < 64 * 2**20  # bytes: nothing sized by a reply's numbers
    assert (arrays is None) == (alone is None)  # (Bulyan cannot aggregate one reply: the adapter stays)
    if arrays is not None:  # as if the honest owner had replied alone
        np.testing.assert_array_equal(arrays["w"].numpy(), alone["w"].numpy())


@pytest.mark.parametrize("crafted_node", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_scaled_reply_moves_a_two_owner_round_at_most_the_plans_bound_whatever_the_order(tmp_path, strategy,
                                                                                           crafted_node):
    honest_node = 3 - crafted_node
    results = []
    for first in (crafted_node, honest_node):  # (the server rewrites the messages it screens: fresh ones each time)
        replies = sorted([_trained(crafted_node, 0.5e6), _trained(honest_node, 0.5)],
                         key=lambda msg: msg.metadata.src_node_id != first)
        arrays, pending = _round(tmp_path / str(len(results)), strategy, replies)
        results.append(None if arrays is None else arrays["w"].numpy())
        if arrays is not None:
            assert np.isfinite(results[-1]).all()
            assert np.linalg.norm(results[-1].astype(np.float64)) <= BOUND * (1 + 1e-6)
        crafted = next(c for c in pending["clients"] if c["node_id"] == crafted_node)
        assert crafted["clipped_to"] == pytest.approx(BOUND)
    assert (results[0] is None) == (results[1] is None)
    if results[0] is not None:  # the same aggregate whichever reply arrives first (Krum's tie included)
        np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unsampled_and_duplicate_replies_are_set_aside_and_recorded(tmp_path, strategy):
    replies = [_trained(1, 0.5), _trained(2, 0.5), _trained(2, 0.6), _trained(9, 0.5)]
    arrays, pending = _round(tmp_path, strategy, replies)
    assert [c["node_id"] for c in pending["clients"]] == [1, 2]
    reasons = {f["node_id"]: f["reason"] for f in pending["failed"]}
    assert set(reasons) == {2, 9}
    assert "second reply" in reasons[2] and "not sampled" in reasons[9]


def test_a_later_round_accepts_whole_rounds_of_steps_only(tmp_path):
    good = [_trained(1, 0.5, steps=20), _trained(2, 0.5, steps=10)]  # round 2: one owner sat out round 1
    _, pending = _round(tmp_path / "good", "fedavg", good, server_round=2)
    assert not pending["failed"] and len(pending["clients"]) == 2
    bad = [_trained(1, 0.5, steps=30), _trained(2, 0.5, steps=15)]  # more rounds than run so far; half a round
    _, pending = _round(tmp_path / "bad", "fedavg", bad, server_round=2)
    assert [f["node_id"] for f in pending["failed"]] == [1, 2]
    assert all("whole number of rounds" in f["reason"] for f in pending["failed"])


def test_without_a_public_sample_rate_each_node_keeps_its_first(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=3, run_key="k")
    guard = build_strategy(config.compose("privacy=none train.sample_rate=null train.batch_size=16 "
                                          "train.local_epochs=1 num_rounds=3 strategy.min_clients=1"),
                           recorder, REFERENCE)
    private = {"noise_multiplier": 0.0, "epsilon": math.inf}
    for server_round, rate in ((1, 0.1), (2, 0.2)):
        guard.configure_train(server_round, REFERENCE, ConfigRecord(), Nodes(1))
        steps = math.ceil(1 / rate) * server_round
        guard.aggregate_train(server_round, [_trained(1, 0.5, changes={"sample_rate": rate, "steps": steps,
                                                                        **private})])
        recorder.record_round(server_round, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    first, second = recorder.data["rounds"]
    assert len(first["clients"]) == 1 and "differs from this node's earlier" in second["failed"][0]["reason"]


CRAFTED_OWNER = '''
"""The project's ClientApp, except that owner 1 crafts its replies: a false privacy record in round 1, its update
scaled by 1e6 (with an honest record) after that."""
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from client_app.app import train as honest_train, transport_mod, user_dp_clipping

app = ClientApp(mods=[transport_mod, user_dp_clipping])


@app.train()
def train(msg, context):
    reply = honest_train(msg, context)
    if int(context.node_config["partition-id"]) == 1 and "arrays" in reply.content.array_records:
        start, trained = msg.content["arrays"].to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: start[k] + 1e6 * (trained[k] - start[k]) for k in start})
        if int(msg.content["config"]["server-round"]) == 1:
            reply.content["metrics"]["noise_multiplier"] = 1e-6
    return reply
'''


def test_flwr_run_with_one_crafted_owner_of_two_completes_near_the_honest_run(tmp_path):
    """As a user runs it: `flwr run` with two simulated owners, one of them crafting its replies. Every round
    completes, the false record is set aside, the scaled update is clipped to the plan's bound, and the loss
    stays finite and near the honest run's (the seeded reference run of test_behaviour_unchanged)."""
    import json

    from experiments.simulation import flwr_run, local_superlink

    from .test_behaviour_unchanged import OVERRIDES, REFERENCE

    app = tmp_path / "app"
    app.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text().replace('clientapp = "client_app.app:app"',
                                                              'clientapp = "crafted_owner:app"')
    (app / "pyproject.toml").write_text(pyproject.replace('packages = ["dplora", "client_app", "server_app", '
                                                          '"experiments"]', 'packages = ["."]'))
    (app / "crafted_owner.py").write_text(CRAFTED_OWNER)
    with local_superlink(tmp_path / "flwr-home") as env:
        metrics = flwr_run(f"{OVERRIDES} strategy.min_clients=1", tmp_path / "run", num_supernodes=2, env=env,
                           timeout=600, app_dir=app)
    first, second = metrics["rounds"]
    assert len(first["failed"]) == 1 and "privacy record in a non-private run" in first["failed"][0]["reason"]
    assert len(first["clients"]) == 1 and first["aggregated"]
    clipped = [c for c in second["clients"] if "clipped_to" in c]
    assert len(second["clients"]) == 2 and len(clipped) == 1 and clipped[0]["update_norm"] > 1e5
    honest = json.loads((REFERENCE / "metrics.json").read_text())["rounds"]
    print("losses", [r["loss"] for r in metrics["rounds"]], "honest", [r["loss"] for r in honest])
    assert all(math.isfinite(r["loss"]) for r in metrics["rounds"])
    assert abs(second["loss"] - honest[-1]["loss"]) <= 0.1 * honest[-1]["loss"]
