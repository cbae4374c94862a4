"""The offline synthetic dataset (`dataset=synthetic`): product-review sentences with 3 sentiment classes."""

from __future__ import annotations

import random

_ITEMS = ["battery", "screen", "delivery", "price", "support team", "camera", "keyboard", "update",
          "packaging", "sound", "charger", "manual", "app", "strap", "speaker", "warranty"]
_ADJECTIVES = {
    1: ["excellent", "great", "reliable", "impressive", "fast", "pleasant", "solid", "superb", "friendly"],
    -1: ["terrible", "awful", "broken", "slow", "disappointing", "flimsy", "useless", "poor", "rude"],
    0: ["average", "standard", "typical", "ordinary", "unremarkable", "as described", "okay"],
}
_SYNTHETIC_SEED = 20231229  # fixed: the dataset is the same whatever the run's seed


def _clause(rng: random.Random) -> tuple[str, int]:
    polarity = rng.choice([1, -1, 0])
    negated = polarity != 0 and rng.random() < 0.25
    text = f"the {rng.choice(_ITEMS)} was {'not ' if negated else ''}{rng.choice(_ADJECTIVES[polarity])}"
    # "not great" is negative; "not terrible" is only neutral.
    return text, ({1: -1, -1: 0}[polarity] if negated else polarity)


def synthetic_reviews(num_train: int, num_test: int, noise: float = 0.08) -> tuple[list[dict], list[dict]]:
    """Product-review sentences with 3 sentiment classes, generated with a fixed seed.

    A sentence has one or two clauses; a clause's sentiment comes from its adjective, flipped by "not".
    Joined by "but", the second clause decides; by "and", the sign of the sum. `noise` of the labels are
    then redrawn at random, so even a perfect model stays below 100%.
    """
    rng = random.Random(_SYNTHETIC_SEED)
    rows = []
    for _ in range(num_train + num_test):
        first, s1 = _clause(rng)
        if rng.random() < 0.5:
            text, sentiment = first, s1
        else:
            second, s2 = _clause(rng)
            if rng.random() < 0.5:
                text, sentiment = f"{first}, but {second}", s2
            else:
                text, sentiment = f"{first} and {second}", (s1 + s2 > 0) - (s1 + s2 < 0)
        label = sentiment + 1  # negative, neutral, positive
        if rng.random() < noise:
            label = rng.randrange(3)
        rows.append({"text": text[0].upper() + text[1:] + ".", "label": label})
    return rows[:num_train], rows[num_train:]
