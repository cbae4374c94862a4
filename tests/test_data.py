"""Data: the synthetic set, local JSON Lines files (and their errors), partitions, tokenization."""

import csv
import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from dplora import config, data, models, synthetic
from dplora.data import DataError


def test_synthetic_set_is_fixed_balanced_and_noisy():
    train, test = synthetic.synthetic_reviews(2000, 500)
    assert (train, test) == synthetic.synthetic_reviews(2000, 500)
    counts = Counter(r["label"] for r in train)
    assert len(counts) == 3 and max(counts.values()) / len(train) < 0.45  # no dominant class
    assert not {r["text"] for r in test} <= {r["text"] for r in train}  # not just a copy


def test_a_non_private_model_learns_the_synthetic_set_but_not_perfectly():
    cfg = config.compose("privacy=none recipe=plain dataset.num_train=600 dataset.num_test=300 train.local_epochs=2")
    from dplora.privacy import PrivacyAccount, steps_per_round
    from dplora.evaluation import evaluate
    from dplora.train import train_round
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
    sets, labels = data.test_sets(cfg, tok)
    majority = Counter(labels.tolist()).most_common(1)[0][1] / len(labels)
    q = cfg.train.batch_size / len(train_set)
    account = PrivacyAccount.plan(cfg.privacy, q, 2 * steps_per_round(q, 1))
    train_round(model, train_set, cfg, account, seed=0, steps=steps_per_round(q, cfg.train.local_epochs))
    accuracy = evaluate(model, sets, labels, cfg)["accuracy"]
    assert majority + 0.15 < accuracy < 0.99


FPB_LIKE = [{"text": f"Company {i} reported {['lower', 'flat', 'higher'][i % 3]} sales .",
             "label": ["negative", "neutral", "positive"][i % 3]} for i in range(20)]


@pytest.fixture
def fpb_cfg(tmp_path):
    """dataset=fpb's config on a small folder of FPB-format rows this test writes (no real data needed)."""
    folder = tmp_path / "fpb"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FPB_LIKE))
    return config.compose(f"dataset=fpb dataset.path={folder}")


def test_local_jsonl_reads_text_and_label_names(fpb_cfg):
    test = data.load_split(fpb_cfg.dataset, "test")
    assert len(test) == 20 and test["label"][:3] == [0, 1, 2]


def test_the_real_datasets_have_the_documented_splits(shared_data):
    sizes = {}
    for name in ("fpb", "sst2", "pubmedqa"):
        cfg = config.compose(f"dataset={name} data_dir={shared_data}")
        sizes[name] = (len(data.load_split(cfg.dataset, "train")), len(test := data.load_split(cfg.dataset, "test")))
        if name == "fpb":  # the majority class (neutral) of FPB's test split, quoted in the docs
            assert Counter(test["label"]).most_common(1)[0][1] / len(test) == pytest.approx(0.594, abs=0.001)
    assert sizes == {"fpb": (3876, 970), "sst2": (67349, 872), "pubmedqa": (800, 200)}


