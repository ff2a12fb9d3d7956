"""Resolving and downloading `models:/` and `runs:/` URIs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow

from pipeline.config import TrackingConfig
from pipeline.errors import ServingError
from pipeline.model_package import PREDICTOR_NAME
from pipeline.registry import connect, mlflow_errors, resolve_version
from pipeline.storage import strip_credentials

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+?)/?$")


def describe_source(client, uri: str) -> dict[str, Any]:
    """What `uri` points at: registered model name, version and run (what is known)."""
    match = _MODELS_URI.match(uri)
    if match:
        version = resolve_version(client, match["name"], match["alias"] or match["version"])
        return {"name": version.name, "version": str(version.version), "run_id": version.run_id}
    match = _RUNS_URI.match(uri)
    if match:
        return {"name": None, "version": None, "run_id": match["run_id"]}
    raise ServingError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH")


def predictor_uri(uri: str, *, tracking_uri: str | None = None, timeout_s: float = 10.0) -> str:
    """`runs:/<run>/predictor` of a registered version or run: what the scoring server serves."""
    client = connect(tracking_uri or TrackingConfig().resolved_uri(), timeout_s)
    source = describe_source(client, uri)
    if not source["run_id"]:
        raise ServingError(f"{uri}: the version has no run, so no {PREDICTOR_NAME}/ artifact")
    found = f"runs:/{source['run_id']}/{PREDICTOR_NAME}"
    with mlflow_errors(f"{uri} ({found}; models logged before the predictor existed lack it)"):
        mlflow.models.get_model_info(found)
    return found


def download(
    uri: str, dst: Path, tracking_uri: str | None, timeout_s: float
) -> tuple[Path, dict[str, Any]]:
    tracking = tracking_uri or TrackingConfig().resolved_uri()
    client = connect(tracking, timeout_s)
    source = describe_source(client, uri)  # unknown names and aliases fail here, clearly
    with mlflow_errors(uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking
        )
    return Path(local), {**source, "uri": uri, "tracking_uri": strip_credentials(tracking)}
