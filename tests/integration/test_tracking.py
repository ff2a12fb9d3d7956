"""pipeline.tracking against a real SQLite-backed MLflow store in a tmp dir."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig
from pipeline.errors import TrackingUnavailable
from pipeline.tracking import (
    check_tracking_server,
    log_dataset_input,
    log_params_flat,
    log_run_artifacts,
    log_summary_metrics,
    logged_epochs,
    per_class_accuracy_csv,
    standard_tags,
    start_or_resume_run,
)
from tests.conftest import mlflow_uris_kept
from tests.support import closed_port

pytestmark = pytest.mark.quick

HISTORY = [
    {"epoch": 0, "train_loss": 2.0, "train_acc": 0.3, "val_loss": 1.8, "val_acc": 0.4},
    {"epoch": 1, "train_loss": 1.2, "train_acc": 0.6, "val_loss": 1.1, "val_acc": 0.7},
    {"epoch": 2, "train_loss": 0.9, "train_acc": 0.7, "val_loss": 1.2, "val_acc": 0.7},
]
for row, top5 in zip(HISTORY, (0.8, 0.95, 0.97), strict=True):
    row["val_top5"] = top5


class Store:
    """One SQLite tracking store per module: MLflow's schema migration costs seconds."""

    def __init__(self, root: Path) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = root / "artifacts"
        self._count = 0

    def new_run(self, **kw) -> str:
        """A run in a fresh experiment whose artifacts live under the tmp dir."""
        self._count += 1
        name = f"exp-{self._count}"
        return start_or_resume_run(
            self.uri, name, artifact_location=(self.artifacts / name).as_uri(), **kw
        )

    def resume(self, run_id: str) -> str:
        experiment = MlflowClient(self.uri).get_experiment(
            MlflowClient(self.uri).get_run(run_id).info.experiment_id
        )
        return start_or_resume_run(self.uri, experiment.name, run_id=run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Store]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from tests
        with mlflow_uris_kept():
            yield Store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(autouse=True)
def _no_run_left_open() -> Iterator[None]:
    yield
    mlflow.end_run()


def _crash() -> None:
    """What a dying worker leaves behind: the run stays in the store, nothing is ended cleanly."""
    mlflow.end_run(status="FAILED")


# --- params and tags -----------------------------------------------------------------------------


def test_params_are_the_flattened_config(store):
    config = PipelineConfig().to_dict()
    config["sweep"] = {f"k{i:03d}": i for i in range(150)}  # more than one 100-param batch
    run_id = store.new_run(run_name="flat", tags={"team": "vision"})
    logged = log_params_flat(config)
    params = MlflowClient().get_run(run_id).data.params
    assert params == logged
    assert params["train.lr"] == "0.2"
    assert params["model.weights"] == "None"
    assert params["data.augment.hflip"] == "False"
    assert params["sweep.k149"] == "149" and len(params) > 200
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["team"] == "vision" and run.info.run_name == "flat"


def test_params_on_resume_are_idempotent_and_never_changed(store):
    config = PipelineConfig().to_dict()
    run_id = store.new_run()
    log_params_flat(config)
    _crash()
    assert store.resume(run_id) == run_id
    assert log_params_flat(config) == {}  # nothing new, and no MLflow error
    config["train"]["lr"] = 0.05
    config["extra"] = {"note": "added later"}
    with pytest.warns(UserWarning, match=r"train\.lr"):
        assert log_params_flat(config) == {"extra.note": "added later"}
    params = MlflowClient().get_run(run_id).data.params
    assert params["train.lr"] == "0.2" and params["extra.note"] == "added later"


def test_long_param_values_are_truncated_to_mlflow_limit(store):
    store.new_run()
    logged = log_params_flat({"data": {"uri": "x" * 7000}})
    assert len(logged["data.uri"]) == 6000


def test_standard_tags_name_the_code_and_versions():
    tags = standard_tags()
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    assert tags["torch_version"] == torch.__version__
    assert tags["ray_version"] == "2.60.0"
    assert tags["python_version"].count(".") == 2 and tags["hostname"]


# --- metrics -----------------------------------------------------------------------------------


def test_logged_epochs_survive_a_crash_so_a_resumed_run_skips_them(store):
    """What rank 0's tracker reads on resume: the epochs a crashed attempt already logged."""
    run_id = store.new_run()
    mlflow.log_metrics({"train_loss": 2.0, "val_acc": 0.4}, step=0)
    mlflow.log_metrics({"train_loss": 1.5, "val_acc": 0.5}, step=1)
    _crash()
    store.resume(run_id)
    assert logged_epochs(run_id, "val_acc") == {0, 1}
    assert logged_epochs(run_id, "lr") == set()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"


def test_summary_metrics_make_runs_sortable_by_best(store):
    good = store.new_run()
    summary = log_summary_metrics(HISTORY)
    mlflow.end_run()
    assert summary["best_val_acc"] == 0.7 and summary["best_epoch"] == 1  # first of the tie
    assert summary["best_val_top5"] == 0.97 and summary["best_val_loss"] == 1.1
    assert summary["final_train_loss"] == 0.9 and summary["final_val_acc"] == 0.7
    experiment_id = MlflowClient().get_run(good).info.experiment_id
    start_or_resume_run(store.uri, MlflowClient().get_experiment(experiment_id).name)
    log_summary_metrics([{**HISTORY[0], "val_acc": 0.9}, {**HISTORY[1], "val_acc": 0.2}])
    better = mlflow.active_run().info.run_id
    mlflow.end_run()
    runs = mlflow.search_runs([experiment_id], order_by=["metrics.best_val_acc DESC"])
    assert list(runs["run_id"]) == [better, good]


