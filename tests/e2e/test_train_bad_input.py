"""`pipeline train` refuses bad input with one clear message before any Ray worker starts.

One case runs the installed `pipeline` command as a user does; the others run the same command
in-process (typer's CliRunner) with RAY_ADDRESS at a closed port on 127.0.0.1, so that a command
that got as far as Ray fails loudly instead of starting it (each process start costs ~5 s of the
suite's 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Outcome, closed_port, run_pipeline

REPO = Path(__file__).resolve().parents[2]


def train(tmp_path: Path, *overrides: str, in_process: bool = True) -> Outcome:
    args = ["train", "--config", str(REPO / "jobs" / "configs" / "digits.yaml")]
    base = [
        f"data.uri={tmp_path / 'digits'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    for o in [*base, *overrides]:
        args += ["--set", o]
    return run_pipeline(args, tmp_path, in_process=in_process)


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
    """The installed command, in a process of its own."""
    result = train(tmp_path, "model.name=resnet19", in_process=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert "cifar_resnet20" in result.stderr and "dy_resnet18" in result.stderr
