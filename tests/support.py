"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a test run may leave in the checkout: caches of the tools themselves.
_CACHES = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "pipeline.egg-info"}


def untrained_accuracy(cfg, split: str = "test") -> float:
    """Test accuracy of the configured network as training initialises it (seeded, no steps):
    the bar a trained model must clear by a margin, instead of an absolute number."""
    import torch

    from pipeline.data.shards import read_manifest
    from pipeline.data.transform import iter_split
    from pipeline.train.loop import model_for

    manifest = read_manifest(cfg.data.uri)
    torch.manual_seed(cfg.train.seed)
    model = model_for(cfg, manifest).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in iter_split(cfg.data.uri, manifest, split, resize=cfg.data.resize):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def repo_files() -> set[str]:
    """Every file in the checkout outside .git and tool caches (tracked or not, ignored or not)."""
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _CACHES]
        found.update(os.path.relpath(os.path.join(root, f), REPO) for f in files)
    return found


def bn_batches_tracked(state: dict) -> Iterator[int]:
    """`num_batches_tracked` of every batch-norm layer in a (possibly nested) state dict: the
    number of training steps the weights have been through."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from bn_batches_tracked(value)
        elif str(key).endswith("num_batches_tracked"):
            yield int(value)
