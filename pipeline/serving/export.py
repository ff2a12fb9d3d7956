"""`pipeline pull`: download a model, export it, check the export against the original network
on sample inputs, write it with `pipeline_pull.json` (classes, input shape, normalisation, source
version, sha256 of every file). A failed pull leaves no DEST."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from pipeline.errors import ServingError
from pipeline.model_package import PREDICTOR_NAME, example_input, input_shape, rebuild
from pipeline.serving.fetch import download
from pipeline.serving.predictor import _forward_of, torch_forward
from pipeline.serving.pulled import (
    FORMATS,
    ONNX_FILE,
    PT2_FILE,
    TORCHSCRIPT_FILE,
    _files,
    sha256_file,
    verify_pulled,
)
from pipeline.tags import MODEL_META_FILE, PULL_META_FILE, WEIGHTS_FILE

# Largest |logit difference| allowed between an export and the network it came from, per unit of
# the largest |logit| on the sample inputs (at least 1): float32 reordering errors grow with the
# values summed, and a trained network's logits reach tens. TorchScript runs the same kernels;
# ONNX Runtime fuses and reorders float ops (a resnet18 trained on photographs: 1.8e-4 absolute).
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4, "pt2": 1e-5, "state_dict": 1e-6, "mlflow": 1e-6}


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
    _check_dest(dest, overwrite)
    staging = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory(prefix="pull-") as tmp:
            local, source = download(uri, Path(tmp), tracking_uri, timeout_s)
            if fmt == "mlflow":
                local, source = _with_predictor(local, source, Path(tmp), tracking_uri)
            model, meta = rebuild(local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            _EXPORTS[fmt](model, meta, local, staging)
            check = _check(fmt, model, meta, staging)
        _write_card(source, tracking_uri, timeout_s, staging)
        record = _pull_record(fmt, source, meta, check, staging)
        (staging / PULL_META_FILE).write_text(json.dumps(record, indent=2))
        verify_pulled(staging)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _write_card(source: dict[str, Any], tracking_uri: str | None, timeout_s: float, out: Path):
    """A registered version's model card travels with it (hashed like every pulled file)."""
    if not source.get("name") or not source.get("version"):
        return  # a runs:/ URI: no registered version, no card
    from pipeline.config import TrackingConfig
    from pipeline.registry import connect
    from pipeline.registry.card import CARD_FILE, stored_card

    client = connect(tracking_uri or TrackingConfig().resolved_uri(), timeout_s)
    (out / CARD_FILE).write_text(stored_card(client, source["name"], source["version"]))


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


def _export_pt2(model: nn.Module, meta: dict[str, Any], _local: Path, out: Path) -> None:
    example = torch.from_numpy(example_input(meta, batch=2))
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export failures come in many types
        raise ServingError(
            f"torch.export cannot export this model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written, try "
            "--format torchscript or onnx"
        ) from None
    torch.export.save(program, str(out / PT2_FILE))


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
    "pt2": _export_pt2,
    "state_dict": _export_state_dict,
    "mlflow": _export_mlflow,
}


def _check(fmt: str, model: nn.Module, meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the written export the way a consumer will and compare logits with the original,
    on a batch of 8 and of 1 (the export must not have fixed the batch size)."""
    exported = _forward_of(fmt, out)
    original = torch_forward(model)
    diffs, logits = [], []
    for batch in (8, 1):
        x = example_input(meta, batch=batch)
        reference = original(x)
        diffs.append(np.abs(exported(x) - reference).max())
        logits.append(np.abs(reference).max())
    # np.max keeps a NaN (Python's max would drop one that comes second)
    worst, scale = float(np.max(diffs)), float(np.max(logits))
    tolerance = TOLERANCE[fmt] * max(1.0, scale)
    if not worst <= tolerance:  # also catches NaN
        raise ServingError(
            f"the {fmt} export differs from the original network by {worst:.3g} > {tolerance:.3g} "
            f"({TOLERANCE[fmt]:g} x the largest |logit|, {scale:.3g}) on sample inputs; nothing "
            "was written (try another --format)"
        )
    return {"samples": 9, "max_abs_diff": worst, "tolerance": tolerance, "logit_scale": scale}


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
        # or, for photographs of any size: Resize(size / eval_crop_ratio) + CenterCrop(size)
        "crop": meta.get("crop"),
        "normalization": meta["normalization"],
        "check": check,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {rel: sha256_file(staging / rel) for rel in _files(staging)},
        "pipeline_model": meta,
    }


def _check_dest(dest: Path, overwrite: bool) -> None:
    """`--overwrite` replaces only what a pull wrote (a folder with pipeline_pull.json) or an
    empty folder: never a file, nor a folder of someone else's files."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not overwrite:
        raise ServingError(f"{dest}: already exists; pass --overwrite or choose another --dest")
    if dest.is_symlink() or not dest.is_dir():
        raise ServingError(
            f"{dest}: not a folder; --overwrite replaces only a folder written by `pipeline "
            "pull`. Choose another --dest"
        )
    if any(dest.iterdir()) and not (dest / PULL_META_FILE).is_file():
        raise ServingError(
            f"{dest}: holds files that `pipeline pull` did not write (no {PULL_META_FILE}); "
            "--overwrite replaces only a pulled folder or an empty one. Choose another --dest"
        )


def _move_into_place(staging: Path, dest: Path) -> None:
    """Swap the finished staging folder in; the folder it replaces (checked by _check_dest to
    be a pull or empty) is removed, leaving nothing behind."""
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
    shutil.rmtree(old)
