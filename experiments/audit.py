"""An empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023, "Privacy Auditing
with One (1) Training Run"), through the product's own DP path.

m canaries are each put into one owner's data independently with probability 1/2. After one training run an
adversary scores every canary, guesses "in" for the k highest scores and "out" for the k lowest (abstaining
on the rest), and counts its correct guesses v out of r = 2k. If the training run is (epsilon, delta)-DP with
respect to one record, v cannot be much above what randomized response with epsilon would give: the paper's
Theorem (its approximate-DP form) bounds

    P[v correct guesses or more] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v]
                                     + 2 m delta max_{i = 1..v} P[v > Binomial(r, e^eps / (1 + e^eps)) >= v - i] / i

so every epsilon whose bound is below 1 - confidence is rejected: the largest rejected epsilon is a lower
bound on the true epsilon at that confidence. A lower bound above the claimed epsilon means the claim is
false; a bound at or below it is consistent with the claim (it does not prove it). The guess counts k are
fixed before the run, so no choice is made after seeing the outcome.

Two adversaries (experiments/run_audit.py runs them: python scripts/audit.py):
- white-box, the server: it sees the owner's uploaded adapter. Gradient canaries ("Dirac" canaries: a
  gradient of norm C on one adapter coordinate each, a different coordinate per canary) are records of the
  owner's dataset: in every DP step each included canary joins the Poisson batch with the same probability q
  as a real record, and its gradient goes through Opacus' clipping, noise and normalization with the real
  records' gradients. Score: how far the owner's update moved that coordinate against the canary's gradient.
- black-box: only the final global model. Input canaries are mislabeled sentences; score: minus the model's
  loss on the canary's (wrong) label. Also reports the membership-inference AUC.
"""

from __future__ import annotations

import math

import torch
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP, for m canaries (the paper's bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1] (got {epsilon}, {delta})")
    q = 1 / (1 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, window = 0.0, 0.0  # window = P[v > Binomial(r, q) >= v - i]
    for i in range(1, v + 1):
        window += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, window / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon rejected at `confidence` given v of r guesses correct (0 if none is)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(50):  # bisection: p_value grows with epsilon
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def guess(scores: torch.Tensor, included: torch.Tensor, k: int) -> tuple[int, int]:
    """(correct guesses, guesses): "in" for the k highest scores, "out" for the k lowest."""
    if not 0 < 2 * k <= len(scores):
        raise ValueError(f"need 0 < 2k <= canaries (k={k}, {len(scores)} canaries)")
    order = torch.argsort(scores, descending=True)
    top, bottom = order[:k], order[len(order) - k:]
    return int(included[top].sum() + (~included[bottom]).sum()), 2 * k


def auc(scores: torch.Tensor, included: torch.Tensor) -> float:
    """Membership-inference ROC AUC of `scores` for in (True) vs out (False), ties counted half."""
    members, others = scores[included], scores[~included]
    if len(members) == 0 or len(others) == 0:
        return float("nan")
    greater = (members[:, None] > others[None, :]).float().sum()
    ties = (members[:, None] == others[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(members) * len(others)))


class DiracCanaries:
    """m gradient canaries on distinct coordinates of the trainable tensors, each in the owner's data with
    probability 1/2, injected into every DP step as records sampled at the account's rate q."""

    def __init__(self, params: list[torch.nn.Parameter], m: int, clip: float, sample_rate: float,
                 generator: torch.Generator, eligible: list[int] | None = None):
        """`params`: the trainable tensors, in the optimizer's order; `eligible`: the indices of those that may
        hold canaries (default all). An adversary may place its canaries where it likes: coordinates that the
        real data's gradients barely move make them easiest to find, and the guarantee must hold anyway."""
        eligible = list(range(len(params))) if eligible is None else eligible
        sizes = [params[i].numel() for i in eligible]
        if m > sum(sizes):
            raise ValueError(f"{m} canaries need {m} distinct coordinates; the eligible tensors have {sum(sizes)}")
        self.params, self.clip, self.sample_rate, self.generator = params, clip, sample_rate, generator
        flat = torch.randperm(sum(sizes), generator=generator)[:m]
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        which = torch.searchsorted(offsets, flat, right=True) - 1
        self.param_index = torch.tensor(eligible)[which]  # which tensor
        self.coordinate = flat - offsets[which]  # where in it (flattened)
        self.included = torch.rand(m, generator=generator) < 0.5

    def inject(self, optimizer) -> None:
        """Append the rows of this step's sampled canaries to every tensor's per-example gradients."""
        drawn = self.included & (torch.rand(len(self.included), generator=self.generator) < self.sample_rate)
        chosen = drawn.nonzero().flatten()
        for i, p in enumerate(optimizer.params):
            rows = torch.zeros((len(chosen), p.numel()), dtype=p.dtype, device=p.device)
            mine = (self.param_index[chosen] == i).nonzero().flatten()
            rows[mine, self.coordinate[chosen[mine]].to(p.device)] = self.clip  # norm C: not clipped further
            p.grad_sample = torch.cat([p.grad_sample, rows.view(len(chosen), *p.shape)])

    def scores(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
        """How far each canary's coordinate moved against its gradient (SGD steps along minus the gradient)."""
        moved = torch.cat([(b - a).flatten().cpu() for b, a in zip(before, after, strict=True)])
        offsets = torch.tensor([0, *[t.numel() for t in before]]).cumsum(0)
        return moved[offsets[self.param_index] + self.coordinate]
