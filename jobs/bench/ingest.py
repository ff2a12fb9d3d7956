"""Photograph ingest: this pipeline's Ray Data path against one process and a torch DataLoader.

One generated set of JPEGs (mixed sizes around 500x375, cut and rescaled from scikit-learn's two
sample photos; nothing is downloaded), the same 224x224 uint8 training batches
(RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip), `--epochs`
consecutive epochs per loader and round, as a training run reads them:
  (i)   one     one process: Pillow decode (draft mode) + crop + flip, the per-core ceiling
  (ii)  ray     `photo_dataset` (Ray Data: `PhotoShards` reads, decodes and crops) of `--epochs`
                epochs in one stream, an epoch's batches at a time (`EpochBatches`), as a
                training worker gets them (rows shuffled in the read tasks, one batch of
                prefetch), no model, every core
  (iii) torch   `torch.utils.data.DataLoader`, one persistent worker process per core, over the
                same files and the same per-image function (the peer)
plus, for reference, (i) without draft mode through torchvision's own RandomResizedCrop on PIL
images (one epoch per round). The loaders run in rotating order, `--rounds` times, after a
warm-up epoch each, so the machine's drift does not read as a difference; a loader's rate is
the images of its `--epochs` epochs over their time (each epoch's start included), median over
rounds. Ray's stream is closed at the end of its epochs, so it reads nothing ahead while another
loader is timed.

Import: `import_image_folder` of the same folder with every core (pool processes write whole
shards) against `workers=1` (the same code in one process),
alternating, `--import-rounds` times each (an import takes a few seconds, so a neighbour's burst
moves one run by 20%), medians.

    .venv/bin/python jobs/bench/ingest.py [--images 2000] [--rounds 5] [--epochs 5] [--out F]

Prints the rates, the ratios (ii)/(iii) (target >= 0.9), (ii)/(i) (target >= 1.3), import
(target >= 1.6), and how many cores one GPU needs at 3,000 images/s; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")  # as `init_ray` sets it: no footer actors

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import CropConfig  # noqa: E402
from pipeline.data import imaging  # noqa: E402
from pipeline.data.ingest import EpochBatches, photo_dataset  # noqa: E402

BATCH = 64
GPU_RATE = 3000  # images/s one modern GPU trains a ResNet-50 at (bf16)
CROP = CropConfig(size=224)


def generate(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs in two class folders, sizes around 500x375 (landscape and portrait)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    samples = load_sample_images().images
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        c = i % 2
        src = samples[c]
        h = int(rng.integers(src.shape[0] // 2, src.shape[0] + 1))
        w = int(rng.integers(src.shape[1] // 2, src.shape[1] + 1))
        top = int(rng.integers(0, src.shape[0] - h + 1))
        left = int(rng.integers(0, src.shape[1] - w + 1))
        out_w, out_h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        if rng.random() < 0.25:
            out_w, out_h = out_h, out_w
        img = Image.fromarray(src[top : top + h, left : left + w]).resize((out_w, out_h))
        path = root / ["china", "flower"][c] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        files.append(path)
    return files


def crop_flip(blob: bytes, rng: np.random.Generator) -> np.ndarray:
    """The per-image work of every loader: decode at reduced size, RandomResizedCrop, flip."""
    img = imaging.open_image(blob)
    box = imaging.random_resized_crop_box(img.height, img.width, CROP.scale, CROP.ratio, rng)
    return imaging.crop_resize(img, box, CROP.size, 3, flip=rng.random() < 0.5)


def one_process(files: list[Path]) -> Iterator[np.ndarray]:
    rng = np.random.default_rng()
    for i in range(0, len(files), BATCH):
        batch = np.stack([crop_flip(p.read_bytes(), rng) for p in files[i : i + BATCH]])
        assert batch.shape[1:] == (224, 224, 3)
        yield batch


def torchvision_plain(files: list[Path]) -> Iterator[np.ndarray]:
    """Reference: full decode + torchvision's RandomResizedCrop and flip on PIL images."""
    from PIL import Image
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    for i in range(0, len(files), BATCH):
        batch = [np.asarray(t(Image.open(p).convert("RGB"))) for p in files[i : i + BATCH]]
        assert np.stack(batch).shape[1:] == (224, 224, 3)
        yield np.stack(batch)


