"""The per-worker training function: what Ray Train runs on every worker.

Plain PyTorch except for the numbered Ray Train steps, so the distributed parts stand out:
  (1) the worker's rank and device come from the Train context,
  (2) `prepare_model` wraps the model in DDP,
  (3) each epoch streams this worker's shard of the Ray Dataset (photographs: the next epoch of
      one stream over all the run's epochs),
  (4) metrics are all-reduced so every number is global, not this worker's shard,
  (5) `ray.train.report` checkpoints every epoch (a barrier: every worker calls it equally often),
  (6) a restarted worker resumes from `ray.train.get_checkpoint()`.
MLflow is written by rank 0 only; its run id travels in the checkpoint so a restart continues the
same run, and an epoch already logged is never logged again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import PipelineConfig
from pipeline.data.ingest import EpochBatches
from pipeline.data.shards import Manifest
from pipeline.data.transform import BatchTransform, WorkerCache, iter_split, photo_batches
from pipeline.models.dynamic_conv import set_temperature, temperature_at
from pipeline.models.transfer import freeze_backbone, load_weights, parameter_groups
from pipeline.models.zoo import build_model
from pipeline.tags import COMPLETED_TAG, RESUMED_FROM_METRIC
from pipeline.train.callbacks import LoopCallback, LoopHooks, StepInfo
from pipeline.train.entry import LoopConfig
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
from pipeline.train.state import (
    CheckpointUnreadable,
    TrainState,
    checkpoint_dir_name,
    restore,
)

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def input_shape(cfg: PipelineConfig, manifest: Manifest) -> tuple[int, int, int]:
    """(C, H, W) of what the network sees: the crop's square (`data.crop`, photographs of any
    size), else the stored size, bilinearly resized to `data.resize` when set."""
    c = manifest.image.channels
    if cfg.data.crop is not None:
        return (c, cfg.data.crop.size, cfg.data.crop.size)
    _, h, w = manifest.image.shape
    return (c, *(cfg.data.resize or (h, w)))


def model_for(cfg: PipelineConfig, manifest: Manifest) -> nn.Module:
    """The configured model for this dataset, with transferred weights when configured."""
    c, h, w = input_shape(cfg, manifest)
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


def batches_per_epoch(cfg: PipelineConfig, manifest: Manifest) -> int:
    """Batches (micro-batches when accumulating) per epoch on each worker: its equal share of
    train rows, full batches only."""
    rows = manifest.split(cfg.data.train_split).rows // cfg.scaling.num_workers
    return rows // per_worker_batch(cfg)


def steps_per_epoch(cfg: PipelineConfig, manifest: Manifest) -> int:
    """Optimizer steps per epoch: one per `train.accumulate_steps` batches, and one more for a
    remainder group at the epoch's end. The LR schedules count these steps."""
    return -(-batches_per_epoch(cfg, manifest) // cfg.train.accumulate_steps)


def per_worker_batch(cfg: PipelineConfig) -> int:
    return cfg.train.batch_size // cfg.scaling.num_workers


@dataclass(frozen=True)
class StepOptions:
    """How each step runs on this worker: device, layout, precision, loss and clipping."""

    device: torch.device
    num_classes: int
    steps: int  # optimizer steps per epoch, equal on every worker
    precision: str = "fp32"
    channels_last: bool = False
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    accumulate_steps: int = 1  # batches per optimizer step (gradient accumulation)
    batches: int | None = None  # batches per epoch; None: steps * accumulate_steps

    @classmethod
    def of(cls, cfg: PipelineConfig, manifest: Manifest, device: torch.device) -> StepOptions:
        return cls(
            device=device,
            num_classes=manifest.num_classes,
            steps=steps_per_epoch(cfg, manifest),
            precision=cfg.train.precision,
            channels_last=cfg.train.channels_last,
            label_smoothing=cfg.train.label_smoothing,
            grad_clip=cfg.train.grad_clip,
            accumulate_steps=cfg.train.accumulate_steps,
            batches=batches_per_epoch(cfg, manifest),
        )

    @property
    def micro_batches(self) -> int:
        """Batches per epoch, each one forward and backward pass."""
        return self.batches if self.batches is not None else self.steps * self.accumulate_steps

    def group_size(self, batch: int) -> int:
        """How many batches the optimizer step that batch `batch` belongs to averages over:
        accumulate_steps, or fewer in the remainder group at the epoch's end."""
        start = batch - batch % self.accumulate_steps
        return min(self.accumulate_steps, self.micro_batches - start)

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def configure_device(device: torch.device) -> None:
    """Backend settings for this worker's device: cuDNN picks the fastest convolution algorithms
    for the (fixed) input shapes on the first batches and keeps them."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def worker_model(cfg: PipelineConfig, manifest: Manifest, world: int) -> nn.Module:
    """The model as this worker trains it, before DDP: its memory layout, and SyncBatchNorm
    (statistics over the global batch) when configured and there is more than one worker."""
    model = model_for(cfg, manifest).to(memory_format=memory_format(cfg.train.channels_last))
    if cfg.train.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_state(
    cfg: PipelineConfig, manifest: Manifest, device: torch.device, rank: int, world: int
) -> TrainState:
    """A fresh TrainState for this worker: the model (DDP when distributed), its optimizer,
    schedule, scaler, EMA and mixer, as the config says."""
    import ray.train.torch

    model = worker_model(cfg, manifest, world)
    groups = parameter_groups(model, cfg.train.weight_decay, cfg.model.backbone_lr_scale)
    # (2) DDP
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(cfg.train, groups)
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.train, optimizer, steps_per_epoch(cfg, manifest)),
        scaler=make_grad_scaler(cfg.train.precision, device.type),
        mixer=BatchMixer(
            cfg.train.mixup_alpha,
            cfg.train.cutmix_alpha,
            manifest.num_classes,
            cfg.train.seed + rank,
        ),
        ema=ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None,
    )


def train_loop_per_worker(loop_config: LoopConfig) -> None:
    import ray.train
    import ray.train.torch

    cfg, manifest = loop_config.config, loop_config.manifest
    entered = time.time()  # startup timeline (rank 0 logs it): worker up, DDP ready
    # (1) who am I, where do I run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's
    configure_device(device)

    state = build_state(cfg, manifest, device, rank, world)
    ddp_ready = time.time()
    forward = torch.compile(state.model) if cfg.train.compile else state.model
    opts = StepOptions.of(cfg, manifest, device)

    # (6) resume
    state.mlflow_run_id = loop_config.mlflow_run_id
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        try:
            loaded, skipped = restore(checkpoint, state.load_state_dict)
        except CheckpointUnreadable as exc:
            if rank == 0 and loop_config.progress is not None:  # the driver ends the run
                loop_config.progress.put({"kind": "fatal", "text": str(exc)})
            raise
        for line in skipped:
            log.warning("checkpoint unreadable, resuming from an earlier one: %s", line)
        if skipped and rank == 0:
            log.warning("resumed from %s", loaded)

    tracker = _RankZeroTracker(cfg, state.mlflow_run_id) if rank == 0 else None
    callbacks = list(loop_config.callbacks)
    if tracker is not None and checkpoint is not None:
        # The proof that a restart continued: the last epoch whose checkpoint it loaded.
        tracker.resumed_from = state.epoch - 1
    if tracker is not None:
        tracker.startup = {
            **loop_config.startup,
            "startup_worker_entered_s": entered - loop_config.started_at,
            "startup_ddp_ready_s": ddp_ready - loop_config.started_at,
        }
        callbacks.append(_FirstStepClock(tracker, loop_config.started_at))
        if loop_config.progress is not None:
            callbacks.append(_ProgressFeed(loop_config.progress))
    data = _WorkerData(cfg, manifest, rank, state.epoch, loop_config.cache, device)

    for epoch in range(state.epoch, cfg.train.epochs):
        dy = cfg.model.dynamic
        set_temperature(
            state.model,
            temperature_at(epoch, dy.temperature_start, dy.temperature_end, dy.temperature_epochs),
        )
        train = train_one_epoch(
            state, forward, data.train_batches(epoch), opts, epoch, _Hooks(callbacks, rank, world)
        )
        val = evaluate(
            state.eval_model,
            data.val_batches(),
            opts.num_classes,
            device=device,
            precision=opts.precision,
            memory_format=opts.memory_format,
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
            if loop_config.progress is not None:
                loop_config.progress.put({"kind": "epoch", **row, "epochs": cfg.train.epochs})
        # (5) checkpoint + report: rank 0 writes, everyone reports (a barrier)
        _report(row, state, rank == 0, cfg.run.checkpoint_upload)
        for callback in callbacks:
            callback.on_epoch_end(epoch, rank)

    if tracker is not None:
        tracker.finish(state.eval_model, state.history, loop_config)


class _WorkerData:
    """This worker's train and val batches, epoch by epoch: streamed from its Ray Dataset
    shards, or after the first epoch from its in-memory cache (LoopConfig.cache). Photographs
    (`data.crop`) arrive as uint8 NHWC crops on the worker's device and are converted there
    (`photo_batches`: auto-augment, float, normalise); MixUp/CutMix follow in the step."""

    def __init__(self, cfg, manifest, rank: int, start_epoch: int, cache: bool, device) -> None:
        import ray.train

        self.cfg, self.manifest, self.rank, self.device = cfg, manifest, rank, device
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.batch = per_worker_batch(cfg)
        self.batches_per_epoch = batches_per_epoch(cfg, manifest)
        self._stream: EpochBatches | None = None
        self.val_batch = max(self.batch, 256)
        self.cache = self.val_cache = None
        # uint8 crops go to the GPU through pinned memory (asynchronous copies)
        self._pin = cfg.data.crop is not None and device.type == "cuda"
        if cache:
            augment_seed = cfg.train.seed * 7919 + rank * 104_729 + start_epoch
            resize = cfg.data.resize
            self.cache = WorkerCache(
                BatchTransform(
                    manifest.image, manifest.normalization, cfg.data.augment, augment_seed, resize
                )
            )
            self.val_cache = WorkerCache(
                BatchTransform(manifest.image, manifest.normalization, None, resize=resize)
            )

    def train_batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        # (3) this worker's shard, reshuffled every epoch
        shuffle_seed = self.cfg.train.seed * 100_003 + epoch * 101 + self.rank
        if self.cache is not None and self.cache.ready:
            return self.cache.epoch(self.batch, shuffle_seed)
        if self.cfg.data.crop is not None:
            # Photographs: one stream over the run's epochs, an epoch's batches at a time, so
            # the next epoch's reads are running when this one ends (`pipeline.data.stream`).
            if self._stream is None:
                self._stream = EpochBatches(lambda: self._iter_train(shuffle_seed))
            return self._photos(self._stream.take(self.batches_per_epoch), train=True)
        batches = self._iter_train(shuffle_seed)
        if self.cache is not None:
            return self.cache.fill(batches)
        return batches

    def _iter_train(self, shuffle_seed: int) -> Iterable[Any]:
        # Photographs are shuffled where they are read, before decoding (`PhotoShards`: a
        # seeded window per read task); a local shuffle buffer here would copy every crop again.
        photos = self.cfg.data.crop is not None
        return self.train_shard.iter_torch_batches(
            batch_size=self.batch,
            drop_last=True,
            local_shuffle_buffer_size=None if photos else max(4 * self.batch, 1024),
            local_shuffle_seed=None if photos else shuffle_seed,
            device="cpu" if self.cache is not None else self.device,
            pin_memory=self._pin,
        )

    def val_batches(self) -> Iterable[Any]:
        if self.val_cache is not None and self.val_cache.ready:
            return self.val_cache.epoch(self.val_batch, seed=None, drop_last=False)
        if self.val_cache is not None:
            return self.val_cache.fill(self.val_shard.iter_torch_batches(batch_size=self.val_batch))
        batches = self.val_shard.iter_torch_batches(
            batch_size=self.val_batch,
            device=self.device,
            pin_memory=self._pin,
        )
        return self._photos(batches, train=False)

    def _photos(self, batches: Iterable[Any], *, train: bool) -> Iterable[Any]:
        """Photographs' uint8 crops -> normalised float on this device; other datasets' batches
        come normalised from Ray Data already."""
        crop = self.cfg.data.crop
        if crop is None:
            return batches
        return photo_batches(
            batches,
            self.manifest.normalization,
            policy=crop.auto_augment if train else "none",
            channels_last=self.cfg.train.channels_last,
        )


def train_one_epoch(
    state: TrainState,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    opts: StepOptions,
    epoch: int,
    hooks: _Hooks | None = None,
) -> dict[str, float]:
    """One epoch of exactly `opts.steps` optimizer steps; `forward` is the model, or its
    torch.compile'd wrapper. Returns global loss/acc, images_per_s, epoch_time_s and the LR.
    With `opts.accumulate_steps` > 1 the steps accumulate gradients over groups of batches."""
    if opts.accumulate_steps > 1:
        return _accumulating_epoch(state, forward, batches, opts, epoch, hooks)
    state.model.train()
    meter = EpochMeter(opts.num_classes, device=opts.device)
    started = time.perf_counter()
    loss = None
    for i, b in enumerate(batches):
        if i >= opts.steps:  # every worker takes exactly `steps` steps (DDP needs equal counts)
            break
        if hooks is not None:
            hooks.step(epoch, i, opts.steps, loss)
        x = b["image"].to(opts.device, memory_format=opts.memory_format, non_blocking=True)
        y = b["label"].to(opts.device, non_blocking=True)
        loss, logits = _step(state, forward, x, y, opts)
        meter.update(logits.float(), y, loss)
    return _epoch_result(state, meter, started, opts)


def _accumulating_epoch(
    state: TrainState,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
    opts: StepOptions,
    epoch: int,
    hooks: _Hooks | None,
) -> dict[str, float]:
    """`train_one_epoch` with gradient accumulation: `opts.micro_batches` batches, an optimizer
    step at the end of every group of `opts.accumulate_steps` (and of the remainder group).
    Hooks see optimizer steps, called before each group's first batch."""
    state.model.train()
    meter = EpochMeter(opts.num_classes, device=opts.device)
    started = time.perf_counter()
    loss = None
    for i, b in enumerate(batches):
        if i >= opts.micro_batches:  # equal counts on every worker, as in train_one_epoch
            break
        if hooks is not None and i % opts.accumulate_steps == 0:
            hooks.step(epoch, i // opts.accumulate_steps, opts.steps, loss)
        x = b["image"].to(opts.device, memory_format=opts.memory_format, non_blocking=True)
        y = b["label"].to(opts.device, non_blocking=True)
        loss, logits = _micro_step(state, forward, x, y, opts, i)
        meter.update(logits.float(), y, loss)
    return _epoch_result(state, meter, started, opts)


def _epoch_result(
    state: TrainState, meter: EpochMeter, started: float, opts: StepOptions
) -> dict[str, float]:
    if opts.device.type == "cuda":  # kernels run asynchronously: count the time they take
        torch.cuda.synchronize(opts.device)
    elapsed = time.perf_counter() - started
    result = meter.reduce()  # (4) global sums
    result["images_per_s"] = global_throughput(result["count"], elapsed)
    result["epoch_time_s"] = elapsed
    result["lr"] = state.optimizer.param_groups[0]["lr"]
    return result


def _step(state: TrainState, forward, x, y, opts: StepOptions):
    """One optimizer step: mix, forward under autocast, scaled backward, clip, step, EMA."""
    x, target = state.mixer(x, y)
    with autocast_context(opts.precision, opts.device.type):
        logits = forward(x)
        loss = mixed_loss(logits, target, opts.label_smoothing)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    _optimizer_step(state, opts)
    return loss, logits


def _optimizer_step(state: TrainState, opts: StepOptions) -> None:
    """After the backward pass(es): unscale and clip, step, update the scaler, the schedule
    and the EMA."""
    if opts.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        clip_gradients(state.model, opts.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model)


def _micro_step(state: TrainState, forward, x, y, opts: StepOptions, batch: int):
    """One batch of an accumulation group: its loss, divided by the group's size so the
    accumulated gradient is the mean over the group's samples, is scaled and backpropagated;
    DDP all-reduces only on the group's last batch (`no_sync` before). The group's last batch
    then unscales, clips, steps, updates the scaler, the schedule and the EMA, once per group.
    Returns the batch's own (undivided) loss for the metrics."""
    size = opts.group_size(batch)
    position = batch % opts.accumulate_steps
    last = position == size - 1
    if position == 0:
        state.optimizer.zero_grad(set_to_none=True)
    x, target = state.mixer(x, y)
    # DDP decides in the forward pass whether the backward all-reduces: both go inside no_sync.
    with _no_sync(state.model, skip=not last):
        with autocast_context(opts.precision, opts.device.type):
            logits = forward(x)
            loss = mixed_loss(logits, target, opts.label_smoothing)
        state.scaler.scale(loss / size).backward()
    if last:
        _optimizer_step(state, opts)
    return loss, logits


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's `no_sync()` (gradients stay local) when `skip`, else nothing."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    num_classes: int,
    *,
    device: torch.device,
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.contiguous_format,
    confusion: bool = False,
    all_workers: bool = True,
) -> dict[str, Any]:
    """Loss, top-1/top-5 (and the confusion matrix) of `model` over `batches`, which are dicts
    (image, label) or (image, label) pairs; global over the workers unless `all_workers=False`."""
    model.eval()
    meter = EpochMeter(num_classes, confusion=confusion, device=device)
    for b in batches:
        x, y = (b["image"], b["label"]) if isinstance(b, dict) else b
        x, y = x.to(device, memory_format=memory_format), y.to(device)
        with autocast_context(precision, device.type):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        meter.update(logits.float(), y, loss)
    return meter.reduce(all_workers)


def _report(row: dict[str, float], state: TrainState, is_rank0: bool, upload: str = "sync") -> None:
    import ray.train

    # `epochs_done` (1-based) is the time axis of Tune's ASHA scheduler, stable across restarts.
    metrics = {**{k: float(v) for k, v in row.items()}, "epochs_done": state.epoch}
    if upload == "async":
        _report_async(metrics, state, is_rank0)
        return
    if not is_rank0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        state.save(d)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=checkpoint_dir_name(state.epoch),
        )


