"""Ray job submission: run a `pipeline` command on a Ray cluster and follow it.

Talks only to the cluster dashboard's job API over HTTP (`ray.job_submission.JobSubmissionClient`);
it never calls `ray.init`, so submitting costs a second, not a Ray start-up. A job ships the
project's tracked files (git's list; outside a checkout the folder minus virtualenvs, data, runs,
MLflow stores and Parquet) as its runtime_env `working_dir`, never `.env*` files or keys, and runs
one of the `jobs/*.py` entrypoints there, which first checks the cluster's Python
(`jobs/environment.py`):

    pipeline submit train --config jobs/configs/digits.yaml --wait
        -> python jobs/train.py --config jobs/configs/digits.yaml   (on the cluster)

Config files outside the project are shipped too (under `_submitted/`). The cluster's address comes
from `--address`, else RAY_ADDRESS (the dashboard's http://HOST:8265), else http://127.0.0.1:8265.

Where the job finds MLflow and S3 is forwarded when set (FORWARDED_ENV; the tracking URI without
user and password), with the submitter's git commit and any `--env K=V`. They are stored in the
job's runtime_env, which the dashboard shows to anyone who can reach it, so credentials
(CREDENTIAL_ENV) are sent only with `--forward-credentials`: by default the job uses what the
cluster has (an instance role, a Kubernetes Secret).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import ClusterError
from pipeline.ray_compat import token_auth_headers
from pipeline.tags import GIT_COMMIT_ENV, SUBMITTED_COMMAND_TAG

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0  # an unreachable head fails within this (plus one retry-free request)
VERSION_TIMEOUT_S = 10.0  # a head that accepts connections must answer the version check in this
READ_TIMEOUT_S = 60.0  # a working_dir upload is acknowledged well within this
POLL_MIN_S, POLL_MAX_S = 0.5, 2.0  # status/log polling interval: starts fast, backs off to 2 s

# Where the job finds MLflow and S3: forwarded from here by default.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
# Credentials: the cluster's own role or Secret is the default (a job's runtime env is shown by
# the dashboard to anyone who can reach it); forwarded only with `--forward-credentials`.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Never shipped, tracked or not: secrets that sit in project folders.
SECRET_FILES = (".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*")
SECRET_EXCEPTIONS = ("*.example",)
# Not shipped: anything large, local state, or build output. Top-level names, then any-level globs.
EXCLUDED_TOP = frozenset(
    {".venv", ".git", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", "ray_results", "out"}
    | {".whl", ".gl", ".pytest_cache", ".ruff_cache", ".mypy_cache", "_submitted"}
)
EXCLUDED_ANYWHERE = ("__pycache__", "*.egg-info", "*.parquet", "*.pyc", "mlflow.db")
JOB_SCRIPTS = {
    "train": "jobs/train.py",
    "tune": "jobs/tune.py",
    "nightly": "jobs/nightly.py",
    "promote": "jobs/promote.py",
    "predict": "jobs/predict.py",
}
SHIPPED_DIR = "_submitted"  # where files from outside the project land in the working_dir
PROJECT_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# What to run


def resolve_address(address: str | None = None) -> str:
    """--address, else RAY_ADDRESS, else the local default; always the dashboard's http(s) URL."""
    chosen = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    source = "--address" if address else ("RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "")
    if not chosen.startswith(("http://", "https://")):
        where = f"{source} {chosen!r}" if source else repr(chosen)
        raise ClusterError(
            f"{where}: jobs are submitted to the Ray dashboard's HTTP address, for example "
            "http://127.0.0.1:8265 (not the GCS address HOST:6379 or ray://); pass --address"
        )
    return chosen.rstrip("/")


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """["K=V", ...] -> {"K": "V"}; names must be valid environment variable names."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ClusterError(f"--env {pair!r}: expected NAME=VALUE, for example FOO=bar")
        env[key] = value
    return env


def job_env(
    extra: dict[str, str] | None = None,
    *,
    credentials: bool = False,
    project_dir: Path | None = None,
) -> dict[str, str]:
    """What the job's environment gets: where MLflow and S3 are (a tracking URI without its
    user and password), the local git commit, credentials only when asked, then --env pairs,
    which win."""
    from pipeline.storage import strip_credentials

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if credentials:
        env.update({k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)})
    elif "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = strip_credentials(env["MLFLOW_TRACKING_URI"])
    commit = git_commit(project_dir or PROJECT_DIR)
    if commit:
        env[GIT_COMMIT_ENV] = commit
    return {**env, **(extra or {})}


def held_back_credentials() -> list[str]:
    """Credential variables set here that a job does not get without --forward-credentials."""
    from pipeline.storage import strip_credentials

    names = [k for k in CREDENTIAL_ENV if os.environ.get(k)]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and strip_credentials(uri) != uri:
        names.append("the user and password in MLFLOW_TRACKING_URI")
    return names


def git_commit(project_dir: Path) -> str | None:
    """HEAD of the project's git checkout, with `-dirty` when tracked files changed; None when
    the project is not a checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(project_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


@dataclass
class JobSpec:
    """A `pipeline` command as the cluster runs it: script, arguments and the files they name."""

    command: str  # train, tune, nightly, promote
    args: list[str] = field(default_factory=list)  # arguments after the script, files excluded
    files: dict[str, Path] = field(default_factory=dict)  # option -> local file, e.g. --config

    def shipped_paths(self, project_dir: Path = PROJECT_DIR) -> dict[Path, str]:
        """Local file -> its path inside the working_dir (as is when the project ships it)."""
        placed: dict[Path, str] = {}
        for i, path in enumerate(self.files.values()):
            local = path.resolve()
            rel = _relative_to(local, project_dir)
            if rel is None or is_excluded(rel):
                rel = f"{SHIPPED_DIR}/{i}-{local.name}"
            placed[local] = rel
        return placed

    def entrypoint(self, project_dir: Path = PROJECT_DIR) -> str:
        script = JOB_SCRIPTS.get(self.command)
        if script is None:
            raise ClusterError(f"unknown job {self.command!r}; available: {', '.join(JOB_SCRIPTS)}")
        placed = self.shipped_paths(project_dir)
        argv = ["python", script]
        for option, path in self.files.items():
            argv += [option, placed[path.resolve()]]
        return shlex.join([*argv, *self.args])


def remote_caveats(cfg, env: dict[str, str]) -> list[str]:
    """Settings that mean something else on the cluster: relative paths resolve inside the job's
    working_dir there, which Ray deletes eventually, so what is written there is lost."""
    notes = []
    uri = cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        notes.append(
            f"tracking: {uri or 'sqlite:///mlflow.db (the default)'} is a file in the job's "
            "working_dir on the cluster; set tracking.tracking_uri or MLFLOW_TRACKING_URI (or "
            "--env) to a tracking server to keep the run"
        )
    for name, path in (("data.uri", cfg.data.uri), ("run.storage_path", cfg.run.storage_path)):
        if "://" not in path and not Path(path).is_absolute():
            notes.append(f"{name}: {path!r} is relative to the job's working_dir on the cluster")
    return notes


def _relative_to(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def is_excluded(rel: str) -> bool:
    """Whether a path relative to the project root stays behind (EXCLUDED_TOP/ANYWHERE, and
    secrets wherever they are)."""
    parts = rel.split("/")
    if parts[0] in EXCLUDED_TOP:
        return True
    if any(fnmatch.fnmatch(p, pat) for p in parts for pat in EXCLUDED_ANYWHERE):
        return True
    return is_secret(parts[-1])


def is_secret(name: str) -> bool:
    if any(fnmatch.fnmatch(name, pat) for pat in SECRET_EXCEPTIONS):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in SECRET_FILES)


def tracked_files(project_dir: Path) -> list[str] | None:
    """The project's files known to git (relative paths), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(project_dir), "ls-files", "-z", "--cached"],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [f for f in out.decode().split("\0") if f]


def stage_working_dir(spec: JobSpec, dest: Path, project_dir: Path = PROJECT_DIR) -> Path:
    """Copy what the job needs into `dest`: the project minus exclusions, plus shipped files."""
    script = project_dir / JOB_SCRIPTS.get(spec.command, "")
    if not script.is_file():
        raise ClusterError(
            f"{script}: job script not found; submit from a checkout of the project "
            "(the package must be installed in editable mode: pip install -e .)"
        )

    tracked = tracked_files(project_dir)
    if tracked is not None:  # a checkout: what git knows, never untracked files (.env, keys)
        dest.mkdir(parents=True)
        for rel in tracked:
            source = project_dir / rel
            if is_excluded(rel) or not source.is_file():  # excluded, or deleted but not staged
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    else:  # an installed copy (a container image): the folder minus exclusions and secrets

        def ignore(directory: str, names: list[str]) -> set[str]:
            rel = Path(directory).resolve().relative_to(project_dir.resolve()).as_posix()
            prefix = "" if rel == "." else f"{rel}/"
            return {n for n in names if is_excluded(prefix + n)}

        shutil.copytree(project_dir, dest, ignore=ignore, symlinks=True)
    for local, rel in spec.shipped_paths(project_dir).items():
        if not local.is_file():
            raise ClusterError(f"{local}: file not found")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
    return dest


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


def _client_class():
    from ray.job_submission import JobSubmissionClient

    class BoundedClient(JobSubmissionClient):
        """Every request with a timeout: Ray's client sends none, so a silent head would hang
        `submit` and `--wait` forever. `_do_request` forwards keyword arguments to requests."""

        read_timeout_s = VERSION_TIMEOUT_S  # the version check in __init__; then READ_TIMEOUT_S

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, self.read_timeout_s))
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedClient


def _auth_headers() -> dict[str, str]:
    """The local Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), if any.

    `ray start --head` turns token auth on by itself when a token file exists, but Ray's job
    client only sends the token when RAY_AUTH_MODE=token is set, so `ray job list` gets a 401
    from a cluster started on the same machine (Ray 2.60). Send it whenever one is available,
    unless RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    return token_auth_headers()


