"""Driver side of `pipeline train`: pre-flight checks, Ray, the TorchTrainer, progress events.

Everything that can be checked without a worker is checked first (config, dataset manifest and
shards, model name, tracking server), so a mistake costs seconds, not a cluster start-up. Rank 0
sends progress through a Ray queue; the driver turns it into `pipeline.events` for its caller
(the CLI draws them). Training ends with a finished MLflow run; registering its model is the
caller's step (`pipeline.registry.register_training`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline import storage as st
from pipeline.config import PipelineConfig
from pipeline.data.shards import Manifest
from pipeline.data.validate import ensure_dataset
from pipeline.errors import TrainingError, root_cause
from pipeline.events import EventSink, TrainingStarted, ignore
from pipeline.tags import FAILURE_REASON_TAG
from pipeline.train.callbacks import LoopCallback
from pipeline.train.entry import DatasetHandle, LoopConfig, train_loop_per_worker
from pipeline.train.loop import model_for, per_worker_batch, steps_per_epoch
from pipeline.train.ray_runtime import init_ray
from pipeline.train.resources import check_cluster
from pipeline.train.supervise import Stalled, Stopped, Unrecoverable, Watch, supervised_fit

_IMPORTED_AT = time.time()
log = logging.getLogger(__name__)


@dataclass
class TrainingSummary:
    run_name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str | None
    model_version: str | None = None
    registered_name: str | None = None
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    already_finished: bool = False  # the run name had finished before: nothing was trained

    @property
    def run_url(self) -> str:
        from pipeline.tracking import run_link

        return run_link(self.tracking_uri, self.experiment_id, self.run_id)


# ---------------------------------------------------------------------------------------------
# Pre-flight


def preflight(cfg: PipelineConfig, manifest: Manifest | None = None) -> Manifest:
    """Every check before a worker starts; `manifest`: the dataset was already checked by
    `ensure_dataset` for this config (its manifest is not read twice)."""
    from pipeline import tracking

    manifest = manifest or ensure_dataset(cfg)
    with torch.device("meta"):  # checks name and arguments without allocating weights
        model_for(
            cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": None})}),
            manifest,
        )
    weights = cfg.model.weights
    if weights and not weights.startswith(("models:/", "runs:/")) and not Path(weights).is_file():
        raise TrainingError(f"model.weights: {cfg.model.weights}: file not found")
    train_rows = manifest.split(cfg.data.train_split).rows
    if steps_per_epoch(cfg, manifest) < 1:
        raise TrainingError(
            f"train.batch_size={cfg.train.batch_size}: the train split has {train_rows} rows, so "
            f"each of {cfg.scaling.num_workers} workers gets fewer than one full batch of "
            f"{per_worker_batch(cfg)}; lower the batch size"
        )
    tracking.check_tracking_server(cfg.tracking.resolved_uri(), cfg.tracking.timeout_s)
    if weights and weights.startswith(("models:/", "runs:/")):
        _check_mlflow_weights(weights, cfg.tracking.resolved_uri())
    return manifest


def _check_mlflow_weights(uri: str, tracking_uri: str) -> None:
    """model.weights names an MLflow model: it must exist before any worker tries to load it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ref = uri.split(":/", 1)[1].strip("/")
    try:
        if uri.startswith("runs:/"):
            client.get_run(ref.split("/", 1)[0])
        elif "@" in ref:
            name, alias = ref.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            client.get_model_version(name, version)
        else:
            raise TrainingError(
                f"model.weights: {uri}: name a version or alias (models:/NAME/3, "
                "models:/NAME@champion)"
            )
    except MlflowException as exc:
        raise TrainingError(
            f"model.weights: {uri}: not found at {tracking_uri} ({exc.message})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Ray


def cache_in_workers(cfg: PipelineConfig, manifest: Manifest) -> bool:
    """Whether workers keep their decoded train and val shards in memory (DataConfig.cache).
    Never for photographs (`data.crop`): each epoch's random crops are drawn afresh from the
    encoded images, and mixed sizes have no one decoded size to budget for."""
    if cfg.data.crop is not None:
        return False
    if cfg.data.cache != "auto":
        return cfg.data.cache == "always"
    rows = manifest.split(cfg.data.train_split).rows + manifest.split(cfg.data.val_split).rows
    share_mb = rows * manifest.image.raw_size / cfg.scaling.num_workers / 2**20
    return share_mb <= cfg.data.cache_max_mb


def _datasets(cfg: PipelineConfig, dataset: DatasetHandle, cache: bool) -> dict[str, Any]:
    from pipeline.data.ingest import photo_dataset, ray_dataset

    split, manifest = cfg.data, dataset.manifest
    if split.crop is not None:  # photographs: uint8 crops; the worker normalises on its device
        common = {"crop": split.crop, "storage": cfg.storage, "batch_size": per_worker_batch(cfg)}
        return {
            # every epoch of the run in one stream (`pipeline.data.stream`)
            "train": photo_dataset(
                dataset.uri,
                manifest,
                split.train_split,
                train=True,
                seed=cfg.train.seed,
                epochs=cfg.train.epochs,
                **common,
            ),
            "val": photo_dataset(dataset.uri, manifest, split.val_split, train=False, **common),
        }
    return {
        "train": ray_dataset(
            dataset.uri,
            manifest,
            split.train_split,
            augment=split.augment,
            resize=split.resize,
            storage=cfg.storage,
            decode_only=cache,
        ),
        "val": ray_dataset(
            dataset.uri,
            manifest,
            split.val_split,
            augment=None,
            resize=split.resize,
            storage=cfg.storage,
            decode_only=cache,
        ),
    }


def data_config(cfg: PipelineConfig):
    """How Ray Train hands the datasets to the workers: split between them, except for a single
    worker, which reads each whole dataset itself. Splitting for one worker buys nothing and
    starts a SplitCoordinator actor per dataset (a process each: ~3 CPU-s apiece, about a tenth
    of a small run's CPU on 2 cores)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all" if cfg.scaling.num_workers > 1 else [])


def _run_config(cfg: PipelineConfig, run_name: str, callbacks: list[Any] | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    storage = st.resolve(cfg.run.storage_path, cfg.storage)
    if storage.is_s3:
        st.check_bucket(storage.uri, cfg.storage)
    return RunConfig(
        name=run_name,
        storage_path=storage.path,
        storage_filesystem=storage.fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        callbacks=callbacks,
    )


def scaling_config(cfg: PipelineConfig):
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.scaling.placement_strategy,
    )


def progress_queue_here():
    """The queue rank 0 puts its progress on, held by an actor on the driver's node (the one
    that reads it): left to Ray, the actor may land on any node of a cluster, and the loss of
    that node failed every restarted rank 0 at its first put until run.max_failures ran out.
    Ray Train pins its controller to the driver's node in the same way."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def torch_config(cfg: PipelineConfig):
    """The process group Ray Train sets up: backend (nccl for GPU workers, gloo for CPU ones,
    unless scaling.backend says) and the collective timeout."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=cfg.scaling.resolved_backend(), timeout_s=cfg.scaling.timeout_s)


def build_trainer(
    cfg: PipelineConfig,
    dataset: DatasetHandle | Manifest,
    run_name: str,
    run_id: str,
    *,
    progress: Any = None,
    started: float | None = None,
    startup: dict[str, float] | None = None,
    callbacks: list[Any] | None = None,
    loop_callbacks: Sequence[LoopCallback] = (),
):
    """The TorchTrainer of one training run: `pipeline train` fits it, a Tune trial too.

    `dataset`: the run's resolved dataset (a bare manifest is resolved here, once);
    `callbacks`: Ray Train's (RunConfig); `loop_callbacks`: the workers' step and epoch hooks
    (`pipeline.train.callbacks`), for fault drills and tests.
    """
    from ray.train.torch import TorchTrainer

    if not isinstance(dataset, DatasetHandle):
        dataset = DatasetHandle.resolve(cfg.data.uri, dataset, cfg.storage)
    cache = cache_in_workers(cfg, dataset.manifest)
    loop_config = LoopConfig(
        config=cfg,
        dataset=dataset,
        mlflow_run_id=run_id,
        progress=progress,
        cache=cache,
        started_at=started if started is not None else time.time(),
        startup=startup or {},
        callbacks=list(loop_callbacks),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config(cfg),
        scaling_config=scaling_config(cfg),
        run_config=_run_config(cfg, run_name, callbacks),
        datasets=_datasets(cfg, dataset, cache),
        dataset_config=data_config(cfg),
    )


# ---------------------------------------------------------------------------------------------
# The whole job


def run_training(
    cfg: PipelineConfig,
    manifest: Manifest | None = None,
    *,
    on_event: EventSink | None = None,
    loop_callbacks: Sequence[LoopCallback] = (),
) -> TrainingSummary:
    """Train `cfg` end to end and return the finished run's summary; `manifest`, when given, is
    `ensure_dataset`'s for this config; `on_event` gets `TrainingStarted`, then rank 0's
    `StepProgress`, `EpochEnd` and `Phase` events; `loop_callbacks` run on the workers (see
    `pipeline.train.callbacks`). The model is not registered here: see
    `pipeline.registry.register_training`."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import open_mlflow_run

    on_event = on_event or ignore
    started = _process_start()
    cfg = cfg.with_absolute_paths()
    manifest = preflight(cfg, manifest)
    dataset = DatasetHandle.resolve(cfg.data.uri, manifest, cfg.storage)
    startup = {"startup_preflight_s": time.time() - started}
    run_name = cfg.run.name or f"{cfg.tracking.experiment}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_id, experiment_id, completed = open_mlflow_run(cfg, run_name, manifest)
    uri = cfg.tracking.resolved_uri()
    if completed:
        log.info(
            "run %r already finished (MLflow run %s); nothing to do. Use a new run.name to "
            "train again.",
            run_name,
            run_id,
        )
    else:
        init_ray(cfg)
        try:
            check_cluster(cfg)  # a run the cluster cannot hold is refused, not left waiting
        except TrainingError as exc:
            _end_run(MlflowClient(uri), run_id, "FAILED", str(exc))
            raise
        startup["startup_ray_ready_s"] = time.time() - started
        progress_queue = progress_queue_here()
        trainer = build_trainer(
            cfg,
            dataset,
            run_name,
            run_id,
            progress=progress_queue,
            started=started,
            startup=startup,
            loop_callbacks=loop_callbacks,
        )
        log.info(
            "training %s on %s (%s) with %d worker(s), run %r",
            cfg.model.name,
            manifest.name,
            cfg.data.uri,
            cfg.scaling.num_workers,
            run_name,
        )
        on_event(TrainingStarted(run_name, cfg.train.epochs))
        watch = Watch(cfg.run.stall_warn_s, cfg.run.stall_timeout_s)
        client = MlflowClient(uri)
        try:
            result = supervised_fit(
                trainer,
                progress_queue,
                on_event,
                watch,
                on_stop=lambda: _end_run(client, run_id, "KILLED", "stopped by a signal"),
            )
        except Stalled as exc:
            _end_run(client, run_id, "FAILED", str(exc))
            raise TrainingError(f"training run {run_name!r} stopped: {exc}") from None
        except Unrecoverable as exc:
            _end_run(client, run_id, "FAILED", str(exc))
            raise TrainingError(f"training run {run_name!r} failed: {exc}") from None
        except Stopped:
            _end_run(client, run_id, "KILLED", "stopped by a signal")
            log.warning("training run %r stopped; MLflow run %s marked KILLED", run_name, run_id)
            raise
        except Exception as exc:
            _end_run(client, run_id, "FAILED", root_cause(exc))
            raise TrainingError(f"training run {run_name!r} failed: {root_cause(exc)}") from exc
        if result.error is not None:
            _end_run(client, run_id, "FAILED", root_cause(result.error))
            raise TrainingError(f"training run {run_name!r} failed: {root_cause(result.error)}")
    summary = _summary(cfg, run_name, run_id, experiment_id, time.time() - started)
    summary.already_finished = completed
    return summary


def _end_run(client, run_id: str, status: str, reason: str) -> None:
    """Mark the run ended with `status` and say why (a tag the MLflow UI shows)."""
    client.set_tag(run_id, FAILURE_REASON_TAG, reason[:5000])
    client.set_terminated(run_id, status=status)


def _process_start() -> float:
    """When this process started (wall clock): the command's start, imports included."""
    try:  # Linux: start time in clock ticks after boot, and the boot time
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def _summary(cfg: PipelineConfig, run_name: str, run_id: str, experiment_id: str, seconds: float):
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.resolved_uri()
    run = MlflowClient(uri).get_run(run_id)
    summary = TrainingSummary(
        run_name=run_name,
        run_id=run_id,
        experiment_id=experiment_id,
        tracking_uri=uri,
        metrics=dict(run.data.metrics),
        checkpoint_path=None,
        seconds=seconds,
    )
    return summary
