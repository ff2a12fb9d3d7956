"""Every error a user can cause, under one root.

The CLI catches `PipelineError` (and nothing broader), prints its message as one `error:` line and
exits 2: the message names the file, field or URI and what to do. Anything else that escapes is a
bug in the pipeline and shows its traceback.

Several classes also derive from `ValueError` or `RuntimeError`, as they did before they shared a
root, so library callers that caught those keep working. This module imports nothing heavy.
"""

from __future__ import annotations

import re


class PipelineError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(PipelineError, ValueError):
    """A configuration problem; the message names the file and every bad field."""


class UsageError(PipelineError, ValueError):
    """A command-line argument the command cannot use (a bad --size, an unknown source)."""


class StorageError(PipelineError, RuntimeError):
    """A storage problem, with the URI and the remedy in the message."""


class DatasetError(PipelineError, RuntimeError):
    """A dataset problem; the message names the URI or file and what to do."""


class ModelError(PipelineError, ValueError):
    """A model that cannot be built or loaded: unknown name, missing or mismatched weights."""


class UnknownModelError(ModelError):
    """A model name the zoo does not know; the message lists the valid names."""

    def __init__(self, name: str, valid: tuple[str, ...] | list[str]) -> None:
        super().__init__(f"unknown model {name!r}; choose one of: {', '.join(valid)}")
        self.name = name


class TrackingUnavailable(PipelineError, RuntimeError):
    """The MLflow tracking store cannot be reached or written; the message names the URI."""


class TrainingError(PipelineError, RuntimeError):
    """Training could not run or did not finish; the message says why and what to do."""


class TuneError(PipelineError, RuntimeError):
    """The search could not run or finish; the message says why and what to do."""


class RegistryError(PipelineError, ValueError):
    """A registry problem a user can fix; the message names the model, version or URI."""


class NightlyError(PipelineError, RuntimeError):
    """The nightly run failed; the message says at which step and why. The champion is as it was."""


class ServingError(PipelineError, ValueError):
    """A model cannot be loaded, pulled or served, or an input is unusable; the message names
    the URI, file or input and what to do."""


class IntegrityError(ServingError):
    """A pulled file is missing or does not match the sha256 recorded when it was pulled."""


class ClusterError(PipelineError, RuntimeError):
    """The cluster cannot be reached or refused a request; the message says what to do."""


class ScheduleError(PipelineError, ValueError):
    """A schedule the user can fix: a bad --at, a missing config, no crontab program."""


# How a PipelineError raised in a Ray task or worker reads once Ray has wrapped it: only as a
# line of the remote traceback in the wrapper's text (the exception object stays remote).
_REMOTE_PIPELINE_ERROR = re.compile(r"^pipeline\.errors\.\w+: (.+)$", re.MULTILINE)


def root_cause(exc: BaseException) -> str:
    """The innermost cause's message, without Ray's wrappers (for one-line reports). A
    `PipelineError` raised remotely (a Ray Data map task, a training worker) wins: the user reads
    what is wrong with their data, not Ray's advice on retries."""
    texts = [str(e) for e in _chain(exc)]
    for text in texts:
        found = _REMOTE_PIPELINE_ERROR.search(text)
        if found:
            return found.group(1).strip()
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _chain(exc: BaseException, depth: int = 0) -> list[BaseException]:
    """`exc`, its causes, and what Ray wraps: a task error's `cause`, a failed worker group's
    `worker_failures`."""
    if exc is None or depth > 20:
        return []
    out = [exc]
    for inner in (exc.__cause__, getattr(exc, "cause", None)):
        if isinstance(inner, BaseException):
            out += _chain(inner, depth + 1)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            if isinstance(inner, BaseException):
                out += _chain(inner, depth + 1)
    return out
