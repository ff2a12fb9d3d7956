"""`pipeline submit` and `pipeline jobs list/logs/stop`: jobs on a Ray cluster. The cluster is
--address, else RAY_ADDRESS (its dashboard, http://HEAD:8265), else the local one."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import display
from pipeline.cli.common import JsonOpt, SetOpt, app, friendly_errors, jobs_app
from pipeline.cli.training import check_date
from pipeline.cluster import JOB_SCRIPTS
from pipeline.errors import ConfigError

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray dashboard URL; default RAY_ADDRESS, else http://127.0.0.1:8265."
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="Submission id (raysubmit_...).")]


# The submittable commands are the job scripts, listed once in pipeline.cluster.JOB_SCRIPTS.
SubmittedCommand = StrEnum("SubmittedCommand", {name: name for name in JOB_SCRIPTS})


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly_errors
def submit_command(
    ctx: typer.Context,
    command: Annotated[SubmittedCommand, typer.Argument(help="The command the cluster runs.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML config; validated here before submitting (optional for promote, predict).",
        ),
    ] = None,
    overrides: SetOpt = None,
    space: Annotated[
        Path | None, typer.Option("--space", help="Search space YAML (tune only).")
    ] = None,
    address: AddressOpt = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="Set NAME=VALUE in the job's environment (repeatable)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Stream the job's log; exit 0 only if it succeeds.")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Search name (tune only; the same name resumes).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Nightly only: run even if done today / nothing new.")
    ] = False,
    date: Annotated[
        str | None, typer.Option("--date", help="Nightly only: the day it counts for (YYYY-MM-DD).")
    ] = None,
    pip: Annotated[
        bool,
        typer.Option(
            "--pip",
            help="Install the pipeline's requirements in the job's runtime environment (for a "
            "cluster whose Python lacks them; slow the first time).",
        ),
    ] = False,
    forward_credentials: Annotated[
        bool,
        typer.Option(
            "--forward-credentials",
            help="Also send AWS_*/MLFLOW_TRACKING_* credentials set here (the dashboard shows "
            "them); default: the cluster's own role or Secret.",
        ),
    ] = False,
) -> None:
    """Run train, tune, nightly, promote or predict as a job on a Ray cluster; prints the
    submission id.

    promote takes the registered model's name and `pipeline promote`'s options after it:
    `pipeline submit promote digits-resnet --dry-run`; predict the model URI and `pipeline
    predict`'s options: `pipeline submit predict models:/digits-resnet@champion --data s3://b/d
    --out s3://b/p.parquet`."""
    from pipeline import cluster
    from pipeline.config import load_config

    args, files = _job_arguments(command, ctx.args, config, space, name, force, date)
    cfg = load_config(config, overrides or [])  # a bad config never reaches the cluster
    if command is SubmittedCommand.tune:
        from pipeline.tune import load_search_space

        load_search_space(space, cfg)
    args += [arg for pair in overrides or [] for arg in ("--set", pair)]
    job_env = cluster.job_env(cluster.parse_env(env), credentials=forward_credentials)
    if not forward_credentials and (held := cluster.held_back_credentials()):
        display.note(
            f"note: not sent to the cluster: {', '.join(held)} (the job uses the cluster's own "
            "credentials; --forward-credentials sends these)",
            "yellow",
        )
    spec = cluster.JobSpec(command.value, args, files)
    client = cluster.connect(address)
    caveats = cluster.remote_caveats(cfg, job_env)
    if command is SubmittedCommand.predict:
        caveats = [c for c in caveats if c.startswith("tracking")] + predict_caveats(args)
    for caveat in caveats:
        display.note(f"warning: {caveat}", "yellow")
    job_id = cluster.submit(client, spec, job_env, pip=pip)
    display.plain(job_id)
    display.plain(
        f"submitted to {client.get_address()}: {spec.entrypoint()}\n"
        f"follow it with `pipeline jobs logs {job_id} --follow`",
        stderr=True,
    )
    if wait:
        _follow_job(client, job_id)