def test_resuming_an_unknown_run_says_so(store):
    with pytest.raises(MlflowException, match=r"cannot resume MLflow run 0123abcd.*not found"):
        start_or_resume_run(store.uri, "exp-1", run_id="0123abcd")


# --- dataset input and artifacts -----------------------------------------------------------------


def test_dataset_input_records_uri_digest_and_rows(store, tmp_path):
    run_id = store.new_run()
    data_uri = str(tmp_path / "digits")
    log_dataset_input(data_uri, "9f2c41d07ab3", "digits", num_rows={"train": 1200, "val": 300})
    log_dataset_input("s3://bucket/datasets/digits", "0b11ce", "digits", context="eval")
    # A resumed worker logs the same dataset again: MLflow keeps one input per (name, digest).
    log_dataset_input(data_uri, "9f2c41d07ab3", "digits", num_rows={"train": 1200, "val": 300})
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 2
    by_context = {i.tags[0].value: i.dataset for i in inputs if i.tags}
    local, remote = by_context["training"], by_context["eval"]
    assert local.digest == "9f2c41d07ab3" and local.name == "digits"
    assert data_uri in local.source and local.source_type == "local"
    assert '"train": 1200' in local.profile
    assert "s3://bucket/datasets/digits" in remote.source and remote.source_type == "s3"
    assert remote.digest == "0b11ce"


def test_run_artifacts_are_all_logged(store):
    run_id = store.new_run()
    confusion = torch.tensor([[5, 1, 0], [0, 4, 2], [0, 0, 0]])
    log_run_artifacts(
        HISTORY,
        confusion,
        ["zero", "one", "two"],
        {"test_acc": 0.9, "test_count": torch.tensor(60)},
        PipelineConfig().to_yaml(),
    )
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {
        "config.yaml",
        "learning_curves.png",
        "confusion_matrix.png",
        "per_class_accuracy.csv",
        "test_metrics.json",
    }
    local = Path(client.download_artifacts(run_id, ""))
    assert (local / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local / "confusion_matrix.png").stat().st_size > 1000
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/test_metrics.json") == {
        "test_acc": 0.9,
        "test_count": 60,
    }
    assert "lr: 0.2" in (local / "config.yaml").read_text()
    assert (local / "per_class_accuracy.csv").read_text().splitlines()[1:] == [
        "zero,6,5,0.833333",
        "one,6,4,0.666667",
        "two,0,0,0.000000",  # no samples: 0.0, not NaN
    ]


def test_per_class_csv_checks_the_class_names():
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        per_class_accuracy_csv([[1, 0, 0], [0, 1, 0], [0, 0, 1]], ["a", "b"])


# --- reachability --------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_naming_the_uri():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking_server(uri, 2)
    assert uri in str(err.value) and "make mlflow" in str(err.value)
    assert "MLFLOW_TRACKING_URI" in str(err.value)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


def test_live_server_passes():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}/", 2)
    finally:
        server.shutdown()
        server.server_close()


def test_sqlite_needs_an_existing_writable_directory(tmp_path):
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}", 1)
    missing = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(TrackingUnavailable, match=re.escape(missing) + ".*does not exist"):
        check_tracking_server(missing, 1)


def test_other_schemes_are_not_checked():
    check_tracking_server("databricks", 1)
    check_tracking_server("postgresql://user@db.invalid/mlflow", 1)


# --- where artifacts go --------------------------------------------------------------------------


def test_a_sqlite_store_keeps_artifacts_beside_it_not_in_the_working_directory(
    tmp_path, monkeypatch
):
    """MLflow's default artifact root is `./mlruns` of whatever directory the process runs in;
    the pipeline puts a new experiment's artifacts in `mlartifacts/` next to the database."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with mlflow_uris_kept():
        run_id = start_or_resume_run(uri, "an experiment/1")
        mlflow.log_text("hello", "note.txt")
        mlflow.end_run()
    artifact_uri = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith((store / "mlartifacts" / "an_experiment_1").as_uri())
    assert (store / "mlartifacts" / "an_experiment_1" / run_id / "artifacts" / "note.txt").is_file()
    assert list(cwd.iterdir()) == []


def test_default_artifact_location_only_for_sqlite_files(tmp_path):
    from pipeline.tracking import default_artifact_location

    assert (
        default_artifact_location(f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}", "digits")
        == (tmp_path / "x" / "mlartifacts" / "digits").as_uri()
    )
    for uri in ("http://127.0.0.1:5000", "sqlite:///:memory:", "postgresql://u@h/db"):
        assert default_artifact_location(uri, "digits") is None, uri


def test_a_deleted_experiment_is_a_user_error_naming_it(store):
    from pipeline.errors import PipelineError

    run_id = store.new_run()
    mlflow.end_run()
    client = MlflowClient(store.uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    client.delete_experiment(experiment.experiment_id)
    with pytest.raises(PipelineError, match=rf"experiment '{experiment.name}' is deleted"):
        start_or_resume_run(store.uri, experiment.name)


def test_the_registry_is_the_tracking_servers_even_after_another_was_set(tmp_path):
    """A registry URI left from earlier (here, or inherited as MLFLOW_REGISTRY_URI) must not
    take registrations and `models:/` lookups to another server once a run starts."""
    import os

    other, mine = (f"sqlite:///{tmp_path / name}" for name in ("other.db", "mine.db"))
    mlflow.set_registry_uri(other)
    assert os.environ["MLFLOW_REGISTRY_URI"] == other
    start_or_resume_run(mine, "registry-follows")
    mlflow.end_run()
    assert mlflow.get_registry_uri() == mine
    assert os.environ["MLFLOW_REGISTRY_URI"] == mine
    assert MlflowClient(mine)._registry_uri == mine
