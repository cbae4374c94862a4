"""The one-run privacy audit: its bound on known inputs, and a quick audit of the product's DP path."""

import math

import pytest
import torch

from experiments import audit, run_audit


def _tail(r, q, v):  # P[Binomial(r, q) >= v], summed exactly
    return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))


def _pmf(r, q, j):
    return math.comb(r, j) * q**j * (1 - q) ** (r - j)


@pytest.mark.parametrize("m, r, v, eps, delta", [(100, 20, 15, 0.5, 0.0), (1000, 200, 150, 1.0, 1e-5),
                                                 (50, 50, 50, 2.0, 1e-3), (10, 4, 0, 0.0, 0.1)])
def test_p_value_is_the_papers_bound(m, r, v, eps, delta):
    q = math.exp(eps) / (1 + math.exp(eps))
    alpha = max([sum(_pmf(r, q, v - j) for j in range(1, i + 1)) / i for i in range(1, v + 1)], default=0.0)
    expected = min(1.0, _tail(r, q, v) + 2 * m * delta * alpha)
    assert audit.p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r", [20, 100, 200])
def test_all_guesses_right_gives_the_closed_form_bound_without_delta(r):
    # p-value q^r = 0.05 at the bound: q = 0.05^(1/r), epsilon = log(q / (1 - q))
    q = 0.05 ** (1 / r)
    assert audit.epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    # delta only loosens it
    assert audit.epsilon_lower_bound(r, r, r, 1e-3) < audit.epsilon_lower_bound(r, r, r, 0.0)


def test_chance_level_guessing_bounds_nothing_and_bad_input_is_refused():
    assert audit.epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert audit.epsilon_lower_bound(1000, 200, 140, 1e-5) < audit.epsilon_lower_bound(1000, 200, 170, 1e-5)
    with pytest.raises(ValueError, match="correct"):
        audit.p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        audit.epsilon_lower_bound(10, 4, 4, 0.0, confidence=1.5)
    with pytest.raises(ValueError, match="2k"):
        audit.guess(torch.zeros(4), torch.zeros(4, dtype=torch.bool), 3)


def test_guesses_and_auc_on_known_scores():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = torch.tensor([True, False, True, False, False, True])
    assert audit.guess(scores, included, 2) == (2, 4)  # top 2: in, out; bottom 2: out (right), in (wrong)
    assert audit.auc(scores, included) == pytest.approx(5 / 9)
    assert audit.auc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0


def test_dirac_canaries_take_distinct_coordinates_and_join_steps_at_rate_q():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(10))]
    canaries = audit.DiracCanaries(params, 20, clip=0.5, sample_rate=1.0, generator=torch.Generator().manual_seed(0))
    flat = [int(i) * 100 + int(c) for i, c in zip(canaries.param_index, canaries.coordinate, strict=True)]
    assert len(set(flat)) == 20 and all(c < params[i].numel() for i, c in zip(canaries.param_index, canaries.coordinate))

    class Optimizer:  # what inject needs of Opacus' DPOptimizer
        pass
    optimizer = Optimizer()
    optimizer.params = params
    for p in params:
        p.grad_sample = torch.zeros((2, *p.shape))
    canaries.inject(optimizer)  # q = 1: every included canary joins
    rows = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)[2:]
    assert len(rows) == int(canaries.included.sum())
    assert torch.allclose(rows.norm(dim=1), torch.full((len(rows),), 0.5))  # norm C each: not clipped further
    with pytest.raises(ValueError, match="distinct coordinates"):
        audit.DiracCanaries(params, 23, clip=1.0, sample_rate=0.1, generator=torch.Generator())


def test_quick_audit_flags_a_broken_mechanism_and_passes_the_calibrated_one():
    calibrated = run_audit.white_box(1.0, "calibrated", m=1000, k=100, seed=0)
    broken = run_audit.white_box(1.0, "broken", m=1000, k=100, seed=1)
    assert calibrated["epsilon_lower_bound"] <= 1.0 < broken["epsilon_lower_bound"]
    assert broken["noise_multiplier"] == pytest.approx(calibrated["noise_multiplier"] / 10)
    assert calibrated["steps"] == 50 and calibrated["guesses"] == 200