def _write(path, lines):
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, message", [
    ([], r"train\.jsonl: no records \(empty file\)"),
    (['{"text": "ok", "label": "positive"}', '{"label": "positive"}'], r"train\.jsonl:2: missing field 'text'"),
    (['{"text": "ok"}'], r"train\.jsonl:1: missing field 'label'"),
    (['{"text": "ok", "label": "great"}'], r"train\.jsonl:1: unknown label 'great'"),
    (['{"text": "ok", "label": "positive"}', "{not json"], r"train\.jsonl:2: not valid JSON"),
    (['["text", "label"]'], r"train\.jsonl:1: expected a JSON object"),
    (['{"text": 3, "label": "positive"}'], r"train\.jsonl:1: field 'text' must be a string"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, fpb_cfg, lines, message):
    folder = _write(tmp_path / "bad", lines)
    cfg = OmegaConf.merge(fpb_cfg, {"dataset": {"path": str(folder)}})
    with pytest.raises(DataError, match=message):
        data.load_split(cfg.dataset, "train")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_read_like_jsonl(tmp_path, fpb_cfg, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = FPB_LIKE
    path = tmp_path / f"test.{fmt}"
    if fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = OmegaConf.merge(fpb_cfg, {"dataset": {"path": str(tmp_path), "format": fmt}})
    loaded = data.load_split(cfg.dataset, "test")
    names = list(cfg.dataset.label_names)
    assert loaded["text"] == [r["text"] for r in rows] and loaded["label"] == [names.index(r["label"]) for r in rows]


def test_malformed_csv_and_parquet_name_the_file_and_row(tmp_path, fpb_cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "train.csv").write_text("text,label\nfine,positive\nno label here\n")
    cfg = OmegaConf.merge(fpb_cfg, {"dataset": {"path": str(tmp_path), "format": "csv"}})
    with pytest.raises(DataError, match=r"train\.csv:3: missing field 'label'"):
        data.load_split(cfg.dataset, "train")
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": "positive"}, {"text": "b", "label": "meh"}]),
                   tmp_path / "train.parquet")
    cfg = OmegaConf.merge(cfg, {"dataset": {"format": "parquet"}})
    with pytest.raises(DataError, match=r"train\.parquet:2: unknown label 'meh'"):
        data.load_split(cfg.dataset, "train")
    (tmp_path / "test.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"test\.parquet: not a readable Parquet file"):
        data.load_split(cfg.dataset, "test")


def test_missing_file_names_the_path(tmp_path, fpb_cfg):
    cfg = OmegaConf.merge(fpb_cfg, {"dataset": {"path": str(tmp_path)}})
    with pytest.raises(DataError, match="test.jsonl: file not found"):
        data.load_split(cfg.dataset, "test")


def test_iid_partitions_cover_the_data_once_with_a_fixed_seed():
    train = data.load_split(config.compose("").dataset, "train")
    parts = [data.partition(train, 3, i, seed=0) for i in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert sorted(t for p in parts for t in p["text"]) == sorted(train["text"])
    assert data.partition(train, 3, 1, seed=0)["text"] == parts[1]["text"]
    assert data.partition(train, 3, 1, seed=1)["text"] != parts[1]["text"]
    with pytest.raises(DataError, match="partition-id 3"):
        data.partition(train, 3, 3, seed=0)


def test_dirichlet_partitions_skew_labels_and_are_reproducible():
    cfg = config.compose("partitioner=dirichlet partitioner.alpha=0.3")  # the synthetic set: 2,000, 3 classes
    train = data.load_split(cfg.dataset, "train")
    parts = [data.partition(train, 5, i, 0, cfg.partitioner) for i in range(5)]
    assert sum(len(p) for p in parts) == len(train) and min(len(p) for p in parts) >= 10
    overall = Counter(train["label"])
    shares = [Counter(p["label"])[1] / len(p) for p in parts]  # share of "neutral" per owner
    assert max(shares) - min(shares) > 0.2  # IID shares would all sit near the overall share
    iid = [Counter(data.partition(train, 5, i, 0)["label"])[1] / (len(train) / 5) for i in range(5)]
    assert max(iid) - min(iid) < 0.1 and abs(iid[0] - overall[1] / len(train)) < 0.05
    again = data.partition(train, 5, 2, 0, cfg.partitioner)
    assert again["text"] == parts[2]["text"]
    assert data.partition(train, 5, 2, 1, cfg.partitioner)["text"] != parts[2]["text"]
    assert "negative" in data.label_mix(parts[0], list(cfg.dataset.label_names))


def test_causal_lm_encoding_puts_loss_on_the_answer_only(tiny_cfg):
    _, tok = models.build_model(tiny_cfg)
    ds = data.load_split(tiny_cfg.dataset, "test").select(range(4))
    ids, mask, labels = data.encode(ds, tok, tiny_cfg).tensors
    for i, row in enumerate(ds):
        answer = labels[i][labels[i] != data.IGNORE_INDEX].tolist()
        name = tiny_cfg.dataset.label_names[row["label"]]
        assert tok.decode(answer[:-1]).strip() == name and answer[-1] == tok.eos_token_id
        assert mask[i].sum() == (ids[i] != tok.pad_token_id).sum()
    # scoring another label writes that label's answer instead
    _, _, other = data.encode(ds, tok, tiny_cfg, answer=0).tensors
    assert all(tok.decode(o[o != data.IGNORE_INDEX].tolist()[:-1]).strip() == "negative" for o in other)


def test_pair_inputs_for_pubmedqa_classification(tmp_path):
    rows = [{"id": str(i), "question": f"Does drug {i} help?", "context": "A trial of the drug. " * 30,
             "long_answer": "It does.", "label": ["yes", "no", "maybe"][i % 3]} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.compose(f"dataset=pubmedqa dataset.path={tmp_path} model.max_length=64")
    _, tok = models.build_model(cfg)
    ds = data.load_split(cfg.dataset, "test").select(range(3))
    ids, _, labels = data.encode(ds, tok, cfg).tensors
    assert ids.shape == (3, 64) and torch.equal(labels, torch.tensor(ds["label"]))
    assert all((row == tok.sep_token_id).sum() == 2 for row in ids)  # question [SEP] context [SEP]


def test_label_map_renames_raw_labels(tmp_path):
    cfg = config.compose("dataset=boolq")  # a Hub config; read a local file with its fields and label map
    path = tmp_path / "boolq.jsonl"
    path.write_text(json.dumps({"question": "is it", "passage": "it is", "answer": True}) + "\n"
                    + json.dumps({"question": "is it", "passage": "it is not", "answer": False}) + "\n")
    assert [r["label"] for r in data.read_rows(path, cfg.dataset)] == [1, 0]  # label_names: no, yes
    path.write_text(json.dumps({"question": "q", "passage": "p", "answer": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"boolq.jsonl:1: unknown label 'maybe'"):
        data.read_rows(path, cfg.dataset)


def test_max_train_keeps_a_fixed_subsample_whatever_the_seed():
    picks = []
    for seed in (0, 1):
        cfg = config.compose(f"dataset.max_train=500 seed={seed}")  # of the synthetic set's 2,000
        train = data.load_split(cfg.dataset, "train")
        assert len(train) == 500
        picks.append(list(train["text"]))
    assert picks[0] == picks[1]
    assert picks[0] != list(data.load_split(config.compose("").dataset, "train")["text"])[:500]  # a random draw
    assert len(data.load_split(cfg.dataset, "test")) == 500  # the test split is never subsampled


def test_hub_dataset_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config.compose("dataset=flowertune-finance")
    with pytest.raises(DataError, match=r"flwrlabs/fingpt-sentiment-train .*cannot load from the Hugging Face Hub"):
        data.load_split(cfg.dataset, "train")


def test_a_validation_split_is_carved_from_training_and_never_trained_on():
    cfg = config.compose("dataset.num_train=200 dataset.validation_fraction=0.25 eval.split=validation")
    train, validation = data.load_split(cfg.dataset, "train"), data.load_split(cfg.dataset, "validation")
    full = data.load_split(config.compose("dataset.num_train=200").dataset, "train")
    assert len(validation) == 50 and len(train) == 150
    assert sorted(list(train["text"]) + list(validation["text"])) == sorted(full["text"])  # a partition of training
    again = config.compose("dataset.num_train=200 dataset.validation_fraction=0.25 seed=3")
    assert list(data.load_split(again.dataset, "validation")["text"]) == list(validation["text"])  # whatever the seed
    with pytest.raises(config.ConfigError, match="dataset.validation_fraction"):
        config.compose("eval.split=validation")
    with pytest.raises(data.DataError, match="validation_fraction"):
        data.load_split(config.compose("").dataset, "validation")
