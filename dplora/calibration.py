"""The noise multiplier of a planned run: Opacus' calibration, remembered on disk and checked on every read.

Calibrating sigma for (target epsilon, delta, q, steps) is a bisection of 10-30 accountant evaluations, seconds
each time; the server and every owner process compute it for the same public numbers. The result is kept in
`$DPLORA_CALIBRATION_CACHE` (default ~/.cache/dplora/noise-multipliers.json) and a remembered sigma is used only
after one accountant evaluation confirms that it keeps the whole run within the target epsilon: the file is a
memo of a public computation, and a wrong or edited entry can never weaken the guarantee (it is recomputed).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import opacus
from opacus.accountants.utils import get_noise_multiplier

_verified: dict[str, float] = {}  # this process: entries already checked


def cache_file() -> Path:
    return Path(os.environ.get("DPLORA_CALIBRATION_CACHE", "~/.cache/dplora/noise-multipliers.json")).expanduser()


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(key: str, sigma: float) -> None:
    """Add one entry (whole-file replace: a reader never sees half a file; a lost race loses a memo, no more)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read() | {key: sigma}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f)
        os.replace(f.name, path)
    except OSError:
        pass  # an unwritable cache only costs time


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Sigma such that `steps` Poisson-subsampled Gaussian steps at rate `sample_rate` spend at most
    `target_epsilon` (Opacus' `get_noise_multiplier`, epsilon tolerance 0.5% of the target)."""
    from .privacy import epsilon

    key = json.dumps([opacus.__version__, accountant, float(target_epsilon), float(delta), float(sample_rate),
                      int(steps)])  # the version too: owners and server must calibrate alike
    if key in _verified:
        return _verified[key]
    sigma = _read().get(key)
    if not (isinstance(sigma, float) and sigma > 0
            and epsilon(sigma, sample_rate, steps, delta, accountant) <= target_epsilon):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=steps, accountant=accountant,
                                               epsilon_tolerance=0.005 * target_epsilon))
        _write(key, sigma)
    _verified[key] = sigma
    return sigma
