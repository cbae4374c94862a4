"""The shape of every server duty: a Flower `Strategy` around another one (as Flower's DP wrappers are).

A wrapper delegates everything to the strategy it wraps except the step it owns; each records what it sets
aside, with the reason, in the run's `RunRecorder`. `server_app/strategy.py` composes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from dplora.results import RunRecorder

log = logging.getLogger("flwr.dplora.server")  # under Flower's logger: shown by `flwr run --stream`


class StrategyWrapper(Strategy):
    """Passes every call on to `strategy`; a subclass overrides the step it owns."""

    def __init__(self, strategy: Strategy, recorder: RunRecorder):
        self.strategy, self.recorder = strategy, recorder

    def summary(self) -> None:
        log.info("%s: %s", type(self).__name__, (type(self).__doc__ or "").strip().splitlines()[0])
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
