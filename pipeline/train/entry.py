"""The function Ray Train runs on each worker, in a module that imports nothing heavy.

Train V2's controller actor unpickles the training function along with the trainer, and
unpickling a function imports its module. `pipeline.train.loop` imports torch, torchvision and
the model zoo (about 3 CPU-seconds); the controller never runs the loop, so it should not pay
for it on the way to the first training step. The workers import the loop here, on first call.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    from pipeline.train.loop import train_loop_per_worker as run_loop

    run_loop(loop_config)
