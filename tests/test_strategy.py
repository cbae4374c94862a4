"""The server's strategy: averages adapters, sets aside refusals and failures, records client privacy."""

import functools
import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from omegaconf import OmegaConf

from dplora import checkpoint, config, privacy
from dplora.results import RunRecorder
from server_app.strategy import build_strategy

DP = OmegaConf.create({"target_epsilon": 8.0, "delta": 1e-5, "accountant": "prv"})
NON_PRIVATE = OmegaConf.create({"target_epsilon": None, "delta": 1e-5, "accountant": "prv"})


@functools.cache
def _compose(overrides: str):
    return config.compose(overrides)


SETTINGS = {"timeout": "strategy.round_timeout", "max_update_norm": "strategy.max_update_norm",
            "update_norm_action": "strategy.update_norm_action", "transport_dtype": "transport.dtype"}


def AdapterFedAvg(recorder, reference, *, privacy=DP, min_clients=1, strategy="fedavg", overrides="",
                  **kwargs):
    """The server's strategy as the ServerApp builds it: a Flower aggregator from conf/strategy/ inside the
    server's duties (server_app/strategy.py). The replies built here are fp32 adapters (DP's own default
    upload is int8: conf/recipe/dp.yaml)."""
    kwargs.setdefault("transport_dtype", "fp32")
    settings = " ".join(f"{SETTINGS[k]}={v}" for k, v in kwargs.items())
    private = "" if privacy is DP else "privacy=none"
    cfg = _compose(f"{PLAN} strategy={strategy} strategy.min_clients={min_clients} {private} {settings} {overrides}")
    return build_strategy(cfg, recorder, reference)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need the identity of a running task; outside a Flower run we provide one."""
    from flwr.supercore.task_identity import TaskIdentity
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def _reply(node_id: int, content: RecordDict | Error) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=request)


REFERENCE = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})


PLAN = "train.sample_rate=0.1 train.local_epochs=1 num_rounds=4 train.learning_rate=1.0"  # 10 AdamW steps a round


@functools.cache
def _sigma(rounds=4):
    """The noise multiplier every honest owner calibrates for the plan (q 0.1, `rounds` rounds of 10 steps)."""
    return privacy.PrivacyAccount.plan(OmegaConf.create({**DP, "max_grad_norm": 1.0}), 0.1, 10 * rounds).noise_multiplier


@functools.cache
def _epsilon(sigma, steps):
    return privacy.epsilon(sigma, 0.1, steps, 1e-5, "prv")


def _privacy(steps=10, sigma=None, rounds=4):
    """An honest privacy record after `steps` steps: the plan's noise multiplier (sigma=0: no DP) and the epsilon
    its own parameters give (inf: no DP)."""
    sigma = _sigma(rounds) if sigma is None else sigma
    eps = _epsilon(sigma, steps) if sigma else math.inf
    return {"epsilon": eps, "noise_multiplier": sigma, "sample_rate": 0.1, "steps": steps, "delta": 1e-5}


def _trained(node_id, value, steps=10, sigma=None, rounds=4):
    return _reply(node_id, RecordDict({
        "arrays": ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))}),
        "metrics": MetricRecord(_privacy(steps, sigma, rounds))}))


def test_aggregates_trained_replies_and_records_refusals_and_failures(tmp_path):
    recorder = RunRecorder(tmp_path, {"privacy": {"target_epsilon": 8}}, num_rounds=4, run_key="k")
    strategy = AdapterFedAvg(recorder, REFERENCE, min_clients=1)
    replies = [
        _trained(1, 1.0, steps=10),
        _trained(2, 4.0, steps=20),
        _reply(3, RecordDict({"metrics": MetricRecord(_privacy(40)),
                              "status": ConfigRecord({"refused": "refusing to train: budget"})})),
        _reply(4, Error(code=0, reason="ClientApp raised RuntimeError")),
    ]
    arrays, metrics = strategy.aggregate_train(4, replies)  # round 4: up to 40 steps so far
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), (1.0 + 4.0) / 2))  # uniform weights
    eps = {n: _epsilon(_sigma(), n) for n in (10, 20, 40)}
    assert metrics["clients"] == 2 and metrics["epsilon-max"] == pytest.approx(eps[20], abs=5e-4)

    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    entry = json.loads(recorder.path.read_text())["rounds"][0]
    assert [c["node_id"] for c in entry["clients"]] == [1, 2]
    assert entry["refused"][0]["node_id"] == 3 and "budget" in entry["refused"][0]["reason"]
    assert entry["failed"] == [{"node_id": 4, "reason": "ClientApp raised RuntimeError"}]
    assert entry["epsilon"] == pytest.approx(eps[40])  # the refusing owner has spent the most
    assert [c["epsilon"] for c in entry["clients"]] == [pytest.approx(eps[10]), pytest.approx(eps[20])]
    assert "re-derived by the server" in json.loads(recorder.path.read_text())["accountant"]


def test_round_with_no_trained_client_keeps_the_adapter(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    arrays, metrics = AdapterFedAvg(recorder, REFERENCE, min_clients=1).aggregate_train(1, [_reply(4, Error(code=0, reason="timeout"))])
    assert arrays is None and metrics is None


def test_non_private_clients_record_null_epsilon(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    AdapterFedAvg(recorder, REFERENCE, min_clients=1, privacy=NON_PRIVATE).aggregate_train(
        1, [_trained(1, 1.0, sigma=0.0), _trained(2, 2.0, sigma=0.0)])
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    entry = json.loads(recorder.path.read_text())["rounds"][0]
    assert entry["epsilon"] is None and all(c["epsilon"] is None for c in entry["clients"])


def _with(arrays=None, metrics=None, extra=None):
    content = {"arrays": ArrayRecord({k: Array(v) for k, v in ({"w": np.ones((2, 2), np.float32)} if arrays is None else arrays).items()}),
               "metrics": MetricRecord({**_privacy(), **(metrics or {})})}
    return RecordDict({**content, **(extra or {})})


@pytest.mark.parametrize("content, reason", [
    (_with(arrays={"w": np.full((2, 2), np.nan, np.float32)}), "non-finite"),
    (_with(arrays={"w": np.ones((3, 2), np.float32)}), r"expected torch.float32\[2, 2\]"),
    (_with(arrays={"w": np.ones((2, 2), np.float64)}), "float64"),
    (_with(arrays={"w": np.ones((2, 2), np.float32), "base.weight": np.ones(2, np.float32)}), "unexpected"),
    (_with(arrays={}), "missing"),
    (_with(metrics={"num-examples": 500}), "expected exactly"),  # no record count, nor any other key
    (_with(metrics={"loss": 0.1}), "expected exactly"),
    (_with(metrics={"noise_multiplier": float("nan")}), "noise_multiplier"),
    (_with(metrics={"steps": -1}), "steps"),
    (_with(metrics={"epsilon": 0.01}), "claimed epsilon 0.01 but .* give"),  # re-derived, not believed
    (_with(metrics={"delta": 1e-3}), "delta"),
    (_with(metrics={"noise_multiplier": 0.3, "epsilon": privacy.epsilon(0.3, 0.1, 10, 1e-5, "prv")}),
     "noise_multiplier=0.3 is not the plan's"),
    (_with(metrics={"noise_multiplier": 0.0, "epsilon": math.inf}), "noise_multiplier"),
    (_with(extra={"smuggled": ConfigRecord({"loss": "0.1"})}), "records"),
    (RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}),
                 "metrics": ConfigRecord(_privacy())}), "wrong type"),
])
def test_invalid_replies_are_excluded_and_never_poison_the_average(tmp_path, content, reason):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    arrays, _ = AdapterFedAvg(recorder, REFERENCE, min_clients=1).aggregate_train(1, [_trained(1, 2.0), _reply(9, content)])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 2), 2.0))  # only the good reply counts
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    failed = json.loads(recorder.path.read_text())["rounds"][0]["failed"]
    assert failed[0]["node_id"] == 9 and failed[0]["reason"].startswith("invalid reply")
    assert re.search(reason, failed[0]["reason"]), failed[0]["reason"]


def test_fewer_trained_clients_than_min_clients_keep_the_adapter(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    strategy = AdapterFedAvg(recorder, REFERENCE, min_clients=2)
    arrays, _ = strategy.aggregate_train(1, [_trained(1, 2.0), _reply(2, Error(code=0, reason="crash"))])
    assert arrays is None  # one good reply is not enough
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    entry = json.loads(recorder.path.read_text())["rounds"][0]
    assert entry["aggregated"] is False and [c["node_id"] for c in entry["clients"]] == [1]
    assert entry["failed"] == [{"node_id": 2, "reason": "crash"}]


def test_nodes_that_never_reply_are_recorded_as_failed(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    strategy = AdapterFedAvg(recorder, REFERENCE, min_clients=1, timeout=30)
    strategy.sent = {1, 7}  # the round's messages went to nodes 1 and 7; only 1 answered in time
    arrays, _ = strategy.aggregate_train(1, [_trained(1, 2.0)])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 2), 2.0))
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    entry = json.loads(recorder.path.read_text())["rounds"][0]
    assert entry["aggregated"] is True
    assert entry["failed"] == [{"node_id": 7, "reason": "no reply within the round timeout (30s)"}]


# ------------------------------------------------------------------ one malicious owner among five

def _flat(arrays):
    return arrays["w"].numpy().astype(np.float64)


MALICIOUS = {
    "x1e6": lambda: _trained(5, 1.1e6),
    "1e30": lambda: _trained(5, 1e30),
    "sign flip x100": lambda: _trained(5, -110.0),
    "huge weight claim": lambda: _reply(5, _with(metrics={"num-examples": 1e300})),
    "extra metric": lambda: _reply(5, _with(metrics={"loss": 0.1})),
    "metrics as ConfigRecord": lambda: _reply(5, RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}),
                                                             "metrics": ConfigRecord(_privacy())})),
}


class FiveOwners:
    """What FedAvg's configure_train needs of a Grid: five connected nodes."""

    @staticmethod
    def get_node_ids():
        return [1, 2, 3, 4, 5]


