"""Adapters: only the trainable tensors cross the wire, as fp32, and round-trip through ArrayRecord."""

import pytest
import torch
from flwr.app import ArrayRecord

from dplora import config, data, models


@pytest.mark.parametrize("overrides", ["model=tiny-llama", "", "model.pooling=cls model.head_init=random"])
def test_only_trainable_adapter_tensors_are_exchanged(overrides):
    cfg = config.compose(f"{overrides} model.lora.train_a=true")  # A trains (and travels) too
    model, _ = models.build_model(cfg)
    arrays = models.to_arrays(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # peft names a trainable parameter "...lora_A.default.weight"; the exchanged key drops the adapter name
    as_exchanged = {n.replace(".default", "").replace(".modules_to_save", ""): p for n, p in trainable.items()}
    assert set(arrays.keys()) == set(as_exchanged)
    assert sum(a.numpy().size for a in arrays.values()) == sum(p.numel() for p in trainable.values())
    assert all(a.dtype == "float32" for a in arrays.values())
    assert any("lora_A" in k for k in arrays.keys()) and any("lora_B" in k for k in arrays.keys())
    if cfg.model.task == "classification":
        assert any("classifier" in k for k in arrays.keys())  # the head trains and travels too
    trainable_count, total = models.num_parameters(model)
    assert trainable_count < 0.01 * total


def test_arrays_round_trip_and_reject_foreign_keys(tiny_cfg):
    model, _ = models.build_model(tiny_cfg)
    state = {k: torch.randn_like(v) for k, v in models.adapter_state(model).items()}
    models.from_arrays(model, ArrayRecord(state))
    assert all(torch.equal(models.adapter_state(model)[k], v) for k, v in state.items())
    key = next(iter(state))
    for bad, message in [({**state, key: torch.full_like(state[key], float("nan"))}, "non-finite"),
                         ({**state, key: state[key][:1]}, "expected torch.float32"),
                         ({**state, key: state[key].double()}, "float64"),
                         ({**state, "base_model.model.lm_head.weight": torch.zeros(3)}, "unexpected")]:
        with pytest.raises(ValueError, match=message):
            models.from_arrays(model, ArrayRecord(bad))


def test_base_model_and_initial_adapter_are_reproducible(tiny_cfg):
    a, _ = models.build_model(tiny_cfg)
    b, _ = models.build_model(tiny_cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_causal_lm_losses_from_answer_logits_match_full_logits_and_ignore_padding(tiny_cfg):
    from dplora.train import sequence_losses, trim_padding
    model, tok = models.build_model(tiny_cfg)
    model.eval()
    encoded = data.encode(data.load_split(tiny_cfg.dataset, "train").select(range(6)), tok, tiny_cfg)
    batch = trim_padding(list(encoded.tensors), torch.device("cpu"))
    with torch.no_grad():
        fast = sequence_losses(model, batch, "causal_lm")
        full = sequence_losses(model, batch, "causal_lm", answer_logits_only=False)
        alone = [sequence_losses(model, trim_padding([t[i:i + 1] for t in encoded.tensors], torch.device("cpu")),
                                 "causal_lm") for i in range(6)]
    assert torch.isfinite(fast).all() and fast.shape == (6,)
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(fast, torch.cat(alone), rtol=1e-4, atol=1e-4)  # left padding changes nothing
