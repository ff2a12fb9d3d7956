"""From Parquet shards to Ray Datasets: the side of ingest that Ray Data's own actors load.

Ray Data pickles the `map_batches` function with the dataset, and every process that unpickles
the plan (Train's DatasetManager, each split's SplitCoordinator, the read tasks) imports this
module. It therefore imports neither torch nor torchvision: that would add about 3 CPU-seconds
to each of those start-ups, on the path to the first training step (see README "Performance").
The torch side (`BatchTransform`, `WorkerCache`, `iter_split`, `to_float_normalized`) is
`pipeline.data.transform`.

Photographs (`data.crop`, `photo_dataset`): the map tasks decode and crop only, handing fixed-size
uint8 NHWC batches on (a quarter of float32's bytes through Arrow, the object store and PCIe);
the worker converts, normalises and mixes on its device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage as st
from pipeline.config import AugmentConfig, CropConfig, StorageConfig
from pipeline.data import imaging
from pipeline.data.shards import ImageSpec, Manifest, Normalization, decode_images
from pipeline.errors import DatasetError


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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        blobs, ids = batch["image"], batch.get("id")
        size, c = self.crop.size, self.channels
        out = np.empty((len(blobs), size, size, c), dtype=np.uint8)
        for i, blob in enumerate(blobs):
            try:
                out[i] = self.crop_one(bytes(blob))
            except imaging.ImageDecodeError as exc:
                which = f"image {str(ids[i])!r}" if ids is not None else "an image"
                raise DatasetError(
                    f"{which} in the dataset does not decode ({exc}); run `pipeline data "
                    "validate` on the dataset to find its shard"
                ) from None
        if self.train and self.crop.hflip:
            flip = self._rng.random(len(out)) < 0.5
            out[flip] = out[flip, :, ::-1]
        return {"image": out, "label": np.asarray(batch["label"], dtype=np.int64)}

    def crop_one(self, blob: bytes) -> np.ndarray:
        img = imaging.open_image(blob)
        if not self.train:
            return imaging.evaluation_crop(
                img, self.crop.size, self.crop.eval_crop_ratio, self.channels
            )
        box = imaging.random_resized_crop_box(
            img.height, img.width, self.crop.scale, self.crop.ratio, self._rng
        )
        return imaging.crop_resize(img, box, self.crop.size, self.channels)


@dataclass
class InChunks:
    """A map over a whole block, `rows` rows at a time, each chunk its own output block: a
    fused read+map task gets a shard's rows at once, and its uint8 output (150 KB per 224 crop)
    stays in blocks of `rows`."""

    fn: Any
    rows: int

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(next(iter(batch.values())))
        for start in range(0, n, self.rows):
            yield self.fn({k: v[start : start + self.rows] for k, v in batch.items()})


def epoch_shard_order(paths: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The files of a split in the order of epoch `epoch`: a permutation drawn from (train.seed,
    epoch), so every epoch reads its files in a different, reproducible order (the local shuffle
    buffer then mixes rows within what is read)."""
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
    epoch: int | None = None,
):
    """A lazy Ray Dataset of one split as fixed-size uint8 NHWC batches (see `DecodeCrop`).

    Training shuffles file order per epoch from `seed` (`train.seed`): with `epoch`, this epoch's
    `epoch_shard_order` (for a dataset built per epoch); without, Ray reseeds its file shuffle
    from (seed, execution) on every execution, i.e. every epoch of one dataset given to the
    trainer. Evaluation reads in manifest order.
    """
    import ray.data

    fs, paths = shard_paths(uri, manifest, split, storage)
    shuffle = None
    if train and epoch is not None:
        paths = epoch_shard_order(paths, seed, epoch)
    elif train:
        shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
    # Read and decode fused into one task per shard, so that every CPU slot reads and decodes.
    # Ray fuses a read with the map after it only when the read is not split into more blocks
    # than files (it splits few files to reach DataContext.read_op_min_num_blocks) and the map
    # asks for no batch size; as two operators, Ray's resource reservation held the decode to
    # about one task at a time (ingest benchmark: 0.46x the DataLoader, see README).
    ds = ray.data.read_parquet(
        paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths)
    )
    # `id` rides along only to name an image that does not decode; DecodeCrop drops it.
    return ds.select_columns(["image", "label", "id"]).map_batches(
        InChunks(DecodeCrop(manifest.image.channels, crop, train), batch_size),
        batch_format="numpy",
        batch_size=None,  # a whole block (a shard's rows) in, `batch_size`-row blocks out
    )
