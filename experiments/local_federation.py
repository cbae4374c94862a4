#!/usr/bin/env python3
"""A real Flower 1.41 deployment on loopback: TLS plus SuperNode authentication.

One ``flower-superlink`` and one ``flower-supernode`` per data file, as separate
processes, so that ``flwr run`` goes through the same path as a production
deployment (HTTPS, pre-registered node keys, subprocess isolation).

Usage (keys and certificates from ``scripts/make_certs.sh CERTS N``)::

    python scripts/local_federation.py start --certs CERTS --data a.jsonl b.jsonl \
        --privacy-budget 10 [--workdir DIR]
    FLWR_HOME=DIR/flwr_home flwr run . local-tls --stream --run-config "..."
    python scripts/local_federation.py join --certs CERTS --data c.jsonl --index 3 \
        --privacy-budget 10 [--workdir DIR]      # a late owner: sampled from the next round
    python scripts/local_federation.py stop --workdir DIR

Port layout (flwr 1.41 serves Control, Fleet and the ServerApp Runtime API over
HTTPS on ONE port; the old 9091/9092/9093 gRPC trio is gone):

    127.0.0.1:9093            SuperLink (Control + Fleet + Runtime API, TLS)
    127.0.0.1:9094, 9095 ...  SuperNode i's ClientApp Runtime API (loopback, plain)

Node ``i`` (1-based) uses ``CERTS/node<i>`` as its private key, registers
``CERTS/node<i>.pub`` with ``flwr supernode register`` and gets the node config
``data-path='FILE' privacy-ledger='WORKDIR/ledger-node<i>.json' privacy-budget=EPS``: an owner serving
its own data refuses every run without a budget (and non-private runs unless ``allow-non-private=true``).

Importable (``from experiments import local_federation``)::

    start_federation(certs, data_files, workdir, privacy_budget=EPS) -> dict
    join_supernode(certs, data_file, index, workdir, privacy_budget=EPS) -> int   # a late owner joins
    crash_supernode(workdir, index) -> int      # SIGKILL one owner (tests: an owner lost mid-run)
    stop_federation(workdir) -> list[int]      # safe to call twice

Standard library only. Every process gets its own session
(``start_new_session=True``) and the environment marker
``DPLORA_FEDERATION_WORKDIR=<workdir>``; ``stop`` kills only processes that carry
the marker for that workdir (the recorded ones and their descendants, such as the
SuperExec the SuperLink starts in a session of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
SUPERLINK_PORT = 9093
SUPERNODE_BASE_PORT = 9094
CONNECTION = "local-tls"
MARKER_ENV = "DPLORA_FEDERATION_WORKDIR"
PIDS_FILE = "pids.json"
DEFAULT_WORKDIR = "/tmp/dplora-federation"
APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app (pyproject.toml)

# What a SuperNode whose key was not registered prints before it exits (status 1):
#   ERROR : Exit Code: 305
#   Failed to initialize the connection to the SuperLink.
#   [code: 2004] Failed to activate SuperNode.
UNREGISTERED_NODE_LOG_LINE = "Failed to activate SuperNode"


# ----------------------------------------------------------------------------- helpers
def _bin(name: str) -> str:
    """An executable from this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found next to {sys.executable} nor on PATH")
    return found


def _child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[MARKER_ENV] = str(workdir)
    env["FLWR_HOME"] = str(workdir / "flwr_home")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no network: skip PyPI lookups
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of pid, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own child (start and stop in one Python process)
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass
    return _proc_state(pid) not in (None, "Z", "X")


def _has_marker(pid: int, workdir: Path) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV}={workdir}".encode() in environ.split(b"\0")


