"""The server's evaluation of the global adapter: accuracy, loss and macro-F1 (causal LM: by label likelihood,
and exact match of greedy decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from .data import IGNORE_INDEX
from .train import device, sequence_losses, trim_padding


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig) -> dict:
    """Accuracy, loss and macro-F1 on a test split.

    classification: `eval_sets` is [the encoded split]. causal_lm: one encoded copy per label (each with that
    label's answer); the prediction is the label whose answer has the lowest per-token NLL, and the loss is
    the NLL of the true label's answer.
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
        extra["exact_match"] = exact_match(model, eval_sets, labels, cfg)
    model.train(was_training)
    preds = scores.argmax(dim=1)
    return {"accuracy": float((preds == labels).float().mean()), "loss": loss,
            "macro_f1": macro_f1(preds, labels, num_classes=scores.shape[1]), **extra}


@torch.no_grad()
def exact_match(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig) -> float:
    """Causal LM: the share of examples whose greedy decoding, from the prompt alone, reproduces the true
    label's answer tokens exactly (" <label name>" and the end-of-sequence token), as FlowerTune-style
    generation benchmarks score. Prompts are batched by length, left-padded, each batch trimmed."""
    dev = device()
    ids, mask, answer_labels = eval_sets[0].tensors  # every copy holds the same prompts
    prompt_mask = mask * (answer_labels == IGNORE_INDEX)
    truth = [eval_sets[int(y)].tensors[2][i] for i, y in enumerate(labels)]
    truth = [t[t != IGNORE_INDEX] for t in truth]
    steps = max(len(t) for t in truth)
    order = torch.argsort(prompt_mask.sum(dim=1), descending=True, stable=True)
    hits = 0
    for part in order.split(cfg.eval.batch_size):
        width = int(prompt_mask[part].sum(dim=1).max())
        rows, rows_mask = torch.zeros((len(part), width), dtype=torch.long), torch.zeros((len(part), width), dtype=torch.long)
        for j, i in enumerate(part.tolist()):  # the prompt tokens only, left-padded to the batch's longest
            prompt = ids[i][prompt_mask[i].bool()]
            rows[j, width - len(prompt):], rows_mask[j, width - len(prompt):] = prompt, 1
        out = model.generate(input_ids=rows.to(dev), attention_mask=rows_mask.to(dev), max_new_tokens=steps,
                             do_sample=False, pad_token_id=getattr(model.config, "pad_token_id", None))
        generated = out[:, width:].cpu()
        for j, i in enumerate(part.tolist()):
            want = truth[i]
            hits += int(len(generated[j]) >= len(want) and torch.equal(generated[j][:len(want)], want))
    return hits / len(labels)


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp, fn = int(((preds == c) & (labels != c)).sum()), int(((preds != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / num_classes
