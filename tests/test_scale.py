"""scripts/scale.py: the server's work per reply as replies grow, and a round's time as owners grow."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import scale

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


def test_the_server_cost_goes_through_every_duty_and_measures_its_memory():
    """N honest replies aggregate through the product's strategy; the aggregator's share is part of the whole,
    and the peak memory is measured against the replies' own size."""
    layout = scale.adapter_layout("tiny")
    row = scale.server_cost(layout, "fedavg", 6, repeats=1)
    assert row["replies"] == 6 and 0 < row["aggregator_seconds"] and row["seconds_per_reply"] == row["seconds"] / 6
    assert row["replies_mb"] == pytest.approx(6 * 4 * sum(a * b for a, b in layout.values()) / 2**20)
    assert row["peak_extra_mb"] >= 0


def test_owners_with_their_own_sample_rates_are_checked_and_aggregated_in_both_rounds():
    rates = scale.per_owner_rates_cost(scale.adapter_layout("tiny"), 3)
    assert rates["distinct_sample_rates"] == 3
    assert rates["round_1_seconds_per_reply"] > 0 and rates["round_2_seconds_per_reply"] > 0


def test_the_exponent_of_a_power_law():
    assert scale.exponent({10: 1.0, 100: 10.0}) == pytest.approx(1.0)
    assert scale.exponent({10: 1.0, 20: 4.0, 40: 16.0}) == pytest.approx(2.0)
    assert scale.exponent({10: 3.0}) is None


def test_quick_end_to_end_with_a_flower_round(tmp_path):
    """--quick: the tiny adapter's server work for 2 replies and a `flwr run` of 2 owners, all sampled; the JSON
    has the keys the docs promise."""
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, "scripts/scale.py", "--out", str(out), "--quick", "--strategies", "fedavg",
                          "--owners", "2", "--fractions", "1", "--repeats", "1", "--rates-owners", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["server_seconds_per_reply"]) == set(result["round_seconds_per_owner"]) == {"2"}
    assert [(r["owners"], r["fraction_train"], r["sampled"]) for r in result["rounds"]] == [(2, 1.0, 2)]
    assert all(r["round_seconds"] > 0 for r in result["rounds"])
    assert "server/tiny/fedavg" in result["fits"] and "per_owner_sample_rates" not in result
    sizes = result["bytes_per_round"]["tiny"]
    assert sizes["per_reply"]["int8"] < sizes["per_reply"]["fp16"] < sizes["per_reply"]["fp32"]
    assert sizes["per_round"]["2"] == {d: 2 * b for d, b in sizes["per_reply"].items()}


@pytest.mark.parametrize("args", [["--owners", "1"], ["--repeats", "0"], ["--rates-owners", "1"],
                                  ["--strategies", "bogus"], ["--fractions", "0"]])
def test_bad_input_is_refused(tmp_path, args):
    with pytest.raises(SystemExit) as exit_:
        scale.main(["--out", str(tmp_path / "x.json"), "--quick", *args])
    assert exit_.value.code == 2 and not (tmp_path / "x.json").exists()


def test_user_level_plan_amplifies_only_when_owners_are_sampled(capsys):
    from experiments import user_level
    rows = user_level.plan_rows(8.0, 1e-5, 5, [(4, 4), (100, 10)])
    every, sampled = rows
    assert every["poisson_noise_multiplier"] == pytest.approx(every["fixed_noise_multiplier"], rel=2e-3)  # q = 1
    assert sampled["fixed_noise_multiplier"] == pytest.approx(every["fixed_noise_multiplier"])  # no population
    assert sampled["poisson_noise_multiplier"] < 0.5 * sampled["fixed_noise_multiplier"]
    assert sampled["poisson_noise_on_mean"] == pytest.approx(sampled["poisson_noise_multiplier"] / 10)
    assert user_level.main(["plan", "--rounds", "5", "--owners", "100:10"]) == 0
    assert "| 100 | 10 |" in capsys.readouterr().out
    for bad in (["plan", "--owners", "5:6"], ["plan", "--owners", "five"], ["plan", "--epsilon", "0"], []):
        with pytest.raises(SystemExit) as err:
            user_level.main(bad)
        assert err.value.code == 2


def test_user_level_run_fits_the_gap_and_refuses_bad_input(tmp_path, monkeypatch):
    from experiments import user_level
    assert int(29 * user_level.fraction_for(29, 100) * 100 / 29) == 29  # Flower samples int(N x fraction)
    assert all(int(n * user_level.fraction_for(m, n)) == m for n in (100, 500, 1000) for m in range(1, n + 1, 7))
    rows = [{"per_round": 10, "test_gap": 0.2}, {"per_round": 40, "test_gap": 0.1}, {"per_round": 80, "test_gap": -0.01}]
    fit = user_level.gap_fit(rows)  # gap ~ M^-0.5 through the two positive gaps: 3 points at 10 x (0.2/0.03)^2
    assert fit["points"] == 2 and fit["exponent"] == pytest.approx(-0.5)
    assert fit["per_round_for_gap_target"] == pytest.approx(10 * (0.2 / 0.03) ** 2)
    assert user_level.gap_fit(rows[:1]) is None
    assert "per_round_for_gap_target" not in user_level.gap_fit([{"per_round": 10, "test_gap": 0.1},
                                                                 {"per_round": 20, "test_gap": 0.2}])
    monkeypatch.setattr(user_level, "DATA", tmp_path / "nowhere")
    for bad in (["run", str(tmp_path), "--quick", "--population", "4", "--per-round", "5"],
                ["run", str(tmp_path), "--quick", "--rounds", "0"], ["run", str(tmp_path)],
                ["run", str(tmp_path), "--quick", "--set", "model.lora.r"]):
        with pytest.raises(SystemExit) as err:
            user_level.main(bad)
        assert err.value.code == 2
    row = {"per_round": 10, "noise_multiplier": 0.5, "noise_on_mean": 0.05, "clipping_norm": 2.0,
           "noise_norm_over_clipping_norm": 5.0,
           "reference": {"validation": 0.8, "test": 0.78}, "user_level": {"validation": 0.7, "test": 0.68},
           "test_gap": 0.1}
    text = user_level.table({"epsilon": 8.0, "delta": 1e-5, "rounds": 3, "population": 100, "majority_class": 0.5,
                             "start": {"validation": 0.75, "test": 0.72}, "overrides": ["model.lora.r=2"], "adapter_values": 10_000,
                             "rows": [row], "fit": None})
    assert "the start (before any round) 75.0 / 72.0" in text and "model.lora.r=2" in text
    assert "| 10 | 0.500 | 0.0500 | 5.00 | 2 | 80.0 / 78.0 | 70.0 / 68.0 | 10.0 |" in text and "10,000 adapter" in text
    assert user_level.adapter_values(["model=tiny-llama", "model.lora.train_a=false", "sweep.num_supernodes=3"]) < \
        user_level.adapter_values(["model=tiny-llama", "model.lora.train_a=true", "sweep.num_supernodes=3"])  # FFA: B only
