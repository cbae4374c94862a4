"""The LLM families the configs name, as small random-weight models built in code (no download): Llama
(SmolLM2, Llama 3.2), Qwen2 (Qwen2.5) and GPT-2 (one fused c_attn Conv1D)."""

import pytest
import torch
from flwr.app import RecordDict

from dplora import client, config, data, models, protocol
from dplora.privacy import PrivacyAccount
from dplora.evaluation import evaluate
from dplora.train import sequence_losses, train_round

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
HUB_FAMILY = {"smollm2-135m": "tiny-llama", "smollm2-360m": "tiny-llama", "llama-3.2-1b": "tiny-llama", "qwen2.5-0.5b": "tiny-qwen2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dp_round_runs_for_every_family(family):
    cfg = config.compose(f"model={family} recipe=plain dataset.num_train=120 dataset.num_test=40 num_rounds=2 "
                         "train.batch_size=16 train.local_epochs=1")
    model, _ = models.build_model(cfg)
    start = models.to_arrays(model)
    reply = client.train(cfg, start, RecordDict(), node_config={"partition-id": 0, "num-partitions": 2},
                         server_round=1)
    metrics, arrays = reply[protocol.METRICS], reply[protocol.ARRAYS].to_torch_state_dict()
    assert metrics["steps"] == 4 and 0 < metrics["epsilon"] <= 8 and metrics["noise_multiplier"] > 0
    assert set(arrays) == set(start.to_torch_state_dict())  # only the adapter travels
    assert arrays and all("lora_" in k for k in arrays)  # causal LM: LoRA only, the LM head stays frozen
    targets = list(cfg.model.lora.target_modules)
    assert all(any(t in k for t in targets) for k in arrays)
    assert any(not torch.equal(v, start.to_torch_state_dict()[k]) for k, v in arrays.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_and_greedy_answers_match_on_a_toy_instruction_task(family):
    """DP-SGD (epsilon 50 over 60 steps) on prompts whose answer is always "positive": the answer's loss
    falls, and greedy decoding goes from never to always producing exactly " positive" + end of sequence."""
    cfg = config.compose(f"model={family} recipe=plain train.batch_size=32 train.learning_rate=0.02 "
                         "privacy.target_epsilon=50")
    model, tokenizer = models.build_model(cfg)
    toy = data.from_rows([{"text": f"the item number {i} arrived", "label": 2} for i in range(64)])
    train_set = data.encode(toy, tokenizer, cfg)
    candidates, labels = [data.encode(toy, tokenizer, cfg, answer=k) for k in range(3)], torch.full((64,), 2)

    def answer_loss() -> float:
        with torch.no_grad():
            return float(sequence_losses(model.eval(), list(train_set.tensors), cfg.model.task).mean())
    before, untrained = answer_loss(), evaluate(model, candidates, labels, cfg)["exact_match"]
    train_round(model.train(), train_set, cfg, PrivacyAccount.plan(cfg.privacy, 0.5, 60), seed=0, steps=60)
    after = evaluate(model, candidates, labels, cfg)
    assert answer_loss() < before - 0.5
    assert untrained == 0.0 and after["exact_match"] >= 0.9 and after["accuracy"] >= 0.9
    # the prompt read once for every candidate (the default) scores as one pass per candidate does
    separate = evaluate(model, candidates, labels, cfg, shared_prompt=False)
    assert separate["accuracy"] == after["accuracy"] and separate["exact_match"] == after["exact_match"]
    assert separate["loss"] == pytest.approx(after["loss"], rel=1e-4)


@pytest.mark.parametrize("hub_config", list(HUB_FAMILY))
def test_hub_configs_target_modules_exist_in_their_family(hub_config):
    hub = config.compose(f"model={hub_config}")
    family = config.compose(f"model={HUB_FAMILY[hub_config]}")
    _, tokenizer = models.build_model(family)
    names = [name for name, _ in models.build_base_model(family, tokenizer).named_modules()]
    for target in hub.model.lora.target_modules:
        assert any(name == target or name.endswith("." + target) for name in names), (hub_config, target)
