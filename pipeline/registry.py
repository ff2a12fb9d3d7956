"""The MLflow model registry: register a training run's model with the tags that identify it."""

from __future__ import annotations

from typing import Any

from pipeline.config import PipelineConfig


def version_tags(run: Any) -> dict[str, str]:
    """Tags that say where a version came from: data, code, config and how well it did."""
    tags = run.data.tags
    params = run.data.params
    out = {
        "dataset_digest": tags.get("pipeline.dataset_digest", ""),
        "git_commit": tags.get("git_commit", "unknown"),
        "config_digest": tags.get("pipeline.config_digest", ""),
        "run_name": tags.get("pipeline.run_name", ""),
        "model": params.get("model.name", ""),
    }
    for key in ("test_acc", "test_top5", "test_loss", "best_val_acc"):
        if key in run.data.metrics:
            out[key] = f"{run.data.metrics[key]:.6f}"
    return {k: v for k, v in out.items() if v}


def register_run_model(cfg: PipelineConfig, run_id: str):
    """Register `runs:/<run_id>/model` as a new version of `registry.model_name`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.resolved_uri()
    mlflow.set_tracking_uri(uri)
    run = MlflowClient(uri).get_run(run_id)
    return mlflow.register_model(
        f"runs:/{run_id}/model", cfg.registry.model_name, tags=version_tags(run)
    )
