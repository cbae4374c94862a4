"""Hydra multirun over full Flower simulations: one `flwr run` per job, results in the job's directory.

    python scripts/sweep.py -m data_dir=/abs/shared/data dataset=fpb,pubmedqa privacy.target_epsilon=1,4,8,null seed=0,1,2

Every job composes conf/ with its overrides (as the apps do), runs `flwr run .` with
`sweep.num_supernodes` simulated owners on a SuperLink this script starts and stops, and leaves metrics.json,
adapter/, checkpoint/ and flwr.log in its Hydra job directory (multirun/<date>/<time>/<job>/). Per-round
summary lines are printed as they come. A failed job is reported, the sweep goes on, and the script exits 1
at the end naming every failed job. A job whose folder already holds a finished run of the same config (every
round of it in metrics.json) is skipped, so a multirun repeated into the same hydra.sweep.dir continues with
the job it stopped in. Then: python scripts/report.py multirun/<date>/<time> --out DIR
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dplora import config
from dplora.simulation import SimulationError, finished_run, flwr_run, local_superlink

FAILED: list[str] = []
ENV: dict[str, str] = {}


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    overrides = " ".join(shlex.quote(o) if " " in o else o for o in hc.overrides.task)
    name = f"job {hc.job.num} ({overrides or 'defaults'})"
    out = Path(hc.runtime.output_dir)
    if (done := finished_run(out, overrides)) is not None:
        final = done["rounds"][-1]
        print(f"[sweep] {name}: finished before in {out} (all {len(done['rounds'])} rounds, the same config), "
              f"accuracy {final['accuracy']:.4f}: skipped (delete the folder to run it again)", flush=True)
        return final["accuracy"]
    print(f"[sweep] {name}: starting, results in {out}", flush=True)
    (out / "FAILED").unlink(missing_ok=True)  # a rerun into the same folder: an old failure no longer applies
    start = time.time()

    def progress(line: str) -> None:  # the ServerApp's one-line round summaries
        if summary := re.search(r"INFO \S*:\s+(round \d+/\d+: .*)", line):
            print(f"[sweep] {name}: {summary.group(1)}", flush=True)

    try:
        metrics = flwr_run(overrides, out, cfg.sweep.num_supernodes, ENV, on_line=progress)
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


if __name__ == "__main__":
    sys.exit(main())
