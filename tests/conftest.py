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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# The modules that take longest (seconds in the 2026-11-30 clean-clone run, two test processes
# on 2 cores, each test about twice its time alone), longest first. `make test` runs with `-n 2
# --dist loadfile --no-loadscope-reorder`: xdist hands whole modules (or groups of them, see
# TRAINED_MODEL_USERS) to its two processes in collection order, so these start first and the
# hundreds of short tests fill in at the end. (xdist's default order, most tests first, left
# these for last.)
SLOW_MODULES = (
    "integration/test_registry.py",  # ~400, and with the rest of TRAINED_MODEL_USERS ~850
    "integration/test_training.py",  # ~850
    "integration/test_tune.py",  # ~510
    "integration/test_nightly.py",  # ~410
    "e2e/test_cluster_jobs.py",  # ~330
    "integration/test_gpu_check.py",  # ~260
    "integration/test_serving.py",  # ~210
    "e2e/test_train_driver_killed.py",  # ~185
    "e2e/test_two_nodes.py",  # ~170
    "integration/test_registry_postgres.py",  # ~120
    "integration/test_photo_training.py",  # ~120
    "integration/test_predict.py",  # ~95
)
# The modules that use the session's `trained_model` (~65 s of training alone) go to one test
# process together, so that only one of the two trains it.
TRAINED_MODEL_USERS = (
    "integration/test_registry.py",
    "integration/test_serving.py",
    "integration/test_registry_postgres.py",
    "integration/test_predict.py",
    "integration/test_readme_promises.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Every unit test is `quick` (`make test-fast` runs `-m quick`); integration modules that
    need no Ray training mark themselves. The slowest modules go first (SLOW_MODULES)."""
    unit = REPO / "tests" / "unit"
    for item in items:
        if Path(item.fspath).is_relative_to(unit):
            item.add_marker(pytest.mark.quick)
    rank = {REPO / "tests" / module: i for i, module in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(Path(item.fspath), len(rank)))  # (stable)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with TRAINED_MODEL_USERS one unit of work. (xdist's own `loadgroup`
    marks do nothing under pytest 9: xdist 3.8 renames a test by `_nodeid`, which pytest 9 no
    longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    grouped = {f"tests/{module}" for module in TRAINED_MODEL_USERS}

    class ModulesAndGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "trained-model" if module in grouped else module

    return ModulesAndGroups(config, log)


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
# MLflow's URIs as the session found them (the variables; its globals start unset).
SESSION_MLFLOW_URIS = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}


def _mlflow_uri_globals():
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return tracking_utils, registry_utils


@contextlib.contextmanager
def mlflow_uris_kept() -> Iterator[None]:
    """Put MLflow's tracking and registry URIs back on exit: the process globals and the
    variables (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI) that child processes inherit.
    `set_tracking_uri` alone leaves a registry URI set on the way (registration, `models:/`
    downloads) pointing at a server a later test does not use."""
    saved_env = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    saved = (None, None)
    if "mlflow" in sys.modules:
        tracking_utils, registry_utils = _mlflow_uri_globals()
        saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            tracking_utils, registry_utils = _mlflow_uri_globals()
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        _set_variables(saved_env)


def _set_variables(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", autouse=True)
def mlflow_state_is_per_module() -> Iterator[None]:
    """Every module's fixtures start from MLflow as the session found it, and what they set is
    put back when the module ends. (Autouse, so it runs before the module's other fixtures.)
    Without this, module order mattered: under two test processes a module fixture that
    downloaded a `models:/` URI met a registry URI an earlier module had left set, and the
    model was "not found"."""
    _set_variables(SESSION_MLFLOW_URIS)
    if "mlflow" in sys.modules:
        tracking_utils, registry_utils = _mlflow_uri_globals()
        tracking_utils._tracking_uri = registry_utils._registry_uri = None
    with mlflow_uris_kept():
        yield


@pytest.fixture(autouse=True)
def mlflow_state_is_per_test() -> Iterator[None]:
    """MLflow's process-wide state does not outlive a test: its URIs are put back, and a run the
    test left active is ended and fails the test. Without this, one test's registry URI leaked
    into every later `pipeline` subprocess and in-process registration (the server answered
    500), and one leaked run broke every later `start_run`."""
    # The registry follows the tracking URI unless a test sets one: whatever an earlier fixture
    # (module- or session-scoped, set up before this test) left behind is dropped.
    registry = SESSION_MLFLOW_URIS["MLFLOW_REGISTRY_URI"]
    _set_variables({"MLFLOW_REGISTRY_URI": registry})
    if "mlflow" in sys.modules:
        _mlflow_uri_globals()[1]._registry_uri = None
    with mlflow_uris_kept():
        yield
        mlflow = sys.modules.get("mlflow")
        leaked = mlflow.active_run() if mlflow is not None else None
        while mlflow is not None and mlflow.active_run() is not None:
            with contextlib.suppress(Exception):  # its server may be gone already
                mlflow.end_run(status="KILLED")
            if mlflow.active_run() is not None:
                mlflow.tracking.fluent._active_run_stack.get().clear()
    if leaked is not None:
        pytest.fail(f"the test left MLflow run {leaked.info.run_id} active (end it)")


def free_port() -> int:
    """A port nothing listens on right now. Another process may take it before our server binds
    it: `start_on_free_port` checks who got it and retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """Our server did not get its port (another process took it first, or it exited)."""


def _listening_inodes(port: int) -> set[int]:
    """Socket inodes in LISTEN state on `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants (servers fork workers that hold the socket)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.add(child)
            todo.append(child)
    return tree


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listener_of(port: int, pids: set[int]) -> bool | None:
    """Whether the LISTEN socket on `port` belongs to one of `pids`: None when nothing listens,
    False when another process does."""
    listening = _listening_inodes(port)
    if not listening:
        return None
    return bool(listening & set().union(*(_socket_inodes(p) for p in pids)))


def wait_until_listening(proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    """Until `proc` (or a process it started) listens on `port`: readiness that checks it is our
    server answering, not whichever process took the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PortTaken(f"server exited with code {proc.returncode} before listening on {port}")
        owner = listener_of(port, _process_tree(proc.pid))
        if owner:
            return
        if owner is False:
            raise PortTaken(f"another process listens on 127.0.0.1:{port}")
        time.sleep(0.2)
    raise RuntimeError(f"our server does not listen on 127.0.0.1:{port} after {timeout}s")


def start_on_free_port(
    launch: Callable[[int], subprocess.Popen],
    ready: Callable[[subprocess.Popen, int], None],
    timeout: float = 180.0,
) -> tuple[subprocess.Popen, int]:
    """Start a server on a free port and wait until `ready`; when another process took the port
    in between (the suite shares its machine), stop ours and try another port."""
    for _ in range(3):
        port = free_port()
        proc = launch(port)
        try:
            wait_until_listening(proc, port, timeout)
            ready(proc, port)
            return proc, port
        except PortTaken:
            stop(proc)
        except BaseException:
            stop(proc)
            raise
    raise RuntimeError("three free ports were taken before our server could bind them")


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_moto(log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, **(extra_env or {})}

    def launch(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    proc, port = start_on_free_port(launch, lambda proc, port: None)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """What a test talking to this server sets (the `s3_server` fixture does, per test)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def new_bucket(self) -> str:
        import boto3

        name = f"test-{uuid.uuid4().hex[:10]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto(tmp_path_factory) -> Iterator[S3Server]:
    """moto's standalone S3 server as a subprocess, once per session; sets no environment."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = start_moto(log)
    try:
        yield S3Server(endpoint)
    finally:
        stop(proc)


@pytest.fixture
def s3_server(moto, monkeypatch) -> S3Server:
    """The moto server, with AWS_* pointing at it for this test only (restored afterwards, so
    no later test sees credentials or an endpoint it did not ask for)."""
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto


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
def ray_session(moto, tmp_path_factory):
    """One local Ray for the whole test session (its daemons cost a share of 2 cores).

    Ray's daemons start with the S3 test server's AWS_* set, so that workers reach it, and with
    TMPDIR in the session's tmp dir, so that what a worker killed on purpose leaves in its temp
    files (an asynchronous upload's local checkpoint) stays there too; Ray's own files stay in
    /tmp/ray (RAY_TMPDIR: its socket paths have a length limit). The variables are set only
    while Ray starts, and this process's environment is restored.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.train.ray_runtime import init_ray

    with pytest.MonkeyPatch.context() as mp:
        for name, value in moto.env().items():
            mp.setenv(name, value)
        mp.setenv("RAY_TMPDIR", os.environ.get("RAY_TMPDIR", "/tmp"))
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("ray-workers-tmp")))
        mp.delenv("AWS_PROFILE", raising=False)
        # The node's address: 127.0.0.1, not the machine's outward interface (Ray picks that on
        # Linux; on macOS/Windows it uses loopback). Tests talk to 127.0.0.1 only.
        mp.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        # A Ray that an earlier test started implicitly (Ray Data starts one on first use) lacks
        # the variables: this session's Ray is the one started here.
        if ray.is_initialized():
            ray.shutdown()
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
    `backend_store_uri` names another, a free port on 127.0.0.1); yields (uri, log) once our
    process listens there and /health answers, and stops it afterwards."""
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}

    def launch(port: int) -> subprocess.Popen:
        cmd = [
            str(BIN / "pipeline"), "server", "mlflow",
            "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", artifacts_destination,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra,
        ]  # fmt: skip
        return subprocess.Popen(
            cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def healthy(proc: subprocess.Popen, port: int) -> None:
        wait_for_health(f"http://127.0.0.1:{port}", proc, log)

    proc, port = start_on_free_port(launch, healthy)
    try:
        uri = f"http://127.0.0.1:{port}"
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
        for attempt in range(3):
            try:
                pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                   "-w", "-t", "60", "start")  # fmt: skip
            except RuntimeError:
                # Another process took the port between free_port() and the bind: next port.
                if attempt == 2 or "already in use" not in log.read_text():
                    raise
                server.port = free_port()
                options = re.sub(r"-p \d+", f"-p {server.port}", options)
                continue
            started = True
            break
        # Ready (pg_ctl -w) and ours: the postmaster that wrote our data dir's pid file listens.
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        if not listener_of(server.port, {postmaster}):
            raise RuntimeError(f"127.0.0.1:{server.port} is not our PostgreSQL (pid {postmaster})")
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


# --- one model trained the way a user trains it -----------------------------------------------


@dataclass
class TrainedModel:
    """A model trained once per session by `pipeline train` (in-process, on the session's Ray)
    and registered on the session's tracking server. Tests may promote it; tests that tamper
    with a model make their own."""

    name: str  # registered model name (unique to the session)
    version: str
    run_id: str
    tracking_uri: str
    data_uri: str
    overrides: list[str]  # the --set values it was trained with
    output: str  # what `pipeline train` printed

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@pytest.fixture(scope="session")
def trained_model(ray_session, mlflow_server, digits_uri, tmp_path_factory) -> TrainedModel:
    """`pipeline train --config jobs/configs/digits.yaml` for 3 epochs on one worker (the main
    recipe otherwise: 16x16 ResNet-20, augmentation), registered under a fresh name. Registry,
    serving, pull and README-promise tests use it instead of hand-built runs."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = tmp_path_factory.mktemp("trained")
    (root / "cwd").mkdir()
    name = f"trained-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"data.uri={digits_uri}",
        "data.prepare=",
        f"run.storage_path={root / 'runs'}",
        f"tracking.tracking_uri={mlflow_server.uri}",
        "tracking.experiment=trained-model",
        f"run.name={name}",
        "train.epochs=3",
        "scaling.num_workers=1",
        f"registry.model_name={name}",
    ]
    args = ["train", "--config", str(REPO / "jobs" / "configs" / "digits.yaml")]
    for value in overrides:
        args += ["--set", value]
    # A session fixture: what `pipeline train` sets in this process (MLflow's URIs, and the
    # variables child processes inherit) must not reach the tests that run after it.
    with pytest.MonkeyPatch.context() as mp, mlflow_uris_kept():
        mp.chdir(root / "cwd")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("RAY_ADDRESS", raising=False)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    (version,) = MlflowClient(mlflow_server.uri).search_model_versions(f"name = '{name}'")
    return TrainedModel(
        name=name,
        version=str(version.version),
        run_id=version.run_id,
        tracking_uri=mlflow_server.uri,
        data_uri=digits_uri,
        overrides=overrides,
        output=result.output,
    )
