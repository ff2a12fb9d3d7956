"""README promises that had no test, checked against the session's model trained by
`pipeline train` (conftest's `trained_model`) on the session's real tracking server.

* Models: "Loading never unpickles code: weights load with `torch.load(weights_only=True)` and
  pulled files are checked against their recorded sha256." A weights file and a pickled model
  that write a marker file when unpickled: the marker never appears through the pipeline's
  loaders, `pipeline.serving.load`, `pipeline evaluate` or `pipeline pull`.
* CLI `pull`: `pipeline_pull.json` records the files (sha256 each) inside DEST; a record that
  points outside its folder is refused.
* CLI `evaluate`: recomputes the run's test accuracy from the registered model.
* Concepts: running the same `run.name` again after it finished does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline import serving
from pipeline.cli import app
from pipeline.errors import IntegrityError, PipelineError
from pipeline.tags import PULL_META_FILE, WEIGHTS_FILE
from tests.conftest import mlflow_uris_kept

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this opens (creates) `marker`: stands in for any code an attacker runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_no_marker(marker: Path) -> None:
    assert not marker.exists(), "a pickle was unpickled: code from the artifact store ran"


@pytest.fixture(scope="module")
def env(mlflow_server):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with mlflow_uris_kept():
            yield mlflow_server


def _model_dir_on_server(server, client: MlflowClient, name: str, version: str) -> Path:
    """Where the tracking server (proxied artifacts in a tmp dir) keeps a version's files."""
    source = client.get_model_version(name, version).source  # models:/m-<id>
    model_id = source.rstrip("/").rsplit("/", 1)[-1]
    assert model_id.startswith("m-"), source
    found = {
        p / "artifacts"
        for p in (server.root / "artifacts").rglob(model_id)
        if (p / "artifacts" / "MLmodel").is_file()
    }
    assert len(found) == 1, found
    return found.pop()


@pytest.fixture(scope="module")
def evil(env, trained_model, tmp_path_factory):
    """Three registered versions of a fresh name, copies of the trained model's package, then
    tampered with on the server's disk: "pickled-model" and "transfer" gain a pickled MLflow
    pytorch model (data/model.pth) carrying the payload, "weights" has its weights.pt replaced
    by one. Recorded hashes are left alone: no loader may get as far as unpickling either way."""
    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.model_package import log_pipeline_model, rebuild
    from pipeline.registry import register_run_model
    from pipeline.tracking import start_or_resume_run

    root = tmp_path_factory.mktemp("evil")
    marker = root / "pwned"
    name = f"evil-{trained_model.name}"
    local = mlflow.artifacts.download_artifacts(trained_model.uri, dst_path=str(root / "src"))
    model, _ = rebuild(local)
    cfg = load_config(
        None,
        [*trained_model.overrides, "data.resize=16", f"registry.model_name={name}",
         "tracking.experiment=evil"],
    )  # fmt: skip
    manifest = read_manifest(trained_model.data_uri)
    client = MlflowClient(env.uri)
    versions = {}
    for kind in ("pickled-model", "weights", "transfer"):
        run_id = start_or_resume_run(env.uri, "evil", run_name=kind)
        log_pipeline_model(model, cfg, manifest)
        mlflow.end_run()
        versions[kind] = str(register_run_model(cfg, run_id).version)
    # A pickled MLflow pytorch model next to the intact weights.pt: mlflow.pytorch.load_model
    # prefers data/model.pth and unpickles it with the module data/pickle_module_info.txt names.
    for kind, target in (("pickled-model", marker), ("transfer", root / "pwned-by-transfer")):
        data = _model_dir_on_server(env, client, name, versions[kind]) / "data"
        torch.save(Payload(target), data / "model.pth")
        (data / "pickle_module_info.txt").write_text("pickle")
    # weights.pt itself carrying the payload.
    weights = _model_dir_on_server(env, client, name, versions["weights"])
    weight_files = list(weights.rglob(WEIGHTS_FILE))
    assert weight_files, f"no {WEIGHTS_FILE} in {weights}"
    for p in weight_files:
        torch.save({"conv1.weight": Payload(marker)}, p)
    assert_no_marker(marker)
    # The payload is real: unpickling it (as mlflow.pytorch.load_model would) creates the marker.
    probe = root / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()
    return {
        "name": name,
        "marker": marker,
        "transfer_marker": root / "pwned-by-transfer",
        **versions,
    }


def test_a_pickled_model_in_the_store_is_never_unpickled(evil, trained_model, tmp_path):
    uri = f"models:/{evil['name']}/{evil['pickled-model']}"
    predictor = serving.load(uri)  # weights.pt is intact: it loads, weights-only
    assert predictor.classes == [str(i) for i in range(10)]
    result = CliRunner().invoke(
        app, ["evaluate", "--model", uri, "--data", trained_model.data_uri, "--json"]
    )
    assert result.exit_code == 0, result.output
    for fmt in ("state_dict", "torchscript", "mlflow"):
        pulled = CliRunner().invoke(
            app, ["pull", uri, "--dest", str(tmp_path / fmt), "--format", fmt]
        )
        assert pulled.exit_code == 0, pulled.output
        serving.load(str(tmp_path / fmt))
    assert_no_marker(evil["marker"])


