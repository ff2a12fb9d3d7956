"""`pipeline jobs logs --follow` and `submit --wait` stream a job's log through the job API's tail
instead of re-reading the whole log, never outlive the job, and lose nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pipeline import cluster


class FakeJobs:
    """The parts of Ray's JobSubmissionClient that `follow` uses, for one job."""

    def __init__(self, chunks: list[str], *, hang: bool = False, tail_fails: bool = False):
        self.chunks, self.hang, self.tail_fails = chunks, hang, tail_fails
        self.status_calls = 0
        self.full_reads = 0

    def get_address(self) -> str:
        return "http://127.0.0.1:1"

    async def tail_job_logs(self, job_id: str):
        if self.tail_fails:
            raise ConnectionError("websocket refused")
        for chunk in self.chunks:
            await asyncio.sleep(0.01)
            yield chunk
        if self.hang:  # a stream that never ends: a silent head
            await asyncio.sleep(3600)

    def get_job_info(self, job_id: str):
        self.status_calls += 1
        done = self.status_calls >= 2
        return SimpleNamespace(
            submission_id=job_id,
            job_id=None,
            status="SUCCEEDED" if done else "RUNNING",
            message="",
            entrypoint="python jobs/train.py",
            start_time=None,
            end_time=None,
        )

    def get_job_logs(self, job_id: str) -> str:
        self.full_reads += 1
        return "".join(self.chunks) + "final line the stream missed\n"


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(cluster, "TAIL_STATUS_S", 0.05)
    monkeypatch.setattr(cluster, "TAIL_GRACE_S", 0.2)
    monkeypatch.setattr(cluster, "POLL_MIN_S", 0.01)


def test_the_log_streams_and_the_rest_is_fetched_once():
    jobs = FakeJobs(["epoch 1\n", "epoch 2\n"])
    out: list[str] = []
    state = cluster.follow(jobs, "raysubmit_1", out.append)
    assert state.status == "SUCCEEDED"
    assert "".join(out) == "epoch 1\nepoch 2\nfinal line the stream missed\n"
    assert jobs.full_reads == 1  # not once per poll


def test_a_stream_that_never_ends_stops_with_the_job():
    jobs = FakeJobs(["epoch 1\n"], hang=True)
    out: list[str] = []
    assert cluster.follow(jobs, "raysubmit_2", out.append).status == "SUCCEEDED"
    assert out[0] == "epoch 1\n"


def test_without_a_websocket_the_log_is_polled():
    jobs = FakeJobs(["epoch 1\n"], tail_fails=True)
    out: list[str] = []
    assert cluster.follow(jobs, "raysubmit_3", out.append).status == "SUCCEEDED"
    assert "".join(out) == "epoch 1\nfinal line the stream missed\n"
