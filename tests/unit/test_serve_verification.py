"""`pipeline serve` runs only the predictor code this package writes: a changed code file, or a
pickled model, in the artifact store is refused before the scoring server starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ServingError
from pipeline.model_package import PREDICTOR_ENTRY
from pipeline.serving.pyfunc import verified_predictor


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def log_predictor(code: Path, tmp_path: Path) -> str:
    import mlflow

    art = tmp_path / "art"
    art.mkdir(exist_ok=True)
    (art / "weights.pt").write_bytes(b"not used here")
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(
            name="predictor", python_model=str(code), artifacts={"model": str(art)}
        )
    return f"runs:/{run.info.run_id}/predictor"


def test_the_packages_own_entry_file_is_served_from_a_checked_copy(store, tmp_path):
    uri = log_predictor(PREDICTOR_ENTRY, tmp_path)
    local = verified_predictor(uri, tmp_path / "copy", store)
    assert (local / PREDICTOR_ENTRY.name).read_bytes() == PREDICTOR_ENTRY.read_bytes()
    assert local.is_relative_to(tmp_path / "copy")


def test_a_changed_code_file_is_refused(store, tmp_path):
    uri = log_predictor(PREDICTOR_ENTRY, tmp_path)
    (stored,) = tmp_path.glob(f"mlruns/**/{PREDICTOR_ENTRY.name}")  # in the artifact store
    with stored.open("a") as f:
        f.write("\nopen('marker', 'w').write('ran')\n")
    with pytest.raises(ServingError, match="is not the one this pipeline version writes"):
        verified_predictor(uri, tmp_path / "copy", store)
    assert not (tmp_path / "marker").exists()


def test_a_pickled_python_model_is_refused(store, tmp_path):
    import mlflow

    class Anything(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="predictor", python_model=Anything(), pip_requirements=[])
    with pytest.raises(ServingError, match="not the pipeline's models-from-code predictor"):
        verified_predictor(f"runs:/{run.info.run_id}/predictor", tmp_path / "copy", store)


def test_serve_off_loopback_needs_insecure():
    result = CliRunner().invoke(app, ["serve", "models:/m/1", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "no authentication" in result.output
