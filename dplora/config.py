"""Compose the run's configuration from `conf/` and validate it.

The ServerApp and every ClientApp call `compose(overrides)` with the same Hydra override string (the Flower
run config's `overrides`), so `conf/` is the single source of truth. Any mistake fails here, before training,
with a `ConfigError` that names the key.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from .data import FORMATS
from .privacy import GRAD_SAMPLE_MODES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

TASKS = ("classification", "causal_lm")
ACCOUNTANTS = ("prv", "rdp")
SOURCES = ("synthetic", "local", "hub")
TRANSPORT_DTYPES = ("fp32", "fp16", "int8")  # the adapter on the wire, owner to server (dplora/transport.py)
USER_DP_STRATEGIES = ("fedavg", "fedprox")  # Flower's fixed-clipping accounting needs FedAvg.aggregate_train


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def _package_model(package: str) -> str:
    """`${package_model:pkg}`: the model folder shipped inside an installed Python package."""
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(f"model: package {package!r} is not installed ({err})") from err
    return str(module.get_model_path())


def _data_folder(data_dir: str | None, name: str) -> str | None:
    """`${data_folder:${data_dir},fpb}`: <data_dir>/fpb, or None (dataset.path unset) when data_dir is null."""
    return str(Path(data_dir).expanduser() / name) if data_dir else None


for _name, _resolver in (("package_model", _package_model), ("data_folder", _data_folder)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def compose(overrides: str | list[str] = "") -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, resolve it and validate it."""
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config folder {CONF_DIR} not found")
    # Composition must not disturb a Hydra app that is already running (e.g. scripts/sweep.py).
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if outer is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=items)
        OmegaConf.resolve(cfg)
    except ConfigError:
        raise
    except Exception as err:  # Hydra / OmegaConf errors: keep their text, which names the key
        raise ConfigError(f"bad config overrides {' '.join(items)!r}: {err}") from err
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)
    validate(cfg)
    return cfg


def _number(cfg: DictConfig, key: str, *, kind=float, low=None, high=None, low_open=False,
            high_open=False, nullable=False):
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is required (set it with {key}=...)")
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{key} must be set (got null)")
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = ok_type and float(value).is_integer()
    if not ok_type:
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low} (got {value})")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key} must be {'<' if high_open else '<='} {high} (got {value})")
    return value


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> str:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)} (got {value!r})")
    return value


def _flag(cfg: DictConfig, key: str) -> bool:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    return value


def _strings(cfg: DictConfig, key: str) -> list[str]:
    value = OmegaConf.select(cfg, key)
    if not OmegaConf.is_list(value) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a non-empty list of names (got {value!r})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} has duplicates: {list(value)}")
    return list(value)


