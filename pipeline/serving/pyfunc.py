"""The pyfunc that `mlflow models serve` runs (logged as `predictor/`, see model_package), and
how `pipeline serve` starts MLflow's scoring server for it."""

from __future__ import annotations

import base64
import binascii
import os
import sys
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from pipeline.errors import ServingError
from pipeline.model_package import rebuild
from pipeline.registry import mlflow_errors
from pipeline.serving.predictor import Predictor, torch_forward

# One request's encoded images, together: beyond this the scoring server answers 400 before it
# decodes anything (one image's pixels are capped by `predictor.MAX_IMAGE_PIXELS`).
MAX_REQUEST_BYTES = 32 * 1024 * 1024


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
            _check_request_size(cells)
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


def _check_request_size(cells: list[Any]) -> None:
    # base64 carries 3 bytes in 4 characters
    total = sum(len(c) if isinstance(c, bytes) else len(str(c)) * 3 // 4 for c in cells)
    if total > MAX_REQUEST_BYTES:
        raise ServingError(
            f"the request carries {total:,} bytes of images, over the limit of "
            f"{MAX_REQUEST_BYTES:,}; send fewer or smaller images per request"
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


def verified_predictor(model_uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download the `predictor/` model at `model_uri` into `dst` and check that what the scoring
    server would execute is this package's own entry module, byte for byte; the local copy.

    MLflow's scoring server runs a models-from-code file, or unpickles a pickled `PythonModel`:
    either way, code from the artifact store. Only the file this package writes
    (`pipeline/serving/pyfunc_entry.py`, matched by sha256) is served, from the checked copy."""
    import hashlib

    import mlflow
    import yaml

    from pipeline.model_package import PREDICTOR_ENTRY

    with mlflow_errors(model_uri):
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri
            )
        )
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ServingError(f"{model_uri}: not a pyfunc model ({exc})") from None
    refuse = f"{model_uri}: refusing to serve it"
    if flavor.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or flavor.get("code"):
        raise ServingError(
            f"{refuse}: it is not the pipeline's models-from-code predictor (a pickled or "
            "foreign model would run code from the artifact store)"
        )
    code = local / Path(str(flavor.get("model_code_path", ""))).name
    expected = hashlib.sha256(PREDICTOR_ENTRY.read_bytes()).hexdigest()
    actual = hashlib.sha256(code.read_bytes()).hexdigest() if code.is_file() else "missing"
    if actual != expected:
        raise ServingError(
            f"{refuse}: its code file {code.name} (sha256 {actual[:16]}) is not the one this "
            f"pipeline version writes ({expected[:16]}); re-register the model with this version "
            "or serve it with the version that logged it"
        )
    return local


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
