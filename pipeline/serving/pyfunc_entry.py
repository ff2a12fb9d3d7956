"""MLflow models-from-code entry point: the pipeline's image predictor.

`pipeline.model_package.log_predictor` logs this file as the `predictor/` model's code; MLflow
runs it when the model is loaded or served, in an environment with the pipeline installed.
"""

import mlflow

from pipeline.serving.pyfunc import PyfuncPredictor

mlflow.models.set_model(PyfuncPredictor())
