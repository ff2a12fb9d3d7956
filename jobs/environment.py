"""The first thing a submitted job does: check that this Python can run the pipeline.

A cluster's nodes run `python jobs/<command>.py` with their own interpreter. When that Python
lacks the project's dependencies (a head started from a venv's `ray` without the venv on PATH,
a stock image), the job would die on its first import with a bare `ModuleNotFoundError`. This
module runs before any of them, imports only the standard library, and ends the job with one
clear message naming what is missing or at the wrong version, and the fixes.

The requirements are the project's own (`pipeline.requirements`): `pyproject.toml`'s
dependencies, with the versions pinned in `constraints.txt` for the packages whose versions
matter across a cluster.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

# `pipeline/__init__.py` and `pipeline/requirements.py` import only the standard library.
from pipeline.requirements import PROJECT, requirements

EXIT_USAGE = 2


def problems(project: Path = PROJECT) -> list[str]:
    """What this interpreter lacks: "typer (missing)", "ray 2.52.0 (needs 2.60.0)"."""
    found = []
    for name, pinned in requirements(project).items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (missing)")
            continue
        if pinned and version.split("+")[0] != pinned:
            found.append(f"{name} {version} (needs {pinned})")
    return found


def message(missing: list[str]) -> str:
    return (
        f"error: this cluster's Python ({sys.executable}, {sys.version.split()[0]}) cannot run "
        f"the pipeline: {', '.join(missing)}. Fix one of: run the cluster on the training image "
        "(infra/docker/Dockerfile), which has everything; install the project on every node "
        "(`pip install -c constraints.txt .` in a checkout, with the same Python that runs "
        "`ray start`); or submit with `pipeline submit --pip`, which installs the requirements "
        "in the job's runtime environment"
    )


def require_pipeline_environment(project: Path = PROJECT) -> None:
    """Exit 2 with one line on stderr unless every requirement is installed at its pin."""
    missing = problems(project)
    if missing:
        print(message(missing), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)
