"""Starting the local Ray early, on a background thread (`pipeline train`'s start-up overlap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train import ray_runtime

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the test session has its own Ray, and one process holds one.
EARLY_START = """
import signal, threading
import ray
from pipeline.config import load_config
from pipeline.train import ray_runtime as rr

cfg = load_config(None, ["scaling.num_cpus=2"])
early = rr.start_local_ray(cfg)
assert early is not None
assert rr.start_local_ray(cfg) is None, "a second start while one is under way"
assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM handler on the main thread"
rr.init_ray(cfg)  # waits for the background start instead of starting a second Ray
assert ray.is_initialized()
# The daemons outlive the main thread's work: the starting thread stays parked.
assert any(t.name == "pipeline-ray-start" for t in threading.enumerate())
assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
ray.shutdown()

rr.start_local_ray(cfg)
rr.stop_early_ray()  # the error path: finish the start, then stop that Ray
assert not ray.is_initialized()

# A Ray this process already has (a caller's, a test session's) is used, never stopped.
ray.init(num_cpus=1, include_dashboard=False)
assert rr.start_local_ray(cfg) is None, "no early start beside a running Ray"
rr.stop_early_ray()
early = rr._early = rr.EarlyStart(cfg)  # one that began just before the caller's ray.init
early._thread.start()
assert early.wait(60) and not early.started
rr.stop_early_ray()
assert ray.is_initialized(), "stop_early_ray stopped a Ray it did not start"
ray.shutdown()
print("ok")
"""


@pytest.mark.slow
def test_background_start_is_joined_by_init_ray_and_stopped_on_errors():
    proc = subprocess.run(
        [sys.executable, "-c", EARLY_START],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert "SIGTERM handler is not set" not in proc.stderr


def test_no_background_start_when_joining_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_runtime.start_local_ray(load_config(None, [])) is None
    monkeypatch.delenv("RAY_ADDRESS")
    cfg = load_config(None, ["scaling.ray_address=127.0.0.1:6379"])
    assert ray_runtime.start_local_ray(cfg) is None
    assert ray_runtime._early is None  # nothing to wait for
