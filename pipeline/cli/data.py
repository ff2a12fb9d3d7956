"""`pipeline data ...`: create, import, inspect and validate datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import display
from pipeline.cli.common import EndpointOpt, data_app, friendly_errors, import_app
from pipeline.config import StorageConfig
from pipeline.errors import UsageError

OutOpt = Annotated[
    str, typer.Option("--out", help="Dataset root: a local path or s3://bucket/prefix.")
]
ShardRowsOpt = Annotated[int | None, typer.Option(help="Target rows per shard.", min=1)]
ShardMbOpt = Annotated[float, typer.Option(help="Target megabytes per shard.", min=0.001)]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the split and the shard order.")]


def _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding, bar=None):
    from pipeline.data.sources import WriteOptions

    return WriteOptions(
        out=out_uri,
        storage=StorageConfig(endpoint_url=endpoint_url),
        shard_rows=shard_rows,
        shard_mb=shard_mb,
        overwrite=overwrite,
        encoding=encoding,
        on_progress=bar,
    )


def _print_written(manifest, uri: str) -> None:
    counts = ", ".join(f"{s} {i.rows}" for s, i in manifest.splits.items())
    shards = sum(len(i.shards) for i in manifest.splits.values())
    display.plain(f"wrote {uri}: {counts} rows in {shards} shard(s); digest {manifest.digest[:12]}")
    imported = manifest.imported
    if imported is not None and imported.reencoded and manifest.image.encoding == "jpeg":
        display.plain(f"  re-encoded {imported.reencoded} image(s) (CMYK, rotation or --max-side)")
    if imported is not None and imported.skipped:
        display.note(
            f"warning: skipped {imported.skipped} unreadable file(s) (--skip-bad): "
            + "; ".join(imported.skipped_examples),
            "yellow",
        )


WorkersOpt = Annotated[
    int | None, typer.Option(min=1, help="Processes decoding images; default: every core.")
]
SkipBadOpt = Annotated[
    bool,
    typer.Option("--skip-bad", help="Leave unreadable images out (counted) instead of failing."),
]
MaxSideOpt = Annotated[
    int | None,
    typer.Option(min=1, help="jpeg: re-encode images whose longer side is larger, to this side."),
]
QualityOpt = Annotated[int, typer.Option(min=1, max=100, help="JPEG quality of re-encoded images.")]
EncodingOpt = Annotated[
    str, typer.Option(help="jpeg (as given, mixed sizes: photographs), png (default) or raw.")
]


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
    with display.WriteProgressBar() as bar:
        opts = _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding, bar)
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


def _import_images(run, source: str, o: dict) -> None:
    """The body both image importers share: `o` is the command's options, by name."""
    from pipeline.data.photos import ImportOptions

    images = ImportOptions(
        workers=o["workers"], skip_bad=o["skip_bad"], max_side=o["max_side"], quality=o["quality"]
    )
    with display.WriteProgressBar() as bar:
        opts = _write_options(
            o["out_uri"], o["endpoint_url"], o["shard_rows"], o["shard_mb"], o["overwrite"],
            o["encoding"], bar,
        )  # fmt: skip
        manifest = run(
            source,
            opts,
            size=_parse_size(o["size"]),
            grayscale=o["grayscale"],
            val_fraction=o["val_fraction"],
            test_fraction=o["test_fraction"],
            seed=o["seed"],
            images=images,
        )
    _print_written(manifest, o["out_uri"])


@import_app.command("image-folder")
@friendly_errors
def import_image_folder(
    src: Annotated[
        str,
        typer.Argument(help="SRC/<class>/*.jpg|png (or SRC/train/<class>/...); local or s3://."),
    ],
    out_uri: OutOpt,
    size: Annotated[str | None, typer.Option(help="Resize every image to HxW.")] = None,
    grayscale: Annotated[bool, typer.Option(help="Store one channel instead of RGB.")] = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: SeedOpt = 0,
    encoding: EncodingOpt = "png",
    workers: WorkersOpt = None,
    skip_bad: SkipBadOpt = False,
    max_side: MaxSideOpt = None,
    quality: QualityOpt = 90,
    shard_rows: ShardRowsOpt = None,
    shard_mb: ShardMbOpt = 64.0,
    overwrite: OverwriteOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Import a class-per-subfolder tree of images on every core (memory stays bounded)."""
    from pipeline.data.sources import import_image_folder as run

    _import_images(run, src, locals())


@import_app.command("listing")
@friendly_errors
def import_listing(
    listing: Annotated[
        str,
        typer.Argument(
            help="CSV with a path,label[,split] header, or JSONL of {path, label[, split]}; "
            "paths local, s3:// or relative to the listing."
        ),
    ],
    out_uri: OutOpt,
    size: Annotated[str | None, typer.Option(help="Resize every image to HxW.")] = None,
    grayscale: Annotated[bool, typer.Option(help="Store one channel instead of RGB.")] = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: SeedOpt = 0,
    encoding: EncodingOpt = "png",
    workers: WorkersOpt = None,
    skip_bad: SkipBadOpt = False,
    max_side: MaxSideOpt = None,
    quality: QualityOpt = 90,
    shard_rows: ShardRowsOpt = None,
    shard_mb: ShardMbOpt = 64.0,
    overwrite: OverwriteOpt = False,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Import the images a CSV or JSONL listing names, with their labels."""
    from pipeline.data.sources import import_listing as run

    _import_images(run, listing, locals())


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

    with display.WriteProgressBar() as bar:
        opts = _write_options(out_uri, endpoint_url, shard_rows, shard_mb, overwrite, encoding, bar)
        manifest = run(
            file, opts, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
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
        display.out.print_json(m.model_dump_json())
        return
    display.print_manifest(m, uri)


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
        display.print_problems(uri, problems)
        raise typer.Exit(1)
    rows = sum(i.rows for i in manifest.splits.values())
    shards = sum(len(i.shards) for i in manifest.splits.values())
    display.plain(
        f"{uri}: OK ({rows} rows in {shards} shards match manifest {manifest.digest[:12]})"
    )
