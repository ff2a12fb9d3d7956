"""Batch predictions: `pipeline predict`'s Ray Data actor pool against the Predictor in one process.

One generated folder of JPEGs (mixed sizes around 400x300, cut and rescaled from scikit-learn's
two sample photos; nothing is downloaded) and one model package: the digits recipe's network
(ResNet-20 at 16x16, untrained weights: throughput does not depend on them), whose preprocessing
decodes each photo, converts it to greyscale and resizes it, as `Predictor` does for any image.
  (i)  one      the Predictor in this process: read, decode, preprocess, forward, `--batch-size`
                images at a time (torch uses every core for the forward pass)
  (ii) predict  `pipeline.serving.batch.predict` over the same files and batch size on
                `--concurrency` actors, Parquet written, end to end after Ray has started
                (actor start-up included: what a user waits for)
Alternating, `--rounds` times after a warm-up of each; rates are medians. For (ii) the seconds
until its first batch is out are given too: mostly the actors' start-up.

    .venv/bin/python jobs/bench/predict.py [--images 800] [--rounds 2] [--out FILE.json]

Prints both rates and the ratio (ii)/(i) (target >= 1.6 on 2 cores); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    samples = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = samples[i % 2]
        h, w = int(rng.integers(200, 427)), int(rng.integers(300, 640))
        top, left = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
        out_h, out_w = int(rng.integers(260, 340)), int(rng.integers(360, 440))
        img = Image.fromarray(src[top : top + h, left : left + w]).resize((out_w, out_h))
        path = folder / f"c{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        paths.append(path)
    return paths


def make_model(folder: Path) -> Path:
    import torch

    from pipeline.config import load_config
    from pipeline.data.sources import WriteOptions, prepare_digits
    from pipeline.model_package import package_metadata
    from pipeline.models.zoo import build_model
    from pipeline.tags import MODEL_META_FILE, WEIGHTS_FILE

    data = folder / "digits"
    manifest = prepare_digits(WriteOptions(out=str(data)))
    cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [f"data.uri={data}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, num_classes=10, image_size=16)
    out = folder / "model"
    out.mkdir()
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    (out / MODEL_META_FILE).write_text(json.dumps(package_metadata(cfg, manifest)))
    return out


def one_process(model: Path, files: list[Path], batch_size: int) -> float:
    from pipeline.serving.predictor import load_local

    start = time.perf_counter()
    predictor = load_local(model)
    for i in range(0, len(files), batch_size):
        predictor.probabilities([p.read_bytes() for p in files[i : i + batch_size]])
    return len(files) / (time.perf_counter() - start)


def ray_predict(
    model: Path, folder: Path, out: Path, batch_size: int, concurrency: int
) -> tuple[float, float]:
    """(end-to-end images/s, seconds until the first batch was out): the second is mostly the
    actors' start-up (importing torch, loading the model)."""
    from pipeline.events import WriteProgress
    from pipeline.serving.batch import PredictOptions, predict

    seen: list[tuple[float, int]] = []

    def sink(event) -> None:
        if isinstance(event, WriteProgress) and event.done:
            seen.append((time.perf_counter(), event.done))

    start = time.perf_counter()
    opts = PredictOptions(
        data=str(folder),
        out=str(out),
        batch_size=batch_size,
        concurrency=concurrency,
        overwrite=True,
        on_progress=sink,
    )
    summary = predict(str(model), opts)
    end = time.perf_counter()
    return summary.rows / (end - start), seen[0][0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "jobs" / "bench" / "results" / "predict.json"))
    args = parser.parse_args()

    from pipeline.config import PipelineConfig
    from pipeline.train.ray_runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        files = make_photos(root / "photos", args.images)
        model = make_model(root)
        init_ray(PipelineConfig(), extra_cpus=args.concurrency)  # not timed: started once
        run_one = lambda: one_process(model, files, args.batch_size)  # noqa: E731
        run_ray = lambda: ray_predict(  # noqa: E731
            model, root / "photos", root / "p.parquet", args.batch_size, args.concurrency
        )
        run_one(), run_ray()  # warm-up: page cache, imports
        one, ray_rates, first = [], [], []
        for _ in range(args.rounds):
            one.append(run_one())
            rate, first_s = run_ray()
            ray_rates.append(rate)
            first.append(first_s)
            print(
                f"one {one[-1]:.1f} images/s, predict {rate:.1f} images/s end to end "
                f"(first batch out after {first_s:.1f}s)",
                flush=True,
            )
    one_rate, ray_rate = statistics.median(one), statistics.median(ray_rates)

    load = os.getloadavg()
    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "one_process_images_per_s": round(one_rate, 1),
        "predict_images_per_s": round(ray_rate, 1),
        "ratio": round(ray_rate / one_rate, 2),
        "predict_first_batch_s": round(statistics.median(first), 1),
        "target_ratio": 1.6,
        "one_process_runs": [round(r, 1) for r in one],
        "predict_runs": [round(r, 1) for r in ray_rates],
        "predict_first_batch_runs_s": [round(r, 1) for r in first],
        "machine": {
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_1_5_15": [round(x, 1) for x in load],
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python jobs/bench/predict.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
