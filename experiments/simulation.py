"""Run the app as users do, `flwr run .` on a local simulation SuperLink, from Python (sweeps, benchmarks
and tests).

`local_superlink()` starts a SuperLink whose PID we know and always stops it (with everything it started);
`flwr_run()` runs one simulation, streams its per-round summary lines, and judges the run by its
metrics.json, because `flwr run --stream` exits 0 even when the run failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from dplora import config
from dplora.checkpoint import checkpoint_round

ROOT = Path(__file__).resolve().parent.parent
# The local SuperLink serves its Control, Runtime and Fleet APIs on one HTTP port: Flower's own local one is
# 127.0.0.1:39091; DPLORA_SUPERLINK_PORT picks another, so that tests can run beside a long sweep.
HTTP_ADDRESS = f"127.0.0.1:{int(os.environ.get('DPLORA_SUPERLINK_PORT', '39091'))}"


class SimulationError(RuntimeError):
    """A simulation did not finish every round; the message says why (the tail of its log)."""


def superlink_up() -> bool:
    try:
        with urllib.request.urlopen(f"http://{HTTP_ADDRESS}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def run_env(flwr_home: Path) -> dict[str, str]:
    """Environment for the SuperLink and `flwr`: this Python's tools first, no per-run dependency install."""
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def local_superlink(flwr_home: Path) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink on 127.0.0.1 and yield the environment to `flwr run` against it.

    The environment names the SuperLink's PID in DPLORA_SUPERLINK_PID."""
    if superlink_up():
        raise SimulationError(f"a SuperLink already listens on {HTTP_ADDRESS}; stop it first "
                              "(e.g. pkill -f flower-superlink)")
    flwr_home.mkdir(parents=True, exist_ok=True)
    # `flwr run` talks to this SuperLink by its address (FLWR_HOME is ours: a folder only these runs use)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                           f'address = "{HTTP_ADDRESS}"\ninsecure = true\n')
    env = run_env(flwr_home)
    log_path = flwr_home / "superlink.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [shutil.which("flower-superlink", path=env["PATH"]), "--insecure", "--simulation",
             "--isolation", "subprocess", "--host", HTTP_ADDRESS.split(":")[0], "--port", HTTP_ADDRESS.split(":")[1],
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not superlink_up():
            if proc.poll() is not None or time.time() > deadline:
                raise SimulationError(f"SuperLink did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield {**env, "DPLORA_SUPERLINK_PID": str(proc.pid)}
    finally:
        stop(proc)


def descendants(root: int, name: str = "") -> list[int]:
    """PIDs of the live processes under `root` (any session) whose command line contains `name`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if stat := _stat(int(entry.name)):  # empty: it just ended
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                if name in (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(pid)
            except OSError:
                continue
    return found


def stop(proc: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it started. Its SuperExec runs in a session of its own (so a
    process-group kill misses it) and would otherwise serve the next SuperLink on the same port."""
    spawned = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and (proc.poll() is None or any(running(pid) for pid in spawned)):
        time.sleep(0.2)
    for pid in [proc.pid, *spawned]:
        if running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


def running(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    stat = _stat(pid)
    return bool(stat) and stat[0] != "Z"


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (state, ppid, ...); empty if the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def finished_run(output_dir: Path, overrides: str, num_supernodes: int | None = None) -> dict | None:
    """The metrics.json of a run that already finished in `output_dir` (every round, not marked FAILED) with
    exactly the config `overrides` compose to and, if `num_supernodes` is given, that many simulated owners
    (as the sweep recorded it: sweep.json, or the `sweep` key of the config in records from before the sweep
    settings left conf/); None otherwise. A sweep run again into the same folder skips such jobs, so an
    interrupted grid continues with the job it was in."""
    metrics = _finished(output_dir)
    return metrics if metrics is not None and _is_this_run(output_dir, metrics, overrides, num_supernodes) else None


def finished_elsewhere(output_dir: Path, overrides: str, num_supernodes: int) -> str | None:
    """Why `output_dir` holds a finished run that is not the run `overrides` and `num_supernodes` ask for, or
    None (no finished run there, or that very run). A sweep must not overwrite it."""
    if (metrics := _finished(output_dir)) is None:
        return None
    if (difference := config_difference(_comparable(metrics["config"]), _wanted(overrides))) is not None:
        return f"another config ({difference})"
    owners = _owners(output_dir, metrics["config"])
    return None if owners in (None, num_supernodes) else f"another owner count ({owners}, {num_supernodes} now)"


def interrupted_run(output_dir: Path, overrides: str, num_supernodes: int) -> int | None:
    """The round after which a killed run of exactly the config `overrides` compose to and `num_supernodes`
    owners (sweep.json, written when the run started) left a complete checkpoint in `output_dir` (killed, or
    failed: a failure that repeats costs one round); None if there is none: no run there, a finished one,
    another config or owner count, or no round checkpointed yet. `resume=true` continues such a run: its run
    key, its owners' accounts (their ledgers)."""
    metrics = _recorded(output_dir)
    if metrics is None or _complete(metrics) or not _is_this_run(output_dir, metrics, overrides, num_supernodes):
        return None
    done = checkpoint_round(output_dir / "checkpoint")
    return done if done and len(metrics["rounds"]) >= done else None


def _is_this_run(output_dir: Path, metrics: dict, overrides: str, num_supernodes: int | None) -> bool:
    """The run recorded in `output_dir` has the config `overrides` compose to and, if given, that owner count."""
    if _comparable(metrics["config"]) != _wanted(overrides):
        return False
    return num_supernodes is None or _owners(output_dir, metrics["config"]) == num_supernodes


def _recorded(output_dir: Path) -> dict | None:
    """The metrics.json in `output_dir` (a config and a list of rounds); None if absent or unreadable."""
    try:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        return None
    return metrics if isinstance(metrics.get("rounds"), list) else None


def _complete(metrics: dict) -> bool:
    """Every round its config planned is recorded."""
    try:
        return len(metrics["rounds"]) == int(metrics["config"]["num_rounds"])
    except (KeyError, TypeError, ValueError):
        return False


def _finished(output_dir: Path) -> dict | None:
    """The metrics.json in `output_dir` if it records every round its config planned and the run is not marked
    FAILED (a killed run resumes, a failed one runs again); None otherwise."""
    metrics = _recorded(output_dir)
    return metrics if metrics is not None and _complete(metrics) and not (output_dir / "FAILED").exists() else None


def _wanted(overrides: str) -> dict:
    return _comparable(json.loads(json.dumps(config.to_dict(config.compose(overrides)))))  # as metrics.json holds it


# Keys conf/ gained after runs were recorded, each with the value that does what a record without it did: a record
# that lacks one is compared as if it held that value.
ADDED_KEYS = {("eval", "start"): True,                      # round 0 was always scored
              ("strategy", "user_dp", "sampling"): "fixed",  # Flower's fixed-size owner sampling, the only kind
              ("strategy", "user_dp", "population"): None}   # (used by poisson sampling only)


def _comparable(cfg: dict) -> dict:
    """A run's config as finished_run compares it. Records from before the sweep settings left conf/ hold a
    `sweep` key (the owner count: the sweep's own setting now, compared apart) and, with user-level DP off,
    `strategy.user_dp.owners_per_round` set to that owner count (now null unless user-level DP is on, and
    unused while it is off): neither is compared, nor `resume` (a resumed run is the run it continues). Keys
    added to conf/ since (ADDED_KEYS) take the value that reproduces what the record did."""
    cfg = json.loads(json.dumps({key: value for key, value in cfg.items() if key not in ("sweep", "resume")}))
    for path, value in ADDED_KEYS.items():
        parent = cfg
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.setdefault(path[-1], value)
    strategy = cfg.get("strategy")
    user_dp = strategy.get("user_dp") if isinstance(strategy, dict) else None
    if isinstance(user_dp, dict) and not user_dp.get("enabled"):
        user_dp = {key: value for key, value in user_dp.items() if key != "owners_per_round"}
        cfg["strategy"] = {**strategy, "user_dp": user_dp}
    return cfg


def config_difference(recorded: dict, wanted: dict, prefix: str = "") -> str | None:
    """The first dotted key where two configs (as _comparable gives them) differ, with both values; None if equal."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for key in sorted(set(recorded) | set(wanted)):
            if (found := config_difference(recorded.get(key, "<absent>"), wanted.get(key, "<absent>"),
                                           f"{prefix}{key}.")) is not None:
                return found
        return None
    return None if recorded == wanted else f"{prefix.rstrip('.')}: {recorded!r} recorded, {wanted!r} now"


def _owners(output_dir: Path, recorded: dict) -> int | None:
    """The simulated owners of the run in `output_dir`: sweep.json, written by the sweep once the run finished,
    or an older record's config key `sweep.num_supernodes`; None if neither says."""
    try:
        return int(json.loads((output_dir / "sweep.json").read_text())["num_supernodes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sweep = recorded.get("sweep")
    return sweep.get("num_supernodes") if isinstance(sweep, dict) else None


# Flower's per-ClientApp resources in a simulation, from the environment (Flower's default: 2 CPUs, no GPU, so a
# 2-core machine trains one owner at a time). ClientApps running at once = min(CPUs / num-cpus, GPUs / num-gpus):
# DPLORA_CLIENT_GPUS=0.25 puts four owners on each GPU.
CLIENT_RESOURCES = {"DPLORA_CLIENT_CPUS": "client-resources-num-cpus", "DPLORA_CLIENT_GPUS": "client-resources-num-gpus"}


def federation_config(num_supernodes: int, environ: dict[str, str] | None = None) -> str:
    """`flwr run --federation-config`: the simulated owners, and each ClientApp's CPUs and GPU share where
    DPLORA_CLIENT_CPUS (a whole number >= 1) or DPLORA_CLIENT_GPUS (a number >= 0) is set."""
    environ = os.environ if environ is None else environ
    parts = [f"num-supernodes={num_supernodes}"]
    for variable, key in CLIENT_RESOURCES.items():
        value = environ.get(variable, "").strip()
        if not value:
            continue
        try:
            number = int(value) if variable == "DPLORA_CLIENT_CPUS" else float(value)
        except ValueError:
            number = None
        if number is None or number < (1 if variable == "DPLORA_CLIENT_CPUS" else 0) or not math.isfinite(number):
            raise SimulationError(f"{variable}={value!r}: "
                                  + ("a whole number of CPUs, at least 1" if variable == "DPLORA_CLIENT_CPUS"
                                     else "a GPU share, at least 0 (0.25: four owners per GPU)"))
        parts.append(f"{key}={number}")
    return " ".join(parts)


def flwr_run(overrides: str, output_dir: Path, num_supernodes: int, env: dict[str, str],
             on_line: Callable[[str], None] = lambda line: None, timeout: float = 24 * 3600,
             app_dir: Path = ROOT) -> dict:
    """`flwr run .` one simulation; return its metrics.json, or raise SimulationError if a round is missing.
    `app_dir`: the Flower app to run (this project; tests run variants of its ClientApp from other folders)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.json"
    started = time.time()
    if "'" in overrides:
        raise SimulationError(f"overrides may not contain single quotes: {overrides!r}")
    cfg = config.compose(overrides)  # a config error stops here, with its key named, before Flower starts
    if cfg.strategy.min_clients > num_supernodes:  # Flower's sampling would wait for them forever
        raise config.ConfigError(f"strategy.min_clients={cfg.strategy.min_clients} is more than the "
                                 f"{num_supernodes} simulated data owners")
    command = ["flwr", "run", ".", "--stream", "--run-config", f"overrides='{overrides}' output-dir='{output_dir}'",
               "--federation-config", federation_config(num_supernodes)]
    log_path = output_dir / "flwr.log"
    deadline = time.time() + timeout
    with open(log_path, "w", buffering=1) as log:  # line by line: `tail -f flwr.log` follows a long run
        proc = subprocess.Popen(command, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            log.write(line)
            on_line(line.rstrip("\n"))
            if time.time() > deadline:
                proc.kill()
                break
        proc.wait()
    tail = log_path.read_text()[-3000:]
    if not metrics_path.is_file() or metrics_path.stat().st_mtime < started:  # (a resumed run's file is older)
        raise SimulationError(f"this run wrote no metrics.json in {output_dir}; its log ends with:\n{tail}")
    metrics = json.loads(metrics_path.read_text())
    if len(metrics["rounds"]) != metrics["config"]["num_rounds"]:
        raise SimulationError(f"only {len(metrics['rounds'])} of {metrics['config']['num_rounds']} rounds "
                              f"finished in {output_dir}; the run's log ends with:\n{tail}")
    return metrics
