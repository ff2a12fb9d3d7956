"""MLflow logging for one training run: server check, run start/resume, params, metrics, artifacts.

Only rank 0 logs; the caller decides the rank, and these functions just log to the active run
(`start_or_resume_run` makes it active). Everything is safe to repeat after a worker restart:
params already logged are skipped, and an epoch is never logged twice.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.data
from matplotlib.figure import Figure
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig, flatten
from pipeline.errors import ConfigError, TrackingUnavailable
from pipeline.storage import mask_credentials

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest

from pipeline.tags import (
    COMPLETED_TAG,
    CONFIG_ARTIFACT,
    CONFIG_DIGEST_TAG,
    DATASET_DIGEST_TAG,
    GIT_COMMIT_ENV,
    KIND_TAG,
    MANIFEST_ARTIFACT,
    MLFLOW_GIT_COMMIT_TAG,
    RUN_NAME_TAG,
    TEST_METRICS_ARTIFACT,
)

# MLflow's own limits (mlflow.utils.validation): longer param values are rejected or truncated,
# and one log_batch request takes at most 100 params.
MAX_PARAM_VALUE_CHARS = 6000
PARAMS_PER_BATCH = 100

_WHAT_TO_DO = "start it with `make mlflow` or set tracking.tracking_uri / MLFLOW_TRACKING_URI"


# ----------------------------------------------------------------------------------------------
# Reachability, checked before any cluster work so a dead server fails fast and clearly.


def check_tracking_server(uri: str, timeout_s: float) -> None:
    """Raise TrackingUnavailable unless the tracking store at `uri` can be used.

    http(s): GET <uri>/health, retried until `timeout_s` (a server may still be starting).
    sqlite:///: the database's directory must exist and be writable. Other schemes: no check.
    """
    if uri.startswith(("http://", "https://")):
        _wait_for_http(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri)


def _wait_for_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        remaining = deadline - time.monotonic()
        error = _http_error(url, max(remaining, 0.05))
        if error is None:
            return
        if time.monotonic() + delay >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} did not answer within {timeout_s:g}s "
                f"(GET {url}: {error}); {_WHAT_TO_DO}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _http_error(url: str, timeout_s: float) -> str | None:
    """None when the server answered (any non-5xx status), else why it did not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        # 401/403/404 still prove a live server (auth or a proxy prefix are separate problems).
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def _check_sqlite(uri: str) -> None:
    db = Path(uri.removeprefix("sqlite:///")).expanduser()
    parent = db.parent.resolve()
    if not parent.is_dir():
        raise TrackingUnavailable(
            f"tracking URI {uri}: directory {parent} does not exist; create it or "
            f"set tracking.tracking_uri / MLFLOW_TRACKING_URI"
        )
    target = db if db.exists() else parent
    if not os.access(target, os.W_OK):
        raise TrackingUnavailable(
            f"tracking URI {uri}: {target} is not writable; fix its permissions or "
            f"set tracking.tracking_uri / MLFLOW_TRACKING_URI"
        )


# ----------------------------------------------------------------------------------------------
# Run lifecycle


def start_or_resume_run(
    uri: str,
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    artifact_location: str | None = None,
) -> str:
    """Make a run active and return its id: a new one, or `run_id` again after a restart.

    The experiment is created when missing (with `artifact_location` if given; for a SQLite
    store, next to its database: see `default_artifact_location`; else the server's default).
    A restarted worker passes the run id kept in its checkpoint, so the whole training shows up
    as one MLflow run.
    """
    use_server(uri)
    client = MlflowClient(uri)
    location = artifact_location or default_artifact_location(uri, experiment)
    experiment_id = _experiment_id(client, experiment, location)
    active = mlflow.active_run()
    if active is not None:
        if run_id is not None and active.info.run_id == run_id:
            return run_id
        # Rank 0 owns one run at a time: a different active run is left over from an attempt
        # in this process that died before end_run.
        mlflow.end_run(status="KILLED")
    if run_id is None:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id
    _check_resumable(client, uri, run_id, experiment_id)
    mlflow.start_run(run_id=run_id)
    if tags:
        mlflow.set_tags(tags)
    return run_id


