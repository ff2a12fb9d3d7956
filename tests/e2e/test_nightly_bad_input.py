"""`pipeline nightly` refuses bad input with one clear message, and touches nothing.

One case runs the installed `pipeline` command in a process of its own; the others run it
in-process (typer's CliRunner) with RAY_ADDRESS at a closed port on 127.0.0.1, so that nothing
can get as far as starting Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Outcome, closed_port, run_pipeline

REPO = Path(__file__).resolve().parents[2]


def nightly(tmp_path: Path, *args: str, in_process: bool = True) -> Outcome:
    command = ["nightly", "--config", str(REPO / "jobs" / "configs" / "nightly.yaml")]
    base = [
        f"data.uri={tmp_path / 'digits'}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    for o in base:
        command += ["--set", o]
    return run_pipeline([*command, *args], tmp_path, in_process=in_process)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "registry.model_name="], "registry.model_name is not set"),
        (["--set", "tracking.log_model=false"], "tracking.log_model is false"),
        (["--set", "nightly.init=warm"], "nightly.init"),
        (["--set", "nightly.epochs=0"], "nightly.epochs"),
        (["--date", "tomorrow"], "--date 'tomorrow': expected YYYY-MM-DD"),
        (
            [
                "--set",
                f"tracking.tracking_uri=http://127.0.0.1:{closed_port()}",
                "--set",
                "tracking.timeout_s=2",
            ],
            "127.0.0.1",
        ),
        (["--set", "data.prepare=", "--set", "data.uri=/nonexistent/dataset"], "no manifest.json"),
    ],
    ids=[
        "no-model-name",
        "no-model-logged",
        "bad-init",
        "zero-epochs",
        "bad-date",
        "mlflow-down",
        "no-dataset",
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, args, expected):
    # The first case through the installed command, in a process of its own.
    result = nightly(tmp_path, *args, in_process="registry.model_name=" not in args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
