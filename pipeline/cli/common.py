"""What every command module shares: the root app and its groups, the error boundary, and the
options that several commands take. No drawing here: that is `pipeline.cli.display`."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import PipelineError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="`pipeline`: the command line. Thin: parse, load config, call one function, print.",
)
data_app = typer.Typer(no_args_is_help=True, help="Create, import, inspect and validate datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import images from elsewhere as a dataset.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo and registered models.")
server_app = typer.Typer(no_args_is_help=True, help="Start MLflow's tracking server.")
schedule_app = typer.Typer(no_args_is_help=True, help="Run jobs from cron (no Kubernetes).")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, logs, stop.")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
app.add_typer(models_app, name="models")
app.add_typer(server_app, name="server")
app.add_typer(schedule_app, name="schedule")
app.add_typer(jobs_app, name="jobs")


def friendly_errors(fn):
    """The error boundary: a `PipelineError` (a problem the user can fix) becomes one `error:`
    line and exit code 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.cli import display

        display.show_pipeline_logs()
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            display.error_line(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            display.note("interrupted", "bold red")
            raise typer.Exit(130) from None

    return wrapper


def quiet_downloads() -> None:
    """No MLflow download progress bars in logs (nightly jobs, CI); keep them on a terminal."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ---------------------------------------------------------------------------------------------
# Options shared by several commands

EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3-compatible endpoint (MinIO, moto); default AWS_ENDPOINT_URL or AWS itself.",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (defaults when omitted).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: --set train.lr=0.05 (repeatable)."),
]
TrackingUriOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI; default tracking.tracking_uri, MLFLOW_TRACKING_URI, "
        "sqlite:///mlflow.db.",
    ),
]
NameArg = Annotated[str, typer.Argument(help="Registered model name, e.g. digits-resnet.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
