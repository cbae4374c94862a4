"""The server's checkpoint survives a crash at any point of its save: it is replaced as a whole folder."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dplora import config, models
from dplora.checkpoint import ResumeError, latest_checkpoint, load_checkpoint, optimizer_file
from server_app.app import save_adapter


@pytest.fixture
def run(tiny_cfg, tmp_path):
    """A tiny-llama adapter, a run's metrics.json with 3 rounds, and the function that saves round r's checkpoint
    (its adapter's B matrices set to r, and a server-optimizer state r)."""
    model, _ = models.build_model(tiny_cfg)
    cfg = config.to_dict(tiny_cfg)
    (tmp_path / "metrics.json").write_text(json.dumps({"config": cfg, "rounds": [{"round": r} for r in (1, 2, 3)]}))

    def save(server_round: int) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(server_round)
        save_adapter(model, tmp_path / "checkpoint", {"round": server_round, "run_key": "k"},
                     {"m": torch.full((2,), float(server_round))})

    return model, cfg, tmp_path, save


def _round_of(checkpoint) -> float:
    return next(v for k, v in checkpoint.adapter.items() if "lora_B" in k).flatten()[0].item()


def test_each_save_replaces_the_whole_checkpoint_and_peft_loads_it(run, tiny_cfg):
    _, cfg, out, save = run
    save(1)
    save(2)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.json"]  # no .tmp, no .old left
    assert [p.name for p in (out / "checkpoint").glob("server_optimizer-*")] == ["server_optimizer-2.safetensors"]
    checkpoint = load_checkpoint(True, out, cfg)
    assert checkpoint.round == 2 and _round_of(checkpoint) == 2.0 and checkpoint.server_optimizer["m"][0] == 2.0
    assert checkpoint.metrics["rounds"] == [{"round": 1}, {"round": 2}]  # round 3 is redone
    loaded = PeftModel.from_pretrained(models.build_base_model(tiny_cfg, models.build_tokenizer(tiny_cfg.model)), out / "checkpoint")
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for n, p in loaded.named_parameters() if "lora_B" in n)


def test_a_crash_while_writing_the_next_checkpoint_leaves_the_previous_one(run, monkeypatch):
    _, cfg, out, save = run
    save(1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dplora.checkpoint.save_optimizer_state", crash)  # after the adapter, before round.json
    with pytest.raises(OSError, match="disk full"):
        save(2)
    assert (out / "checkpoint.tmp" / "adapter_model.safetensors").is_file()  # round 2's adapter, incomplete
    checkpoint = load_checkpoint(True, out, cfg)
    assert checkpoint.round == 1 and _round_of(checkpoint) == 1.0 and checkpoint.server_optimizer["m"][0] == 1.0
    monkeypatch.undo()
    save(3)  # the next save clears the leftover
    assert not (out / "checkpoint.tmp").exists() and load_checkpoint(True, out, cfg).round == 3


@pytest.mark.parametrize("renamed", ["none", "old"])
def test_a_crash_between_the_folder_renames_resumes_from_the_newest_complete_folder(run, monkeypatch, renamed):
    """Killed after round 2's folder is complete, before (none) or after (old) round 1's is moved aside."""
    _, cfg, out, save = run
    save(1)
    real_rename, calls = type(out).rename, []

    def rename(self, target):
        calls.append(target.name)
        if len(calls) > (renamed == "old"):
            raise KeyboardInterrupt  # the process dies here
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    assert (out / "checkpoint").exists() == (renamed == "none")
    assert latest_checkpoint(out / "checkpoint") == out / "checkpoint.tmp"
    checkpoint = load_checkpoint(True, out, cfg)
    assert checkpoint.round == 2 and _round_of(checkpoint) == 2.0 and checkpoint.server_optimizer["m"][0] == 2.0
    save(3)  # and the run goes on saving
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.json"]
    assert load_file(optimizer_file(out / "checkpoint", 3))["m"][0] == 3.0


def test_no_complete_checkpoint_is_a_clear_error(run):
    _, cfg, out, _ = run
    (out / "checkpoint.tmp").mkdir()  # a save that died before writing anything
    with pytest.raises(ResumeError, match="round.json not found"):
        load_checkpoint(True, out, cfg)
