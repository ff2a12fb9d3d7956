"""Progress events: how training and search tell their caller what is happening, without drawing.

The trainer and the search call an `EventSink` (any callable taking one event) on the driver's
thread; the CLI passes a live display (`pipeline.cli.display`), a script can pass `print` or
nothing. Events are small frozen dataclasses, picklable, so rank 0 can send them to the driver
through a Ray queue. Import-light: no torch, no Ray, no rich.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EventSink = Callable[[Any], None]


@dataclass(frozen=True)
class TrainingStarted:
    """The trainer is about to start its workers; `start_epoch` > 0 when it resumes."""

    run_name: str
    epochs: int
    start_epoch: int = 0


@dataclass(frozen=True)
class StepProgress:
    """Rank 0 finished `step` of `steps` in `epoch` (0-based), `elapsed` s into the epoch."""

    epoch: int
    step: int
    steps: int
    loss: float
    elapsed: float


@dataclass(frozen=True)
class EpochEnd:
    """Rank 0's metrics for one finished epoch (0-based), as logged to MLflow."""

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_top5: float
    images_per_s: float
    epoch_time_s: float
    lr: float

    @classmethod
    def from_row(cls, row: dict[str, Any], epochs: int) -> EpochEnd:
        return cls(epochs=epochs, **{k: row[k] for k in cls.__dataclass_fields__ if k != "epochs"})


@dataclass(frozen=True)
class Phase:
    """What the run is doing between epochs' steps (evaluating the test split, logging)."""

    text: str


@dataclass(frozen=True)
class TrialUpdate:
    """A search's state after one trial event: `status` is the one-line summary (counts and best
    so far); `line`, when set, is a finished, stopped or failed trial's own line."""

    status: str
    line: str | None = None


@dataclass(frozen=True)
class WriteProgress:
    """A dataset being written: `done` of `total` rows (or files) so far."""

    description: str
    done: int
    total: int


def event_from_message(msg: dict[str, Any]) -> Any:
    """A progress-queue message (a dict rank 0 puts) as its event; None for an unknown kind."""
    kind = msg.get("kind")
    if kind == "step":
        return StepProgress(msg["epoch"], msg["step"], msg["steps"], msg["loss"], msg["elapsed"])
    if kind == "epoch":
        return EpochEnd.from_row(msg, msg["epochs"])
    if kind == "phase":
        return Phase(msg["text"])
    return None


def ignore(_event: Any) -> None:
    """The default sink: nothing is shown."""
