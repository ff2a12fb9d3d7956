"""`pipeline predict` on a Ray cluster: batch predictions of a registered model over a dataset,
an image folder or an s3:// prefix, on a Ray Data actor pool; one Parquet file, all or nothing.

Submitted by `pipeline submit predict ...` (or a RayJob), this runs in the job's working_dir on the
cluster and takes the CLI command's arguments:

    python jobs/predict.py models:/digits-resnet@champion --data s3://b/digits --out s3://b/p.parquet
"""

import sys
from pathlib import Path

# The project shipped with the job comes before any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.environment import require_pipeline_environment

require_pipeline_environment()  # one clear message if this Python lacks a dependency

from pipeline.cli import app  # noqa: E402 - only once the environment is known to be complete

if __name__ == "__main__":
    app(["predict", *sys.argv[1:]], prog_name="jobs/predict.py")
