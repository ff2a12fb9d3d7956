"""`pipeline`: the command line. Thin: parse, load config, call one function, print.

Every known failure (bad config, bad dataset, unreachable storage or server) is printed as one clear
`error:` message on stderr with exit code 2; nothing prints a traceback at a user.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import StorageConfig
from pipeline.errors import ConfigError, PipelineError, UsageError
from pipeline.tags import PULL_META_FILE, ROLLED_BACK_TAG

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
data_app = typer.Typer(no_args_is_help=True, help="Create, import, inspect and validate datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import images from elsewhere as a dataset.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
app.add_typer(models_app, name="models")


def _console(stderr: bool = False) -> Console:
    """A rich console. Off a terminal (a log file, CI, `| tee`) rich wraps at 80 columns, which
    breaks run ids, URIs and table rows across lines: use a wide fixed width there instead,
    unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    on_terminal = hasattr(stream, "isatty") and stream.isatty()
    width = None if on_terminal or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width)


out = _console()
err = _console(stderr=True)


def friendly_errors(fn):
    """Turn the errors a user can fix into one message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was committed")
            raise typer.Exit(130) from None

    return wrapper


# ---------------------------------------------------------------------------------------------
# Shared options

EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3-compatible endpoint (MinIO, moto); default AWS_ENDPOINT_URL or AWS itself.",
    ),
]
OutOpt = Annotated[
    str, typer.Option("--out", help="Dataset root: a local path or s3://bucket/prefix.")
]
ShardRowsOpt = Annotated[int | None, typer.Option(help="Target rows per shard.", min=1)]
ShardMbOpt = Annotated[float, typer.Option(help="Target megabytes per shard.", min=0.001)]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the split and the shard order.")]


def _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding):
    from pipeline.data.sources import WriteOptions

    return WriteOptions(
        out=out_uri,
        storage=StorageConfig(endpoint_url=endpoint_url),
        shard_rows=shard_rows,
        shard_mb=shard_mb,
        overwrite=overwrite,
        encoding=encoding,
        progress=sys.stderr.isatty(),
    )


def _print_written(manifest, uri: str) -> None:
    counts = ", ".join(f"{s} {i.rows}" for s, i in manifest.splits.items())
    shards = sum(len(i.shards) for i in manifest.splits.values())
    out.print(f"wrote {uri}: {counts} rows in {shards} shard(s); digest {manifest.digest[:12]}")


# ---------------------------------------------------------------------------------------------
# pipeline data ...


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    source: Annotated[str, typer.Argument(help="Bundled dataset to write: 'digits'.")],
    out_uri: OutOpt = "data/digits",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: SeedOpt = 0,
    encoding: Annotated[str, typer.Option(help="raw (uint8 pixels) or png.")] = "raw",
    shard_rows: ShardRowsOpt = None,
    shard_mb: ShardMbOpt = 64.0,
    overwrite: OverwriteOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Write a bundled dataset (scikit-learn's digits) as Parquet shards."""
    from pipeline.data.sources import prepare_digits

    if source != "digits":
        raise UsageError(f"unknown bundled dataset {source!r}; available: digits")
    opts = _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding)
    manifest = prepare_digits(
        opts, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    _print_written(manifest, out_uri)


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {size!r}: expected HxW, for example 32x32") from None
    if h < 1 or w < 1:
        raise UsageError(f"--size {size!r}: both sides must be positive")
    return h, w


@import_app.command("image-folder")
@friendly_errors
def import_image_folder(
    src: Annotated[Path, typer.Argument(help="SRC/<class>/*.png|jpg (or SRC/train/<class>/...).")],
    out_uri: OutOpt,
    size: Annotated[str | None, typer.Option(help="Resize every image to HxW.")] = None,
    grayscale: Annotated[bool, typer.Option(help="Store one channel instead of RGB.")] = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: SeedOpt = 0,
    encoding: Annotated[str, typer.Option(help="png (default) or raw.")] = "png",
    shard_rows: ShardRowsOpt = None,
    shard_mb: ShardMbOpt = 64.0,
    overwrite: OverwriteOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Import a class-per-subfolder tree of images, streaming (memory stays bounded)."""
    from pipeline.data.sources import import_image_folder as run

    opts = _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding)
    manifest = run(
        src,
        opts,
        size=_parse_size(size),
        grayscale=grayscale,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    _print_written(manifest, out_uri)


@import_app.command("numpy")
@friendly_errors
def import_numpy(
    file: Annotated[
        Path, typer.Argument(help=".npz with x/y, images/labels or x_train/y_train/...")
    ],
    out_uri: OutOpt,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: SeedOpt = 0,
    encoding: Annotated[str, typer.Option(help="raw (default) or png.")] = "raw",
    shard_rows: ShardRowsOpt = None,
    shard_mb: ShardMbOpt = 64.0,
    overwrite: OverwriteOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Import images and labels from a NumPy .npz file."""
    from pipeline.data.sources import import_numpy as run

    opts = _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding)
    manifest = run(file, opts, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    _print_written(manifest, out_uri)


@data_app.command("inspect")
@friendly_errors
def data_inspect(
    uri: Annotated[str, typer.Argument(help="Dataset root (local path or s3://).")],
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print the manifest, counts per split and class, and shard sizes."""
    from pipeline.data.shards import read_manifest

    m = read_manifest(uri, StorageConfig(endpoint_url=endpoint_url))
    if as_json:
        out.print_json(m.model_dump_json())
        return
    c, h, w = m.image.shape
    out.print(f"[bold]{m.name}[/]  {uri}")
    out.print(f"created {m.created_at}  source: {m.source}")
    out.print(
        f"images {c}x{h}x{w} ({m.image.encoding}), {m.num_classes} classes, digest {m.digest}"
    )
    out.print(f"normalisation mean {m.normalization.mean} std {m.normalization.std}")
    counts = Table("class", *m.splits.keys(), title="rows per split and class")
    for k, name in enumerate(m.classes):
        counts.add_row(name, *(str(i.class_counts[k]) for i in m.splits.values()))
    counts.add_row("[bold]total", *(f"[bold]{i.rows}" for i in m.splits.values()))
    out.print(counts)
    shards = Table("shard", "rows", "bytes", "sha256", title="shards")
    for info in m.splits.values():
        for s in info.shards:
            shards.add_row(s.path, str(s.rows), f"{s.bytes:,}", s.sha256[:16])
    out.print(shards)


@data_app.command("validate")
@friendly_errors
def data_validate(
    uri: Annotated[str, typer.Argument(help="Dataset root (local path or s3://).")],
    endpoint_url: EndpointOpt = None,
) -> None:
    """Re-check every shard against the manifest; exit 1 with one line per problem."""
    from pipeline.data.validate import validate_dataset

    manifest, problems = validate_dataset(uri, StorageConfig(endpoint_url=endpoint_url))
    if problems:
        for p in problems:
            err.print(f"[red]problem:[/] {p}", highlight=False, soft_wrap=True)
        err.print(f"{uri}: {len(problems)} problem(s) found")
        raise typer.Exit(1)
    rows = sum(i.rows for i in manifest.splits.values())
    shards = sum(len(i.shards) for i in manifest.splits.values())
    out.print(f"{uri}: OK ({rows} rows in {shards} shards match manifest {manifest.digest[:12]})")


# ---------------------------------------------------------------------------------------------
# pipeline models ...


@models_app.command("list")
@friendly_errors
def models_list(
    input_size: Annotated[str, typer.Option(help="CxHxW used to count MACs.")] = "3x224x224",
    num_classes: Annotated[int, typer.Option(min=2)] = 1000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every model with its parameters and multiply-adds, counted by running it."""
    from pipeline.models.zoo import describe_models, format_model_table

    try:
        c, h, w = (int(v) for v in input_size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-size {input_size!r}: expected CxHxW, e.g. 3x224x224") from None
    rows = describe_models(input_size=(c, h, w), num_classes=num_classes)
    if as_json:
        out.print(json.dumps(rows, indent=2))
    else:
        out.print(format_model_table(rows))


# ---------------------------------------------------------------------------------------------
# pipeline train / evaluate

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (defaults when omitted).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: --set train.lr=0.05 (repeatable)."),
]


@app.command("train")
@friendly_errors
def train(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Validate the config, then train with Ray Train and log everything to MLflow."""
    from pipeline.config import load_config
    from pipeline.data.validate import ensure_dataset
    from pipeline.train.ray_runtime import start_local_ray, stop_early_ray

    cfg = load_config(config, overrides or [])
    # Data problems end here, before Ray starts; training reuses the manifest.
    manifest = ensure_dataset(cfg.with_absolute_paths(), err)
    start_local_ray(cfg)  # a local Ray comes up while torch and MLflow import and get checked
    try:
        from pipeline.train.trainer import run_training

        summary = run_training(cfg, console=err, manifest=manifest)
    finally:
        stop_early_ray()  # only when training never needed it: MLflow down, a finished run
    m = summary.metrics
    table = Table(title=f"run {summary.run_name}", show_header=False)
    for key in ("test_acc", "test_top5", "test_loss", "best_val_acc", "best_epoch"):
        if key in m:
            table.add_row(key, f"{m[key]:.4f}" if key != "best_epoch" else str(int(m[key])))
    table.add_row("MLflow run", summary.run_url)
    if summary.model_version:
        table.add_row("model", f"models:/{summary.registered_name}/{summary.model_version}")
    table.add_row("time", f"{summary.seconds:.0f} s")
    out.print(table)


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
    summary = run_tune(cfg, search_space, name=name, console=err)
    table = Table(title=f"search {summary.name}")
    for col in ("rank", "trial", "state", "epochs", f"best {summary.metric}", "test_acc"):
        table.add_column(col)
    params = list(summary.trials[0].params) if summary.trials else []
    for p in params:
        table.add_column(p)
    for i, row in enumerate(summary.trials, 1):
        table.add_row(
            str(i),
            row.trial_id,
            row.state,
            str(row.epochs),
            "-" if row.best is None else f"{row.best:.4f}",
            "-" if row.test_acc is None else f"{row.test_acc:.4f}",
            *[_fmt(row.params.get(p)) for p in params],
        )
    out.print(table)
    if summary.best is not None:
        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in summary.best.params.items())
        out.print(
            f"best trial {summary.best.trial_id}: best {summary.metric} "
            f"{summary.best.best:.4f} ({chosen})",
            highlight=False,
        )
    if summary.model_version:
        out.print(f"registered models:/{summary.registered_name}/{summary.model_version}")
    out.print(
        f"{summary.epochs_total} epochs over {len(summary.trials)} trial(s) in "
        f"{summary.seconds:.0f} s; MLflow parent run: {summary.run_url}",
        highlight=False,
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
    from datetime import date as _date

    from pipeline.config import load_config
    from pipeline.nightly import report_json, run_nightly

    if date is not None:
        try:
            _date.fromisoformat(date)
        except ValueError:
            raise ConfigError(f"--date {date!r}: expected YYYY-MM-DD") from None
    cfg = load_config(config, overrides or [])
    report = run_nightly(cfg, force=force, date=date, console=err)
    if as_json:
        print(report_json(report))
        return
    out.print(report.to_markdown(), highlight=False)


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
        out.print(json.dumps(result, indent=2))
        return
    out.print(
        f"{model} on {data} [{split}]: acc {result['acc']:.4f}  top5 {result['top5']:.4f}  "
        f"loss {result['loss']:.4f}  ({result['count']} images)"
    )
    table = Table("class", "accuracy", title="per class")
    for name, acc in result["per_class_accuracy"].items():
        table.add_row(name, f"{acc:.4f}")
    out.print(table)


# ---------------------------------------------------------------------------------------------
# Registry and serving: pipeline promote / rollback / best / models registered / pull / serve,
# and pipeline server mlflow. Every command reaches MLflow at --tracking-uri, else the config's
# tracking.tracking_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db, so the same commands work
# against the embedded SQLite file and a tracking server.

server_app = typer.Typer(no_args_is_help=True, help="Start MLflow's tracking server.")
app.add_typer(server_app, name="server")

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


def _quiet_downloads() -> None:
    """No MLflow download progress bars in logs (nightly jobs, CI); keep them on a terminal."""
    import os

    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _registry_setup(config: Path | None, overrides: list[str] | None, tracking_uri: str | None):
    """(config, MlflowClient): the config with --tracking-uri applied, and a checked client."""
    from pipeline.config import load_config
    from pipeline.registry import connect

    _quiet_downloads()
    cfg = load_config(config, overrides or [])
    if tracking_uri:
        cfg.tracking.tracking_uri = tracking_uri
    return cfg, connect(cfg.tracking.resolved_uri(), cfg.tracking.timeout_s)


@app.command("promote")
@friendly_errors
def promote_command(
    name: NameArg,
    candidate: Annotated[
        str | None, typer.Option(help="Version number or alias; default: the newest version.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Held-out dataset; default: the candidate's training data."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split both models are evaluated on.")] = "test",
    min_improvement: Annotated[
        float | None,
        typer.Option(min=0, help="Accuracy margin over the champion; default registry's."),
    ] = None,
    class_floor: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Lowest accuracy any class may have; default registry's."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide, change nothing.")] = False,
    lock_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for another promotion.")
    ] = 600.0,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `champion` to a version that beats it on the same held-out data, evaluated now."""
    from pipeline.registry import LockSettings, promote

    cfg, client = _registry_setup(config, overrides, tracking_uri)
    decision = promote(
        client,
        name,
        candidate=candidate,
        data_uri=data,
        split=split,
        min_improvement=(
            cfg.registry.min_improvement if min_improvement is None else min_improvement
        ),
        class_floor=cfg.registry.class_floor if class_floor is None else class_floor,
        dry_run=dry_run,
        storage=cfg.storage.resolved(),
        lock=LockSettings(timeout_s=lock_timeout),
    )
    if as_json:
        out.print(json.dumps(decision.to_dict(), indent=2), highlight=False, soft_wrap=True)
        return
    cand, champ = decision.candidate, decision.champion
    colour = "green" if decision.promote else "yellow"
    out.print(f"[bold {colour}]{decision.outcome}[/]: {name} version {cand.version}")
    out.print(f"  {decision.reason}", markup=False, highlight=False, soft_wrap=True)
    table = Table("", f"candidate v{cand.version}", f"champion v{champ.version}" if champ else "")
    table.add_row("accuracy", f"{cand.acc:.4f}", f"{champ.acc:.4f}" if champ else "-")
    table.add_row("loss", f"{cand.loss:.4f}", f"{champ.loss:.4f}" if champ else "-")
    worst = min(cand.per_class, key=cand.per_class.get)
    table.add_row(f"worst class ({worst})", f"{cand.per_class[worst]:.4f}", "")
    out.print(table)
    out.print(
        f"  evaluated on {decision.data_uri} [{split}], {cand.count} images",
        markup=False,
        highlight=False,
    )


@app.command("rollback")
@friendly_errors
def rollback_command(
    name: NameArg,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Move `champion` back to `previous-champion`."""
    from pipeline.registry import rollback

    _, client = _registry_setup(config, overrides, tracking_uri)
    old, new = rollback(client, name)
    out.print(
        f"rolled back {name}: champion v{old or '-'} -> v{new}"
        + (f" (v{old} tagged {ROLLED_BACK_TAG})" if old and old != new else "")
    )


@app.command("best")
@friendly_errors
def best_command(
    experiment: Annotated[
        str | None, typer.Option(help="Experiment; default tracking.experiment.")
    ] = None,
    metric: Annotated[str, typer.Option(help="Metric to rank by.")] = "best_val_acc",
    filter_string: Annotated[
        str, typer.Option("--filter", help="MLflow filter, e.g. \"params.model.name = 'x'\".")
    ] = "",
    top: Annotated[int, typer.Option(min=1, help="How many runs.")] = 5,
    ascending: Annotated[
        bool | None,
        typer.Option("--ascending/--descending", help="Default: ascending for *loss* metrics."),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best runs by a metric, with their registered versions and aliases."""
    from rich.markup import escape

    from pipeline.registry import best_runs

    cfg, client = _registry_setup(config, overrides, tracking_uri)
    rows = best_runs(
        client, experiment or cfg.tracking.experiment, metric, filter_string, top, ascending
    )
    if as_json:
        out.print(json.dumps(rows, indent=2), highlight=False, soft_wrap=True)
        return
    table = Table("#", metric, "run", "model", "test_acc", "registered", title="best runs")
    for i, row in enumerate(rows, 1):
        versions = ", ".join(
            f"{v['name']}/{v['version']}"
            + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
            for v in row["versions"]
        )
        test_acc = row["metrics"].get("test_acc")
        table.add_row(
            str(i),
            f"{row['value']:.4f}",
            escape(f"{row['run_name']} {row['run_id'][:8]}"),
            escape(row["model"]),
            f"{test_acc:.4f}" if test_acc is not None else "-",
            escape(versions) or "-",
        )
    out.print(table)


@models_app.command("registered")
@friendly_errors
def models_registered(
    name: NameArg,
    limit: Annotated[int, typer.Option(min=1, help="Newest versions shown.")] = 50,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A registered model's versions with aliases, metrics and tags."""
    from rich.markup import escape

    from pipeline.registry import registered_model, registered_versions

    _, client = _registry_setup(config, overrides, tracking_uri)
    registered_model(client, name)  # a clear error for an unknown name
    rows = registered_versions(client, name, limit)
    if as_json:
        out.print(json.dumps(rows, indent=2), highlight=False, soft_wrap=True)
        return
    table = Table("version", "aliases", "test_acc", "best_val_acc", "created", "tags", title=name)
    for row in rows:
        m = row["metrics"]
        shown = {k: v for k, v in row["tags"].items() if not k.startswith("promotion.")}
        table.add_row(
            row["version"],
            ", ".join(row["aliases"]) or "-",
            f"{m['test_acc']:.4f}" if "test_acc" in m else "-",
            f"{m['best_val_acc']:.4f}" if "best_val_acc" in m else "-",
            row["created"],
            escape(" ".join(f"{k}={v[:12]}" for k, v in sorted(shown.items()))),
        )
    out.print(table)


@app.command("pull")
@friendly_errors
def pull_command(
    uri: Annotated[
        str, typer.Argument(help="models:/NAME@alias, models:/NAME/N or runs:/ID/model.")
    ],
    dest: Annotated[Path, typer.Option("--dest", help="Directory to create.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, onnx, state_dict or mlflow.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --dest.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model, export it, check the export against the original, write it + hashes."""
    from pipeline.config import load_config
    from pipeline.serving import pull

    _quiet_downloads()
    cfg = load_config(config, overrides or [])
    record = pull(
        uri,
        dest,
        fmt,
        tracking_uri=tracking_uri or cfg.tracking.resolved_uri(),
        timeout_s=cfg.tracking.timeout_s,
        overwrite=overwrite,
    )
    if as_json:
        out.print(json.dumps(record, indent=2), highlight=False, soft_wrap=True)
        return
    source = record["source"]
    version = f" (version {source['version']})" if source.get("version") else ""
    out.print(f"pulled {uri}{version} as {fmt} into {dest}", highlight=False)
    for rel, sha in record["files"].items():
        out.print(f"  {rel}  sha256 {sha[:16]}", highlight=False)
    check = record["check"]
    out.print(
        f"  checked on {check['samples']} sample inputs: max |diff| {check['max_abs_diff']:.2g} "
        f"<= {check['tolerance']:g}; metadata in {dest / PULL_META_FILE}",
        highlight=False,
    )


@app.command("serve")
@friendly_errors
def serve_command(
    uri: Annotated[str, typer.Argument(help="models:/NAME@alias, models:/NAME/N or runs:/ID/...")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5001,
    workers: Annotated[int, typer.Option(min=1)] = 1,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Serve a model's image predictor with MLflow's scoring server (POST /invocations)."""
    import os

    from pipeline.config import load_config
    from pipeline.serving import predictor_uri, scoring_server_command, scoring_server_env

    cfg = load_config(config, overrides or [])
    tracking = tracking_uri or cfg.tracking.resolved_uri()
    model = predictor_uri(uri, tracking_uri=tracking, timeout_s=cfg.tracking.timeout_s)
    cmd = scoring_server_command(model, host, port, workers)
    err.print(f"serving {uri} ({model}) on http://{host}:{port}/invocations", highlight=False)
    os.execve(cmd[0], cmd, scoring_server_env(tracking))


@server_app.command("mlflow")
@friendly_errors
def server_mlflow(
    backend_store_uri: Annotated[
        str, typer.Option(help="sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB.")
    ] = "sqlite:///mlflow.db",
    artifacts_destination: Annotated[
        str, typer.Option(help="Local directory or s3://bucket/prefix (proxied by the server).")
    ] = "./mlartifacts",
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 needs --allowed-hosts.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    workers: Annotated[int, typer.Option(min=1)] = 2,
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host headers accepted, e.g. mlflow.example.com:5000.")
    ] = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Run MLflow's tracking server (blocks; Ctrl-C stops it)."""
    import os

    from pipeline.serving import check_backend_store, masked_uri, tracking_server_command

    cmd = tracking_server_command(
        backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts
    )
    check_backend_store(backend_store_uri)  # PostgreSQL: fail in seconds, not MLflow's ~100 s
    if endpoint_url:  # MinIO or another S3-compatible store for the artifacts
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint_url
    err.print(
        f"MLflow tracking server on http://{host}:{port} (backend {masked_uri(backend_store_uri)}, "
        f"artifacts {artifacts_destination}); clients: MLFLOW_TRACKING_URI=http://{host}:{port}",
        highlight=False,
    )
    at = cmd.index("--backend-store-uri")
    if masked_uri(cmd[at + 1]) != cmd[at + 1]:  # a password: keep it out of `ps` (mlflow's env)
        os.environ["MLFLOW_BACKEND_STORE_URI"] = cmd[at + 1]
        del cmd[at : at + 2]
    os.execv(cmd[0], cmd)


# ---------------------------------------------------------------------------------------------
# pipeline schedule nightly: a crontab entry for machines without Kubernetes (there, use
# infra/k8s/cronjob-nightly.yaml or raycronjob-nightly.yaml).

schedule_app = typer.Typer(no_args_is_help=True, help="Run jobs from cron (no Kubernetes).")
app.add_typer(schedule_app, name="schedule")


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
        out.print(line, markup=False, highlight=False, soft_wrap=True)
        err.print(
            f"# cron reads {at} in this machine's time zone ({zone}); cronie also honours a "
            "CRON_TZ=UTC line above the entry. Add it with --install, or `crontab -e`.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return
    replaced = install_line(line)
    verb = "replaced the earlier" if replaced else "added a"
    out.print(f"{verb} `{MARKER}` entry in your crontab: daily at {at} ({zone})", markup=False)
    out.print(line, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Jobs on a Ray cluster: pipeline submit train|tune|nightly, pipeline jobs list / logs / stop.
# The cluster is --address, else RAY_ADDRESS (its dashboard, http://HEAD:8265), else the local one.

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, logs, stop.")
app.add_typer(jobs_app, name="jobs")

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray dashboard URL; default RAY_ADDRESS, else http://127.0.0.1:8265."
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="Submission id (raysubmit_...).")]


class SubmittedCommand(StrEnum):
    train = "train"
    tune = "tune"
    nightly = "nightly"


@app.command("submit")
@friendly_errors
def submit_command(
    command: Annotated[SubmittedCommand, typer.Argument(help="The command the cluster runs.")],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config; validated here before submitting.")
    ],
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
) -> None:
    """Run train, tune or nightly as a job on a Ray cluster; prints the submission id."""
    from pipeline import cluster
    from pipeline.config import load_config

    cfg = load_config(config, overrides or [])  # a bad config never reaches the cluster
    files = {"--config": config}
    if command is SubmittedCommand.tune:
        if space is None:
            raise ConfigError("pipeline submit tune needs --space FILE (the search space)")
        from pipeline.tune import load_search_space

        load_search_space(space, cfg)
        files["--space"] = space
    elif space is not None:
        raise ConfigError(f"--space is for tune only, not {command.value}")
    args = [arg for pair in overrides or [] for arg in ("--set", pair)]
    if name is not None:
        if command is not SubmittedCommand.tune:
            raise ConfigError(f"--name is for tune only, not {command.value}")
        args += ["--name", name]
    if force or date is not None:
        if command is not SubmittedCommand.nightly:
            raise ConfigError(f"--force and --date are for nightly only, not {command.value}")
        if date is not None:
            from datetime import date as _date

            try:
                _date.fromisoformat(date)
            except ValueError:
                raise ConfigError(f"--date {date!r}: expected YYYY-MM-DD") from None
            args += ["--date", date]
        if force:
            args.append("--force")
    job_env = cluster.job_env(cluster.parse_env(env))
    spec = cluster.JobSpec(command.value, args, files)
    client = cluster.connect(address)
    for note in cluster.remote_caveats(cfg, job_env):
        err.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    job_id = cluster.submit(client, spec, job_env)
    out.print(job_id, highlight=False)
    err.print(
        f"submitted to {client.get_address()}: {spec.entrypoint()}\n"
        f"follow it with `pipeline jobs logs {job_id} --follow`",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if wait:
        _follow_job(client, job_id)


def _follow_job(client, job_id: str) -> None:
    """Stream the job's log to stdout until it ends; exit 1 unless it SUCCEEDED."""
    from rich.markup import escape

    from pipeline.cluster import follow

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        state = follow(client, job_id, on_logs=write)
    except KeyboardInterrupt:
        err.print(
            f"stopped following; job {job_id} keeps running on the cluster "
            f"(`pipeline jobs stop {job_id}` stops it)",
            markup=False,
        )
        raise typer.Exit(130) from None
    if state.status == "SUCCEEDED":
        err.print(f"job {job_id} [bold green]SUCCEEDED[/]", highlight=False)
        return
    reason = state.reason
    err.print(
        f"job {job_id} [bold red]{state.status}[/]" + (f": {escape(reason)}" if reason else ""),
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


@jobs_app.command("list")
@friendly_errors
def jobs_list(address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """Every job on the cluster, newest first."""
    from rich.markup import escape

    from pipeline import cluster

    client = cluster.connect(address)
    jobs = cluster.list_jobs(client)
    if as_json:
        rows = [
            {**vars(j), "start_time": str(j.start_time or ""), "end_time": str(j.end_time or "")}
            for j in jobs
        ]
        out.print(json.dumps(rows, indent=2), highlight=False, soft_wrap=True)
        return
    table = Table(title=f"jobs on {client.get_address()}")
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    table.add_column("start time", no_wrap=True)
    for j in jobs:
        started = f"{j.start_time.astimezone():%Y-%m-%d %H:%M:%S}" if j.start_time else "-"
        table.add_row(j.submission_id, j.status, escape(j.entrypoint), started)
    out.print(table)


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
        out.print(f"stop requested for {job_id}", highlight=False)
    else:
        state = cluster.job_state(client, job_id)
        out.print(f"{job_id} had already finished: {state.status}", highlight=False)


def main() -> None:  # pragma: no cover - console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
