"""From Parquet shards to Ray Datasets: the side of ingest that Ray Data's own actors load.

Ray Data pickles the `map_batches` function with the dataset, and every process that unpickles
the plan (Train's DatasetManager, each split's SplitCoordinator, the read tasks) imports this
module. It therefore imports neither torch nor torchvision: that would add about 3 CPU-seconds
to each of those start-ups, on the path to the first training step (see README "Performance").
The torch side (`BatchTransform`, `WorkerCache`, `iter_split`, `to_float_normalized`) is
`pipeline.data.transform`.

Photographs (`data.crop`, `photo_dataset`): the read tasks decode and crop only
(`pipeline.data.stream.PhotoShards`), handing fixed-size uint8 NHWC batches on (a quarter of
float32's bytes through Arrow, the object store and PCIe); the worker converts, normalises and
mixes on its device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from pipeline import storage as st
from pipeline.config import AugmentConfig, CropConfig, StorageConfig
from pipeline.data import imaging
from pipeline.data.shards import ImageSpec, Manifest, Normalization, decode_images
from pipeline.errors import DatasetError

T = TypeVar("T")


def shard_paths(uri: str, manifest: Manifest, split: str, storage: StorageConfig | None = None):
    """(filesystem, [paths]) of a split's shards, for Ray Data or pyarrow."""
    root = st.resolve(uri, storage)
    return root.fs, [root.join(p).path for p in manifest.shard_paths(split)]


@dataclass
class DecodeImages:
    """Encoded batch -> dict(image=uint8 NHWC, label): for worker-side caching."""

    image: ImageSpec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = decode_images(list(batch["image"]), self.image)
        return {"image": pixels, "label": np.asarray(batch["label"], dtype=np.int64)}


@dataclass
class TransformBatches:
    """`BatchTransform` for `map_batches`, built on first use inside the map task."""

    image: ImageSpec
    normalization: Normalization
    augment: AugmentConfig | None
    resize: tuple[int, int] | None = None
    _transform: Any = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._transform is None:
            from pipeline.data.transform import BatchTransform

            self._transform = BatchTransform(
                self.image, self.normalization, self.augment, resize=self.resize
            )
        return self._transform(batch)


