"""What `pipeline submit` sends to a cluster: the project's tracked files (never untracked files
or secrets), the named config files, where MLflow and S3 are, the local commit, and credentials
only when asked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline import cluster
from pipeline.tags import GIT_COMMIT_ENV


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git checkout shaped like the project, with secrets and data lying around untracked."""
    root = tmp_path / "project"
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "pipeline").mkdir()
    (root / "jobs" / "train.py").write_text("print('train')\n")
    (root / "jobs" / "configs" / "digits.yaml").write_text("train: {epochs: 1}\n")
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "infra").mkdir()
    (root / "infra" / ".env.example").write_text("PASSWORD=change-me\n")
    (root / "tracked.key").write_text("a key someone committed\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "x")
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=leaked\n")
    (root / "infra" / ".env").write_text("MLFLOW_TRACKING_PASSWORD=leaked\n")
    (root / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (root / "notes.txt").write_text("untracked scratch\n")
    (root / "data").mkdir()
    (root / "data" / "part-00000.parquet").write_bytes(b"PAR1")
    return root


def shipped(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_only_tracked_files_and_named_configs_are_shipped(project, tmp_path):
    outside = tmp_path / "my-config.yaml"
    outside.write_text("train: {epochs: 2}\n")
    spec = cluster.JobSpec("train", [], {"--config": outside})
    staged = cluster.stage_working_dir(spec, tmp_path / "staged", project)
    assert shipped(staged) == {
        "jobs/train.py",
        "jobs/configs/digits.yaml",
        "pipeline/__init__.py",
        "infra/.env.example",
        f"{cluster.SHIPPED_DIR}/0-my-config.yaml",
    }  # no .env, no keys (tracked or not), no data, no untracked notes


def test_outside_a_checkout_secrets_still_stay_behind(project, tmp_path):
    (project / ".git").rename(tmp_path / "moved.git")
    staged = cluster.stage_working_dir(cluster.JobSpec("train"), tmp_path / "staged", project)
    files = shipped(staged)
    assert "notes.txt" in files  # no git: the folder minus exclusions
    assert not {".env", "infra/.env", "id_rsa", "tracked.key"} & files
    assert "data/part-00000.parquet" not in files


def test_credentials_are_forwarded_only_when_asked(project, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    env = cluster.job_env({"EXTRA": "1"}, project_dir=project)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"  # user and password stripped
    assert env["EXTRA"] == "1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} & set(env)
    assert "s3cr3t" not in repr(env) and "pw@" not in repr(env)
    held = cluster.held_back_credentials()
    assert "AWS_SECRET_ACCESS_KEY" in held and any("MLFLOW_TRACKING_URI" in h for h in held)

    sent = cluster.job_env(credentials=True, project_dir=project)
    assert sent["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert sent["MLFLOW_TRACKING_URI"] == "http://alice:pw@127.0.0.1:5000"
    assert sent["MLFLOW_TRACKING_PASSWORD"] == "pw"


def test_the_local_commit_travels_with_the_job(project, monkeypatch):
    head = git(project, "rev-parse", "HEAD")
    assert cluster.job_env(project_dir=project)[GIT_COMMIT_ENV] == head
    (project / "jobs" / "train.py").write_text("print('changed')\n")
    assert cluster.job_env(project_dir=project)[GIT_COMMIT_ENV] == f"{head}-dirty"
    monkeypatch.setenv(GIT_COMMIT_ENV, head)
    from pipeline.tracking import standard_tags

    assert standard_tags()["git_commit"] == head  # what a run on the cluster records


def test_a_job_on_a_python_without_the_dependencies_says_what_is_missing(tmp_path):
    """The cluster runs `python jobs/train.py` with its own interpreter: here, the bare Python
    this venv was made from, which has none of the project's dependencies."""
    import sys

    bare = getattr(sys, "_base_executable", None)
    if not bare or sys.prefix == sys.base_prefix:
        pytest.skip("not in a virtual environment: no bare interpreter to compare with")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [bare, "-I", str(root / "jobs" / "train.py"), "--config", "jobs/configs/digits.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this cluster's Python"), result.stderr
    assert "typer (missing)" in lines[0] and "pipeline submit --pip" in lines[0]
    assert "Traceback" not in result.stderr


def test_pip_requirements_pin_what_the_cluster_must_agree_on():
    from pipeline.requirements import pip_requirements

    lines = pip_requirements()
    assert "torch==2.14.1" in lines and "ray[default,train,tune]==2.60.0" in lines
    assert any(line.startswith("typer") for line in lines)
