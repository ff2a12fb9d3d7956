"""`pipeline train` refuses bad input with one clear message before any Ray worker starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [PIPELINE, "train", "--config", str(REPO / "jobs" / "configs" / "digits.yaml")]
    base = [
        f"data.uri={tmp_path / 'digits'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    for o in [*base, *overrides]:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.name=resnet19"], "resnet19"),
        (["train.lr=-0.1"], "train.lr: Input should be greater than 0"),
        (["train.batch_size=1"], "train.batch_size (1) is smaller than scaling.num_workers (2)"),
        (["data.prepare=", "data.uri=/nonexistent/dataset"], "no manifest.json"),
        (
            [f"tracking.tracking_uri=http://127.0.0.1:{closed_port()}", "tracking.timeout_s=2"],
            "127.0.0.1",
        ),
        (["model.weights=models:/no-such-model/1"], "model.weights: models:/no-such-model/1"),
    ],
    ids=[
        "unknown-model",
        "negative-lr",
        "batch-below-workers",
        "no-manifest",
        "mlflow-down",
        "unknown-weights",
    ],
)
def test_bad_input_fails_before_workers(tmp_path, overrides, expected):
    result = train(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and expected in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr
    assert "training cifar_resnet20" not in result.stderr, "no worker may have started"
    assert not (tmp_path / "runs").exists()


def test_unknown_model_lists_choices(tmp_path):
    result = train(tmp_path, "model.name=resnet19")
    assert "cifar_resnet20" in result.stderr and "dy_resnet18" in result.stderr