@pytest.mark.parametrize("attack", list(MALICIOUS))
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedmedian",
                                      "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_one_malicious_owner_cannot_crash_a_round_or_move_the_model_beyond_the_bound(tmp_path, attack, strategy):
    recorder = RunRecorder(tmp_path, {}, num_rounds=3, run_key="k")
    overrides = "strategy.aggregator.num_malicious_nodes=0" if strategy == "bulyan" else ""  # n >= 4f + 3
    guard = AdapterFedAvg(recorder, REFERENCE, min_clients=2, strategy=strategy, overrides=overrides,
                          max_update_norm="auto")
    honest = [1.0, 1.1, 1.2, 0.9]  # adapters of value v everywhere
    current = REFERENCE
    for server_round in (1, 2, 3):  # every round finishes and aggregates
        guard.configure_train(server_round, current, ConfigRecord(), FiveOwners())
        replies = [_trained(i + 1, v) for i, v in enumerate(honest)] + [MALICIOUS[attack]()]
        arrays, _ = guard.aggregate_train(server_round, replies)
        assert arrays is not None and np.isfinite(_flat(arrays)).all()
        assert arrays["w"].numpy().dtype == np.float32  # the adapter's dtype (FedOpt computes in float64)
        kept = recorder.pending["clients"]
        assert len(kept) + len(recorder.pending["failed"]) == 5
        bound = max(c.get("clipped_to", c["update_norm"]) for c in kept)
        if strategy not in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):  # averaging: the aggregate moves at most the bound
            assert np.linalg.norm(_flat(arrays) - _flat(current)) <= bound * (1 + 1e-6)
        recorder.record_round(server_round, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
        current = arrays
    if strategy in ("fedmedian", "fedtrimmedavg", "krum", "multikrum"):  # robust: at the honest owners' values
        assert 0.9 <= _flat(current).mean() <= 1.2
    else:  # the bound keeps the attacker to at most 3 x the median update
        assert abs(_flat(current).mean()) < 10


def test_update_norm_bound_rejects_or_clips_as_configured(tmp_path):
    for action, expected in (("clip", (1.0 + 2.0 + 4.0) / 3), ("reject", (1.0 + 2.0) / 2)):
        recorder = RunRecorder(tmp_path / action, {}, num_rounds=1, run_key="k")
        guard = AdapterFedAvg(recorder, REFERENCE, max_update_norm=8.0, update_norm_action=action)
        arrays, _ = guard.aggregate_train(1, [_trained(1, 1.0), _trained(2, 2.0), _trained(3, 40.0)])
        np.testing.assert_allclose(_flat(arrays), np.full((2, 2), expected), rtol=1e-6)  # 40 -> norm 80 > 8
        recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
        entry = json.loads(recorder.path.read_text())["rounds"][0]
        assert [c["update_norm"] for c in entry["clients"]][:2] == [pytest.approx(2.0), pytest.approx(4.0)]
        if action == "reject":
            assert "above the bound" in entry["failed"][0]["reason"]
        else:
            assert entry["clients"][2]["clipped_to"] == 8.0


def test_bounding_updates_holds_one_update_at_a_time(tmp_path, monkeypatch):
    """Server memory stays at one round's replies: BoundUpdates never keeps every owner's update at once."""
    import weakref
    from server_app.influence import BoundUpdates
    alive, peak, original = set(), [0], BoundUpdates.update

    def tracked(self, state):
        update = original(self, state)
        tensor = update["w"]
        alive.add(id(tensor))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, id(tensor))
        return update

    monkeypatch.setattr(BoundUpdates, "update", tracked)
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, max_update_norm=8.0)
    arrays, _ = guard.aggregate_train(1, [_trained(n, float(n)) for n in range(1, 9)])  # 5..8 clipped to norm 8
    np.testing.assert_allclose(_flat(arrays), np.full((2, 2), (1 + 2 + 3 + 4 * 5) / 8), rtol=1e-6)
    assert peak[0] <= 2  # one reply's update (and at most the one being replaced), not eight