def use_server(uri: str) -> None:
    """Make `uri` MLflow's global tracking *and* registry URI.

    The registry is the tracking server's own. MLflow keeps the two apart: `set_tracking_uri`
    leaves an earlier registry URI in place (and in the MLFLOW_REGISTRY_URI variable that child
    processes inherit), and `models:/` URIs, `register_model` and every client built without an
    explicit registry URI then talk to that other server.
    """
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment in a SQLite store keeps its artifacts: `mlartifacts/<experiment>`
    beside the database (`sqlite:///x/mlflow.db` -> `x/mlartifacts/...`), as `make mlflow`'s
    server does. MLflow's own default is `./mlruns` in whatever directory the process runs in,
    which scatters artifacts over the caller's working directories. None for other stores: a
    server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip(".") or "experiment"
    return (Path(db).expanduser().resolve().parent / "mlartifacts" / folder).as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {name!r} is deleted; restore it in the UI "
                f"(or `mlflow experiments restore`) or set tracking.experiment to another name"
            )
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _check_resumable(client: MlflowClient, uri: str, run_id: str, experiment_id: str) -> None:
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise MlflowException(
            f"cannot resume MLflow run {run_id}: not found at {uri} ({exc.message}); the "
            f"checkpoint was written against another tracking server, or the run was deleted"
        ) from exc
    if run.info.experiment_id != experiment_id:
        raise MlflowException(
            f"cannot resume MLflow run {run_id}: it belongs to experiment "
            f"{run.info.experiment_id}, not {experiment_id}; keep tracking.experiment unchanged "
            f"when resuming, or start a new run name"
        )


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call start_or_resume_run first (rank 0 only)")
    return run.info.run_id


# ----------------------------------------------------------------------------------------------
# Params and tags


def log_params_flat(config_dict: dict[str, Any]) -> dict[str, str]:
    """Log the flattened config as params; returns the params newly logged.

    Idempotent on resume: params already there with the same value are skipped. MLflow refuses
    to change a param, so a changed value is skipped with a warning (the resolved config.yaml
    artifact of the new attempt records it).
    """
    run_id = _active_run_id()
    wanted = {
        key: _param_value(value) for key, value in flatten(redact_config(config_dict)).items()
    }
    existing = MlflowClient().get_run(run_id).data.params
    changed = sorted(k for k in wanted if k in existing and existing[k] != wanted[k])
    if changed:
        warnings.warn(
            f"MLflow run {run_id}: params {changed} differ from the values logged before; "
            "MLflow cannot change a param, the first values are kept",
            stacklevel=2,
        )
    new = {k: v for k, v in wanted.items() if k not in existing}
    items = list(new.items())
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + PARAMS_PER_BATCH]))
    return new


def _param_value(value: Any) -> str:
    return mask_credentials(str(value))[:MAX_PARAM_VALUE_CHARS]


# Config fields whose values are secrets in themselves (a webhook URL is its own credential).
SECRET_FIELDS = ("nightly.notify",)


def _redacted(value: Any) -> str:
    count = len(value) if isinstance(value, list | tuple) else int(bool(value))
    return f"<{count} hidden>"


def redact_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with SECRET_FIELDS hidden, for params and artifacts."""
    import copy

    out = copy.deepcopy(config_dict)
    for path in SECRET_FIELDS:
        if out.get(path):  # already flattened
            out[path] = _redacted(out[path])
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf):
            node[leaf] = _redacted(node[leaf])
    return out


def config_yaml_for_mlflow(config_yaml: str) -> str:
    """The resolved config as logged: secret fields hidden, passwords in URIs masked."""
    import yaml

    loaded = yaml.safe_load(config_yaml)
    if isinstance(loaded, dict):
        config_yaml = yaml.safe_dump(redact_config(loaded), sort_keys=False)
    return mask_credentials(config_yaml)


def standard_tags() -> dict[str, str]:
    """Where a run came from: the code's git commit, library versions, python, host."""
    import torch  # the training process has both imported already; tracking alone need not
    import torchvision

    commit = _git_commit()
    return {
        "git_commit": commit,
        MLFLOW_GIT_COMMIT_TAG: commit,  # the tag MLflow's UI shows on the run page
        "ray_version": _version("ray"),
        "torch_version": torch.__version__,  # with the build tag (+cu130, +cpu) pip metadata lacks
        "torchvision_version": torchvision.__version__,
        "mlflow_version": _version("mlflow"),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
    }


