"""Datasets: load (synthetic or local JSON Lines), partition across data owners, tokenize into tensors.

Every split is a `datasets.Dataset` with the config's text fields and an integer `label` (an index into
`dataset.label_names`). Tokenized splits are `TensorDataset`s of (input_ids, attention_mask, labels), padded
to `model.max_length`, so Opacus' Poisson loader can build empty batches of the right shape.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import datasets
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from . import prompts
from .synthetic import synthetic_reviews

FORMATS = ("jsonl", "csv", "parquet")  # local files; the format is also the file extension
IGNORE_INDEX = -100  # label value for tokens that carry no loss (prompt and padding) in causal-LM tuning
SUBSAMPLE_SEED = 0  # dataset.max_train draws the same subsample whatever the run's seed
VALIDATION_SEED = 1  # dataset.validation_fraction carves the same validation split whatever the run's seed


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the line or field."""


# ----------------------------------------------------------------------------------------------- loading

def load_split(dataset_cfg: DictConfig, split: str) -> datasets.Dataset:
    """The `split` ("train", "validation" or "test") of the configured dataset.

    `dataset.max_train` keeps a fixed random subsample of the training split (the same for every run seed).
    `dataset.validation_fraction` > 0 carves that share of the (subsampled) training split, with a fixed seed,
    as the "validation" split; "train" is then the rest, so owners never train on it. Hyperparameters are
    chosen on it (eval.split=validation), never on the test split.
    """
    validation = split == "validation"
    if validation:
        if not (dataset_cfg.get("validation_fraction") or 0) > 0:
            raise DataError("the validation split needs dataset.validation_fraction > 0")
        split = "train"
    if dataset_cfg.source == "synthetic":
        train, test = synthetic_reviews(dataset_cfg.num_train, dataset_cfg.num_test)
        rows = train if split == "train" else test
    elif dataset_cfg.source == "hub":
        rows = hub_rows(dataset_cfg, split)
    else:
        fmt = dataset_cfg.get("format", "jsonl")  # also the file extension
        rows = read_rows(Path(dataset_cfg.path) / f"{split}.{fmt}", dataset_cfg, fmt)
    max_train = dataset_cfg.get("max_train")
    if split == "train" and max_train is not None and len(rows) > max_train:
        rows = random.Random(SUBSAMPLE_SEED).sample(rows, max_train)
    fraction = dataset_cfg.get("validation_fraction") or 0.0
    if split == "train" and fraction > 0:  # a validation split carved from the training split, for tuning
        order = list(range(len(rows)))
        random.Random(VALIDATION_SEED).shuffle(order)
        cut = max(1, round(fraction * len(rows)))
        keep = sorted(order[:cut]) if validation else sorted(order[cut:])
        rows = [rows[i] for i in keep]
    return from_rows(rows)


def load_hub_split(hub_id: str, hub_config: str | None, split: str):
    """datasets.load_dataset, with one clear error for every way it fails (offline, unknown id, bad split)."""
    where = f"{hub_id} ({hub_config or 'default'}, split {split})"
    try:
        return datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as err:
        raise DataError(f"{where}: cannot load from the Hugging Face Hub ({type(err).__name__}: {err}); it needs "
                        "internet access to huggingface.co (HF_HUB_OFFLINE must not be 1); without it, use a local "
                        "copy (dataset.source=local)") from err


def hub_rows(dataset_cfg: DictConfig, split: str) -> list[dict]:
    """A split from the Hugging Face Hub (needs internet), checked like a local file. Datasets with a recipe
    (`dataset.hub_recipe`: fpb, sst2, pubmedqa) are converted and split as dplora/hub_data.py describes."""
    if dataset_cfg.get("hub_recipe"):
        from . import hub_data
        rows = hub_data.build(dataset_cfg.hub_recipe, load_hub_split)[split]
        return check_rows(enumerate(rows, start=1), dataset_cfg, f"{dataset_cfg.hub_id} ({split}, as built here)")
    hub_split = dataset_cfg.hub_splits[split]
    where = f"{dataset_cfg.hub_id} ({dataset_cfg.get('hub_config') or 'default'}, split {hub_split})"
    loaded = load_hub_split(dataset_cfg.hub_id, dataset_cfg.get("hub_config"), hub_split)
    return check_rows(enumerate(loaded, start=1), dataset_cfg, where)


def from_rows(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _records(path: Path, fmt: str):
    """(line or row number, record) for each record of a JSON Lines, CSV or Parquet file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        yield from enumerate(table.to_pylist(), start=1)
        return
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            for row in reader:  # line numbers count the header as line 1
                yield reader.line_num, row
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def read_rows(path: Path, dataset_cfg: DictConfig, fmt: str = "jsonl") -> list[dict]:
    """Read and check a data file: every record has the text fields and a known label (after
    `dataset.label_map`, which renames raw label values, e.g. {true: "yes"} or {"mildly positive": positive})."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (check dataset.path and dataset.format)")
    return check_rows(_records(path, fmt), dataset_cfg, str(path))