def _unreachable(address: str, why: str) -> ClusterError:
    return ClusterError(
        f"cannot reach a Ray cluster's job API at {address} ({why}). Start one with "
        "`ray start --head --dashboard-host 127.0.0.1` (dashboard on port 8265), or point "
        "--address or RAY_ADDRESS at your cluster's dashboard, e.g. http://HEAD:8265"
    )


@contextmanager
def _requests_to(
    address: str, what: str = "", read_timeout_s: float = READ_TIMEOUT_S
) -> Iterator[None]:
    """Turn the transport and HTTP errors of Ray's client into one ClusterError each."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except requests.exceptions.ConnectTimeout:
        why = f"no connection within {CONNECT_TIMEOUT_S:g} s (the connect timeout)"
        raise _unreachable(address, why) from None
    except requests.exceptions.ReadTimeout:
        asked = f"the request for {what}" if what else "the request"
        why = (
            f"it accepted the connection but {asked} got no answer within {read_timeout_s:g} s "
            "(the read timeout); is this a Ray dashboard's job API?"
        )
        raise _unreachable(address, why) from None
    except (requests.exceptions.ConnectionError, ConnectionError) as exc:
        text = f"{exc} {exc.__context__}".lower()  # Ray re-raises requests' error as its context
        why = "connection refused" if "refused" in text else "connection failed"
        raise _unreachable(address, why) from None
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ClusterError(
            f"{address}: {first}. Put the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
            "(`ray get-auth-token` on the head node prints it)"
        ) from None
    except RuntimeError as exc:  # Ray's client: "Request failed with status code 404: ..."
        text = str(exc).strip()
        if "404" in text and what:
            raise ClusterError(f"{what} not found on {address}") from None
        raise ClusterError(f"{address}: {text}") from None


def connect(address: str | None = None):
    """A job client for the cluster, checked to answer (bounded by CONNECT_TIMEOUT_S)."""
    url = resolve_address(address)
    # Ray's client reads RAY_ADDRESS / RAY_API_SERVER_ADDRESS itself and prefers them to its
    # argument; the address chosen above (--address first) must win.
    saved = {
        k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ
    }
    try:
        with _requests_to(url, "its version (the job API's first answer)", VERSION_TIMEOUT_S):
            client = _client_class()(url, headers=_auth_headers())
        client.read_timeout_s = READ_TIMEOUT_S
        return client
    finally:
        os.environ.update(saved)


def submit(
    client,
    spec: JobSpec,
    env: dict[str, str] | None = None,
    project_dir: Path = PROJECT_DIR,
    pip: bool = False,
) -> str:
    """Ship the project and start the job; returns its submission id. `pip`: the job's runtime
    environment installs the pipeline's requirements (for a cluster whose Python lacks them)."""
    address = client.get_address()
    # Ray's client logs every packaging step at INFO; the CLI says what was submitted itself.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pipeline-submit-") as tmp:
        working_dir = stage_working_dir(spec, Path(tmp) / "project", project_dir)
        runtime_env: dict[str, Any] = {"working_dir": str(working_dir)}
        if env:
            runtime_env["env_vars"] = env
        if pip:
            from pipeline.requirements import pip_requirements

            runtime_env["pip"] = {"packages": pip_requirements(project_dir), "pip_check": False}
        with _requests_to(address):
            return client.submit_job(
                entrypoint=spec.entrypoint(project_dir),
                runtime_env=runtime_env,
                metadata={SUBMITTED_COMMAND_TAG: spec.command},
            )


