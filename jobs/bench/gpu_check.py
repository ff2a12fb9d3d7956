"""`make gpu-check`: is training on a GPU worker correct and fast? One script, one JSON file.

Made for one GPU machine (one H200-class GPU, 16 cores) in under 8 minutes; each check has its
own timeout, so a hang costs that check, not the rest:

  env         CUDA, the GPU, bf16 support, NCCL version, cores, library versions
  ceiling     a bare torchvision-style loop: ResNet-50, bf16, channels_last, batch 256, the data
              already on the GPU (images/s)
  pipeline    `pipeline train` of the same model and batch through Ray Train (`use_gpu`) on a
              generated uint8 dataset; pass: pipeline / ceiling >= 0.90
  jpeg        the photograph path: generated JPEGs of mixed sizes imported on every core, trained
              on RandomResizedCrop(224) uint8 crops normalised on the GPU, the test split
              re-scored by `pipeline evaluate`'s path; pass: images/s / the bare loop at 224
              >= 0.75, and evaluate within 1% of the run's test accuracy
  fault       fp16 + GradScaler + EMA + MixUp; a worker is killed mid-epoch (max_failures 1),
              the run resumes from its checkpoint; pass: every epoch logged exactly once
  compile     `train.compile` with a dy_ model: no recompilation after the first epoch
  dy_ratio    dy_resnet50 / resnet50 training step time; pass: <= 1.5
  pull        the GPU-trained model pulled (TorchScript, ONNX) and evaluated with no GPU visible
              (CUDA_VISIBLE_DEVICES=""); pass: test accuracy within one image of the run's

`--dry-run` runs the same checks at toy size on the CPU (a test does, so the script cannot rot).
The checks share one process (imports and Ray start once) and each has a SIGALRM timeout.
On the lent GPU machine (no Ray or MLflow installed) run it through `jobs/bench/gpu_env.sh`,
which unpacks the wheels `jobs/bench/gpu_wheels.sh` fetched; `make gpu-check` does both.
Results: jobs/bench/results/gpu_check.json (or --out), and a copy under $OUT when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Size:
    """What one run of the checks trains: the real recipe, or a toy one for `--dry-run`."""

    model: str
    dy_model: str
    image: int
    batch: int
    rows: int  # train rows of the generated dataset
    steps: int  # timed steps of the bare loops
    epochs: int
    device: str
    precision: str  # of the throughput checks
    fault_precision: str
    compile_backend: str
    workers: int
    photos: int  # train rows of the generated JPEG dataset
    crop: int  # its RandomResizedCrop / CenterCrop size


GPU = Size(
    "resnet50", "dy_resnet50", 128, 256, 10_240, 30, 4, "cuda", "bf16", "fp16", "inductor", 1,
    photos=2_048, crop=224,
)  # fmt: skip
DRY = Size(
    "cifar_resnet20", "dy_cifar_resnet20", 16, 32, 256, 4, 2, "cpu", "fp32", "fp32", "eager", 1,
    photos=128, crop=16,
)  # fmt: skip
CLASSES = 10
TIMEOUTS_S = {"env": 60, "ceiling": 120, "pipeline": 150, "jpeg": 180, "fault": 150,
              "compile": 240, "dy_ratio": 90, "pull": 90}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The checks. Each returns a dict; "ok" is False when a threshold is missed.


def check_env(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cores": os.cpu_count(),
    }
    for name in ("torchvision", "ray", "mlflow", "pyarrow"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    out["ok"] = (
        out["ray"] is not None
        and out["mlflow"] is not None
        and (size.device == "cpu" or out["cuda_available"])
    )
    return out


def _model(name: str, size: Size):
    from pipeline.config import ModelConfig
    from pipeline.models.zoo import build_model

    return build_model(
        ModelConfig(name=name), in_channels=3, num_classes=CLASSES, image_size=size.image
    )


def _time_steps(name: str, size: Size, steps: int) -> float:
    """Seconds per training step of a bare loop (data already on the device): the ceiling."""
    import torch

    seconds = _measure_steps(name, size, steps)
    if size.device == "cuda":  # leave the GPU's memory to the Ray workers of the next checks
        torch.cuda.empty_cache()
    return seconds


def _measure_steps(name: str, size: Size, steps: int) -> float:
    import torch

    from pipeline.train.optim import autocast_context

    device = torch.device(size.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = _model(name, size).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(size.batch, 3, size.image, size.image, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (size.batch,), device=device)

    def step() -> None:
        with autocast_context(size.precision, device.type):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 5)):  # warm-up: cudnn autotuning, allocator, compilation
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_ceiling(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    seconds = _time_steps(size.model, size, size.steps)
    return {"model": size.model, "batch": size.batch, "image": size.image,
            "images_per_s": size.batch / seconds, "ok": True}  # fmt: skip


def _dataset(size: Size, work: Path) -> str:
    """A generated uint8 dataset (random pixels, labels from a few bright pixels, so a model can
    learn something) written with `pipeline data import numpy`."""
    import numpy as np

    from pipeline.data.sources import WriteOptions, import_numpy

    uri = str(work / "data")
    if Path(uri, "manifest.json").exists():
        return uri
    rng = np.random.default_rng(0)
    n = size.rows * 10 // 8  # the importer keeps 10% for val and 10% for test
    y = rng.integers(0, CLASSES, n)
    x = rng.integers(0, 64, (n, size.image, size.image, 3), dtype=np.uint8)
    x[np.arange(n), y % size.image, :, y % 3] = 255  # the label, written into the pixels
    npz = work / "data.npz"
    np.savez(npz, x=x, y=y)
    import_numpy(npz, WriteOptions(out=uri))
    return uri


def _overrides(size: Size, work: Path, data: str, name: str, model: str, *extra: str) -> list[str]:
    return [
        f"data.uri={data}",
        "data.prepare=",
        "data.resize=",
        "data.augment.random_crop_padding=0",
        f"model.name={model}",
        f"train.batch_size={size.batch}",
        f"train.epochs={size.epochs}",
        f"train.precision={size.precision}",
        "train.lr=0.05",
        "train.label_smoothing=0.0",
        f"scaling.num_workers={size.workers}",
        f"scaling.use_gpu={'true' if size.device == 'cuda' else 'false'}",
        f"scaling.cpus_per_worker={8 if size.device == 'cuda' else 1}",
        f"run.storage_path={work / 'runs'}",
        f"run.name={name}",
        f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.experiment=gpu-check-{name}",
        *extra,
    ]


def _metric_history(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def check_pipeline(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.registry import register_training
    from pipeline.train.trainer import run_training

    data = _dataset(size, work)
    overrides = _overrides(
        size, work, data, "pipeline", size.model, "registry.model_name=gpu-check"
    )
    cfg = load_config(None, overrides)
    summary = register_training(cfg, run_training(cfg))
    rates = [v for step, v in _metric_history(cfg, summary.run_id, "images_per_s") if step >= 1]
    rate = statistics.median(rates)
    ceiling = state.get("ceiling", {}).get("images_per_s")
    ratio = rate / ceiling if ceiling else None
    state["model_uri"] = f"models:/{summary.registered_name}/{summary.model_version}"
    state["test_acc"] = summary.metrics["test_acc"]
    state["data"] = data
    # On the toy CPU run the ratio is measured but not judged: 2 shared cores say nothing.
    ok = ratio is not None and (ratio >= 0.90 or size.device == "cpu")
    return {"images_per_s_per_epoch": rates, "images_per_s": rate, "ceiling": ceiling,
            "ratio": ratio, "test_acc": summary.metrics["test_acc"], "ok": ok}  # fmt: skip


def _photo_dataset(size: Size, work: Path) -> str:
    """Generated photographs (mixed sizes around 500x375, cut from scikit-learn's sample photos,
    `jobs/bench/ingest.py`'s generator) imported as JPEG on every core."""
    from jobs.bench.ingest import generate  # the ingest benchmark's photos
    from pipeline.data.photos import ImportOptions
    from pipeline.data.sources import WriteOptions, import_image_folder

    uri = str(work / "photos")
    if Path(uri, "manifest.json").exists():
        return uri
    generate(work / "photo-src", size.photos * 10 // 8)  # 10% val, 10% test
    import_image_folder(
        work / "photo-src",
        WriteOptions(out=uri, encoding="jpeg", shard_rows=256),
        images=ImportOptions(),  # every core
    )
    return uri


def check_jpeg(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The photograph path: JPEGs of mixed sizes imported on every core, trained on
    RandomResizedCrop(`size.crop`) uint8 crops from Ray Data normalised on the worker's device,
    then `pipeline evaluate`'s path (centre crops, a thread per core, on the GPU) recomputing the
    run's test accuracy. images/s is judged against the bare loop at the crop size."""
    import dataclasses

    from pipeline.config import load_config
    from pipeline.evaluation import evaluate_model
    from pipeline.train.trainer import run_training

    started = time.perf_counter()
    data = _photo_dataset(size, work)
    import_s = time.perf_counter() - started
    extra = ["data.resize=", f"data.crop.size={size.crop}", "registry.model_name="]
    cfg = load_config(None, _overrides(size, work, data, "jpeg", size.model, *extra))
    summary = run_training(cfg)
    rates = [v for step, v in _metric_history(cfg, summary.run_id, "images_per_s") if step >= 1]
    rate = statistics.median(rates)
    ceiling = size.batch / _time_steps(
        size.model, dataclasses.replace(size, image=size.crop), size.steps
    )
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    try:
        scored = evaluate_model(f"runs:/{summary.run_id}/model", data)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    off_by = abs(scored["acc"] - summary.metrics["test_acc"]) * scored["count"]
    ratio = rate / ceiling
    # bf16 autocast in training's test pass against fp32 in evaluate: a few flips are allowed
    ok = off_by <= max(1.0, 0.01 * scored["count"]) + 1e-6 and (
        ratio >= 0.75 or size.device == "cpu"
    )
    return {"crop": size.crop, "import_s": round(import_s, 1), "images_per_s": rate,
            "ceiling_at_crop": ceiling, "ratio": ratio, "test_acc": summary.metrics["test_acc"],
            "evaluate_acc": scored["acc"], "images_off": off_by, "ok": ok}  # fmt: skip


def check_fault(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.train.callbacks import KillWorkerOnce
    from pipeline.train.trainer import run_training

    data = _dataset(size, work)
    extra = [f"train.precision={size.fault_precision}", "train.ema_decay=0.9",
             "train.mixup_alpha=0.2", "run.max_failures=1", "registry.model_name="]  # fmt: skip
    cfg = load_config(
        None,
        _overrides(size, work, data, "fault", size.model, *extra),
    )
    marker = work / "killed"
    summary = run_training(cfg, loop_callbacks=[KillWorkerOnce(epoch=1, marker=str(marker))])
    steps = [step for step, _ in _metric_history(cfg, summary.run_id, "val_acc")]
    return {"killed": marker.exists(), "val_acc_steps": steps, "precision": size.fault_precision,
            "ok": marker.exists() and steps == list(range(size.epochs))}  # fmt: skip


def check_compile(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The loop's own epoch function on a compiled dy_ model, the temperature annealed every
    epoch as `train_loop_per_worker` does: graphs compiled after epoch 0 are recompilations."""
    import torch
    import torch._dynamo

    from pipeline.config import TrainConfig
    from pipeline.models.dynamic_conv import set_temperature, temperature_at
    from pipeline.train.loop import StepOptions, train_one_epoch
    from pipeline.train.optim import BatchMixer, build_optimizer, build_scheduler, make_grad_scaler
    from pipeline.train.state import TrainState

    device = torch.device(size.device)
    model = _model(size.dy_model, size).to(device, memory_format=torch.channels_last)
    epochs, steps = 4, 3
    tcfg = TrainConfig(epochs=epochs, lr=0.05, precision=size.precision)
    opt = build_optimizer(tcfg, [{"params": list(model.parameters()), "weight_decay": 0.0}])
    scaler = make_grad_scaler(size.precision, device.type)
    state_ = TrainState(model, opt, build_scheduler(tcfg, opt, steps), scaler, BatchMixer(0, 0, 2))
    opts = StepOptions(device, CLASSES, steps, size.precision, channels_last=True)
    batch = {"image": torch.randn(size.batch, 3, size.image, size.image),
             "label": torch.randint(0, CLASSES, (size.batch,))}  # fmt: skip
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    forward = torch.compile(model, backend=size.compile_backend)
    graphs = []
    for epoch in range(epochs):
        set_temperature(model, temperature_at(epoch, 30.0, 1.0, epochs))
        train_one_epoch(state_, forward, [batch] * steps, opts, epoch)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    return {"graphs_after_each_epoch": graphs, "recompiles": dict(counters["recompiles"]),
            "ok": graphs[0] > 0 and graphs[-1] == graphs[0]}  # fmt: skip


def check_dy_ratio(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    base = _time_steps(size.model, size, size.steps)
    dy = _time_steps(size.dy_model, size, size.steps)
    ratio = dy / base
    return {"step_s": {size.model: base, size.dy_model: dy}, "ratio": ratio,
            "ok": ratio <= 1.5 or size.device == "cpu"}  # fmt: skip


def check_pull(size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The model pulled as TorchScript and ONNX (`pipeline pull`'s function), then scored on the
    test split in a process that sees no GPU: the exports must not need the training device."""
    from pipeline.serving import pull

    if "model_uri" not in state:
        return {"skipped": "the pipeline check logged no model", "ok": False}
    formats = ("torchscript", "onnx")
    dirs = [str(work / f"pulled-{fmt}") for fmt in formats]
    for fmt, dest in zip(formats, dirs, strict=True):
        pull(state["model_uri"], dest, fmt, tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    score = [sys.executable, __file__, "--score-pulled", state["data"], *dirs]
    done = subprocess.run(score, env=env, check=True, capture_output=True, text=True, timeout=300)
    results = json.loads(done.stdout.splitlines()[-1])
    out: dict[str, Any] = {"test_acc": state["test_acc"], "ok": True}
    for fmt, result in zip(formats, results, strict=True):
        off_by = abs(result["acc"] - state["test_acc"]) * result["count"]
        out[fmt] = {**result, "images_off": off_by}
        out["ok"] = out["ok"] and result["cuda_visible"] is False and off_by <= 1.0 + 1e-6
    return out


def score_pulled(data: str, model_dir: str) -> dict[str, Any]:
    """Test-split accuracy of a pulled model through `pipeline.serving.load` (raw pixels in)."""
    import torch

    from pipeline.data.shards import decode_images, read_manifest, read_shard
    from pipeline.serving import load
    from pipeline.storage import resolve

    predictor = load(model_dir)
    manifest = read_manifest(data)
    root = resolve(data)
    correct = count = 0
    for shard in manifest.split("test").shards:
        table = read_shard(root.join(shard.path))
        pixels = decode_images(table.column("image").to_pylist(), manifest.image)
        labels = table.column("label").to_numpy()
        correct += int((predictor.logits(pixels).argmax(axis=1) == labels).sum())
        count += len(labels)
    return {"acc": correct / count, "count": count, "cuda_visible": torch.cuda.is_available()}


CHECKS = {
    "env": check_env,
    "ceiling": check_ceiling,
    "pipeline": check_pipeline,
    "jpeg": check_jpeg,
    "fault": check_fault,
    "compile": check_compile,
    "dy_ratio": check_dy_ratio,
    "pull": check_pull,
}


# ---------------------------------------------------------------------------------------------
# Running: every check in this process (one start-up: imports and Ray cost tens of seconds),
# each under its own SIGALRM timeout; a failure is recorded and the next check runs.


class CheckTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CheckTimeout


def run_check(name: str, size: Size, work: Path, state: dict[str, Any]) -> dict[str, Any]:
    import traceback

    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    timeout = TIMEOUTS_S[name] * (3 if size.device == "cpu" else 1)  # 2 shared cores: slower
    signal.alarm(timeout)
    try:
        result = CHECKS[name](size, work, state)
    except CheckTimeout:
        result = {"ok": False, "error": f"timed out after {timeout} s"}
    except Exception as exc:  # recorded in the JSON; the remaining checks still run
        result = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)
    result["seconds"] = round(time.perf_counter() - started, 2)
    state[name] = result
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", default=str(REPO / "jobs/bench/results/gpu_check.json"))
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="a subset of checks")
    parser.add_argument("--score-pulled", nargs="+", help=argparse.SUPPRESS)  # DATA DIR...
    args = parser.parse_args()
    if args.score_pulled:
        data, *model_dirs = args.score_pulled
        print(json.dumps([score_pulled(data, d) for d in model_dirs]))
        return 0
    size = DRY if args.dry_run else GPU
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray of this machine's size
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict[str, Any] = {"dry_run": args.dry_run, "size": size.__dict__, "checks": {}}
    state: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for name in args.only or list(CHECKS):
            report["checks"][name] = run_check(name, size, work, state)
            print(f"{name}: {json.dumps(report['checks'][name], default=str)[:300]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(c.get("ok") for c in report["checks"].values())
    text = json.dumps(report, indent=2, default=str)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    print(f"{'all checks passed' if report['ok'] else 'FAILED'}: {args.out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
