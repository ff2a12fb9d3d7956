"""Credentials never reach output or MLflow: passwords in URIs are masked in messages, params and
the config artifact."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.storage import mask_credentials, strip_credentials
from tests.support import closed_port


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("postgresql+psycopg2://u:p@ss@db/x", "postgresql+psycopg2://u:***@db/x"),  # '@' in it
        ("http://alice:pw@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("tracking_uri: http://a:b@h:1\nendpoint_url: http://k:s@h:2\n", None),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("http://user@host/x", "http://user@host/x"),  # no password: nothing to mask
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_mask_credentials(text, masked):
    out = mask_credentials(text)
    if masked is not None:
        assert out == masked
    for secret in ("s3cret", "p@ss", ":pw@", ":b@", ":s@"):
        assert secret not in out


def test_strip_credentials_drops_user_and_password():
    assert strip_credentials("http://alice:pw@127.0.0.1:5000/x") == "http://127.0.0.1:5000/x"


def test_an_error_naming_a_credentialed_uri_shows_no_password():
    uri = f"http://alice:hunter2@127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(app, ["best", "--tracking-uri", uri])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "hunter2" not in result.output
    assert "alice:***@127.0.0.1" in result.output


def test_params_are_logged_masked(tmp_path, monkeypatch):
    import mlflow

    from pipeline import tracking

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with mlflow.start_run() as run:
            tracking.log_params_flat(
                {"tracking": {"tracking_uri": "postgresql://u:topsecret@db/mlflow"}}
            )
            tracking.log_run_artifacts([], None, [], {}, "uri: http://k:topsecret@h:1\n")
        params = mlflow.get_run(run.info.run_id).data.params
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    finally:
        mlflow.set_tracking_uri(None)
    assert params["tracking.tracking_uri"] == "postgresql://u:***@db/mlflow"
    assert "topsecret" not in text and "k:***@h:1" in text
