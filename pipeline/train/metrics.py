"""Epoch metrics that are global across data-parallel workers, not rank 0's shard.

Each worker accumulates sums on its own device (no host sync per step); `EpochMeter.reduce()`
all-reduces them in one flat tensor when torch.distributed is initialised. Every rank must call
the reducing functions the same number of times: they are collectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# Slots of the flat tensor that `reduce` all-reduces; the confusion matrix follows them.
_LOSS_SUM, _TOP1, _TOPK, _COUNT = range(4)
_NUM_SCALARS = 4


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones via a host copy).
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def top_k_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have `target` among their k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == target.unsqueeze(-1)).any(dim=-1).sum()


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall per class from a confusion matrix (rows = true class, columns = predicted).

    A class with no samples gets 0.0 rather than NaN: NaN breaks JSON/CSV consumers and the
    promotion gate's `class_floor` comparison, and "never seen, never right" is the safe reading.
    """
    confusion = confusion.to(torch.float64)
    totals = confusion.sum(dim=1)
    correct = confusion.diagonal()
    acc = torch.where(totals > 0, correct / totals.clamp(min=1), torch.zeros_like(totals))
    return [float(a) for a in acc]


class EpochMeter:
    """Sums of one epoch on one worker: loss x batch size, top-1/top-k hits, count, confusion.

    `update` takes the hard class indices even when the loss used mixed (soft) targets: accuracy
    is measured against the real labels.
    """

    def __init__(
        self,
        num_classes: int,
        confusion: bool = False,
        topk: int = 5,
        device: torch.device | str | None = None,
    ):
        self.num_classes = num_classes
        self.topk = min(topk, num_classes)
        self.track_confusion = confusion
        size = _NUM_SCALARS + (num_classes * num_classes if confusion else 0)
        # float64 holds integer counts exactly up to 2**53 and lets one tensor carry everything.
        self._sums = torch.zeros(size, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(
        self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | float
    ) -> None:
        """Add a batch: `loss` is the batch's mean loss, weighted here by the batch size."""
        if self._sums.device != logits.device:
            self._sums = self._sums.to(logits.device)
        n = target.shape[0]
        loss_value = loss.detach().to(torch.float64) if torch.is_tensor(loss) else float(loss)
        self._sums[_LOSS_SUM] += loss_value * n
        self._sums[_TOP1] += (logits.argmax(dim=-1) == target).sum()
        self._sums[_TOPK] += top_k_correct(logits, target, self.topk)
        self._sums[_COUNT] += n
        if self.track_confusion:
            pred = logits.argmax(dim=-1)
            cells = target * self.num_classes + pred
            counts = torch.bincount(cells, minlength=self.num_classes**2)
            self._sums[_NUM_SCALARS:] += counts.to(torch.float64)

    def reduce(self, all_workers: bool = True) -> dict[str, Any]:
        """Global metrics: one all-reduce (SUM) across workers when distributed, then ratios.

        Returns loss, acc, top5 (top-k with k = min(5, num_classes)), count, and confusion (an
        int64 [true, predicted] CPU tensor) when enabled. `all_workers=False` keeps this worker's
        numbers (rank 0 evaluating a whole split alone must not wait for the others). With no
        samples anywhere, loss and the accuracies are NaN: there is nothing to measure, and 0
        would look like a real result.
        """
        flat = self._sums.to(_collective_device(), copy=True)
        if all_workers and _distributed():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        count = int(flat[_COUNT])
        denom = count if count > 0 else float("nan")
        out: dict[str, Any] = {
            "loss": float(flat[_LOSS_SUM]) / denom,
            "acc": float(flat[_TOP1]) / denom,
            "top5": float(flat[_TOPK]) / denom,
            "count": count,
        }
        if self.track_confusion:
            shape = (self.num_classes, self.num_classes)
            out["confusion"] = flat[_NUM_SCALARS:].round().to(torch.int64).reshape(shape)
        return out


def global_throughput(count_global: int, elapsed_local: float) -> float:
    """Images per second for all workers: the global count over the slowest worker's time.

    The slowest worker bounds the epoch (every step waits for it in the gradient all-reduce),
    so the elapsed time is all-reduced with MAX.
    """
    elapsed = torch.tensor([elapsed_local], dtype=torch.float64, device=_collective_device())
    if _distributed():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    seconds = float(elapsed.item())
    return count_global / seconds if seconds > 0 else float("nan")