def test_a_weights_file_carrying_code_is_refused_without_running_it(evil, trained_model, tmp_path):
    from pipeline.model_package import rebuild
    from pipeline.models.transfer import load_weights

    uri = f"models:/{evil['name']}/{evil['weights']}"
    with pytest.raises(Exception):  # noqa: B017  (which error is the next test's concern)
        serving.load(uri)
    CliRunner().invoke(app, ["evaluate", "--model", uri, "--data", trained_model.data_uri])
    CliRunner().invoke(app, ["pull", uri, "--dest", str(tmp_path / "p"), "--format", "state_dict"])
    # model.weights: a state dict file, or an MLflow URI, as training's transfer loads them.
    evil_file = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload(evil["marker"])}, evil_file)
    local = mlflow.artifacts.download_artifacts(trained_model.uri, dst_path=str(tmp_path / "m"))
    net, _ = rebuild(local)  # the network the weights would load into
    with pytest.raises(Exception):  # noqa: B017
        load_weights(net, str(evil_file))
    assert_no_marker(evil["marker"])


def test_model_weights_from_an_mlflow_uri_never_unpickle(evil, trained_model, tmp_path):
    """`model.weights: models:/NAME/N` (fine-tuning, nightly) goes through transfer.load_weights."""
    from pipeline.model_package import rebuild
    from pipeline.models.transfer import load_weights

    local = mlflow.artifacts.download_artifacts(trained_model.uri, dst_path=str(tmp_path / "m"))
    net, _ = rebuild(local)
    uri = f"models:/{evil['name']}/{evil['transfer']}"
    with contextlib.suppress(Exception):  # a refusal is fine; running the payload is not
        load_weights(net, uri, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    assert_no_marker(evil["transfer_marker"])


def test_refusing_a_weights_file_with_code_is_a_one_line_user_error(evil, trained_model):
    uri = f"models:/{evil['name']}/{evil['weights']}"
    with pytest.raises(PipelineError):
        serving.load(uri)
    result = CliRunner().invoke(app, ["evaluate", "--model", uri, "--data", trained_model.data_uri])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and WEIGHTS_FILE in errors[0], result.stderr
    assert_no_marker(evil["marker"])


# --- pull's record stays inside its folder ---------------------------------------------------


@pytest.fixture(scope="module")
def pulled(env, trained_model, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("pulled") / "state_dict"
    serving.pull(trained_model.uri, dest, "state_dict")
    return dest


def _copy_with_record(pulled: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(pulled, dest)
    record = json.loads((dest / PULL_META_FILE).read_text())
    edit(record, dest)
    (dest / PULL_META_FILE).write_text(json.dumps(record))
    return dest


def test_a_pulled_folder_loads_and_verifies(pulled):
    record = serving.verify_pulled(pulled)
    assert record["files"] and all(not Path(rel).is_absolute() for rel in record["files"])
    serving.load(str(pulled))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_file_records_pointing_outside_the_folder_are_refused(pulled, tmp_path, where):
    """A record naming a file outside DEST, with its correct sha256, is still refused: a
    tampered pipeline_pull.json must not make the loader read (and hash) arbitrary files."""
    outside = tmp_path / "outside.pt"
    outside.write_bytes((pulled / WEIGHTS_FILE).read_bytes())
    sha = serving.sha256_file(outside)

    def edit(record, dest):
        if where == "parent":
            rel = os.path.relpath(outside, dest)
        elif where == "absolute":
            rel = str(outside)
        else:
            (dest / "link.pt").symlink_to(outside)
            rel = "link.pt"
        record["files"][rel] = sha

    dest = _copy_with_record(pulled, tmp_path / "dest", edit)
    with pytest.raises(IntegrityError, match="points outside"):
        serving.verify_pulled(dest)
    with pytest.raises(IntegrityError, match="points outside"):
        serving.load(str(dest))


# --- evaluate, and a finished run name ------------------------------------------------------


def test_cli_evaluate_recomputes_the_logged_test_accuracy(env, trained_model):
    result = CliRunner().invoke(
        app, ["evaluate", "--model", trained_model.uri, "--data", trained_model.data_uri, "--json"]
    )
    assert result.exit_code == 0, result.output
    logged = MlflowClient(env.uri).get_run(trained_model.run_id).data.metrics["test_acc"]
    assert json.loads(result.stdout)["acc"] == pytest.approx(logged, abs=1e-9)


def _train_again(trained_model, tmp_path, monkeypatch, registry_name: str):
    """`pipeline train` with the session model's run.name and settings, registering (if at all)
    under `registry_name`, so that the session's model stays as it was."""
    from tests.support import REPO

    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(REPO / "jobs" / "configs" / "digits.yaml")]
    for value in [*trained_model.overrides, f"registry.model_name={registry_name}"]:
        args += ["--set", value]
    return CliRunner().invoke(app, args)


def test_training_a_finished_run_name_again_does_nothing(env, trained_model, tmp_path, monkeypatch):
    client = MlflowClient(env.uri)
    runs_before = client.search_runs([client.get_experiment_by_name("trained-model").experiment_id])
    result = _train_again(trained_model, tmp_path, monkeypatch, f"again-{trained_model.name}")
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output and "nothing to do" in result.output
    runs_after = client.search_runs([runs_before[0].info.experiment_id])
    assert [r.info.run_id for r in runs_after] == [r.info.run_id for r in runs_before]
    assert len(client.search_model_versions(f"name = '{trained_model.name}'")) == 1


def test_training_a_finished_run_name_again_registers_nothing(
    env, trained_model, tmp_path, monkeypatch
):
    name = f"again2-{trained_model.name}"
    result = _train_again(trained_model, tmp_path, monkeypatch, name)
    assert result.exit_code == 0, result.output
    assert MlflowClient(env.uri).search_model_versions(f"name = '{name}'") == []
