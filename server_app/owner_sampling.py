"""User-level DP with Poisson sampling of owners (`strategy.user_dp.sampling=poisson`): amplification by sampling.

Flower's fixed-clipping wrappers sample exactly `owners_per_round` owners and count every round in full: their
accountant has no amplification by sampling. `PoissonUserDP` takes the place of Flower's wrapper around the same
FedAvg and runs the mechanism whose amplification dp-accounting can count (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", the fixed-denominator estimator):

1. every connected owner joins the round independently with probability sample_rate (owners_per_round /
   population), drawn from the operating system's entropy (no seed: who trained must stay unpredictable);
2. each update (reply minus the global adapter, L2 over all tensors) is clipped to clipping_norm;
3. the new adapter is the global one plus the sum of the clipped updates divided by owners_per_round (a public
   constant, not the number that replied) plus Gaussian noise of std noise_multiplier x clipping_norm /
   owners_per_round, drawn from a generator seeded from the operating system's entropy.

Adding or removing one owner's data moves the sum by at most clipping_norm, whether or not it was sampled or
replied, so each round is a Poisson-subsampled Gaussian mechanism of multiplier noise_multiplier at that rate, and
every round releases (an empty round too: noise alone), so no decision depends on who was sampled. The rounds
compose in dp-accounting's RDP accountant (dplora/user_level.py); scripts/verify_privacy.py re-derives them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from dplora import protocol
from dplora.privacy import _secret_generator  # the DP-SGD noise's OS-seeded generator
from dplora.user_level import POISSON_ACCOUNTING, poisson_user_level_epsilon
from server_app.influence import update_norm
from server_app.wrapper import log


class PoissonUserDP(Strategy):
    """User-level DP-FedAvg over Poisson-sampled owners: clipped sum / owners_per_round + Gaussian noise."""

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 owners_per_round: int, sample_rate: float, delta: float):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"the sample rate must lie in (0, 1] (got {sample_rate})")
        self.strategy = strategy
        self.noise_multiplier, self.clipping_norm, self.delta = noise_multiplier, clipping_norm, delta
        self.owners_per_round, self.sample_rate = owners_per_round, sample_rate
        self.releases = 0
        self.sampled = 0  # owners sampled in the latest round
        self.current: ArrayRecord | None = None
        self._coins = random.SystemRandom()

    def summary(self) -> None:
        log.info("PoissonUserDP: owners sampled at rate %.4g, clipping norm %g, noise multiplier %.4g, sum / %d",
                 self.sample_rate, self.clipping_norm, self.noise_multiplier, self.owners_per_round)
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        """The aggregator's messages to every connected owner (strategy.fraction_train 1), each kept with
        probability sample_rate."""
        self.current = arrays
        offered = list(self.strategy.configure_train(server_round, arrays, config, grid))
        messages = [msg for msg in offered if self._coins.random() < self.sample_rate]
        self.sampled = len(messages)
        log.info("round %d: %d of %d connected owners sampled (Poisson, rate %.4g)", server_round, len(messages),
                 len(offered), self.sample_rate)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord, MetricRecord]:
        replies = list(replies)
        if self.current is None:
            raise RuntimeError("aggregate_train before configure_train: no global adapter to update")
        current = self.current.to_torch_state_dict()
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
        for msg in replies:
            state = msg.content[protocol.ARRAYS].to_torch_state_dict()
            update = {k: state[k].double() - current[k].double() for k in current}
            norm = update_norm(update)
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for k, u in update.items():
                total[k] += u * scale
        std = self.noise_multiplier * self.clipping_norm / self.owners_per_round
        noise = _secret_generator()
        new = {k: (current[k].double() + total[k] / self.owners_per_round
                   + torch.normal(0.0, std, size=tuple(v.shape), generator=noise, dtype=torch.float64)
                   ).to(current[k].dtype).contiguous()
               for k, v in current.items()}
        self.releases += 1
        log.info("round %d: %d replies, clipped to %g, summed / %d, Gaussian noise of std %.4g added", server_round,
                 len(replies), self.clipping_norm, self.owners_per_round, std)
        metrics = (self.strategy.train_metrics_aggr_fn([msg.content for msg in replies], self.strategy.weighted_by_key)
                   if replies else MetricRecord({"clients": 0}))
        return ArrayRecord(new), metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def user_level_record(self) -> dict:
        """The user-level guarantee so far, with the inputs that re-derive it."""
        return {"epsilon": poisson_user_level_epsilon(self.noise_multiplier, self.sample_rate, self.releases,
                                                      self.delta),
                "delta": self.delta, "releases": self.releases, "noise_multiplier": self.noise_multiplier,
                "clipping_norm": self.clipping_norm, "owners_per_round": self.owners_per_round,
                "sample_rate": self.sample_rate, "sampled": self.sampled, "accounting": POISSON_ACCOUNTING}
