"""The project's real datasets rebuilt from the Hugging Face Hub, with the splits ../shared/README.md describes.

- fpb: Financial PhraseBank, the sentences with at least 50% annotator agreement (`takala/financial_phrasebank`,
  config `sentences_50agree`, one split of 4,846), split 80/20 stratified by label with a fixed seed: 3,876 / 970.
- sst2: SST-2 (`stanfordnlp/sst2`): its train split (67,349) and, as the test split, GLUE's labelled validation
  set (872).
- pubmedqa: PubMedQA's expert-labelled PQA-L (`qiaojin/PubMedQA`, config `pqa_labeled`, 1,000), split 800/200
  stratified by label with a fixed seed; `context` is the abstract's sections joined with spaces.

Rows come out in the project's local format (`text`/`label` names; PubMedQA `id`, `question`, `context`,
`long_answer`, `label`). `scripts/get_data.py` writes them as `<name>/train.jsonl` and `test.jsonl`;
`dataset.source=hub` reads them directly. The splitting is done here, from a seed, so anyone rebuilds the same
split sizes and label mix; the rows of ../shared's copy were split once by its authors, with a seed this
project does not have, so individual sentences may fall on the other side of the split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

SPLIT_SEED = 0
FPB_LABELS = ("negative", "neutral", "positive")
SST2_LABELS = ("negative", "positive")


def stratified_split(rows: list[dict], test_fraction: float, seed: int = SPLIT_SEED,
                     key: str = "label") -> tuple[list[dict], list[dict]]:
    """(train, test): round(test_fraction x n) of each label's rows, drawn with `seed`, go to test; both
    keep the input order."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1) (got {test_fraction})")
    rng, test = random.Random(seed), set()
    for label in sorted({str(r[key]) for r in rows}):
        members = [i for i, r in enumerate(rows) if str(r[key]) == label]
        rng.shuffle(members)
        test.update(members[:round(test_fraction * len(members))])
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def fpb_rows(records) -> list[dict]:
    return [{"text": r["sentence"], "label": FPB_LABELS[int(r["label"])]} for r in records]


def sst2_rows(records) -> list[dict]:
    return [{"text": r["sentence"], "label": SST2_LABELS[int(r["label"])]} for r in records]


def pubmedqa_rows(records) -> list[dict]:
    return [{"id": str(r["pubid"]), "question": r["question"], "context": " ".join(r["context"]["contexts"]),
             "long_answer": r["long_answer"], "label": r["final_decision"]} for r in records]


@dataclass(frozen=True)
class Recipe:
    hub_id: str
    hub_config: str | None
    convert: Callable[[list], list[dict]]
    splits: Callable[[Callable[[str], list[dict]]], tuple[list[dict], list[dict]]]  # load -> (train, test)


RECIPES = {
    "fpb": Recipe("takala/financial_phrasebank", "sentences_50agree", fpb_rows,
                  lambda load: stratified_split(load("train"), 0.2)),
    "sst2": Recipe("stanfordnlp/sst2", None, sst2_rows, lambda load: (load("train"), load("validation"))),
    "pubmedqa": Recipe("qiaojin/PubMedQA", "pqa_labeled", pubmedqa_rows,
                       lambda load: stratified_split(load("train"), 0.2)),
}


def build(name: str, load_split: Callable[[str, str, str | None], list]) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows} of dataset `name`; `load_split(hub_id, hub_config, split)` returns the Hub's
    records (datasets.load_dataset in use; rows made up in the tests)."""
    if name not in RECIPES:
        raise ValueError(f"no Hub recipe for {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    train, test = recipe.splits(lambda split: recipe.convert(list(load_split(recipe.hub_id, recipe.hub_config, split))))
    return {"train": train, "test": test}
