"""Driver side of `pipeline train`: pre-flight checks, Ray, the TorchTrainer, the live display.

Everything that can be checked without a worker is checked first (config, dataset manifest and
shards, model name, tracking server), so a mistake costs seconds, not a cluster start-up.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline import storage as st
from pipeline.config import PipelineConfig
from pipeline.data.shards import Manifest
from pipeline.data.validate import ensure_dataset
from pipeline.errors import TrainingError, root_cause
from pipeline.tags import (
    COMPLETED_TAG,
    CONFIG_DIGEST_TAG,
    DATASET_DIGEST_TAG,
    KIND_TAG,
    MANIFEST_ARTIFACT,
    RUN_NAME_TAG,
)
from pipeline.train.callbacks import LoopCallback
from pipeline.train.entry import DatasetHandle, LoopConfig, train_loop_per_worker
from pipeline.train.loop import model_for, per_worker_batch, steps_per_epoch
from pipeline.train.ray_runtime import init_ray

_IMPORTED_AT = time.time()


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

    @property
    def run_url(self) -> str:
        return run_link(self.tracking_uri, self.experiment_id, self.run_id)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a user finds a run: its page on a tracking server, or how to browse a local store."""
    base = tracking_uri.rstrip("/")
    if base.startswith("http"):
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base} (run {run_id}; browse with `mlflow ui --backend-store-uri {base}`)"


# ---------------------------------------------------------------------------------------------
# Pre-flight


def preflight(
    cfg: PipelineConfig, console: Console | None = None, manifest: Manifest | None = None
) -> Manifest:
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
            "train": photo_dataset(
                dataset.uri, manifest, split.train_split, train=True, seed=cfg.train.seed, **common
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


def _scaling_config(cfg: PipelineConfig):
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources,
    )


def torch_config(cfg: PipelineConfig):
    """The process group Ray Train sets up: backend (nccl for GPU workers, gloo for CPU ones,
    unless scaling.backend says) and the collective timeout."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=cfg.scaling.resolved_backend(), timeout_s=cfg.scaling.timeout_s)


# ---------------------------------------------------------------------------------------------
# MLflow run of a training run


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

    from pipeline import tracking

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
        **tracking.standard_tags(),
        RUN_NAME_TAG: run_name,
        DATASET_DIGEST_TAG: manifest.digest,
        CONFIG_DIGEST_TAG: cfg.digest(),
        **(tags or {}),
    }
    run_id = tracking.start_or_resume_run(
        uri,
        cfg.tracking.experiment,
        run_id=existing.info.run_id if existing else None,
        run_name=run_name,
        tags=tags,
    )
    completed = existing is not None and existing.data.tags.get(COMPLETED_TAG) == "true"
    if not completed:
        tracking.log_params_flat(params if params is not None else cfg.to_dict())
        tracking.log_dataset_input(
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


# ---------------------------------------------------------------------------------------------
# Live display


class LiveDisplay:
    """Epoch lines plus a progress bar, fed by rank 0 through a Ray queue."""

    def __init__(self, console: Console, epochs: int, start_epoch: int = 0) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            # Every redraw costs driver CPU, which on a small machine is taken from the workers:
            # an epoch bar needs no more than two a second (rich's default is ten).
            refresh_per_second=2,
        )
        self.epochs = self.progress.add_task(
            "epochs", total=epochs, completed=start_epoch, status=""
        )
        self.steps = self.progress.add_task("steps", total=None, status="starting workers")
        self.first_step_at: float | None = None

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("kind")
        if kind == "step":
            if self.first_step_at is None:
                self.first_step_at = time.time()
            rate = msg["step"] / max(msg["elapsed"], 1e-9)
            self.progress.update(
                self.steps,
                total=msg["steps"],
                completed=msg["step"],
                description=f"epoch {msg['epoch'] + 1}",
                status=f"loss {msg['loss']:.3f}  {rate:.1f} steps/s",
            )
        elif kind == "epoch":
            self.progress.update(self.epochs, completed=msg["epoch"] + 1)
            self.console.print(
                f"epoch {msg['epoch'] + 1:>3}/{msg['epochs']}  "
                f"train loss {msg['train_loss']:.4f} acc {msg['train_acc']:.4f} | "
                f"val loss {msg['val_loss']:.4f} acc {msg['val_acc']:.4f} "
                f"top5 {msg['val_top5']:.4f} | {msg['images_per_s']:,.0f} img/s  "
                f"{msg['epoch_time_s']:.1f}s  lr {msg['lr']:.4f}",
                highlight=False,
            )
        elif kind == "phase":
            self.progress.update(self.steps, status=msg["text"])

    def __enter__(self) -> LiveDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _next_message(progress_queue, timeout: float | None) -> dict[str, Any] | None:
    """The next progress message, waiting up to `timeout` s (None: don't wait); None if none."""
    try:
        if timeout is None:
            return progress_queue.get_nowait()
        return progress_queue.get(timeout=timeout)
    except (queue.Empty, Exception) as exc:  # ray's queue raises its own Empty
        if not isinstance(exc, queue.Empty) and type(exc).__name__ != "Empty":
            raise
        return None


def _fit_with_display(trainer, progress_queue, display: LiveDisplay):
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    with display:
        # Block on the queue (each wake-up is a round trip to its actor, CPU the workers could
        # use); once training has ended, drain what is left.
        while thread.is_alive():
            msg = _next_message(progress_queue, timeout=1.0)
            if msg is not None:
                display.handle(msg)
        while (msg := _next_message(progress_queue, timeout=None)) is not None:
            display.handle(msg)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


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
        scaling_config=_scaling_config(cfg),
        run_config=_run_config(cfg, run_name, callbacks),
        datasets=_datasets(cfg, dataset, cache),
    )


