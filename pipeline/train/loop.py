"""The per-worker training function: what Ray Train runs on every worker.

Plain PyTorch except for the numbered Ray Train steps, so the distributed parts stand out:
  (1) the worker's rank and device come from the Train context,
  (2) `prepare_model` wraps the model in DDP,
  (3) each epoch streams this worker's shard of the Ray Dataset,
  (4) metrics are all-reduced so every number is global, not this worker's shard,
  (5) `ray.train.report` checkpoints every epoch (a barrier: every worker calls it equally often),
  (6) a restarted worker resumes from `ray.train.get_checkpoint()`.
MLflow is written by rank 0 only; its run id travels in the checkpoint so a restart continues the
same run, and an epoch already logged is never logged again.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import PipelineConfig
from pipeline.data.shards import Manifest
from pipeline.data.transform import BatchTransform, WorkerCache, iter_split
from pipeline.models.dynamic_conv import set_temperature, temperature_at
from pipeline.models.transfer import freeze_backbone, load_weights, parameter_groups
from pipeline.models.zoo import build_model
from pipeline.tags import COMPLETED_TAG
from pipeline.train.metrics import EpochMeter, global_throughput
from pipeline.train.optim import (
    BatchMixer,
    ModelEma,
    autocast_context,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    make_grad_scaler,
    mixed_loss,
    unwrap_model,
)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class LoopState:
    """Everything a checkpoint restores, besides the modules' own state dicts."""

    epoch: int = 0  # next epoch to run
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_for(cfg: PipelineConfig, manifest: Manifest) -> nn.Module:
    """The configured model for this dataset, with transferred weights when configured."""
    c, h, w = manifest.image.shape
    h, w = cfg.data.resize or (h, w)
    num_classes = cfg.model.num_classes or manifest.num_classes
    model = build_model(
        cfg.model,
        in_channels=cfg.model.in_channels or c,
        num_classes=num_classes,
        image_size=max(h, w),
    )
    if cfg.model.weights:
        load_weights(model, cfg.model.weights, tracking_uri=cfg.tracking.resolved_uri())
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    return model


def steps_per_epoch(cfg: PipelineConfig, manifest: Manifest) -> int:
    """Optimizer steps per epoch: each worker's equal share of train rows, full batches only."""
    rows = manifest.split(cfg.data.train_split).rows // cfg.scaling.num_workers
    return rows // per_worker_batch(cfg)


