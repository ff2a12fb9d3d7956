"""The model zoo: model name -> builder, and each model's size and cost.

`build_model(cfg, in_channels=..., num_classes=...)` turns a `ModelConfig` into a network;
`describe_models()` lists parameters and multiply-adds (MACs) per model, counted by running the
model under `torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory, no
compute), and `pipeline models list` renders that list (`pipeline.cli.display.model_table`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig
from pipeline.errors import UnknownModelError
from pipeline.models import resnet
from pipeline.models.dynamic_conv import DynamicSpec

__all__ = [
    "MODEL_NAMES",
    "UnknownModelError",
    "build_model",
    "count_macs",
    "describe_models",
    "model_family",
]

SMALL_INPUT_MAX_SIDE = 64  # images up to 64x64 get the 3x3/1 stem when small_input is None (auto)

_IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_CIFAR = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110")
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(resnet, name)
    for name in (*_IMAGENET, *_CIFAR, *(f"dy_{n}" for n in (*_IMAGENET, *_CIFAR)))
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def model_family(name: str) -> str:
    """'resnet', 'cifar_resnet', 'dy_resnet' or 'dy_cifar_resnet'."""
    if name not in _BUILDERS:
        raise UnknownModelError(name, MODEL_NAMES)
    return name.rstrip("0123456789")


def build_model(
    cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build `cfg.name` for `in_channels`-channel images and `num_classes` classes.

    `image_size` (the image side in pixels) decides the stem of ImageNet-style nets when
    `cfg.small_input` is None: the 3x3/1 stem for sides up to 64, the 7x7/2 + max-pool one above.
    `cfg.shortcut` applies to CIFAR nets only; `cfg.dynamic` to dy_ nets only.
    """
    family = model_family(cfg.name)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 greyscale, 3 RGB), got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 pixel or None, got {image_size}")
    kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "zero_init_residual": cfg.zero_init_residual,
        "dropout": cfg.dropout,
    }
    if family.endswith("cifar_resnet"):
        kwargs["shortcut"] = cfg.shortcut
    else:
        small = cfg.small_input
        if small is None:
            small = image_size is not None and image_size <= SMALL_INPUT_MAX_SIDE
        kwargs["small_input"] = small
    if family.startswith("dy_"):
        dy = cfg.dynamic
        kwargs["dynamic"] = DynamicSpec(
            num_kernels=dy.num_kernels,
            reduction=dy.reduction,
            temperature=dy.temperature_start,
            replace_1x1=dy.replace_1x1,
        )
    return _BUILDERS[cfg.name](**kwargs)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of a single (C, H, W) image: FlopCounterMode's FLOPs / 2.

    It counts what the model runs (convolutions, including DynamicConv2d's grouped one, linear
    layers, and DynamicConv2d's kernel-aggregation matmul); norms, activations and pooling are not
    counted, as in torchvision's published GFLOPS.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.empty(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def describe_models(
    input_size: Sequence[int] = (3, 224, 224),
    num_classes: int = 1000,
    names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: name, family, params, macs (at batch 1), input_size ("CxHxW").

    Models are built on the meta device, so even resnet152 at 224x224 takes well under a second.
    ImageNet-style nets get the small-input stem when the image side is <= 64 (as in training).
    """
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    c, h, w = (int(v) for v in input_size)
    rows = []
    for name in MODEL_NAMES if names is None else names:
        family = model_family(name)
        with torch.device("meta"):
            model = build_model(
                ModelConfig(name=name), in_channels=c, num_classes=num_classes, image_size=min(h, w)
            )
        rows.append(
            {
                "name": name,
                "family": family,
                "params": sum(p.numel() for p in model.parameters()),
                "macs": count_macs(model, (c, h, w)),
                "input_size": f"{c}x{h}x{w}",
            }
        )
    return rows
