"""Benchmark: training-step cost of dynamic convolution (dy_ nets) over the static nets.

Times forward + backward (cross-entropy, gradients zeroed each step) of each dy_/static pair on the
CPU, interleaving the two models repeat by repeat so that both see the same machine load, and
reports the ratio of the medians (after warm-up). Writes JSON for tracking.

    .venv/bin/python jobs/bench/dynamic_conv.py                      # defaults below, < 1 minute
    .venv/bin/python jobs/bench/dynamic_conv.py --repeats 9 --channels-last --out /tmp/dy.json

Pairs: dy_resnet18 / resnet18 at batch 32, 3x112x112 (ImageNet stem), and
dy_cifar_resnet20 / cifar_resnet20 at batch 32, 3x32x32; K=4, torch.set_num_threads(2).

Measured 2026-11-27, NCHW, K=4, 2 threads, median of 5-7 repeats after warm-up:
- quiet 16-core x86 host, torch 2.11: dy_cifar_resnet20 1.44x, dy_resnet18 2.53x with the default
  algorithm="auto" ("aggregate" alone, the paper's formulation: 1.46x and 5.93x).
- the shared 2-core VM, torch 2.14.1, other jobs running: dy_cifar_resnet20 1.4-1.9x, dy_resnet18
  2.6-2.7x (channels_last: 2.2-2.8x and 3.1-3.5x, since it speeds up the static nets more).
The profile of dy_resnet18 is ~85% convolution forward/backward: the extra time is the extra
convolution work (K x the multiply-adds where outputs are mixed, the batch-grouped conv elsewhere),
not Python. The 512-channel 4x4 and 256-channel 7x7 stages cannot be cheap with K=4: aggregation
moves a 9 MB kernel per sample through memory, mixing does 4x the multiply-adds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DynamicConvConfig, ModelConfig
from pipeline.models.dynamic_conv import ALGORITHMS, DynamicConv2d
from pipeline.models.zoo import build_model

DEFAULT_OUT = Path(__file__).parent / "results" / "dynamic_conv.json"
# (static name, input (C, H, W), batch); the dy_ twin is timed against it.
CASES: list[tuple[str, tuple[int, int, int], int]] = [
    ("resnet18", (3, 112, 112), 32),
    ("cifar_resnet20", (3, 32, 32), 32),
]


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Wall time of one forward + backward."""
    start = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_pair(
    name: str,
    input_size: tuple[int, int, int],
    batch: int,
    *,
    num_kernels: int,
    repeats: int,
    warmup: int,
    channels_last: bool,
    algorithm: str,
) -> dict[str, Any]:
    c, h, _ = input_size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    dynamic = DynamicConvConfig(num_kernels=num_kernels)
    models = {}
    for n in (name, f"dy_{name}"):
        cfg = ModelConfig(name=n, dynamic=dynamic)
        model = build_model(cfg, in_channels=c, num_classes=10, image_size=h)
        models[n] = model.to(memory_format=memory_format).train()
    for module in models[f"dy_{name}"].modules():
        if isinstance(module, DynamicConv2d):
            module.algorithm = algorithm
    torch.manual_seed(0)
    x = torch.randn(batch, *input_size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(warmup + repeats):
        for n, model in models.items():
            t = step_seconds(model, x, y)
            if i >= warmup:
                times[n].append(t)
    static, dy = (statistics.median(times[n]) for n in models)
    return {
        "static": name,
        "dynamic": f"dy_{name}",
        "input_size": list(input_size),
        "batch": batch,
        "num_kernels": num_kernels,
        "channels_last": channels_last,
        "algorithm": algorithm,
        "static_median_s": static,
        "dynamic_median_s": dy,
        "ratio": dy / static,
        # The fastest repeats, less sensitive to other load on a shared machine.
        "ratio_of_minimums": min(times[f"dy_{name}"]) / min(times[name]),
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-kernels", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        bench_pair(
            name,
            size,
            batch,
            num_kernels=args.num_kernels,
            repeats=args.repeats,
            warmup=args.warmup,
            channels_last=args.channels_last,
            algorithm=args.algorithm,
        )
        for name, size, batch in CASES
    ]
    report = {
        "benchmark": "dynamic_conv",
        "target_ratio": 1.5,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    for r in results:
        print(
            f"{r['dynamic']:>18} / {r['static']:<15} batch {r['batch']} "
            f"{'x'.join(map(str, r['input_size']))}: {r['dynamic_median_s'] * 1e3:7.1f} ms / "
            f"{r['static_median_s'] * 1e3:7.1f} ms = {r['ratio']:.2f}x "
            f"(min/min {r['ratio_of_minimums']:.2f}x; K={r['num_kernels']}, {r['algorithm']})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
