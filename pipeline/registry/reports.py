"""Queries for people: the best runs by a metric with their registered versions, and a model's
versions with aliases, metrics and tags."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.errors import RegistryError
from pipeline.registry.versions import aliases_of, mlflow_errors, quote
from pipeline.tags import SUMMARY_METRICS


def best_runs(
    client,
    experiment: str,
    metric: str = "best_val_acc",
    filter_string: str = "",
    top: int = 5,
    ascending: bool | None = None,
) -> list[dict[str, Any]]:
    """The `top` runs of `experiment` by `metric` (descending; ascending for *loss* metrics
    unless told), each with its registered versions and their aliases."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments(max_results=50))
        raise RegistryError(
            f"no experiment {experiment!r} at {client.tracking_uri} (experiments: "
            f"{', '.join(known) or 'none'}); pass --experiment"
        )
    if ascending is None:
        ascending = "loss" in metric
    # Runs without the metric would sort first or last depending on the store: filter them out.
    has_metric = f"metrics.`{metric}` {'< 1e308' if ascending else '> -1e308'}"
    where = f"{has_metric} and {filter_string}" if filter_string.strip() else has_metric
    with mlflow_errors(f"experiment {experiment!r}, filter {filter_string!r}"):
        runs = client.search_runs(
            [exp.experiment_id],
            where,
            order_by=[f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"],
            max_results=top,
        )
    alias_cache: dict[str, dict[str, list[str]]] = {}
    return [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "metric": metric,
            "value": run.data.metrics[metric],
            "model": run.data.params.get("model.name", ""),
            "metrics": {k: run.data.metrics[k] for k in SUMMARY_METRICS if k in run.data.metrics},
            "started": _iso(run.info.start_time),
            "versions": _run_versions(client, run.info.run_id, alias_cache),
        }
        for run in runs
    ]


def _run_versions(client, run_id: str, cache: dict[str, dict[str, list[str]]]) -> list[dict]:
    out = []
    for v in client.search_model_versions(f"run_id = '{run_id}'"):
        if v.name not in cache:
            by_version: dict[str, list[str]] = {}
            for alias, version in aliases_of(client, v.name).items():
                by_version.setdefault(version, []).append(alias)
            cache[v.name] = by_version
        out.append(
            {
                "name": v.name,
                "version": str(v.version),
                "aliases": sorted(cache[v.name].get(str(v.version), [])),
            }
        )
    return sorted(out, key=lambda d: (d["name"], int(d["version"])))


def registered_versions(client, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: each version's aliases, run, summary metrics and tags."""
    from mlflow.exceptions import MlflowException

    by_version: dict[str, list[str]] = {}
    for alias, version in aliases_of(client, name).items():
        by_version.setdefault(version, []).append(alias)
    versions = sorted(
        client.search_model_versions(f"name = '{quote(name)}'"),
        key=lambda v: int(v.version),
        reverse=True,
    )[:limit]
    rows = []
    for v in versions:
        try:
            metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
        except MlflowException:  # the run was deleted; the version stays usable
            metrics = {}
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "run_id": v.run_id,
                "created": _iso(v.creation_timestamp),
                "status": v.status,
                "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
                "tags": dict(v.tags),
            }
        )
    return rows


def _iso(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")
