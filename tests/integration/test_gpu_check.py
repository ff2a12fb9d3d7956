"""`make gpu-check`'s script at toy size on the CPU (`--dry-run`), so it cannot rot between the
sessions that have a GPU machine to run it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_check_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs/bench/gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,  # ~3-5 min on 2 cores; the script's own checks time out well before
    )
    assert out.exists(), done.stdout + done.stderr
    report = json.loads(out.read_text())
    failed = {k: v for k, v in report["checks"].items() if not v.get("ok")}
    assert not failed and done.returncode == 0, json.dumps(failed, indent=2)[-4000:]
    checks = report["checks"]
    assert list(checks) == [
        "env", "ceiling", "pipeline", "jpeg", "fault", "compile", "dy_ratio", "pull",
    ]  # fmt: skip
    assert checks["fault"]["killed"] and checks["fault"]["val_acc_steps"] == [0, 1]
    assert checks["compile"]["graphs_after_each_epoch"][0] >= 1
    assert checks["pull"]["torchscript"]["images_off"] <= 1
    # the photograph path ran (JPEG import, crops, evaluate), not just its slot
    assert "skipped" not in checks["jpeg"] and checks["jpeg"]["images_off"] <= 1
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
