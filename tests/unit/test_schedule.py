"""`pipeline schedule nightly`: the crontab line, merging it into a crontab, and --install against a
fake `crontab` first on PATH (the real crontab is never touched)."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ScheduleError
from pipeline.schedule import MARKER, crontab_line, merge_crontab, nightly_entry, parse_time

runner = CliRunner()
PIPELINE_EXE = Path(sys.executable).absolute().parent / "pipeline"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "my project"  # a space: every path in the line must be quoted
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "jobs" / "configs" / "nightly.yaml").write_text("train:\n  epochs: 1\n")
    return root


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def fake_crontab(tmp_path: Path, monkeypatch) -> Path:
    """A `crontab` that keeps the user's table in a file; returns that file."""
    table = tmp_path / "crontab.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "crontab"
    script.write_text(
        "#!/bin/sh\n"
        f"table={shlex.quote(str(table))}\n"
        'case "$1" in\n'
        '  -l) [ -f "$table" ] || { echo "no crontab for $(id -un)" >&2; exit 1; }\n'
        '      cat "$table";;\n'
        '  -) cat > "$table";;\n'
        '  *) echo "fake crontab: unexpected $*" >&2; exit 2;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return table


def _entry(project: Path, state: Path, at: str = "02:00"):
    return nightly_entry(
        at, Path("jobs/configs/nightly.yaml"), project, pipeline_exe=PIPELINE_EXE, state_dir=state
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("02:00", (2, 0)), ("2:05", (2, 5)), ("23:59", (23, 59)), ("00:00", (0, 0))],
)
def test_parse_time_accepts_24_hour_times(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["24:00", "02:60", "2am", "02:00:00", "", "0200", "-1:00"])
def test_parse_time_rejects_anything_else(text):
    with pytest.raises(ScheduleError, match="HH:MM"):
        parse_time(text)


def test_line_runs_nightly_in_the_project_under_flock_with_a_log(project, state):
    line = crontab_line(_entry(project, state, at="02:30"))
    assert line.startswith("30 2 * * * ")
    assert line.endswith(MARKER)
    command = line.split(" ", 5)[5].removesuffix(MARKER)
    words = shlex.split(command)  # what cron's /bin/sh will see
    assert words[:3] == ["cd", str(project), "&&"]
    lock = str(state / "nightly.lock")
    flock = words.index("flock")
    assert words[flock : flock + 5] == ["flock", "-n", lock, str(PIPELINE_EXE), "nightly"]
    assert words[flock + 5 : flock + 7] == ["--config", str(project / "jobs/configs/nightly.yaml")]
    assert words[-3:] == [">>", str(state / "nightly.log"), "2>&1"]
    assert "mkdir" in words and str(state) in words  # cron's >> needs the log's directory


def test_percent_signs_are_escaped_for_cron(tmp_path, state):
    root = tmp_path / "100%"
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "jobs" / "configs" / "nightly.yaml").write_text("{}\n")
    line = crontab_line(_entry(root, state))
    assert "100\\%" in line
    assert "%" not in line.replace("\\%", "")


def test_merge_replaces_the_earlier_entry_and_keeps_the_rest():
    existing = (
        "MAILTO=ops@example.com\n"
        "15 * * * * /usr/bin/backup\n"
        f"0 1 * * * cd /old && pipeline nightly {MARKER}\n"
        "\n"
    )
    merged = merge_crontab(existing, f"0 2 * * * new {MARKER}")
    assert merged == (
        f"MAILTO=ops@example.com\n15 * * * * /usr/bin/backup\n0 2 * * * new {MARKER}\n"
    )
    assert merge_crontab(merged, f"0 2 * * * new {MARKER}") == merged  # idempotent
    assert merge_crontab("", "x") == "x\n"


def test_entry_errors_name_what_to_fix(project, state, tmp_path):
    with pytest.raises(ScheduleError, match=r"missing\.yaml not found"):
        nightly_entry("02:00", Path("missing.yaml"), project, PIPELINE_EXE, state_dir=state)
    with pytest.raises(ScheduleError, match="not found: run `pipeline schedule`"):
        nightly_entry(
            "02:00",
            Path("jobs/configs/nightly.yaml"),
            project,
            tmp_path / "no" / "pipeline",
            state_dir=state,
        )


def _schedule(*args: str):
    return runner.invoke(app, ["schedule", "nightly", *args])


def test_cli_prints_the_line_with_this_venvs_pipeline(project, fake_crontab, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(project.parent / "xdg"))
    result = _schedule("--at", "02:00", "--project-dir", str(project))
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("0 2 * * * cd ")
    assert shlex.quote(str(PIPELINE_EXE)) in line
    assert str(project.parent / "xdg" / "pipeline" / "nightly.log") in line
    assert "time zone" in result.stderr
    assert not fake_crontab.exists()  # printing installs nothing


def test_cli_install_is_idempotent_and_keeps_other_entries(project, fake_crontab, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(project.parent / "xdg"))
    args = ("--project-dir", str(project), "--install")

    first = _schedule("--at", "01:00", *args)
    assert first.exit_code == 0, first.output
    assert "added a" in first.stdout
    fake_crontab.write_text(fake_crontab.read_text() + "15 * * * * /usr/bin/backup\n")

    second = _schedule("--at", "02:00", *args)
    assert second.exit_code == 0, second.output
    assert "replaced the earlier" in second.stdout
    third = _schedule("--at", "02:00", *args)
    assert third.exit_code == 0, third.output

    lines = fake_crontab.read_text().splitlines()
    ours = [line for line in lines if line.endswith(MARKER)]
    assert len(ours) == 1 and ours[0].startswith("0 2 * * * ")
    assert "15 * * * * /usr/bin/backup" in lines


@pytest.mark.parametrize("at", ["25:00", "2pm"])
def test_cli_bad_time_exits_2(project, at):
    result = _schedule("--at", at, "--project-dir", str(project))
    assert result.exit_code == 2
    assert "error:" in result.stderr and "HH:MM" in result.stderr


def test_cli_without_crontab_exits_2(project, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = _schedule("--project-dir", str(project), "--install")
    assert result.exit_code == 2
    assert "crontab is not installed" in result.stderr


def test_cli_missing_config_exits_2(project):
    result = _schedule("--project-dir", str(project), "--config", "jobs/configs/nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml not found" in result.stderr
