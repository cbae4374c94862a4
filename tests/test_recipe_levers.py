"""The privacy-utility levers: FFA-LoRA (A fixed, only B and the head train and travel) and a head that
starts from the encoder's embeddings of the labels' descriptions."""

import pytest
import torch
from flwr.app import RecordDict
from transformers import AutoModel

from dplora import client, config, data, models
from dplora.evaluation import evaluate

from .test_robustness import task_identity  # noqa: F401 - the fixture is used by name


@pytest.mark.parametrize("overrides", ["model=tiny-llama", "", "model=tiny-gpt2"])
def test_ffa_lora_trains_and_sends_only_b_and_the_head_and_keeps_a_bit_identical(overrides):
    base = (f"{overrides} recipe=plain dataset.num_train=120 dataset.num_test=20 train.batch_size=16 "
            "train.local_epochs=1")
    lora = models.to_arrays(models.build_model(config.compose(base))[0])
    cfg = config.compose(f"{base} model.lora.train_a=false")
    model, _ = models.build_model(cfg)
    arrays = models.to_arrays(model)
    assert set(arrays.keys()) == {k for k in lora.keys() if "lora_A" not in k}
    a_count = sum(a.numpy().size for k, a in lora.items() if "lora_A" in k)
    assert sum(a.numpy().size for a in arrays.values()) == sum(a.numpy().size for a in lora.values()) - a_count
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    assert a_before and all(not p.requires_grad and p.abs().sum() > 0 for n, p in model.named_parameters()
                            if ".lora_A." in n)  # fixed at its random, non-zero initialization
    other, _ = models.build_model(cfg)  # the server and every owner build the same A from the seed
    assert all(torch.equal(p, a_before[n]) for n, p in other.named_parameters() if n in a_before)
    state = RecordDict()
    for server_round in (1, 2):  # two DP rounds through the owner's real code path
        reply = client.train(cfg, arrays, state, server_round=server_round,
                             node_config={"partition-id": 0, "num-partitions": 2})
        assert set(reply["arrays"].keys()) == set(arrays.keys())
        arrays = reply["arrays"]
    trained, _ = client.local_model(cfg)
    assert all(torch.equal(p, a_before[n]) for n, p in trained.named_parameters() if n in a_before)
    start = models.to_arrays(models.build_model(cfg)[0]).to_torch_state_dict()
    moved = {k: float((v - start[k]).abs().max()) for k, v in arrays.to_torch_state_dict().items()}
    assert all(v > 0 for k, v in moved.items() if "lora_B" in k)  # B did train


def _nearest_description(cfg, texts: list[str]) -> torch.Tensor:
    """The zero-shot rule, computed apart from the model: each text's mean-pooled embedding from a fresh copy of
    the pretrained encoder against each description's, by cosine; the nearest wins."""
    tokenizer = models.build_tokenizer(cfg.model)
    encoder = AutoModel.from_pretrained(cfg.model.pretrained).eval()

    def embed(batch):
        enc = tokenizer(batch, truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)

    return (embed(texts) @ embed(list(cfg.dataset.label_descriptions)).T).argmax(dim=1)


def test_head_from_descriptions_predicts_the_nearest_description_before_training():
    cfg = config.compose("dataset.num_test=200 model.head_init=descriptions model.lora.train_a=false "
                         "dataset.label_descriptions='[a complaint about a bad product,a plain factual "
                         "remark,praise for a great product]'")
    model, tokenizer = models.build_model(cfg)
    test = data.load_split(cfg.dataset, "test")
    sets, labels = data.test_sets(cfg, tokenizer)
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=sets[0].tensors[0], attention_mask=sets[0].tensors[1]).logits.argmax(dim=1)
    assert torch.equal(predicted, _nearest_description(cfg, list(test["text"])))
    zero_shot = evaluate(model, sets, labels, cfg)["accuracy"]
    random_head = evaluate(models.build_model(config.compose("dataset.num_test=200"))[0], sets, labels, cfg)
    print(f"zero-shot accuracy {zero_shot:.3f}, random head {random_head['accuracy']:.3f}")
    assert zero_shot == pytest.approx(float((predicted == labels).float().mean()))
    assert torch.bincount(predicted, minlength=3).min() > 0  # not a constant answer


def test_label_names_are_the_default_descriptions():
    cfg = config.compose("model.head_init=descriptions")
    assert models.label_descriptions(cfg.dataset) == ["negative", "neutral", "positive"]
    model, tokenizer = models.build_model(cfg)
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert head.bias.abs().sum() == 0
    norms = head.weight.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand(3))  # equal rows: no label is favoured by its norm alone
    model.eval()
    enc = tokenizer(["negative", "neutral", "positive"], padding=True, return_tensors="pt")
    with torch.no_grad():  # each description is nearest to itself: logit = 20 x its norm / the mean norm
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.equal(logits.argmax(dim=1), torch.arange(3))
    assert logits.diagonal().mean() == pytest.approx(models.HEAD_TEMPERATURE, rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ("model.head_init=descriptions model.pooling=cls", "needs model.pooling=mean"),
    ("model=tiny-llama +model.head_init=descriptions", "causal LM has no head"),
    ("model.head_init=zero", "model.head_init must be one of"),
    ("dataset.label_descriptions='[good,bad]'", "one text per label"),
    ("dataset.label_descriptions='[a,a,b]'", "label_descriptions has duplicates"),
    ("dataset.label_descriptions=3", "label_descriptions must be a non-empty list"),
    ("model.lora.train_a=maybe", "model.lora.train_a must be true or false"),
    ("transport.dtype=bf16", "transport.dtype must be one of fp32, fp16, int8"),
    ("eval.also_test=true", "eval.also_test=true only makes sense with eval.split=validation"),
    ("train.lr_schedule=cosine", "train.lr_schedule must be one of constant, linear"),
])
def test_new_keys_are_validated_with_a_message_naming_them(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.compose(overrides)


@pytest.mark.parametrize("epsilon", ["8", "null"])
def test_linear_schedule_decays_over_the_whole_run_across_rounds(epsilon):
    """Each step's learning rate, seen by the optimizer, falls linearly over the run's planned steps (both
    rounds), DP and non-private alike; constant leaves it at train.learning_rate."""
    from dplora.privacy import PrivacyAccount, steps_per_round
    from dplora.train import learning_rate, train_round

    cfg = config.compose(f"recipe=plain dataset.num_train=64 dataset.num_test=8 train.batch_size=16 "
                         f"train.local_epochs=1 train.learning_rate=0.02 train.lr_schedule=linear num_rounds=2 "
                         f"privacy.target_epsilon={epsilon}")
    model, tokenizer = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tokenizer, cfg)
    per_round = steps_per_round(0.25, 1)
    account = PrivacyAccount.plan(cfg.privacy, 0.25, 2 * per_round)
    seen = []
    for server_round in (1, 2):
        train_round(model, train_set, cfg, account, seed=server_round, steps=per_round,
                    on_backward=lambda opt: seen.append(opt.param_groups[0]["lr"]))
    total = 2 * per_round
    assert seen == pytest.approx([0.02 * (1 - t / total) for t in range(total)])
    constant = config.compose("train.learning_rate=0.02").train
    assert {learning_rate(constant, t, total) for t in range(total)} == {0.02}
