"""Exposure of a canary (Carlini et al. 2019, "The Secret Sharer"): how much more likely the trained model finds
the secret it saw than the other secrets it could have seen.

A canary is a record template with a secret drawn uniformly from a space R (e.g. every 6-digit number). The
model scores every candidate secret by its log-likelihood after the template's prefix; the canary's rank is its
position when candidates are ordered from most to least likely (1: no candidate is more likely). Then

    exposure = log2 |R| - log2 rank      (bits; 0 for the least likely secret, log2 |R| for the most likely)

A model that never saw the canary ranks it like any other candidate: median exposure about 1 bit. When R is too
large to score whole, a sample of candidates estimates the rank (`sampled_exposure`), or, past the sample's
resolution, a skew-normal fitted to the candidates' negative log-likelihoods extrapolates the share of R more
likely than the canary (`extrapolated_exposure`: exposure = -log2 Pr[candidate at least as likely]), as the
paper and tensorflow_privacy's secret_sharer do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def rank(canary: float, candidates: Sequence[float]) -> int:
    """1 + how many candidates score strictly higher (log-likelihoods: higher is more likely). Ties favour the
    canary, as the paper's ordering does."""
    return 1 + int(np.sum(np.asarray(candidates, dtype=float) > canary))


def exposure(rank_: float, space_size: float) -> float:
    """log2 |R| - log2 rank, in bits."""
    if space_size < 1 or not 1 <= rank_ <= space_size:
        raise ValueError(f"rank must lie in 1..|R| (got rank {rank_}, |R| {space_size})")
    return math.log2(space_size) - math.log2(rank_)


def sampled_exposure(canary: float, candidates: Sequence[float], space_size: float) -> float:
    """Exposure from candidates drawn uniformly from R (other than the canary): the share of them more likely
    than the canary estimates the share of R, so rank ~ 1 + share x (|R| - 1). Resolves at most
    log2(len(candidates)) bits or so; beyond that use `extrapolated_exposure`."""
    if len(candidates) == 0:
        raise ValueError("no candidates to rank the canary among")
    share = float(np.mean(np.asarray(candidates, dtype=float) > canary))
    return exposure(1 + share * (space_size - 1), space_size)


def extrapolated_exposure(canary: float, candidates: Sequence[float]) -> float:
    """-log2 of the probability, under a skew-normal fitted to the candidates' negative log-likelihoods, that a
    random candidate is at least as likely as the canary (its NLL at most the canary's)."""
    nll = -np.asarray(candidates, dtype=float)
    if nll.size < 10 or np.ptp(nll) == 0:
        raise ValueError("a skew-normal needs at least 10 candidates with different scores")
    shape, loc, scale = stats.skewnorm.fit(nll)
    log_cdf = stats.skewnorm.logcdf(-canary, shape, loc, scale)
    return float(-log_cdf / math.log(2))
