"""Training under attack: one of five owners sends a sign-flipped, amplified update every round."""

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from dplora import client, config, data, models
from dplora.results import RunRecorder
from dplora.evaluation import evaluate
from server_app.strategy import build_strategy

OWNERS = 5
RUN = "privacy=none dataset.num_train=500 dataset.num_test=200 num_rounds=2 train.local_epochs=1 strategy.min_clients=2"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


class Grid:
    @staticmethod
    def get_node_ids():
        return list(range(1, OWNERS + 1))


def _reply(node_id: int, content: RecordDict) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=request)


def federate(strategy: str, attacker: bool, tmp_path) -> float:
    """Accuracy after the run: owners 1-4 honest (simulation partitions), owner 5 honest or the attacker."""
    cfg = config.compose(f"{RUN} strategy={strategy}")
    model, tokenizer = models.build_model(cfg)
    sets, labels = data.test_sets(cfg, tokenizer)
    arrays = models.to_arrays(model)
    guard = build_strategy(cfg, RunRecorder(tmp_path / f"{strategy}-{attacker}", {}, 2, "k"), arrays)
    states = [RecordDict() for _ in range(OWNERS)]
    for server_round in (1, 2):
        guard.configure_train(server_round, arrays, ConfigRecord(), Grid())
        replies = []
        for i in range(OWNERS - 1 if attacker else OWNERS):
            content = client.train(cfg, arrays, states[i], server_round=server_round,
                                   node_config={"partition-id": i, "num-partitions": OWNERS})
            replies.append(_reply(i + 1, content))
        if attacker:  # minus ten times an honest owner's update, with an honest-looking privacy record
            honest, start = replies[0].content["arrays"].to_torch_state_dict(), arrays.to_torch_state_dict()
            flipped = {k: start[k] - 10 * (honest[k] - start[k]) for k in start}
            replies.append(_reply(OWNERS, RecordDict({"arrays": models.ArrayRecord(flipped),
                                                      "metrics": replies[0].content["metrics"]})))
        aggregated, _ = guard.aggregate_train(server_round, replies)
        assert aggregated is not None
        arrays = aggregated
    models.from_arrays(model, arrays)
    return evaluate(model, sets, labels, cfg)["accuracy"]


def test_a_robust_aggregator_keeps_accuracy_near_the_honest_run(tmp_path):
    honest = federate("fedavg", attacker=False, tmp_path=tmp_path)
    attacked_median = federate("fedmedian", attacker=True, tmp_path=tmp_path)
    attacked_mean = federate("fedavg", attacker=True, tmp_path=tmp_path)
    print(f"honest FedAvg {honest:.3f}, attacked FedMedian {attacked_median:.3f}, attacked FedAvg {attacked_mean:.3f}")
    assert honest > 0.55  # the honest federation learns (the majority class is 40%)
    assert attacked_median >= honest - 0.05
    assert attacked_mean < honest - 0.1  # the attack has bite: the plain mean is hurt even with the norm bound
