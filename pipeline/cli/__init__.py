"""`pipeline`: the command line, one module per command group.

| module | commands |
|---|---|
| `data` | `data prepare`, `data import image-folder/numpy`, `data inspect`, `data validate` |
| `training` | `train`, `tune`, `nightly`, `evaluate`, `models list` |
| `registry` | `promote`, `rollback`, `best`, `models registered`, `pull`, `serve`, `predict` |
| `servers` | `server mlflow`, `schedule nightly` |
| `jobs` | `submit`, `jobs list/logs/stop` |

Every command is thin: parse, load the config, call one domain function, hand the result to
`display`. A user error (`pipeline.errors.PipelineError`) prints one `error:` line and exits 2.
"""

from pipeline.cli import data, jobs, registry, servers, training  # noqa: F401  (registers commands)
from pipeline.cli.common import app


def main() -> None:  # pragma: no cover - console script entry point
    app()


__all__ = ["app", "main"]