def _job_arguments(command, extra, config, space, name, force, date):
    """(arguments, files) for the job script; every option checked against the command."""
    what = command.value
    files: dict[str, Path] = {} if config is None else {"--config": config}
    args: list[str] = []
    if command is SubmittedCommand.promote:
        if not extra or extra[0].startswith("-"):
            raise ConfigError(
                "pipeline submit promote needs the registered model's name first, e.g. "
                "`pipeline submit promote digits-resnet --dry-run`"
            )
        args += list(extra)
    elif command is SubmittedCommand.predict:
        args += predict_arguments(extra)
    elif extra:
        raise ConfigError(f"unexpected argument(s) for {what}: {' '.join(extra)}")
    elif config is None and command is not SubmittedCommand.predict:
        raise ConfigError(f"pipeline submit {what} needs --config FILE")
    if command is SubmittedCommand.tune:
        if space is None:
            raise ConfigError("pipeline submit tune needs --space FILE (the search space)")
        files["--space"] = space
    elif space is not None:
        raise ConfigError(f"--space is for tune only, not {what}")
    if name is not None:
        if command is not SubmittedCommand.tune:
            raise ConfigError(f"--name is for tune only, not {what}")
        args += ["--name", name]
    if force or date is not None:
        if command is not SubmittedCommand.nightly:
            raise ConfigError(f"--force and --date are for nightly only, not {what}")
        check_date(date)
        args += ["--date", date] if date is not None else []
        args += ["--force"] if force else []
    return args, files


def predict_arguments(extra: list[str]) -> list[str]:
    """`pipeline predict`'s arguments as given, once they name a model, --data and --out."""
    example = (
        "e.g. `pipeline submit predict models:/digits-resnet@champion --data s3://bucket/digits "
        "--out s3://bucket/predictions.parquet`"
    )
    if not extra or extra[0].startswith("-"):
        raise ConfigError(f"pipeline submit predict needs the model URI first, {example}")
    given = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    missing = [o for o in ("--data", "--out") if o not in given]
    if missing:
        raise ConfigError(f"pipeline submit predict needs {' and '.join(missing)}, {example}")
    return list(extra)


def predict_caveats(args: list[str]) -> list[str]:
    """--data and --out paths that mean something else on the cluster: a relative path lands
    in the job's working_dir there, which Ray deletes eventually."""
    notes = []
    for i, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option in ("--data", "--out"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value and "://" not in value and not Path(value).is_absolute():
                notes.append(
                    f"{option} {value!r} is relative to the job's working_dir on the cluster; "
                    "use s3:// (or a path every node shares)"
                )
    return notes


def _follow_job(client, job_id: str) -> None:
    """Stream the job's log to stdout until it ends; exit 1 unless it SUCCEEDED."""
    from pipeline.cluster import follow

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        state = follow(client, job_id, on_logs=write)
    except KeyboardInterrupt:
        display.plain(
            f"stopped following; job {job_id} keeps running on the cluster "
            f"(`pipeline jobs stop {job_id}` stops it)",
            stderr=True,
        )
        raise typer.Exit(130) from None
    display.print_job_end(job_id, state.status, state.reason)
    if state.status != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("list")
@friendly_errors
def jobs_list(address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """Every job on the cluster, newest first."""
    from pipeline import cluster

    client = cluster.connect(address)
    jobs = cluster.list_jobs(client)
    if as_json:
        rows = [
            {**vars(j), "start_time": str(j.start_time or ""), "end_time": str(j.end_time or "")}
            for j in jobs
        ]
        display.plain(json.dumps(rows, indent=2))
        return
    display.print_jobs(jobs, client.get_address())


@jobs_app.command("logs")
@friendly_errors
def jobs_logs(
    job_id: JobIdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming; exit with the job's status.")
    ] = False,
    address: AddressOpt = None,
) -> None:
    """A job's log (driver output); --follow streams it until the job ends."""
    from pipeline import cluster

    client = cluster.connect(address)
    if follow:
        _follow_job(client, job_id)
        return
    sys.stdout.write(cluster.job_logs(client, job_id))


@jobs_app.command("stop")
@friendly_errors
def jobs_stop(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Ask the cluster to stop a job (its workers are killed; checkpoints stay)."""
    from pipeline import cluster

    client = cluster.connect(address)
    if cluster.stop_job(client, job_id):
        display.plain(f"stop requested for {job_id}")
    else:
        state = cluster.job_state(client, job_id)
        display.plain(f"{job_id} had already finished: {state.status}")