class FileDataset:
    """torch Dataset over the files, with the same per-image function."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        if self.rng is None:  # one stream per worker process
            self.rng = np.random.default_rng()
        return torch.from_numpy(crop_flip(self.files[i].read_bytes(), self.rng).copy())


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process and every descendant (Ray's daemons and workers,
    the DataLoader's workers): on a shared machine, CPU per image is steadier than images/s."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def own_and_reaped_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the import's pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Epoch:
    images: int
    rate: float  # images/s over the whole epoch, from asking for the first batch
    first_batch_s: float  # asking -> the first batch (start-up: tasks, worker processes, ...)
    steady_rate: float  # images/s after the first batch


def timed_epoch(batches: Iterable) -> Epoch:
    start, n, first, first_n = time.perf_counter(), 0, None, 0
    for b in batches:
        n += len(b)
        if first is None:
            first, first_n = time.perf_counter(), n
    end = time.perf_counter()
    assert first is not None
    return Epoch(n, n / (end - start), first - start, (n - first_n) / max(end - first, 1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="consecutive epochs per loader")
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument(
        "--import-rounds", type=int, default=7, help="imports of each kind (a few s each)"
    )
    parser.add_argument("--out", default=str(REPO / "jobs" / "bench" / "results" / "ingest.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    t0 = time.perf_counter()
    files = generate(work / "src", args.images)
    mb = sum(p.stat().st_size for p in files) / 2**20
    print(f"{len(files)} JPEGs, {mb:.0f} MB, generated in {time.perf_counter() - t0:.0f} s")

    # -- import: every core against one process, alternating --------------------------------
    from pipeline.data.photos import ImportOptions
    from pipeline.data.sources import WriteOptions, import_image_folder

    def run_import(workers: int) -> float:
        opts = WriteOptions(
            out=str(work / "ds"), encoding="jpeg", shard_mb=args.shard_mb, overwrite=True
        )
        start, cpu = time.perf_counter(), own_and_reaped_cpu_s()
        import_image_folder(
            work / "src",
            opts,
            val_fraction=0,
            test_fraction=0,
            images=ImportOptions(workers=workers),
        )
        import_cpu[workers].append(1000 * (own_and_reaped_cpu_s() - cpu) / len(files))
        return len(files) / (time.perf_counter() - start)

    imports: dict[str, list[float]] = {"parallel": [], "single": []}
    import_cpu: dict[int, list[float]] = {cores: [], 1: []}
    for r in range(args.import_rounds):
        for kind in ("parallel", "single") if r % 2 == 0 else ("single", "parallel"):
            workers = cores if kind == "parallel" else 1
            imports[kind].append(run_import(workers))
            print(
                f"import {kind:8s} {imports[kind][-1]:7.0f} img/s "
                f"{import_cpu[workers][-1]:5.2f} CPU-ms/image"
            )

    # -- loaders --------------------------------------------------------------------------------
    import ray
    import ray.data
    import torch

    from pipeline.data.shards import read_manifest

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = read_manifest(str(work / "ds"))
    loader = torch.utils.data.DataLoader(
        FileDataset(files),
        batch_size=BATCH,
        shuffle=True,
        num_workers=cores,
        persistent_workers=True,
        prefetch_factor=4,
    )

    def ray_epochs(epochs: int, seed: int) -> Iterator[Iterator[np.ndarray]]:
        """`epochs` epochs of one stream, as `pipeline.train.loop` reads them; closed after."""
        ds = photo_dataset(
            str(work / "ds"), manifest, "train", crop=CROP, train=True, batch_size=BATCH,
            seed=seed, epochs=epochs,
        )  # fmt: skip
        # As training's `iter_torch_batches` (`_WorkerData._iter_train`): its default prefetch
        # of one batch (Ray waits for the whole prefetch window before the first batch), no
        # local shuffle buffer (the read tasks shuffle).
        stream = EpochBatches(
            lambda: ds.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=1)
        )
        try:
            for _ in range(epochs):
                yield (b["image"] for b in stream.take(len(files) // BATCH))
        finally:
            stream.close()

    def each(make) -> Callable[[int, int], Iterator[Iterable[np.ndarray]]]:
        return lambda epochs, seed: (make() for _ in range(epochs))

    loaders = {
        "one": each(lambda: one_process(files)),
        "ray": ray_epochs,
        "torch": each(lambda: iter(loader)),
        "plain": each(lambda: torchvision_plain(files)),
    }
    for name in ("ray", "torch"):  # warm-up: worker processes, imports, page cache
        for batches in loaders[name](1, 1000):
            timed_epoch(batches)
    epochs: dict[str, list[Epoch]] = {k: [] for k in loaders}  # every epoch
    rates: dict[str, list[float]] = {k: [] for k in loaders}  # one per round: its epochs
    cpu_ms: dict[str, list[float]] = {k: [] for k in loaders}  # CPU-ms per image, whole tree
    order = list(loaders)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            n_epochs = 1 if name == "plain" else args.epochs
            before, start, images = tree_cpu_s(), time.perf_counter(), 0
            for batches in loaders[name](n_epochs, r):
                e = timed_epoch(batches)
                epochs[name].append(e)
                images += e.images
            rates[name].append(images / (time.perf_counter() - start))
            cpu_ms[name].append(1000 * (tree_cpu_s() - before) / images)
            starts = ", ".join(f"{e.first_batch_s:.2f}" for e in epochs[name][-n_epochs:])
            print(
                f"round {r}: {name:6s} {rates[name][-1]:7.0f} img/s over {n_epochs} epoch(s), "
                f"{cpu_ms[name][-1]:5.2f} CPU-ms/image, first batches after {starts} s"
            )
    ray.shutdown()

    steady = {k: statistics.median(e.steady_rate for e in v) for k, v in epochs.items()}
    n = {k: 1 if k == "plain" else args.epochs for k in loaders}
    # the first batch of a round's first epoch (the start of a run) and of the epochs after it
    first_s = {k: statistics.median(e.first_batch_s for e in v[:: n[k]]) for k, v in epochs.items()}
    later_s = {
        k: statistics.median(e.first_batch_s for i, e in enumerate(v) if i % n[k])
        for k, v in epochs.items()
        if n[k] > 1
    }
    med = {k: statistics.median(v) for k, v in rates.items()}
    imp = {k: statistics.median(v) for k, v in imports.items()}
    result = {
        "machine": f"{platform.machine()}, {cores} cores, Linux {platform.release()}",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "images": len(files),
        "megabytes": round(mb, 1),
        "rounds": args.rounds,
        "import_rounds": args.import_rounds,
        "epochs_per_round": args.epochs,
        "rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "median_img_per_s": {k: round(v, 1) for k, v in med.items()},
        "median_cpu_ms_per_image": {k: round(statistics.median(v), 3) for k, v in cpu_ms.items()},
        "ray_over_torch": round(med["ray"] / med["torch"], 3),
        "ray_over_one": round(med["ray"] / med["one"], 3),
        "median_first_batch_s": {k: round(v, 3) for k, v in first_s.items()},
        "median_first_batch_later_epochs_s": {k: round(v, 3) for k, v in later_s.items()},
        # the rate after each epoch's first batch: what an epoch of a real dataset (ImageNet's
        # 1.28M images, not these 2,000) runs at, its start-up spread over minutes
        "median_steady_img_per_s": {k: round(v, 1) for k, v in steady.items()},
        "steady_ray_over_torch": round(steady["ray"] / steady["torch"], 3),
        "steady_ray_over_one": round(steady["ray"] / steady["one"], 3),
        "plain_torchvision_one_process": round(med["plain"], 1),
        "cores_per_gpu_at_3000": round(GPU_RATE / med["one"], 1),
        "import_img_per_s": {k: [round(x, 1) for x in v] for k, v in imports.items()},
        "import_parallel_over_single": round(imp["parallel"] / imp["single"], 3),
        "import_cpu_ms_per_image": {
            "parallel": round(statistics.median(import_cpu[cores]), 3),
            "single": round(statistics.median(import_cpu[1]), 3),
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"(ii)/(iii) ray/torch {result['ray_over_torch']} (target >= 0.9); "
        f"(ii)/(i) ray/one {result['ray_over_one']} (target >= 1.3); after the first batch: "
        f"ray/torch {result['steady_ray_over_torch']}, ray/one {result['steady_ray_over_one']}; "
        f"import {result['import_parallel_over_single']}x (target >= 1.6); "
        f"a GPU at {GPU_RATE} img/s needs {result['cores_per_gpu_at_3000']} cores at "
        f"{med['one']:.0f} img/s per core"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
