"""One local training round (DP and non-DP share it); evaluation is dplora/evaluation.py.

The loss is per sequence (classification: cross-entropy of the example; causal LM: mean NLL over that
example's answer tokens), averaged over the batch. No token count is shared across a batch, so each
example's gradient depends on that example only, as per-example clipping requires.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from .data import IGNORE_INDEX
from .privacy import (
    PrivacyAccount,
    empty_gradients,
    grad_sample_mode,
    mean_backward,
    poisson_batches,
)

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: shown by `flwr run --stream`
PROGRESS_SECONDS = 30.0  # a long round logs its progress this often (steps, examples/s, time left)

# Opacus' hooks fire on frozen inputs (the base model is frozen): expected, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trim_padding(batch: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
    """Move to device and cut the padding columns that no example in the batch uses (classification pads
    on the right, causal LM on the left)."""
    ids, mask, labels = (t.to(dev) for t in batch)
    width = max(int(mask.sum(dim=1).max()), 1)
    if labels.dim() == 2:
        return [ids[:, -width:], mask[:, -width:], labels[:, -width:]]
    return [ids[:, :width], mask[:, :width], labels]


def micro_batches(batch: list[torch.Tensor], size: int, dev: torch.device) -> list[list[torch.Tensor]]:
    """The batch's examples sorted by length (longest first) and cut into micro-batches of at most `size`
    examples, each trimmed to its own longest example: little compute goes to padding."""
    order = torch.argsort(batch[1].sum(dim=1), descending=True, stable=True)
    return [trim_padding([t[part] for t in batch], dev) for part in order.split(size)]


def padded_tokens(parts: list[list[torch.Tensor]]) -> int:
    """Token positions computed for these (micro-)batches: rows x width each."""
    return sum(part[0].shape[0] * part[0].shape[1] for part in parts)


def sequence_losses(model: torch.nn.Module, batch: list[torch.Tensor], task: str,
                    answer_logits_only: bool = True) -> torch.Tensor:
    """The loss of each example in the batch, shape (batch,).

    causal_lm (left-padded, answers at the end): the language-model head runs on the last `span + 1`
    positions only, where `span` covers every answer token in the batch, instead of on every position:
    the vocabulary projection dominates a small model's cost. `answer_logits_only=False` computes all
    logits and then keeps the same ones (scripts/bench.py measures the difference).
    """
    ids, mask, labels = batch
    if task == "classification":
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels, reduction="none")
    first_answer = (labels != IGNORE_INDEX).int().argmax(dim=1)  # the earliest answer token of each row
    span = min(int(ids.shape[1] - first_answer.min()), ids.shape[1] - 1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=span + 1 if answer_logits_only else 0).logits
    logits, targets = logits[:, -(span + 1):-1].float(), labels[:, -span:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    answer = (targets != IGNORE_INDEX).float()
    return (token_loss * answer).sum(dim=1) / answer.sum(dim=1).clamp(min=1.0)


def make_optimizer(params: list[torch.nn.Parameter], train_cfg: DictConfig) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.learning_rate, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)


def learning_rate(train_cfg: DictConfig, step: int, planned_steps: int) -> float:
    """The learning rate of the run's step `step` (counted from 0 over all rounds): `train.learning_rate`
    (lr_schedule=constant), or that decayed linearly over the run's planned steps, to lr / planned_steps at the
    last one (lr_schedule=linear). It depends on public step counts only: post-processing, no privacy cost."""
    if train_cfg.lr_schedule == "linear":
        return train_cfg.learning_rate * (1 - min(step, planned_steps - 1) / planned_steps)
    return train_cfg.learning_rate


def train_round(model: torch.nn.Module, train_set: TensorDataset, cfg: DictConfig,
                account: PrivacyAccount, seed: int, steps: int, on_backward=None, proximal_mu: float = 0.0,
                name: str = "training", answer_logits_only: bool = True) -> dict:
    """Take `steps` Poisson-sampled steps on `train_set` (sample rate `account.sample_rate`); with DP if
    `account.private`. Non-private training samples the same way and averages over the drawn batch.

    Each Poisson batch is computed as length-sorted micro-batches of `train.micro_batch_size` examples, each
    trimmed to its longest example, and makes one step. With DP this is Opacus' own virtual-step mechanism:
    every micro-batch but the last is clipped and added to the running sum with the step skipped
    (`signal_skip_step`); the last adds its clipped gradients, then the noise is added once, the sum divided by
    the expected batch size once, and the accountant steps once. Per-example clipping makes that the same
    mechanism, and the same update, as one pass over the whole batch (tests/test_privacy.py checks it).

    Updates `account.steps` from the accountant. `on_backward(optimizer)`, if given, runs after each backward
    pass, before the optimizer step (scripts/audit.py injects its gradient canaries there).

    The learning rate of each step follows `train.lr_schedule` over the whole run (`learning_rate`): the
    account's step count says where in the run the round starts.

    `proximal_mu` > 0 (FedProx): after every optimizer step each trainable tensor moves towards its value at
    the start of the round (the global adapter) by learning_rate x mu x (w - w_global): a gradient step on
    mu/2 ||w - w_global||^2. That term depends on no record, so it stays outside the DP mechanism (no clipping,
    no noise): post-processing of each DP step, which costs no privacy.

    A round that runs longer than PROGRESS_SECONDS logs, that often, "<name>: step i of n, x examples/s, about
    t s left" (the owner's own log: a slow run told from a stuck one). `answer_logits_only=False`: logits at every
    position (the same update, slower; scripts/bench.py measures it).
    Returns {"steps": steps this round, "seconds": ...}.
    """
    dev = device()
    torch.manual_seed(seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = make_optimizer(params, cfg.train)
    accountant, module, backward = None, model, mean_backward
    if account.private:
        mode, _ = grad_sample_mode(cfg.privacy.grad_sample_mode)
        module, optimizer, batches, accountant, backward = account.make_private(
            model, optimizer, train_set, cfg.train.batch_size, steps, mode)
    else:
        batches = poisson_batches(train_set, account.sample_rate, steps, torch.Generator().manual_seed(seed))
    module.train()
    start, steps_before, taken, examples = time.perf_counter(), account.steps, 0, 0
    last_report = start
    try:
        for batch in batches:
            lr = learning_rate(cfg.train, steps_before + taken, account.planned_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            taken += 1
            optimizer.zero_grad(set_to_none=True)
            if batch[0].shape[0] > 0:
                parts = micro_batches(batch, cfg.train.micro_batch_size, dev)
                for i, part in enumerate(parts):
                    losses = sequence_losses(module, part, cfg.model.task, answer_logits_only)
                    if accountant is None:  # the batch's mean loss, accumulated over its micro-batches
                        (losses.sum() / batch[0].shape[0]).backward()
                        continue
                    backward(losses)
                    if i < len(parts) - 1:  # clip and add to the sum; noise and accountant at the last one
                        optimizer.signal_skip_step(do_skip=True)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            elif accountant is not None:  # an empty Poisson batch is still a DP step: noise, accountant
                empty_gradients(optimizer)
            else:
                continue
            if on_backward is not None:
                on_backward(optimizer)
            optimizer.step()
            if anchor is not None:
                proximal_step(params, anchor, lr * proximal_mu)
            examples += batch[0].shape[0]
            if (now := time.perf_counter()) - last_report >= PROGRESS_SECONDS and taken < steps:
                last_report, elapsed = now, now - start
                log.info("%s: step %d of %d, %.1f examples/s, about %.0f s left", name, taken, steps,
                         examples / elapsed, elapsed / taken * (steps - taken))
    finally:
        if accountant is not None:
            module._close()  # remove Opacus' hooks so `model` is plain again
    if accountant is not None:
        account.record_steps(accountant)
        if account.steps - steps_before != taken:
            raise RuntimeError(f"accountant counted {account.steps - steps_before} steps, the loop {taken}")
    else:
        account.steps += taken
    if taken != steps:
        raise RuntimeError(f"planned {steps} steps, took {taken}")
    return {"steps": taken, "seconds": time.perf_counter() - start}


@torch.no_grad()
def proximal_step(params: list[torch.Tensor], anchor: list[torch.Tensor], rate: float) -> None:
    """w <- w - rate (w - w_global) for every trainable tensor (FedProx's proximal term, outside DP)."""
    for p, a in zip(params, anchor, strict=True):
        p.sub_(rate * (p - a))
