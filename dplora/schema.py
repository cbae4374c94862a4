"""The configuration's shape: every key of `conf/`, its type and its choices, as structured-config dataclasses.

`check(cfg)` fits a composed config into `RunConfig` one key at a time, so OmegaConf checks each value against
its type; a `ConfigError` names the key. The schema only checks: the config itself is left as composed (its
values, plain strings and numbers, are what metrics.json records), and a key that a config leaves out is not
added. Ranges and rules that span keys are in dplora/config.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import FORMATS
from .hub_data import RECIPES
from .privacy import GRAD_SAMPLE_MODES

TRANSPORT_DTYPES = ("fp32", "fp16", "int8")  # the adapter on the wire, owner to server (dplora/transport.py)
USER_DP_STRATEGIES = ("fedavg", "fedprox")  # Flower's fixed-clipping accounting needs FedAvg.aggregate_train


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def _choices(name: str, values) -> type[Enum]:
    """An Enum whose names are the allowed strings (the config keeps the strings)."""
    return Enum(name, {value: value for value in values})


Task = _choices("Task", ("classification", "causal_lm"))
Pooling = _choices("Pooling", ("mean", "cls"))
HeadInit = _choices("HeadInit", ("random", "descriptions"))
Source = _choices("Source", ("synthetic", "local", "hub"))
Format = _choices("Format", FORMATS)
HubRecipe = _choices("HubRecipe", RECIPES)
Accountant = _choices("Accountant", ("prv", "rdp"))
GradSampleMode = _choices("GradSampleMode", GRAD_SAMPLE_MODES)
PartitionerName = _choices("PartitionerName", ("iid", "dirichlet"))
Optimizer = _choices("Optimizer", ("adamw", "sgd"))
LrSchedule = _choices("LrSchedule", ("constant", "linear"))
EvalSplit = _choices("EvalSplit", ("test", "validation"))
TransportDtype = _choices("TransportDtype", TRANSPORT_DTYPES)
NormAction = _choices("NormAction", ("clip", "reject"))
UserDPSide = _choices("UserDPSide", ("server", "client"))
UserDPSampling = _choices("UserDPSampling", ("fixed", "poisson"))


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: List[str] = MISSING
    train_a: bool = MISSING
    fan_in_fan_out: bool = False  # tiny-gpt2 only: Conv1D stores its weight transposed
    layers: Optional[int] = None  # LoRA on the top `layers` transformer layers only (null: every layer)


@dataclass
class ModelConfig:
    name: str = MISSING
    task: Task = MISSING
    pretrained: Optional[str] = MISSING  # a folder or a Hub id; null: random weights from `architecture`
    tokenizer: Optional[str] = MISSING
    architecture: Optional[Dict[str, Any]] = MISSING  # transformers config keyword arguments (free-form)
    pooling: Optional[Pooling] = MISSING  # classification only
    max_length: int = MISSING
    head_init: Optional[HeadInit] = None  # classification only (conf/model/minilm.yaml)
    chat_template: bool = False  # causal LM: prompts through the tokenizer's chat template (dplora/prompts.py)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DatasetConfig:
    name: str = MISSING
    source: Source = MISSING
    path: Optional[str] = MISSING  # source=local
    format: Optional[Format] = None  # source=local
    hub_id: Optional[str] = None  # source=hub
    hub_config: Optional[str] = None
    hub_splits: Optional[Dict[str, str]] = None
    hub_recipe: Optional[HubRecipe] = None
    num_train: Optional[int] = None  # source=synthetic
    num_test: Optional[int] = None
    text_fields: List[str] = MISSING
    label_field: str = MISSING
    label_names: List[str] = MISSING
    label_descriptions: Optional[List[str]] = MISSING
    label_map: Optional[Dict[Any, str]] = MISSING  # raw label value (a string, a number, a boolean) -> label name
    prompt: str = MISSING
    instruction: Optional[str] = None  # the system turn of chat prompts (model.chat_template=true)
    answer_field: Optional[str] = None  # causal LM: a free-text answer field (PubMedQA's long_answer)
    max_train: Optional[int] = MISSING
    validation_fraction: float = MISSING


@dataclass
class PrivacyConfig:
    target_epsilon: Optional[float] = MISSING  # null: no DP
    delta: float = MISSING
    max_grad_norm: float = MISSING
    accountant: Accountant = MISSING
    grad_sample_mode: GradSampleMode = MISSING


@dataclass
class PartitionerConfig:
    name: PartitionerName = MISSING
    alpha: Optional[float] = None  # dirichlet only
    min_partition_size: Optional[int] = None


@dataclass
class TrainConfig:
    local_epochs: int = MISSING
    batch_size: Optional[int] = MISSING
    micro_batch_size: int = MISSING
    sample_rate: Optional[float] = MISSING
    optimizer: Optimizer = MISSING
    learning_rate: float = MISSING
    lr_schedule: LrSchedule = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING


@dataclass
class EvalConfig:
    batch_size: int = MISSING
    split: EvalSplit = MISSING
    start: bool = True  # score round 0, the untrained start
    also_test: bool = MISSING
    max_new_tokens: int = 64  # free-text answers (dataset.answer_field): tokens generated for ROUGE-L


@dataclass
class TransportConfig:
    dtype: TransportDtype = MISSING


@dataclass
class UserDPConfig:
    enabled: bool = MISSING
    side: UserDPSide = MISSING
    sampling: UserDPSampling = MISSING
    clipping_norm: float = MISSING
    owners_per_round: Optional[int] = None  # required when enabled
    population: Optional[int] = None  # required with sampling=poisson
    noise_multiplier: Optional[float] = MISSING
    target_epsilon: Optional[float] = MISSING
    delta: float = MISSING


@dataclass
class StrategyConfig:
    name: str = MISSING
    aggregator: Dict[str, Any] = MISSING  # `_target_`: a flwr.serverapp.strategy class, then its keyword arguments
    fraction_train: float = MISSING
    min_clients: int = MISSING
    round_timeout: float = MISSING
    max_update_norm: Any = MISSING  # a number, "auto" or null
    update_norm_action: NormAction = MISSING
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)


@dataclass
class RunConfig:
    num_rounds: int = MISSING
    resume: Any = MISSING  # true, false or a checkpoint folder
    data_dir: Optional[str] = MISSING
    seed: int = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
         list: "a non-empty list of names", dict: "a mapping"}


def _kind(hint) -> str:
    """What a value of this type annotation must be, in words."""
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(hint.__members__)
    return KINDS.get(get_origin(hint) or hint, "a mapping")  # a section (a dataclass)


def _converted(value, fitted) -> bool:
    """Whether OmegaConf had to convert the value to fit its type ('3' or 3.0 for an integer, 'yes' or 1 for a
    flag, 3 for a string): refused, the config keeps what was written."""
    if isinstance(fitted, Enum):
        return value != fitted.name
    if OmegaConf.is_config(fitted):
        return OmegaConf.to_container(fitted) != OmegaConf.to_container(value)
    if type(fitted) is float:
        return type(value) not in (int, float)
    return type(value) is not type(fitted) or value != fitted


def _fit(node: DictConfig, cfg: DictConfig, prefix: str) -> None:
    hints = get_type_hints(OmegaConf.get_type(node))
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{path} is required (set it with {path}=...)")
        value = cfg[key]
        if key not in hints:
            raise ConfigError(f"{path} is not a configuration key (the keys of {prefix[:-1] or 'the top level'}: "
                              f"{', '.join(hints)})")
        if dataclasses.is_dataclass(hints[key]) and OmegaConf.is_dict(value):
            _fit(node[key], value, f"{path}.")
            continue
        try:
            node[key] = value
            converted = _converted(value, node[key])
        except OmegaConfBaseException:
            converted = True
        if converted:
            raise ConfigError(f"{path} must be {_kind(hints[key])} (got {value!r})")


def check(cfg: DictConfig) -> None:
    """Check every key of a composed config against `RunConfig`; raise ConfigError naming the first bad key."""
    schema = OmegaConf.structured(RunConfig)
    _fit(schema, cfg, "")
    missing = sorted(OmegaConf.missing_keys(schema))  # keys the schema needs that the config leaves out
    if missing:
        raise ConfigError(f"{missing[0]} is required (set it in conf/ or with +{missing[0]}=...)")
