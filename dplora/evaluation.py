"""The server's evaluation of the global adapter: accuracy, loss and macro-F1 (causal LM: by label likelihood,
and exact match of greedy decoding)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from .data import IGNORE_INDEX
from .train import device, sequence_losses, trim_padding


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig,
             tokenizer=None, references: list[str] | None = None) -> dict:
    """Accuracy, loss and macro-F1 on a test split.

    classification: `eval_sets` is [the encoded split]. causal_lm: one encoded copy per label (each with that
    label's answer); the prediction is the label whose answer has the lowest per-token NLL, and the loss is
    the NLL of the true label's answer. Free-text datasets (dataset.answer_field), given the `tokenizer` and the
    `references` (data.reference_answers): exact match of the verdict and ROUGE-L of greedy answers.
    """
    dev, task = device(), cfg.model.task
    was_training = model.training
    model.eval()
    scores = []
    for eval_set in eval_sets:  # length-sorted batches, each trimmed to its longest example; order restored
        tensors = eval_set.tensors
        order = torch.argsort(tensors[1].sum(dim=1), descending=True, stable=True)
        out = []
        for part in order.split(cfg.eval.batch_size):
            batch = trim_padding([t[part] for t in tensors], dev)
            if task == "classification":
                out.append(model(input_ids=batch[0], attention_mask=batch[1]).logits.float().cpu())
            else:
                out.append(-sequence_losses(model, batch, task).cpu())
        sorted_scores = torch.cat(out)
        restored = torch.empty_like(sorted_scores)
        restored[order] = sorted_scores
        scores.append(restored)
    extra = {}
    if task == "classification":
        scores = scores[0]
        loss = float(F.cross_entropy(scores, labels))
    else:
        scores = torch.stack(scores, dim=1)  # (examples, labels): -NLL of each candidate answer
        loss = float(-scores.gather(1, labels[:, None]).mean())
        if cfg.dataset.get("answer_field") and references is not None:
            extra |= free_text_scores(model, eval_sets[0], labels, cfg, tokenizer, references)
        else:
            extra["exact_match"] = exact_match(model, eval_sets, labels, cfg)
    model.train(was_training)
    preds = scores.argmax(dim=1)
    return {"accuracy": float((preds == labels).float().mean()), "loss": loss,
            "macro_f1": macro_f1(preds, labels, num_classes=scores.shape[1]), **extra}


@torch.no_grad()
def exact_match(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig) -> float:
    """Causal LM: the share of examples whose greedy decoding, from the prompt alone, reproduces the true
    label's answer tokens exactly (the label and the end-of-sequence token), as FlowerTune-style generation
    benchmarks score."""
    truth = [eval_sets[int(y)].tensors[2][i] for i, y in enumerate(labels)]
    truth = [t[t != IGNORE_INDEX] for t in truth]
    generated = continuations(model, eval_sets[0], cfg, max(len(t) for t in truth))
    return sum(len(g) >= len(t) and torch.equal(g[:len(t)], t) for g, t in zip(generated, truth)) / len(labels)


@torch.no_grad()
def continuations(model: torch.nn.Module, eval_set: TensorDataset, cfg: DictConfig, max_new_tokens: int) -> list:
    """The greedy continuation (token ids) of each example's prompt (the tokens that carry no answer label),
    in the set's order. Prompts are batched by length, left-padded, each batch trimmed."""
    dev = device()
    ids, mask, answer_labels = eval_set.tensors
    prompt_mask = mask * (answer_labels == IGNORE_INDEX)
    order = torch.argsort(prompt_mask.sum(dim=1), descending=True, stable=True)
    out = [None] * len(ids)
    for part in order.split(cfg.eval.batch_size):
        width = int(prompt_mask[part].sum(dim=1).max())
        rows, rows_mask = torch.zeros((len(part), width), dtype=torch.long), torch.zeros((len(part), width), dtype=torch.long)
        for j, i in enumerate(part.tolist()):  # the prompt tokens only, left-padded to the batch's longest
            prompt = ids[i][prompt_mask[i].bool()]
            rows[j, width - len(prompt):], rows_mask[j, width - len(prompt):] = prompt, 1
        generated = model.generate(input_ids=rows.to(dev), attention_mask=rows_mask.to(dev),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=getattr(model.config, "pad_token_id", None))[:, width:].cpu()
        for j, i in enumerate(part.tolist()):
            out[i] = generated[j]
    return out


@torch.no_grad()
def free_text_scores(model: torch.nn.Module, eval_set: TensorDataset, labels: torch.Tensor, cfg: DictConfig,
                     tokenizer, references: list[str]) -> dict:
    """Free-text answers (dataset.answer_field): greedy answers of up to `eval.max_new_tokens` tokens, scored by
    `exact_match` (the answer's first word is the true label: PubMedQA's yes/no/maybe verdict) and `rouge_l`
    (mean ROUGE-L F1 against the reference answer "<label>. <answer text>", Google's rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    answers = [tokenizer.decode(g, skip_special_tokens=True).strip()
               for g in continuations(model, eval_set, cfg, cfg.eval.max_new_tokens)]
    names = list(cfg.dataset.label_names)
    verdicts = [first_word(a) for a in answers]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, answer)["rougeL"].fmeasure for ref, answer in zip(references, answers, strict=True)]
    return {"exact_match": sum(v == names[int(y)] for v, y in zip(verdicts, labels)) / len(labels),
            "rouge_l": sum(rouge) / len(rouge)}


def first_word(text: str) -> str:
    word = re.search(r"\w+", text)
    return word.group(0).lower() if word else ""


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp, fn = int(((preds == c) & (labels != c)).sum()), int(((preds != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / num_classes