def _git_commit() -> str:
    # The commit of the pipeline's own code, wherever the process was started from; a submitted
    # job has no .git and gets its submitter's commit through the environment.
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _version(package: str) -> str:
    # Read from the installed metadata: importing ray just to ask its version costs seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------------------------
# Metrics


def logged_epochs(run_id: str, key: str) -> set[int]:
    """The steps (epochs) at which `key` has been logged in `run_id`."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def summarize_history(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Summary numbers of a run from per-epoch rows (keys epoch, train_loss, val_acc, ...).

    best_epoch is the first epoch with the highest val_acc; best_val_top5 / best_val_loss are
    the best values over all epochs.
    """
    summary: dict[str, float] = {}
    with_val = [row for row in history if _finite(row.get("val_acc"))]
    if with_val:
        best = max(with_val, key=lambda row: row["val_acc"])  # max keeps the first of ties
        summary["best_val_acc"] = float(best["val_acc"])
        summary["best_epoch"] = float(best.get("epoch", history.index(best)))
    for key, name, pick in (("val_top5", "best_val_top5", max), ("val_loss", "best_val_loss", min)):
        values = [float(row[key]) for row in history if _finite(row.get(key))]
        if values:
            summary[name] = pick(values)
    if history:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if _finite(history[-1].get(key)):
                summary[f"final_{key}"] = float(history[-1][key])
    return summary


def log_summary_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Log `summarize_history` as metrics. Runs are sorted by a metric's latest value, so
    `best_val_acc` (not the last epoch's val_acc) is what `search_runs` should order by."""
    _active_run_id()
    summary = summarize_history(history)
    if summary:
        mlflow.log_metrics(summary)
    return summary


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Dataset lineage


class _ManifestDataset(MetaDataset):
    """A dataset known by its manifest: source URI and digest, plus row counts as the profile."""

    def __init__(self, source: Any, name: str, digest: str, num_rows: dict[str, int] | None):
        self._num_rows = num_rows
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any] | None:
        return {"num_rows": self._num_rows} if self._num_rows else None

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self.profile:
            config["profile"] = json.dumps(self.profile)
        return config


def log_dataset_input(
    uri: str,
    digest: str,
    name: str,
    context: str = "training",
    num_rows: dict[str, int] | None = None,
) -> None:
    """Record the dataset (source URI + manifest digest, row counts per split) as a run input.

    MLflow keeps one input per (name, digest) and run, whatever the context: calling this again
    on resume adds nothing, and the splits of one manifest share its digest, so log the dataset
    once with `num_rows` per split (or give each split its own `name`).
    """
    _active_run_id()
    source_uri = uri if "://" in uri else str(Path(uri).resolve())
    with warnings.catch_warnings():
        # Several registered local sources match a path; MLflow warns and picks one, harmlessly.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(source_uri)
    # MLflow caps a dataset digest at 36 characters; the full one is the run tag
    # `pipeline.dataset_digest`. 32 hex digits (128 bits) still identify the shards.
    dataset = _ManifestDataset(source, name=name, digest=digest[:32], num_rows=num_rows)
    mlflow.log_input(dataset, context=context)


# ----------------------------------------------------------------------------------------------
# Plots and artifacts. Figures are built without pyplot: no global state, no GUI backend, and
# nothing to close; they render with Agg when saved.


def plot_learning_curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy against epoch, train and val, side by side."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Top-1 accuracy")):
        for split in ("train", "val"):
            points = [
                (row.get("epoch", i), row[f"{split}_{metric}"])
                for i, row in enumerate(history)
                if _finite(row.get(f"{split}_{metric}"))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=split)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return fig


def plot_confusion_matrix(confusion: Any, class_names: Sequence[str]) -> Figure:
    """Counts as a heat map, rows = true class, columns = predicted; numbers on small matrices."""
    counts = _as_rows(confusion)
    n = len(counts)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n)
    ax.set_xticks(ticks, labels=list(class_names), rotation=90 if n > 10 else 0)
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    if n <= 20:  # beyond that the numbers are unreadable anyway
        peak = max((max(row) for row in counts), default=0)
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                colour = "white" if value > peak / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    return fig


