"""Batch predictions: `pipeline predict MODEL_URI --data URI --out URI`.

The input is one of this pipeline's datasets (a root holding `manifest.json`: every split, or
`split`), or a local folder / `s3://` prefix of .png/.jpg/.jpeg files (searched recursively). Ray
Data runs `PredictBatches` on a pool of `concurrency` actors (one CPU, or one GPU with
`device="cuda"`): each loads the model once, weights-only, from files the driver downloaded and
sent through Ray's object store (a cluster's workers need no access to the tracking server), and
applies the model package's own preprocessing (`Predictor`: the dataset import's resize, or the
evaluation centre crop of photographs).

The output is one Parquet file: `id` (a dataset's row id) or `path` (the file), `label` (class
name), `confidence`, `top_k_labels` / `top_k_probabilities` (best first), `model`, `version`;
its schema metadata records the model URI, the data and the classes. It is written all-or-nothing:
rows stream into a temporary sibling (`<out>.tmp-<id>`) that is renamed into place (locally) or
copied to the final key (S3) only once every row is in; a failure deletes the temporary file.
An existing --out is replaced only with `overwrite`, and only when it is predictions this
command wrote. A bad image stops the run with its path or row id, unless `skip_bad` counts and
leaves it out.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import PipelineConfig, StorageConfig
from pipeline.data.sources import Progress
from pipeline.errors import DatasetError, PipelineError, ServingError, StorageError, UsageError
from pipeline.events import EventSink
from pipeline.tags import PULL_META_FILE

DEVICES = ("cpu", "cuda")
EXAMPLES = 20  # skipped images named in the summary
META_KEY = b"pipeline.predictions"  # schema metadata: marks a file this command wrote
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class PredictOptions:
    """Where to read and write, and how to run the actor pool."""

    data: str
    out: str
    batch_size: int = 64  # images per map_batches call (and forward pass)
    concurrency: int = 2  # actors, each with one CPU (or one GPU with device="cuda")
    top_k: int = 5  # capped at the number of classes
    device: str = "cpu"
    skip_bad: bool = False  # leave out (and count) images that do not decode
    overwrite: bool = False  # replace an existing --out written by `pipeline predict`
    split: str | None = None  # a dataset's split; None: every split
    storage: StorageConfig | None = None
    on_progress: EventSink | None = None  # WriteProgress events (the CLI draws a bar)

    def check(self) -> None:
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--concurrency", self.concurrency),
            ("--top-k", self.top_k),
        ):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r}: choose one of {', '.join(DEVICES)}")


@dataclass
class PredictSummary:
    """What `predict` did: --json prints it as is."""

    rows: int
    skipped: int
    seconds: float
    images_per_s: float
    out: str
    model: str
    version: str | None
    model_uri: str
    data: str
    input: str  # "dataset" or "images"
    top_k: int
    concurrency: int
    batch_size: int
    device: str
    skipped_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The input: a dataset's shards, or image files


@dataclass(frozen=True)
class _Input:
    kind: str  # "dataset" or "images"
    key: str  # the output's first column: "id" or "path"
    total: int
    image: Any = None  # the dataset's ImageSpec (dataset only)
    fs: Any = None
    paths: tuple[str, ...] = ()  # shard paths inside fs, or the image files


def _resolve_input(data: str, split: str | None, storage: StorageConfig | None) -> _Input:
    from pipeline.data.shards import MANIFEST, read_manifest
    from pipeline.data.sources import list_images

    root = st.resolve(data, storage)
    if root.is_s3:
        st.check_bucket(root.uri, storage)
    if st.exists(root.join(MANIFEST)):
        manifest = read_manifest(data, storage)
        splits = list(manifest.splits)
        if split is not None and split not in splits:
            raise UsageError(f"--split {split!r}: {data} has splits {', '.join(splits)}")
        chosen = [split] if split else splits
        paths = [root.join(p).path for s in chosen for p in manifest.shard_paths(s)]
        total = sum(manifest.split(s).rows for s in chosen)
        if total == 0:
            raise DatasetError(f"{data}: {', '.join(chosen)} has no rows; nothing to predict")
        return _Input("dataset", "id", total, manifest.image, root.fs, tuple(paths))
    if split is not None:
        raise UsageError(f"--split is for datasets; {data} has no manifest.json")
    if not root.is_s3 and not Path(root.path).exists():
        raise DatasetError(
            f"{data}: does not exist; pass a dataset root (with manifest.json), a folder of "
            ".png/.jpg images, or an s3:// prefix of them"
        )
    files = list_images(data if root.is_s3 else root.path, storage)
    if not files:
        raise DatasetError(f"{data}: no .png/.jpg/.jpeg images found (searched recursively)")
    return _Input("images", "path", len(files), paths=tuple(files))


def _dataset(inp: _Input, batch_size: int, concurrency: int):
    import ray.data

    if inp.kind == "dataset":
        ds = ray.data.read_parquet(list(inp.paths), filesystem=inp.fs)
        return ds.select_columns(["image", "id"])
    n = len(inp.paths)
    blocks = min(n, max(concurrency, -(-n // batch_size)), 1000)  # every actor gets work
    return ray.data.from_items([{"path": p} for p in inp.paths], override_num_blocks=blocks)


# ---------------------------------------------------------------------------------------------
# The model: fetched once on the driver, sent to every actor as bytes


def _fetch_model(
    uri: str, dest: Path, tracking_uri: str | None, timeout_s: float
) -> tuple[Path, str, str | None]:
    """(local directory, model name, version) of a models:/ or runs:/ URI, or a local
    directory (a `pipeline pull` folder or a downloaded model directory)."""
    from pipeline.serving.fetch import download

    path = Path(uri)
    if path.is_dir():
        source: dict[str, Any] = {}
        record = path / PULL_META_FILE
        if record.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                source = json.loads(record.read_text()).get("source") or {}
        version = source.get("version")
        return path, source.get("name") or path.resolve().name, str(version) if version else None
    if ":/" not in uri:
        raise ServingError(
            f"{uri}: not a directory, nor a models:/ or runs:/ URI; pass models:/NAME@ALIAS, "
            "models:/NAME/VERSION, runs:/ID/model or a folder written by `pipeline pull`"
        )
    local, source = download(uri, dest, tracking_uri, timeout_s)
    version = source.get("version")
    return local, source.get("name") or uri, str(version) if version else None


def model_bundle(local: Path) -> dict[str, bytes]:
    """The files an actor needs to load the model, by relative path: a pulled folder whole
    (its hashes are checked again where it lands), else the metadata and the state dict."""
    from pipeline.model_package import package_files

    if (local / PULL_META_FILE).is_file():
        files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    else:
        files = package_files(local)
    return {rel: p.read_bytes() for rel, p in sorted(files.items())}


def _load_bundle(bundle: dict[str, bytes], device: str, source: str):
    from pipeline.serving.predictor import load_local

    root = Path(tempfile.mkdtemp(prefix="pipeline-predict-"))
    for rel, data in bundle.items():
        target = (root / rel).resolve()
        if not target.is_relative_to(root.resolve()):
            raise ServingError(f"{source}: model file {rel!r} points outside the model folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return load_local(root, device, source=source)


# ---------------------------------------------------------------------------------------------
# The actors


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of each row's `k` most probable classes, best first; ties keep
    the class order (so the first equals `argmax`)."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def output_schema(key: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field(key, pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("confidence", pa.float64()),
            pa.field("top_k_labels", pa.list_(pa.string())),
            pa.field("top_k_probabilities", pa.list_(pa.float64())),
            pa.field("model", pa.string()),
            pa.field("version", pa.string()),
        ]
    )


class PredictBatches:
    """`map_batches` callable: one Predictor per actor; a batch of rows (`id` + encoded `image`
    of a dataset, or `path` of a file) -> one output row each, plus `error` (null, or why the
    image was unusable, naming it). The driver decides whether an error stops the run."""

    def __init__(
        self,
        bundle_ref: Any,
        *,
        key: str,
        image: Any,
        top_k: int,
        device: str,
        model: str,
        version: str | None,
        source: str,
        storage: StorageConfig | None,
    ) -> None:
        import ray

        bundle = ray.get(bundle_ref[0]) if isinstance(bundle_ref, list) else bundle_ref
        self.predictor = _load_bundle(bundle, device, source)
        self.key, self.image, self.storage = key, image, storage
        self.k = min(top_k, len(self.predictor.classes))
        self.model, self.version = model, version
        self.schema = output_schema(key).append(pa.field("error", pa.string()))

    def _item(self, batch: dict[str, np.ndarray], i: int) -> Any:
        """The image as the Predictor takes it: a dataset's raw pixels as an array, anything
        else as the encoded bytes."""
        from pipeline.data.photos import read_source
        from pipeline.data.shards import decode_images

        if self.key == "path":
            return read_source(str(batch["path"][i]), self.storage)
        blob = bytes(batch["image"][i])
        if self.image.encoding == "raw":
            return decode_images([blob], self.image)[0]
        return blob

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from pipeline.serving.predictor import image_pixels

        p = self.predictor
        names = [str(v) for v in batch[self.key]]
        pixels, good, errors = [], [], [None] * len(names)
        for i, name in enumerate(names):
            try:
                pixels.append(image_pixels(self._item(batch, i), p.image, p.crop))
                good.append(i)
            except FileNotFoundError:
                errors[i] = f"{name}: file not found"
            except (OSError, StorageError, ValueError) as exc:  # ImageDecodeError, ServingError
                errors[i] = f"{name}: {str(exc)[:MAX_ERROR_CHARS]}"
        labels: list[str | None] = [None] * len(names)
        conf: list[float | None] = [None] * len(names)
        k_labels: list[list[str] | None] = [None] * len(names)
        k_probs: list[list[float] | None] = [None] * len(names)
        if good:
            probs = p.pixel_probabilities(np.stack(pixels))
            idx, top = top_k(probs, self.k)
            for row, i in enumerate(good):
                k_labels[i] = [p.classes[c] for c in idx[row]]
                k_probs[i] = top[row].tolist()
                labels[i], conf[i] = k_labels[i][0], k_probs[i][0]
        n = len(names)
        return pa.Table.from_pydict(
            {
                self.key: names,
                "label": labels,
                "confidence": conf,
                "top_k_labels": k_labels,
                "top_k_probabilities": k_probs,
                "model": [self.model] * n,
                "version": [self.version] * n,
                "error": errors,
            },
            schema=self.schema,
        )


# ---------------------------------------------------------------------------------------------
# The output: one Parquet file, all-or-nothing


def check_out(loc: st.Location, overwrite: bool) -> None:
    """Refuse an --out that would replace something: a folder always, a file unless
    `overwrite`, and a file this command did not write even then."""
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise StorageError(f"{loc.uri}: cannot be read: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.Directory:
        raise StorageError(
            f"{loc.uri}: is a folder; --out names one Parquet file to create, e.g. "
            "predictions.parquet"
        )
    if not overwrite:
        raise StorageError(f"{loc.uri}: already exists; pass --overwrite to replace it")
    if not is_predictions(loc):
        raise StorageError(
            f"{loc.uri}: exists and is not predictions written by `pipeline predict`, so "
            "--overwrite does not replace it; move it away or choose another --out"
        )


def is_predictions(loc: st.Location) -> bool:
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.read_schema(f).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return META_KEY in meta


class StagedParquet:
    """A Parquet file written beside `loc` and moved into place by `commit`; `abort` (or an
    exception in the `with` block) deletes it. Readers see the old file, the whole new file or
    nothing."""

    def __init__(
        self, loc: st.Location, schema: pa.Schema, storage: StorageConfig | None = None
    ) -> None:
        self.loc, self.storage = loc, storage
        self.tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        self.stream = None
        try:
            if not loc.is_s3:
                os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            self.stream = loc.fs.open_output_stream(self.tmp)
            self.writer = pq.ParquetWriter(self.stream, schema)
        except OSError as exc:
            self._delete_tmp()
            raise StorageError(f"{loc.uri}: cannot be written: {exc}") from None

    def write(self, table: pa.Table) -> None:
        try:
            self.writer.write_table(table)
        except OSError as exc:
            raise StorageError(f"{self.loc.uri}: cannot be written: {exc}") from None

    def commit(self) -> None:
        try:
            self.writer.close()
            self.stream.close()
            if self.loc.is_s3:
                self.loc.fs.copy_file(self.tmp, self.loc.path)  # one object: all or nothing
                self._delete_tmp()
            else:
                os.replace(self.tmp, self.loc.path)
        except OSError as exc:
            self._delete_tmp()
            raise StorageError(f"{self.loc.uri}: cannot be written: {exc}") from None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            self.stream.close()
        self._delete_tmp()

    def _delete_tmp(self) -> None:
        if self.loc.is_s3:  # boto3: pyarrow's delete_file leaves a "folder/" marker object
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = self.tmp.split("/", 1)
            with contextlib.suppress(BotoCoreError, ClientError, OSError, StorageError):
                st.s3_client(self.storage).delete_object(Bucket=bucket, Key=key)
            return
        with contextlib.suppress(OSError):
            self.loc.fs.delete_file(self.tmp)

    def __enter__(self) -> StagedParquet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# The run


def _start_ray(opts: PredictOptions, cfg: PipelineConfig | None) -> None:
    import ray

    from pipeline.train.ray_runtime import init_ray

    # A local Ray gets a CPU slot per actor beside the read tasks'.
    init_ray(cfg or PipelineConfig(), extra_cpus=opts.concurrency)
    resources = ray.cluster_resources()
    kind = "GPU" if opts.device == "cuda" else "CPU"
    have = resources.get(kind, 0)
    if have < opts.concurrency:
        raise UsageError(
            f"--concurrency {opts.concurrency} with --device {opts.device} needs "
            f"{opts.concurrency} {kind}(s); the Ray cluster has {have:g}: lower --concurrency"
            + (" or use --device cpu" if kind == "GPU" else "")
        )


def predict(
    model_uri: str,
    opts: PredictOptions,
    *,
    tracking_uri: str | None = None,
    timeout_s: float = 10.0,
    cfg: PipelineConfig | None = None,
) -> PredictSummary:
    """Predict every image of `opts.data` with `model_uri` and write `opts.out` (see the
    module docstring). Raises a PipelineError naming the URI, file or image on bad input."""
    import ray
    import ray.data

    from pipeline.serving.predictor import load_local

    opts.check()
    out = st.resolve(opts.out, opts.storage)
    if out.is_s3:
        st.check_bucket(out.uri, opts.storage)
    check_out(out, opts.overwrite)
    inp = _resolve_input(opts.data, opts.split, opts.storage)
    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as tmp:
        local, name, version = _fetch_model(model_uri, Path(tmp), tracking_uri, timeout_s)
        predictor = load_local(local, source=model_uri)  # fails here, once, on a bad model
        bundle = model_bundle(local)
    k = min(opts.top_k, len(predictor.classes))
    _start_ray(opts, cfg)
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # rows in input order: a reproducible file
    schema = output_schema(inp.key).with_metadata(
        {
            META_KEY: json.dumps(
                {
                    "model_uri": st.mask_credentials(model_uri),
                    "model": name,
                    "version": version,
                    "data": st.mask_credentials(opts.data),
                    "top_k": k,
                    "classes": predictor.classes,
                }
            ).encode()
        }
    )
    where = "GPU" if opts.device == "cuda" else "CPU"
    progress = Progress(
        opts.on_progress, f"predicting ({opts.concurrency} {where} workers)", inp.total
    )
    rows, skipped, examples = 0, 0, []
    started = time.perf_counter()
    bundle_ref = ray.put(bundle)
    try:
        ds = _predict_dataset(inp, opts, bundle_ref, name, version, model_uri, k)
        with StagedParquet(out, schema, opts.storage) as staged:
            for table in _run(ds, opts.data):
                errors = table.column("error")
                bad = [e for e in errors.to_pylist() if e is not None]
                if bad and not opts.skip_bad:
                    raise ServingError(
                        f"{bad[0]}; fix or remove the image, or pass --skip-bad to leave out "
                        "unusable images"
                    )
                if bad:
                    skipped += len(bad)
                    examples += bad[: max(0, EXAMPLES - len(examples))]
                    table = table.filter(errors.is_null())
                table = table.drop_columns(["error"]).cast(schema)
                staged.write(table)
                rows += table.num_rows
                progress.advance(table.num_rows + len(bad))
    finally:
        ctx.execution_options.preserve_order = preserve
    seconds = time.perf_counter() - started
    return PredictSummary(
        rows=rows,
        skipped=skipped,
        seconds=round(seconds, 3),
        images_per_s=round((rows + skipped) / seconds, 1) if seconds > 0 else 0.0,
        out=out.uri,
        model=name,
        version=version,
        model_uri=st.mask_credentials(model_uri),
        data=st.mask_credentials(opts.data),
        input=inp.kind,
        top_k=k,
        concurrency=opts.concurrency,
        batch_size=opts.batch_size,
        device=opts.device,
        skipped_examples=examples,
    )


def _predict_dataset(inp, opts, bundle_ref, name, version, model_uri, k):
    """The input dataset mapped by `PredictBatches` on a fixed pool of actors."""
    import ray.data

    with warnings.catch_warnings():
        # max_restarts has no named parameter yet, so it goes through the deprecated
        # **ray_remote_args.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _dataset(inp, opts.batch_size, opts.concurrency).map_batches(
            PredictBatches,
            fn_constructor_kwargs={
                "bundle_ref": [bundle_ref],  # in a list: Ray passes it through, not its value
                "key": inp.key,
                "image": inp.image,
                "top_k": k,
                "device": opts.device,
                "model": name,
                "version": version,
                "source": st.mask_credentials(model_uri),
                "storage": opts.storage,
            },
            batch_size=opts.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts.concurrency),
            num_cpus=1 if opts.device == "cpu" else None,
            num_gpus=1 if opts.device == "cuda" else None,
            # An actor that dies fails the run (nothing is written; run it again) rather than
            # being restarted from constructor arguments held in the object store.
            max_restarts=0,
        )


def _run(ds, data: str) -> Iterator[pa.Table]:
    """The pool's output batches; an error raised in an actor or a read task becomes one
    message (a PipelineError raised remotely keeps its own text)."""
    from pipeline.errors import root_cause

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except PipelineError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith(("ray", "pyarrow")) or "Ray" in type(exc).__name__:
            raise ServingError(f"{data}: predicting failed: {root_cause(exc)}") from exc
        raise
