"""`pipeline promote` on a Ray cluster: move `champion` to the candidate only
if it beats the champion on the same held-out data.

Submitted by `pipeline submit promote ...` (or a RayJob), this runs in the job's working_dir on the
cluster and takes the CLI command's arguments:

    python jobs/promote.py digits-resnet [--candidate N] [--dry-run]
"""

import sys
from pathlib import Path

# The project shipped with the job comes before any installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.environment import require_pipeline_environment

require_pipeline_environment()  # one clear message if this Python lacks a dependency

from pipeline.cli import app  # noqa: E402 - only once the environment is known to be complete

if __name__ == "__main__":
    app(["promote", *sys.argv[1:]], prog_name="jobs/promote.py")
