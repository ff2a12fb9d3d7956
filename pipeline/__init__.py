"""Distributed ResNet batch-training pipeline.

Importing the package sets two process-wide MLflow defaults, inherited by every process the
pipeline starts (Ray workers, jobs, servers):

* `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`, always: nothing from a tracking server or artifact
  store is ever unpickled (weights load with `torch.load(weights_only=True)`), and MLflow's own
  loaders are told so too, in case a library call reaches one.
* bounded HTTP retries and request timeout (MLflow's defaults retry for minutes before an error
  reaches the user); an explicit setting in the environment wins.
"""

import os

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
