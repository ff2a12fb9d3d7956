"""`TrainState`: everything a checkpoint holds, saved and restored in one place.

The modules (model, optimizer, LR schedule, grad scaler, EMA), the batch mixer's generator, the
loop's progress (next epoch, per-epoch history, the MLflow run id) and every RNG a step draws
from (torch CPU, torch CUDA, numpy, Python). `state_dict()` holds only types that
`torch.load(weights_only=True)` accepts, so a checkpoint is never unpickled as code.
"""

from __future__ import annotations

import posixpath
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.train.optim import BatchMixer, ModelEma, unwrap_model

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR = re.compile(r"epoch-(\d+)")  # `epoch-0003`: the state after 3 epochs


def checkpoint_dir_name(epochs_done: int) -> str:
    return f"epoch-{epochs_done:04d}"


class CheckpointUnreadable(TrainingError):
    """Neither the latest checkpoint nor any earlier one of the run can be read: a restart
    would fail the same way every time, so the run ends instead of retrying."""


@dataclass
class TrainState:
    model: nn.Module  # as trained: DDP-wrapped on several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    mixer: BatchMixer
    ema: ModelEma | None = None
    epoch: int = 0  # the next epoch to run
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and logged: the EMA weights when kept, else the model's."""
        return self.ema.module if self.ema is not None else unwrap_model(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "history": self.history,
            "mlflow_run_id": self.mlflow_run_id,
            "rng": rng_state(self.mixer),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore from `state_dict()`'s output as read by `read_checkpoint` (CPU tensors)."""
        unwrap_model(self.model).load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # A checkpoint from a run without fp16 holds a disabled scaler's empty state; loading it
        # into an enabled scaler raises. Its fresh scale is the right start.
        if saved["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        set_rng_state(saved["rng"], self.mixer)
        self.epoch = int(saved["epoch"])
        self.history = list(saved["history"])
        self.mlflow_run_id = saved["mlflow_run_id"]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CHECKPOINT_FILE
        torch.save(self.state_dict(), path)
        return path


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's contents with every tensor on the CPU, whatever device wrote it: each
    module moves its own tensors to its device as it loads them, and RNG states must stay CPU
    tensors (`torch.set_rng_state` refuses a GPU one)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def rng_state(mixer: BatchMixer) -> dict[str, Any]:
    """RNG states in types `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # Only when this process has used CUDA: asking an unused one would initialise it.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
        "mixer": mixer.generator.bit_generator.state,
    }


def set_rng_state(state: dict[str, Any], mixer: BatchMixer) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    mixer.generator.bit_generator.state = state["mixer"]


def restore(checkpoint, load: Callable[[dict[str, Any]], None]) -> tuple[str, list[str]]:
    """Load `checkpoint` (a `ray.train.Checkpoint`) through `load`, or, when it cannot be read
    (truncated, corrupt, a file missing, contents that do not fit), the newest earlier
    `epoch-NNNN` checkpoint beside it that can: (the path loaded, one line per checkpoint
    skipped). Raises `CheckpointUnreadable` naming every checkpoint tried when none loads.

    Ray registers a checkpoint only once its upload finished, so an unreadable one was damaged
    afterwards (storage, a person); retrying it would fail on every restart, endlessly under
    `run.max_failures: -1`."""
    skipped = []
    for candidate in _restore_candidates(checkpoint):
        try:
            with candidate.as_directory() as d:
                load(read_checkpoint(d))
            return candidate.path, skipped
        except Exception as exc:  # whatever reading or loading raised: try the one before
            skipped.append(f"{candidate.path}: {type(exc).__name__}: {exc}"[:500])
    raise CheckpointUnreadable(
        "cannot resume: no checkpoint of this run can be read (" + "; ".join(skipped) + "); "
        "remove the damaged checkpoint directories, or start over with a new run.name"
    )


def _restore_candidates(checkpoint) -> Iterator[Any]:
    """`checkpoint`, then its older `epoch-NNNN` siblings, newest first."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    yield checkpoint
    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    latest = CHECKPOINT_DIR.fullmatch(name)
    if latest is None:
        return
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return
    older = []
    for info in infos:
        match = CHECKPOINT_DIR.fullmatch(posixpath.basename(info.path))
        if info.type == pafs.FileType.Directory and match and match[1] < latest[1]:
            older.append((int(match[1]), info.path))
    for _, path in sorted(older, reverse=True):
        yield Checkpoint(path, filesystem=checkpoint.filesystem)
