"""The driver's progress: every message rank 0 sends reaches the caller as an event (the CLI's
display draws them), and a failed fit is re-raised."""

from __future__ import annotations

import io
import queue
import time

import pytest
from rich.console import Console

from pipeline.cli.display import TrainingDisplay
from pipeline.events import EpochEnd, Phase, TrainingStarted
from pipeline.train.supervise import Watch, supervised_fit


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


QUICK = Watch(poll_s=0.05)


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


def _display() -> tuple[TrainingDisplay, io.StringIO]:
    out = io.StringIO()
    display = TrainingDisplay(Console(file=out, width=160))
    display(TrainingStarted("run", epochs=3))
    return display, out


def test_every_message_reaches_the_caller_as_an_event_including_the_last_ones():
    q: queue.Queue = queue.Queue()
    events: list = []
    assert supervised_fit(_Trainer(q), q, events.append, QUICK) == "result"
    assert q.empty()
    assert events[0] == Phase("workers up")
    assert [e.epoch for e in events if isinstance(e, EpochEnd)] == [0, 1, 2]


def test_the_display_draws_every_epoch():
    q: queue.Queue = queue.Queue()
    display, out = _display()
    with display:
        assert supervised_fit(_Trainer(q), q, display, QUICK) == "result"
    printed = out.getvalue()
    assert [f"epoch {i:>3}/3" in printed for i in (1, 2, 3)] == [True, True, True]


def test_a_failed_fit_is_raised_in_the_caller():
    q: queue.Queue = queue.Queue()
    with pytest.raises(RuntimeError, match="worker died"):
        supervised_fit(_Trainer(q, RuntimeError("worker died")), q, lambda e: None, QUICK)
