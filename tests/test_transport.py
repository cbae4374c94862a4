"""The adapter on the wire (transport.dtype): fp16 and int8 round trips, exact format checks on the server,
the ClientApp mod, and a federation whose accuracy does not depend on the format."""

import math

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from omegaconf import OmegaConf

from dplora import client, config, data, models, protocol, transport
from dplora.results import RunRecorder
from dplora.evaluation import evaluate
from server_app.strategy import build_strategy

from .test_robustness import OWNERS, Grid, _reply, task_identity  # noqa: F401 - the fixture is used by name


def _states(width=32):
    gen = torch.Generator().manual_seed(0)
    reference = {"a.lora_A.weight": torch.randn(8, width, generator=gen), "a.lora_B.weight": torch.zeros(width, 8),
                 "head.bias": torch.randn(3, generator=gen)}
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in reference.items()}
    state["head.bias"] = reference["head.bias"].clone()  # a tensor that did not change: an all-zero update
    return state, reference


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_round_trip_error_is_within_the_format_bound(dtype):
    state, reference = _states()
    arrays = transport.encode(state, reference, dtype)
    decoded = transport.decode(arrays, reference, dtype)
    assert set(decoded) == set(state) and all(v.dtype == torch.float32 for v in decoded.values())
    for key, value in state.items():
        update = value - reference[key]
        error = (decoded[key] - value).abs().max().item()
        if dtype == "fp32":
            assert error == 0
        elif dtype == "fp16":  # the update in half precision: relative error 2**-11, plus fp32 re-addition
            assert error <= update.abs().max().item() * 2 ** -11 + 1e-6
        else:  # half a quantization step of the tensor's own scale
            assert error <= update.abs().max().item() / 254 + 1e-6
    assert torch.equal(decoded["head.bias"], state["head.bias"])  # an unchanged tensor arrives exactly


def test_int8_and_fp16_shrink_the_upload_four_and_two_times():
    state, reference = _states(width=384)  # MiniLM's hidden size: each array's header is small beside it
    sizes = {d: transport.wire_bytes(transport.encode(state, reference, d)) for d in ("fp32", "fp16", "int8")}
    payload = sum(v.numel() for v in state.values())
    assert sizes["fp32"] >= 4 * payload
    assert sizes["fp16"] < 0.55 * sizes["fp32"] and sizes["int8"] < 0.3 * sizes["fp32"]


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_decode_accepts_exactly_the_configured_format(dtype):
    state, reference = _states()
    good = transport.encode(state, reference, dtype).to_torch_state_dict()
    key = "a.lora_A.weight"
    bad = [(transport.encode(state, reference, "fp32").to_torch_state_dict(), "expected torch.float16"
            if dtype == "fp16" else "missing"),
           ({k: v for k, v in good.items() if k != key}, "missing"),
           ({**good, "extra": good[key]}, "unexpected"),
           ({**good, key: good[key][:2]}, "expected"),
           ({**good, key: good[key].double()}, "float64")]
    if dtype == "fp16":
        bad.append(({**good, key: torch.full_like(good[key], math.inf)}, "non-finite"))
    else:
        bad += [({**good, key + transport.SCALE: torch.tensor([0.0])}, "positive scale"),
                ({**good, key + transport.SCALE: torch.tensor([math.nan])}, "non-finite"),
                ({**good, key: torch.full_like(good[key], -128)}, "-128"),
                ({**good, key + transport.SCALE: torch.tensor([1.0, 2.0])}, "expected")]
    for arrays, message in bad:
        with pytest.raises(ValueError, match=message):
            transport.decode(ArrayRecord(arrays), reference, dtype)
    with pytest.raises(ValueError, match="transport.dtype"):
        transport.encode(state, reference, "bf16")


def test_transport_mod_encodes_the_reply_and_passes_refusals():
    state, reference = _states()
    request = Message(RecordDict({"arrays": ArrayRecord(reference),
                                  "config": ConfigRecord({protocol.TRANSPORT_DTYPE: "int8"})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def trained(msg, ctx):
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"epsilon": 1.0})}),
                       reply_to=msg)

    def refused(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"epsilon": 1.0}),
                                   "status": ConfigRecord({"refused": "budget"})}), reply_to=msg)

    reply = transport.transport_mod(request, context, trained)
    sent = reply.content["arrays"].to_torch_state_dict()
    assert sent["a.lora_A.weight"].dtype == torch.int8 and "a.lora_A.weight" + transport.SCALE in sent
    decoded = transport.decode(reply.content["arrays"], reference, "int8")
    assert (decoded["a.lora_A.weight"] - state["a.lora_A.weight"]).abs().max() < 1e-3
    assert "arrays" not in transport.transport_mod(request, context, refused).content.array_records
    request.content["config"] = ConfigRecord({})  # no format named: fp32, unchanged
    assert transport.transport_mod(request, context, trained).content["arrays"].to_torch_state_dict()[
        "a.lora_A.weight"].dtype == torch.float32


