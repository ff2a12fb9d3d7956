"""Evaluate a logged model on a dataset split, outside Ray, with its training preprocessing.

Photographs (a model trained with `data.crop`) are scored on the evaluation centre crop the
package records, decoded by a thread per core (`iter_split`) and normalised and scored on the
GPU when there is one."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import CropConfig, StorageConfig
from pipeline.data.shards import Manifest, read_manifest
from pipeline.data.transform import iter_split
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


def scoring_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_model(
    model_uri: str, data_uri: str, split: str = "test", storage: StorageConfig | None = None
) -> dict[str, Any]:
    model, meta = load_logged_model(model_uri)
    manifest = read_manifest(data_uri, storage)
    _check_compatible(meta, manifest, model_uri, data_uri)  # shape and classes, cheap first
    verify_split(data_uri, manifest, split, storage)  # the data scored is the data listed
    _, norm = preprocessing(meta)
    crop = eval_crop(meta)
    device = scoring_device()
    # The model's own normalisation and crop, not the dataset's: what the model was trained with.
    batches = iter_split(
        data_uri,
        manifest,
        split,
        storage=storage,
        resize=input_resize(meta),
        normalization=norm,
        crop=CropConfig(size=crop.size, eval_crop_ratio=crop.ratio) if crop else None,
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
