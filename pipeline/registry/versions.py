"""Registered models and their versions: connect, resolve a version or alias, register a run's
model with tags that say where it came from, download a version."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import RegistryError
from pipeline.tags import CONFIG_DIGEST_TAG, DATASET_DIGEST_TAG, RUN_NAME_TAG


def version_tags(run: Any) -> dict[str, str]:
    """Tags that say where a version came from: data, code, config and how well it did."""
    tags = run.data.tags
    params = run.data.params
    out = {
        "dataset_digest": tags.get(DATASET_DIGEST_TAG, ""),
        "git_commit": tags.get("git_commit", "unknown"),
        "config_digest": tags.get(CONFIG_DIGEST_TAG, ""),
        "run_name": tags.get(RUN_NAME_TAG, ""),
        "model": params.get("model.name", ""),
    }
    for key in ("test_acc", "test_top5", "test_loss", "best_val_acc"):
        if key in run.data.metrics:
            out[key] = f"{run.data.metrics[key]:.6f}"
    return {k: v for k, v in out.items() if v}


def register_run_model(cfg: PipelineConfig, run_id: str):
    """Register the run's logged model `model` as a new version of `registry.model_name`, with
    its model card."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import use_server

    uri = cfg.tracking.resolved_uri()
    use_server(uri)
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(run_id)
    version = mlflow.register_model(
        logged_model_uri(client, run, "model"), cfg.registry.model_name, tags=version_tags(run)
    )
    from pipeline.registry.card import write_model_card

    write_model_card(client, version.name, str(version.version))
    return version


def register_training(cfg: PipelineConfig, summary: Any) -> Any:
    """After `run_training`: register the run's model as a new version of `registry.model_name`
    when one is configured (and the run logged its model); the summary, with the version. A run
    name that had already finished trained nothing now, so nothing new is registered."""
    if cfg.registry.model_name and cfg.tracking.log_model and not summary.already_finished:
        version = register_run_model(cfg, summary.run_id)
        summary.model_version, summary.registered_name = str(version.version), version.name
    return summary


def logged_model_uri(client, run, name: str) -> str:
    """`models:/<model id>` of the model `name` that `run` logged (MLflow 3 keeps logged models
    outside the run's artifacts; registering `runs:/<id>/<name>` only warns and resolves to
    this), or `runs:/<id>/<name>` for a run that logged none of that name. Only a READY
    model counts."""
    from mlflow.entities import LoggedModelStatus

    outputs = run.outputs.model_outputs if run.outputs else []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        # (a FAILED one is an attempt that raised, e.g. the pt2 export before the pickle one)
        if model.name == name and model.status == LoggedModelStatus.READY:
            return model.model_uri
    return f"runs:/{run.info.run_id}/{name}"


# ---------------------------------------------------------------------------------------------
# Connecting, and MLflow errors as user errors


def connect(tracking_uri: str, timeout_s: float = 10.0):
    """An MlflowClient for `tracking_uri`, after a bounded reachability check.

    MLflow's own HTTP retries take about four minutes to give up on a dead server; checking
    /health first turns that into a clear error naming the URI within `timeout_s`. The URI also
    becomes MLflow's global tracking and registry URI, which `models:/` downloads use.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_tracking_server, use_server

    check_tracking_server(tracking_uri, timeout_s)
    use_server(tracking_uri)
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Re-raise MLflow's exceptions as RegistryError prefixed with `what` (a model, a URI)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{what}: {exc.message}") from None


def registered_model(client, name: str):
    """The registered model `name`, or an error listing the names that do exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r}: {exc.message}") from None
    known = sorted(m.name for m in client.search_registered_models(max_results=50))
    listing = ", ".join(known) if known else "none"
    raise RegistryError(
        f"no registered model {name!r} at {client.tracking_uri} (registered models: {listing}); "
        "check the name, or the tracking URI (--tracking-uri / MLFLOW_TRACKING_URI)"
    )


def resolve_version(client, name: str, ref: str | None = None):
    """A ModelVersion of `name` by number ("3"), alias ("champion") or, with None, the newest."""
    from mlflow.exceptions import MlflowException

    model = registered_model(client, name)
    if ref is None:
        versions = client.search_model_versions(f"name = '{quote(name)}'")
        if not versions:
            raise RegistryError(f"registered model {name!r} has no versions yet")
        return max(versions, key=lambda v: int(v.version))
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(
            f"registered model {name!r} has no version or alias {ref!r} (aliases: {aliases}); "
            f"`pipeline models registered {name}` lists them"
        ) from None


def quote(value: str) -> str:
    return value.replace("'", "\\'")


def aliases_of(client, name: str) -> dict[str, str]:
    """alias -> version (as str: the SQL store says int, the REST store str). Read from the
    registered model: search_model_versions leaves aliases empty in MLflow 3."""
    return {a: str(v) for a, v in registered_model(client, name).aliases.items()}


def download_version(client, name: str, version: str, dst: str | Path) -> Path:
    """Download `models:/name/version` into `dst`; returns the local model directory."""
    import mlflow

    with mlflow_errors(f"models:/{name}/{version}"):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}",
            dst_path=str(dst),
            tracking_uri=client.tracking_uri,
        )
    return Path(local)
