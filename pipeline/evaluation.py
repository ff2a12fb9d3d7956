"""Evaluate a logged model on a dataset split with its training preprocessing.

Fixed-size datasets are decoded in this process (`iter_split`). Photographs (a model trained
with `data.crop`) are scored on the evaluation centre crop the package records: decoded by a
thread per core here, or, for a split of `RAY_DATA_ROWS` rows or more, by Ray Data's map tasks
(`photo_dataset`, train=False: the validation split's own path) on every core of the machine or
the cluster (`RAY_ADDRESS`); either way normalised and scored on the GPU when there is one."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import CropConfig, PipelineConfig, StorageConfig
from pipeline.data.shards import Manifest, read_manifest
from pipeline.data.transform import iter_split, to_float_normalized
from pipeline.data.validate import verify_split
from pipeline.errors import DatasetError
from pipeline.model_package import (
    eval_crop,
    input_resize,
    input_shape,
    load_logged_model,
    preprocessing,
)
from pipeline.train.loop import evaluate
from pipeline.train.metrics import per_class_accuracy

# From here on a split's decode is worth Ray's start-up (README "Performance"), and a cluster's
# cores: ImageNet's 50,000 val images, not a test fixture's dozens.
RAY_DATA_ROWS = 20_000


def scoring_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_model(
    model_uri: str,
    data_uri: str,
    split: str = "test",
    storage: StorageConfig | None = None,
    *,
    ray_data: bool | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Loss, accuracy, top-5, per-class accuracy and the confusion matrix of a logged model on
    a split. `ray_data`: decode photographs with Ray Data (None: when the split has at least
    `RAY_DATA_ROWS` rows). `verify=False`: the caller already verified this split (the gate
    scores two models on one split and verifies it once)."""
    model, meta = load_logged_model(model_uri)
    manifest = read_manifest(data_uri, storage)
    _check_compatible(meta, manifest, model_uri, data_uri)  # shape and classes, cheap first
    if verify:
        verify_split(data_uri, manifest, split, storage)  # the data scored is the data listed
    _, norm = preprocessing(meta)
    crop = eval_crop(meta)
    device = scoring_device()
    # The model's own normalisation and crop, not the dataset's: what the model was trained with.
    crop_config = CropConfig(size=crop.size, eval_crop_ratio=crop.ratio) if crop else None
    if ray_data is None:
        ray_data = manifest.split(split).rows >= RAY_DATA_ROWS
    if crop_config is not None and ray_data:
        batches = _ray_data_crops(data_uri, manifest, split, crop_config, norm, storage, device)
    else:
        batches = iter_split(
            data_uri,
            manifest,
            split,
            storage=storage,
            resize=input_resize(meta),
            normalization=norm,
            crop=crop_config,
            device=device,
        )
    result = evaluate(
        model.to(device), batches, len(manifest.classes), device=device, confusion=True
    )
    confusion = result.pop("confusion")
    result["per_class_accuracy"] = dict(
        zip(manifest.classes, per_class_accuracy(confusion), strict=True)
    )
    result["confusion"] = confusion.tolist()
    return result


def _ray_data_crops(uri, manifest, split, crop, norm, storage, device):
    """Centre crops decoded by Ray Data's tasks (a local Ray, or the cluster's), uint8 to this
    process, normalised on `device`. Order does not matter to the metrics."""
    from pipeline.data.ingest import photo_dataset
    from pipeline.train.ray_runtime import init_ray

    init_ray(PipelineConfig())  # joins RAY_ADDRESS, or starts a local Ray (no-op if running)
    ds = photo_dataset(uri, manifest, split, crop=crop, train=False, storage=storage)
    for b in ds.iter_torch_batches(batch_size=512, device=device, pin_memory=device.type == "cuda"):
        yield to_float_normalized(b["image"], norm, channels_last=False), b["label"]


def _check_compatible(meta: dict[str, Any], manifest: Manifest, model_uri: str, data_uri: str):
    """A model trained on crops takes images of any size with its channels; one trained on
    fixed-size images takes only that size."""
    image, _ = preprocessing(meta)
    if eval_crop(meta) is not None:
        if image.channels != manifest.image.channels:
            c, size, _ = input_shape(meta)
            raise DatasetError(
                f"{data_uri}: images have {manifest.image.channels} channel(s) but {model_uri} "
                f"takes {c}x{size}x{size} crops of {c}-channel images"
            )
    elif not manifest.image.fixed_size or image.shape != manifest.image.shape:
        raise DatasetError(
            f"{data_uri}: images are {manifest.image.describe()} but {model_uri} was trained "
            f"on {image.shape} (CxHxW) and takes only that size"
        )
    if manifest.classes != meta["classes"]:
        raise DatasetError(f"{data_uri}: classes {manifest.classes} differ from the model's")