def test_a_failing_aggregator_loses_the_round_not_the_run(tmp_path, monkeypatch):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(checkpoint.aggregator(guard), "aggregate_train", broken)
    assert guard.aggregate_train(1, [_trained(1, 1.0)]) == (None, None)
    recorder.record_round(1, {"accuracy": 0.5, "loss": float("nan"), "macro_f1": 0.4})
    entry = json.loads(recorder.path.read_text())["rounds"][0]  # valid JSON: the NaN loss is null
    assert entry["aggregated"] is False and entry["loss"] is None


def test_user_level_dp_wraps_the_aggregator_and_reports_its_epsilon(tmp_path):
    from dplora.user_level import user_level_epsilon
    recorder = RunRecorder(tmp_path, {}, num_rounds=2, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, min_clients=2, overrides=(
        "num_rounds=2 strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2 "
        "strategy.user_dp.target_epsilon=4 strategy.user_dp.clipping_norm=1.0"))
    dp = guard
    while not hasattr(dp, "noise_multiplier"):  # Flower's DP wrapper, inside the server's duties
        dp = dp.strategy
    sigma = dp.noise_multiplier

    class TwoOwners:
        @staticmethod
        def get_node_ids():
            return [1, 2]
    for server_round in (1, 2):
        guard.configure_train(server_round, REFERENCE, ConfigRecord(), TwoOwners())
        arrays, _ = guard.aggregate_train(server_round, [_trained(1, 1.0, rounds=2), _trained(2, 3.0, rounds=2)])
        assert arrays is not None  # clipped to norm 1 each, then Gaussian noise
        recorder.record_round(server_round, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    user = json.loads(recorder.path.read_text())["rounds"][-1]["user_level"]
    assert user["releases"] == 2 and user["noise_multiplier"] == sigma and user["clipping_norm"] == 1.0
    assert user["epsilon"] == pytest.approx(user_level_epsilon(sigma, 2, 1e-5), rel=1e-6)
    assert 3.9 <= user["epsilon"] <= 4.0  # calibrated to the target over the run's rounds


POISSON = ("strategy.user_dp.enabled=true strategy.user_dp.sampling=poisson strategy.user_dp.owners_per_round=5 "
           "strategy.user_dp.population=20 strategy.user_dp.clipping_norm=1.0")


class TwentyOwners:
    @staticmethod
    def get_node_ids():
        return list(range(1, 21))


def _poisson(guard):
    """The PoissonUserDP wrapper inside the server's duties."""
    from dplora.user_level import user_level_strategy
    return user_level_strategy(guard)


def test_poisson_user_level_dp_samples_each_owner_at_its_rate_and_from_fresh_entropy(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=4, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, overrides=POISSON + " strategy.user_dp.noise_multiplier=1.0")
    dp = _poisson(guard)
    assert type(dp).__name__ == "PoissonUserDP" and dp.sample_rate == 0.25
    drawn = [[m.metadata.dst_node_id for m in guard.configure_train(1, REFERENCE, ConfigRecord(), TwentyOwners())]
             for _ in range(300)]
    counts = [len(d) for d in drawn]
    assert abs(sum(counts) / (300 * 20) - 0.25) < 0.03  # 6,000 coin flips at 0.25: std 0.0056
    assert len(set(counts)) > 3  # a Poisson (binomial) count, not a fixed one
    per_owner = [sum(node in d for d in drawn) / 300 for node in range(1, 21)]
    assert min(per_owner) > 0.1 and max(per_owner) < 0.4  # every owner at the rate (std 0.025)
    # no seed: two strategies built from the same config draw different owners
    other = AdapterFedAvg(RunRecorder(tmp_path / "b", {}, num_rounds=4, run_key="k"), REFERENCE,
                          overrides=POISSON + " strategy.user_dp.noise_multiplier=1.0")
    again = [[m.metadata.dst_node_id for m in other.configure_train(1, REFERENCE, ConfigRecord(), TwentyOwners())]
             for _ in range(300)]
    assert again != drawn


def test_poisson_user_level_dp_divides_the_clipped_sum_by_the_expected_owners_and_adds_its_noise(tmp_path):
    from dplora.user_level import poisson_user_level_epsilon
    # the sum of clipped updates over owners_per_round, whatever the number of replies
    recorder = RunRecorder(tmp_path / "sum", {}, num_rounds=4, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, overrides=POISSON + " strategy.user_dp.noise_multiplier=1e-9")
    guard.configure_train(1, REFERENCE, ConfigRecord(), TwentyOwners())
    arrays, metrics = _poisson(guard).aggregate_train(1, [_trained(1, 1.0), _trained(2, 0.1)])  # norms 2, 0.2
    np.testing.assert_allclose(_flat(arrays), (0.5 + 0.1) / 5, rtol=1e-6)  # 1.0 clipped to norm 1
    assert metrics["clients"] == 2

    # noise of std noise_multiplier x clipping_norm / owners_per_round, also in a round nobody was sampled in:
    # every round releases (the min_clients guard does not apply), so no decision depends on who was sampled
    big = ArrayRecord({"w": Array(np.zeros((200, 200), dtype=np.float32))})
    recorder = RunRecorder(tmp_path / "noise", {}, num_rounds=4, run_key="k")
    guard = AdapterFedAvg(recorder, big, min_clients=2, overrides=POISSON + " strategy.user_dp.noise_multiplier=2.0")
    guard.configure_train(1, big, ConfigRecord(), TwentyOwners())
    arrays, _ = guard.aggregate_train(1, [])
    assert arrays is not None and np.std(_flat(arrays)) == pytest.approx(2.0 * 1.0 / 5, rel=0.03)
    recorder.record_round(1, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    user = json.loads(recorder.path.read_text())["rounds"][-1]["user_level"]
    assert user["releases"] == 1 and user["sample_rate"] == 0.25 and user["owners_per_round"] == 5
    assert user["epsilon"] == pytest.approx(poisson_user_level_epsilon(2.0, 0.25, 1, 1e-5))
    assert "Poisson" in user["accounting"]


def test_poisson_user_level_dp_calibrates_below_fixed_sampling_and_verify_privacy_rederives_it(tmp_path):
    from experiments.verify_privacy import verify_user_level
    from dplora.user_level import user_level_noise
    recorder = RunRecorder(tmp_path, {}, num_rounds=4, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, overrides=POISSON + " strategy.user_dp.target_epsilon=4")
    dp = _poisson(guard)
    assert dp.noise_multiplier < 0.6 * user_level_noise(4.0, 4, 1e-5)  # amplification: less noise, same budget
    for server_round in range(1, 5):
        guard.configure_train(server_round, REFERENCE, ConfigRecord(), TwentyOwners())
        guard.aggregate_train(server_round, [_trained(1, 1.0)])
        recorder.record_round(server_round, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
    metrics = json.loads(recorder.path.read_text())
    assert 3.9 <= metrics["rounds"][-1]["user_level"]["epsilon"] <= 4.0  # calibrated to the target over 4 rounds
    rows = verify_user_level(metrics, 0.001)
    assert len(rows) == 4 and all(r["ok"] for r in rows)
    metrics["rounds"][-1]["user_level"]["sample_rate"] = 1.0  # a record that claims amplification it did not get
    assert not verify_user_level(metrics, 0.02)[-1]["ok"]


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_a_resumed_run_keeps_counting_the_user_level_releases_before_its_checkpoint(tmp_path, sampling):
    from dplora.user_level import restore_releases, user_level_record, user_level_strategy
    overrides = (POISSON if sampling == "poisson" else
                 "strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2") + \
        " strategy.user_dp.noise_multiplier=1.0"
    fresh, resumed = (AdapterFedAvg(RunRecorder(tmp_path / n, {}, num_rounds=4, run_key="k"), REFERENCE,
                                    overrides=overrides) for n in ("fresh", "resumed"))
    restore_releases(resumed, 3)
    before, after = user_level_record(user_level_strategy(fresh)), user_level_record(user_level_strategy(resumed))
    assert before["releases"] == 0 and after["releases"] == 3 and after["epsilon"] > 1.0


def test_with_user_level_dp_one_owner_cannot_change_how_another_is_bounded(tmp_path):
    """The auto bound's round median depends on every owner's update: under user-level DP the bound of each owner
    comes from its own reply and the public plan only, so adding or removing an owner moves the sum by at most
    the clipping norm."""
    replies = lambda: [_trained(1, 0.01), _trained(2, 0.01), _trained(3, 0.01), _trained(4, 0.5)]  # noqa: E731
    for user_dp, clipped in (("", True), ("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=5 "
                                          "strategy.user_dp.noise_multiplier=1.0 strategy.user_dp.clipping_norm=10", False)):
        recorder = RunRecorder(tmp_path / str(clipped), {}, num_rounds=4, run_key="k")
        guard = AdapterFedAvg(recorder, REFERENCE, overrides=user_dp, max_update_norm="auto")
        guard.configure_train(1, REFERENCE, ConfigRecord(), FiveOwners())
        guard.aggregate_train(1, replies())
        assert ("clipped_to" in recorder.pending["clients"][3]) is clipped  # 3 x the median (0.06) < norm 1.0


@pytest.mark.parametrize("overrides, message", [
    ("strategy=fedadam strategy.user_dp.enabled=true", "strategy.user_dp needs one of fedavg, fedprox"),
    ("strategy.max_update_norm=-1", "strategy.max_update_norm"),
    ("strategy.update_norm_action=ignore", "strategy.update_norm_action"),
    ("strategy.aggregator._target_=os.system", "strategy.aggregator._target_"),
    ("strategy=nonexistent", "strategy"),
    ("strategy.user_dp.enabled=true strategy.user_dp.clipping_norm=0", "strategy.user_dp.clipping_norm"),
    ("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2 strategy.update_norm_action=reject",
     "decide whether the round is released"),
    ("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2 strategy.user_dp.sampling=random",
     "strategy.user_dp.sampling must be one of fixed, poisson"),
    ("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2 strategy.user_dp.sampling=poisson",
     "strategy.user_dp.population is required"),
    (POISSON + " strategy.user_dp.population=4", r"owners_per_round \(5\) must not exceed"),
    (POISSON + " strategy.fraction_train=0.5", "set strategy.fraction_train=1.0"),
    (POISSON + " strategy.user_dp.side=client", "set strategy.user_dp.side=server"),
    (POISSON + " strategy.user_dp.population=0", "strategy.user_dp.population"),
])
def test_bad_strategy_settings_name_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.compose(overrides)


def test_user_level_dp_with_fewer_owners_than_planned_skips_the_round(tmp_path):
    recorder = RunRecorder(tmp_path, {}, num_rounds=1, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, min_clients=2, overrides=(
        "strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=5 strategy.user_dp.noise_multiplier=1.0"))

    class TwoOwners:
        @staticmethod
        def get_node_ids():
            return [1, 2]
    assert list(guard.configure_train(1, REFERENCE, ConfigRecord(), TwoOwners())) == []  # logged, not raised
    assert guard.aggregate_train(1, []) == (None, None)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedavg"])
def test_a_resumed_server_optimizer_continues_exactly_where_the_checkpoint_left_it(tmp_path, strategy):
    """Three rounds straight against two rounds, a checkpoint of the server optimizer's state (as the ServerApp
    writes it), a fresh strategy that loads it, then round 3: the same global adapter, bit for bit. Without the
    state FedAvgM and FedAdam would restart their momentum and moments and end elsewhere."""
    from safetensors.torch import load_file

    from dplora.checkpoint import optimizer_file, replace_checkpoint, save_optimizer_state

    def guard(name):
        return AdapterFedAvg(RunRecorder(tmp_path / name, {}, num_rounds=3, run_key="k"), REFERENCE, min_clients=2,
                             strategy=strategy)

    def round_(g, server_round, current):
        g.configure_train(server_round, current, ConfigRecord(), FiveOwners())
        values = [1.0 + server_round + g.round_offset, 0.5 * (server_round + g.round_offset)]  # the run's round
        arrays, _ = g.aggregate_train(server_round, [_trained(i + 1, v) for i, v in enumerate(values)])
        g.recorder.record_round(server_round, {"accuracy": 0.5, "loss": 1.0, "macro_f1": 0.4})
        return arrays

    straight, current = guard("straight"), REFERENCE
    assert checkpoint.optimizer_state(straight) == {}  # nothing before the first aggregation
    for server_round in (1, 2, 3):
        current = round_(straight, server_round, current)
    first, resumed = guard("first"), guard("resumed")
    after_two = round_(first, 2, round_(first, 1, REFERENCE))
    folder = tmp_path / "checkpoint"  # as the ServerApp saves it after each round, replacing the earlier one
    replace_checkpoint(folder, lambda tmp: save_optimizer_state(tmp, {}, 1), {"round": 1})
    replace_checkpoint(folder, lambda tmp: save_optimizer_state(tmp, checkpoint.optimizer_state(first), 2), {"round": 2})
    assert [p.name for p in folder.glob("server_optimizer-*")] == ["server_optimizer-2.safetensors"]
    state = load_file(optimizer_file(folder, 2))
    assert checkpoint.has_optimizer_state(first) == (strategy != "fedavg") and bool(state) == (strategy != "fedavg")
    checkpoint.load_optimizer_state(resumed, state, REFERENCE.to_torch_state_dict())
    resumed.round_offset = 2  # what the ServerApp gives a run resumed after round 2: Flower counts from 1 again
    np.testing.assert_array_equal(round_(resumed, 1, after_two)["w"].numpy(), current["w"].numpy())
    if strategy != "fedavg":
        fresh = guard("fresh")  # the state is what makes the difference
        fresh.round_offset = 2
        assert not np.array_equal(round_(fresh, 1, after_two)["w"].numpy(), current["w"].numpy())
        with pytest.raises(ValueError, match="does not fit the adapter"):
            checkpoint.load_optimizer_state(guard("bad"), {k: v[:1] for k, v in state.items()},
                                            REFERENCE.to_torch_state_dict())
    with pytest.raises(ValueError, match="'v_t', which FedAvgM does not keep"):
        checkpoint.load_optimizer_state(AdapterFedAvg(RunRecorder(tmp_path / "m", {}, 3, "k"), REFERENCE,
                                                      strategy="fedavgm"),
                                        {"v_t/w": torch.zeros(2, 2)}, REFERENCE.to_torch_state_dict())


class OwnersTwoToFive:
    """A Grid with four connected nodes (ids 2-5: node id 1 is the SuperLink's own)."""

    @staticmethod
    def get_node_ids():
        return [2, 3, 4, 5]


def test_an_owner_lost_mid_round_is_set_aside_under_its_own_id_when_the_superlink_answers_for_it(tmp_path):
    """A node that stops sending heartbeats mid-round gets an answer from Flower's SuperLink in its place: an
    error whose sender is the SuperLink (node 1), replying to the message sent to that node. It is that owner's
    failure (with Flower's reason), not an unexpected reply from node 1 beside an owner that never answered."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    recorder = RunRecorder(tmp_path, {}, num_rounds=4, run_key="k")
    guard = AdapterFedAvg(recorder, REFERENCE, min_clients=2)
    sent = list(guard.configure_train(1, REFERENCE, ConfigRecord(), OwnersTwoToFive()))
    for msg in sent:  # the ids the Grid gives the messages as it pushes them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    lost = next(msg for msg in sent if msg.metadata.dst_node_id == 5)
    reason = "Error: Node Unavailable - The destination node failed to report a heartbeat within 2 x its interval."
    answer = Message(Error(code=0, reason=reason), reply_to=lost)
    answer.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # written by the SuperLink, not by node 5
    arrays, _ = guard.aggregate_train(1, [_trained(n, 1.0) for n in (2, 3, 4)] + [answer])
    assert arrays is not None
    assert recorder.pending["failed"] == [{"node_id": 5, "reason": reason}]
    assert [c["node_id"] for c in recorder.pending["clients"]] == [2, 3, 4]
