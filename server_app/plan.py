"""The run's public plan, as the server configured it: what an honest owner's privacy record can be, and how far
an honest owner's update can move the adapter. Both come from public numbers only, before any reply arrives.

Privacy record. An owner's sample rate q is `train.sample_rate` (or, where the run leaves it null, train.batch_size
over the size the owner publishes: then any q in [MIN_SAMPLE_RATE, 1], fixed for that node for the whole run).
From q everything else follows, exactly as the owner computes it (dplora/privacy.py): steps per round
ceil(local_epochs / q), the noise multiplier calibrated once for num_rounds of them, and after k rounds of
training k x steps per round steps, whose epsilon the server computes once per (q, k). So a record is accepted
only with the run's delta, q, the plan's noise multiplier (relative tolerance PLAN_TOLERANCE) and a step count
that is a whole number of rounds, at most the current round's; its epsilon is then the plan's, and a claim more
than EPSILON_TOLERANCE away from it is set aside. No accountant ever runs on a number a reply chose: the cost of
a reply is a few comparisons, plus one noise calibration per distinct q (one per run when train.sample_rate is
set; at most one per node otherwise).

Update bound (AdamW, the recipes' optimizer). Adam moves each coordinate by at most lr x (1 - beta1) /
sqrt(1 - beta2) per step (Kingma and Ba 2015, section 2.1; lr where 1 - beta1 <= sqrt(1 - beta2)), whatever the
gradients, clipped, noised or not; weight decay adds lr x wd x |w| per coordinate. Over a round of ceil(local_epochs
/ q) steps with a fresh optimizer, an honest owner's adapter moves at most the bound `adam_update_bound` gives, in
L2 over its d coordinates. It holds for any number of replies, two included. SGD has no such bound (its steps
scale with the gradient, and DP noise is unbounded), so with train.optimizer=sgd the bound comes from the round's
replies (3 or more) or the previous round's.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

from omegaconf import DictConfig, OmegaConf

from dplora.privacy import PrivacyAccount, epsilon, steps_per_round

PLAN_TOLERANCE = 1e-9  # relative: the owner computes the same numbers with the same code
EPSILON_TOLERANCE = 0.01  # largest relative difference between a claimed and the plan's epsilon
MIN_SAMPLE_RATE = 1e-4  # train.sample_rate=null: below this, publish a smaller size or set train.sample_rate
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which dplora/train.py uses


# One calibration per distinct sample rate (at most one per node: a node's q is fixed at its first reply), never
# evicted: a bounded cache would recalibrate every rate every round once more owners sent distinct ones than it holds.
@cache
def _noise(privacy: str, q: float, planned_steps: int) -> float:
    return PrivacyAccount.plan(OmegaConf.create(privacy), q, planned_steps).noise_multiplier


_epsilon = lru_cache(maxsize=4096)(epsilon)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= PLAN_TOLERANCE * max(abs(a), abs(b))


class PrivacyPlan:
    """Checks a reply's privacy record against the run's public plan and gives the epsilon it spent."""

    def __init__(self, cfg: DictConfig):
        self.privacy, self.train, self.num_rounds = cfg.privacy, cfg.train, cfg.num_rounds
        self.privacy_key = OmegaConf.to_yaml(cfg.privacy)  # hashable: the calibration's cache key
        self.node_rates: dict[int, float] = {}  # train.sample_rate=null: each node's q, fixed at its first reply

    def sample_rate_problem(self, node: int, q: float) -> str | None:
        if self.train.sample_rate is not None:
            return None if _close(q, float(self.train.sample_rate)) else \
                f"sample_rate={q!r} is not the run's train.sample_rate {self.train.sample_rate}"
        if not MIN_SAMPLE_RATE <= q <= 1:
            return f"sample_rate={q!r} outside [{MIN_SAMPLE_RATE}, 1]"
        if not _close(q, self.node_rates.setdefault(node, q)):
            return f"sample_rate={q!r} differs from this node's earlier {self.node_rates[node]!r}"
        return None

    def check(self, node: int, metrics, server_round: int, trained: bool) -> tuple[float | None, str | None]:
        """(the epsilon this record has spent by the plan (None: no DP), None) or (None, why it is not one an
        honest owner sends in round `server_round`)."""
        sigma, q, steps, delta, claimed = (metrics[k] for k in ("noise_multiplier", "sample_rate", "steps",
                                                                 "delta", "epsilon"))
        if delta != self.privacy.delta:
            return None, f"delta {delta} is not the run's {self.privacy.delta}"
        if (problem := self.sample_rate_problem(node, q)) is not None:
            return None, problem
        per_round = steps_per_round(q, self.train.local_epochs)
        rounds = steps / per_round
        if not (float(steps).is_integer() and rounds.is_integer() and (1 if trained else 0) <= rounds <= server_round):
            return None, (f"steps={steps!r} is not a whole number of rounds of {per_round} steps, "
                          f"{'1' if trained else '0'} to {server_round}")
        if self.privacy.target_epsilon is None:  # a non-private run: nothing to account
            if sigma != 0 or not math.isinf(claimed):
                return None, "a privacy record in a non-private run"
            return None, None
        planned = _noise(self.privacy_key, q, self.num_rounds * per_round)
        if not _close(sigma, planned):
            return None, f"noise_multiplier={sigma!r} is not the plan's {planned!r} for sample_rate {q!r}"
        derived = _epsilon(planned, q, int(steps), delta, self.privacy.accountant)
        if not abs(claimed - derived) <= EPSILON_TOLERANCE * derived + 1e-9:
            return None, (f"claimed epsilon {claimed:.4g} but its own noise_multiplier={sigma:.4g}, sample_rate="
                          f"{q:.4g}, steps={int(steps)}, delta={delta:g} give {derived:.4g} "
                          f"({self.privacy.accountant} accountant)")
        if derived > self.privacy.target_epsilon * (1 + EPSILON_TOLERANCE):
            return None, f"epsilon {derived:.4g} exceeds the run's target {self.privacy.target_epsilon}"
        return derived, None


def adam_update_bound(train: DictConfig, steps: int, coordinates: int, global_norm: float) -> float | None:
    """The largest L2 distance an honest owner's adapter can move from the global one in a round of `steps`
    AdamW steps (module docstring); None for another optimizer."""
    if train.optimizer != "adamw":
        return None
    beta1, beta2 = ADAM_BETAS
    per_coordinate = train.learning_rate * max(1.0, (1 - beta1) / math.sqrt(1 - beta2))
    distance = 0.0
    for _ in range(steps):
        distance += per_coordinate * math.sqrt(coordinates) + train.learning_rate * train.weight_decay * (
            global_norm + distance)
    return distance