def _marked_pids(workdir: Path) -> list[int]:
    """Live processes started for this workdir (recorded ones and their descendants)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            pid = int(entry.name)
            if _has_marker(pid, workdir) and _alive(pid):
                pids.append(pid)
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    own_pgid = os.getpgid(0)
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
            if pgid == pid and pgid != own_pgid:
                os.killpg(pgid, sig)  # it leads its own group: the whole group
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _https_ok(url: str, cafile: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _flwr(args: list[str], workdir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("flwr"), *args], env=_child_env(workdir), cwd=workdir,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _flwr_json(args: list[str], workdir: Path) -> dict:
    proc = _flwr([*args, "--format", "json"], workdir)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = None
    if proc.returncode != 0 or not isinstance(out, dict) or not out.get("success"):
        raise RuntimeError(
            f"`flwr {' '.join(args)}` failed (exit {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return out


def write_connection_config(workdir: Path, ca_cert: Path, port: int = SUPERLINK_PORT) -> Path:
    """Write ``<workdir>/flwr_home/config.toml`` with the ``local-tls`` connection."""
    home = workdir / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{HOST}:{port}"\n'
        f"root-certificates = {json.dumps(str(ca_cert))}\n"
    )
    return config


def superlink_command(certs: str | os.PathLike, port: int = SUPERLINK_PORT) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode auth and subprocess isolation."""
    certs = Path(certs).resolve()
    return [
        _bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.crt"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--isolation", "subprocess",
        "--host", HOST,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]


def supernode_command(
    certs: str | os.PathLike,
    private_key: str | os.PathLike,
    port: int,
    node_config: str,
    superlink_port: int = SUPERLINK_PORT,
) -> list[str]:
    """``flower-supernode`` over TLS, authenticating with ``private_key``.

    (flower-supernode has no --disable-runtime-dependency-installation: it is off
    unless --allow-runtime-dependency-installation is given.)
    """
    return [
        _bin("flower-supernode"),
        "--superlink", f"{HOST}:{superlink_port}",
        "--root-certificates", str(Path(certs).resolve() / "ca.crt"),
        "--auth-supernode-private-key", str(Path(private_key).resolve()),
        "--isolation", "subprocess",
        "--host", HOST,
        "--port", str(port),
        "--node-config", node_config,
    ]


