"""scripts/report.py on hand-made sweep folders: grouping over seeds, mixed settings refused, failures listed."""

import csv
import json
import subprocess
import sys

import pytest

from .conftest import ROOT


def job(folder, *, seed, accuracy, epsilon=8.0, lr=0.01, dataset="fpb", rounds=3, failed=False, majority=None,
        partitioner="iid"):
    folder.mkdir(parents=True)
    config = {"seed": seed, "num_rounds": 3, "data_dir": f"/data{seed}",
              "dataset": {"name": dataset, "path": f"/data{seed}/{dataset}"}, "partitioner": {"name": partitioner},
              "privacy": {"target_epsilon": epsilon}, "train": {"learning_rate": lr}}
    final = {"accuracy": accuracy, "macro_f1": accuracy - 0.1, "epsilon": epsilon and epsilon - 0.01,
             "seconds": 100.0 + seed}
    metrics = {"config": config, "rounds": [final] * rounds}
    if majority is not None:
        metrics["evaluation_split"] = {"split": "test", "examples": 100, "majority_class": majority}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (folder / "FAILED").write_text("boom")


def report(sweep, out):
    return subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)


def test_seeds_of_several_sweeps_share_a_row_with_mean_and_std(tmp_path):
    job(tmp_path / "a" / "0", seed=0, accuracy=0.70)
    job(tmp_path / "b" / "0", seed=1, accuracy=0.80)   # another sweep folder below the same parent
    job(tmp_path / "b" / "1", seed=0, accuracy=0.90, epsilon=None)
    job(tmp_path / "b" / "2", seed=2, accuracy=0.99, rounds=2)  # unfinished
    job(tmp_path / "b" / "3", seed=3, accuracy=0.99, failed=True)
    done = report(tmp_path, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["target_epsilon"], r["seeds"]) for r in rows] == [("8.0", "2"), ("non-private", "1")]
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(0.75)
    assert float(rows[0]["accuracy_std"]) == pytest.approx(0.0707, abs=1e-4)  # sample std of 0.70, 0.80
    assert float(rows[0]["seconds_mean"]) == pytest.approx(100.5)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| fpb | iid | 8 | 2 | 75.00 ± 7.07 |" in markdown
    assert "Failed or unfinished jobs (2)" in markdown and "b/2" in markdown and "b/3" in markdown


def test_a_row_mixing_training_settings_is_refused(tmp_path):
    job(tmp_path / "0", seed=0, accuracy=0.70)
    job(tmp_path / "1", seed=1, accuracy=0.80, lr=0.001)
    done = report(tmp_path, tmp_path / "out")
    assert done.returncode == 1 and "train.learning_rate" in done.stderr


def test_nothing_to_report(tmp_path):
    done = report(tmp_path, tmp_path / "out")
    assert done.returncode == 1 and "no finished job" in done.stderr
    assert report(tmp_path / "missing", tmp_path / "out").returncode != 0


def test_the_plot_has_a_panel_per_dataset_and_draws_before_beside_after(tmp_path):
    for i, (dataset, partitioner, eps, acc) in enumerate([
            ("fpb", "iid", 1, 0.62), ("fpb", "iid", 8, 0.75), ("fpb", "iid", None, 0.80),
            ("fpb", "dirichlet", 8, 0.65), ("sst2", "iid", 8, 0.70), ("sst2", "iid", None, 0.85)]):
        job(tmp_path / "new" / str(i), seed=0, accuracy=acc, epsilon=eps, dataset=dataset, majority=0.594,
            partitioner=partitioner)
        job(tmp_path / "old" / str(i), seed=0, accuracy=acc - 0.1, epsilon=eps, dataset=dataset,
            partitioner=partitioner)
    done = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path / "new"), "--out", str(tmp_path / "out"),
                           "--before", str(tmp_path / "old")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| fpb | iid | 8 | 1 | 65.00" in (tmp_path / "out" / "before.md").read_text()
    from PIL import Image
    width, height = Image.open(tmp_path / "out" / "privacy_utility.png").size
    assert width > 1.8 * height  # two panels side by side
    missing = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path / "new"), "--out",
                              str(tmp_path / "out"), "--before", str(tmp_path / "nowhere")], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "is not a folder" in missing.stderr


