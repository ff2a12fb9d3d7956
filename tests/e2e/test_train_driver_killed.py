"""The driver of `pipeline train` killed outright (SIGKILL: no handler, no clean-up, as when its
machine or pod goes away) with checkpoints on S3: the same command run again resumes from the
last checkpoint in the same MLflow run, and every epoch is logged exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.support import digits_on_s3_command, logged_epochs

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def kill_group(proc: subprocess.Popen) -> None:
    with_pgid = os.getpgid(proc.pid)
    os.killpg(with_pgid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.timeout(900)
def test_a_killed_driver_resumes_from_s3_with_each_epoch_logged_once(
    tmp_path, digits_uri, s3_server
):
    bucket = s3_server.new_bucket()
    db = tmp_path / "mlflow.db"
    command = digits_on_s3_command(
        digits_uri, bucket, db, "run.name=killed", "scaling.num_workers=1"
    )
    env = {**os.environ, **s3_server.env(), "RAY_ADDRESS": ""}  # its own local Ray
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while len(logged_epochs(db)) < 2:  # epochs 0 and 1 logged: a checkpoint is on S3
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second epoch within 600 s"
            time.sleep(0.5)
    finally:
        kill_group(first)
    before = logged_epochs(db)
    assert 2 <= len(before) < 4, before

    again = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    epochs = logged_epochs(db)
    (run_id,) = {run for run, _ in epochs}  # one MLflow run across both drivers
    assert [step for _, step in epochs] == [0, 1, 2, 3], "each epoch logged exactly once"
    resumed = [step for _, step in logged_epochs(db, "resumed_from_epoch")]
    assert resumed, "the second driver resumed from a checkpoint instead of starting over"
    with sqlite3.connect(db) as con:
        (status,) = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    assert status == "FINISHED"
