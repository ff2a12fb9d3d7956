"""What a logged model carries, and how it is logged to MLflow and rebuilt from it.

A logged model is the MLflow PyTorch flavour (`mlflow.pytorch.log_model`, torch.export's pt2 format
where the model exports, with a signature and an input example) plus two extra files that make it
safe and self-describing to load anywhere:
  weights.pt           the state dict, loaded with `torch.load(weights_only=True)` (no pickle code)
  pipeline_model.json  model config, classes, image spec, normalisation, the evaluation crop
                       (photographs), dataset digest
so a service rebuilds the network from the zoo and applies exactly the training preprocessing.

Beside `model/`, the run gets `predictor/`: a pyfunc over raw images (base64 PNG/JPEG in a
column `image`; see `pipeline.serving.pyfunc.PyfuncPredictor`) that `mlflow models serve` runs.
It is logged as "models from code" (`pipeline/serving/pyfunc_entry.py`, no pickled Python
object) and rebuilds the network from the same two files.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.data.shards import ImageSpec, Manifest, Normalization
from pipeline.errors import ModelError
from pipeline.models.zoo import build_model
from pipeline.tags import MODEL_ARTIFACT, MODEL_META_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

PREDICTOR_NAME = "predictor"
# The predictor's models-from-code entry point, a module of `pipeline.serving`. MLflow runs it (at
# log and serve time) in processes that have the pipeline installed; referring to it by path keeps
# this module from importing the serving layer above it.
PREDICTOR_ENTRY = Path(__file__).resolve().parent / "serving" / "pyfunc_entry.py"


def package_metadata(cfg: PipelineConfig, manifest: Manifest) -> dict[str, Any]:
    c = manifest.image.channels
    return {
        "format_version": 1,
        "model": cfg.model.model_dump(mode="json"),
        "in_channels": cfg.model.in_channels or c,
        "num_classes": cfg.model.num_classes or manifest.num_classes,
        "image": manifest.image.model_dump(mode="json"),
        # [height, width] the network sees after the bilinear resize, or None (stored size)
        "resize": list(cfg.data.resize) if cfg.data.resize else None,
        # photographs: Resize(size / eval_crop_ratio) + CenterCrop(size) of any image, or None
        "crop": (
            {"size": cfg.data.crop.size, "eval_crop_ratio": cfg.data.crop.eval_crop_ratio}
            if cfg.data.crop
            else None
        ),
        "classes": manifest.classes,
        "normalization": manifest.normalization.model_dump(mode="json"),
        "dataset": {"name": manifest.name, "digest": manifest.digest, "uri": cfg.data.uri},
        "config_digest": cfg.digest(),
        "channels_last": cfg.train.channels_last,
    }


def input_resize(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) the package's images are resized to before the network, or None."""
    resize = meta.get("resize")  # absent in packages from before data.resize existed
    return (int(resize[0]), int(resize[1])) if resize else None


@dataclass(frozen=True)
class EvalCrop:
    """The evaluation transform of a model trained on crops: Resize(size / ratio), then
    CenterCrop(size) (`pipeline.data.imaging.evaluation_crop`)."""

    size: int
    ratio: float


def eval_crop(meta: dict[str, Any]) -> EvalCrop | None:
    """The package's evaluation crop, or None (trained on fixed-size images; packages from
    before data.crop existed have no `crop` key)."""
    crop = meta.get("crop")
    return EvalCrop(int(crop["size"]), float(crop["eval_crop_ratio"])) if crop else None


def input_shape(meta: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the normalised tensors the network takes."""
    image = ImageSpec.model_validate(meta["image"])
    crop = eval_crop(meta)
    if crop is not None:
        return (image.channels, crop.size, crop.size)
    c, h, w = image.shape
    return (c, *(input_resize(meta) or (h, w)))


def example_input(meta: dict[str, Any], batch: int = 2) -> np.ndarray:
    """A normalised float32 NCHW batch (batch > 1: torch.export needs a dynamic batch dim)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *input_shape(meta))).astype(np.float32)


