"""What `pipeline submit` forwards to a cluster (README, CLI: "ships the project without `.venv`,
`data/`, `runs/`, MLflow stores and Parquet, plus the config files; forwards
`MLFLOW_TRACKING_URI` and where S3 is"): the job's environment, its working_dir and entrypoint.
No cluster needed; tests/e2e/test_cluster_jobs.py submits for real."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipeline import cluster
from pipeline.cluster import FORWARDED_ENV, JobSpec, job_env, parse_env, stage_working_dir
from pipeline.errors import ClusterError, PipelineError

# --- the environment -----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    """No forwarded variable set, whatever the session's fixtures did."""
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_forwards_where_mlflow_and_s3_are_but_no_credential(clean_env, tmp_path):
    values = {name: f"value-of-{name.lower()}" for name in FORWARDED_ENV}
    for name, value in values.items():
        clean_env.setenv(name, value)
    clean_env.setenv("HOME_SECRET", "not for the cluster")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "only with --forward-credentials")
    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", "only with --forward-credentials")
    assert job_env(project_dir=tmp_path) == values  # tmp_path: no git checkout, no commit
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION"} <= set(values)


def test_forwards_nothing_unset_or_empty(clean_env, tmp_path):
    clean_env.setenv("AWS_REGION", "")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert job_env(project_dir=tmp_path) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}


def test_env_pairs_are_added_and_win(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    extra = parse_env(["MLFLOW_TRACKING_URI=http://mlflow:5000", "EXTRA=a=b", "EMPTY="])
    assert extra == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "EXTRA": "a=b", "EMPTY": ""}
    assert job_env(extra, project_dir=tmp_path) == extra


@pytest.mark.parametrize("pair", ["NOVALUE", "1ABC=x", "A-B=x", "=x"])
def test_bad_env_pairs_are_user_errors(pair):
    with pytest.raises(ClusterError, match=f"--env {pair!r}") as info:
        parse_env([pair])
    assert isinstance(info.value, PipelineError)


# --- the working_dir -----------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path) -> Path:
    """A checkout-shaped project with everything that must stay behind."""
    root = tmp_path / "project"
    files = {
        "pipeline/__init__.py": "",
        "pipeline/cli.py": "# cli",
        "jobs/train.py": "# entry",
        "jobs/tune.py": "# entry",
        "jobs/configs/digits.yaml": "train: {}",
        "README.md": "readme",
        ".venv/bin/python": "binary",
        ".git/HEAD": "ref",
        "data/digits/manifest.json": "{}",
        "runs/x/checkpoint.pt": "ckpt",
        "mlruns/0/meta.yaml": "m",
        "mlartifacts/1/a": "a",
        "mlflow.db": "db",
        "ray_results/r": "r",
        "pipeline/__pycache__/cli.cpython-311.pyc": "pyc",
        "pipeline.egg-info/PKG-INFO": "pkg",
        "jobs/local/part-00000.parquet": "parquet",
        "jobs/local/mlflow.db": "db",
        ".pytest_cache/v": "v",
        "_submitted/old.yaml": "stale",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def shipped(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}


def test_the_working_dir_is_the_project_without_local_state(project, tmp_path):
    spec = JobSpec(
        "train", ["--set", "train.epochs=1"], {"--config": project / "jobs/configs/digits.yaml"}
    )
    dest = stage_working_dir(spec, tmp_path / "stage", project)
    assert shipped(dest) == {
        "pipeline/__init__.py",
        "pipeline/cli.py",
        "jobs/train.py",
        "jobs/tune.py",
        "jobs/configs/digits.yaml",
        "README.md",
    }
    # A config inside the project is used where it is.
    assert shlex.split(spec.entrypoint(project)) == [
        "python", "jobs/train.py", "--config", "jobs/configs/digits.yaml",
        "--set", "train.epochs=1",
    ]  # fmt: skip


def test_files_outside_the_project_or_excluded_ship_under_submitted(project, tmp_path):
    outside = tmp_path / "elsewhere" / "my config.yaml"
    outside.parent.mkdir()
    outside.write_text("train: {epochs: 2}")
    excluded = project / "data" / "space.yaml"
    excluded.write_text("space: {}")
    spec = JobSpec("tune", [], {"--config": outside, "--space": excluded})
    dest = stage_working_dir(spec, tmp_path / "stage", project)
    argv = shlex.split(spec.entrypoint(project))
    config_at, space_at = argv[argv.index("--config") + 1], argv[argv.index("--space") + 1]
    assert config_at == "_submitted/0-my config.yaml" and space_at == "_submitted/1-space.yaml"
    assert (dest / config_at).read_text() == "train: {epochs: 2}"
    assert (dest / space_at).read_text() == "space: {}"
    assert "_submitted/old.yaml" not in shipped(dest)  # a stale _submitted never ships
    assert not (dest / "data").exists()


def test_a_missing_config_or_job_script_is_a_user_error(project, tmp_path):
    with pytest.raises(ClusterError, match=r"nope\.yaml: file not found"):
        stage_working_dir(JobSpec("train", [], {"--config": tmp_path / "nope.yaml"}),
                          tmp_path / "a", project)  # fmt: skip
    with pytest.raises(ClusterError, match=r"jobs/nightly\.py: job script not found"):
        stage_working_dir(JobSpec("nightly"), tmp_path / "b", project)
    with pytest.raises(ClusterError, match="unknown job 'serve'"):
        JobSpec("serve").entrypoint(project)


def test_the_real_checkout_ships_its_package_and_jobs_but_no_secrets_or_state(tmp_path):
    """Staged from this repository as `pipeline submit` stages it."""
    spec = JobSpec("train", [], {"--config": cluster.PROJECT_DIR / "jobs/configs/digits.yaml"})
    files = shipped(stage_working_dir(spec, tmp_path / "stage"))
    assert {"pipeline/cluster.py", "jobs/train.py", "jobs/configs/digits.yaml"} <= files
    assert not [f for f in files if f.split("/")[0] in cluster.EXCLUDED_TOP]
    assert not [f for f in files if f.endswith((".parquet", ".pyc", "mlflow.db"))]
    assert not [f for f in files if "__pycache__" in f or ".egg-info" in f]
