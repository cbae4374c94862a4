"""A data owner's privacy ledger: on the owner's own disk, every DP mechanism ever run on its data.

The ledger survives runs and restarts. It holds one entry per run (keyed by the run key the server
created when the run started, which a resumed run reuses): that run's `(noise_multiplier, sample_rate,
steps, delta)`. It serves two purposes:

- resume: a restarted ClientApp (empty `context.state`) continues its run's account from the ledger, so a
  resumed run never resets an accountant; a round the owner already trained before the restart (the server
  was killed before it could record it) is refused rather than paid for twice;
- the owner's total budget: with a budget (node config `privacy-budget`, optional `privacy-budget-delta`,
  default 1e-5), the client composes every run's mechanism with one accountant (never adding epsilons) and
  refuses to train when the next round would exceed the budget, whatever the server asks. Non-private
  training (unbounded epsilon) is refused outright when a budget is set.

File format (JSON, rewritten atomically after every round):
  {"runs": {"<run key>": {"round" (the last server round trained), "noise_multiplier", "sample_rate", "steps", "delta", "target_epsilon" (null: no DP),
                          "max_grad_norm", "accountant", "planned_steps", "updated"}}}
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from opacus.accountants import PRVAccountant

from .privacy import BudgetExhausted, PrivacyAccount
from .results import write_json


class LedgerError(ValueError):
    """The ledger file or its node config is unusable; the message names the file or key."""


class PrivacyLedger:
    def __init__(self, path: str | Path, budget: float | None = None, budget_delta: float = 1e-5):
        self.path = Path(path).expanduser()
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise LedgerError(f"privacy-budget must be a positive number, got {budget!r}")
        if not 0 < budget_delta < 1:
            raise LedgerError(f"privacy-budget-delta must be in (0, 1), got {budget_delta!r}")
        self.budget, self.budget_delta = budget, budget_delta
        self.runs: dict[str, dict] = self._read()

    @classmethod
    def from_node_config(cls, node_config: dict) -> PrivacyLedger | None:
        """The ledger named by node config `privacy-ledger` (with `privacy-budget`), or None."""
        if "privacy-ledger" not in node_config:
            if "privacy-budget" in node_config:
                raise LedgerError("node config privacy-budget needs privacy-ledger (a file to keep the spend in)")
            return None
        try:
            budget = float(node_config["privacy-budget"]) if "privacy-budget" in node_config else None
            delta = float(node_config.get("privacy-budget-delta", 1e-5))
        except ValueError as err:
            raise LedgerError(f"node config privacy-budget / privacy-budget-delta: {err}") from err
        return cls(str(node_config["privacy-ledger"]), budget, delta)

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            runs = json.loads(self.path.read_text())["runs"]
            for key, run in runs.items():
                for field in ("noise_multiplier", "sample_rate", "steps"):
                    if not isinstance(run.get(field), (int, float)) or run[field] < 0:
                        raise ValueError(f"run {key!r}: bad {field} {run.get(field)!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable or corrupt ({err}); "
                              "refusing to train rather than lose track of the spend") from err
        return runs

    def account(self, run_key: str) -> PrivacyAccount | None:
        """This run's account as last recorded (after a restart), or None if the run is new here."""
        run = self.runs.get(run_key)
        if run is None:
            return None
        return PrivacyAccount(**{f.name: run[f.name] for f in fields(PrivacyAccount)})

    def trained_round(self, run_key: str) -> int:
        """The last server round of `run_key` this owner trained (0: none)."""
        return int(self.runs.get(run_key, {}).get("round", 0))

    def record(self, run_key: str, account: PrivacyAccount, server_round: int) -> None:
        """Write this run's account (after each round's training, before the reply leaves)."""
        self.runs[run_key] = {"round": server_round, **asdict(account),
                              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"runs": self.runs})

    def epsilon(self, run_key: str | None = None, account: PrivacyAccount | None = None,
                extra_steps: int = 0) -> float:
        """The owner's total epsilon at the budget's delta: every run in the ledger composed, with `run_key`'s
        entry replaced by `account` plus `extra_steps` more steps. inf if any run trained without DP."""
        runs = dict(self.runs)
        if account is not None:
            runs[run_key] = {"target_epsilon": account.target_epsilon, "noise_multiplier": account.noise_multiplier,
                             "sample_rate": account.sample_rate, "steps": account.steps + extra_steps}
        history = []
        for run in runs.values():
            if run["steps"] == 0:
                continue
            if run["target_epsilon"] is None or run["noise_multiplier"] == 0:
                return math.inf
            history.append((float(run["noise_multiplier"]), float(run["sample_rate"]), int(run["steps"])))
        if not history:
            return 0.0
        accountant = PRVAccountant()  # composes heterogeneous mechanisms tightly
        accountant.history = history
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(delta=self.budget_delta))

    def check(self, run_key: str, account: PrivacyAccount, next_steps: int, allow_non_private: bool = False) -> None:
        """Raise BudgetExhausted if `next_steps` more steps of this run would exceed the owner's budget.

        `allow_non_private` (node config allow-non-private=true): a non-private run is allowed; it has no
        bound, so the ledger's total becomes infinite and every later DP run on this data is refused."""
        if self.budget is None:
            return
        if not account.private and allow_non_private:
            return
        if not account.private:
            raise BudgetExhausted(f"refusing non-private training: the owner's ledger {self.path} holds a "
                                  f"budget of epsilon {self.budget} and training without DP has no bound")
        after = self.epsilon(run_key, account, next_steps)
        if after > self.budget:
            raise BudgetExhausted(
                f"refusing to train: the owner's ledger {self.path} would reach epsilon {after:.3f} "
                f"(delta={self.budget_delta}) over all runs, above the owner's budget {self.budget}")
