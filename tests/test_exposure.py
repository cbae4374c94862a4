"""Exposure (experiments/exposure.py) against cases whose rank is known, and the skew-normal extrapolation against
enumerating a whole (small) secret space."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments import exposure


def test_rank_and_exposure_of_a_known_case():
    candidates = [-5.0, -1.0, -3.0, -2.0, -8.0, -0.5, -7.0]  # log-likelihoods; higher is more likely
    assert exposure.rank(-2.5, candidates) == 4  # -0.5, -1, -2 are more likely
    assert exposure.rank(0.0, candidates) == 1 and exposure.rank(-9.0, candidates) == 8
    assert exposure.rank(-2.0, candidates) == 3  # a tie favours the canary
    assert exposure.exposure(4, 8) == pytest.approx(1.0)  # log2 8 - log2 4
    assert exposure.exposure(1, 1024) == pytest.approx(10.0)
    assert exposure.exposure(1024, 1024) == 0.0
    # the sampled estimate on the whole space is the exact rank
    space = candidates + [-2.5]
    assert exposure.sampled_exposure(-2.5, candidates, len(space)) == pytest.approx(math.log2(8) - math.log2(4))


@pytest.mark.parametrize("bad", [(0, 10), (11, 10), (1, 0)])
def test_exposure_refuses_a_rank_outside_the_space(bad):
    with pytest.raises(ValueError, match="rank must lie in 1..|R|"):
        exposure.exposure(*bad)


def test_refusals_on_too_few_candidates():
    with pytest.raises(ValueError, match="no candidates"):
        exposure.sampled_exposure(0.0, [], 10)
    with pytest.raises(ValueError, match="at least 10 candidates"):
        exposure.extrapolated_exposure(0.0, [1.0] * 50)


@pytest.mark.parametrize("share", [0.5, 0.01, 0.001])
def test_extrapolation_from_a_sample_matches_enumerating_the_space(share):
    """|R| = 100,000 candidates scored (skewed log-likelihoods, as a model's are); a canary with `share` of R
    more likely than it; 2,000 sampled candidates extrapolate its exposure within 1 bit of the exact one (0.6 off
    at 10 bits, where the fit runs out of sample)."""
    space = stats.skewnorm.rvs(-4, loc=-20, scale=4, size=100_000, random_state=1)
    canary = float(np.quantile(space, 1 - share))
    exact = exposure.exposure(exposure.rank(canary, space), len(space) + 1)
    assert exact == pytest.approx(-math.log2(share), abs=0.05)
    sample = np.random.default_rng(0).choice(space, 2_000, replace=False)
    assert exposure.extrapolated_exposure(canary, sample) == pytest.approx(exact, abs=1.0)
