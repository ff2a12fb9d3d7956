"""`pipeline train`, `tune`, `nightly`, `evaluate` and `models list`: training and its results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import display
from pipeline.cli.common import (
    ConfigOpt,
    EndpointOpt,
    SetOpt,
    app,
    friendly_errors,
    models_app,
)
from pipeline.config import StorageConfig
from pipeline.errors import ConfigError, UsageError


@app.command("train")
@friendly_errors
def train(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Validate the config, then train with Ray Train and log everything to MLflow."""
    from pipeline.config import load_config
    from pipeline.data.validate import ensure_dataset
    from pipeline.train.ray_runtime import start_local_ray, stop_early_ray

    cfg = load_config(config, overrides or [])
    # Data problems end here, before Ray starts; training reuses the manifest.
    manifest = ensure_dataset(cfg.with_absolute_paths())
    start_local_ray(cfg)  # a local Ray comes up while torch and MLflow import and get checked
    try:
        from pipeline.registry import register_training
        from pipeline.train.trainer import run_training

        with display.TrainingDisplay() as live:
            summary = run_training(cfg, manifest, on_event=live)
        register_training(cfg, summary)
    finally:
        stop_early_ray()  # only when training never needed it: MLflow down, a finished run
    display.print_training_summary(summary)


@app.command("tune")
@friendly_errors
def tune_command(
    space: Annotated[
        Path,
        typer.Option("--space", help="Search space YAML: config fields and their distributions."),
    ],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Search name (default run.name, else <experiment>-tune-<time>); "
            "the same name again resumes an interrupted search.",
        ),
    ] = None,
) -> None:
    """Search hyperparameters with Ray Tune (ASHA by default); register the best trial's model."""
    from pipeline.config import load_config
    from pipeline.tune import load_search_space, run_tune

    cfg = load_config(config, overrides or [])
    search_space = load_search_space(space, cfg)  # all problems reported before anything starts
    with display.SearchDisplay() as live:
        summary = run_tune(cfg, search_space, name=name, on_event=live)
    display.print_search_summary(summary)


def check_date(date: str | None) -> None:
    from datetime import date as _date

    if date is not None:
        try:
            _date.fromisoformat(date)
        except ValueError:
            raise ConfigError(f"--date {date!r}: expected YYYY-MM-DD") from None


@app.command("nightly")
@friendly_errors
def nightly_command(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Run even if tonight's run already finished or nothing is new."
        ),
    ] = False,
    date: Annotated[
        str | None,
        typer.Option(
            "--date", help="The day this run counts for (YYYY-MM-DD; default today, UTC)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Retrain on data new since the champion, register, promote only if better, and report."""
    from pipeline.config import load_config
    from pipeline.nightly import report_json, run_nightly

    check_date(date)
    cfg = load_config(config, overrides or [])
    with display.TrainingDisplay() as live:
        report = run_nightly(cfg, force=force, date=date, on_event=live)
    if as_json:
        print(report_json(report))
        return
    display.plain(report.to_markdown())


@app.command("evaluate")
@friendly_errors
def evaluate(
    model: Annotated[
        str,
        typer.Option(
            "--model", help="models:/NAME@alias, models:/NAME/N, runs:/ID/model or a directory."
        ),
    ],
    data: Annotated[str, typer.Option("--data", help="Dataset root (local path or s3://).")],
    split: Annotated[str, typer.Option(help="Which split to evaluate.")] = "test",
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Evaluate any logged model on a dataset split with its training preprocessing."""
    from pipeline.evaluation import evaluate_model

    result = evaluate_model(model, data, split, StorageConfig(endpoint_url=endpoint_url))
    if as_json:
        display.plain(json.dumps(result, indent=2))
        return
    display.print_evaluation(model, data, split, result)


@models_app.command("list")
@friendly_errors
def models_list(
    input_size: Annotated[str, typer.Option(help="CxHxW used to count MACs.")] = "3x224x224",
    num_classes: Annotated[int, typer.Option(min=2)] = 1000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every model with its parameters and multiply-adds, counted by running it."""
    from pipeline.models.zoo import describe_models

    try:
        c, h, w = (int(v) for v in input_size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-size {input_size!r}: expected CxHxW, e.g. 3x224x224") from None
    rows = describe_models(input_size=(c, h, w), num_classes=num_classes)
    if as_json:
        display.plain(json.dumps(rows, indent=2))
    else:
        display.out.print(display.model_table(rows))
