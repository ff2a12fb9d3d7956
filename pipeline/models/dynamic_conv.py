"""Dynamic convolution: K kernels mixed per sample by attention.

After Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020
(arXiv:1912.03458). A squeeze-excitation branch (global average pool -> FC -> ReLU -> FC) gives K
logits per sample; softmax(logits / temperature) mixes K parallel kernels (and biases) into one
kernel per sample. The mixing is batched: the (B, K) attention times the (K, out*in/g*kh*kw) kernel
bank gives B kernels, and ONE grouped convolution over the batch folded into channels,
(1, B*C, H, W) with groups=B*groups, applies them; there is no Python loop over samples.

The temperature starts high (near-uniform attention, every kernel trained) and is annealed to 1 over
the first epochs (the paper: 30 -> 1 linearly over 10 epochs): see `temperature_at` and
`set_temperature`, which the trainer calls once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = [
    "DynamicConv2d",
    "DynamicSpec",
    "KernelAttention",
    "set_temperature",
    "temperature_at",
]

Algorithm = Literal["auto", "aggregate", "mix"]
ALGORITHMS: tuple[str, ...] = ("auto", "aggregate", "mix")
# On the CPU "auto" mixes outputs when (K - 1) * out_h * out_w (the extra multiply-adds of "mix"
# per kernel element) is below a threshold, else aggregates kernels. The cost of "aggregate" is
# memory traffic over B per-sample kernels, so the threshold is higher for kernels too big for the
# cache (>= 2^18 elements, 1 MiB: 256x256x3x3 and up). Measured on a 2-core x86 VM, batch 32, K=4,
# forward + backward of single layers (see jobs/bench/dynamic_conv.py for the whole-net numbers).
# On CUDA "auto" always mixes: with cuDNN (torch 2.11, H200) the batch-grouped conv made the
# training step of dy_cifar_resnet20 7.9x the static net's at batch 128, mixing 3.2x;
# dy_resnet18 at 112x112 4.7x against 2.9x, and at 224x224 3.1x against 2.9x.
MIX_THRESHOLD = 96
MIX_THRESHOLD_BIG_KERNEL = 256
BIG_KERNEL_ELEMENTS = 2**18


@dataclass(frozen=True)
class DynamicSpec:
    """How to build the DynamicConv2d layers of a dy_ network."""

    num_kernels: int = 4  # K; the paper uses 4
    reduction: int = 4  # attention hidden width = in_channels // reduction (at least 1)
    temperature: float = 30.0  # initial softmax temperature (the paper: 30, annealed to 1)
    replace_1x1: bool = False  # also make the 1x1 convolutions (bottleneck, projections) dynamic
    algorithm: Algorithm = "auto"  # see DynamicConv2d


class KernelAttention(nn.Module):
    """Squeeze-excitation branch: (B, C, H, W) -> (B, K) logits over the kernels."""

    def __init__(self, in_channels: int, num_kernels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3)))))


class DynamicConv2d(nn.Module):
    """A drop-in `nn.Conv2d` whose kernel is a per-sample attention mix of `num_kernels` kernels.

    `weight` holds the K kernels as (K*out, in/groups, kh, kw) (`kernels` views it as (K, out, ...))
    and `bias` is (K, out). With K=1 the attention is 1 and the layer equals an `nn.Conv2d` with
    the same `weight` and `bias[0]`.

    Two exact ways to compute the same output, chosen per call by `algorithm`:
    - "aggregate" (the paper's): mix the kernels per sample, (B, K) @ (K, out*in/g*kh*kw), then ONE
      grouped conv over the batch folded into channels. Its extra cost is memory traffic over the B
      per-sample kernels, which is small next to the conv when the output has many pixels.
    - "mix": ONE dense conv with all K kernels stacked as K*out output channels, then the outputs
      mixed per sample, y_b = sum_k attn[b, k] * (W_k * x_b). K times the conv's multiply-adds but
      no per-sample kernels: cheaper on small feature maps (e.g. 512 channels at 4x4, where one
      sample's kernel is 9 MB and the convolution only 16 pixels).
    - "auto" (default): on CUDA "mix"; on the CPU "mix" when (K - 1) * out_h * out_w is below
      MIX_THRESHOLD (or MIX_THRESHOLD_BIG_KERNEL for kernels of BIG_KERNEL_ELEMENTS and more),
      else "aggregate". All three give the same result up to float rounding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        algorithm: Algorithm = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        if num_kernels < 1:
            raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.num_kernels = num_kernels
        # A buffer changed in place: torch.compile treats a Python float attribute as a constant
        # and recompiles when it changes (every epoch of the annealing, then falls back to eager
        # after 8); a tensor is an input. Not in state dicts (the schedule sets it), but moved
        # with the module and copied by an EMA.
        self.register_buffer("_temperature", torch.tensor(float(temperature)), persistent=False)
        self.algorithm = algorithm
        # The K kernels stacked along dim 0, (K*out, in/g, kh, kw): 4-D like a conv weight, so
        # that `model.to(memory_format=torch.channels_last)` works on a model holding this layer.
        self.weight = nn.Parameter(
            torch.empty(num_kernels * out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels)) if bias else None
        self.attention = KernelAttention(in_channels, num_kernels, reduction)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels (and biases) as `nn.Conv2d` initialises its one."""
        fan_in = self.weight[0].numel()
        for kernel in self.kernels:
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def kernels(self) -> torch.Tensor:
        """The K kernels as a (K, out, in/g, kh, kw) view of `weight`."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    @property
    def temperature(self) -> float:
        return float(self._temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature.fill_(float(value))

    def kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) mixing weights, softmax(logits / temperature)."""
        return torch.softmax(self.attention(x) / self._temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.kernel_attention(x)
        # A traced graph (TorchScript, ONNX) would freeze "aggregate"'s groups=B to the example's
        # batch size, so tracing records "mix", which works for any batch.
        mix = self.algorithm == "mix" or torch.jit.is_tracing()
        if mix or (self.algorithm == "auto" and self._mix_is_cheaper(x)):
            return self._forward_mix(x, attn)
        return self._forward_aggregate(x, attn)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                (h, w), self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )

    def _mix_is_cheaper(self, x: torch.Tensor) -> bool:
        if x.is_cuda:
            return True
        oh, ow = self._out_hw(x.shape[-2], x.shape[-1])
        big = self.weight.numel() // self.num_kernels >= BIG_KERNEL_ELEMENTS
        return (self.num_kernels - 1) * oh * ow < (
            MIX_THRESHOLD_BIG_KERNEL if big else MIX_THRESHOLD
        )

    def _forward_aggregate(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self._mixed_kernels(attn)
        bias = (attn @ self.bias).flatten() if self.bias is not None else None
        # Fold the batch into channels, (1, B*C, H, W): sample i only meets its own kernel through
        # groups=B*groups. A channels_last input is folded as (H, W, B, C) memory, which is the
        # channels_last layout of the folded tensor, so the convolution stays NHWC.
        channels_last = _is_channels_last(x)
        if channels_last:
            x = x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
        y = F.conv2d(
            x.reshape(1, b * c, h, w),
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            b * self.groups,
        )
        y = y.view(b, self.out_channels, y.shape[-2], y.shape[-1])
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def _mixed_kernels(self, attn: torch.Tensor) -> torch.Tensor:
        """(B, K) @ (K, out*in/g*kh*kw) -> B kernels stacked as (B*out, in/g, kh, kw), computed in
        the weight's own memory order (no copy of the kernel bank for a channels_last weight)."""
        k = self.num_kernels
        if self.weight.is_contiguous():
            return (attn @ self.weight.view(k, -1)).view(-1, *self.weight.shape[1:])
        bank = self.weight.permute(0, 2, 3, 1)  # channels_last: (K*out, kh, kw, in/g) is dense
        return (attn @ bank.reshape(k, -1)).view(-1, *bank.shape[1:]).permute(0, 3, 1, 2)

    def _forward_mix(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        k, g, o = self.num_kernels, self.groups, self.out_channels
        # All K kernels as one conv with K*out channels, ordered (group, kernel, channel) so that
        # each group's K*out/g outputs come from its own in/g inputs.
        weight = self.weight
        if g > 1:
            weight = weight.unflatten(0, (k, g, o // g)).transpose(0, 1).flatten(0, 2)
        z = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, g)
        if _is_channels_last(z):  # mix in (B, H, W, C) memory order and stay channels_last
            zp = z.permute(0, 2, 3, 1).unflatten(3, (g, k, o // g))
            y = torch.einsum("bk,bhwgkc->bhwgc", attn, zp).flatten(3).permute(0, 3, 1, 2)
        else:
            y = torch.einsum("bk,bgkchw->bgchw", attn, z.unflatten(1, (g, k, o // g))).flatten(1, 2)
        if self.bias is not None:
            y = y + (attn @ self.bias)[:, :, None, None]
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, num_kernels={self.num_kernels}, "
            f"temperature={self.temperature:g}, algorithm={self.algorithm!r}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: DynamicSpec) -> DynamicConv2d:
        """A DynamicConv2d with the geometry of `conv` (its kernels freshly initialised)."""
        if not isinstance(conv.padding, tuple):
            raise ValueError(f"padding={conv.padding!r} is not supported; use explicit integers")
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            num_kernels=spec.num_kernels,
            reduction=spec.reduction,
            temperature=spec.temperature,
            algorithm=spec.algorithm,
        )


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def temperature_at(epoch: float, start: float = 30.0, end: float = 1.0, epochs: int = 10) -> float:
    """The softmax temperature at `epoch` (fractional epochs allowed): `start` -> `end` linearly
    over the first `epochs` epochs, then `end` (Chen et al. 2020, section 3.3: 30 -> 1 over 10)."""
    if epochs <= 0:
        return float(end)
    frac = min(max(epoch / epochs, 0.0), 1.0)
    return float(start + (end - start) * frac)


def set_temperature(model: nn.Module, t: float) -> int:
    """Set the temperature of every DynamicConv2d in `model`; returns how many were set."""
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    count = 0
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            module.temperature = t
            count += 1
    return count
