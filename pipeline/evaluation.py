"""Evaluate a logged model on a dataset split, outside Ray, with its training preprocessing."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import StorageConfig
from pipeline.data.shards import read_manifest
from pipeline.data.transform import iter_split
from pipeline.data.validate import verify_split
from pipeline.errors import DatasetError
from pipeline.model_package import input_resize, load_logged_model, preprocessing
from pipeline.train.loop import evaluate
from pipeline.train.metrics import per_class_accuracy


@torch.no_grad()
def evaluate_model(
    model_uri: str, data_uri: str, split: str = "test", storage: StorageConfig | None = None
) -> dict[str, Any]:
    model, meta = load_logged_model(model_uri)
    manifest = read_manifest(data_uri, storage)
    image, norm = preprocessing(meta)
    if image.shape != manifest.image.shape:
        raise DatasetError(
            f"{data_uri}: images are {manifest.image.shape} (CxHxW) but {model_uri} was trained "
            f"on {image.shape}"
        )
    if manifest.classes != meta["classes"]:
        raise DatasetError(f"{data_uri}: classes {manifest.classes} differ from the model's")
    verify_split(data_uri, manifest, split, storage)  # the data scored is the data listed
    # The model's own normalisation, not the dataset's: it is what the model was trained with.
    batches = iter_split(
        data_uri, manifest, split, storage=storage, resize=input_resize(meta), normalization=norm
    )
    result = evaluate(
        model, batches, len(manifest.classes), device=torch.device("cpu"), confusion=True
    )
    confusion = result.pop("confusion")
    result["per_class_accuracy"] = dict(
        zip(manifest.classes, per_class_accuracy(confusion), strict=True)
    )
    result["confusion"] = confusion.tolist()
    return result