def check_rows(records, dataset_cfg: DictConfig, path: str) -> list[dict]:
    """(line, record) pairs -> rows with the text fields and a label index; DataError names `path:line`."""
    fields = list(dataset_cfg.text_fields) + ([dataset_cfg.answer_field] if dataset_cfg.get("answer_field") else [])
    label_map = dict(dataset_cfg.get("label_map") or {})
    label_key, names = dataset_cfg.label_field, list(dataset_cfg.label_names)
    rows = []
    for lineno, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        for key in [*fields, label_key]:
            if key not in record or record[key] is None:
                raise DataError(f"{path}:{lineno}: missing field {key!r}")
        for key in fields:
            if not isinstance(record[key], str):
                raise DataError(f"{path}:{lineno}: field {key!r} must be a string")
        label = record[label_key]
        if isinstance(label, (str, int, float, bool)):
            label = label_map.get(label, label)
        if label not in names:
            raise DataError(f"{path}:{lineno}: unknown label {label!r} in field {label_key!r} "
                            f"(expected one of {names})")
        rows.append({**{k: record[k] for k in fields}, "label": names.index(label)})
    if not rows:
        raise DataError(f"{path}: no records (empty file)")
    return rows


def partition(dataset: datasets.Dataset, num_partitions: int, partition_id: int, seed: int,
              partitioner_cfg: DictConfig | None = None) -> datasets.Dataset:
    """This data owner's share of `dataset`, by a flwr-datasets partitioner over a seeded shuffle.

    `partitioner.name`: iid (equal shares) or dirichlet (label mix per owner drawn from Dirichlet(alpha):
    smaller alpha, more skew). The same seed gives every owner the same partition in every process.
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    name = "iid" if partitioner_cfg is None else partitioner_cfg.name
    if name == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=partitioner_cfg.alpha,
                                           min_partition_size=partitioner_cfg.min_partition_size,
                                           self_balancing=False, shuffle=True, seed=seed)
    else:
        partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = dataset.shuffle(seed=seed)
    return partitioner.load_partition(partition_id)


# ------------------------------------------------------------------------------------------- tokenizing

def encode(dataset: datasets.Dataset, tokenizer, cfg: DictConfig, *, answer: int | None = None) -> TensorDataset:
    """Tokenize for the model's task.

    classification: the text fields (one, or a pair) -> (input_ids, attention_mask, class index).
    causal_lm: prompt + answer (dplora/prompts.py) -> (input_ids, attention_mask, token labels) where only the
    answer tokens carry a label, padded on the left so that every answer ends at the last position (the
    model then computes logits for the last few positions only). `answer=k` writes label k's answer for
    every row (to score candidates; the label alone for free-text datasets).
    """
    fields, max_length = list(cfg.dataset.text_fields), cfg.model.max_length
    if cfg.model.task == "classification":
        texts = [list(dataset[f]) for f in fields[:2]]
        if len(fields) > 2:  # join the remaining fields onto the second one
            texts[1] = [" ".join(parts) for parts in zip(*(dataset[f] for f in fields[1:]), strict=True)]
        enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
        labels = torch.tensor(list(dataset["label"]) if answer is None else [answer] * len(dataset))
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    ids = torch.full((len(dataset), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(dataset), max_length), dtype=torch.long)
    labels = torch.full((len(dataset), max_length), IGNORE_INDEX, dtype=torch.long)
    framing = prompts.frame(tokenizer, cfg)
    free_text = bool(cfg.dataset.get("answer_field")) and answer is None  # a free-text answer per row
    fixed = [prompts.answer_ids(tokenizer, cfg, k, scoring=answer is not None)
             for k in range(len(cfg.dataset.label_names))]
    for i, row in enumerate(dataset):
        target = (prompts.answer_ids(tokenizer, cfg, row["label"], row, limit=max_length // 2) if free_text
                  else fixed[row["label"] if answer is None else answer])
        seq = prompts.prompt_ids(row, tokenizer, cfg, framing, max_length - len(target)) + target
        ids[i, max_length - len(seq):] = torch.tensor(seq)
        mask[i, max_length - len(seq):] = 1
        labels[i, max_length - len(target):] = torch.tensor(target)
    return TensorDataset(ids, mask, labels)


# ------------------------------------------------------------------------------------ what each app needs

def client_partition(cfg: DictConfig, partition_id: int, num_partitions: int) -> tuple[datasets.Dataset, int]:
    """This data owner's training partition (simulation: a share of the dataset's training split) and the
    public number of records per owner: the split's size over the number of owners, the same for every owner
    (a property of the public configuration, not of any partition)."""
    train = load_split(cfg.dataset, "train")
    return partition(train, num_partitions, partition_id, cfg.seed, cfg.partitioner), len(train) // num_partitions


def label_mix(dataset: datasets.Dataset, label_names: list[str]) -> str:
    """e.g. "776 examples: negative 97, neutral 461, positive 218" (for the owner's own log)."""
    counts = [0] * len(label_names)
    for label in dataset["label"]:
        counts[label] += 1
    return f"{len(dataset)} examples: " + ", ".join(f"{n} {c}" for n, c in zip(label_names, counts, strict=True))


def test_sets(cfg: DictConfig, tokenizer, split: str | None = None) -> tuple[list[TensorDataset], torch.Tensor]:
    """The server's evaluation split (`split`, default `eval.split`: test, or validation for tuning): ([encoded
    split] or one encoded copy per candidate label, true labels)."""
    test = load_split(cfg.dataset, split or cfg.eval.split)
    if cfg.model.task == "classification":
        sets = [encode(test, tokenizer, cfg)]
    else:
        sets = [encode(test, tokenizer, cfg, answer=k) for k in range(len(cfg.dataset.label_names))]
    return sets, torch.tensor(list(test["label"]))


def reference_answers(cfg: DictConfig, split: str | None = None) -> list[str] | None:
    """A free-text dataset's reference answers on the evaluation split (ROUGE-L's references); else None."""
    if cfg.model.task != "causal_lm" or not cfg.dataset.get("answer_field"):
        return None
    return [prompts.reference_text(cfg, row) for row in load_split(cfg.dataset, split or cfg.eval.split)]
