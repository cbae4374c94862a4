"""Compose the run's configuration from `conf/` and validate it.

The ServerApp and every ClientApp call `compose(overrides)` with the same Hydra override string (the Flower
run config's `overrides`), so `conf/` is the single source of truth. Any mistake fails here, before training,
with a `ConfigError` that names the key: keys, types and choices against the schema (dplora/schema.py), then
the ranges and the rules that span keys below.
"""

from __future__ import annotations

import operator
import shlex
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from . import packaged_models
from .data import FORMATS
from .schema import TRANSPORT_DTYPES, USER_DP_STRATEGIES, ConfigError, check

__all__ = ["CONF_DIR", "TRANSPORT_DTYPES", "ConfigError", "compose", "to_dict", "validate"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _packaged(resolve):
    """A resolver whose ModelPackageError (package missing) surfaces as a ConfigError naming the install step."""
    def resolver(*args):
        try:
            return resolve(*args)
        except packaged_models.ModelPackageError as err:
            raise ConfigError(str(err)) from err
    return resolver


def _data_folder(data_dir: str | None, name: str) -> str | None:
    """`${data_folder:${data_dir},fpb}`: <data_dir>/fpb, or None (dataset.path unset) when data_dir is null."""
    return str(Path(data_dir).expanduser() / name) if data_dir else None


for _name, _resolver in (("package_model", _packaged(packaged_models.package_model)),
                         ("gguf_model", _packaged(packaged_models.gguf_model)), ("data_folder", _data_folder)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def compose(overrides: str | list[str] = "") -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, resolve it and validate it."""
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config folder {CONF_DIR} not found")
    # Composition must not disturb a Hydra app that is already running (e.g. experiments/sweep.py).
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


# Ranges, for the keys that are set: "> 0" or "> 0, <= 1" (the schema has checked that each is a number).
RANGES = {
    "num_rounds": ">= 1", "seed": ">= 0",
    "train.local_epochs": ">= 1", "train.batch_size": ">= 1", "train.sample_rate": "> 0, <= 1",
    "train.micro_batch_size": ">= 1", "train.learning_rate": "> 0", "train.weight_decay": ">= 0",
    "train.momentum": ">= 0, < 1", "eval.batch_size": ">= 1",
    # Above 100 a guarantee is vacuous (and noise calibration degenerates): train with privacy=none instead.
    "privacy.target_epsilon": "> 0, <= 100", "privacy.delta": "> 0, < 1", "privacy.max_grad_norm": "> 0",
    "model.max_length": ">= 8", "model.lora.r": ">= 1", "model.lora.alpha": "> 0", "model.lora.dropout": ">= 0, < 1",
    "model.lora.layers": ">= 1", "eval.max_new_tokens": ">= 1",
    "dataset.validation_fraction": ">= 0, < 1", "dataset.max_train": ">= 1", "dataset.num_train": ">= 1",
    "dataset.num_test": ">= 1", "partitioner.alpha": "> 0", "partitioner.min_partition_size": ">= 0",
    "strategy.fraction_train": "> 0, <= 1", "strategy.min_clients": ">= 1", "strategy.round_timeout": "> 0",
    "strategy.max_update_norm": "> 0", "strategy.user_dp.clipping_norm": "> 0",
    "strategy.user_dp.owners_per_round": ">= 1", "strategy.user_dp.population": ">= 1",
    "strategy.user_dp.delta": "> 0, < 1",
    "strategy.user_dp.noise_multiplier": "> 0", "strategy.user_dp.target_epsilon": "> 0",
}
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
# Keys that some settings need: the key, the settings that need it (key=value, all of them), what it is.
NEEDED = {
    "strategy.user_dp.owners_per_round": ("strategy.user_dp.enabled=true", "the number of owners sampled each "
                                          "round (public; the noise is divided by it)"),
    "strategy.user_dp.population": ("strategy.user_dp.enabled=true strategy.user_dp.sampling=poisson",
                                    "how many owners the federation has (public; each owner is sampled with "
                                    "probability owners_per_round / population)"),
    "strategy.user_dp.target_epsilon": ("strategy.user_dp.enabled=true strategy.user_dp.noise_multiplier=null",
                                        "the user-level budget over the run that sets the noise"),
    "model.pooling": ("model.task=classification", "mean or cls"),
    "model.head_init": ("model.task=classification", "random or descriptions"),
    "model.architecture": ("model.pretrained=null", "the transformers config of the random-weight model"),
    "model.tokenizer": ("model.pretrained=null", "a tokenizer folder or Hub id"),
    "partitioner.alpha": ("partitioner.name=dirichlet", "the Dirichlet concentration (smaller = more skew)"),
    "partitioner.min_partition_size": ("partitioner.name=dirichlet", "the fewest records an owner may get"),
    "dataset.path": ("dataset.source=local", "a folder with train.<format> and test.<format>; or set data_dir, "
                     "a folder with one such folder per dataset"),
    "dataset.format": ("dataset.source=local", f"the files' extension: {', '.join(FORMATS)}"),
    "dataset.hub_id": ("dataset.source=hub", "a Hub dataset id"),
    "dataset.num_train": ("dataset.source=synthetic", "the number of training examples generated"),
    "dataset.num_test": ("dataset.source=synthetic", "the number of test examples generated"),
}
NAME_LISTS = ("model.lora.target_modules", "dataset.text_fields", "dataset.label_names", "dataset.label_descriptions")


def _text(value) -> str:
    """A value as an override writes it (true, null, 0.5)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_user_dp(strategy) -> None:
    """Settings under which the user-level guarantee would not hold, or could not be computed."""
    user = strategy.user_dp
    if not user.enabled:
        return
    if user.sampling == "fixed" and strategy.update_norm_action == "reject":
        raise ConfigError("strategy.update_norm_action=reject with strategy.user_dp.sampling=fixed: Flower's wrapper "
                          "skips a round short of owners_per_round replies, so one owner's update would decide "
                          "whether the round is released; use clip, or sampling=poisson (a rejected update counts "
                          "as zero)")
    if user.sampling != "poisson":
        return
    if user.side != "server":
        raise ConfigError("strategy.user_dp.sampling=poisson clips on the server: set strategy.user_dp.side=server")
    if strategy.fraction_train != 1.0:
        raise ConfigError(f"strategy.user_dp.sampling=poisson samples the owners itself (each with probability "
                          f"owners_per_round / population): set strategy.fraction_train=1.0 (got "
                          f"{strategy.fraction_train})")
    if user.owners_per_round > user.population:
        raise ConfigError(f"strategy.user_dp.owners_per_round ({user.owners_per_round}) must not exceed "
                          f"strategy.user_dp.population ({user.population})")


def validate(cfg: DictConfig) -> None:
    """Check the config against the schema (keys, types, choices), then the ranges and the rules that span keys;
    raise ConfigError naming the first bad key."""
    check(cfg)
    for key, spec in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # null, unset or "auto": no range
            for bound in spec.split(", "):
                if not COMPARE[bound.split()[0]](value, float(bound.split()[1])):
                    raise ConfigError(f"{key} must be {bound} (got {value})")
    train, evaluation, model, data, strategy = cfg.train, cfg.eval, cfg.model, cfg.dataset, cfg.strategy
    if not (isinstance(cfg.resume, bool) or (isinstance(cfg.resume, str) and cfg.resume)):
        raise ConfigError(f"resume must be true, false or a checkpoint folder (got {cfg.resume!r})")
    if train.batch_size is None and train.sample_rate is None:
        raise ConfigError("train.batch_size=null needs train.sample_rate (the expected batch is then that share "
                          "of each owner's public size)")
    if evaluation.split == "validation" and not data.validation_fraction:
        raise ConfigError("eval.split=validation needs dataset.validation_fraction > 0 (the share of the training "
                          "split to hold out)")
    if evaluation.also_test and evaluation.split == "test":
        raise ConfigError("eval.also_test=true only makes sense with eval.split=validation (the test split is "
                          "already the one evaluated)")
    target = strategy.aggregator.get("_target_")
    if not isinstance(target, str) or not target.startswith("flwr.serverapp.strategy."):
        raise ConfigError(f"strategy.aggregator._target_ must name one of Flower's strategies in "
                          f"flwr.serverapp.strategy (got {target!r}); pick one with strategy=<name> (conf/strategy/)")
    norm = strategy.max_update_norm
    if not (norm in ("auto", None) or (isinstance(norm, (int, float)) and not isinstance(norm, bool))):
        raise ConfigError(f"strategy.max_update_norm must be a number, auto or null (got {norm!r})")
    if strategy.user_dp.enabled and strategy.name not in USER_DP_STRATEGIES:
        raise ConfigError(f"strategy.user_dp needs one of {', '.join(USER_DP_STRATEGIES)}: Flower's DP wrappers "
                          f"calibrate their noise for FedAvg's mean (got strategy={strategy.name})")
    for key, (when, what) in NEEDED.items():
        if (all(_text(OmegaConf.select(cfg, k)) == v for k, v in (c.split("=") for c in when.split()))
                and OmegaConf.select(cfg, key) in (None, "", {})):
            raise ConfigError(f"{key} is required with {when}: {what}")
    _check_user_dp(strategy)
    if model.task == "classification" and model.head_init == "descriptions" and model.pooling != "mean":
        raise ConfigError("model.head_init=descriptions needs model.pooling=mean (the head is set from mean-pooled "
                          "embeddings of dataset.label_descriptions): with model.pooling=cls set "
                          "model.head_init=random")
    if model.task != "classification" and model.get("head_init", "random") != "random":
        raise ConfigError(f"model.head_init={model.head_init} is for classification models; a causal LM has no "
                          "head (its answers are the label names)")
    if model.task == "classification" and (model.get("chat_template") or data.get("answer_field")):
        raise ConfigError("model.chat_template and dataset.answer_field are for causal LMs (model.task=causal_lm); "
                          f"{model.name} is a classifier")
    if data.get("answer_field") in data.text_fields:
        raise ConfigError(f"dataset.answer_field={data.answer_field} is also a text field of the prompt")
    splits = data.get("hub_splits")
    if data.source == "hub" and not data.get("hub_recipe") and not (splits and {"train", "test"} <= set(splits)):
        raise ConfigError(f"dataset.hub_splits must map train and test to Hub split names (got {splits!r})")
    for key in NAME_LISTS:
        names = OmegaConf.select(cfg, key)
        if names is not None and (not names or not all(names)):
            raise ConfigError(f"{key} must be a non-empty list of names (got {list(names)})")
        if names is not None and len(set(names)) != len(names):
            raise ConfigError(f"{key} has duplicates: {list(names)}")
    if len(data.label_names) < 2:
        raise ConfigError(f"dataset.label_names needs at least two labels (got {list(data.label_names)})")
    if data.label_descriptions is not None and len(data.label_descriptions) != len(data.label_names):
        raise ConfigError(f"dataset.label_descriptions needs one text per label in dataset.label_names "
                          f"{list(data.label_names)} (got {len(data.label_descriptions)})")
    try:
        data.prompt.format(**{name: "" for name in data.text_fields})
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset.prompt may only use the fields {list(data.text_fields)} "
                          f"as {{field}} placeholders ({err!r})") from err


def to_dict(cfg: DictConfig) -> dict:
    """The resolved configuration as plain Python (for metrics.json)."""
    return OmegaConf.to_container(cfg, resolve=True)
