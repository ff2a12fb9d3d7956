"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a test run may leave in the checkout: caches of the tools themselves.
_CACHES = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "pipeline.egg-info"}


def untrained_accuracy(cfg, split: str = "test") -> float:
    """Test accuracy of the configured network as training initialises it (seeded, no steps):
    the bar a trained model must clear by a margin, instead of an absolute number."""
    import torch

    from pipeline.data.shards import read_manifest
    from pipeline.data.transform import iter_split
    from pipeline.train.loop import model_for

    manifest = read_manifest(cfg.data.uri)
    torch.manual_seed(cfg.train.seed)
    model = model_for(cfg, manifest).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in iter_split(cfg.data.uri, manifest, split, resize=cfg.data.resize):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@functools.cache
def _unlistened_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections: an unreachable server, without sending
    traffic anywhere else. The port stays bound (never listening) for the life of the test
    process, so no server started meanwhile (the other test process's Ray, a gRPC server) can
    take it; a port bound and released once was taken that way in CI."""
    return _unlistened_socket().getsockname()[1]


@dataclass
class Outcome:
    returncode: int
    stderr: str


def run_pipeline(args: list[str], cwd: Path, *, in_process: bool = True) -> Outcome:
    """`pipeline ARGS` in `cwd`: in-process through typer's CliRunner with RAY_ADDRESS at a closed
    port on 127.0.0.1 (a command that got as far as Ray fails loudly instead of starting it), or
    the installed command in a process of its own (~5-15 s of start-up on 2 cores)."""
    if not in_process:
        done = subprocess.run(
            [str(BIN / "pipeline"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
        )
        return Outcome(done.returncode, done.stderr)
    import pytest
    from typer.testing import CliRunner

    from pipeline.cli import app

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")  # no Ray may start
        result = CliRunner().invoke(app, args)
    return Outcome(result.exit_code, result.stderr)


def repo_files() -> set[str]:
    """Every file in the checkout outside .git and tool caches (tracked or not, ignored or not)."""
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _CACHES]
        found.update(os.path.relpath(os.path.join(root, f), REPO) for f in files)
    return found


def bn_batches_tracked(state: dict) -> Iterator[int]:
    """`num_batches_tracked` of every batch-norm layer in a (possibly nested) state dict: the
    number of training steps the weights have been through."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from bn_batches_tracked(value)
        elif str(key).endswith("num_batches_tracked"):
            yield int(value)


def logged_epochs(db: Path, key: str = "val_acc") -> list[tuple[str, int]]:
    """(run id, step) of every `key` value in the SQLite store, as the database holds them."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(
                "SELECT run_uuid, step FROM metrics WHERE key = ? ORDER BY step", (key,)
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or a write in progress
        return []


# ---------------------------------------------------------------------------------------------
# Ray nodes started with `ray start`, on 127.0.0.1, and stopped without touching anyone else's


def digits_on_s3_command(digits_uri: str, bucket: str, db: Path, *overrides: str) -> list[str]:
    """`pipeline train` on the main job's recipe as a user runs it: the digits dataset,
    checkpoints under s3://BUCKET/runs, a SQLite MLflow store at `db`, no registration, 4
    epochs at batch 128, then `overrides`."""
    command = [str(BIN / "pipeline"), "train", "--config", str(REPO / "jobs/configs/digits.yaml")]
    for override in (
        f"data.uri={digits_uri}", "data.prepare=", f"run.storage_path=s3://{bucket}/runs",
        f"tracking.tracking_uri=sqlite:///{db}", "registry.model_name=", "train.epochs=4",
        "train.batch_size=128", *overrides,
    ):  # fmt: skip
        command += ["--set", override]
    return command


def proc_table() -> dict[tuple[int, int], tuple[int, int]]:
    """(pid, start time) -> (parent pid, session id) for every process we can see (Linux /proc);
    the start time tells a process from a later one that got the same pid."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name), int(fields[19])] = (int(fields[1]), int(fields[3]))
    return table


def started_by(root: int) -> set[tuple[int, int]]:
    """`root`'s session plus every descendant (job drivers run in sessions of their own)."""
    table = proc_table()
    found = {key for key, (_, sid) in table.items() if sid == root}
    grew = True
    while grew:
        pids = {pid for pid, _ in found}
        children = {key for key, (ppid, _) in table.items() if ppid in pids} - found
        found |= children
        grew = bool(children)
    return found


def kill_started_by(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM `proc` (started with start_new_session=True), wait up to `grace_s`, then SIGKILL
    whatever of its session and descendants is left; grace_s=0: SIGKILL at once, as when the
    machine goes away. Only those processes: `ray stop` would kill every Ray on the machine."""
    ours = started_by(proc.pid)
    if grace_s and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    still_there = set(proc_table())
    for pid, _ in (ours | started_by(proc.pid)) & still_there:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(10)


def cluster_env() -> dict[str, str]:
    """A clean environment for a Ray node, as on a machine of its own: no address, tracking or S3
    settings leak in from the test session, and its `python` is this virtualenv's (jobs run
    `python`)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")
        and not k.startswith("AWS_")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # Ray replaces 127.0.0.1 by the machine's outward address (it expects other nodes); off
    # here, so the whole cluster stays on the loopback interface. A driver connecting to the
    # cluster needs it too: ray.init(address="127.0.0.1:<port>") would otherwise connect to the
    # outward address.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


# `ray start --address=...` refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the
# setting that keeps Ray on 127.0.0.1 (ray/scripts/scripts.py; ray/_private/services.py: with
# clusters on, every local address is replaced by the machine's outward one, found by routing to
# 8.8.8.8). This runs the real `ray start` with clusters on and that address pinned to loopback;
# the node's own processes inherit the variable, 0, and stay on loopback by themselves.
_RAY_START_ON_LOOPBACK = """\
import sys
import ray._private.ray_constants as ray_constants
import ray._private.services as services
ray_constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.exit(main())
"""


def ray_start_command(
    temp_dir: Path,
    num_cpus: int,
    *,
    address: str | None = None,
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    resources: str | None = None,
) -> list[str]:
    """`ray start --block` for a node on 127.0.0.1 with every port its own:
    the head (address None; GCS on `gcs_port`, dashboard on `dashboard_port`) or a node joining
    the cluster whose GCS is at `address` (host:port)."""
    low = random.randrange(20000, 29000, 100)
    ports = [
        "--node-ip-address", "127.0.0.1",
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--min-worker-port", str(low), "--max-worker-port", str(low + 299),
    ]  # fmt: skip
    common = ["--block", "--disable-usage-stats", *ports, "--num-cpus", str(num_cpus)]
    common += ["--temp-dir", str(temp_dir)]
    if resources:
        common += ["--resources", resources]
    if address is None:
        head = [
            "--head", "--port", str(gcs_port or free_port()),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port or free_port()),
            "--ray-client-server-port", str(free_port()),
        ]  # fmt: skip
        return [str(BIN / "ray"), "start", *head, *common]
    return [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", "--address", address, *common]