def _spawn(name: str, cmd: list[str], workdir: Path) -> subprocess.Popen:
    log = (workdir / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        log.close()


def _write_pids(workdir: Path, pids: dict[str, int]) -> None:
    tmp = workdir / (PIDS_FILE + ".tmp")
    tmp.write_text(json.dumps(pids, indent=2) + "\n")
    tmp.replace(workdir / PIDS_FILE)


def run_command(workdir: str | os.PathLike, run_config: str | None = None) -> str:
    """The shell command that submits this app to the running federation."""
    rc = run_config or ("overrides='model=tiny-llama num_rounds=2 train.sample_rate=0.25 train.batch_size=8' "
                        "output-dir='/tmp/dplora-out'")
    home = Path(workdir).resolve() / "flwr_home"
    # double quotes read better around the usual key='value' pairs; shlex otherwise
    quoted = f'"{rc}"' if not set(rc) & set('"$`\\!') else shlex.quote(rc)
    return (
        f"cd {shlex.quote(str(APP_DIR))} && FLWR_HOME={shlex.quote(str(home))} "
        f"flwr run . {CONNECTION} --stream --run-config {quoted}"
    )


# ----------------------------------------------------------------------------- start/stop
def start_federation(
    certs: str | os.PathLike,
    data_files: list[str | os.PathLike],
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    superlink_port: int = SUPERLINK_PORT,
    supernode_base_port: int = SUPERNODE_BASE_PORT,
    timeout: float = 120.0,
    privacy_budget: float,
) -> dict:
    """Start a SuperLink and one SuperNode per data file; return once all are online.

    Node i's node config names its data file and its privacy ledger (``<workdir>/ledger-node<i>.json``,
    kept across runs and restarts) and ``privacy-budget``: the owner's total epsilon over all runs.

    Returns a dict with: ``workdir``, ``flwr_home`` (set FLWR_HOME to it for ``flwr``),
    ``connection`` ("local-tls"), ``superlink_address``, ``pids`` ({name: pid},
    names "superlink", "supernode-1", ...), ``logs`` ({name: path}),
    ``node_ids`` ([int], in data-file order), ``run_command`` (str) and
    ``startup_seconds``. On failure everything started is stopped and RuntimeError
    is raised with the relevant log tail.
    """
    t0 = time.monotonic()
    certs = Path(certs).resolve()
    workdir = Path(workdir).resolve()
    data = [Path(f).resolve() for f in data_files]
    if not data:
        raise ValueError("need at least one data file")
    for f in data:
        if not f.is_file():
            raise FileNotFoundError(f"data file not found: {f}")
        if "'" in str(f) or "\n" in str(f):
            raise ValueError(f"data path must not contain a quote or newline: {f}")
    needed = ["ca.crt", "server.crt", "server.key"]
    needed += [f"node{i}{ext}" for i in range(1, len(data) + 1) for ext in ("", ".pub")]
    missing = [n for n in needed if not (certs / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing in {certs}: {', '.join(missing)} "
            f"(run scripts/make_certs.sh {certs} {len(data)})"
        )

    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / PIDS_FILE).exists():
        if _marked_pids(workdir):
            raise RuntimeError(f"a federation is already running in {workdir}; stop it first")
        (workdir / PIDS_FILE).unlink()
    ports = [superlink_port] + [supernode_base_port + i for i in range(len(data))]
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        raise RuntimeError(f"port(s) already in use on {HOST}: {busy}")

    write_connection_config(workdir, certs / "ca.crt", superlink_port)
    pids: dict[str, int] = {}
    logs: dict[str, str] = {}
    procs: dict[str, subprocess.Popen] = {}
    deadline = t0 + timeout

    def launch(name: str, cmd: list[str]) -> None:
        procs[name] = _spawn(name, cmd, workdir)
        pids[name] = procs[name].pid
        logs[name] = str(workdir / f"{name}.log")
        _write_pids(workdir, pids)  # record at once so that stop() always finds it

    def check_running() -> None:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}; "
                    f"{logs[name]}:\n{_tail(Path(logs[name]))}"
                )

    try:
        # 1. SuperLink; ready when /health answers over TLS verified against ca.crt
        launch("superlink", superlink_command(certs, superlink_port))
        health = f"https://{HOST}:{superlink_port}/health"
        while not _https_ok(health, certs / "ca.crt"):
            check_running()
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperLink not up after {timeout}s:\n{_tail(workdir / 'superlink.log')}")
            time.sleep(0.25)

        # 2. register every node's public key (SuperLink state is in memory: fresh each start)
        node_ids = []
        for i in range(1, len(data) + 1):
            out = _flwr_json(
                ["supernode", "register", str(certs / f"node{i}.pub"), CONNECTION,
                 "--name", f"supernode-{i}"], workdir,
            )
            node_ids.append(int(out["node-id"]))

        # 3. SuperNodes
        for i, f in enumerate(data, start=1):
            launch(f"supernode-{i}", supernode_command(
                certs, certs / f"node{i}", supernode_base_port + i - 1, _node_config(f, workdir, i, privacy_budget),
                superlink_port,
            ))

        # 4. wait until every registered node is online
        while True:
            check_running()
            nodes = _flwr_json(["supernode", "list", CONNECTION], workdir)["nodes"]
            online = {int(nd["node-id"]) for nd in nodes if nd.get("status") == "online"}
            if set(node_ids) <= online:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SuperNodes not online after {timeout}s (online: {sorted(online)}, "
                    f"registered: {node_ids}):\n{_tail(workdir / 'superlink.log')}"
                )
            time.sleep(0.5)
    except BaseException:
        stop_federation(workdir)
        raise

    return {
        "workdir": str(workdir),
        "flwr_home": str(workdir / "flwr_home"),
        "connection": CONNECTION,
        "superlink_address": f"{HOST}:{superlink_port}",
        "pids": dict(pids),
        "logs": logs,
        "node_ids": node_ids,
        "run_command": run_command(workdir),
        "startup_seconds": round(time.monotonic() - t0, 2),
    }


def _node_config(data_file: Path, workdir: Path, index: int, privacy_budget: float) -> str:
    return (f"data-path='{data_file}' privacy-ledger='{workdir / f'ledger-node{index}.json'}' "
            f"privacy-budget={float(privacy_budget)}")


