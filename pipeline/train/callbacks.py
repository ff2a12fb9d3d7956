"""Hooks into the per-worker loop: picklable objects called at each step and each epoch's end.

The loop knows nothing about what a callback does; it calls `on_step` before every optimizer
step and `on_epoch_end` after every checkpoint report, on every worker. Callbacks travel to the
workers inside `LoopConfig`, so they must pickle (plain classes at module level do) and import
nothing heavy at module level.

`KillWorkerOnce` is the fault drill that tests and `make gpu-check` pass in: a real worker
process dies mid-epoch, once per run, so Ray Train's restart-from-checkpoint path runs for real.
It is not reachable from the config: production runs never carry it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class StepInfo:
    """Where a worker is: about to take `step` (0-based) of `steps` in `epoch` (0-based), on
    `rank` of `world`; `last_loss` is the previous step's loss tensor (None at step 0): reading
    its value waits for the device."""

    epoch: int
    step: int
    steps: int
    rank: int
    world: int
    last_loss: Any = None


@runtime_checkable
class LoopCallback(Protocol):
    def on_step(self, info: StepInfo) -> None: ...

    def on_epoch_end(self, epoch: int, rank: int) -> None: ...


class LoopHooks:
    """Base with no-op hooks: subclass and override what you need."""

    def on_step(self, info: StepInfo) -> None:
        return None

    def on_epoch_end(self, epoch: int, rank: int) -> None:
        return None


@dataclass
class KillWorkerOnce(LoopHooks):
    """The last worker's process exits (os._exit: no exception, no clean-up) halfway through
    `epoch`, `times` times per run (once by default): `marker` (a file path every worker can
    see) counts the deaths, one line each. With `after_report`, rank 0 dies instead, right after
    it reported `epoch`'s checkpoint (with `run.checkpoint_upload: async`, while Ray may still
    be uploading it)."""

    epoch: int
    marker: str
    times: int = 1
    after_report: bool = False

    def on_step(self, info: StepInfo) -> None:
        if self.after_report or info.epoch != self.epoch or info.step != info.steps // 2:
            return
        if info.rank == info.world - 1:
            self._die(info.rank, info.epoch)

    def on_epoch_end(self, epoch: int, rank: int) -> None:
        if self.after_report and epoch == self.epoch and rank == 0:
            self._die(rank, epoch)

    def _die(self, rank: int, epoch: int) -> None:
        if self.deaths() >= self.times:
            return
        Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
        with open(self.marker, "a") as f:
            f.write(f"worker {rank} killed at epoch {epoch}\n")
        os._exit(137)

    def deaths(self) -> int:
        return len(Path(self.marker).read_text().splitlines()) if os.path.exists(self.marker) else 0