def _report_async(metrics: dict[str, float], state: TrainState, is_rank0: bool) -> None:
    """`run.checkpoint_upload=async`: report returns once rank 0 has written the checkpoint
    locally; a Ray Train thread uploads it (one at a time, in report order) and then deletes the
    directory, so it must outlive this call: a mkdtemp, not a TemporaryDirectory. Ray waits for
    pending uploads when the loop returns, and an upload's failure fails the run."""
    import ray.train

    mode = ray.train.CheckpointUploadMode.ASYNC
    if not is_rank0:  # the same mode on every rank: reports stay in step
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=mode)
        return
    d = tempfile.mkdtemp(prefix=f"checkpoint-epoch-{state.epoch:04d}-")
    state.save(d)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(d),
        checkpoint_dir_name=checkpoint_dir_name(state.epoch),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


class _Hooks:
    """The step callbacks of one worker, with what each needs to know about where it is."""

    def __init__(self, callbacks: list[LoopCallback], rank: int, world: int) -> None:
        self.callbacks, self.rank, self.world = callbacks, rank, world

    def step(self, epoch: int, step: int, steps: int, last_loss: torch.Tensor | None) -> None:
        if not self.callbacks:
            return
        info = StepInfo(epoch, step, steps, self.rank, self.world, last_loss)
        for callback in self.callbacks:
            callback.on_step(info)