# ---------------------------------------------------------------------------------------------
# The whole job


def run_training(
    cfg: PipelineConfig,
    console: Console | None = None,
    manifest: Manifest | None = None,
    *,
    loop_callbacks: Sequence[LoopCallback] = (),
) -> TrainingSummary:
    """Train `cfg` end to end; `manifest`, when given, is `ensure_dataset`'s for this config;
    `loop_callbacks` run on the workers (see `pipeline.train.callbacks`)."""
    from mlflow.tracking import MlflowClient
    from ray.util.queue import Queue

    console = console or Console(stderr=True)
    started = _process_start()
    cfg = cfg.with_absolute_paths()
    manifest = preflight(cfg, console, manifest)
    dataset = DatasetHandle.resolve(cfg.data.uri, manifest, cfg.storage)
    startup = {"startup_preflight_s": time.time() - started}
    run_name = cfg.run.name or f"{cfg.tracking.experiment}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_id, experiment_id, completed = open_mlflow_run(cfg, run_name, manifest)
    uri = cfg.tracking.resolved_uri()
    if completed:
        console.print(
            f"run {run_name!r} already finished (MLflow run {run_id}); nothing to do. "
            "Use a new run.name to train again."
        )
    else:
        init_ray(cfg)
        startup["startup_ray_ready_s"] = time.time() - started
        progress_queue = Queue()
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
        console.print(
            f"training {cfg.model.name} on {manifest.name} ({cfg.data.uri}) with "
            f"{cfg.scaling.num_workers} worker(s), run {run_name!r}"
        )
        display = LiveDisplay(console, cfg.train.epochs)
        try:
            result = _fit_with_display(trainer, progress_queue, display)
        except Exception as exc:
            MlflowClient(uri).set_terminated(run_id, status="FAILED")
            raise TrainingError(f"training run {run_name!r} failed: {root_cause(exc)}") from exc
        if result.error is not None:
            MlflowClient(uri).set_terminated(run_id, status="FAILED")
            raise TrainingError(f"training run {run_name!r} failed: {root_cause(result.error)}")
    return _summary(cfg, run_name, run_id, experiment_id, time.time() - started)


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
    if cfg.registry.model_name and cfg.tracking.log_model:
        from pipeline.registry import register_run_model

        version = register_run_model(cfg, run_id)
        summary.model_version, summary.registered_name = str(version.version), version.name
    return summary
