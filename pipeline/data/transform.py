"""Decoded pixels to normalised training tensors: the torch side of ingest.

`BatchTransform` is the one preprocessing function (decode -> float -> optional bilinear resize to
`data.resize` -> optional augmentation -> normalise with the manifest's statistics). Ray Data runs
it in `map_batches` for training and validation (through `pipeline.data.ingest.TransformBatches`);
`pipeline evaluate`, the test split and the serving predictor call it directly, so a model always
sees exactly the preprocessing it was trained with.

Augmentation is per sample but vectorised over the batch: a padded random crop (random shifts of
up to `padding` pixels, one gather), or with rotation / scale a random affine map (torchvision's
RandomAffine: rotation, zoom and the same integer shift, sampled bilinearly in one `grid_sample`),
and optional flips (torchvision's v2 functional ops).

Photographs (`data.crop`) take the other path: Ray Data hands the worker fixed-size uint8 NHWC
crops (`pipeline.data.ingest.DecodeCrop`), and the worker, on its device, optionally applies
`auto_augment` (still uint8), then `to_float_normalized`, then MixUp/CutMix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline import storage as st
from pipeline.config import AugmentConfig, CropConfig, StorageConfig
from pipeline.data.ingest import DecodeCrop, local_cores
from pipeline.data.shards import ImageSpec, Manifest, Normalization, decode_images, read_shard


@dataclass
class BatchTransform:
    """dict(image=encoded bytes, label=int) batch -> dict(image=float32 NCHW, label=int64)."""

    image: ImageSpec
    normalization: Normalization
    augment: AugmentConfig | None = None  # None: evaluation (no randomness)
    seed: int | None = None
    resize: tuple[int, int] | None = None  # (height, width) the network sees; None: stored size

    def __post_init__(self) -> None:
        self._gen = torch.Generator()
        if self.seed is not None:
            self._gen.manual_seed(self.seed)
        else:
            self._gen.seed()
        self._mean = list(self.normalization.mean)
        self._std = list(self.normalization.std)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = decode_images(list(batch["image"]), self.image)
        x = self.to_tensor(pixels)
        return {"image": x.numpy(), "label": np.array(batch["label"], dtype=np.int64)}

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, H, W, C) uint8 -> normalised (N, C, H, W) float32, resized and augmented when
        configured."""
        x = torch.from_numpy(np.array(pixels, copy=not pixels.flags.writeable)).permute(0, 3, 1, 2)
        x = TF.to_dtype(x, torch.float32, scale=True)
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = TF.resize(x, list(self.resize), InterpolationMode.BILINEAR, antialias=True)
        if self.augment is not None:
            x = self._augment(x)
        return TF.normalize(x, self._mean, self._std).contiguous()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random shift (or affine map), then flips, of a float batch in [0, 1]."""
        n, _, h, w = x.shape
        aug = self.augment
        if aug.affine:
            x = self._random_affine(x)
        elif aug.random_crop_padding > 0:
            # Pad once, then take each sample's crop at its own random offset (a gather, no loop).
            p = aug.random_crop_padding
            padded = TF.pad(x, [p, p, p, p], fill=0)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=self._gen)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=self._gen)
            rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
            batch = torch.arange(n)[:, None, None, None]
            chans = torch.arange(x.shape[1])[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if aug.hflip:
            flip = torch.rand(n, generator=self._gen) < 0.5
            x[flip] = TF.horizontal_flip(x[flip])
        if aug.vflip:
            flip = torch.rand(n, generator=self._gen) < 0.5
            x[flip] = TF.vertical_flip(x[flip])
        return x

    def _random_affine(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample rotated by U(-d, d) degrees and zoomed by U(1 - s, 1 + s) around the centre,
        and shifted by whole pixels in [-padding, padding]; bilinear, black where nothing maps."""
        n, _, h, w = x.shape
        aug, gen = self.augment, self._gen
        p = aug.random_crop_padding
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(aug.rotate_degrees)
        zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * aug.scale
        tx = torch.randint(-p, p + 1, (n,), generator=gen).float()
        ty = torch.randint(-p, p + 1, (n,), generator=gen).float()
        # affine_grid maps each output position (normalised to [-1, 1] per axis) to the input
        # position it samples: the inverse map, in pixels, conjugated into normalised coordinates.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, sin * h / w, -2 * tx / w], dim=1),
                torch.stack([-sin * w / h, cos, -2 * ty / h], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class WorkerCache:
    """A worker's decoded shard of a split, kept after the first epoch.

    Every later epoch is served from memory: reshuffled with the epoch's seed (train) or in order
    (validation, `seed=None`), and augmented and normalised by `transform` as Ray Data would.
    """

    def __init__(self, transform: BatchTransform) -> None:
        self.transform = transform
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.ready = False

    def fill(self, batches) -> Iterator[dict[str, torch.Tensor]]:
        """Pass the first epoch's uint8 batches through, transformed, while keeping them."""
        for b in batches:
            images, labels = b["image"].cpu(), b["label"].cpu()
            self._images.append(images)
            self._labels.append(labels)
            yield {"image": self.transform.to_tensor(images.numpy()), "label": labels}
        self._all_images = torch.cat(self._images)
        self._all_labels = torch.cat(self._labels)
        self._images, self._labels = [], []
        self.ready = True

    def epoch(
        self, batch_size: int, seed: int | None, drop_last: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self._all_labels)
        if seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        end = n - batch_size + 1 if drop_last else n
        for i in range(0, max(end, 0), batch_size):
            idx = order[i : i + batch_size]
            x = self.transform.to_tensor(self._all_images[idx].numpy())
            yield {"image": x, "label": self._all_labels[idx]}


def iter_split(
    uri: str,
    manifest: Manifest,
    split: str,
    *,
    batch_size: int = 512,
    storage: StorageConfig | None = None,
    resize: tuple[int, int] | None = None,
    normalization: Normalization | None = None,
    crop: CropConfig | None = None,
    device: torch.device | None = None,
    threads: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches of a whole split in one process (no Ray): the test split, `evaluate`
    and the promotion gate. `normalization`: a model's own (default: the manifest's). With
    `crop`, the evaluation centre crop (`DecodeCrop`, train=False) decoded by `threads` threads
    (Pillow releases the GIL while it decodes and resizes; default: every core), then moved to
    `device` as uint8 and normalised there (`to_float_normalized`): the same pixels the
    validation split gets through Ray Data."""
    norm = normalization or manifest.normalization
    root = st.resolve(uri, storage)
    tables = (read_shard(root.join(s.path)) for s in manifest.split(split).shards)
    batches = (b for t in tables for b in t.to_batches(max_chunksize=batch_size))
    if crop is not None:
        yield from _iter_crops(batches, manifest, crop, norm, device, threads)
        return
    transform = BatchTransform(manifest.image, norm, None, resize=resize)
    for batch in batches:
        labels = batch.column("label").to_numpy()
        rows = {"image": batch.column("image").to_pylist(), "label": labels}
        out = transform(rows)
        yield torch.from_numpy(out["image"]), torch.from_numpy(out["label"])


def _iter_crops(batches, manifest: Manifest, crop: CropConfig, norm, device, threads):
    from concurrent.futures import ThreadPoolExecutor

    decode = DecodeCrop(manifest.image.channels, crop, train=False)
    workers = threads or local_cores()
    with ThreadPoolExecutor(workers) as pool:
        for batch in batches:
            blobs, ids = batch.column("image").to_pylist(), batch.column("id").to_pylist()
            labels = torch.from_numpy(batch.column("label").to_numpy().astype(np.int64))
            step = max(1, -(-len(blobs) // workers))  # one slice per thread
            parts = pool.map(
                decode,
                [
                    {"image": blobs[i : i + step], "label": [], "id": ids[i : i + step]}
                    for i in range(0, len(blobs), step)
                ],
            )
            pixels = torch.from_numpy(np.concatenate([p["image"] for p in parts]))
            if device is not None:
                pixels = pixels.to(device)
            yield to_float_normalized(pixels, norm, channels_last=False), labels


def photo_batches(
    batches: Iterable[dict[str, torch.Tensor]],
    normalization: Normalization,
    *,
    policy: str = "none",
    channels_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """A training worker's photograph batches: uint8 NHWC crops (on its device already) ->
    `auto_augment(policy)` (uint8; "none": skipped) -> normalised float32 NCHW
    (`to_float_normalized`). MixUp/CutMix come after, in the step."""
    for b in batches:
        x = b["image"] if policy == "none" else auto_augment(b["image"], policy)
        x = to_float_normalized(x, normalization, channels_last=channels_last)
        yield {"image": x, "label": b["label"]}


# ---------------------------------------------------------------------------------------------
# Photographs, in the worker on its device


def to_float_normalized(
    x: torch.Tensor, normalization: Normalization, *, channels_last: bool = True
) -> torch.Tensor:
    """uint8 NHWC batch (already on the worker's device) -> normalised float32 NCHW.

    One fused multiply-add per element: x * 1/(255 std) - mean/std. The NCHW view of NHWC memory
    is channels-last already, and the arithmetic keeps those strides; `channels_last=False`
    returns a contiguous NCHW tensor instead.
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected a uint8 NHWC batch, got {x.dtype} of shape {tuple(x.shape)}")
    std = torch.tensor(normalization.std, dtype=torch.float32, device=x.device)
    mean = torch.tensor(normalization.mean, dtype=torch.float32, device=x.device)
    if std.numel() != x.shape[-1]:
        raise ValueError(f"normalisation has {std.numel()} channel(s), images {x.shape[-1]}")
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    y = torch.addcmul(shift, x.permute(0, 3, 1, 2).float(), scale)
    return y if channels_last else y.contiguous()


def auto_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """TrivialAugmentWide or RandAugment (torchvision's defaults) on a uint8 NHWC batch, one
    draw per image (the v2 transforms draw once per call, so they are called per image)."""
    from torchvision.transforms import v2

    if policy == "none":
        return x
    ops = {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}
    if policy not in ops:
        raise ValueError(f"unknown auto_augment policy {policy!r}; choose {sorted(ops)} or none")
    op = ops[policy]()
    chw = x.permute(0, 3, 1, 2)
    return torch.stack([op(img) for img in chw]).permute(0, 2, 3, 1)