def ray_dataset(
    uri: str,
    manifest: Manifest,
    split: str,
    *,
    augment: AugmentConfig | None,
    resize: tuple[int, int] | None = None,
    storage: StorageConfig | None = None,
    batch_size: int = 256,
    decode_only: bool = False,
):
    """A lazy Ray Dataset of one split: read Parquet -> map_batches(TransformBatches).

    With `decode_only` the batches stay uint8 NHWC: the worker caches them and augments and
    normalises each epoch itself (see `pipeline.data.transform.WorkerCache`).
    """
    import ray.data

    fs, paths = shard_paths(uri, manifest, split, storage)
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["image", "label"])
    if decode_only:
        fn = DecodeImages(manifest.image)
    else:
        fn = TransformBatches(manifest.image, manifest.normalization, augment, resize)
    return ds.map_batches(fn, batch_format="numpy", batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Photographs: decode + crop to fixed-size uint8


@dataclass
class DecodeCrop:
    """Encoded batch (any sizes) -> dict(image=uint8 (N, size, size, C), label=int64).

    Training: a RandomResizedCrop box drawn per image on its full size, decoded at the smallest
    JPEG scale that still covers the box at `size` pixels, resized, then a random horizontal flip.
    Evaluation: the centre crop of `imaging.evaluation_crop`. `seed=None` draws fresh entropy in
    every map task (a fixed seed would give every task the same crops). An `id` column, when the
    batch has one, names an image that does not decode.
    """

    channels: int
    crop: CropConfig
    train: bool
    seed: int | None = None
    _rng: Any = field(default=None, init=False, repr=False, compare=False)
    _flips: Any = field(default=None, init=False, repr=False, compare=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._rng is None:  # boxes and flips from separate streams: a seed gives the same
            self._rng, self._flips = np.random.default_rng(self.seed).spawn(2)  # boxes either way
        blobs, ids = batch["image"], batch.get("id")
        size, c = self.crop.size, self.channels
        flips = self.train and self.crop.hflip
        out = np.empty((len(blobs), size, size, c), dtype=np.uint8)
        for i, blob in enumerate(blobs):
            try:
                out[i] = self.crop_one(bytes(blob), flip=flips and self._flips.random() < 0.5)
            except imaging.ImageDecodeError as exc:
                which = f"image {str(ids[i])!r}" if ids is not None else "an image"
                raise DatasetError(
                    f"{which} in the dataset does not decode ({exc}); run `pipeline data "
                    "validate` on the dataset to find its shard"
                ) from None
        return {"image": out, "label": np.asarray(batch["label"], dtype=np.int64)}

    def crop_one(self, blob: bytes, *, flip: bool = False) -> np.ndarray:
        img = imaging.open_image(blob)
        if not self.train:
            return imaging.evaluation_crop(
                img, self.crop.size, self.crop.eval_crop_ratio, self.channels
            )
        box = imaging.random_resized_crop_box(
            img.height, img.width, self.crop.scale, self.crop.ratio, self._rng
        )
        return imaging.crop_resize(img, box, self.crop.size, self.channels, flip=flip)


def epoch_shard_order(paths: Sequence[T], seed: int, epoch: int) -> list[T]:
    """The files of a split in the order of epoch `epoch`: a permutation drawn from (train.seed,
    epoch), so every epoch reads its files in a different, reproducible order (each read task
    then shuffles rows within a window: `pipeline.data.stream`)."""
    rng = np.random.default_rng([seed, epoch])
    return [paths[i] for i in rng.permutation(len(paths))]


def photo_dataset(
    uri: str,
    manifest: Manifest,
    split: str,
    *,
    crop: CropConfig,
    train: bool,
    storage: StorageConfig | None = None,
    batch_size: int = 256,
    seed: int = 0,
    epochs: int = 1,
):
    """A lazy Ray Dataset of one split as fixed-size uint8 NHWC batches (see `DecodeCrop`),
    read, decoded and cropped by one read task per cluster CPU and epoch
    (`pipeline.data.stream.PhotoShards`), each handing on a block per batch.

    Training: one run of the dataset reads `epochs` epochs (up to `stream.MAX_TASKS` read tasks),
    each in its own file order drawn from (`seed`, epoch); consume it an epoch at a time with
    `stream.EpochBatches`. Each further run reads the epochs after those. Evaluation: one pass in
    manifest order per run.
    """
    import ray.data

    from pipeline.data.stream import PhotoShards, Shard

    root = st.resolve(uri, storage)
    shards = [Shard(root.join(s.path), s.rows) for s in manifest.split(split).shards]
    source = PhotoShards(
        shards,
        DecodeCrop(manifest.image.channels, crop, train),
        batch_size=batch_size,
        seed=seed,
        epochs=epochs,
        shuffle=train,
    )
    # One block per planned task and no more: fewer than Ray's wanted minimum of blocks would
    # otherwise be split further after the read.
    ds = ray.data.read_datasource(source, override_num_blocks=source.tasks_per_execution)
    # Ray Data merges a task's blocks up to `target_max_block_size` (128 MiB) before handing any
    # on: a long task's first batch would wait for ~14 more. Just under one batch sends each
    # batch on as it is cropped, and is below the 1.5x at which Ray would slice a block.
    ds.context.target_max_block_size = max(1, source.batch_bytes * 4 // 5)
    return ds


def local_cores() -> int:
    """The cores this process may use (containers, taskset), or the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cluster_cpus() -> int:
    """The CPUs of the Ray cluster this process is joined to, or of this machine (where
    `ray.data` will start a local Ray)."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return local_cores()


class EpochBatches:
    """One epoch's batches at a time from one iterator over a dataset of several epochs:
    `take(n)` yields the next `n`, and calls `iterate` again (the dataset's next execution)
    whenever the current iterator runs out."""

    def __init__(self, iterate: Callable[[], Iterable[T]]) -> None:
        self._iterate = iterate
        self._it: Iterator[T] | None = None

    def take(self, n: int) -> Iterator[T]:
        taken = 0
        while taken < n:
            fresh, before = self._it is None, taken
            if fresh:
                self._it = iter(self._iterate())
            for batch in self._it:
                yield batch
                taken += 1
                if taken == n:
                    return
            self._it = None  # used up: the next execution
            if fresh and taken == before:
                raise ValueError(f"the dataset yields no batch (needed {n - taken} more)")

    def close(self) -> None:
        """Stop the current execution (its generator's cleanup shuts the executor down)."""
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()
