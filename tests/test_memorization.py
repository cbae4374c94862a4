"""The canary memorization audit (experiments/memorization.py): canaries, their insertion into one owner's data,
the secret scoring, the DP bound, and the script's quick mode end to end on the tiny random-weight model."""

import json
import math

import pytest
import torch

from dplora import config, data, models
from dplora.data import IGNORE_INDEX
from experiments import memorization as mem

TINY = "model=tiny-llama recipe=plain dataset.num_train=60 dataset.num_test=10"


def test_canaries_per_repetition_count_with_distinct_names_and_uniform_secrets():
    canaries = mem.make_canaries(digits=6, per_count=4, references=8, seed=0)
    assert [c.repetitions for c in canaries] == [1] * 4 + [4] * 4 + [16] * 4 + [0] * 8
    assert len({c.name for c in canaries}) == 20
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in canaries)
    assert canaries == mem.make_canaries(6, 4, 8, seed=0) and canaries != mem.make_canaries(6, 4, 8, seed=1)
    with pytest.raises(mem.MemorizationError, match="need 30 names"):
        mem.make_canaries(digits=6, per_count=8, references=6, seed=0)


def test_insertion_touches_only_the_canary_owner_and_puts_the_loss_on_the_secret():
    cfg = config.compose(TINY)
    model, tokenizer = models.build_model(cfg)
    owners = [data.encode(data.client_partition(cfg, i, 3)[0], tokenizer, cfg) for i in range(3)]
    canaries = mem.make_canaries(digits=4, per_count=1, references=2, seed=0)
    canary_set = mem.encode_canaries(canaries, tokenizer, cfg)
    assert len(canary_set) == 1 + 4 + 16  # references never become records
    joined = mem.insert_canaries(owners, canary_set, owner=1)
    assert joined[0] is owners[0] and joined[2] is owners[2]  # the other owners' data, untouched
    n = len(owners[1])
    assert len(joined[1]) == n + 21
    assert all(torch.equal(a[:n], b) and torch.equal(a[n:], c)
               for a, b, c in zip(joined[1].tensors, owners[1].tensors, canary_set.tensors))
    # the loss covers the secret and EOS only, at the end of the (left-padded) record
    ids, mask, labels = canary_set.tensors
    first = canaries[0]
    answer = mem.secret_ids(first.secret, tokenizer, cfg) + [tokenizer.eos_token_id]
    assert labels[0][labels[0] != IGNORE_INDEX].tolist() == answer
    assert ids[0, -len(answer):].tolist() == answer and mask[0, -1] == 1
    prefix = mem.prefix_ids(first, tokenizer, cfg)
    assert ids[0, -len(answer) - len(prefix):-len(answer)].tolist() == prefix
    assert tokenizer.decode(prefix).lower().count(first.name.split()[0].lower()) == 1
    with pytest.raises(mem.MemorizationError, match="owner 3 is outside 0..2"):
        mem.insert_canaries(owners, canary_set, owner=3)


def test_secret_scores_on_the_cached_prefix_equal_scoring_each_whole_sequence():
    cfg = config.compose(TINY)
    torch.manual_seed(0)
    model, tokenizer = models.build_model(cfg)
    for p in model.parameters():  # a trained-looking adapter: B away from zero
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    model.eval()
    prefix = mem.prefix_ids(mem.Canary("Ada Lovelace", "123", 1), tokenizer, cfg)
    candidates = [mem.secret_ids(s, tokenizer, cfg) for s in ("123", "9", "4567", "000")]
    fast = mem.secret_log_likelihoods(model, prefix, candidates, batch=3)
    for score, cand in zip(fast, candidates):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + cand])).logits[0].float().log_softmax(-1)
        slow = sum(logits[len(prefix) - 1 + j, t] for j, t in enumerate(cand))
        assert float(score) == pytest.approx(float(slow), abs=1e-4)


def test_the_dp_bound_on_median_exposure():
    assert mem.dp_bound_bits(None, 1e-5, 1, 10**6) is None
    assert mem.dp_bound_bits(1.0, 1e-5, 1, 10**6) == pytest.approx(math.log2(math.e) - math.log2(0.5 - 1e-5))
    assert mem.dp_bound_bits(1.0, 1e-5, 4, 10**6) == pytest.approx(
        4 * math.log2(math.e) - math.log2(0.5 - 4 * math.exp(3) * 1e-5))
    assert mem.dp_bound_bits(8.0, 1e-5, 4, 10**6) is None  # delta_k = 4 e^24 1e-5: no bound
    assert mem.dp_bound_bits(8.0, 1e-5, 1, 100) == pytest.approx(math.log2(100))  # capped at log2 |R|


