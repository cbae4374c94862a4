"""Record-level DP-SGD for one data owner: noise calibration, the Opacus engine, and the run-long accountant.

A data owner's guarantee covers the whole run. The noise multiplier is calibrated once, for every step the
run may take (num_rounds x local_epochs x steps per epoch at this owner's sample rate), and one accountant
composes all steps actually taken. Its state, `PrivacyAccount`, lives in the ClientApp's `context.state`
between rounds (ClientApps are rebuilt each round): epsilons of rounds are never added up.

`(noise_multiplier, sample_rate, steps, delta)` re-derive every epsilon we report, with any accountant for
the Poisson-subsampled Gaussian mechanism (see scripts/verify_privacy.py).
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import asdict, dataclass

import torch
from flwr.app import ConfigRecord
from omegaconf import DictConfig
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

STATE_KEY = "privacy"  # key of the account's ConfigRecord in context.state

# How Opacus computes per-example gradient norms. `auto` picks from scripts/bench.py's measurements
# on a 2-core CPU (docs/PERFORMANCE.md): LoRA's per-example gradients are r x d per layer, so materializing
# them (hooks) costs less than ghost clipping's second backward pass through the whole frozen model.
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "functorch")
AUTO_MODE = "hooks"  # for both tasks
AUTO_REASON = ("per-example LoRA gradients are small (r x d per layer): materializing them costs less than "
               "ghost clipping's second backward pass (docs/PERFORMANCE.md)")


def grad_sample_mode(configured: str) -> tuple[str, str]:
    """(the Opacus grad_sample_mode to use, why)."""
    if configured != "auto":
        return configured, "set by privacy.grad_sample_mode"
    return AUTO_MODE, AUTO_REASON


class PerSequenceLoss(torch.nn.Module):
    """The criterion Opacus' ghost clipping wraps: its input is already the per-sequence loss vector."""

    reduction = "mean"

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return losses if self.reduction == "none" else losses.mean()


class BudgetExhausted(RuntimeError):
    """Training one more round would take this data owner past its privacy budget."""


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q. Opacus samples with q = 1 / (batches per epoch), so we use the same q."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if num_examples < 1:
        raise ValueError("a data owner needs at least one training example")
    return math.ceil(num_examples / batch_size)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, by a fresh Opacus accountant."""
    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # Opacus' note on the RDP order range is expected at small epsilons
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyAccount:
    """One data owner's privacy state for the whole run. `target_epsilon=None`: no DP (steps still counted)."""

    target_epsilon: float | None
    delta: float
    max_grad_norm: float
    accountant: str
    noise_multiplier: float  # 0.0 without DP
    sample_rate: float
    planned_steps: int
    steps: int = 0

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None

    @classmethod
    def plan(cls, privacy_cfg: DictConfig, num_examples: int, batch_size: int, planned_epochs: int):
        """Calibrate the noise once so that all `planned_epochs` epochs stay within the target epsilon."""
        q = sample_rate(num_examples, batch_size)
        steps = planned_epochs * steps_per_epoch(num_examples, batch_size)
        sigma = 0.0
        if privacy_cfg.target_epsilon is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sigma = get_noise_multiplier(target_epsilon=privacy_cfg.target_epsilon, target_delta=privacy_cfg.delta,
                                             sample_rate=q, steps=steps, accountant=privacy_cfg.accountant,
                                             epsilon_tolerance=0.005 * privacy_cfg.target_epsilon)
        return cls(target_epsilon=privacy_cfg.target_epsilon, delta=privacy_cfg.delta,
                   max_grad_norm=privacy_cfg.max_grad_norm, accountant=privacy_cfg.accountant,
                   noise_multiplier=float(sigma), sample_rate=q, planned_steps=steps)

    def epsilon(self, steps: int | None = None) -> float | None:
        """Epsilon spent after `steps` (default: the steps taken so far); None without DP."""
        if not self.private:
            return None
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps if steps is None else steps,
                       self.delta, self.accountant)

    def check_budget(self, next_steps: int) -> None:
        """Raise BudgetExhausted if `next_steps` more steps would exceed the target epsilon."""
        if not self.private:
            return
        after = self.epsilon(self.steps + next_steps)
        if after > self.target_epsilon:
            raise BudgetExhausted(
                f"refusing to train: {next_steps} more DP steps would bring epsilon from "
                f"{self.epsilon():.3f} to {after:.3f}, above the budget {self.target_epsilon} (delta={self.delta})")

    # -- the Opacus engine, with this account's accountant restored --------------------------------------

    def make_private(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     mode: str = "hooks"):
        """Wrap model, optimizer and loader for DP-SGD (Poisson sampling, per-example clipping, Gaussian noise).

        `mode` is Opacus' grad_sample_mode (hooks | ghost | functorch). Returns (model, optimizer, loader,
        engine, backward) where `backward(per_sequence_losses)` back-propagates a batch's loss the way the mode
        needs (ghost clipping: two passes). The engine's accountant starts from this account's history.
        Sampling and noise draw from generators seeded by the OS's entropy, never from the run's seed: anyone
        who knows the config (the server does) must not be able to replay the noise and subtract it.
        """
        with warnings.catch_warnings():  # "Secure RNG turned off": see README, "Randomness"
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=self.accountant)
        if self.steps:
            engine.accountant.history = [(self.noise_multiplier, self.sample_rate, self.steps)]
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, generator=_secret_generator())
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=True, noise_generator=_secret_generator(),
            grad_sample_mode=mode, criterion=PerSequenceLoss())
        if mode == "ghost":
            model, optimizer, criterion, loader = wrapped

            def backward(losses: torch.Tensor) -> None:  # ghost clipping: two backward passes
                criterion(losses).backward()
        else:
            model, optimizer, loader = wrapped
            backward = mean_backward
        if not math.isclose(loader.sample_rate, self.sample_rate):
            raise RuntimeError(f"Opacus samples at {loader.sample_rate}, the account at {self.sample_rate}")
        return model, optimizer, loader, engine, backward

    def record_steps(self, engine: PrivacyEngine) -> None:
        """Take the step count from the engine's accountant (the single source of truth)."""
        history = engine.accountant.history
        if any((s, q) != (self.noise_multiplier, self.sample_rate) for s, q, _ in history):
            raise RuntimeError(f"unexpected accountant history {history}")
        self.steps = sum(n for _, _, n in history)

    # -- persistence in context.state and the reply's metrics --------------------------------------------

    def to_record(self) -> ConfigRecord:
        state = asdict(self)
        state["target_epsilon"] = math.inf if self.target_epsilon is None else self.target_epsilon
        return ConfigRecord(state)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyAccount:
        state = dict(record)
        state["target_epsilon"] = None if math.isinf(state["target_epsilon"]) else state["target_epsilon"]
        return cls(**state)

    def metrics(self) -> dict[str, float]:
        """What a client reports: everything needed to re-derive its epsilon (inf: no DP)."""
        eps = self.epsilon()
        return {"epsilon": math.inf if eps is None else eps, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps, "delta": self.delta}


def mean_backward(losses: torch.Tensor) -> None:
    losses.mean().backward()


def _secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def empty_batch_step(optimizer) -> None:
    """Step a DP optimizer on an empty Poisson batch: no gradient, but noise is added and the accountant steps."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