def log_pipeline_model(model: nn.Module, cfg: PipelineConfig, manifest: Manifest):
    """Log `model` to the active MLflow run under `model/`; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    meta = package_metadata(cfg, manifest)
    model = model.cpu().eval()
    example = example_input(meta)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with tempfile.TemporaryDirectory() as d:
        files = Path(d) / MODEL_ARTIFACT
        files.mkdir()
        torch.save(model.state_dict(), files / WEIGHTS_FILE)
        (files / MODEL_META_FILE).write_text(json.dumps(meta, indent=2))
        extra = [str(files / WEIGHTS_FILE), str(files / MODEL_META_FILE)]
        logged = functools.partial(
            mlflow.pytorch.log_model,
            model,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            extra_files=extra,
            pip_requirements=_requirements(),
        )
        try:  # torch.export with a dynamic batch dimension: no pickled code in the package
            # MLflow would reload the saved program and run the example through it (2-6 s at the
            # end of every run): the example's output is this model's own already, and `pull`
            # checks every export against the original.
            info = logged(serialization_format="pt2", validate_serving_input=False)
        except Exception as exc:  # export failures come in many types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            log.warning(
                "torch.export could not export %s (%s: %s); logging MLflow's pickle format "
                "instead (the pipeline itself loads weights.pt, never the pickle)",
                type(model).__name__,
                type(exc).__name__,
                first,
            )
            info = logged(serialization_format="pickle")  # (its extra kwargs go to torch.save)
        log_predictor(files, meta)
        return info


def log_predictor(files: Path, meta: dict[str, Any]):
    """Log `predictor/`, the pyfunc over raw images, from a directory holding weights.pt and
    pipeline_model.json; returns MLflow's ModelInfo."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),  # base64 PNG/JPEG bytes
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.long, "index"),
                ColSpec(DataType.double, "confidence"),
                ColSpec(Array(DataType.double), "probabilities"),  # in `classes` order
            ]
        ),
    )
    return mlflow.pyfunc.log_model(
        name=PREDICTOR_NAME,
        python_model=str(PREDICTOR_ENTRY),
        artifacts={"model": str(files)},
        signature=signature,
        input_example=pd.DataFrame({"image": [blank_image_base64(meta)]}),
        pip_requirements=_requirements(),
    )


def blank_image_base64(meta: dict[str, Any]) -> str:
    """A black PNG of the model's image size (its crop's for photographs), base64-encoded: the
    predictor's input example."""
    import base64
    import io

    from PIL import Image

    image = ImageSpec.model_validate(meta["image"])
    mode = "L" if image.channels == 1 else "RGB"
    crop = eval_crop(meta)
    size = (crop.size, crop.size) if crop else (image.width, image.height)
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _requirements() -> list[str]:
    import mlflow
    import torchvision

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        "pyarrow",
        "pydantic",
        "pillow",
    ]


def rebuild(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a downloaded model directory, weights loaded weights-only."""
    model_dir = Path(model_dir)
    meta_path = _find(model_dir, MODEL_META_FILE)
    meta = json.loads(meta_path.read_text())
    model = build_model(
        ModelConfig.model_validate(meta["model"]),
        in_channels=meta["in_channels"],
        num_classes=meta["num_classes"],
        image_size=max(input_shape(meta)[1:]),
    )
    state = load_weights_only(_find(model_dir, WEIGHTS_FILE))
    model.load_state_dict(state)
    return model.eval(), meta


def load_weights_only(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only. A file that needs
    anything else (pickled code) is refused as a ModelError naming it, never run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path}: refused: it is not a plain state dict (torch's weights-only load: "
            f"{first}); the pipeline never unpickles code from a model store"
        ) from None


def package_files(model_dir: str | Path) -> dict[str, Path]:
    """The two files `rebuild` reads from a downloaded model directory, by name: what a remote
    worker needs to rebuild the network (the rest of an MLflow model directory is not)."""
    return {name: _find(Path(model_dir), name) for name in (MODEL_META_FILE, WEIGHTS_FILE)}


def _find(model_dir: Path, name: str) -> Path:
    for candidate in (model_dir / name, model_dir / "extra_files" / name):
        if candidate.is_file():
            return candidate
    found = sorted(model_dir.rglob(name))
    if not found:
        raise ModelError(f"{model_dir}: no {name}; this model was not logged by `pipeline train`")
    return found[0]


def load_logged_model(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """models:/NAME@alias, models:/NAME/3, runs:/ID/model or a local directory -> (model, meta)."""
    if Path(uri).is_dir():
        return rebuild(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as exc:
        raise ModelError(f"{uri}: cannot be downloaded from MLflow ({exc.message})") from None
    return rebuild(local)


def preprocessing(meta: dict[str, Any]) -> tuple[ImageSpec, Normalization]:
    return (
        ImageSpec.model_validate(meta["image"]),
        Normalization.model_validate(meta["normalization"]),
    )