def per_worker_batch(cfg: PipelineConfig) -> int:
    return cfg.train.batch_size // cfg.scaling.num_workers


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = PipelineConfig.model_validate(loop_config["config"])
    manifest = Manifest.model_validate(loop_config["manifest"])
    progress = loop_config.get("progress")

    entered = time.time()  # startup timeline (rank 0 logs it): worker up, DDP ready
    # (1) who am I, where do I run
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's

    model = model_for(cfg, manifest)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    groups = parameter_groups(model, cfg.train.weight_decay, cfg.model.backbone_lr_scale)
    # (2) DDP
    model = ray.train.torch.prepare_model(model)
    ddp_ready = time.time()
    optimizer = build_optimizer(cfg.train, groups)
    steps = steps_per_epoch(cfg, manifest)
    scheduler = build_scheduler(cfg.train, optimizer, steps)
    scaler = make_grad_scaler(cfg.train.precision, device.type)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    mixer = BatchMixer(
        cfg.train.mixup_alpha, cfg.train.cutmix_alpha, manifest.num_classes, cfg.train.seed + rank
    )
    step_fn = torch.compile(model) if cfg.train.compile else model

    # (6) resume
    state = LoopState(mlflow_run_id=loop_config.get("mlflow_run_id"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        unwrap_model(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved.get("ema"):
            ema.load_state_dict(saved["ema"])
        _set_rng_state(saved["rng"], mixer)
        state = LoopState(saved["epoch"], saved["history"], saved["mlflow_run_id"])

    tracker = _RankZeroTracker(cfg, state.mlflow_run_id) if rank == 0 else None
    if tracker is not None:
        started_at = loop_config.get("started_at", entered)
        tracker.startup = {
            **loop_config.get("startup", {}),
            "startup_worker_entered_s": entered - started_at,
            "startup_ddp_ready_s": ddp_ready - started_at,
        }
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch = per_worker_batch(cfg)
    cache = val_cache = None
    if loop_config.get("cache"):
        augment_seed = cfg.train.seed * 7919 + rank * 104_729 + state.epoch
        resize = cfg.data.resize
        cache = WorkerCache(
            BatchTransform(
                manifest.image, manifest.normalization, cfg.data.augment, augment_seed, resize
            )
        )
        val_cache = WorkerCache(
            BatchTransform(manifest.image, manifest.normalization, None, resize=resize)
        )
    val_batch = max(batch, 256)

    for epoch in range(state.epoch, cfg.train.epochs):
        dy = cfg.model.dynamic
        set_temperature(
            model,
            temperature_at(epoch, dy.temperature_start, dy.temperature_end, dy.temperature_epochs),
        )
        # (3) this worker's shard, reshuffled every epoch
        shuffle_seed = cfg.train.seed * 100_003 + epoch * 101 + rank
        if cache is not None and cache.ready:
            batches = cache.epoch(batch, shuffle_seed)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=batch,
                drop_last=True,
                local_shuffle_buffer_size=max(4 * batch, 1024),
                local_shuffle_seed=shuffle_seed,
                device="cpu" if cache is not None else device,
            )
            if cache is not None:
                batches = cache.fill(batches)
        train = train_one_epoch(
            step_fn,
            model,
            batches,
            optimizer,
            scheduler,
            scaler,
            ema,
            mixer,
            cfg,
            device,
            manifest.num_classes,
            steps,
            progress if rank == 0 else None,
            epoch,
            on_step=lambda i, epoch=epoch: _on_step(
                i, epoch, steps, rank, cfg, loop_config, tracker
            ),
        )
        eval_model = ema.module if ema is not None else model
        if val_cache is not None and val_cache.ready:
            val_batches = val_cache.epoch(val_batch, seed=None, drop_last=False)
        elif val_cache is not None:
            val_batches = val_cache.fill(val_shard.iter_torch_batches(batch_size=val_batch))
        else:
            val_batches = val_shard.iter_torch_batches(batch_size=val_batch, device=device)
        val = evaluate(
            eval_model,
            val_batches,
            cfg,
            device,
            manifest.num_classes,
        )
        row = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_top5": val["top5"],
            "images_per_s": train["images_per_s"],
            "epoch_time_s": train["epoch_time_s"],
            "lr": train["lr"],
        }
        state.history.append(row)
        state.epoch = epoch + 1
        if tracker is not None:
            tracker.log_epoch(row)
            state.mlflow_run_id = tracker.run_id
            if progress is not None:
                progress.put({"kind": "epoch", **row, "epochs": cfg.train.epochs})
        # (5) checkpoint + report: rank 0 writes, everyone reports (a barrier)
        _report(row, state, model, optimizer, scheduler, scaler, ema, mixer, rank == 0)

    if tracker is not None:
        final_model = ema.module if ema is not None else unwrap_model(model)
        tracker.finish(final_model, state.history, manifest, loop_config, progress)


def train_one_epoch(
    step_fn,
    model,
    batches,
    optimizer,
    scheduler,
    scaler,
    ema,
    mixer,
    cfg,
    device,
    num_classes,
    steps,
    progress,
    epoch,
    on_step=None,
) -> dict[str, float]:
    model.train()
    meter = EpochMeter(num_classes, device=device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    started = time.perf_counter()
    last_push = started
    for i, b in enumerate(batches):
        if i >= steps:  # every worker takes exactly `steps` steps (DDP needs equal counts)
            break
        if on_step is not None:
            on_step(i)
        x = b["image"].to(device, memory_format=memory_format, non_blocking=True)
        y = b["label"].to(device, non_blocking=True)
        x, target = mixer(x, y)
        with autocast_context(cfg.train.precision, device.type):
            logits = step_fn(x)
            loss = mixed_loss(logits, target, cfg.train.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip is not None:
            scaler.unscale_(optimizer)
            clip_gradients(model, cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        meter.update(logits.float(), y, loss)
        now = time.perf_counter()
        if progress is not None and now - last_push > 0.5:
            progress.put(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "step": i + 1,
                    "steps": steps,
                    "loss": float(loss.detach()),
                    "elapsed": now - started,
                }
            )
            last_push = now
    elapsed = time.perf_counter() - started
    result = meter.reduce()  # (4) global sums
    result["images_per_s"] = global_throughput(result["count"], elapsed)
    result["epoch_time_s"] = elapsed
    result["lr"] = optimizer.param_groups[0]["lr"]
    return result


@torch.no_grad()
def evaluate(
    model, batches, cfg, device, num_classes, confusion: bool = False, all_workers: bool = True
) -> dict[str, Any]:
    model.eval()
    meter = EpochMeter(num_classes, confusion=confusion, device=device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for b in batches:
        x, y = (b["image"], b["label"]) if isinstance(b, dict) else b
        x, y = x.to(device, memory_format=memory_format), y.to(device)
        with autocast_context(cfg.train.precision, device.type):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        meter.update(logits.float(), y, loss)
    return meter.reduce(all_workers)


def _rng_state(mixer: BatchMixer) -> dict[str, Any]:
    """RNG states in types `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
        "mixer": mixer.generator.bit_generator.state,
    }


def _set_rng_state(state: dict[str, Any], mixer: BatchMixer) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    mixer.generator.bit_generator.state = state["mixer"]


def _report(row, state, model, optimizer, scheduler, scaler, ema, mixer, is_rank0: bool) -> None:
    import ray.train

    # `epochs_done` (1-based) is the time axis of Tune's ASHA scheduler, stable across restarts.
    metrics = {**{k: float(v) for k, v in row.items()}, "epochs_done": state.epoch}
    if not is_rank0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {
                "model": unwrap_model(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": state.epoch,
                "history": state.history,
                "mlflow_run_id": state.mlflow_run_id,
                "rng": _rng_state(mixer),
            },
            Path(d) / CHECKPOINT_FILE,
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"epoch-{state.epoch:04d}",
        )


def _on_step(i, epoch, steps, rank, cfg, loop_config, tracker) -> None:
    if i == 0 and tracker is not None and tracker.first_step_s is None:
        # Seconds from the `pipeline train` process start to the first optimizer step.
        tracker.first_step_s = time.time() - loop_config.get("started_at", time.time())
    _maybe_inject_failure(cfg, epoch, i, steps, rank, loop_config.get("failure_marker"))


def _maybe_inject_failure(
    cfg: PipelineConfig, epoch: int, step: int, steps: int, rank: int, marker: str | None
) -> None:
    """Testing fault tolerance for real: the last worker's process dies (no exception, no
    clean-up) halfway through epoch `run.fail_at_epoch`, once per run (a marker file remembers)."""
    if cfg.run.fail_at_epoch is None or epoch != cfg.run.fail_at_epoch or marker is None:
        return
    if step != steps // 2:
        return
    if rank != cfg.scaling.num_workers - 1 or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"worker {rank} killed at epoch {epoch}\n")
    os._exit(137)


class _RankZeroTracker:
    """MLflow from rank 0: per-epoch metrics, and at the end test metrics, artifacts, the model."""

    def __init__(self, cfg: PipelineConfig, run_id: str | None) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self._started = False
        self._logged: set[int] | None = None
        self.first_step_s: float | None = None
        self.startup: dict[str, float] = {}

    def _start(self) -> None:
        """Open the MLflow run on first use, not before the first step: importing mlflow and
        opening the run takes seconds that the first training step need not wait for."""
        if self._started:
            return
        from pipeline import tracking

        self.run_id = tracking.start_or_resume_run(
            self.cfg.tracking.resolved_uri(), self.cfg.tracking.experiment, run_id=self.run_id
        )
        self._started = True

    def log_epoch(self, row: dict[str, float]) -> None:
        import mlflow

        from pipeline import tracking

        self._start()
        if self._logged is None:  # read once: which epochs a crashed attempt already logged
            self._logged = tracking.logged_epochs(self.run_id, "val_acc")
        if self.first_step_s is not None and not self._logged:
            # Where the time to the first step went: checks, Ray start, then trainer + data start.
            mlflow.log_metrics({"time_to_first_step_s": self.first_step_s, **self.startup})
        if row["epoch"] not in self._logged:
            mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"]
            )
            self._logged.add(row["epoch"])

    def finish(self, model, history, manifest: Manifest, loop_config, progress) -> None:
        import mlflow

        from pipeline import tracking
        from pipeline.model_package import log_pipeline_model

        cfg = self.cfg
        self._start()
        if progress is not None:
            progress.put({"kind": "phase", "text": "evaluating the test split"})
        device = next(model.parameters()).device
        test = evaluate(
            model,
            iter_split(
                cfg.data.uri,
                manifest,
                cfg.data.test_split,
                storage=cfg.storage,
                resize=cfg.data.resize,
            ),
            cfg,
            device,
            manifest.num_classes,
            confusion=True,
            all_workers=False,
        )
        confusion = test.pop("confusion")
        test_metrics = {f"test_{k}": v for k, v in test.items()}
        mlflow.log_metrics({k: float(v) for k, v in test_metrics.items()})
        tracking.log_summary_metrics(history)
        tracking.log_run_artifacts(
            history, confusion, manifest.classes, test_metrics, cfg.to_yaml()
        )
        if cfg.tracking.log_model:
            if progress is not None:
                progress.put({"kind": "phase", "text": "logging the model"})
            log_pipeline_model(unwrap_model(model).cpu().eval(), cfg, manifest)
        mlflow.set_tag(COMPLETED_TAG, "true")
        mlflow.end_run()
        if math.isnan(test_metrics.get("test_acc", float("nan"))):
            raise RuntimeError("the test split produced no predictions")
