"""Jobs on a real Ray cluster: `pipeline submit` and `pipeline jobs ...` run as a user runs them.

A module fixture starts `ray start --head` on 127.0.0.1 (free ports, its own short temp dir, so it
never meets the session's local Ray) and stops exactly the processes it started. Every job costs
20-40 s of start-up on 2 cores, so there are three: one that trains, one that fails on the cluster
and one that is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline import cluster
from tests.conftest import free_port
from tests.support import cluster_env, kill_started_by, ray_start_command

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PIPELINE = str(BIN / "pipeline")
DIGITS_YAML = REPO / "jobs" / "configs" / "digits.yaml"


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class RayCluster:
    address: str  # the dashboard, http://127.0.0.1:<port>
    temp_dir: Path
    log: Path


def _stop_cluster(proc: subprocess.Popen, address: str) -> None:
    """Stop unfinished jobs, ask the node to shut down, then kill whatever of ours is left:
    `ray stop --force` for this cluster only (`ray stop` kills every Ray on the machine)."""
    try:
        client = cluster.connect(address)
        for job in cluster.list_jobs(client):
            if not job.finished:
                cluster.stop_job(client, job.submission_id)
    except cluster.ClusterError:
        pass
    kill_started_by(proc)  # the node drains for up to 30 s; nothing here needs draining


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    # Short: Ray's socket paths live under it and Unix sockets allow ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    dashboard = free_port()
    cmd = ray_start_command(temp_dir, num_cpus=3, dashboard_port=dashboard)
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=cluster_env(),
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_api(address, proc, log)
        yield RayCluster(address, temp_dir, log)
    finally:
        _stop_cluster(proc, address)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_api(address: str, proc: subprocess.Popen, log: Path, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}: {log.read_text()}")
        try:
            cluster.list_jobs(cluster.connect(address))
            return
        except cluster.ClusterError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no job API at {address} after {timeout}s; see {log}") from None
            time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Running the CLI as a user does


def pipeline(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [PIPELINE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def digits_job(tmp_path: Path, *overrides: str) -> list[str]:
    """`--config` a copy of the main job's YAML outside the project (so it has to be shipped),
    with everything it writes in tmp_path and a short run."""
    config = tmp_path / "digits.yaml"
    shutil.copyfile(DIGITS_YAML, config)
    base = [
        "train.epochs=2",
        "scaling.num_workers=1",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"data.uri={tmp_path / 'digits'}",
    ]
    args = ["--config", str(config)]
    for o in [*base, *overrides]:
        args += ["--set", o]
    return args


def closed_address() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ---------------------------------------------------------------------------------------------
# Without a cluster: refused before anything is sent


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    address = closed_address()
    result = pipeline("submit", "train", *digits_job(tmp_path), "--address", address, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert address in message and "ray start --head --dashboard-host 127.0.0.1" in message
    assert "RAY_ADDRESS" in message and "Traceback" not in result.stderr


def test_invalid_config_is_refused_before_contacting_the_cluster(tmp_path):
    # The address is closed: had the command tried to submit, the error would name it.
    result = pipeline(
        "submit", "train", *digits_job(tmp_path, "train.lr=-1", "model.nam=x"),
        "--address", closed_address(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "train.lr: Input should be greater than 0" in result.stderr
    assert "model.nam: unknown field" in result.stderr
    assert "cannot reach" not in result.stderr


@pytest.mark.parametrize(
    ("command", "extra", "expected"),
    [
        ("tune", [], "pipeline submit tune needs --space FILE"),
        ("tune", ["--space", "nowhere.yaml"], "nowhere.yaml"),
        ("nightly", ["--space", "space.yaml"], "--space is for tune only"),
        ("train", ["--env", "NO SPACES=1"], "expected NAME=VALUE"),
        ("train", ["--name", "s1"], "--name is for tune only"),
        ("train", ["--force"], "--force and --date are for nightly only"),
        ("nightly", ["--date", "28/11/2026"], "expected YYYY-MM-DD"),
    ],
    ids=[
        "tune-without-space",
        "missing-space-file",
        "space-for-nightly",
        "bad-env",
        "name-for-train",
        "force-for-train",
        "bad-date",
    ],
)
def test_bad_submit_options_are_refused_here(tmp_path, command, extra, expected):
    result = pipeline(
        "submit", command, *digits_job(tmp_path), *extra, "--address", closed_address(),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split()) and "cannot reach" not in result.stderr


def test_nightly_and_tune_options_reach_the_entrypoint():
    nightly = cluster.JobSpec("nightly", ["--date", "2026-11-28", "--force"], {})
    assert nightly.entrypoint().endswith("jobs/nightly.py --date 2026-11-28 --force")
    tune = cluster.JobSpec("tune", ["--name", "s1"], {})
    assert tune.entrypoint().endswith("jobs/tune.py --name s1")


def test_working_dir_ships_code_and_config_but_no_local_state(tmp_path):
    config = tmp_path / "my job.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    spec = cluster.JobSpec("train", ["--set", "train.lr=0.05"], {"--config": config})
    staged = cluster.stage_working_dir(spec, tmp_path / "staged")
    assert (staged / "jobs" / "train.py").is_file()
    assert (staged / "pipeline" / "data" / "shards.py").is_file(), "only the top-level data/ stays"
    assert (staged / "_submitted" / "0-my job.yaml").read_text() == config.read_text()
    for name in (".venv", ".git", "data", "runs", "mlruns", "mlflow.db"):
        assert not (staged / name).exists(), name
    assert not list(staged.rglob("*.parquet")) and not list(staged.rglob("__pycache__"))
    assert spec.entrypoint() == (
        "python jobs/train.py --config '_submitted/0-my job.yaml' --set train.lr=0.05"
    )
    inside = cluster.JobSpec("train", [], {"--config": DIGITS_YAML})
    assert inside.entrypoint() == "python jobs/train.py --config jobs/configs/digits.yaml"


# ---------------------------------------------------------------------------------------------
# On the cluster


@pytest.mark.slow
def test_submitted_training_succeeds_and_is_tracked(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tags import COMPLETED_TAG, RUN_NAME_TAG

    name = f"cluster-{uuid.uuid4().hex[:8]}"
    job = digits_job(tmp_path, f"registry.model_name={name}", f"run.name={name}")
    result = pipeline(
        "submit", "train", *job, "--address", ray_cluster.address, "--wait", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in result.stderr
    assert "epoch   2/2" in result.stdout  # the driver's log, streamed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        f"tags.`{RUN_NAME_TAG}` = '{name}'",
    )
    assert len(runs) == 1 and runs[0].data.tags[COMPLETED_TAG] == "true"
    assert runs[0].data.metrics["test_acc"] > 0.3
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.run_id for v in versions] == [runs[0].info.run_id]

    listed = pipeline("jobs", "list", "--address", ray_cluster.address, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row
    as_json = pipeline("jobs", "list", "--json", "--address", ray_cluster.address, cwd=tmp_path)
    (listed_job,) = [j for j in json.loads(as_json.stdout) if j["submission_id"] == job_id]
    assert listed_job["entrypoint"].startswith("python jobs/train.py --config _submitted/")

    logs = pipeline("jobs", "logs", job_id, "--address", ray_cluster.address, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "epoch   1/2" in logs.stdout and "epoch   2/2" in logs.stdout


@pytest.mark.slow
def test_job_failing_on_the_cluster_exits_nonzero_with_its_status(ray_cluster, tmp_path):
    # Valid here, wrong there: no dataset at the path and nothing to prepare it.
    job = digits_job(tmp_path, "data.prepare=", f"data.uri={tmp_path / 'nowhere'}")
    result = pipeline(
        "submit", "train", *job, "--address", ray_cluster.address, "--wait", cwd=tmp_path
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert "FAILED" in result.stderr
    assert "no manifest.json" in result.stdout  # the job's own error, in its streamed log
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Never hang in silence: resources, stalls, stops


def _job_log(ray_cluster, job_id: str) -> str:
    return cluster.job_logs(cluster.connect(ray_cluster.address), job_id)


@pytest.mark.slow
def test_a_run_the_cluster_cannot_hold_is_refused_at_once(ray_cluster, tmp_path):
    # 3 workers x 1 CPU + 1 for Ray Data on a 3-CPU cluster: it would wait forever.
    job = digits_job(tmp_path, "scaling.num_workers=3")
    result = pipeline(
        "submit", "train", *job, "--address", ray_cluster.address, "--wait", cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "FAILED" in result.stderr, result.stderr
    assert "does not fit the Ray cluster: needs 4 CPUs: 3 worker(s) x 1 + 1 for data" in (
        result.stdout
    ), result.stdout[-3000:]
    assert "the cluster has 3" in result.stdout and "Traceback" not in result.stdout


@pytest.mark.slow
def test_a_stall_is_reported_and_fails_the_run_within_its_limit(ray_cluster, tmp_path):
    """The watchdog on a real cluster: no step for longer than run.stall_timeout_s (here the
    workers' own start-up, which takes far longer than 4 s on this machine) is reported with
    what Ray is waiting on, then the run is aborted and marked FAILED with that reason."""
    from mlflow.tracking import MlflowClient

    from pipeline.tags import FAILURE_REASON_TAG

    name = f"stall-{uuid.uuid4().hex[:6]}"
    job = digits_job(tmp_path, f"run.name={name}", "run.stall_warn_s=2", "run.stall_timeout_s=4")
    result = pipeline(
        "submit", "train", *job, "--address", ray_cluster.address, "--wait", cwd=tmp_path,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 1 and "FAILED" in result.stderr, result.stderr
    log = result.stdout
    assert "no progress from the workers for" in log and "waiting for: CPU" in log, log[-3000:]
    assert "run.stall_timeout_s=4" in log and "Traceback" not in log
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        f"tags.`pipeline.run_name` = '{name}'",
    )
    assert run.info.status == "FAILED"
    assert "no progress from the workers" in run.data.tags[FAILURE_REASON_TAG]


@pytest.mark.slow
def test_a_stopped_run_is_killed_cleanly(ray_cluster, tmp_path):
    """`pipeline jobs stop` mid-training: the job ends STOPPED (`logs --follow` exits 1 saying
    so), the MLflow run is marked KILLED, and an unknown job id is a user error."""
    from mlflow.tracking import MlflowClient

    name = f"stop-{uuid.uuid4().hex[:6]}"
    job = digits_job(tmp_path, f"run.name={name}", "train.epochs=60")
    submitted = pipeline("submit", "train", *job, "--address", ray_cluster.address, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 240
    while "epoch   1/60" not in _job_log(ray_cluster, job_id):
        assert time.monotonic() < deadline, _job_log(ray_cluster, job_id)[-3000:]
        time.sleep(1)
    stopped = pipeline("jobs", "stop", job_id, "--address", ray_cluster.address, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    followed = pipeline(
        "jobs", "logs", job_id, "--follow", "--address", ray_cluster.address, cwd=tmp_path
    )
    assert followed.returncode == 1 and "STOPPED" in followed.stderr, followed.stderr
    assert "Traceback" not in followed.stdout, followed.stdout[-3000:]
    unknown = pipeline(
        "jobs", "stop", "raysubmit_nosuchjob", "--address", ray_cluster.address, cwd=tmp_path
    )
    assert unknown.returncode == 2 and "raysubmit_nosuchjob" in unknown.stderr, unknown.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 60
    while True:
        (run,) = client.search_runs(
            [client.get_experiment_by_name("digits").experiment_id],
            f"tags.`pipeline.run_name` = '{name}'",
        )
        if run.info.status != "RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert run.info.status == "KILLED"
