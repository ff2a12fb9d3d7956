"""Fixtures that start real servers on 127.0.0.1 (free ports) once per session and stop them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
def digits_uri(tmp_path_factory) -> str:
    """The bundled digits as a local dataset, written once; tests that change data copy it."""
    from pipeline.data.sources import WriteOptions, prepare_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(WriteOptions(out=str(out)))
    return str(out)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session (its daemons cost a share of 2 cores).

    Started after the S3 test server so that workers inherit its endpoint and credentials.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.train.ray_runtime import init_ray

    # 4 CPU slots (not cores): two 1-worker Tune trials side by side plus one for Ray Data.
    init_ray(load_config(None, ["scaling.num_cpus=4"]))
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
    root: Path, artifacts_destination: str, *extra: str, backend_store_uri: str | None = None
) -> Iterator[tuple[str, Path]]:
    """`pipeline server mlflow` as a user starts it (SQLite backend under `root` unless
    `backend_store_uri` names another, a free port on 127.0.0.1); yields (uri, log) once /health
    answers, and stops it afterwards."""
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(BIN / "pipeline"), "server", "mlflow",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
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


# --- PostgreSQL (the tracking server's production backend) ---------------------------------------


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: from the PATH (symlinks resolved), else
    Debian's /usr/lib/postgresql/<version>/bin, newest first."""
    names = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("pg_ctl")
    dirs = [Path(found).resolve().parent] if found else []
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    dirs += sorted(debian, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)])[::-1]
    for d in dirs:
        if all(os.access(d / n, os.X_OK) for n in names):
            return d
    return None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    version: str  # e.g. "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"

    def uri(self, *, password: str | None = None, database: str | None = None) -> str:
        return (
            f"postgresql://{self.user}:{password or self.password}@{self.host}:{self.port}/"
            f"{database or self.database}"
        )

    def connect(self):
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
            connect_timeout=10,
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server in a tmp dir: 127.0.0.1 on a free port, password auth over TCP,
    its unix socket in the tmp dir, one empty database; stopped (`pg_ctl stop -m fast`) and
    removed at the end. PostgreSQL refuses to run as root, so as root it runs as the `postgres`
    user (else `nobody`). Skipped where PostgreSQL is not installed, except under CI, which must
    test it (.ci/run installs it)."""
    bindir = find_postgres_bindir()
    if bindir is None:
        why = (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on the PATH or in "
            "/usr/lib/postgresql/*/bin; install them with `apt-get install postgresql`"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{why} (CI is set: .ci/run installs PostgreSQL, so this must not skip)")
        pytest.skip(why)

    # Not pytest's tmp dirs: as root those are private to root, and postgres runs as another user.
    base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        os.chown(base, account.pw_uid, account.pw_gid)
        if shutil.which("runuser"):
            as_user = ["runuser", "-u", account.pw_name, "--"]
        else:
            as_user = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}"]
            as_user += ["--clear-groups", "--"]
    data, log = base / "data", base / "postgres.log"
    server = PostgresServer(
        host="127.0.0.1",
        port=free_port(),
        user="pipeline",
        password=uuid.uuid4().hex,
        database="mlflow",
        version=subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip(),
    )
    pwfile = base / "pwfile"
    pwfile.write_text(server.password + "\n")
    if as_user:
        shutil.chown(pwfile, account.pw_uid, account.pw_gid)

    def pg(*args: str, timeout: float = 120) -> None:
        cmd = [*as_user, *args]
        done = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{tail}")

    pg(
        str(bindir / "initdb"), "-D", str(data), "-U", server.user, f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-locale",
        "--no-sync",
    )  # fmt: skip
    options = (
        f"-c listen_addresses={server.host} -p {server.port} -k {base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB"
    )
    started = False
    try:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
           "-t", "60", "start")  # fmt: skip
        started = True
        import psycopg2

        admin = psycopg2.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            dbname="postgres",
            connect_timeout=10,
        )
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE {server.database}")
        finally:
            admin.close()
        yield server
    finally:
        if started:
            try:
                pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
