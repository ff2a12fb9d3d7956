"""EpochMeter and friends: correct sums on one worker, and global results across two."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.train.metrics import EpochMeter, global_throughput, per_class_accuracy, top_k_correct

NUM_CLASSES = 7


def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, generator=g)
    target = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    losses = torch.rand(n, generator=g)  # one "batch mean loss" per row, used per batch below
    return logits, target, losses


def _feed(meter: EpochMeter, logits, target, losses, batch: int) -> None:
    for start in range(0, len(target), batch):
        sl = slice(start, start + batch)
        meter.update(logits[sl], target[sl], losses[sl].mean())


def test_top_k_correct_counts_and_caps_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert int(top_k_correct(logits, target, 1)) == 1
    assert int(top_k_correct(logits, target, 2)) == 2  # row 1: class 2 is second
    assert int(top_k_correct(logits, target, 5)) == 3  # k capped at 3 classes


def test_meter_on_one_worker():
    logits, target, losses = _data()
    meter = EpochMeter(NUM_CLASSES, confusion=True)
    _feed(meter, logits, target, losses, batch=16)
    out = meter.reduce()
    weighted = sum(losses[s : s + 16].mean() * len(losses[s : s + 16]) for s in range(0, 60, 16))
    assert out["count"] == 60
    assert out["loss"] == pytest.approx(float(weighted) / 60)
    assert out["acc"] == pytest.approx(float((logits.argmax(1) == target).float().mean()))
    assert out["top5"] == pytest.approx(int(top_k_correct(logits, target, 5)) / 60)
    confusion = out["confusion"]
    assert confusion.dtype == torch.int64 and confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert int(confusion.sum()) == 60
    assert torch.equal(confusion.sum(dim=1), torch.bincount(target, minlength=NUM_CLASSES))
    assert int(confusion.trace()) == int((logits.argmax(1) == target).sum())


def test_meter_without_samples_gives_nan_not_zero():
    out = EpochMeter(3).reduce()
    assert out["count"] == 0 and math.isnan(out["acc"]) and "confusion" not in out


def test_top5_is_top_k_for_fewer_classes():
    meter = EpochMeter(3)
    meter.update(torch.randn(10, 3), torch.randint(0, 3, (10,)), 1.0)
    assert meter.reduce()["top5"] == 1.0


def test_per_class_accuracy_is_zero_for_a_class_without_samples():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    assert per_class_accuracy(confusion) == pytest.approx([0.75, 0.0, 0.5])


def test_global_throughput_without_distributed():
    assert global_throughput(1000, 4.0) == pytest.approx(250.0)


# --- two gloo workers, each with its own shard ---------------------------------------------------


def _worker(rank: int, world_size: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        logits, target, losses = _data()
        # Unequal shards (40 / 20 rows) with different batch sizes, like a real uneven split.
        sl = slice(0, 40) if rank == 0 else slice(40, 60)
        meter = EpochMeter(NUM_CLASSES, confusion=True)
        _feed(meter, logits[sl], target[sl], losses[sl], batch=8 if rank == 0 else 5)
        out = meter.reduce()
        out["images_per_s"] = global_throughput(out["count"], elapsed_local=2.0 + 3.0 * rank)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_workers_reduce_to_the_metrics_of_the_union(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
        per_rank = [dict(results[r]) for r in range(2)]

    logits, target, losses = _data()
    single = EpochMeter(NUM_CLASSES, confusion=True)
    _feed(single, logits[:40], target[:40], losses[:40], batch=8)
    _feed(single, logits[40:], target[40:], losses[40:], batch=5)
    expected = single.reduce()

    for out in per_rank:  # every rank sees the global numbers, not its shard's
        assert out["count"] == 60
        for key in ("loss", "acc", "top5"):
            assert out[key] == pytest.approx(expected[key], rel=1e-12)
        assert torch.equal(out["confusion"], expected["confusion"])
        assert out["images_per_s"] == pytest.approx(60 / 5.0)  # slowest worker's 5 s
