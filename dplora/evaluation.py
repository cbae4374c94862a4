"""The server's evaluation of the global adapter: accuracy, loss and macro-F1 (causal LM: by label likelihood,
and exact match of greedy decoding)."""

from __future__ import annotations

import copy
import logging
import re
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from . import train
from .data import IGNORE_INDEX
from .train import device, sequence_losses, trim_padding

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`


class Progress:
    """A long evaluation's progress: every `train.PROGRESS_SECONDS`, "<what>: i of n, x a second, about t s
    left" (generating PubMedQA's answers takes many minutes: a slow run told from a stuck one)."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        if (now := time.perf_counter()) - self.last >= train.PROGRESS_SECONDS and 0 < done < self.total:
            self.last, elapsed = now, now - self.start
            log.info("%s: %d of %d, %.1f a second, about %.0f s left", self.what, done, self.total,
                     done / elapsed, elapsed / done * (self.total - done))


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig,
             tokenizer=None, references: list[str] | None = None, shared_prompt: bool = True) -> dict:
    """Accuracy, loss and macro-F1 on a test split.

    classification: `eval_sets` is [the encoded split]. causal_lm: one encoded copy per label (each with that
    label's answer); the prediction is the label whose answer has the lowest per-token NLL, and the loss is
    the NLL of the true label's answer. Free-text datasets (dataset.answer_field), given the `tokenizer` and the
    `references` (data.reference_answers): exact match of the verdict and ROUGE-L of greedy answers.
    Causal LMs read each prompt once for all candidates (`shared_prompt_scores`); `shared_prompt=False` runs
    it once per candidate (the same scores, up to float rounding: scripts/bench.py measures both).
    """
    task = cfg.model.task
    was_training = model.training
    model.eval()
    shared = None
    if task == "causal_lm" and shared_prompt:
        want_greedy = not (cfg.dataset.get("answer_field") and references is not None)
        shared = shared_prompt_scores(model, eval_sets, cfg, want_greedy)
    if shared is not None:
        scores, greedy = shared
    else:
        scores, greedy = [separate_scores(model, eval_set, cfg) for eval_set in eval_sets], None
    extra = {}
    if task == "classification":
        scores = scores[0]
        loss = float(F.cross_entropy(scores, labels))
    else:
        scores = scores if shared is not None else torch.stack(scores, dim=1)  # (examples, labels): -NLL of each
        loss = float(-scores.gather(1, labels[:, None]).mean())
        if cfg.dataset.get("answer_field") and references is not None:
            extra |= free_text_scores(model, eval_sets[0], labels, cfg, tokenizer, references)
        elif greedy is not None:
            extra["exact_match"] = matches(greedy, eval_sets, labels)
        else:
            extra["exact_match"] = exact_match(model, eval_sets, labels, cfg)
    model.train(was_training)
    preds = scores.argmax(dim=1)
    return {"accuracy": float((preds == labels).float().mean()), "loss": loss,
            "macro_f1": macro_f1(preds, labels, num_classes=scores.shape[1]), **extra}


def separate_scores(model: torch.nn.Module, eval_set: TensorDataset, cfg: DictConfig) -> torch.Tensor:
    """Logits (classification) or -NLL of the answer (causal LM) per example, from one pass over each whole
    sequence: length-sorted batches, each trimmed to its longest example; the set's order restored."""
    tensors, dev = eval_set.tensors, device()
    order = torch.argsort(tensors[1].sum(dim=1), descending=True, stable=True)
    out, progress = [], Progress("evaluation: sequences scored", len(order))
    for done, part in enumerate(order.split(cfg.eval.batch_size)):
        progress(done * cfg.eval.batch_size)
        batch = trim_padding([t[part] for t in tensors], dev)
        if cfg.model.task == "classification":
            out.append(model(input_ids=batch[0], attention_mask=batch[1]).logits.float().cpu())
        else:
            out.append(-sequence_losses(model, batch, cfg.model.task).cpu())
    sorted_scores = torch.cat(out)
    restored = torch.empty_like(sorted_scores)
    restored[order] = sorted_scores
    return restored


def prompts_and_answers(eval_sets: list[TensorDataset]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(each example's prompt tokens, each label's answer tokens) when every candidate set holds the same prompts
    and each label one answer for all examples (the encoding of data.test_sets); else None."""
    prompts, answers = None, []
    for eval_set in eval_sets:
        ids, mask, labels = eval_set.tensors
        prompt_mask = (mask * (labels == IGNORE_INDEX)).bool()
        these = [ids[i][prompt_mask[i]] for i in range(len(ids))]
        if prompts is not None and any(not torch.equal(a, b) for a, b in zip(prompts, these)):
            return None
        prompts = these
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        if not len(ids) or not bool((counts == counts[0]).all()):
            return None
        answer = labels[labels != IGNORE_INDEX].view(len(ids), -1)
        if not bool((answer == answer[0]).all()):
            return None
        answers.append(answer[0])
    return prompts, answers


@torch.no_grad()
def shared_prompt_scores(model: torch.nn.Module, eval_sets: list[TensorDataset], cfg: DictConfig,
                         greedy: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None] | None:
    """Causal LM, label likelihood with one pass over each prompt: the prompt's keys and values are computed once
    and every candidate answer is scored on them (the same -NLL per answer token as `separate_scores`, which
    runs the prompt once per candidate), and, with `greedy`, the greedy continuation as long as the longest
    answer is decoded from them too (exact match). The tokens every prompt begins with (the chat template's
    system turn and the dataset's prompt up to the text: about half of an FPB prompt) are computed once for the
    whole split. None where the sets do not share their prompts."""
    found = prompts_and_answers(eval_sets)
    if found is None:
        return None
    prompts, answers = found
    dev, k = device(), len(answers)
    steps = width_a = max(len(a) for a in answers)
    cand = torch.full((k, width_a), 0, dtype=torch.long)
    cand_mask = torch.zeros((k, width_a), dtype=torch.long)
    for j, a in enumerate(answers):  # right-padded: padding after an answer changes none of its own logits
        cand[j, :len(a)], cand_mask[j, :len(a)] = a, 1
    cand, cand_mask = cand.to(dev), cand_mask.to(dev)
    scores, continuations_out = torch.empty((len(prompts), k)), [None] * len(prompts)
    shared_len = common_prefix_length(prompts)
    prefix_cache = None
    if shared_len:
        prefix_cache = model(input_ids=prompts[0][None, :shared_len].to(dev), use_cache=True,
                             logits_to_keep=1).past_key_values
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    progress = Progress("evaluation: prompts scored", len(order))
    for start in range(0, len(order), cfg.eval.batch_size):
        progress(start)
        part = order[start:start + cfg.eval.batch_size]
        b = len(part)
        width = max(len(prompts[i]) for i in part) - shared_len
        ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for j, i in enumerate(part):  # each prompt's own tokens, left-padded after the shared ones
            rest = prompts[i][shared_len:]
            ids[j, width - len(rest):], mask[j, width - len(rest):] = rest, 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = shared_len + (mask.cumsum(1) - 1).clamp(min=0)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(b)
            mask = torch.cat([torch.ones((b, shared_len), dtype=torch.long, device=dev), mask], dim=1)
        lengths = mask.sum(dim=1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (b, vocab): the first answer token's distribution
        cache = out.past_key_values
        if greedy:  # decode on a copy; the candidates read the prompt's own keys and values
            tokens = greedy_continue(model, copy.deepcopy(cache), first, mask, lengths, steps)
            for j, i in enumerate(part):
                continuations_out[i] = tokens[j].cpu()
        cache.batch_repeat_interleave(k)  # row r of the prompt batch -> rows r*k .. r*k + k-1
        rows, rows_mask = cand.repeat(b, 1), cand_mask.repeat(b, 1)
        full_mask = torch.cat([mask.repeat_interleave(k, 0), rows_mask], dim=1)
        positions = lengths.repeat_interleave(k)[:, None] + torch.arange(width_a, device=dev)[None]
        logits = model(input_ids=rows, attention_mask=full_mask, position_ids=positions,
                       past_key_values=cache).logits.float().log_softmax(-1)
        logp = torch.cat([first.repeat_interleave(k, 0).gather(1, rows[:, :1]),
                          logits[:, :-1].gather(2, rows[:, 1:, None]).squeeze(2)], dim=1)
        nll = -(logp * rows_mask).sum(1) / rows_mask.sum(1).clamp(min=1)
        scores[part] = -nll.view(b, k).cpu()
    return scores, (continuations_out if greedy else None)


def common_prefix_length(prompts: list[torch.Tensor]) -> int:
    """How many tokens every prompt begins with, leaving each at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0][:shortest]
    same = torch.ones(shortest, dtype=torch.bool)
    for p in prompts[1:]:
        same &= p[:shortest] == first
    n = int(same.int().cumprod(0).sum()) if shortest else 0
    return min(n, shortest - 1)


def greedy_continue(model, cache, first: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                    steps: int) -> torch.Tensor:
    """`steps` greedy tokens after the prompts whose keys and values are in `cache` (first from `first`)."""
    token = first.argmax(-1, keepdim=True)
    tokens = [token]
    for step in range(1, steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        logits = model(input_ids=token, attention_mask=mask, position_ids=(lengths + step - 1)[:, None],
                       past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def matches(generated: list[torch.Tensor], eval_sets: list[TensorDataset], labels: torch.Tensor) -> float:
    """The share of examples whose greedy tokens begin with the true label's whole answer (EOS included)."""
    truth = [eval_sets[int(y)].tensors[2][i] for i, y in enumerate(labels)]
    truth = [t[t != IGNORE_INDEX] for t in truth]
    return sum(len(g) >= len(t) and torch.equal(g[:len(t)], t) for g, t in zip(generated, truth)) / len(labels)


@torch.no_grad()
def exact_match(model: torch.nn.Module, eval_sets: list[TensorDataset], labels: torch.Tensor, cfg: DictConfig) -> float:
    """Causal LM: the share of examples whose greedy decoding, from the prompt alone, reproduces the true
    label's answer tokens exactly (the label and the end-of-sequence token), as FlowerTune-style generation
    benchmarks score."""
    longest = max(int((eval_sets[int(y)].tensors[2][i] != IGNORE_INDEX).sum()) for i, y in enumerate(labels))
    return matches(continuations(model, eval_sets[0], cfg, longest), eval_sets, labels)


@torch.no_grad()
def continuations(model: torch.nn.Module, eval_set: TensorDataset, cfg: DictConfig, max_new_tokens: int) -> list:
    """The greedy continuation (token ids) of each example's prompt (the tokens that carry no answer label),
    in the set's order. Prompts are batched by length, left-padded, each batch trimmed."""
    dev = device()
    ids, mask, answer_labels = eval_set.tensors
    prompt_mask = mask * (answer_labels == IGNORE_INDEX)
    order = torch.argsort(prompt_mask.sum(dim=1), descending=True, stable=True)
    out, progress = [None] * len(ids), Progress("evaluation: answers generated", len(ids))
    for done, part in enumerate(order.split(cfg.eval.batch_size)):
        progress(done * cfg.eval.batch_size)
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