def join_supernode(
    certs: str | os.PathLike,
    data_file: str | os.PathLike,
    index: int,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    privacy_budget: float,
    superlink_port: int = SUPERLINK_PORT,
    supernode_base_port: int = SUPERNODE_BASE_PORT,
    timeout: float = 120.0,
) -> int:
    """A new owner joins the running federation: register ``CERTS/node<index>.pub`` with the SuperLink, start
    SuperNode ``index`` on its data file (node config as start_federation's), wait until it is online, and
    return its node id. Flower samples it from the next round the strategy configures."""
    certs, workdir, data = Path(certs).resolve(), Path(workdir).resolve(), Path(data_file).resolve()
    if not (workdir / PIDS_FILE).is_file() or not _marked_pids(workdir):
        raise RuntimeError(f"no federation is running in {workdir}; start one first")
    if not data.is_file():
        raise FileNotFoundError(f"data file not found: {data}")
    if "'" in str(data) or "\n" in str(data):
        raise ValueError(f"data path must not contain a quote or newline: {data}")
    for name in (f"node{index}", f"node{index}.pub"):
        if not (certs / name).is_file():
            raise FileNotFoundError(f"missing in {certs}: {name} (run scripts/make_certs.sh {certs} {index})")
    pids = json.loads((workdir / PIDS_FILE).read_text())
    name, port = f"supernode-{index}", supernode_base_port + index - 1
    if name in pids and _alive(pids[name]):
        raise RuntimeError(f"{name} is already running (pid {pids[name]})")
    if not _port_free(port):
        raise RuntimeError(f"port {port} already in use on {HOST}")
    node_id = int(_flwr_json(["supernode", "register", str(certs / f"node{index}.pub"), CONNECTION,
                              "--name", name], workdir)["node-id"])
    proc = _spawn(name, supernode_command(certs, certs / f"node{index}", port,
                                          _node_config(data, workdir, index, privacy_budget), superlink_port),
                  workdir)
    _write_pids(workdir, {**pids, name: proc.pid})
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{_tail(workdir / f'{name}.log')}")
        nodes = _flwr_json(["supernode", "list", CONNECTION], workdir)["nodes"]
        if any(int(nd["node-id"]) == node_id and nd.get("status") == "online" for nd in nodes):
            return node_id
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not online after {timeout}s:\n{_tail(workdir / f'{name}.log')}")
        time.sleep(0.5)


def crash_supernode(workdir: str | os.PathLike, index: int) -> int:
    """SIGKILL SuperNode ``index`` and everything in its session (its SuperExec and ClientApp), as a machine
    that loses power would stop: no goodbye to the SuperLink. Returns its pid."""
    workdir = Path(workdir).resolve()
    pid = int(json.loads((workdir / PIDS_FILE).read_text())[f"supernode-{index}"])
    if not (_alive(pid) and _has_marker(pid, workdir)):
        raise RuntimeError(f"supernode-{index} (pid {pid}) is not running")
    os.killpg(pid, signal.SIGKILL)  # _spawn started it in a session (and process group) of its own
    end = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    return pid


def stop_federation(workdir: str | os.PathLike = DEFAULT_WORKDIR, timeout: float = 15.0) -> list[int]:
    """Stop everything started by start_federation(workdir); safe to call twice.

    SIGTERM to every recorded process group, then to any other live process that
    carries this workdir's marker (e.g. the SuperLink's SuperExec, which runs in a
    session of its own, and ServerApp/ClientApp processes); SIGKILL whatever is left
    after ``timeout`` seconds. Removes pids.json. Returns the pids that were signalled.
    """
    workdir = Path(workdir).resolve()
    pids_file = workdir / PIDS_FILE
    recorded: list[int] = []
    if pids_file.exists():
        try:
            recorded = [int(p) for p in json.loads(pids_file.read_text()).values()]
        except (ValueError, OSError, AttributeError):
            recorded = []
    # only ever touch processes carrying our marker (guards against PID reuse)
    targets = [p for p in recorded if _alive(p) and _has_marker(p, workdir)]
    signalled = set(targets)
    _signal_all(targets, signal.SIGTERM)  # the SuperLink and SuperNodes shut down cleanly
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stragglers = _marked_pids(workdir)
        if not stragglers:
            break
        new = [p for p in stragglers if p not in signalled]
        _signal_all(new, signal.SIGTERM)
        signalled.update(new)
        time.sleep(0.2)
    else:
        stragglers = _marked_pids(workdir)
        _signal_all(stragglers, signal.SIGKILL)
        signalled.update(stragglers)
        end = time.monotonic() + 5
        while _marked_pids(workdir) and time.monotonic() < end:
            time.sleep(0.1)
    left = _marked_pids(workdir)
    pids_file.unlink(missing_ok=True)
    if left:
        raise RuntimeError(f"processes still alive after SIGKILL: {left}")
    return sorted(signalled)


