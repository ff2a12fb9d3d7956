"""From Parquet shards to Ray Datasets: the side of ingest that Ray Data's own actors load.

Ray Data pickles the `map_batches` function with the dataset, and every process that unpickles
the plan (Train's DatasetManager, each split's SplitCoordinator, the read tasks) imports this
module. It therefore imports neither torch nor torchvision: that would add about 3 CPU-seconds
to each of those start-ups, on the path to the first training step (see README "Performance").
The torch side (`BatchTransform`, `WorkerCache`, `iter_split`) is `pipeline.data.transform`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage as st
from pipeline.config import AugmentConfig, StorageConfig
from pipeline.data.shards import ImageSpec, Manifest, Normalization, decode_images


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