class _FirstStepClock(LoopHooks):
    """Seconds from the `pipeline train` process start to the first optimizer step (rank 0)."""

    def __init__(self, tracker: _RankZeroTracker, started_at: float) -> None:
        self.tracker, self.started_at = tracker, started_at

    def on_step(self, info: StepInfo) -> None:
        if info.step == 0 and self.tracker.first_step_s is None:
            self.tracker.first_step_s = time.time() - self.started_at


class _ProgressFeed(LoopHooks):
    """Step messages for the live display, at most two a second (each costs a host sync)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.epoch_started = self.last_push = 0.0

    def on_step(self, info: StepInfo) -> None:
        now = time.perf_counter()
        if info.step == 0:
            self.epoch_started = self.last_push = now
            return
        if now - self.last_push > 0.5 and info.last_loss is not None:
            self.progress.put(
                {
                    "kind": "step",
                    "epoch": info.epoch,
                    "step": info.step,
                    "steps": info.steps,
                    "loss": float(info.last_loss.detach()),
                    "elapsed": now - self.epoch_started,
                }
            )
            self.last_push = now


class _RankZeroTracker:
    """MLflow from rank 0: per-epoch metrics, and at the end test metrics, artifacts, the model."""

    def __init__(self, cfg: PipelineConfig, run_id: str | None) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self._started = False
        self._logged: set[int] | None = None
        self.first_step_s: float | None = None
        self.startup: dict[str, float] = {}
        self.resumed_from: int | None = None  # set when this attempt loaded a checkpoint

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
        if self.resumed_from is not None:  # once per restart, at the epoch it went on with
            mlflow.log_metric(RESUMED_FROM_METRIC, self.resumed_from, step=row["epoch"])
            self.resumed_from = None
        if row["epoch"] not in self._logged:
            mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"]
            )
            self._logged.add(row["epoch"])

    def finish(self, model: nn.Module, history: list[dict[str, float]], loop: LoopConfig) -> None:
        import mlflow

        from pipeline import tracking
        from pipeline.model_package import log_pipeline_model

        cfg, manifest, progress = self.cfg, loop.manifest, loop.progress
        self._start()
        if progress is not None:
            progress.put({"kind": "phase", "text": "evaluating the test split"})
        test = evaluate(
            model,
            iter_split(
                loop.dataset.uri,
                manifest,
                cfg.data.test_split,
                storage=cfg.storage,
                resize=cfg.data.resize,
                crop=cfg.data.crop,
                device=next(model.parameters()).device,
            ),
            manifest.num_classes,
            device=next(model.parameters()).device,
            precision=cfg.train.precision,
            memory_format=memory_format(cfg.train.channels_last),
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