def test_before_can_be_an_earlier_reports_csv_and_subsamples_are_their_own_dataset(tmp_path):
    for seed in (0, 1):
        job(tmp_path / "new" / f"a{seed}", seed=seed, accuracy=0.70, dataset="sst2", majority=0.5)
        job(tmp_path / "new" / f"b{seed}", seed=seed, accuracy=0.80, dataset="sst2", majority=0.5)
    for seed, folder in ((0, "a0"), (1, "a1")):  # the a* jobs used a 2,000-sentence subsample, the b* 10,000
        for name, size in ((folder, 2000), (folder.replace("a", "b"), 10000)):
            path = tmp_path / "new" / name / "metrics.json"
            metrics = json.loads(path.read_text())
            metrics["config"]["dataset"]["max_train"] = size
            path.write_text(json.dumps(metrics))
    (tmp_path / "old.csv").write_text(
        "dataset,partitioner,target_epsilon,seeds,accuracy_mean,accuracy_std,macro_f1_mean,macro_f1_std,"
        "epsilon_spent_max,seconds_mean\n"  # an older report: no majority column
        "sst2-2000,iid,8,3,0.5975,0.0612,0.5168,0.1125,7.98,132\n"
        "sst2-2000,iid,non-private,3,0.7909,0.0059,0.7898,0.0073,,111\n")
    done = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path / "new"), "--out", str(tmp_path / "out"),
                           "--before", str(tmp_path / "old.csv")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| sst2-2000 | iid | 8 | 2 | 70.00 ± 0.00" in table
    assert "| sst2-10000 | iid | 8 | 2 | 80.00 ± 0.00" in table
    before = (tmp_path / "out" / "before.md").read_text()
    assert "| sst2-2000 | iid | 8 | 3 | 59.75 ± 6.12" in before
    assert "| sst2-2000 | iid | non-private | 3 | 79.09" in before
    (tmp_path / "bad.csv").write_text("dataset,partitioner,target_epsilon,accuracy_mean,accuracy_std\nsst2,iid,8,,\n")
    bad = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path / "new"), "--out", str(tmp_path / "out"),
                          "--before", str(tmp_path / "bad.csv")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "lacks accuracy_mean, accuracy_std" in bad.stderr


def test_targets_are_met_or_missed_with_the_numbers_that_decide(tmp_path):
    """DIR/targets.md: FPB epsilon 8 against non-private (3 points), FPB epsilon 1 against the majority class
    (5 points; the earlier report has no majority column, the same test split's is used), SST-2 not run."""
    for seed in (0, 1):
        job(tmp_path / "new" / f"e8-{seed}", seed=seed, accuracy=0.76 + seed / 100, majority=0.594)
        job(tmp_path / "new" / f"np-{seed}", seed=seed, accuracy=0.80, epsilon=None, majority=0.594)
        job(tmp_path / "new" / f"e1-{seed}", seed=seed, accuracy=0.65, epsilon=1.0, majority=0.594)
    (tmp_path / "old.csv").write_text(
        "dataset,partitioner,target_epsilon,seeds,accuracy_mean,accuracy_std,macro_f1_mean,macro_f1_std,"
        "epsilon_spent_max,seconds_mean\n"
        "fpb,iid,1,3,0.5938,0.0,0.2484,0.0,0.998,338\n"
        "fpb,iid,8,3,0.6976,0.0031,0.5755,0.016,7.963,342\n"
        "fpb,iid,non-private,3,0.7749,0.0086,0.7321,0.0132,,317\n")
    done = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path / "new"), "--out", str(tmp_path / "out"),
                           "--before", str(tmp_path / "old.csv")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    targets = (tmp_path / "out" / "targets.md").read_text().splitlines()
    assert targets[2] == ("| fpb, epsilon 8 within 3 points of non-private | 69.8 vs 77.5: 7.7 below (3/3 seeds) "
                          "| 76.5 vs 80.0: 3.5 below (2/2 seeds) | no |")
    assert targets[3] == ("| fpb, epsilon 1 at least 5 points above the majority class | 59.4 vs 59.4: +0.0 (3 seeds) "
                          "| 65.0 vs 59.4: +5.6 (2 seeds) | yes |")
    assert targets[4] == "| sst2-2000, epsilon 8 within 8 points of non-private | not run | not run | - |"
    assert "targets.md" in done.stdout


LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "train_a": False, "layers": None}


def llm_job(folder, *, seed, epsilon, zero_shot, final, rounds=2, num_rounds=2, lora=LORA):
    folder.mkdir(parents=True)
    config = {"seed": seed, "num_rounds": num_rounds, "dataset": {"name": "fpb", "max_train": 1000},
              "model": {"name": "smollm2-135m-instruct", "lora": lora}, "privacy": {"target_epsilon": epsilon}}
    clients = [] if epsilon is None else [{"epsilon": epsilon - 0.1}]
    initial = None if zero_shot is None else {  # None: eval.start=false, round 0 not scored
        "accuracy": 0.3, "test_accuracy": zero_shot, "test_macro_f1": zero_shot / 2, "test_exact_match": 0.0}
    rounds_ = [{"round": r, "accuracy": 0.7, "test_accuracy": final, "test_macro_f1": final - 0.1,
                 "test_exact_match": final - 0.2, "clients": clients, "seconds": 50.0 * r}  # since the run began
               for r in range(1, rounds + 1)]
    (folder / "metrics.json").write_text(json.dumps({"config": config, "initial": initial, "rounds": rounds_}))


def test_llm_report_rows_hold_the_zero_shot_start_and_the_final_test_scores_over_seeds(tmp_path):
    """Jobs that skipped round 0 (eval.start=false) take the zero-shot start of their dataset's job that scored it;
    jobs of another adapter make rows of their own (the start is the base model's, whatever the adapter)."""
    llm_job(tmp_path / "dp" / "0", seed=0, epsilon=8.0, zero_shot=0.25, final=0.70)
    llm_job(tmp_path / "dp" / "1", seed=1, epsilon=8.0, zero_shot=None, final=0.80)  # eval.start=false
    llm_job(tmp_path / "none" / "0", seed=0, epsilon=None, zero_shot=None, final=0.85)
    llm_job(tmp_path / "top8" / "0", seed=0, epsilon=8.0, zero_shot=None, final=0.60,
            lora={"r": 8, "target_modules": ["q_proj", "v_proj"], "train_a": False, "layers": 8})
    llm_job(tmp_path / "killed" / "0", seed=2, epsilon=8.0, zero_shot=0.25, final=0.1, rounds=1)  # unfinished
    run = subprocess.run([sys.executable, "scripts/llm_report.py", str(tmp_path), "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r" / "llm.json").read_text())
    dp, none, top8 = report["rows"]
    assert {j["job"]: j["zero_shot_from"] for j in report["jobs"]} == {  # the start, scored once, for all
        str(tmp_path / d / "0"): str(tmp_path / "dp" / "0") for d in ("dp", "none", "top8")} | {
        str(tmp_path / "dp" / "1"): str(tmp_path / "dp" / "0")}
    assert none["zero_shot_accuracy"] == pytest.approx((25.0, 0.0))
    assert (dp["target_epsilon"], dp["seeds"], none["target_epsilon"], none["seeds"]) == (8.0, 2, None, 1)
    assert dp["zero_shot_accuracy"] == pytest.approx((25.0, 0.0))
    assert dp["final_accuracy"][0] == pytest.approx(75.0) and dp["final_exact_match"][0] == pytest.approx(55.0)
    assert dp["epsilon_spent"] == pytest.approx(7.9) and none["epsilon_spent"] is None
    assert dp["seconds"] == pytest.approx(100.0) and dp["final_rouge_l"] is None
    assert "unfinished: " in run.stdout and "killed" in run.stdout
    assert (top8["adapter"], top8["seeds"], top8["final_accuracy"][0]) == ("FFA r8, q_proj+v_proj, top 8 layers", 1,
                                                                          pytest.approx(60.0))
    table = (tmp_path / "r" / "llm.md").read_text()
    assert "| fpb-1000 | FFA r4, q_proj+v_proj, all layers | 8 | 2 | 25.00 ± 0.00 | 75.00 ± 7.07 |" in table
    assert "| fpb-1000 | FFA r8, q_proj+v_proj, top 8 layers | 8 | 1 | 25.00 ± 0.00 | 60.00 ± 0.00 |" in table