def validate(cfg: DictConfig) -> None:
    """Check every value the code relies on; raise ConfigError naming the first bad key."""
    _number(cfg, "num_rounds", kind=int, low=1)
    resume = OmegaConf.select(cfg, "resume")
    if not (isinstance(resume, bool) or (isinstance(resume, str) and resume)):
        raise ConfigError(f"resume must be true, false or a checkpoint folder (got {resume!r})")
    _number(cfg, "seed", kind=int, low=0)
    _number(cfg, "train.local_epochs", kind=int, low=1)
    if _number(cfg, "train.batch_size", kind=int, low=1, nullable=True) is None and cfg.train.sample_rate is None:
        raise ConfigError("train.batch_size=null needs train.sample_rate (the expected batch is then that share "
                          "of each owner's public size)")
    _number(cfg, "train.sample_rate", low=0, high=1, low_open=True, nullable=True)
    _number(cfg, "train.micro_batch_size", kind=int, low=1)
    _number(cfg, "train.learning_rate", low=0, low_open=True)
    _number(cfg, "train.weight_decay", low=0)
    _choice(cfg, "train.optimizer", ("adamw", "sgd"))
    _choice(cfg, "train.lr_schedule", ("constant", "linear"))
    _number(cfg, "train.momentum", low=0, high=1, high_open=True)
    _number(cfg, "eval.batch_size", kind=int, low=1)
    _number(cfg, "dataset.validation_fraction", low=0, high=1, high_open=True)
    if _choice(cfg, "eval.split", ("test", "validation")) == "validation" and not cfg.dataset.validation_fraction:
        raise ConfigError("eval.split=validation needs dataset.validation_fraction > 0 (the share of the training "
                          "split to hold out)")
    if _flag(cfg, "eval.also_test") and cfg.eval.split == "test":
        raise ConfigError("eval.also_test=true only makes sense with eval.split=validation (the test split is "
                          "already the one evaluated)")
    _number(cfg, "strategy.fraction_train", low=0, high=1, low_open=True)
    _number(cfg, "strategy.min_clients", kind=int, low=1)
    _number(cfg, "strategy.round_timeout", low=0, low_open=True)
    target = OmegaConf.select(cfg, "strategy.aggregator._target_")
    if not isinstance(target, str) or not target.startswith("flwr.serverapp.strategy."):
        raise ConfigError(f"strategy.aggregator._target_ must name one of Flower's strategies in "
                          f"flwr.serverapp.strategy (got {target!r}); pick one with strategy=<name> (conf/strategy/)")
    if OmegaConf.select(cfg, "strategy.max_update_norm") not in ("auto", None):
        _number(cfg, "strategy.max_update_norm", low=0, low_open=True)
    _choice(cfg, "strategy.update_norm_action", ("clip", "reject"))
    if OmegaConf.select(cfg, "strategy.user_dp.enabled"):
        if cfg.strategy.name not in USER_DP_STRATEGIES:
            raise ConfigError(f"strategy.user_dp needs one of {', '.join(USER_DP_STRATEGIES)}: Flower's DP "
                              f"wrappers calibrate their noise for FedAvg's mean (got strategy={cfg.strategy.name})")
        _choice(cfg, "strategy.user_dp.side", ("server", "client"))
        _number(cfg, "strategy.user_dp.clipping_norm", low=0, low_open=True)
        _number(cfg, "strategy.user_dp.owners_per_round", kind=int, low=1)
        _number(cfg, "strategy.user_dp.delta", low=0, high=1, low_open=True, high_open=True)
        if _number(cfg, "strategy.user_dp.noise_multiplier", low=0, low_open=True, nullable=True) is None:
            _number(cfg, "strategy.user_dp.target_epsilon", low=0, low_open=True)
    _number(cfg, "sweep.num_supernodes", kind=int, low=1)

    # Above 100 a guarantee is vacuous (and noise calibration degenerates): train with privacy=none instead.
    _number(cfg, "privacy.target_epsilon", low=0, high=100, low_open=True, nullable=True)
    _number(cfg, "privacy.delta", low=0, high=1, low_open=True, high_open=True)
    _number(cfg, "privacy.max_grad_norm", low=0, low_open=True)
    _choice(cfg, "privacy.accountant", ACCOUNTANTS)
    _choice(cfg, "privacy.grad_sample_mode", GRAD_SAMPLE_MODES)

    head_init = OmegaConf.select(cfg, "model.head_init", default="random")
    if _choice(cfg, "model.task", TASKS) == "classification":
        _choice(cfg, "model.pooling", ("mean", "cls"))
        if _choice(cfg, "model.head_init", ("random", "descriptions")) == "descriptions" and cfg.model.pooling != "mean":
            raise ConfigError("model.head_init=descriptions needs model.pooling=mean (the head is set from "
                              "mean-pooled embeddings of dataset.label_descriptions): with model.pooling=cls "
                              "set model.head_init=random")
    elif head_init != "random":
        raise ConfigError(f"model.head_init={head_init} is for classification models; a causal LM has no head "
                          "(its answers are the label names)")
    if cfg.model.pretrained is None and not cfg.model.architecture:
        raise ConfigError("model.architecture is required when model.pretrained is null (random weights)")
    if cfg.model.pretrained is None and cfg.model.tokenizer is None:
        raise ConfigError("model.tokenizer is required when model.pretrained is null")
    _number(cfg, "model.max_length", kind=int, low=8)
    _number(cfg, "model.lora.r", kind=int, low=1)
    _number(cfg, "model.lora.alpha", low=0, low_open=True)
    _number(cfg, "model.lora.dropout", low=0, high=1, high_open=True)
    _strings(cfg, "model.lora.target_modules")
    _flag(cfg, "model.lora.train_a")
    _choice(cfg, "transport.dtype", TRANSPORT_DTYPES)

    if _choice(cfg, "partitioner.name", ("iid", "dirichlet")) == "dirichlet":
        _number(cfg, "partitioner.alpha", low=0, low_open=True)
        _number(cfg, "partitioner.min_partition_size", kind=int, low=0)
    source = _choice(cfg, "dataset.source", SOURCES)
    if source == "local":
        if not OmegaConf.select(cfg, "dataset.path", throw_on_missing=False):
            raise ConfigError(f"dataset.path is required for dataset={cfg.dataset.name} "
                              f"(a folder with train.<format> and test.<format>; or set data_dir, "
                              f"a folder with one such folder per dataset)")
        _choice(cfg, "dataset.format", FORMATS)
    if source == "hub":
        if not isinstance(OmegaConf.select(cfg, "dataset.hub_id"), str):
            raise ConfigError(f"dataset.hub_id is required for dataset={cfg.dataset.name} (a Hub dataset id)")
        splits = OmegaConf.select(cfg, "dataset.hub_splits")
        if OmegaConf.select(cfg, "dataset.hub_recipe"):
            from .hub_data import RECIPES
            _choice(cfg, "dataset.hub_recipe", tuple(RECIPES))
        elif not OmegaConf.is_dict(splits) or not {"train", "test"} <= set(splits):
            raise ConfigError("dataset.hub_splits must map train and test to Hub split names "
                              f"(got {splits!r})")
    if OmegaConf.select(cfg, "dataset.max_train") is not None:
        _number(cfg, "dataset.max_train", kind=int, low=1)
    label_map = OmegaConf.select(cfg, "dataset.label_map")
    if label_map is not None and not OmegaConf.is_dict(label_map):
        raise ConfigError(f"dataset.label_map must map raw label values to label names (got {label_map!r})")
    if source == "synthetic":
        _number(cfg, "dataset.num_train", kind=int, low=1)
        _number(cfg, "dataset.num_test", kind=int, low=1)
    labels = _strings(cfg, "dataset.label_names")
    if len(labels) < 2:
        raise ConfigError(f"dataset.label_names needs at least two labels (got {labels})")
    if OmegaConf.select(cfg, "dataset.label_descriptions") is not None:
        descriptions = _strings(cfg, "dataset.label_descriptions")
        if len(descriptions) != len(labels):
            raise ConfigError(f"dataset.label_descriptions needs one text per label in dataset.label_names "
                              f"{labels} (got {len(descriptions)})")
    _strings(cfg, "dataset.text_fields")
    if not isinstance(cfg.dataset.label_field, str):
        raise ConfigError(f"dataset.label_field must be a field name (got {cfg.dataset.label_field!r})")
    try:
        cfg.dataset.prompt.format(**{f: "" for f in cfg.dataset.text_fields})
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset.prompt may only use the fields {list(cfg.dataset.text_fields)} "
                          f"as {{field}} placeholders ({err!r})") from err


def to_dict(cfg: DictConfig) -> dict:
    """The resolved configuration as plain Python (for metrics.json)."""
    return OmegaConf.to_container(cfg, resolve=True)
