"""The driver's watchdog and stop: a fit that makes no progress is reported and then aborted
with the reason; SIGTERM aborts it as a stop; the process's signal handlers are restored."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time

import pytest

from pipeline.train.supervise import Stalled, Stopped, Unrecoverable, Watch, supervised_fit


class Hangs:
    """A fit whose workers never report: it waits until interrupted (as Ray's abort does)."""

    def __init__(self, send_sigterm_after: float | None = None, on_start=None) -> None:
        self.send_sigterm_after = send_sigterm_after
        self.on_start = on_start  # called once the fit waits (what a worker does mid-fit)
        self.interrupted = False

    def fit(self):
        if self.send_sigterm_after is not None:
            pid = os.getpid()
            timer = threading.Timer(self.send_sigterm_after, os.kill, (pid, signal.SIGTERM))
            timer.start()
        deadline = time.monotonic() + 120
        try:
            if self.on_start is not None:
                self.on_start()
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except KeyboardInterrupt:  # what Ray Train's handler turns into an abort
            self.interrupted = True
            raise
        raise AssertionError("the fit was never aborted")


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own Ctrl-C handler, as on a fresh main thread (an earlier test's Ray may have
    left its own); Ray Train's, installed inside a real fit, aborts the same way."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_a_stalled_fit_is_reported_then_aborted_with_the_reason(caplog):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    watch = Watch(warn_after_s=0.3, fail_after_s=1.0, poll_s=0.05)
    hangs = Hangs()
    with caplog.at_level(logging.WARNING), pytest.raises(Stalled) as info:
        supervised_fit(hangs, queue.Queue(), lambda e: None, watch)
    assert hangs.interrupted, "the watchdog did not abort the fit"
    assert "no progress from the workers" in str(info.value)
    assert "run.stall_timeout_s=1" in str(info.value)
    assert "no progress from the workers for" in caplog.text  # the warning came first
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_stops_the_fit_cleanly():
    watch = Watch(warn_after_s=30, fail_after_s=None, poll_s=0.05)
    hangs = Hangs(send_sigterm_after=0.3)
    with pytest.raises(Stopped):
        supervised_fit(hangs, queue.Queue(), lambda e: None, watch)
    assert hangs.interrupted


def test_progress_keeps_the_watchdog_quiet():
    q: queue.Queue = queue.Queue()

    class Busy:
        def fit(self):
            for i in range(20):
                q.put({"kind": "phase", "text": f"step {i}"})
                time.sleep(0.05)
            return "result"

    events: list = []
    watch = Watch(warn_after_s=0.3, fail_after_s=0.5, poll_s=0.02)
    assert supervised_fit(Busy(), q, events.append, watch) == "result"
    assert len(events) == 20


def test_a_worker_that_cannot_go_on_ends_the_fit_with_its_reason():
    """What a worker sends when every checkpoint is unreadable: the fit is aborted at once (no
    restart that would fail the same way), and fails with the worker's message."""
    q: queue.Queue = queue.Queue()
    fatal = {"kind": "fatal", "text": "cannot resume: no checkpoint of this run can be read"}
    # Sent once the fit runs (sent before, the abort can land before `fit` is entered, which
    # ends the same way but leaves nothing here to observe it by).
    hangs = Hangs(on_start=lambda: q.put(fatal))  # the restart loop Ray would otherwise go on
    watch = Watch(warn_after_s=30, fail_after_s=None, poll_s=0.02)
    with pytest.raises(Unrecoverable, match="no checkpoint of this run can be read"):
        supervised_fit(hangs, q, lambda e: None, watch)
    assert hangs.interrupted


def test_a_fatal_message_waiting_before_the_fit_starts_still_ends_it_with_its_reason():
    """The reader may abort before `fit` is entered (the race that once let a SIGINT escape):
    the outcome is the same error, wherever the interrupt lands."""
    watch = Watch(warn_after_s=30, fail_after_s=None, poll_s=0.02)
    for _ in range(5):
        q: queue.Queue = queue.Queue()
        q.put({"kind": "fatal", "text": "cannot resume: no checkpoint of this run can be read"})
        with pytest.raises(Unrecoverable, match="no checkpoint of this run can be read"):
            supervised_fit(Hangs(), q, lambda e: None, watch)
