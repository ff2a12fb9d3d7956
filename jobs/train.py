"""`pipeline train` on a Ray cluster: validate the config, train with Ray
Train, log to MLflow, register the model.

Submitted by `pipeline submit train ...` (or a RayJob), this runs in the job's working_dir on the
cluster and takes the CLI command's arguments:

    python jobs/train.py --config jobs/configs/digits.yaml [--set train.epochs=10 ...]
"""

import sys
from pathlib import Path

# The project shipped with the job comes before any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.environment import require_pipeline_environment

require_pipeline_environment()  # one clear message if this Python lacks a dependency

from pipeline.cli import app  # noqa: E402 - only once the environment is known to be complete

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="jobs/train.py")
