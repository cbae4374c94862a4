"""Hydra multirun sweep of full Flower simulations, and the report built from it."""

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dplora import config
from experiments.simulation import finished_elsewhere, finished_run
from experiments.sweep import take_sweep_settings

from .conftest import ROOT

JOB = ["model=tiny-llama", "recipe=plain", "num_rounds=2", "dataset.num_train=160", "dataset.num_test=40",
       "train.batch_size=16", "train.local_epochs=1"]
OWNERS = "sweep.num_supernodes=2"  # the sweep's own setting (not a key of conf/): 2 simulated owners per job


def test_sweep_runs_each_job_reports_failures_and_feeds_the_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "scripts/sweep.py", "-m", OWNERS, *JOB, "privacy.target_epsilon=4,null,-1",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    # the third job has an invalid epsilon: reported by name, the others still ran, and the exit code says so
    assert proc.returncode == 1, out[-3000:]
    assert "1 job(s) failed" in proc.stderr and "privacy.target_epsilon=-1" in proc.stderr
    assert "privacy.target_epsilon must be > 0" in (sweep_dir / "2" / "FAILED").read_text()
    assert "round 2/2: accuracy" in proc.stdout  # progress while it runs
    for job, target in (("0", 4.0), ("1", None)):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert metrics["config"]["privacy"]["target_epsilon"] == target and len(metrics["rounds"]) == 2
        assert (sweep_dir / job / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((sweep_dir / job / "sweep.json").read_text()) == {"num_supernodes": 2}
        assert len(metrics["rounds"][-1]["clients"]) == 2  # the sweep's owner count reached `flwr run`

    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "scripts/report.py", str(sweep_dir), "--out", str(report)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert [(r["dataset"], r["target_epsilon"], r["seeds"]) for r in rows] == \
        [("synthetic", "4", "1"), ("synthetic", "non-private", "1")]
    assert 0 <= float(rows[0]["accuracy_mean"]) <= 1 and float(rows[0]["epsilon_spent_max"]) <= 4
    markdown = (report / "results.md").read_text()
    assert "| synthetic | iid | 4 | 1 |" in markdown and "Failed or unfinished jobs (1)" in markdown
    assert (report / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"

    # the same multirun again into the same folder: the finished jobs are skipped, the failed one is retried
    before = {job: (sweep_dir / job / "metrics.json").stat().st_mtime_ns for job in ("0", "1")}
    again = subprocess.run([sys.executable, "scripts/sweep.py", "-m", *JOB, "privacy.target_epsilon=4,null,-1",
                            "+" + OWNERS,
                            f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 1 and "1 job(s) failed" in again.stderr, again.stdout[-3000:]
    assert again.stdout.count("finished before") == 2
    starts = [line for line in again.stdout.splitlines() if ": starting" in line]
    assert len(starts) == 1 and "job 2 (" in starts[0]
    assert {job: (sweep_dir / job / "metrics.json").stat().st_mtime_ns for job in ("0", "1")} == before
    # another config into a folder holding a finished run: refused, the run and its log left as they were
    logs = (sweep_dir / "0" / "flwr.log").read_bytes()
    other = subprocess.run([sys.executable, "scripts/sweep.py", "-m", OWNERS, *JOB, "privacy.target_epsilon=4",
                            "seed=1", f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, check=False)
    assert other.returncode == 1 and "holds a finished run of another config (seed: 0 recorded, 1 now)" in \
        other.stderr, other.stdout[-3000:]
    assert ": starting" not in other.stdout and (sweep_dir / "0" / "flwr.log").read_bytes() == logs
    assert (sweep_dir / "0" / "metrics.json").stat().st_mtime_ns == before["0"]
    assert (sweep_dir / "0" / "sweep.json").is_file()
    # only a finished run of exactly this config and owner count counts
    job0 = " ".join([*JOB, "privacy.target_epsilon=4"])
    assert finished_run(sweep_dir / "0", job0, 2)["rounds"][-1]["round"] == 2
    assert finished_run(sweep_dir / "0", job0, 5) is None  # another owner count
    assert finished_run(sweep_dir / "0", job0 + " seed=1") is None  # another config
    assert finished_run(sweep_dir / "2", " ".join([*JOB, "privacy.target_epsilon=1"])) is None  # no run there
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    (sweep_dir / "0" / "metrics.json").write_text(json.dumps(metrics | {"rounds": metrics["rounds"][:1]}))
    assert finished_run(sweep_dir / "0", job0) is None  # a killed run: round 2 missing
    (sweep_dir / "0" / "metrics.json").write_text("{not json")
    assert finished_run(sweep_dir / "0", job0) is None


def test_results_script_refuses_a_missing_data_folder(tmp_path):
    proc = subprocess.run(["bash", "scripts/results.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "DPLORA_SHARED_DATA": str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and f"{tmp_path / 'nowhere'}/fpb/train.jsonl not found" in proc.stderr


@pytest.mark.parametrize("script", ["recipe_search", "strategies"])
def test_experiment_scripts_pass_overrides_that_hydra_parses_and_the_config_accepts(script, tmp_path, monkeypatch):
    """Every stage experiments/recipe_search.py and experiments/strategies.py would run, with a fake runner that
    records the overrides and writes a metrics.json: each override, hydra.sweep.dir included, parses with
    Hydra's grammar, and the rest composes into a valid config (a run folder named with '=' failed at once)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    module = importlib.import_module(f"experiments.{script}")
    parser, seen = OverridesParser.create(), []

    def fake_sweep(folder, overrides, tag):
        seen.append(overrides)
        parser.parse_overrides([*overrides, f"hydra.sweep.dir={folder}"])
        for seed in (0, 1, 2):
            final = {"accuracy": 0.5, "test_accuracy": 0.5, "clients": [{"update_norm": 1.0}],
                     "user_level": {"noise_multiplier": 1.0, "epsilon": 8.0}}
            (folder / str(seed)).mkdir(parents=True, exist_ok=True)
            (folder / str(seed) / "metrics.json").write_text(json.dumps({"rounds": [final]}))

    (tmp_path / "fpb").mkdir()
    for name in ("train", "test"):
        (tmp_path / "fpb" / f"{name}.jsonl").write_text("")
    monkeypatch.setattr(module, "sweep" if script == "recipe_search" else "run_stage", fake_sweep)
    if script == "recipe_search":
        module.search(tmp_path, "fpb")
        fpb_runs, record = len(seen), json.loads((tmp_path / "fpb" / "recipe.json").read_text())
        for arm in {r["arm"] for r in record["runs"]}:  # a fresh checkout: the run folders are gone
            shutil.rmtree(tmp_path / "fpb" / arm)
        module.search(tmp_path, "fpb")  # every run is read from the record, none is run again
        assert len(seen) == fpb_runs and json.loads((tmp_path / "fpb" / "recipe.json").read_text()) == record
        module.search(tmp_path, "sst2")  # the check of FPB's recipe: its grid on SST-2 and one step past its
        # edge, per arm (all runs level: the grid's first cell wins, q 0.05 and lr 1e-3: it again, as the fake
        # runner does not skip a finished run as scripts/sweep.py does, and two edges)
        assert len(seen) - fpb_runs == 2 * (9 + 1 + 2) and all("dataset=sst2" in o for o in seen[fpb_runs:])
        assert sum(f"train.learning_rate={1e-3 / 3}" in o for o in seen[fpb_runs:]) == 2
        assert any("model.lora.target_modules=[query,value]" in o for o in seen)
        assert any("train.local_epochs=2" in o for o in seen)
    else:
        monkeypatch.setattr(sys, "argv", ["strategies.py", str(tmp_path / "out")])
        monkeypatch.setattr(module, "DATA", tmp_path)
        assert module.main() == 0
        user_level = [o for o in seen if "strategy.user_dp.enabled=true" in o]  # 5 owners: said explicitly
        assert len(user_level) == 1 and "strategy.user_dp.owners_per_round=5" in user_level[0]
    assert len(seen) > 10
    for overrides in seen:  # one value per key (a setting replaces the common one)
        keys = [o.split("=")[0] for o in overrides]
        assert len(keys) == len(set(keys)), overrides
    for overrides in seen:  # the first job of each sweep
        keep = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
                else o.input_line for o in parser.parse_overrides(overrides)
                if not o.get_key_element().startswith(("data_dir", "sweep."))]
        config.compose([*keep, f"data_dir={tmp_path}"])


def test_the_recipe_search_steps_past_each_edge_its_choice_lies_on():
    """Stage 3b: one step past each setting where stages 2-3 chose the last value they tried, and none where
    the choice lies inside what was tried."""
    from experiments.recipe_search import past_the_edge

    dp = {"num_rounds": "10", "model.lora.r": "4", "model.lora.alpha": "8", "train.learning_rate": 0.03,
          "train.sample_rate": 0.05}
    changes = [{k: v for k, v in step.items() if dp.get(k) != v} for step in past_the_edge(dp)]
    assert changes == [{"num_rounds": "20"}, {"model.lora.r": "2", "model.lora.alpha": "4"},
                       {"train.learning_rate": 0.09}]
    nonprivate = {"num_rounds": "5", "train.learning_rate": 0.01, "train.local_epochs": "2"}
    assert past_the_edge(nonprivate) == [nonprivate | {"train.local_epochs": "3"}]
    assert past_the_edge({"num_rounds": "5", "train.learning_rate": 0.01, "model.lora.r": "8"}) == []


def test_the_results_grid_runs_every_epsilon_on_its_privacy_choices_recipe(tmp_path):
    """scripts/results.sh --dry-run --full: every stage's sweep parses with Hydra's grammar, and every job in it
    composes into a valid config: the DP jobs get the DP recipe, the non-private ones the non-private recipe,
    the Dirichlet shares FedProx; 84 jobs, three seeds each setting."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    for name in ("fpb", "sst2", "pubmedqa"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text("")
    env = {**os.environ, "DPLORA_SHARED_DATA": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/results.sh", "--dry-run", "--full", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.splitlines()
    assert len(commands) == 14 and not (tmp_path / "out").exists()  # a dry run makes nothing
    parser, jobs = OverridesParser.create(), []
    for command in commands:
        overrides = parser.parse_overrides(command.split()[3:])  # after `python scripts/sweep.py -m`
        choices = [[f"{o.get_key_element()}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                           else [o.get_value_element_as_str()])]
                   for o in overrides if not o.get_key_element().startswith(("hydra", "sweep."))]
        jobs += [config.compose(list(job)) for job in itertools.product(*choices)]
    assert len(jobs) == 84
    # every job trains with what the recipe search chose for its dataset (PubMedQA: FPB's) and epsilon, on
    # validation (docs/results/recipe-{fpb,sst2}.json): the epsilon's own choice, or epsilon 8's where the
    # search tried no other (SST-2)
    from experiments.recipe_search import training_settings

    search = {name: json.loads((ROOT / f"docs/results/recipe-{name}.json").read_text())["chosen"]
              for name in ("fpb", "sst2")}
    for cfg in jobs:
        chosen = search["sst2" if cfg.dataset.name == "sst2" else "fpb"]
        epsilon = cfg.privacy.target_epsilon
        arm = "nonprivate" if epsilon is None else f"eps{epsilon:g}" if f"eps{epsilon:g}" in chosen else "eps8"
        wanted = training_settings(chosen[arm])
        assert {key: OmegaConf.select(cfg, key) for key in wanted} == wanted, (cfg.dataset.name, arm)
    dp, none = (OmegaConf.load(config.CONF_DIR / "recipe" / f"{name}.yaml") for name in ("dp", "none"))
    for cfg in jobs:  # the recipes as they are, but for the non-private arm on SST-2
        recipe = none if cfg.privacy.target_epsilon is None else dp
        assert (cfg.dataset.name, recipe) == ("sst2", none) or \
            (cfg.train.learning_rate, cfg.train.sample_rate, cfg.num_rounds) == \
            (recipe.train.learning_rate, recipe.train.sample_rate, recipe.num_rounds)
        assert cfg.strategy.aggregator._target_.endswith("FedProx") == (cfg.partitioner.name == "dirichlet")
    settings = {(c.dataset.name, c.dataset.max_train, c.partitioner.name, c.privacy.target_epsilon) for c in jobs}
    assert len(settings) == 28 and {c.privacy.target_epsilon for c in jobs} == {1.0, 4.0, 8.0, None}
    bad = subprocess.run(["bash", "scripts/results.sh", "--fast"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr


def test_the_sweep_takes_its_owner_count_off_the_command_line_before_hydra():
    """sweep.num_supernodes=N (or +/++sweep.num_supernodes=N) is the sweep's own setting: taken out of the
    overrides (so no job's config holds it), default 5, one whole number >= 1, no other sweep.* key."""
    argv = ["-m", "sweep.num_supernodes=2", "seed=0,1", "hydra.sweep.dir=out"]
    assert take_sweep_settings(argv) == (["-m", "seed=0,1", "hydra.sweep.dir=out"], 2)
    assert take_sweep_settings(["+sweep.num_supernodes=3", "seed=1"]) == (["seed=1"], 3)
    assert take_sweep_settings(["++sweep.num_supernodes=4"]) == ([], 4)
    assert take_sweep_settings(["-m", "seed=0"]) == (["-m", "seed=0"], 5)
    for bad in ("sweep.num_supernodes=2,5", "sweep.num_supernodes=0", "sweep.num_supernodes", "sweep.owners=2"):
        with pytest.raises(ValueError, match="sweep"):
            take_sweep_settings([bad])
    bad = subprocess.run([sys.executable, "scripts/sweep.py", "-m", "sweep.num_supernodes=2,5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "one whole number per sweep" in bad.stderr


def test_a_run_recorded_before_the_sweep_settings_left_the_config_still_counts_as_finished(tmp_path):
    """Records from before the change hold `sweep: {num_supernodes: 5}` in their config and, with user-level DP
    off, strategy.user_dp.owners_per_round 5 (now null): the same job is still finished, for 5 owners only;
    a record of the new kind says its owner count in sweep.json."""
    overrides = "model=tiny-llama recipe=plain num_rounds=2 dataset.num_train=160 privacy.target_epsilon=4"
    record = json.loads(json.dumps(config.to_dict(config.compose(overrides))))
    record["sweep"] = {"num_supernodes": 5}
    record["strategy"]["user_dp"]["owners_per_round"] = 5
    rounds = [{"round": r, "accuracy": 0.5} for r in (1, 2)]
    (tmp_path / "metrics.json").write_text(json.dumps({"config": record, "rounds": rounds}))
    assert finished_run(tmp_path, overrides, 5)["rounds"] == rounds
    assert finished_run(tmp_path, overrides) is not None  # owner count not asked
    assert finished_run(tmp_path, overrides, 2) is None  # another owner count
    assert finished_run(tmp_path, overrides + " seed=1", 5) is None  # another config
    del record["sweep"]  # the new kind: the config has no sweep key, the owner count is in sweep.json
    (tmp_path / "metrics.json").write_text(json.dumps({"config": record, "rounds": rounds}))
    assert finished_run(tmp_path, overrides, 5) is None  # (an interrupted write: owner count unknown)
    (tmp_path / "sweep.json").write_text(json.dumps({"num_supernodes": 2}))
    assert finished_run(tmp_path, overrides, 2) is not None and finished_run(tmp_path, overrides, 5) is None
    # keys conf/ gained later (eval.start, user_dp.sampling and population): a record without them did what
    # their values in ADDED_KEYS do, and still counts; a record that holds another value does not
    for key in ("sampling", "population"):
        del record["strategy"]["user_dp"][key]
    del record["eval"]["start"]
    (tmp_path / "metrics.json").write_text(json.dumps({"config": record, "rounds": rounds}))
    assert finished_run(tmp_path, overrides, 2) is not None
    assert finished_run(tmp_path, overrides + " eval.start=false", 2) is None
    assert finished_elsewhere(tmp_path, overrides + " eval.start=false", 2) == \
        "another config (eval.start: True recorded, False now)"
    assert finished_elsewhere(tmp_path, overrides, 2) is None and finished_elsewhere(tmp_path, overrides, 3) == \
        "another owner count (2, 3 now)"
    (tmp_path / "metrics.json").write_text(json.dumps({"config": record, "rounds": rounds[:1]}))
    assert finished_elsewhere(tmp_path, overrides + " seed=1", 2) is None  # unfinished: nothing to lose
    # with user-level DP on, its owners per round is compared like any other key
    on = f"{overrides} strategy.user_dp.enabled=true strategy.user_dp.owners_per_round=2"
    record = json.loads(json.dumps(config.to_dict(config.compose(on))))
    (tmp_path / "metrics.json").write_text(json.dumps({"config": record, "rounds": rounds}))
    assert finished_run(tmp_path, on, 2) is not None
    assert finished_run(tmp_path, on.replace("owners_per_round=2", "owners_per_round=3"), 2) is None


def _llm_grid_dry_run(tmp_path, **env):
    """scripts/llm_results.sh --dry-run into tmp_path/out, with empty datasets in tmp_path as the shared data."""
    for name in ("fpb", "sst2", "pubmedqa"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "train.jsonl").write_text("")
    env = {**os.environ, "DPLORA_SHARED_DATA": str(tmp_path), **env}
    return subprocess.run(["bash", "scripts/llm_results.sh", "--dry-run", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, env=env)


def test_the_llm_grid_composes_every_job_on_the_llm_recipes(tmp_path, packaged_llm):
    """scripts/llm_results.sh --dry-run: every stage's sweep parses with Hydra's grammar and every job composes;
    DP jobs train on recipe=llm-dp, non-private ones on llm-none; all score validation and test."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    proc = _llm_grid_dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    parser, jobs = OverridesParser.create(), []
    for command in proc.stdout.splitlines():
        overrides = parser.parse_overrides(command.split()[3:])
        choices = [[f"{o.get_key_element()}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                           else [o.get_value_element_as_str()])]
                   for o in overrides if not o.get_key_element().startswith(("hydra", "sweep."))]
        jobs += [config.compose(list(job)) for job in itertools.product(*choices)]
    assert len(jobs) == 17 and not (tmp_path / "out").exists()
    dp, none = (OmegaConf.load(config.CONF_DIR / "recipe" / f"llm-{name}.yaml") for name in ("dp", "none"))
    for cfg in jobs:
        recipe = none if cfg.privacy.target_epsilon is None else dp
        assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.chat_template
        assert (cfg.train.learning_rate, cfg.num_rounds, cfg.model.lora.layers, cfg.model.lora.r) == \
            (recipe.train.learning_rate, recipe.num_rounds, recipe.model.lora.layers, recipe.model.lora.r)
        assert cfg.eval.split == "validation" and cfg.eval.also_test
    assert {(c.dataset.name, c.privacy.target_epsilon) for c in jobs} == \
        {(d, e) for d in ("fpb", "sst2", "pubmedqa-long") for e in (1.0, 8.0, None)}
    fpb = [(c.dataset.max_train, c.privacy.target_epsilon) for c in jobs if c.dataset.name == "fpb"]
    assert sorted(fpb, key=str) == sorted([(2000, e) for e in (1.0, 8.0, None) for _ in range(3)]  # 3 seeds an arm
                                          + [(None, 8.0), (None, None)], key=str)  # every record, as MiniLM's rows
    # each dataset's zero-shot start is scored once, by its first job
    assert [(c.dataset.name, c.privacy.target_epsilon) for c in jobs if c.eval.start] == \
        [("fpb", None), ("sst2", 8.0), ("pubmedqa-long", 8.0)]


def test_the_llm_grids_scale_is_cpu_or_full(tmp_path):
    """LLM_SCALE=full drops the subsampling (so no separate every-record FPB stages); a misspelt scale is refused
    before anything runs, instead of silently running the CPU grid."""
    full = _llm_grid_dry_run(tmp_path, LLM_SCALE="full")
    assert full.returncode == 0, full.stderr
    stages = full.stdout.splitlines()
    assert len(stages) == 12 and not any("dataset.max_train=2000" in s for s in stages)
    assert sum("dataset=fpb " in s for s in stages) == 6 and all("max_train=10000" in s for s in stages
                                                                   if "dataset=sst2 " in s)
    wrong = _llm_grid_dry_run(tmp_path, LLM_SCALE="FULL")
    assert wrong.returncode == 2 and "LLM_SCALE must be cpu or full, not 'FULL'" in wrong.stderr
    assert wrong.stdout == "" and not (tmp_path / "out").exists()
