"""Optimisation building blocks for the training loop: nothing here knows about Ray or the data.

Optimizer and LR schedule from `TrainConfig`, batch mixing (MixUp / CutMix) as small pure
functions, the matching soft-target loss, an EMA of the weights, mixed-precision contexts and
gradient clipping. The loop in `loop.py` composes them; each is tested on its own.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from pipeline.config import TrainConfig

# ----------------------------------------------------------------------------------------------
# Optimizer


def build_optimizer(train_cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over `param_groups`.

    Each group is a dict with "params", "weight_decay" and optionally "lr_scale", a multiplier on
    `train_cfg.lr` for that group (a lower backbone LR for transfer learning). The scale stays in
    the group so the schedulers below can give every group its own peak LR.
    """
    if not param_groups:
        raise ValueError("build_optimizer: no parameter groups (is every parameter frozen?)")
    groups = []
    for group in param_groups:
        scale = float(group.get("lr_scale", 1.0))
        groups.append({**group, "lr_scale": scale, "lr": train_cfg.lr * scale})
    if train_cfg.optimizer == "sgd":
        # Nesterov needs momentum > 0; with momentum 0 it would raise deep inside torch.
        nesterov = train_cfg.nesterov and train_cfg.momentum > 0
        return torch.optim.SGD(
            groups,
            lr=train_cfg.lr,
            momentum=train_cfg.momentum,
            nesterov=nesterov,
            weight_decay=train_cfg.weight_decay,
        )
    if train_cfg.optimizer == "adamw":
        # The explicit default matters: AdamW's own is 0.01, not the configured value.
        return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r}: expected 'sgd' or 'adamw'")


# ----------------------------------------------------------------------------------------------
# LR schedules: all are stepped once per optimizer step, never per epoch.

# OneCycle's rise phase when no warm-up is configured. torch's default is 0.3; short CIFAR
# recipes (airbench, the super-convergence ResNet runs) peak after roughly a fifth to a quarter
# of training, and a shorter rise leaves more steps for the annealing phase that does the work.
ONECYCLE_DEFAULT_PCT_START = 0.25


