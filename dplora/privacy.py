"""Record-level DP-SGD for one data owner: noise calibration, the Opacus engine, and the run-long accountant.

A data owner's guarantee covers the whole run. The noise multiplier is calibrated once, for every step the
run may take (num_rounds x steps per round), and one accountant composes all steps actually taken. The
sample rate, the steps per round, the expected batch size that normalizes the noisy gradient sum, and so
the noise multiplier, are functions of the public configuration only (and, where configured so, of the size
an owner publishes): nothing the owner releases depends on its exact record count except through the DP
mechanism itself. Its state, `PrivacyAccount`, lives in the ClientApp's `context.state`
between rounds (ClientApps are rebuilt each round): epsilons of rounds are never added up.

`(noise_multiplier, sample_rate, steps, delta)` re-derive every epsilon we report, with any accountant for
the Poisson-subsampled Gaussian mechanism (see scripts/verify_privacy.py).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import asdict, dataclass

import torch
from flwr.app import ConfigRecord
from omegaconf import DictConfig
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizerFastGradientClipping, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch.utils.data import Dataset

from . import calibration
from .protocol import PRIVACY_KEYS

STATE_KEY = "privacy"  # key of the account's ConfigRecord in context.state


def _drop_opacus_root_handler() -> None:
    """Opacus calls logging.basicConfig when imported (opacus/utils/module_utils.py): the root logger's handler
    then prints every Flower log line twice (once as `MM/DD/YYYY hh:mm:ss:INFO:...`). Remove exactly it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", None) == OPACUS_LOG_FORMAT:
            root.removeHandler(handler)


OPACUS_LOG_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
_drop_opacus_root_handler()
# How Opacus computes per-example gradient norms; `auto` picks by scripts/bench.py's measurements on a 2-core CPU.
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "functorch")
AUTO_MODE = "hooks"  # for both tasks
AUTO_REASON = ("per-example LoRA gradients are small (r x d per layer): materializing them costs less than "
               "ghost clipping's second backward pass through the whole frozen model (docs/PERFORMANCE.md)")


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
    """This data owner declines the round: it would exceed a privacy budget, or the owner's own settings
    forbid the run (no budget set, non-private not allowed)."""


def sample_rate(batch_size: int, public_size: int) -> float:
    """Poisson sampling rate q = batch_size / public_size (at most 1), from public numbers only."""
    if public_size < 1:
        raise ValueError(f"the public number of records per owner must be >= 1 (got {public_size})")
    return min(1.0, batch_size / public_size)


def steps_per_round(sample_rate: float, local_epochs: int) -> int:
    """DP steps per round: enough Poisson batches to visit the local data `local_epochs` times in
    expectation. Public: a function of the configuration only, never of an owner's record count."""
    return math.ceil(local_epochs / sample_rate - 1e-9)


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
    def plan(cls, privacy_cfg: DictConfig, sample_rate: float, planned_steps: int):
        """Calibrate the noise once so that all `planned_steps` steps stay within the target epsilon; every input
        is public (configuration): the noise multiplier does not depend on the owner's data."""
        p, sigma = privacy_cfg, 0.0
        if p.target_epsilon is not None:  # Opacus' calibration, remembered and checked (dplora/calibration.py)
            sigma = calibration.noise_multiplier(p.target_epsilon, p.delta, sample_rate, planned_steps, p.accountant)
        return cls(target_epsilon=p.target_epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
                   accountant=p.accountant, noise_multiplier=float(sigma), sample_rate=sample_rate,
                   planned_steps=planned_steps)

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

    # -- the Opacus DP-SGD mechanism, with this account's accountant restored -----------------------------

    def make_private(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                     batch_size: int, steps: int, mode: str = "hooks"):
        """Wrap model and optimizer for DP-SGD and draw `steps` Poisson batches from `dataset`.

        Built from Opacus' own pieces as `PrivacyEngine.make_private` builds them (per-example gradient module,
        DPOptimizer, DPDataLoader, accountant hook, ghost-clipping loss), except for the two numbers that
        `make_private` derives from the dataset's size: here the sample rate is this account's (public) and
        the clipped, noised gradient sum is divided by the public expected batch size `batch_size`, not by
        int(len(dataset) x q). So nothing but the DP mechanism itself depends on the owner's record count.

        `mode` is Opacus' grad_sample_mode (hooks | ghost | functorch). Returns (model, optimizer, batches,
        accountant, backward) where `backward(per_sequence_losses)` back-propagates a batch's loss the way the
        mode needs (ghost clipping: two passes). The accountant starts from this account's history.
        Sampling and noise draw from generators seeded by the OS's entropy, never from the run's seed: anyone
        who knows the config (the server does) must not be able to replay the noise and subtract it.
        """
        accountant = create_accountant(mechanism=self.accountant)
        if self.steps:
            accountant.history = [(self.noise_multiplier, self.sample_rate, self.steps)]
        ModuleValidator.validate(model, strict=True)
        kwargs = {"max_grad_norm": self.max_grad_norm} if mode == "ghost" else {}
        module = prepare_module(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **kwargs)
        module.forbid_grad_accumulation()  # Poisson sampling: one batch, one step
        optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)(
            optimizer=optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=batch_size, loss_reduction="mean", generator=_secret_generator())
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        if mode == "ghost":
            criterion = DPLossFastGradientClipping(module, optimizer, PerSequenceLoss(), "mean")

            def backward(losses: torch.Tensor) -> None:  # ghost clipping: two backward passes
                criterion(losses).backward()
        else:
            backward = mean_backward
        batches = poisson_batches(dataset, self.sample_rate, steps, _secret_generator())
        return module, optimizer, batches, accountant, backward

    def record_steps(self, accountant) -> None:
        """Take the step count from the Opacus accountant (the single source of truth)."""
        history = accountant.history
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
        return dict(zip(PRIVACY_KEYS, (math.inf if eps is None else eps, self.noise_multiplier, self.sample_rate,
                                       self.steps, self.delta), strict=True))


def mean_backward(losses: torch.Tensor) -> None:
    losses.mean().backward()


def poisson_batches(dataset: Dataset, sample_rate: float, steps: int, generator: torch.Generator | None = None):
    """Exactly `steps` Poisson batches (each record in each batch with probability `sample_rate`, empty
    batches included), from Opacus' DPDataLoader, iterated as often as needed."""
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    taken = 0
    while taken < steps:
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return


def _secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def empty_gradients(optimizer) -> None:
    """Prepare a DP optimizer's step on an empty Poisson batch: no gradient, but the step still adds noise and
    the accountant still counts it.

    Per-example modes (hooks, functorch) clip `grad_sample`, an empty stack here; ghost clipping's optimizer
    reads the already-clipped sum from `grad`, a zero tensor here."""
    ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
