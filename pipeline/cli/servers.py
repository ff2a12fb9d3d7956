"""`pipeline server mlflow` and `pipeline schedule nightly`: long-running servers and the cron
entry for machines without Kubernetes (there, use infra/k8s/cronjob-nightly.yaml or
raycronjob-nightly.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import display
from pipeline.cli.common import EndpointOpt, friendly_errors, schedule_app, server_app


@server_app.command("mlflow")
@friendly_errors
def server_mlflow(
    backend_store_uri: Annotated[
        str, typer.Option(help="sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB.")
    ] = "sqlite:///mlflow.db",
    artifacts_destination: Annotated[
        str, typer.Option(help="Local directory or s3://bucket/prefix (proxied by the server).")
    ] = "./mlartifacts",
    host: Annotated[
        str,
        typer.Option(
            help="Interface to bind; non-loopback needs --allowed-hosts and --auth (or --insecure)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host headers accepted, e.g. mlflow.example.com:5000.")
    ] = None,
    auth: Annotated[
        bool,
        typer.Option(
            "--auth",
            help="Basic auth (needs MLFLOW_FLASK_SERVER_SECRET_KEY; MLFLOW_AUTH_ADMIN_PASSWORD on "
            "the first start).",
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Allow a non-loopback --host without --allowed-hosts and --auth."
        ),
    ] = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Run MLflow's tracking server (blocks; Ctrl-C stops it)."""
    import os

    from pipeline.servers import (
        check_backend_store,
        check_basic_auth_env,
        check_server_exposure,
        masked_uri,
        tracking_server_command,
    )

    check_server_exposure(host, allowed_hosts, auth, insecure)
    if auth:
        check_basic_auth_env(os.environ)
    cmd = tracking_server_command(
        backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts, auth
    )
    check_backend_store(backend_store_uri)  # PostgreSQL: fail in seconds, not MLflow's ~100 s
    if endpoint_url:  # MinIO or another S3-compatible store for the artifacts
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
    display.plain(
        f"MLflow tracking server on http://{host}:{port} (backend {masked_uri(backend_store_uri)}, "
        f"artifacts {artifacts_destination}); clients: MLFLOW_TRACKING_URI=http://{host}:{port}",
        stderr=True,
    )
    at = cmd.index("--backend-store-uri")
    if masked_uri(cmd[at + 1]) != cmd[at + 1]:  # a password: keep it out of `ps` (mlflow's env)
        os.environ["MLFLOW_BACKEND_STORE_URI"] = cmd[at + 1]
        del cmd[at : at + 2]
    os.execv(cmd[0], cmd)


@schedule_app.command("nightly")
@friendly_errors
def schedule_nightly(
    at: Annotated[str, typer.Option("--at", help="Time of day, 24-hour HH:MM, machine's zone.")] = (
        "02:00"
    ),
    config: Annotated[Path, typer.Option("--config", "-c", help="The nightly job's YAML.")] = Path(
        "jobs/configs/nightly.yaml"
    ),
    project_dir: Annotated[
        Path, typer.Option(help="Directory the job runs in (relative paths resolve there).")
    ] = Path("."),
    log_file: Annotated[
        Path | None, typer.Option(help="Appended to; default ~/.local/state/pipeline/nightly.log.")
    ] = None,
    install: Annotated[
        bool, typer.Option("--install", help="Add it to your crontab, replacing an earlier one.")
    ] = False,
) -> None:
    """Print (or --install) the crontab line that runs `pipeline nightly` every day."""
    import time

    from pipeline.schedule import MARKER, crontab_line, nightly_entry
    from pipeline.schedule import install as install_line

    line = crontab_line(nightly_entry(at, config, project_dir, log_file=log_file))
    zone = time.strftime("%Z")
    if not install:
        display.plain(line)
        display.plain(
            f"# cron reads {at} in this machine's time zone ({zone}); cronie also honours a "
            "CRON_TZ=UTC line above the entry. Add it with --install, or `crontab -e`.",
            stderr=True,
        )
        return
    replaced = install_line(line)
    verb = "replaced the earlier" if replaced else "added a"
    display.plain(f"{verb} `{MARKER}` entry in your crontab: daily at {at} ({zone})")
    display.plain(line)