@dataclass
class JobState:
    submission_id: str
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str
    entrypoint: str
    start_time: datetime | None
    end_time: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")

    @property
    def reason(self) -> str:
        """Ray's message without the copy of the log it appends to a failure."""
        return self.message.split(", last available logs", 1)[0].strip()


def _state(details) -> JobState:
    def at(ms: int | None) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000, UTC) if ms else None

    return JobState(
        submission_id=details.submission_id or details.job_id or "-",
        status=str(getattr(details.status, "value", details.status)),
        message=details.message or "",
        entrypoint=details.entrypoint or "",
        start_time=at(details.start_time),
        end_time=at(details.end_time),
    )


def job_state(client, job_id: str) -> JobState:
    with _requests_to(client.get_address(), f"job {job_id!r}"):
        return _state(client.get_job_info(job_id))


def list_jobs(client) -> list[JobState]:
    """Every job the cluster knows, newest first (drivers started by hand included)."""
    with _requests_to(client.get_address()):
        jobs = [_state(d) for d in client.list_jobs()]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(jobs, key=lambda j: j.start_time or oldest, reverse=True)


def job_logs(client, job_id: str) -> str:
    with _requests_to(client.get_address(), f"job {job_id!r}"):
        return client.get_job_logs(job_id)


def stop_job(client, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already finished."""
    with _requests_to(client.get_address(), f"job {job_id!r}"):
        return client.stop_job(job_id)


def follow(
    client,
    job_id: str,
    on_logs: Callable[[str], None] | None = None,
    poll_max_s: float = POLL_MAX_S,
) -> JobState:
    """Wait until the job finishes, passing its log to `on_logs` as it is written.

    The log streams through the job API's tail (a websocket) while the job's status is checked
    every few seconds, so a silent stream never outlives the job; whatever the stream missed is
    fetched once at the end. Where the tail is unavailable (a proxy without websockets), the
    whole log is polled instead."""
    if on_logs is not None:
        try:
            return _follow_tail(client, job_id, on_logs)
        except _TailUnavailable as exc:
            log.info("log stream unavailable (%s); polling the log instead", exc)
    return _follow_poll(client, job_id, on_logs, poll_max_s)


class _TailUnavailable(Exception):
    pass


TAIL_STATUS_S = 3.0  # how often the job's status is checked while its log streams
TAIL_GRACE_S = 5.0  # how long the stream may run on after the job has finished


def _follow_tail(client, job_id: str, on_logs: Callable[[str], None]) -> JobState:
    import asyncio

    printed: list[int] = [0]

    async def consume() -> None:
        async for chunk in client.tail_job_logs(job_id):
            on_logs(chunk)
            printed[0] += len(chunk)

    async def main() -> JobState:
        tail = asyncio.create_task(consume())
        while True:
            done, _ = await asyncio.wait({tail}, timeout=TAIL_STATUS_S)
            state = await asyncio.to_thread(job_state, client, job_id)
            if state.finished or done:
                break
        if not tail.done():
            await asyncio.wait({tail}, timeout=TAIL_GRACE_S)
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        error = None if tail.cancelled() else tail.exception()
        if error is not None:
            if printed[0] == 0:
                raise _TailUnavailable(str(error))
            log.info("log stream broke (%s); fetching the rest", error)
        while not state.finished:  # the stream ended first: wait for the job itself
            await asyncio.sleep(TAIL_STATUS_S)
            state = await asyncio.to_thread(job_state, client, job_id)
        return state

    state = asyncio.run(main())
    rest = job_logs(client, job_id)[printed[0] :]
    if rest:
        on_logs(rest)
    return state


def _follow_poll(
    client, job_id: str, on_logs: Callable[[str], None] | None, poll_max_s: float
) -> JobState:
    """Poll status and the whole log; pass on only what is new. The interval starts at
    POLL_MIN_S and doubles up to `poll_max_s`, back to the minimum whenever something arrived."""
    seen, interval = 0, POLL_MIN_S
    while True:
        state = job_state(client, job_id)
        grew = False
        if on_logs is not None:
            text = job_logs(client, job_id)
            seen = 0 if len(text) < seen else seen  # a rotated log starts over
            if len(text) > seen:
                on_logs(text[seen:])
                seen, grew = len(text), True
        if state.finished:
            return state
        interval = POLL_MIN_S if grew else min(interval * 2, poll_max_s)
        time.sleep(interval)
