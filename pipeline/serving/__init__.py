"""Registered models in downstream services.

| module | what |
|---|---|
| `predictor` | `load(uri)` -> `Predictor`: raw images in, classes and probabilities out |
| `export` | `pull(uri, dest, fmt)`: torchscript, onnx, state_dict or mlflow, checked and hashed |
| `pulled` | a pulled folder's record and its sha256 verification |
| `fetch` | resolving and downloading `models:/` and `runs:/` URIs |
| `pyfunc` | the `predictor/` pyfunc MLflow's scoring server runs, and `pipeline serve`'s command |
| `pyfunc_entry` | the models-from-code file logged with every predictor |
| `batch` | `predict(uri, opts)`: `pipeline predict`'s Ray Data actor pool, Parquet output |

Nothing here unpickles Python objects: networks are rebuilt from the zoo with a state dict
loaded `weights_only=True`, or read from TorchScript / ONNX files whose hashes were checked.
"""

from pipeline.serving.export import pull
from pipeline.serving.fetch import describe_source, predictor_uri
from pipeline.serving.predictor import Prediction, Predictor, load, to_pixels, torch_forward
from pipeline.serving.pulled import FORMATS, sha256_file, verify_pulled
from pipeline.serving.pyfunc import PyfuncPredictor, scoring_server_command, scoring_server_env

__all__ = [
    "FORMATS",
    "Prediction",
    "Predictor",
    "PyfuncPredictor",
    "describe_source",
    "load",
    "predictor_uri",
    "pull",
    "scoring_server_command",
    "scoring_server_env",
    "sha256_file",
    "to_pixels",
    "torch_forward",
    "verify_pulled",
]