def per_class_accuracy_csv(confusion: Any, class_names: Sequence[str]) -> str:
    """CSV of class, support, correct, accuracy; a class with no samples has accuracy 0.0."""
    counts = _as_rows(confusion)
    if len(class_names) != len(counts):
        raise ValueError(
            f"per_class_accuracy_csv: {len(class_names)} class names for a "
            f"{len(counts)}x{len(counts)} confusion matrix"
        )
    out = io.StringIO()
    out.write("class,support,correct,accuracy\n")
    for i, (name, row) in enumerate(zip(class_names, counts, strict=True)):
        support, correct = sum(row), row[i]
        accuracy = correct / support if support else 0.0
        out.write(f"{_csv_field(str(name))},{support},{correct},{accuracy:.6f}\n")
    return out.getvalue()


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _as_rows(confusion: Any) -> list[list[int]]:
    # Accepts a torch tensor, a numpy array or nested lists without importing torch here.
    rows = confusion.tolist() if hasattr(confusion, "tolist") else confusion
    return [[int(v) for v in row] for row in rows]


def log_run_artifacts(
    history: Sequence[dict[str, Any]],
    confusion: Any | None,
    class_names: Sequence[str],
    test_metrics: dict[str, Any],
    config_yaml: str,
) -> None:
    """config.yaml, learning_curves.png, confusion_matrix.png, per_class_accuracy.csv and
    test_metrics.json, at the root of the active run's artifacts."""
    _active_run_id()
    mlflow.log_text(config_yaml_for_mlflow(config_yaml), CONFIG_ARTIFACT)
    mlflow.log_figure(plot_learning_curves(history), "learning_curves.png")
    if confusion is not None:
        mlflow.log_figure(plot_confusion_matrix(confusion, class_names), "confusion_matrix.png")
        mlflow.log_text(per_class_accuracy_csv(confusion, class_names), "per_class_accuracy.csv")
    mlflow.log_dict(_jsonable(test_metrics), TEST_METRICS_ARTIFACT)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy arrays/scalars
        return value.tolist()
    return value


# ----------------------------------------------------------------------------------------------
# The MLflow run of a training run, search or trial


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a user finds a run: its page on a tracking server, or how to browse a local store."""
    base = tracking_uri.rstrip("/")
    if base.startswith("http"):
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base} (run {run_id}; browse with `mlflow ui --backend-store-uri {base}`)"


def open_mlflow_run(
    cfg: PipelineConfig,
    run_name: str,
    manifest: Manifest,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    texts: dict[str, str] | None = None,
) -> tuple[str, str, bool]:
    """Find the MLflow run of `run_name` (to resume) or create it: (run_id, exp_id, completed).

    `tags` are added to the standard ones (a Tune trial adds its parent run and trial id); a
    `pipeline.kind` tag among them also narrows the search for an existing run. On a run not yet
    completed, `params` (flat; default: the flattened config), the dataset input, its manifest
    and `texts` ({artifact path: text}) are logged.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.resolved_uri()
    client = MlflowClient(uri)
    existing = None
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
        if tags and KIND_TAG in tags:
            query += f" and tags.`{KIND_TAG}` = '{tags[KIND_TAG]}'"
        found = client.search_runs([exp.experiment_id], query, max_results=1)
        existing = found[0] if found else None
    tags = {
        **standard_tags(),
        RUN_NAME_TAG: run_name,
        DATASET_DIGEST_TAG: manifest.digest,
        CONFIG_DIGEST_TAG: cfg.digest(),
        **(tags or {}),
    }
    run_id = start_or_resume_run(
        uri,
        cfg.tracking.experiment,
        run_id=existing.info.run_id if existing else None,
        run_name=run_name,
        tags=tags,
    )
    completed = existing is not None and existing.data.tags.get(COMPLETED_TAG) == "true"
    if not completed:
        log_params_flat(params if params is not None else cfg.to_dict())
        log_dataset_input(
            cfg.data.uri,
            manifest.digest,
            manifest.name,
            num_rows={s: i.rows for s, i in manifest.splits.items()},
        )
        # The exact shard list trained on: `pipeline nightly` diffs it against today's data.
        mlflow.log_dict(manifest.model_dump(mode="json"), MANIFEST_ARTIFACT)
        for path, text in (texts or {}).items():
            mlflow.log_text(text, path)
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    mlflow.end_run()  # rank 0 re-opens it; `pipeline.completed` (not the status) marks the end
    return run_id, experiment_id, completed