def try_supernode(
    certs: str | os.PathLike,
    private_key: str | os.PathLike,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    name: str = "rogue-supernode",
    port: int = 9099,
    superlink_port: int = SUPERLINK_PORT,
    timeout: float = 60.0,
) -> tuple[int | None, str]:
    """Start one more SuperNode with ``private_key`` and wait for it to exit.

    For checking that a key that was never registered is refused: such a node
    exits with status 1 within a few seconds and its log contains
    UNREGISTERED_NODE_LOG_LINE. Returns (exit status, or None if it was still
    running after ``timeout`` and got killed; the log text). Its process group
    (it spawns a flower-superexec) is always killed afterwards.

    (Output goes to ``<workdir>/<name>.log``, not to a pipe: with a pipe, the
    SuperExec child keeps it open, and waits on the pipe hang until the exited
    SuperNode is reaped.)
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(certs, private_key, port, "partition-id=0 num-partitions=1",
                            superlink_port)
    proc = _spawn(name, cmd, workdir)
    try:
        status: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the node and its SuperExec
    except ProcessLookupError:
        pass
    proc.wait()
    return status, (workdir / f"{name}.log").read_text(errors="replace")


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start a SuperLink and one SuperNode per data file")
    p_start.add_argument("--certs", required=True, help="output dir of scripts/make_certs.sh")
    p_start.add_argument("--data", required=True, nargs="+", help="one data file per SuperNode")
    p_start.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default: {DEFAULT_WORKDIR}")
    p_start.add_argument("--superlink-port", type=int, default=SUPERLINK_PORT)
    p_start.add_argument("--supernode-base-port", type=int, default=SUPERNODE_BASE_PORT)
    p_start.add_argument("--timeout", type=float, default=120.0)
    p_start.add_argument("--privacy-budget", type=float, required=True,
                         help="each owner's total epsilon across runs, enforced by its ledger (an owner "
                              "serving its own data refuses every run without one)")
    p_join = sub.add_parser("join", help="one more owner joins the federation running in --workdir")
    p_join.add_argument("--certs", required=True, help="output dir of scripts/make_certs.sh")
    p_join.add_argument("--data", required=True, help="the new owner's data file")
    p_join.add_argument("--index", required=True, type=int, help="its key: CERTS/node<INDEX> (and .pub)")
    p_join.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p_join.add_argument("--superlink-port", type=int, default=SUPERLINK_PORT)
    p_join.add_argument("--supernode-base-port", type=int, default=SUPERNODE_BASE_PORT)
    p_join.add_argument("--privacy-budget", type=float, required=True, help="as for start")
    p_stop = sub.add_parser("stop", help="stop the federation started in --workdir")
    p_stop.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)

    if args.cmd == "start":
        try:
            info = start_federation(
                args.certs, args.data, args.workdir, superlink_port=args.superlink_port,
                supernode_base_port=args.supernode_base_port, timeout=args.timeout,
                privacy_budget=args.privacy_budget,
            )
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"SuperLink https://{info['superlink_address']} up, "
              f"{len(info['node_ids'])} SuperNode(s) online in {info['startup_seconds']}s")
        for name, pid in info["pids"].items():
            print(f"  {name:<12} pid {pid:<8} log {info['logs'][name]}")
        print(f"  node ids: {info['node_ids']}")
        print("\nRun the app against it:\n  " + info["run_command"])
        print(f"\nStop it:\n  {sys.executable} {APP_DIR / 'scripts' / 'local_federation.py'} stop "
              f"--workdir {shlex.quote(info['workdir'])}")
        return 0

    if args.cmd == "join":
        if args.index < 1:
            parser.error("--index must be at least 1")
        try:
            node_id = join_supernode(args.certs, args.data, args.index, args.workdir,
                                     privacy_budget=args.privacy_budget, superlink_port=args.superlink_port,
                                     supernode_base_port=args.supernode_base_port)
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"supernode-{args.index} online as node {node_id}: sampled from the next round")
        return 0

    pids = stop_federation(args.workdir)
    print(f"stopped {len(pids)} process(es)" if pids else "nothing was running")
    return 0

