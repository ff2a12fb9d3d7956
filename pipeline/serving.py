"""Registered models in downstream services: a predictor over raw images, exports and pulls.

* `load("models:/NAME@champion")` -> `Predictor`: raw images in (uint8 arrays HxW / HxWxC, PIL
  images, PNG/JPEG bytes; one or a list), class names and probabilities out, with exactly the
  training preprocessing (the dataset import's convert + bilinear resize, then `BatchTransform`).
* `pull(uri, dest, fmt)`: torchscript | onnx | state_dict | mlflow into DEST, checked against the
  original network on sample inputs before anything is written, with `pipeline_pull.json`
  (classes, input shape, normalisation, source version, sha256 of every file) beside it. A failed
  pull leaves no DEST; `load(DEST)` verifies every hash before it reads a byte of the model.
* `PyfuncPredictor`: the `predictor/` pyfunc that `mlflow models serve` runs.
* `tracking_server_command` / `scoring_server_command`: how `pipeline server mlflow` and
  `pipeline serve` start MLflow's servers.

Nothing here unpickles Python objects: networks are rebuilt from the zoo and a state dict loaded
with `weights_only=True`, or read from TorchScript / ONNX files whose hashes were checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config import TrackingConfig
from pipeline.data.shards import ImageSpec
from pipeline.data.transform import BatchTransform
from pipeline.errors import IntegrityError, RegistryError, ServingError
from pipeline.model_package import (
    PREDICTOR_NAME,
    example_input,
    input_resize,
    input_shape,
    preprocessing,
    rebuild,
)
from pipeline.registry import connect, mlflow_errors, resolve_version
from pipeline.tags import MODEL_META_FILE, PULL_META_FILE, WEIGHTS_FILE

FORMATS = ("torchscript", "onnx", "state_dict", "mlflow")
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
# Largest |logit difference| allowed between an export and the network it came from. TorchScript
# runs the same kernels; ONNX Runtime fuses and reorders float ops.
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4, "state_dict": 1e-6, "mlflow": 1e-6}
BATCH = 256  # images per forward pass: bounds memory for long lists

ImageInput = Any  # np.ndarray (HxW, HxWxC, or NxHxWxC), PIL.Image.Image, bytes (PNG/JPEG)
Forward = Callable[[np.ndarray], np.ndarray]  # normalised float32 NCHW -> logits (N, classes)


# ---------------------------------------------------------------------------------------------
# Raw images -> the pixels training saw


def to_pixels(images: ImageInput | Sequence[ImageInput], image: ImageSpec) -> np.ndarray:
    """One image or a list -> (N, H, W, C) uint8 at the model's size and channels."""
    items = _as_list(images)
    out = np.empty((len(items), image.height, image.width, image.channels), np.uint8)
    for i, item in enumerate(items):
        try:
            out[i] = _one_image(item, image)
        except ValueError as exc:
            raise ServingError(f"image {i}: {exc}") from None
    return out


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a batch N x H x W x C
        return list(images)
    return [images]


def _one_image(item: Any, image: ImageSpec) -> np.ndarray:
    from PIL import Image

    if isinstance(item, bytes | bytearray | memoryview):
        try:
            with Image.open(io.BytesIO(bytes(item))) as img:
                return _from_pil(img, image)
        except (OSError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
            raise ValueError(f"bytes do not decode as an image ({exc}); send PNG or JPEG") from None
    if isinstance(item, Image.Image):
        return _from_pil(item, image)
    if isinstance(item, np.ndarray):
        return _from_array(item, image)
    raise ValueError(
        f"unsupported input {type(item).__name__}; pass a uint8 array (HxW or HxWxC), a PIL "
        "image or PNG/JPEG bytes"
    )


def _from_array(pixels: np.ndarray, image: ImageSpec) -> np.ndarray:
    from PIL import Image

    if pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels are {pixels.dtype}; pass uint8 0-255 (for floats in [0, 1]: "
            "(x * 255).round().astype(np.uint8))"
        )
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"array of shape {pixels.shape}: expected HxW or HxWxC with C in 1, 3, 4 (a batch: "
            "a list of images or an NxHxWxC array)"
        )
    if pixels.shape == (image.height, image.width, image.channels):
        return pixels  # already what the dataset stores: no conversion at all
    return _from_pil(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels), image)


