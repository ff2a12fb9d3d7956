"""Every private Ray API the pipeline uses, in one place: a Ray upgrade touches this file.

Each function says which Ray internals it leans on and why the public API does not do. Checked
against Ray 2.60; re-check each on an upgrade (the tests that exercise them are named below).
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------
# Placement groups of stopped Tune trials (tests/integration/test_tune.py)
#
# When ASHA stops a trial, Tune kills the trial's actor; the TorchTrainer controller it owns dies
# with it, but the placement group holding the trial's Train workers belongs to the job, so it
# stays reserved (ray-project/ray#54305). Ray Train's own PlacementGroupCleaner needs the State
# API (the dashboard), which a local `pipeline tune` does not start. So each trial records its
# worker group's placement group in the GCS key-value store (private: `internal_kv`), through a
# Train V2 worker-group callback (private: `ray.train.v2._internal`), and the driver removes it
# once the trial has ended, whatever way it ended.

_KV_NAMESPACE = "pipeline"


def _pg_key(key: str) -> str:
    return f"tune/placement_group/{key}"


def placement_group_recorder(key: str) -> Any:
    """A Ray Train worker-group callback that records the group's placement group under `key`."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            pg_id = handle.placement_group.id.hex()
            _internal_kv_put(_pg_key(key), pg_id, overwrite=True, namespace=_KV_NAMESPACE)

    return PlacementGroupRecorder()


def release_recorded_placement_group(key: str) -> bool:
    """Remove the placement group recorded under `key`; True if one was still reserved."""
    from ray._raylet import PlacementGroupID
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    raw = _internal_kv_get(_pg_key(key), namespace=_KV_NAMESPACE)
    if not raw:
        return False
    _internal_kv_del(_pg_key(key), namespace=_KV_NAMESPACE)
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(raw.decode())))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


# ---------------------------------------------------------------------------------------------
# Tune's trials after fit() (tests/integration/test_tune.py: the interrupted-search test)


def tuner_trials(grid: Any) -> list[Any]:
    """Every trial of a finished `Tuner.fit()`, with its status. `ResultGrid` exposes only the
    trials that reported, so a search interrupted before some trials started looks complete
    through the public API; the experiment analysis it wraps (private) knows them all."""
    return list(grid._experiment_analysis.trials)


# ---------------------------------------------------------------------------------------------
# Ray's token authentication for the job API (tests/e2e/test_cluster_jobs.py)


def token_auth_headers() -> dict[str, str]:
    """The HTTP header carrying the local Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), or {} when Ray has none. Ray's own loader (private: `ray._raylet`) is
    used so the lookup order stays Ray's."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # pragma: no cover - a Ray without token auth
        return {}
    return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(True) or {})


# ---------------------------------------------------------------------------------------------
# Which run of a dataset is being planned (tests/unit/test_photo_stream.py,
# tests/integration/test_photo_datasets.py)


def execution_index(data_context: Any) -> int:
    """How many runs of this dataset have finished before the one being planned: a custom
    datasource's `get_read_tasks(..., data_context)` reads it to plan the next epochs of a
    stream (`pipeline.data.stream.PhotoShards`). Ray counts a dataset's finished executions in
    its DataContext (private: `_execution_idx`, raised by `ExecutionIdxUpdateCallback` after an
    execution succeeds); its own `FileShuffleConfig(reseed_after_execution=True)` reads the same
    counter. No context, or a Ray without the counter: the first run."""
    return int(getattr(data_context, "_execution_idx", 0) or 0)


# ---------------------------------------------------------------------------------------------
# Ray Data's first second at one CPU (tests/unit/test_photo_stream.py)

# How often a Ray Data execution re-reads its resource limits, in seconds (Ray's own: 1).
DATA_LIMITS_REFRESH_S = 0.25


def refresh_data_limits_sooner(interval_s: float = DATA_LIMITS_REFRESH_S) -> bool:
    """Make Ray Data executions started in this process re-read their CPU limit every
    `interval_s` instead of every second.

    An execution asks its autoscaling coordinator for its resources without blocking, and uses
    the answer cached so far: none at the start, so it runs one task until the next refresh,
    `ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S` (1 s) later. On the ingest benchmark that
    second of one busy core was most of a run's 1.3 s before its first batch. The executor runs
    where a dataset is iterated (a driver, a Train worker, a split coordinator), and each of those
    imports `pipeline.data.stream` to unpickle the dataset, which calls this. Each refresh sends
    one small actor call. Returns whether this Ray has the setting."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # pragma: no cover - a Ray that moved it: keep its own interval
        return False
    current = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if not isinstance(current, int | float):  # pragma: no cover - as above
        return False
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = min(current, interval_s)
    return True
