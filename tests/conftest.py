"""Fixtures that start real servers on 127.0.0.1 (free ports) once per session and stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_moto(log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    wait_for_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class S3Server:
    endpoint: str

    def new_bucket(self) -> str:
        import boto3

        name = f"test-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's standalone S3 server as a subprocess, reached over HTTP by boto3 and pyarrow."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = start_moto(log)
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.delenv("AWS_PROFILE", raising=False)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        yield S3Server(endpoint)
    finally:
        mp.undo()
        stop(proc)


@pytest.fixture(scope="session")
def s3_server_with_auth(tmp_path_factory) -> Iterator[str]:
    """A moto server that checks credentials (none it knows), for the bad-credentials case."""
    log = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    proc, endpoint = start_moto(log, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh bucket and prefix on the test server."""
    return f"s3://{s3_server.new_bucket()}/datasets/digits"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session (its daemons cost a share of 2 cores).

    Started after the S3 test server so that workers inherit its endpoint and credentials.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.train.trainer import init_ray

    init_ray(load_config(None, ["scaling.num_cpus=3"]))
    yield
    ray.shutdown()


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>
    root: Path  # holds mlflow.db and artifacts/
    log: Path


def wait_for_health(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{uri}/health did not answer within {timeout}s; see {log}")


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, artifacts_destination: str, *extra: str
) -> Iterator[tuple[str, Path]]:
    """`pipeline server mlflow` as a user starts it (SQLite backend under `root`, a free port on
    127.0.0.1); yields (uri, log) once /health answers, and stops it afterwards."""
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(BIN / "pipeline"), "server", "mlflow",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_health(uri, proc, log)
        yield uri, log
    finally:
        # uvicorn drains keep-alive connections for a long while on SIGTERM; 3 s is plenty for
        # SQLite to finish a write.
        stop(proc, grace_s=3)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real tracking server: SQLite backend and proxied artifacts in a tmp dir."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root, str(root / "artifacts")) as (uri, log):
        yield MlflowServer(uri, root, log)
