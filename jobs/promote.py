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

from pipeline.cli import app

if __name__ == "__main__":
    app(["promote", *sys.argv[1:]], prog_name="jobs/promote.py")
