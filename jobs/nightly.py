"""`pipeline nightly` on a Ray cluster: the unattended nightly retrain
(new data -> train -> promote if better).

Submitted by `pipeline submit nightly ...` (or a RayJob), this runs in the job's working_dir on the
cluster and takes the CLI command's arguments:

    python jobs/nightly.py --config jobs/configs/nightly.yaml [--force]
"""

import sys
from pathlib import Path

# The project shipped with the job comes before any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.environment import require_pipeline_environment

require_pipeline_environment()  # one clear message if this Python lacks a dependency

from pipeline.cli import app  # noqa: E402 - only once the environment is known to be complete

if __name__ == "__main__":
    app(["nightly", *sys.argv[1:]], prog_name="jobs/nightly.py")