def test_quick_mode_end_to_end_resumes_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "memorization.json"
    assert mem.main(["--quick", "--out", str(out), "--arms", "none", "8", "--local-check"]) == 0
    record = json.loads(out.read_text())
    assert [a["epsilon"] for a in record["arms"]] == [None, 8.0]
    check = record["local_check"]  # the recipe on the 3 trained canaries alone, 4 copies each
    assert check["records"] == 12 and [p["steps"] for p in check["curve"]] == [0, 4, 8, 12]
    assert all(len(p["log_likelihoods"]) == 3 for p in check["curve"]) and check["mean_gain"] > 0
    space = record["settings"]["space_size"]
    for arm in record["arms"] + [record["before"]]:
        assert set(arm["by_repetitions"]) == {"1", "4", "16"}
        for k, row in arm["by_repetitions"].items():
            assert row["count"] == 1 and 0 <= row["extracted"] <= 1
            assert 0 <= row["median_exposure"] <= math.log2(space)
        assert 0 <= arm["reference"]["median_exposure"] <= math.log2(space)
    for arm, extra in zip(record["arms"], (mem.QUICK["none"], mem.QUICK["dp"])):  # each arm its recipe's adapter
        cfg = config.compose(f"{record['settings']['overrides']} {extra}")
        assert arm["adapter"]["train_a"] is False and arm["adapter"]["r"] == cfg.model.lora.r
        assert arm["adapter"]["trainable_parameters"] == models.num_parameters(models.build_model(cfg)[0])[0]
    dp = record["arms"][1]
    assert dp["canary_owner_epsilon"] <= 8.0 and dp["noise_multiplier"] > 0 and dp["steps"] > 0
    assert record["arms"][0]["canary_owner_epsilon"] is None
    assert dp["by_repetitions"]["16"]["dp_bound_bits"] is None and dp["by_repetitions"]["1"]["dp_bound_bits"] > 0
    assert "median_exposure" in record["reference"]
    # rerun: both arms are recorded, nothing trains again
    capsys.readouterr()
    assert mem.main(["--quick", "--out", str(out), "--arms", "none", "8"]) == 0
    assert capsys.readouterr().out.count("recorded, skipped") == 2
    assert json.loads(out.read_text())["arms"] == record["arms"]
    for bad in (["--arms", "0"], ["--arms", "eight"], ["--arms", "8", "8.0"]):
        with pytest.raises(SystemExit):
            mem.main(["--quick", "--out", str(out)] + bad)
    # the table: one row per model and repetition count, gains against the model before fine-tuning
    capsys.readouterr()
    assert mem.main(["--out", str(out), "--table"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 + 3 * 4 and rows[2].startswith("| before fine-tuning | - | 1 |")
    assert rows[-1].startswith("| epsilon 8 | ") and "never (reference)" in rows[-1]
    gain = mem.likelihood_gain(record["before"]["canaries"], record["arms"][0]["canaries"], 16)
    assert f"| {gain:+.2f} |" in rows[2 + 4 + 2]  # non-private, 16 repetitions
    assert mem.likelihood_gain(record["before"]["canaries"], record["before"]["canaries"], 4) == 0
    with pytest.raises(SystemExit):
        mem.main(["--out", str(tmp_path / "missing.json"), "--table"])
    for bad in (["--repetitions", "0"], ["--repetitions", "4", "4"], ["--repetitions", "1", "4"]):
        with pytest.raises(SystemExit):  # the last: not what --out records (1 4 16)
            mem.main(["--quick", "--out", str(out)] + bad)
    moved = tmp_path / "moved.json"  # the same run recorded on a machine with its data elsewhere: resumes
    moved.write_text(json.dumps({**record, "settings": {**record["settings"], "overrides": record["settings"][
        "overrides"] + " data_dir=/elsewhere"}}))
    capsys.readouterr()
    assert mem.main(["--quick", "--out", str(moved), "--arms", "none"]) == 0
    assert "recorded, skipped" in capsys.readouterr().out
    more = tmp_path / "more.json"  # other repetition counts, in their own file
    assert mem.main(["--quick", "--out", str(more), "--arms", "none", "--repetitions", "2", "32"]) == 0
    assert set(json.loads(more.read_text())["arms"][0]["by_repetitions"]) == {"2", "32"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {"overrides": "something else"}}))
    with pytest.raises(SystemExit):
        mem.main(["--quick", "--out", str(other)])
    assert "records another setting" in capsys.readouterr().err