def build_scheduler(
    train_cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> LRScheduler:
    """The LR schedule named by `train.schedule`, in optimizer steps.

    onecycle: torch's OneCycleLR, peak LR per group = lr * lr_scale, rise over warmup_epochs (or
      a quarter of training); momentum is not cycled so `train.momentum` means what it says.
    cosine: linear warm-up over warmup_epochs, then cosine to 0 at the last step.
    step: multiply by gamma every step_size epochs.
    constant: optional linear warm-up, then the configured LR.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"build_scheduler: steps_per_epoch must be >= 1 (got {steps_per_epoch})")
    total = train_cfg.epochs * steps_per_epoch
    warmup = round(train_cfg.warmup_epochs * steps_per_epoch)
    if train_cfg.schedule in ("onecycle", "cosine") and train_cfg.warmup_epochs >= train_cfg.epochs:
        raise ValueError(
            f"train.warmup_epochs ({train_cfg.warmup_epochs}) must be less than train.epochs "
            f"({train_cfg.epochs}) for the {train_cfg.schedule} schedule"
        )
    if train_cfg.schedule == "onecycle":
        pct = train_cfg.warmup_epochs / train_cfg.epochs
        return OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=pct if train_cfg.warmup_epochs > 0 else ONECYCLE_DEFAULT_PCT_START,
            cycle_momentum=False,
        )
    # LambdaLR multiplies each group's own initial LR, so lr_scale survives every schedule below.
    factor: Callable[[int], float]
    if train_cfg.schedule == "cosine":
        factor = _warmup_cosine(warmup, total)
    elif train_cfg.schedule == "step":
        factor = _step_decay(train_cfg.step_size * steps_per_epoch, train_cfg.gamma)
    elif train_cfg.schedule == "constant":
        factor = _warmup_constant(warmup)
    else:
        raise ValueError(f"train.schedule={train_cfg.schedule!r}: unknown schedule")
    return LambdaLR(optimizer, factor)


def _warmup_factor(step: int, warmup: int) -> float:
    # (step + 1) / warmup: the first step already moves (a zero LR step would be wasted) and the
    # last warm-up step reaches the full LR.
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _warmup_constant(warmup: int) -> Callable[[int], float]:
    return lambda step: _warmup_factor(step, warmup)


def _step_decay(period: int, gamma: float) -> Callable[[int], float]:
    return lambda step: gamma ** (step // period)


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------------------------
# Batch mixing (MixUp, CutMix). Scalars (lambda, box, permutation) come from a numpy Generator:
# torch's Beta sampler takes no generator, and one seeded source keeps a run reproducible.


def mixup(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, generator: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018): blend each sample with a partner, lambda ~ Beta(alpha, alpha)."""
    lam = float(generator.beta(alpha, alpha))
    perm = _partner_index(x.shape[0], generator, x.device)
    mixed = x * lam + x[perm] * (1.0 - lam)
    return mixed, _mix_targets(y_onehot, perm, lam)


def cutmix(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, generator: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019): paste a partner's box; targets weighted by the box's real area.

    The box is clipped at the image border, so its area is often smaller than 1 - lambda; the
    target weight is recomputed from the pasted area so labels match pixels exactly.
    """
    height, width = x.shape[-2], x.shape[-1]
    lam = float(generator.beta(alpha, alpha))
    top, bottom, left, right = cutmix_box(height, width, lam, generator)
    perm = _partner_index(x.shape[0], generator, x.device)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    lam_area = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, _mix_targets(y_onehot, perm, lam_area)


def cutmix_box(
    height: int, width: int, lam: float, generator: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of area ~(1 - lam) at a uniform centre, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(generator.integers(height)), int(generator.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def _partner_index(n: int, generator: np.random.Generator, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(generator.permutation(n)).to(device)


def _mix_targets(y: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    return y * lam + y[perm] * (1.0 - lam)


def soft_target_loss(
    logits: torch.Tensor, soft_targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy against probability targets, smoothed exactly like hard labels.

    Smoothing mixes the target with the uniform distribution: t' = (1 - ls) * t + ls / C, the
    same rule `F.cross_entropy(..., label_smoothing=ls)` applies to class indices, so one-hot
    targets give the same loss as their hard labels.
    """
    num_classes = logits.shape[-1]
    # In float32 whatever autocast made the logits: bf16 keeps ~3 significant digits, which
    # rounds mixed targets (1/3 -> 0.3340) and the log-probabilities.
    targets = soft_targets.float() * (1.0 - label_smoothing) + label_smoothing / num_classes
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mixed_loss(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy for either hard labels (integer) or soft targets (float), same smoothing."""
    if target.is_floating_point():
        return soft_target_loss(logits, target, label_smoothing)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class BatchMixer:
    """Applies MixUp or CutMix to a batch (a fair coin picks one when both alphas are > 0).

    With both alphas 0 it returns the batch and its hard labels untouched, so the loop can call
    it unconditionally. Give each worker its own seed (e.g. seed + rank) so the shards mix
    differently.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int = 0):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("train.mixup_alpha and train.cutmix_alpha must be >= 0")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.num_classes = num_classes
        self.generator = np.random.default_rng(seed)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, class indices) -> (images, targets): hard labels when off, soft when on."""
        if not self.enabled:
            return x, y
        y_onehot = F.one_hot(y, self.num_classes).to(torch.float32)
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or self.generator.random() < 0.5
        )
        if use_cutmix:
            return cutmix(x, y_onehot, self.cutmix_alpha, self.generator)
        return mixup(x, y_onehot, self.mixup_alpha, self.generator)


# ----------------------------------------------------------------------------------------------
# Exponential moving average of the weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ModelEma:
    """EMA of a model's weights, ema = decay * ema + (1 - decay) * weights, after every step.

    Buffers (BatchNorm running statistics) are copied rather than averaged: they are already
    running averages, and copying keeps them consistent with recent weights. Every DDP rank holds
    identical weights, so each rank's EMA is identical too; evaluate `ema.module`.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) (got {decay})")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self._pairs: _EmaPairs | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp over every parameter and one fused copy of every buffer: a constant
        handful of kernel launches per step, not one or two per tensor."""
        pairs = self._pairs_of(unwrap_model(model))
        if pairs.ema_params:
            torch._foreach_lerp_(pairs.ema_params, pairs.params, 1.0 - self.decay)
        if pairs.ema_buffers:
            torch._foreach_copy_(pairs.ema_buffers, pairs.buffers)
        self.num_updates += 1

    def _pairs_of(self, source: nn.Module) -> _EmaPairs:
        # Built once per source model: the optimizer and the forward pass update its
        # parameters and buffers in place, never replace them.
        if self._pairs is None or self._pairs.source is not source:
            self._pairs = _EmaPairs.of(self.module, source)
        return self._pairs

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "module": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


@dataclass
class _EmaPairs:
    """The EMA's tensors beside the source model's, in matching order."""

    source: nn.Module
    ema_params: list[torch.Tensor]
    params: list[torch.Tensor]
    ema_buffers: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @classmethod
    def of(cls, ema: nn.Module, source: nn.Module) -> _EmaPairs:
        params = [
            (e, p)
            for e, p in zip(ema.parameters(), source.parameters(), strict=True)
            if e.is_floating_point()
        ]
        buffers = list(zip(ema.buffers(), source.buffers(), strict=True))
        return cls(
            source,
            [e for e, _ in params],
            [p for _, p in params],
            [e for e, _ in buffers],
            [b for _, b in buffers],
        )


# ----------------------------------------------------------------------------------------------
# Mixed precision and gradient clipping


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for bf16 (CPU or CUDA) and fp16 (CUDA only); a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device_type != "cuda":
            raise ValueError(
                f"train.precision=fp16 needs a CUDA device (got {device_type!r}); use bf16 on CPU"
            )
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    raise ValueError(f"train.precision={precision!r}: expected 'fp32', 'bf16' or 'fp16'")


def make_grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (bf16 has fp32's range and needs none)."""
    enabled = precision == "fp16" and device_type == "cuda"
    return torch.amp.GradScaler(device_type, enabled=enabled)


def clip_gradients(model: nn.Module, max_norm: float | None) -> torch.Tensor | None:
    """Clip the global L2 norm of the gradients to `max_norm`; returns the norm before clipping.

    With a GradScaler, call `scaler.unscale_(optimizer)` first, or the norm is the scaled one.
    """
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
