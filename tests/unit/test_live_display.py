"""The driver's live display: every progress message is shown, a failed fit is re-raised."""

from __future__ import annotations

import io
import queue
import time

import pytest
from rich.console import Console

from pipeline.train.trainer import LiveDisplay, _fit_with_display


def _epoch(i: int) -> dict:
    return {
        "kind": "epoch",
        "epoch": i,
        "epochs": 3,
        "train_loss": 1.0,
        "train_acc": 0.5,
        "val_loss": 1.0,
        "val_acc": 0.5,
        "val_top5": 0.9,
        "images_per_s": 1000.0,
        "epoch_time_s": 0.5,
        "lr": 0.1,
    }


class _Trainer:
    """Puts its progress messages on the queue the way rank 0 does, the last one as it ends."""

    def __init__(self, q: queue.Queue, error: BaseException | None = None) -> None:
        self.q, self.error = q, error

    def fit(self):
        self.q.put({"kind": "phase", "text": "workers up"})
        for i in range(3):
            time.sleep(0.05)
            self.q.put(_epoch(i))
        if self.error is not None:
            raise self.error
        return "result"


def _display() -> tuple[LiveDisplay, io.StringIO]:
    out = io.StringIO()
    return LiveDisplay(Console(file=out, width=160), epochs=3), out


def test_every_message_is_shown_including_those_left_when_training_ends():
    q: queue.Queue = queue.Queue()
    display, out = _display()
    assert _fit_with_display(_Trainer(q), q, display) == "result"
    assert q.empty()
    printed = out.getvalue()
    assert [f"epoch {i:>3}/3" in printed for i in (1, 2, 3)] == [True, True, True]


def test_a_failed_fit_is_raised_in_the_caller():
    q: queue.Queue = queue.Queue()
    display, _ = _display()
    with pytest.raises(RuntimeError, match="worker died"):
        _fit_with_display(_Trainer(q, RuntimeError("worker died")), q, display)
