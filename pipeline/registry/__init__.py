"""The MLflow model registry: versions, the promotion gate, the lock that serialises it, reports.

| module | what |
|---|---|
| `versions` | connect, resolve versions and aliases, register a run's model, download a version |
| `promotion` | the gate: re-evaluate both now, move `champion`, record the decision; rollback |
| `lease` | `PromotionLock`: a lease in a registered-model tag, one writer at a time |
| `reports` | `best_runs`, `registered_versions` |
"""

from pipeline.registry.lease import LockSettings, PromotionLock
from pipeline.registry.promotion import (
    Evaluation,
    PromotionDecision,
    decide,
    promote,
    rollback,
)
from pipeline.registry.reports import best_runs, registered_versions
from pipeline.registry.versions import (
    aliases_of,
    connect,
    download_version,
    logged_model_uri,
    mlflow_errors,
    register_run_model,
    register_training,
    registered_model,
    resolve_version,
    version_tags,
)

__all__ = [
    "Evaluation",
    "LockSettings",
    "PromotionDecision",
    "PromotionLock",
    "aliases_of",
    "best_runs",
    "connect",
    "decide",
    "download_version",
    "logged_model_uri",
    "mlflow_errors",
    "promote",
    "register_run_model",
    "register_training",
    "registered_model",
    "registered_versions",
    "resolve_version",
    "rollback",
    "version_tags",
]
