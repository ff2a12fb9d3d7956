"""Checkpoint upload: how long the training loop stalls per report, sync against async upload.

Starts an S3 server (moto) and a local Ray, both on 127.0.0.1, then runs a one-worker Ray Train
V2 TorchTrainer once per `run.checkpoint_upload` mode. Its loop alternates a fixed amount of
"training" (matrix products on one thread) with the pipeline's own `_report` of a TrainState
whose checkpoint is about `--mb` MB, to `s3://<bucket>/...` as `run.storage_path` would be. Per
report it measures the stall: the time inside `_report` (writing the checkpoint locally, the
report barrier and, when sync, the upload). The training time between reports shows what an
upload thread running beside the training costs it.

    .venv/bin/python jobs/bench/checkpoint_upload.py [--mb 64] [--reports 4] [--out FILE.json]

Prints a table; writes JSON. Nothing leaves 127.0.0.1; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("sync", "async")
BUCKET = "bench-checkpoints"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto exited ({proc.returncode}); see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"moto did not listen on 127.0.0.1:{port} within 60 s")


def _state(mb: float):
    """A TrainState whose checkpoint is about `mb` MB (weights plus SGD momentum, fp32)."""
    import torch
    from torch import nn

    from pipeline.config import TrainConfig
    from pipeline.train.optim import BatchMixer, build_optimizer, build_scheduler
    from pipeline.train.state import TrainState

    side = max(8, int((mb * 2**20 / 8) ** 0.5))  # weights + momentum: 2 x 4 bytes per number
    model = nn.Linear(side, side, bias=False)
    cfg = TrainConfig(epochs=1, schedule="constant")
    optimizer = build_optimizer(cfg, [{"params": list(model.parameters()), "weight_decay": 0.0}])
    model(torch.zeros(1, side)).sum().backward()
    optimizer.step()  # creates the momentum buffer
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, 1),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        mixer=BatchMixer(0.0, 0.0, 2),
    )


def _train_work(products: int) -> float:
    import torch

    a = torch.randn(384, 384)
    started = time.perf_counter()
    for _ in range(products):
        a = torch.tanh(a @ a)
    return time.perf_counter() - started


def _worker(config: dict) -> None:
    import torch

    from pipeline.train.loop import _report

    torch.set_num_threads(1)
    state = _state(config["mb"])
    with tempfile.TemporaryDirectory() as d:
        started = time.perf_counter()
        size = state.save(d).stat().st_size
        save_s = time.perf_counter() - started
    stalls, train = [], []
    loop_started = time.perf_counter()
    for epoch in range(config["reports"]):
        train.append(_train_work(config["products"]))
        state.epoch = epoch + 1
        started = time.perf_counter()
        _report({"epoch": epoch, "val_acc": 0.0}, state, True, config["upload"])
        stalls.append(time.perf_counter() - started)
    result = {
        "checkpoint_mb": size / 2**20,
        "local_save_s": save_s,
        "stall_s": stalls,
        "train_s": train,
        "loop_s": time.perf_counter() - loop_started,
    }
    Path(config["out"]).write_text(json.dumps(result))


def run_mode(mode: str, args, loc, workdir: Path) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = workdir / f"{mode}.json"
    started = time.perf_counter()
    TorchTrainer(
        _worker,
        train_loop_config={
            "mb": args.mb,
            "reports": args.reports,
            "products": args.products,
            "upload": mode,
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(
            name=f"bench-{mode}-{int(time.time())}",
            storage_path=loc.path,
            storage_filesystem=loc.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=args.reports),
        ),
    ).fit()
    result = json.loads(out.read_text())
    result["fit_s"] = time.perf_counter() - started  # uploads included: Ray waits for them
    return result


def count_checkpoints(endpoint: str) -> dict[str, int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    counts: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/checkpoint.pt"):
                mode = obj["Key"].split("/")[1].split("-")[1]
                counts[mode] = counts.get(mode, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=64.0, help="checkpoint size (MB)")
    parser.add_argument("--reports", type=int, default=4, help="reports (epochs) per mode")
    parser.add_argument("--products", type=int, default=150, help="training work per epoch")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    os.environ.update(CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        moto, endpoint = start_moto(workdir / "moto.log")
        try:
            import boto3
            import ray
            import ray._private.ray_constants

            from pipeline.config import StorageConfig, load_config
            from pipeline.storage import resolve
            from pipeline.train.ray_runtime import init_ray

            os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray's daemons inherit it
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket=BUCKET
            )
            # The node's address is 127.0.0.1, not the machine's outward interface.
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
            init_ray(load_config(None, ["scaling.num_workers=1", "scaling.num_cpus=2"]))
            loc = resolve(f"s3://{BUCKET}/runs", StorageConfig(endpoint_url=endpoint))
            results = {mode: run_mode(mode, args, loc, workdir) for mode in MODES}
            counts = count_checkpoints(endpoint)
            ray.shutdown()
        finally:
            moto.terminate()
            moto.wait(30)
    summary = {
        "checkpoint_mb": results["sync"]["checkpoint_mb"],
        "reports": args.reports,
        "checkpoints_in_s3": counts,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "modes": results,
    }
    print(f"checkpoint {summary['checkpoint_mb']:.1f} MB, {args.reports} reports per mode")
    print(f"{'mode':6} {'stall mean':>11} {'stall max':>10} {'train/epoch':>12} {'fit':>7}")
    for mode, r in results.items():
        print(
            f"{mode:6} {statistics.mean(r['stall_s']):10.2f}s {max(r['stall_s']):9.2f}s "
            f"{statistics.mean(r['train_s']):11.2f}s {r['fit_s']:6.1f}s"
        )
    print(f"checkpoints in S3: {counts}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
