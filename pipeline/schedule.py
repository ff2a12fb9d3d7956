"""The nightly job from cron, for machines without Kubernetes (`pipeline schedule nightly`).

Pure functions build the crontab entry and merge it into a user's crontab text; `read_crontab` and
`write_crontab` are the only parts that run `crontab`. The entry

    0 2 * * * cd /project && mkdir -p ~/.local/state/pipeline && flock -n LOCK \
        /project/.venv/bin/pipeline nightly --config jobs/configs/nightly.yaml >> LOG 2>&1 \
        # pipeline-nightly

runs in the project directory (relative paths in the config resolve as they do by hand), never
overlaps a run still going (`flock -n` skips the night instead of queueing), and appends to a log.
It ends with a marker comment, so installing again replaces the previous entry instead of adding a
second one. Cron reads the time in the machine's time zone.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ScheduleError

MARKER = "# pipeline-nightly"
_TIME = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass(frozen=True)
class NightlyEntry:
    """Everything the crontab line is made of, all absolute paths."""

    hour: int
    minute: int
    project_dir: Path
    pipeline_exe: Path
    config: Path
    log_file: Path
    lock_file: Path


def parse_time(text: str) -> tuple[int, int]:
    """'02:00' -> (2, 0); anything but a 24-hour HH:MM is a ScheduleError."""
    match = _TIME.fullmatch(text.strip())
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ScheduleError(f"--at {text!r}: expected a 24-hour time HH:MM, for example 02:00")
    return int(match[1]), int(match[2])


def default_pipeline_exe() -> Path:
    """The `pipeline` script beside the running interpreter (the venv's bin/, not resolved:
    resolving the venv's python symlink would leave the venv)."""
    return Path(sys.executable).absolute().parent / "pipeline"


def default_state_dir() -> Path:
    """Where the log and the lock go: $XDG_STATE_HOME/pipeline, else ~/.local/state/pipeline."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "pipeline"


def nightly_entry(
    at: str,
    config: Path,
    project_dir: Path,
    pipeline_exe: Path | None = None,
    log_file: Path | None = None,
    state_dir: Path | None = None,
) -> NightlyEntry:
    """Check the inputs and resolve every path; relative `config` is taken from `project_dir`."""
    hour, minute = parse_time(at)
    project_dir = project_dir.expanduser().absolute()
    if not project_dir.is_dir():
        raise ScheduleError(f"project directory {project_dir} does not exist")
    config = config.expanduser()
    config = config if config.is_absolute() else project_dir / config
    if not config.is_file():
        raise ScheduleError(f"config {config} not found; pass the nightly job's YAML with --config")
    exe = (pipeline_exe or default_pipeline_exe()).absolute()
    if not exe.is_file():
        raise ScheduleError(
            f"{exe} not found: run `pipeline schedule` with the project's installed `pipeline` "
            "(e.g. .venv/bin/pipeline), which cron will call by that absolute path"
        )
    state = (state_dir or default_state_dir()).expanduser().absolute()
    log = (log_file or state / "nightly.log").expanduser().absolute()
    return NightlyEntry(hour, minute, project_dir, exe, config, log, state / "nightly.lock")


def _cron_arg(path: Path | str) -> str:
    """Shell-quoted, with cron's special `%` (a newline in the command field) escaped."""
    return shlex.quote(str(path)).replace("%", r"\%")


def crontab_line(entry: NightlyEntry) -> str:
    """The crontab line (one line, no newline) that runs the nightly job."""
    q = _cron_arg
    dirs = sorted({str(entry.lock_file.parent), str(entry.log_file.parent)})
    command = (
        f"cd {q(entry.project_dir)} && mkdir -p {' '.join(q(d) for d in dirs)} && "
        f"flock -n {q(entry.lock_file)} {q(entry.pipeline_exe)} nightly --config {q(entry.config)}"
        f" >> {q(entry.log_file)} 2>&1"
    )
    return f"{entry.minute} {entry.hour} * * * {command} {MARKER}"


def merge_crontab(existing: str, line: str) -> str:
    """`existing` with every earlier pipeline-nightly entry replaced by `line` (idempotent)."""
    kept = [old for old in existing.splitlines() if not old.rstrip().endswith(MARKER)]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join([*kept, line]) + "\n"


def read_crontab() -> str:
    """The current user's crontab ('' when they have none)."""
    result = _run_crontab(["-l"])
    if result.returncode != 0:
        if "no crontab" in result.stderr.lower():
            return ""
        raise ScheduleError(f"`crontab -l` failed: {result.stderr.strip() or result.returncode}")
    return result.stdout


def write_crontab(text: str) -> None:
    """Replace the current user's crontab with `text`."""
    result = _run_crontab(["-"], stdin=text)
    if result.returncode != 0:
        raise ScheduleError(f"`crontab -` refused the new crontab: {result.stderr.strip()}")


def install(line: str) -> bool:
    """Put `line` into the user's crontab; True when an earlier entry was replaced."""
    existing = read_crontab()
    replaced = any(old.rstrip().endswith(MARKER) for old in existing.splitlines())
    write_crontab(merge_crontab(existing, line))
    return replaced


def _run_crontab(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["crontab", *args], input=stdin, capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        raise ScheduleError(
            "crontab is not installed (Debian/Ubuntu: apt-get install cron); on Kubernetes use "
            "infra/k8s/cronjob-nightly.yaml instead"
        ) from None