class AllNodes:
    """The five honest owners and a sixth whose reply comes in the wrong format."""

    @staticmethod
    def get_node_ids():
        return list(range(1, OWNERS + 2))


def test_accuracy_after_a_round_does_not_depend_on_the_wire_format(tmp_path):
    """Five owners train one round (non-private, 2 local epochs); their replies travel in each format, the
    server decodes and averages them: the three global adapters score within a point or two of each other. A
    reply in another format than the configured one is excluded, not averaged."""
    cfg = config.compose("privacy=none dataset.num_train=400 dataset.num_test=200 num_rounds=1 train.local_epochs=2")
    model, tokenizer = models.build_model(cfg)
    sets, labels = data.test_sets(cfg, tokenizer)
    arrays = models.to_arrays(model)
    start = arrays.to_torch_state_dict()
    trained = [client.train(cfg, arrays, RecordDict(), server_round=1,
                            node_config={"partition-id": i, "num-partitions": OWNERS}) for i in range(OWNERS)]
    accuracy, failures = {}, {}
    for dtype in ("fp32", "fp16", "int8"):
        recorder = RunRecorder(tmp_path / dtype, {}, 1, "k")
        guard = build_strategy(OmegaConf.merge(cfg, {"transport": {"dtype": dtype}, "strategy": {"min_clients": 2}}),
                               recorder, arrays)
        guard.configure_train(1, arrays, ConfigRecord(), AllNodes())  # node 6 sampled too: set aside by format
        replies = [_reply(i + 1, RecordDict({"arrays": transport.encode(t["arrays"].to_torch_state_dict(), start,
                                                                        dtype), "metrics": t["metrics"]}))
                   for i, t in enumerate(trained)]
        other = "int8" if dtype == "fp32" else "fp32"
        replies.append(_reply(OWNERS + 1, RecordDict({"arrays": transport.encode(
            trained[0]["arrays"].to_torch_state_dict(), start, other), "metrics": trained[0]["metrics"]})))
        aggregated, _ = guard.aggregate_train(1, replies)
        recorder.record_round(1, {"accuracy": None, "loss": None, "macro_f1": None})
        failures[dtype] = recorder.data["rounds"][0]["failed"]
        models.from_arrays(model, aggregated)
        accuracy[dtype] = evaluate(model, sets, labels, cfg)["accuracy"]
    print(accuracy)
    assert accuracy["fp32"] > 0.5  # it learns (majority class 40%)
    assert all(abs(accuracy[d] - accuracy["fp32"]) <= 0.02 for d in ("fp16", "int8"))
    assert all(len(f) == 1 and f[0]["node_id"] == OWNERS + 1 and "format" in f[0]["reason"]
               for f in failures.values())


def test_wire_format_comparison_reports_each_format_against_fp32_and_refuses_bad_input(tmp_path, monkeypatch):
    from experiments import wire_format
    rows = wire_format.summarize({"fp32": [0.78, 0.79, 0.77], "int8": [0.775, 0.785, 0.78], "fp16": [0.70, 0.71, 0.69]})
    assert rows["fp32"]["mean"] == pytest.approx(0.78) and "against" not in rows["fp32"]
    int8 = rows["int8"]["against"]  # -0.0 +- sqrt(0.01^2/3 + 0.005^2/3): within noise
    assert int8["difference"] == pytest.approx(0.0, abs=1e-12)
    assert int8["standard_error"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.005 ** 2) / 3)) and int8["within_noise"]
    assert not rows["fp16"]["against"]["within_noise"]  # 8 points below, standard error 0.8
    text = wire_format.table({"formats": {"validation": rows, "test": wire_format.summarize(
        {"fp32": [0.8, 0.8, 0.8], "int8": [0.79, 0.8, 0.81], "fp16": [0.7, 0.7, 0.7]})},
        "bytes": {"per_reply": {"fp32": 117772, "int8": 34003, "fp16": 60166},
                  "fraction": {"fp32": 0.0013, "int8": 0.00037, "fp16": 0.00066}}})
    assert ("| int8 | 34,003 (0.037%) | 77.50 / 78.50 / 78.00 | 78.00 ± 0.50 | +0.00 (1.29): within noise | "
            "80.00 ± 1.00 | +0.00 |") in text
    assert "outside noise" in text
    monkeypatch.setattr(wire_format, "DATA", tmp_path / "nowhere")
    for bad in ([str(tmp_path)], [str(tmp_path), "--dtypes", "int8", "int8"], [str(tmp_path), "--dtypes", "bf16"]):
        with pytest.raises(SystemExit) as err:
            wire_format.main(bad)
        assert err.value.code == 2
