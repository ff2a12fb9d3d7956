"""The import direction of the architecture (README "Layout"): every module imports only from its
own layer or the layers below it, at module level and inside functions alike.

    cli, jobs
      -> nightly, tune, registry, serving, cluster, schedule, servers
        -> train, evaluation
          -> data, models, tracking, model_package
            -> config, storage, errors, tags, events, ray_compat, requirements
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [
    {"config", "storage", "errors", "tags", "events", "ray_compat", "requirements"},
    {"data", "models", "tracking", "model_package"},
    {"train", "evaluation"},
    {"nightly", "tune", "registry", "serving", "cluster", "schedule", "servers", "notify"},
    {"cli", "jobs"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def component(module: str) -> str:
    """pipeline.train.loop -> train; jobs.x -> jobs."""
    parts = module.split(".")
    return "jobs" if parts[0] == "jobs" else parts[1]


def pipeline_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `pipeline...` import in a file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pipeline.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipeline":
                found += [(node.lineno, f"pipeline.{a.name}") for a in node.names]
            elif node.module.startswith("pipeline."):
                found.append((node.lineno, node.module))
    return found


def source_files() -> list[Path]:
    files = sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "jobs").rglob("*.py"))
    return [f for f in files if f.name != "__init__.py" or f.parent.name != "pipeline"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def test_every_component_has_a_layer():
    components = {component(module_name(f)) for f in source_files()} - {"__init__"}
    assert components <= set(LEVEL), f"unplaced: {sorted(components - set(LEVEL))}"


def test_imports_point_down_or_sideways():
    upward = []
    for path in source_files():
        importer = component(module_name(path))
        for line, module in pipeline_imports(path):
            imported = component(module)
            if LEVEL[imported] > LEVEL[importer]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({importer}) imports {module}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", ["cli/display.py"])
def test_only_the_display_imports_rich(module):
    drawing = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "rich" or n.startswith("rich.") for n in names):
                drawing.append(path.relative_to(ROOT / "pipeline").as_posix())
    assert sorted(set(drawing)) == [module]
