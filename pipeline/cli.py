"""`pipeline`: the command line. Thin: parse, load config, call one function, print.

Every known failure (bad config, bad dataset, unreachable storage or server) is printed as one clear
`error:` message on stderr with exit code 2; nothing prints a traceback at a user.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, StorageConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
data_app = typer.Typer(no_args_is_help=True, help="Create, import, inspect and validate datasets.")
import_app = typer.Typer(no_args_is_help=True, help="Import images from elsewhere as a dataset.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data.shards import DatasetError
    from pipeline.storage import StorageError
    from pipeline.tracking import TrackingUnavailable
    from pipeline.train.trainer import TrainingError

    return (
        ConfigError,
        DatasetError,
        StorageError,
        TrackingUnavailable,
        TrainingError,
        FileNotFoundError,
        ValueError,
    )


def friendly_errors(fn):
    """Turn the errors a user can fix into one message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
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
        raise ValueError(f"unknown bundled dataset {source!r}; available: digits")
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
        raise ValueError(f"--size {size!r}: expected HxW, for example 32x32") from None
    if h < 1 or w < 1:
        raise ValueError(f"--size {size!r}: both sides must be positive")
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
        raise ValueError(f"--input-size {input_size!r}: expected CxHxW, e.g. 3x224x224") from None
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
    from pipeline.train.trainer import run_training

    cfg = load_config(config, overrides or [])
    summary = run_training(cfg, console=err)
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


def main() -> None:  # pragma: no cover - console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