def _from_pil(img: Any, image: ImageSpec) -> np.ndarray:
    from PIL import Image, ImageOps

    # The dataset import's steps (pipeline.data.imaging.prepare): apply the EXIF orientation,
    # convert the mode, then bilinear resize.
    img = ImageOps.exif_transpose(img).convert("L" if image.channels == 1 else "RGB")
    if img.size != (image.width, image.height):
        img = img.resize((image.width, image.height), Image.Resampling.BILINEAR)
    return np.asarray(img).reshape(image.height, image.width, image.channels)


# ---------------------------------------------------------------------------------------------
# The predictor


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    confidence: float
    probabilities: dict[str, float]  # class name -> probability, in the model's class order


class Predictor:
    """Raw images in, class names and probabilities out, with the training preprocessing."""

    def __init__(self, forward: Forward, meta: dict[str, Any], source: str) -> None:
        self.meta, self.source = meta, source
        self.image, self.normalization = preprocessing(meta)
        self.classes: list[str] = list(meta["classes"])
        self._forward = forward
        self._transform = BatchTransform(
            self.image, self.normalization, augment=None, resize=input_resize(meta)
        )

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """The normalised float32 NCHW batch the network sees."""
        return self._transform.to_tensor(to_pixels(images, self.image)).numpy()

    def logits(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        x = self.preprocess(images)
        parts = [self._forward(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """(N, classes) softmax probabilities, columns in `classes` order."""
        return torch.softmax(torch.from_numpy(self.logits(images)).double(), dim=1).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Prediction]:
        """One Prediction per image (a single image gives a list of one)."""
        return [
            Prediction(
                label=self.classes[int(p.argmax())],
                index=int(p.argmax()),
                confidence=float(p.max()),
                probabilities=dict(zip(self.classes, map(float, p), strict=True)),
            )
            for p in self.probabilities(images)
        ]

    def predict_one(self, image: ImageInput) -> Prediction:
        return self.predict([image])[0]


def torch_forward(model: nn.Module) -> Forward:
    model = model.eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return forward


def _torchscript_forward(path: Path) -> Forward:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still works
        return torch_forward(torch.jit.load(str(path), map_location="cpu"))


def _onnx_forward(path: Path) -> Forward:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def load(uri: str, *, tracking_uri: str | None = None, timeout_s: float = 10.0) -> Predictor:
    """A Predictor for `models:/NAME@alias`, `models:/NAME/N`, `runs:/ID/model`, or a local
    directory: one written by `pull` (hashes verified first) or an MLflow model directory."""
    path = Path(uri)
    if path.is_dir():
        return _load_dir(path)
    if "://" not in uri and ":/" not in uri:
        raise ServingError(f"{uri}: not a directory, nor a models:/ or runs:/ URI")
    with tempfile.TemporaryDirectory(prefix="predictor-") as tmp:
        local, _ = _download(uri, Path(tmp), tracking_uri, timeout_s)
        model, meta = rebuild(local)
    return Predictor(torch_forward(model), meta, source=uri)


def _load_dir(path: Path) -> Predictor:
    if not (path / PULL_META_FILE).is_file():
        model, meta = rebuild(path)
        return Predictor(torch_forward(model), meta, source=str(path))
    pulled = verify_pulled(path)
    forward = _forward_of(pulled["format"], path)
    return Predictor(forward, pulled["pipeline_model"], source=str(path))


def _forward_of(fmt: str, path: Path) -> Forward:
    if fmt == "torchscript":
        return _torchscript_forward(path / TORCHSCRIPT_FILE)
    if fmt == "onnx":
        return _onnx_forward(path / ONNX_FILE)
    if fmt in ("state_dict", "mlflow"):
        model, _ = rebuild(path)
        return torch_forward(model)
    raise ServingError(
        f"{path / PULL_META_FILE}: unknown format {fmt!r}; expected one of {FORMATS}"
    )


# ---------------------------------------------------------------------------------------------
# Resolving and downloading models:/ and runs:/ URIs

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+?)/?$")


def describe_source(client, uri: str) -> dict[str, Any]:
    """What `uri` points at: registered model name, version and run (what is known)."""
    match = _MODELS_URI.match(uri)
    if match:
        version = resolve_version(client, match["name"], match["alias"] or match["version"])
        return {"name": version.name, "version": str(version.version), "run_id": version.run_id}
    match = _RUNS_URI.match(uri)
    if match:
        return {"name": None, "version": None, "run_id": match["run_id"]}
    raise ServingError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/PATH")


def predictor_uri(uri: str, *, tracking_uri: str | None = None, timeout_s: float = 10.0) -> str:
    """`runs:/<run>/predictor` of a registered version or run: what the scoring server serves."""
    client = connect(tracking_uri or TrackingConfig().resolved_uri(), timeout_s)
    source = describe_source(client, uri)
    if not source["run_id"]:
        raise ServingError(f"{uri}: the version has no run, so no {PREDICTOR_NAME}/ artifact")
    found = f"runs:/{source['run_id']}/{PREDICTOR_NAME}"
    with mlflow_errors(f"{uri} ({found}; models logged before the predictor existed lack it)"):
        mlflow.models.get_model_info(found)
    return found


def _download(
    uri: str, dst: Path, tracking_uri: str | None, timeout_s: float
) -> tuple[Path, dict[str, Any]]:
    tracking = tracking_uri or TrackingConfig().resolved_uri()
    client = connect(tracking, timeout_s)
    source = describe_source(client, uri)  # unknown names and aliases fail here, clearly
    with mlflow_errors(uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking
        )
    return Path(local), {**source, "uri": uri, "tracking_uri": _without_credentials(tracking)}


def _without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


# ---------------------------------------------------------------------------------------------
# Pull: download, export, check, hash, then move into place


def pull(
    uri: str,
    dest: str | Path,
    fmt: str,
    *,
    tracking_uri: str | None = None,
    timeout_s: float = 10.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the model at `uri` into `dest` as `fmt`; returns the pipeline_pull.json contents.

    Everything is built in a hidden staging directory beside DEST and renamed into place only
    after the export matched the original network on sample inputs, so a failed pull leaves no
    DEST (and with `overwrite`, the previous DEST untouched).
    """
    if fmt not in FORMATS:
        raise ServingError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ServingError(f"{dest}: already exists; pass --overwrite or choose another --dest")
    staging = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory(prefix="pull-") as tmp:
            local, source = _download(uri, Path(tmp), tracking_uri, timeout_s)
            if fmt == "mlflow":
                local, source = _with_predictor(local, source, Path(tmp), tracking_uri)
            model, meta = rebuild(local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            _EXPORTS[fmt](model, meta, local, staging)
            check = _check(fmt, model, meta, staging)
        record = _pull_record(fmt, source, meta, check, staging)
        (staging / PULL_META_FILE).write_text(json.dumps(record, indent=2))
        verify_pulled(staging)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _with_predictor(
    local: Path, source: dict[str, Any], tmp: Path, tracking_uri: str | None
) -> tuple[Path, dict[str, Any]]:
    """For --format mlflow, the run's `predictor/` pyfunc (images in, servable as it is) when it
    has one; it carries the same weights.pt and pipeline_model.json as `model/`."""
    if not source.get("run_id"):
        return local, source
    uri = f"runs:/{source['run_id']}/{PREDICTOR_NAME}"
    try:
        found = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(tmp / PREDICTOR_NAME), tracking_uri=tracking_uri
        )
    except Exception:  # logged before the predictor existed: the registered model/ it is
        return local, source
    return Path(found), {**source, "artifact": uri}


def _export_torchscript(model: nn.Module, meta: dict[str, Any], _local: Path, out: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still works
        traced = torch.jit.trace(model, torch.from_numpy(example_input(meta, batch=2)))
        torch.jit.save(traced, str(out / TORCHSCRIPT_FILE))


def _export_onnx(model: nn.Module, meta: dict[str, Any], _local: Path, out: Path) -> None:
    example = torch.from_numpy(example_input(meta, batch=2))
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out / ONNX_FILE),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,  # one self-contained file (fine below protobuf's 2 GB)
        )


class _quiet_stdout:
    """torch.onnx's exporter prints progress lines on stdout; `--json` output must stay clean."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)


def _export_state_dict(_model: nn.Module, _meta: dict[str, Any], local: Path, out: Path) -> None:
    from pipeline.model_package import _find

    # Byte-for-byte the registered files: their hashes match what the run logged.
    shutil.copy2(_find(local, WEIGHTS_FILE), out / WEIGHTS_FILE)
    shutil.copy2(_find(local, MODEL_META_FILE), out / MODEL_META_FILE)


def _export_mlflow(_model: nn.Module, _meta: dict[str, Any], local: Path, out: Path) -> None:
    shutil.copytree(local, out, dirs_exist_ok=True)


_EXPORTS = {
    "torchscript": _export_torchscript,
    "onnx": _export_onnx,
    "state_dict": _export_state_dict,
    "mlflow": _export_mlflow,
}


def _check(fmt: str, model: nn.Module, meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the written export the way a consumer will and compare logits with the original,
    on a batch of 8 and of 1 (the export must not have fixed the batch size)."""
    exported = _forward_of(fmt, out)
    original = torch_forward(model)
    worst = 0.0
    for batch in (8, 1):
        x = example_input(meta, batch=batch)
        worst = max(worst, float(np.abs(exported(x) - original(x)).max()))
    tolerance = TOLERANCE[fmt]
    if not worst <= tolerance:  # also catches NaN
        raise ServingError(
            f"the {fmt} export differs from the original network by {worst:.3g} > {tolerance:g} "
            "on sample inputs; nothing was written (try another --format)"
        )
    return {"samples": 9, "max_abs_diff": worst, "tolerance": tolerance}


def _pull_record(fmt, source, meta, check, staging: Path) -> dict[str, Any]:
    c, h, w = input_shape(meta)
    return {
        "pull_format_version": 1,
        "format": fmt,
        "source": source,
        "classes": meta["classes"],
        "input": {"name": "image", "shape": ["batch", c, h, w], "dtype": "float32"},
        "image": meta["image"],  # raw images: what `load` resizes and converts to
        "resize": meta.get("resize"),  # then bilinear to [height, width] before normalising
        "normalization": meta["normalization"],
        "check": check,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {rel: sha256_file(staging / rel) for rel in _files(staging)},
        "pipeline_model": meta,
    }


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != PULL_META_FILE
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move_into_place(staging: Path, dest: Path) -> None:
    if not dest.exists():
        staging.rename(dest)
        return
    old = dest.parent / f".{dest.name}.replaced-{uuid.uuid4().hex[:8]}"
    dest.rename(old)
    try:
        staging.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def verify_pulled(path: str | Path) -> dict[str, Any]:
    """Check every file listed in DEST/pipeline_pull.json against its sha256; the record."""
    path = Path(path)
    meta_file = path / PULL_META_FILE
    try:
        record = json.loads(meta_file.read_text())
        files: dict[str, str] = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{meta_file}: unreadable pull record ({exc}); pull again") from None
    root = path.resolve()
    for rel, expected in files.items():
        target = (path / rel).resolve()
        if not target.is_relative_to(root):
            raise IntegrityError(f"{meta_file}: file {rel!r} points outside {path}; pull again")
        if not target.is_file():
            raise IntegrityError(f"{path / rel}: missing (listed in {PULL_META_FILE}); pull again")
        actual = sha256_file(target)
        if actual != expected:
            raise IntegrityError(
                f"{path / rel}: sha256 {actual[:16]}… does not match {expected[:16]}… recorded "
                f"in {PULL_META_FILE}; the file was changed or corrupted, pull it again"
            )
    return record


# ---------------------------------------------------------------------------------------------
# The pyfunc that `mlflow models serve` runs (logged as predictor/, see model_package)


class PyfuncPredictor(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a column `image` of base64-encoded PNG/JPEG bytes (a list of
    base64 strings also works in-process). Output: a DataFrame with `label`, `index`,
    `confidence` and `probabilities` (in class order) per row."""

    def load_context(self, context) -> None:
        model, meta = rebuild(context.artifacts["model"])  # weights_only: no pickled code
        self.predictor = Predictor(torch_forward(model), meta, source="pyfunc")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        cells = list(model_input["image"]) if hasattr(model_input, "columns") else model_input
        try:
            predictions = self.predictor.predict(
                [_decode_base64(i, c) for i, c in enumerate(cells)]
            )
        except ServingError as exc:  # a client error: the scoring server answers 400
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(
            {
                "label": [p.label for p in predictions],
                "index": [p.index for p in predictions],
                "confidence": [p.confidence for p in predictions],
                "probabilities": [list(p.probabilities.values()) for p in predictions],
            }
        )


def _decode_base64(row: int, cell: Any) -> bytes:
    if isinstance(cell, bytes):
        return cell
    try:
        return base64.b64decode(str(cell), validate=True)
    except (binascii.Error, ValueError):
        raise ServingError(
            f"row {row}: `image` is not base64 (send base64 PNG/JPEG bytes)"
        ) from None


# ---------------------------------------------------------------------------------------------
# MLflow's servers


def tracking_server_command(
    backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str = "./mlartifacts",
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> list[str]:
    """`mlflow server` with proxied artifacts (clients need no storage credentials)."""
    if _is_postgres(backend_store_uri):
        backend_store_uri = postgres_backend_uri(backend_store_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:  # MLflow 3 rejects other Host headers (DNS-rebinding protection)
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


# SQLAlchemy's PostgreSQL drivers that take libpq's connect_timeout, by URI driver name.
_PG_DRIVERS = {"psycopg2": "psycopg2", "psycopg": "psycopg"}


def _is_postgres(uri: str) -> bool:
    return uri.partition("://")[0].partition("+")[0] == "postgresql"


def masked_uri(uri: str) -> str:
    """`uri` with its password (if any) replaced by ***, for messages and logs."""
    parts = urlsplit(uri)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def postgres_backend_uri(uri: str) -> str:
    """A postgresql:// URI naming a driver that is installed.

    SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; with only psycopg2 installed (the
    `postgres` extra) the URI becomes postgresql+psycopg2://. A URI naming its driver is kept.
    """
    import importlib.util

    scheme, _, rest = uri.partition("://")
    driver = scheme.partition("+")[2]
    if driver:
        module = _PG_DRIVERS.get(driver, driver)
        if importlib.util.find_spec(module) is None:
            raise ServingError(
                f"--backend-store-uri {masked_uri(uri)}: the {driver} driver is not installed; "
                f"install it (`.venv/bin/pip install {module}`) or use postgresql:// with "
                "`.venv/bin/pip install psycopg2-binary`"
            )
        return uri
    if importlib.util.find_spec("psycopg") is not None:
        return uri
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    raise ServingError(
        f"--backend-store-uri {masked_uri(uri)}: PostgreSQL needs a driver; install one with "
        "`.venv/bin/pip install psycopg2-binary` (or `pip install -e '.[postgres]'`)"
    )


def check_backend_store(uri: str, timeout_s: float = 10.0) -> None:
    """Connect once to a PostgreSQL backend store, with a bounded wait.

    `mlflow server` itself retries a failing database for about 100 s and then ends in a
    traceback; this fails in seconds with the URI (password masked) and what to fix.
    """
    if not _is_postgres(uri):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = masked_uri(uri)
    uri = postgres_backend_uri(uri)
    try:
        driver = sqlalchemy.engine.make_url(uri).get_driver_name()
        bounded = {"connect_timeout": max(2, round(timeout_s))} if driver in _PG_DRIVERS else {}
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=bounded)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ServingError(
            f"--backend-store-uri {shown}: not a valid PostgreSQL URI ({exc}); expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        reason = " ".join(str(exc.orig).split())
        password = urlsplit(uri).password
        if password:
            reason = reason.replace(password, "***")
        raise ServingError(
            f"--backend-store-uri {shown}: cannot connect to PostgreSQL ({reason}); check that "
            "the server runs and accepts TCP connections at that host and port, the user and "
            "password, and that the database exists (createdb DATABASE)"
        ) from None
    finally:
        engine.dispose()


def scoring_server_env(tracking_uri: str) -> dict[str, str]:
    """The scoring server's environment: it resolves runs:/ against `tracking_uri`, and starts
    `uvicorn` by name, which must be this environment's."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}


def scoring_server_command(
    model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1
) -> list[str]:
    """`mlflow models serve` of a predictor in this environment (`--env-manager local`)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


__all__ = [
    "FORMATS",
    "IntegrityError",
    "Prediction",
    "Predictor",
    "PyfuncPredictor",
    "RegistryError",
    "ServingError",
    "check_backend_store",
    "load",
    "masked_uri",
    "postgres_backend_uri",
    "predictor_uri",
    "pull",
    "scoring_server_command",
    "scoring_server_env",
    "to_pixels",
    "tracking_server_command",
    "verify_pulled",
]
