"""Resuming from a damaged checkpoint: the newest earlier one that reads is used instead, and
when none does the error names every checkpoint tried (no restart could succeed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from pipeline.train.state import CHECKPOINT_FILE, CheckpointUnreadable, restore


def run_dir(tmp_path: Path, *damaged: int, epochs: int = 3) -> Path:
    """`epoch-0001` .. `epoch-000N` as training writes them, `damaged` ones truncated."""
    for done in range(1, epochs + 1):
        d = tmp_path / f"epoch-{done:04d}"
        d.mkdir()
        torch.save({"epoch": done, "w": torch.full((4,), float(done))}, d / CHECKPOINT_FILE)
        if done in damaged:
            data = (d / CHECKPOINT_FILE).read_bytes()
            (d / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    (tmp_path / "not-a-checkpoint").mkdir()
    return tmp_path


def latest(root: Path, done: int) -> Checkpoint:
    return Checkpoint.from_directory(str(root / f"epoch-{done:04d}"))


def test_a_readable_latest_checkpoint_is_used(tmp_path):
    loaded = []
    path, skipped = restore(latest(run_dir(tmp_path), 3), loaded.append)
    assert [s["epoch"] for s in loaded] == [3]
    assert path.endswith("epoch-0003") and skipped == []


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path):
    root = run_dir(tmp_path, 3, 2)
    loaded = []
    path, skipped = restore(latest(root, 3), loaded.append)
    assert [s["epoch"] for s in loaded] == [1]
    assert path.endswith("epoch-0001")
    assert [s.split(":")[0].rsplit("/", 1)[-1] for s in skipped] == ["epoch-0003", "epoch-0002"]


def test_contents_that_do_not_load_count_as_damaged(tmp_path):
    """The file reads, but the state does not fit (another model's checkpoint, a missing key)."""
    root = run_dir(tmp_path)

    def load(saved):
        if saved["epoch"] == 3:
            raise KeyError("model")
        loaded.append(saved["epoch"])

    loaded: list[int] = []
    _, skipped = restore(latest(root, 3), load)
    assert loaded == [2] and len(skipped) == 1 and "KeyError" in skipped[0]


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
    root = run_dir(tmp_path, 1, 2, 3)
    with pytest.raises(CheckpointUnreadable) as info:
        restore(latest(root, 3), lambda saved: None)
    message = str(info.value)
    for done in (1, 2, 3):
        assert f"epoch-000{done}" in message
    assert "new run.name" in message


def test_a_missing_file_falls_back_too(tmp_path):
    root = run_dir(tmp_path)
    (root / "epoch-0003" / CHECKPOINT_FILE).unlink()
    loaded = []
    restore(latest(root, 3), loaded.append)
    assert [s["epoch"] for s in loaded] == [2]
