"""The driver's side of a fit: progress forwarding, the stall watchdog, and a clean stop.

`trainer.fit()` runs on the calling thread (the main thread for `pipeline train` and a submitted
job, so Ray Train installs its Ctrl-C handler, which aborts the run gracefully); a second thread
reads rank 0's progress queue, turns each message into an event for the caller, and watches the
time since the last one:

* after `run.stall_warn_s` without progress it logs what Ray is waiting for (pending placement
  groups and their bundles, free against total resources), again every as long;
* after `run.stall_timeout_s` it aborts the run (Ray Train's own graceful abort) and the caller
  fails it with that reason.

A worker that finds the run cannot go on (every checkpoint unreadable) says so through the queue
(`{"kind": "fatal"}`): the run is aborted and fails with that message, instead of being restarted
to fail again, endlessly under `run.max_failures: -1`.

SIGTERM (`pipeline jobs stop`, `ray job stop`, a pod's termination) aborts the same way; the
caller marks the MLflow run KILLED and the process ends without a traceback.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TrainingError
from pipeline.events import EventSink, event_from_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watch:
    warn_after_s: float = 120.0
    fail_after_s: float | None = 1800.0
    poll_s: float = 1.0  # the longest a wake-up waits on the queue (each is a round trip)


class Stalled(TrainingError):
    """No progress from the workers for longer than `run.stall_timeout_s`."""


class Unrecoverable(TrainingError):
    """A worker reported that no restart can succeed (the message says why)."""


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, Ctrl-C) and aborted."""


def waiting_for() -> str:
    """What Ray is waiting on, in a line: pending placement groups and free/total resources."""
    import ray
    from ray.util import placement_group_table

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [
        f"{name} {free.get(name, 0):g} of {total[name]:g} free"
        for name in ("CPU", "GPU", "memory")
        if name in total and name != "memory"
    ]
    for pg in placement_group_table().values():
        if pg.get("state") != "PENDING":
            continue
        bundles = list(pg.get("bundles", {}).values())
        shown = ", ".join(f"{k}: {v:g}" for k, v in (bundles[0] if bundles else {}).items())
        parts.append(
            f"a placement group of {len(bundles)} x {{{shown}}} is pending (workers that do not "
            "fit the free resources)"
        )
    if free.get("CPU", 0) < 1:
        parts.append("no CPU is free, so Ray Data cannot start a read task (scaling.data_cpus)")
    return "; ".join(parts)


def _next_message(progress_queue, timeout: float | None) -> dict[str, Any] | None:
    """The next progress message, waiting up to `timeout` s (None: don't wait); None if none.
    A queue whose actor is gone (the run was stopped) counts as empty."""
    try:
        if timeout is None:
            return progress_queue.get_nowait()
        return progress_queue.get(timeout=timeout)
    except queue.Empty:
        return None
    except Exception as exc:  # ray.util.queue's own Empty, or its actor's death at a stop
        if type(exc).__name__ != "Empty":
            log.debug("progress queue unavailable: %s", exc)
        return None


class _Supervisor:
    def __init__(self, progress_queue, on_event: EventSink, watch: Watch, on_stop=None) -> None:
        self.queue, self.on_event, self.watch = progress_queue, on_event, watch
        self.on_stop = on_stop
        self.done = threading.Event()
        self.stalled: str | None = None
        self.fatal: str | None = None
        self.stopped = False
        self.can_abort = threading.current_thread() is threading.main_thread()
        self.aborted = False

    def forward(self, msg: dict[str, Any]) -> None:
        event = event_from_message(msg)
        if event is not None:
            self.on_event(event)

    def run(self) -> None:
        w = self.watch
        last = time.monotonic()
        next_warn = w.warn_after_s
        while not self.done.is_set():
            msg = _next_message(self.queue, timeout=w.poll_s)
            now = time.monotonic()
            if msg is not None and msg.get("kind") == "fatal":
                if self.fatal is None:
                    self.fatal = str(msg.get("text", "a worker cannot go on"))
                    log.error("%s", self.fatal)
                    self.abort()
                continue
            if msg is not None:
                self.forward(msg)
                last, next_warn = now, w.warn_after_s
                continue
            idle = now - last
            if idle >= next_warn:
                next_warn += w.warn_after_s
                log.warning("no progress from the workers for %.0f s; %s", idle, _safe_diagnosis())
            if w.fail_after_s is not None and idle >= w.fail_after_s and self.stalled is None:
                self.stalled = (
                    f"no progress from the workers for {idle:.0f} s (run.stall_timeout_s="
                    f"{w.fail_after_s:g}); {_safe_diagnosis()}"
                )
                self.abort()
        # Training has ended: what rank 0 put last is still in the queue.
        while (msg := _next_message(self.queue, timeout=None)) is not None:
            self.forward(msg)

    def abort(self) -> None:
        """Ray Train's graceful abort: its Ctrl-C handler on the main thread."""
        if self.can_abort:
            if not self.aborted:  # once: a second Ctrl-C could land after the fit returned
                self.aborted = True
                signal.raise_signal(signal.SIGINT)
        else:
            log.warning("the run cannot be aborted from here (not the main thread)")

    def on_sigterm(self, signum, frame) -> None:
        self.stopped = True
        log.warning("stop requested (signal %d): aborting the run", signum)
        if self.on_stop is not None:  # first: a job's driver is killed a few seconds after
            try:
                self.on_stop()
            except Exception as exc:
                log.warning("could not record the stop: %s", exc)
        signal.raise_signal(signal.SIGINT)


def _safe_diagnosis() -> str:
    try:
        return f"waiting for: {waiting_for()}"
    except Exception as exc:  # the diagnosis must never take the watchdog down
        return f"(Ray's state unavailable: {exc})"


def _aborted(error: BaseException | None) -> bool:
    """Ray Train's Ctrl-C handler aborts the controller, which then exits on purpose: `fit`
    raises its actor's death, marked as intentional."""
    text = str(error or "")
    return type(error).__name__ in ("ActorDiedError", "RayActorError") and (
        "exit_actor" in text or "intentional" in text
    )


def supervised_fit(
    trainer,
    progress_queue,
    on_event: EventSink,
    watch: Watch | None = None,
    on_stop: Callable[[], None] | None = None,
):
    """`trainer.fit()` under supervision (see the module docstring); its Result. `on_stop`
    runs first thing on a SIGTERM (the caller records the stop before anything else).

    Raises `Stalled` after the stall timeout, `Unrecoverable` when a worker reported that no
    restart can succeed, `Stopped` after a SIGTERM or Ctrl-C, and what
    `fit` raised otherwise."""
    sup = _Supervisor(progress_queue, on_event, watch or Watch(), on_stop)
    reader = threading.Thread(target=sup.run, name="trainer-progress", daemon=True)
    saved = {}
    if sup.can_abort:
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGTERM, sup.on_sigterm)
    error: BaseException | None = None
    result = None
    try:  # (the reader may abort at once: its SIGINT must land inside this try)
        reader.start()
        result = trainer.fit()
    except BaseException as exc:
        error = exc
    finally:
        sup.done.set()
        reader.join()
        for sig, handler in saved.items():  # Ray Train replaced SIGINT's during fit
            signal.signal(sig, handler)
    if sup.stalled is not None:
        raise Stalled(sup.stalled)
    if sup.fatal is not None:
        raise Unrecoverable(sup.fatal)
    if sup.stopped or isinstance(error, KeyboardInterrupt) or _aborted(error):
        raise Stopped("the run was stopped")
    if error is not None:
        raise error
    return result
