"""Hydra multirun over full Flower simulations: one `flwr run` per job, results in the job's directory.

    python scripts/sweep.py -m data_dir=/abs/shared/data dataset=fpb,pubmedqa privacy.target_epsilon=1,4,8,null seed=0,1,2
    python scripts/sweep.py -m sweep.num_supernodes=2 model=tiny-llama privacy.target_epsilon=4,8

The multirun is over the product's config (conf/): every job composes conf/ with its overrides (as the apps do),
runs `flwr run .` with N simulated data owners on a SuperLink this script starts and stops, and leaves
metrics.json, adapter/, checkpoint/ and flwr.log in its Hydra job directory (multirun/<date>/<time>/<job>/).
N is the sweep's own setting, not the product's: `sweep.num_supernodes=N` on the command line (default 5; one
value per sweep; `+sweep.num_supernodes=N` is the same) is taken out before Hydra sees the overrides, so it
is in no job's config, and each job records it in sweep.json beside metrics.json. Per-round summary lines are
printed as they come. A failed job is reported, the sweep goes on, and the script exits 1 at the end naming
every failed job. A job whose folder already holds a finished run of the same config and owner count (every
round of it in metrics.json) is skipped, so a multirun repeated into the same hydra.sweep.dir continues with
the job it stopped in, and that job resumes from its last checkpointed round (`resume=true`: the same run, its
owners' accounts continued from their ledgers) where a killed run of the same config and owner count left one;
a folder holding a finished run of another config or owner count is never overwritten (the job fails, naming
the first key that differs). Then: python scripts/report.py multirun/<date>/<time> --out DIR
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dplora import config
from experiments.simulation import (SimulationError, finished_elsewhere, finished_run, flwr_run, interrupted_run,
                                   local_superlink)

FAILED: list[str] = []
ENV: dict[str, str] = {}
OWNERS_KEY = "sweep.num_supernodes"  # the sweep's own setting on its command line (not a key of conf/)
DEFAULT_OWNERS = 5
SWEEP = {"num_supernodes": DEFAULT_OWNERS}  # simulated data owners per job, from the command line


def take_sweep_settings(argv: list[str]) -> tuple[list[str], int]:
    """`argv` without the sweep's own `sweep.num_supernodes=N` (or `+`/`++sweep.num_supernodes=N`), and N
    (default 5). Hydra never sees it: conf/ has no such key, and it must not reach a job's config. ValueError
    for another `sweep.*` key or a value that is not one whole number >= 1."""
    rest, owners = [], DEFAULT_OWNERS
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not key.startswith("sweep."):
            rest.append(arg)
            continue
        if key != OWNERS_KEY or not sep:
            raise ValueError(f"unknown sweep setting {arg!r} (the sweep takes {OWNERS_KEY}=N)")
        try:
            owners = int(value)
        except ValueError:
            raise ValueError(f"{OWNERS_KEY} takes one whole number per sweep (got {value!r}); run one sweep per "
                             "owner count") from None
        if owners < 1:
            raise ValueError(f"{OWNERS_KEY} must be >= 1 (got {owners})")
    return rest, owners


@hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    overrides = " ".join(shlex.quote(o) if " " in o else o for o in hc.overrides.task)
    name = f"job {hc.job.num} ({overrides or 'defaults'})"
    out = Path(hc.runtime.output_dir)
    owners = SWEEP["num_supernodes"]
    if (done := finished_run(out, overrides, owners)) is not None:
        final = done["rounds"][-1]
        print(f"[sweep] {name}: finished before in {out} (all {len(done['rounds'])} rounds, the same config "
              f"and {owners} owners), "
              f"accuracy {final['accuracy']:.4f}: skipped (delete the folder to run it again)", flush=True)
        return final["accuracy"]
    if (other := finished_elsewhere(out, overrides, owners)) is not None:
        FAILED.append(f"{name} in {out}: holds a finished run of {other}")
        print(f"[sweep] {name}: NOT RUN: {out} holds a finished run of {other}; move it away or delete it to run "
              "this job there", flush=True)
        return None
    run = overrides
    if done := interrupted_run(out, overrides, owners):
        run = f"{overrides} resume=true".strip()
        print(f"[sweep] {name}: resuming the run killed in {out} after its round {done}", flush=True)
    else:
        print(f"[sweep] {name}: starting, results in {out}", flush=True)
    (out / "FAILED").unlink(missing_ok=True)  # a rerun into the same folder: an old failure no longer applies
    (out / "sweep.json").write_text(json.dumps({"num_supernodes": owners}) + "\n")  # finished_run reads it
    start = time.time()

    def progress(line: str) -> None:  # the ServerApp's one-line round summaries
        if summary := re.search(r"INFO \S*:\s+(round \d+/\d+: .*)", line):
            print(f"[sweep] {name}: {summary.group(1)}", flush=True)

    try:
        metrics = flwr_run(run, out, owners, ENV, on_line=progress)
    except (config.ConfigError, SimulationError) as err:
        FAILED.append(f"{name} in {out}: {str(err).splitlines()[0]}")
        (out / "FAILED").write_text(str(err))
        print(f"[sweep] {name}: FAILED: {err}", flush=True)
        return None
    final = metrics["rounds"][-1]
    print(f"[sweep] {name}: done in {time.time() - start:.0f}s, accuracy {final['accuracy']:.4f}, "
          f"epsilon {final['epsilon']}", flush=True)
    return final["accuracy"]


def main() -> int:
    try:
        sys.argv[1:], SWEEP["num_supernodes"] = take_sweep_settings(sys.argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dplora-sweep-") as home, local_superlink(Path(home)) as env:
        ENV.update(env)
        try:
            job()
        except SystemExit as exit_:  # Hydra exits on bad command lines; keep the SuperLink cleanup
            if exit_.code not in (0, None):
                return int(exit_.code) if isinstance(exit_.code, int) else 1
    if FAILED:
        print(f"[sweep] {len(FAILED)} job(s) failed:", *FAILED, sep="\n  ", file=sys.stderr)
        return 1
    print("[sweep] all jobs finished")
    return 0

