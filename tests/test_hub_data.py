"""Rebuilding the real datasets from the Hub: the conversion and split logic on made-up rows, offline."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from dplora import config, data, hub_data

from .conftest import ROOT


def _fake_hub(counts):
    """A stand-in for datasets.load_dataset: made-up Hub records in each dataset's own format."""
    def load(hub_id, hub_config, split):
        if hub_id == "takala/financial_phrasebank":
            return [{"sentence": f"sentence {i}", "label": i % 3 if i < 3 * counts else 1} for i in range(4846)]
        if hub_id == "stanfordnlp/sst2":
            n = 67349 if split == "train" else 872
            return [{"idx": i, "sentence": f"{split} review {i} ", "label": i % 2} for i in range(n)]
        if hub_id == "qiaojin/PubMedQA":
            decisions = ["yes"] * 552 + ["no"] * 338 + ["maybe"] * 110
            return [{"pubid": 1000 + i, "question": f"q{i}?", "context": {"contexts": ["A.", "B."], "labels": ["x", "y"]},
                     "long_answer": "because", "final_decision": d} for i, d in enumerate(decisions)]
        raise AssertionError(hub_id)
    return load


def test_fpb_splits_80_20_stratified_with_the_shared_sizes():
    # the real label counts of the 50%-agreement sentences: 604 negative, 2879 neutral, 1363 positive
    rows = ([{"sentence": f"n{i}", "label": 0} for i in range(604)] + [{"sentence": f"u{i}", "label": 1} for i in range(2879)]
            + [{"sentence": f"p{i}", "label": 2} for i in range(1363)])
    splits = hub_data.build("fpb", lambda hub_id, cfg, split: rows)
    assert (len(splits["train"]), len(splits["test"])) == (3876, 970)  # ../shared/README.md's sizes
    assert Counter(r["label"] for r in splits["test"]) == {"negative": 121, "neutral": 576, "positive": 273}
    assert {r["text"] for r in splits["train"]}.isdisjoint(r["text"] for r in splits["test"])
    assert hub_data.build("fpb", lambda *a: rows) == splits  # a fixed seed: the same split every time


def test_sst2_and_pubmedqa_rows_match_the_local_format():
    sst2 = hub_data.build("sst2", _fake_hub(0))
    assert (len(sst2["train"]), len(sst2["test"])) == (67349, 872)
    assert sst2["test"][1] == {"text": "validation review 1 ", "label": "positive"}
    pubmedqa = hub_data.build("pubmedqa", _fake_hub(0))
    assert (len(pubmedqa["train"]), len(pubmedqa["test"])) == (800, 200)
    assert pubmedqa["train"][0] == {"id": "1000", "question": "q0?", "context": "A. B.", "long_answer": "because",
                                    "label": "yes"}
    for name, splits in (("sst2", sst2), ("pubmedqa", pubmedqa)):  # rows the local loader accepts as they are
        cfg = config.compose(f"dataset={name} dataset.path=/unused")
        data.check_rows(enumerate(splits["test"], start=1), cfg.dataset, name)


def test_hub_source_uses_the_same_recipe(monkeypatch):
    monkeypatch.setattr(data, "load_hub_split", _fake_hub(1000))
    cfg = config.compose("dataset=fpb dataset.source=hub")
    train, test = data.load_split(cfg.dataset, "train"), data.load_split(cfg.dataset, "test")
    assert len(train) + len(test) == 4846 and abs(len(test) - 0.2 * 4846) <= 2
    assert set(train.column_names) >= {"text", "label"}


def test_bad_splits_and_unknown_recipes_are_refused():
    with pytest.raises(ValueError, match="test_fraction"):
        hub_data.stratified_split([{"label": 1}], 1.5)
    with pytest.raises(ValueError, match="no Hub recipe"):
        hub_data.build("imdb", lambda *a: [])
    with pytest.raises(config.ConfigError, match="dataset.hub_recipe"):
        config.compose("dataset=fpb dataset.source=hub dataset.hub_recipe=imdb")


def test_get_data_offline_fails_at_once_with_what_it_needs(tmp_path):
    run = subprocess.run([sys.executable, "scripts/get_data.py", str(tmp_path / "data")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert run.returncode == 2 and "Hugging Face Hub" in run.stderr and "internet" in run.stderr
    assert not (tmp_path / "data").exists()


def test_get_data_writes_the_folders_the_loaders_read(tmp_path, monkeypatch):
    from experiments import get_data

    monkeypatch.setattr(get_data, "hub_reachable", lambda: None)
    monkeypatch.setattr(get_data, "load_hub_split", _fake_hub(1000))
    assert get_data.main([str(tmp_path), "--datasets", "fpb", "pubmedqa"]) == 0
    cfg = config.compose(f"dataset=pubmedqa data_dir={tmp_path}")
    assert len(data.load_split(cfg.dataset, "train")) == 800
    first = json.loads((tmp_path / "fpb" / "test.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label"}
