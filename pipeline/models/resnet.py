"""ResNets built on torchvision's blocks: ImageNet-style 18-152, CIFAR-style 6n+2, and dy_ variants.

- ImageNet-style (He et al., "Deep Residual Learning for Image Recognition", 2015, Table 1):
  `resnet18` ... `resnet152` use `torchvision.models.resnet.BasicBlock` / `Bottleneck` and the same
  module names as torchvision, so state dicts load both ways with strict=True. `small_input=True`
  swaps the 7x7/2 stem + max-pool for a 3x3/1 stem for 8x8 to 64x64 images (same keys, a 3x3
  conv1.weight).
- CIFAR-style (same paper, section 4.2): a 3x3 stem, three stages of n basic blocks with 16/32/64
  channels, depth 6n+2. Shortcuts are option A (parameter-free: strided subsample + zero channel
  padding) by default, option B (1x1 conv + BN projection) on request.
- dy_ variants replace the 3x3 convolutions (and optionally the 1x1 ones) by `DynamicConv2d`
  (Chen et al., CVPR 2020); the stem convolution stays static, as in the paper.

The reference numbers (`IMAGENET_REFERENCE`, `CIFAR_PAPER_PARAMS`) sit next to the builders and the
tests check the models against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from pipeline.models.dynamic_conv import DynamicConv2d, DynamicSpec

__all__ = [
    "CIFAR_PAPER_PARAMS",
    "IMAGENET_REFERENCE",
    "PadShortcut",
    "ResNet",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "dy_cifar_resnet20",
    "dy_cifar_resnet32",
    "dy_cifar_resnet44",
    "dy_cifar_resnet56",
    "dy_cifar_resnet110",
    "dy_resnet18",
    "dy_resnet34",
    "dy_resnet50",
    "dy_resnet101",
    "dy_resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

Block = type[BasicBlock] | type[Bottleneck]
Stem = Literal["imagenet", "small"]
Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2015, section 3.3): identity with strided subsampling and
    extra channels padded with zeros, so it adds no parameters."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


class ResNet(nn.Module):
    """A ResNet with torchvision's module names: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc.

    Args:
        block: torchvision's `BasicBlock` or `Bottleneck`.
        layers: blocks per stage (3 or 4 stages); stage i has `widths[i]` planes, and stride 2
            from the second stage on.
        widths: planes per stage; the stem has `widths[0]` channels.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "small" (3x3/1 conv, no max-pool).
        shortcut: "B" projects with 1x1 conv + BN where shapes change; "A" subsamples and pads.
        dropout: dropout probability before the classifier (0 disables it).
        dynamic: when set, the 3x3 convolutions of the stages (and 1x1 ones if
            `dynamic.replace_1x1`) become `DynamicConv2d`; the stem stays static.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        num_classes: int = 1000,
        stem: Stem = "imagenet",
        shortcut: Shortcut = "B",
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        dynamic: DynamicSpec | None = None,
    ) -> None:
        super().__init__()
        _check_args(layers, widths, in_channels, num_classes, stem, shortcut, dropout)
        self.shortcut = shortcut
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        # CIFAR nets have three stages; None keeps layer4 out of the state dict and TorchScript.
        self.layer4 = (
            self._make_layer(block, widths[3], layers[3], stride=2) if len(layers) == 4 else None
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.inplanes, num_classes)
        if dynamic is not None:
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                if stage is not None:
                    _make_dynamic(stage, dynamic)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != out:
            if self.shortcut == "A":
                downsample = PadShortcut(out, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # Kaiming normal, fan_out, for ReLU nets (He et al. 2015, "Delving Deep into Rectifiers"),
        # as torchvision does; each of a DynamicConv2d's K kernels is initialised like one conv.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, DynamicConv2d):
                for kernel in m.kernels:
                    nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-init the last BN of each residual branch so every block starts as the identity:
        # +0.2-0.3% top-1 at large batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD",
        # arXiv:1706.02677, section 5.1).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, features) pooled features before dropout and the classifier."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.layer4 is not None:
            x = self.layer4(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


def _check_args(
    layers: Sequence[int],
    widths: Sequence[int],
    in_channels: int,
    num_classes: int,
    stem: str,
    shortcut: str,
    dropout: float,
) -> None:
    if len(layers) != len(widths) or len(layers) not in (3, 4) or min(layers) < 1:
        raise ValueError(
            f"layers={list(layers)} and widths={list(widths)} must describe 3 or 4 stages "
            "of at least one block each"
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 greyscale, 3 RGB), got {in_channels}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (projection), got {shortcut!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _make_dynamic(module: nn.Module, spec: DynamicSpec) -> None:
    """Replace, in place, the 3x3 (and with `spec.replace_1x1` the 1x1) convs under `module`."""
    sizes = {(3, 3), (1, 1)} if spec.replace_1x1 else {(3, 3)}
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.kernel_size in sizes:
            setattr(module, name, DynamicConv2d.from_conv(child, spec))
        else:
            _make_dynamic(child, spec)


def _imagenet_resnet(
    block: Block,
    layers: list[int],
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    small_input: bool = False,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
    dynamic: DynamicSpec | None = None,
) -> ResNet:
    return ResNet(
        block,
        layers,
        in_channels=in_channels,
        num_classes=num_classes,
        stem="small" if small_input else "imagenet",
        zero_init_residual=zero_init_residual,
        dropout=dropout,
        dynamic=dynamic,
    )


def cifar_resnet(
    depth: int,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: Shortcut = "A",
    zero_init_residual: bool = False,
    dropout: float = 0.0,
    dynamic: DynamicSpec | None = None,
) -> ResNet:
    """CIFAR ResNet of depth 6n+2 (He et al. 2015, section 4.2): 3x3 stem with 16 channels, three
    stages of n basic blocks with 16/32/64 channels, global average pool, linear classifier."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        [n, n, n],
        widths=(16, 32, 64),
        in_channels=in_channels,
        num_classes=num_classes,
        stem="small",
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
        dropout=dropout,
        dynamic=dynamic,
    )


# torchvision's published numbers for its ImageNet ResNets (weights' meta: num_params at 1000
# classes, and _ops = GFLOPS, which torchvision counts as multiply-adds at 3x224x224).
class Reference(NamedTuple):
    params: int
    gmacs: float


IMAGENET_REFERENCE: dict[str, Reference] = {
    "resnet18": Reference(11_689_512, 1.814),
    "resnet34": Reference(21_797_672, 3.664),
    "resnet50": Reference(25_557_032, 4.089),
    "resnet101": Reference(44_549_160, 7.801),
    "resnet152": Reference(60_192_808, 11.514),
}

# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets (option A shortcuts, 10 classes).
CIFAR_PAPER_PARAMS: dict[str, float] = {
    "cifar_resnet20": 0.27e6,
    "cifar_resnet32": 0.46e6,
    "cifar_resnet44": 0.66e6,
    "cifar_resnet56": 0.85e6,
    "cifar_resnet110": 1.7e6,
}


def resnet18(**kwargs) -> ResNet:
    return _imagenet_resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return _imagenet_resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return _imagenet_resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return _imagenet_resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return _imagenet_resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


def cifar_resnet20(**kwargs) -> ResNet:
    return cifar_resnet(20, **kwargs)


def cifar_resnet32(**kwargs) -> ResNet:
    return cifar_resnet(32, **kwargs)


def cifar_resnet44(**kwargs) -> ResNet:
    return cifar_resnet(44, **kwargs)


def cifar_resnet56(**kwargs) -> ResNet:
    return cifar_resnet(56, **kwargs)


def cifar_resnet110(**kwargs) -> ResNet:
    return cifar_resnet(110, **kwargs)


def dy_resnet18(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return resnet18(dynamic=dynamic, **kwargs)


def dy_resnet34(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return resnet34(dynamic=dynamic, **kwargs)


def dy_resnet50(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return resnet50(dynamic=dynamic, **kwargs)


def dy_resnet101(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return resnet101(dynamic=dynamic, **kwargs)


def dy_resnet152(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return resnet152(dynamic=dynamic, **kwargs)


def dy_cifar_resnet20(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return cifar_resnet(20, dynamic=dynamic, **kwargs)


def dy_cifar_resnet32(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return cifar_resnet(32, dynamic=dynamic, **kwargs)


def dy_cifar_resnet44(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return cifar_resnet(44, dynamic=dynamic, **kwargs)


def dy_cifar_resnet56(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return cifar_resnet(56, dynamic=dynamic, **kwargs)


def dy_cifar_resnet110(dynamic: DynamicSpec = DynamicSpec(), **kwargs) -> ResNet:
    return cifar_resnet(110, dynamic=dynamic, **kwargs)
