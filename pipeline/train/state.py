"""`TrainState`: everything a checkpoint holds, saved and restored in one place.

The modules (model, optimizer, LR schedule, grad scaler, EMA), the batch mixer's generator, the
loop's progress (next epoch, per-epoch history, the MLflow run id) and every RNG a step draws
from (torch CPU, torch CUDA, numpy, Python). `state_dict()` holds only types that
`torch.load(weights_only=True)` accepts, so a checkpoint is never unpickled as code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.train.optim import BatchMixer, ModelEma, unwrap_model

CHECKPOINT_FILE = "checkpoint.pt"


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
