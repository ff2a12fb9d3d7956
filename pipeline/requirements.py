"""What the pipeline needs installed to run: `pyproject.toml`'s dependencies, with the versions
pinned in `constraints.txt` where a cluster must agree on them. Standard library only: a
submitted job reads this before it may import anything else (`jobs/environment.py`), and
`pipeline submit --pip` ships it as the job's pip requirements."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
# Packages that must match the pins exactly: the driver, the workers and the checkpoints they
# share must agree on these (Ray's wire protocol, torch's checkpoint format, MLflow's schemas).
PINNED = ("torch", "torchvision", "ray", "mlflow", "pyarrow")


def normal(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependencies(project: Path) -> list[str]:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]


def _pins(project: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    constraints = project / "constraints.txt"
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[normal(name)] = version.strip()
    return pins


def _name(requirement: str) -> str:
    return normal(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def requirements(project: Path = PROJECT) -> dict[str, str | None]:
    """{distribution: pinned version, or None where any version the project allows will do}."""
    pins = _pins(project)
    return {
        (name := _name(dep)): pins.get(name) if name in PINNED else None
        for dep in _dependencies(project)
    }


def pip_requirements(project: Path = PROJECT) -> list[str]:
    """The dependencies as pip lines, the cluster-wide packages at their pins."""
    pins = _pins(project)
    out = []
    for dep in _dependencies(project):
        name = _name(dep)
        if name in PINNED and name in pins:
            extras = re.match(r"[^\[<>=!~;\s]+(\[[^\]]*\])?", dep)
            out.append(f"{dep[: extras.end()] if extras else name}=={pins[name]}")
        else:
            out.append(dep)
    return out
