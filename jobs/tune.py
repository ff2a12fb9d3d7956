"""`pipeline tune` on a Ray cluster: a Ray Tune search over a search space;
the best trial's model is registered.

Submitted by `pipeline submit tune ...` (or a RayJob), this runs in the job's working_dir on the
cluster and takes the CLI command's arguments:

    python jobs/tune.py --config jobs/configs/digits.yaml --space FILE [--set ...]
"""

import sys
from pathlib import Path

# The project shipped with the job comes before any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.environment import require_pipeline_environment

require_pipeline_environment()  # one clear message if this Python lacks a dependency

from pipeline.cli import app  # noqa: E402 - only once the environment is known to be complete

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]], prog_name="jobs/tune.py")
