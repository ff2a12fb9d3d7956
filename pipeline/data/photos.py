"""Image files to dataset shards on every core: the engine behind the image importers.

The importers (`pipeline.data.sources`: a folder tree, an S3 prefix, a CSV/JSONL listing) decide
which files, labels and splits. `write_image_files` plans the shards (consecutive files of a split,
cut by `shard_rows` or by the files' sizes against `shard_mb`) and hands each planned shard to a
pool process, which reads, checks, converts and encodes its files (`imaging.prepare`), writes the
Parquet shard into the `DatasetWriter`'s staging area and returns only what the manifest needs.
So the parent does no per-image work and the import scales with the cores; the dataset is the
same whatever the number of workers (the plan does not depend on it, and the results are recorded
in plan order); memory stays bounded (at most `2 x workers` shards in flight, one per process);
and the write stays all-or-nothing: the first bad file aborts it and everything written is
removed (or, with `skip_bad`, the file is left out and counted in the manifest's `imported`).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.data import imaging
from pipeline.data.ingest import local_cores
from pipeline.data.shards import (
    DatasetWriter,
    ImageSpec,
    ImportSummary,
    Manifest,
    ShardInfo,
    shard_rel,
    write_shard,
)
from pipeline.errors import DatasetError

EXAMPLES = 20  # skipped files named in the manifest
ASSUMED_FILE_BYTES = 128 * 1024  # plans shards where a listing gives no size (s3:// rows)
SPLIT_OVER = 1.5  # a planned shard whose encoded bytes exceed this x shard_mb is written in parts


@dataclass(frozen=True)
class ImportOptions:
    """How image files are handled; the dataset's encoding and size are in `WriteOptions`."""

    workers: int | None = None  # processes; None: every core; 1: in this process
    skip_bad: bool = False  # leave unreadable files out (counted) instead of failing
    max_side: int | None = None  # jpeg: re-encode images whose longer side is larger
    quality: int = 90  # jpeg quality of re-encoded images

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise DatasetError(f"workers must be >= 1, got {self.workers}")
        if self.max_side is not None and self.max_side < 1:
            raise DatasetError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise DatasetError(f"quality must be in 1..100, got {self.quality}")

    def pool_size(self) -> int:
        return self.workers or local_cores()


@dataclass(frozen=True)
class ImageFile:
    """One file to import: where to read it (a local path or an s3:// URI) and how to name it."""

    source: str
    row_id: str  # stored in the `id` column
    where: str = ""  # extra context for errors, e.g. "listing.csv line 7"
    size: int | None = None  # bytes, where the listing knows it (an S3 prefix's does)

    def describe(self) -> str:
        return f"{self.source} ({self.where})" if self.where else self.source


def read_source(source: str, storage: StorageConfig | None) -> bytes:
    if st.is_s3(source):
        return st.read_bytes(st.resolve(source, storage))
    with open(source, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# One planned shard, in a pool process


@dataclass
class _Shard:
    """A planned shard: consecutive files of one split, and where to write them."""

    split: str
    index: int  # within the split: names the shard, part-<index:05d>
    files: list[ImageFile]
    labels: list[int]
    recipe: imaging.ImageRecipe
    spec: ImageSpec
    root: str  # the writer's `shard_root`
    suffix: str  # the writer's `shard_suffix`
    shard_bytes: int
    skip_bad: bool
    storage: StorageConfig | None = field(default=None)


@dataclass
class _Written:
    """What a pool process sends back: no image bytes, only what the manifest records."""

    shards: list[ShardInfo] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # of the rows kept
    channel_sum: np.ndarray | None = None
    channel_sumsq: np.ndarray | None = None
    pixels: int = 0
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    reencoded: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>: <what is wrong>", in file order
    error: str | None = None  # what stops the import (nothing was written)


def _prepare(f: ImageFile, storage: StorageConfig | None, recipe: imaging.ImageRecipe):
    """(the encoded image, None) or (None, "<file>: <what is wrong>")."""
    try:
        return imaging.prepare(read_source(f.source, storage), recipe), None
    except FileNotFoundError:
        return None, f"{f.describe()}: file not found"
    except (OSError, st.StorageError) as exc:
        return None, f"{f.describe()}: cannot be read ({exc})"
    except imaging.ImageDecodeError as exc:
        return None, f"{f.describe()}: {exc}"


def _write_planned(task: _Shard) -> _Written:
    """Runs in a pool process: prepare every file of the shard, then write it (in parts if the
    encoded bytes came out far over the plan, as a PNG of a JPEG does). A bad file stops the
    shard before anything is written, unless `skip_bad`."""
    spec, c = task.spec, task.recipe.channels
    out = _Written(channel_sum=np.zeros(c), channel_sumsq=np.zeros(c))
    rows: list[tuple[bytes, int, str]] = []
    for f, label in zip(task.files, task.labels, strict=True):
        image, problem = _prepare(f, task.storage, task.recipe)
        if image is None:
            if not task.skip_bad:
                out.error = (
                    f"{problem}; fix or remove it, or pass --skip-bad to leave out unreadable files"
                )
                return out
            out.skipped.append(str(problem))
            continue
        if spec.fixed_size and (image.height, image.width) != (spec.height, spec.width):
            out.error = (
                f"{f.describe()}: image is {image.height}x{image.width}, the first was "
                f"{spec.height}x{spec.width}; pass --size HxW to resize every image"
                + ("" if spec.encoding == "jpeg" else ", or --encoding jpeg to keep sizes")
            )
            return out
        rows.append((image.blob, label, f.row_id))
        out.labels.append(label)
        out.channel_sum += image.channel_sum
        out.channel_sumsq += image.channel_sumsq
        out.pixels += image.pixels
        out.heights.append(image.height)
        out.widths.append(image.width)
        out.reencoded += image.reencoded
    if not rows:
        return out
    encoded = sum(len(r[0]) for r in rows)
    parts = round(encoded / task.shard_bytes) if encoded > SPLIT_OVER * task.shard_bytes else 1
    parts = min(max(parts, 1), len(rows))
    root = st.resolve(task.root, task.storage)
    stem = f"{task.index:05d}"
    try:
        for k, part in enumerate(np.array_split(np.arange(len(rows)), parts)):
            rel = shard_rel(task.split, stem if parts == 1 else f"{stem}-{k}", task.suffix)
            written = write_shard(root, rel, [rows[i] for i in part], spec.encoding)
            out.shards.append(written)
    except BaseException:
        for shard in out.shards:  # the parent never hears of them: remove them here
            with contextlib.suppress(OSError):
                root.fs.delete_file(root.join(shard.path).path)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# The parent: plan, run in order, record


def _planned_bytes(f: ImageFile, spec: ImageSpec) -> int:
    if spec.encoding == "raw" and spec.fixed_size:
        return spec.raw_size
    if f.size is not None:
        return f.size
    if not st.is_s3(f.source):
        try:
            return os.stat(f.source).st_size
        except OSError:
            pass  # a missing file is named when its shard is prepared
    return ASSUMED_FILE_BYTES


def plan_shards(
    items: Sequence[tuple[str, ImageFile, int]],
    spec: ImageSpec,
    *,
    shard_rows: int | None,
    shard_bytes: int,
) -> list[tuple[str, list[ImageFile], list[int]]]:
    """(split, files, labels) per shard, in order: consecutive files of a split, closed at
    `shard_rows` files or once their bytes reach `shard_bytes` (the rule `DatasetWriter` applies
    to rows it buffers itself), by the files' sizes: exact for JPEGs kept as given and raw
    pixels, an estimate for re-encoded images."""
    plan: list[tuple[str, list[ImageFile], list[int]]] = []
    open_: dict[str, tuple[list[ImageFile], list[int], list[int]]] = {}
    for split, f, label in items:
        files, labels, size = open_.setdefault(split, ([], [], [0]))
        files.append(f)
        labels.append(label)
        size[0] += _planned_bytes(f, spec)
        if (shard_rows is not None and len(files) >= shard_rows) or size[0] >= shard_bytes:
            plan.append((split, files, labels))
            del open_[split]
    plan += [(split, files, labels) for split, (files, labels, _) in open_.items()]
    return plan


def _context(files: Sequence[ImageFile], root: str):
    """fork when everything is local: the children start in milliseconds and only run Pillow,
    NumPy and Arrow on files they open themselves. spawn as soon as S3 is involved: a forked
    child would inherit the AWS SDK's threads and connections mid-flight (a spawned child starts
    clean, in about a second: it imports the pipeline and the caller's main module)."""
    s3 = st.is_s3(root) or any(st.is_s3(f.source) for f in files) or st.s3_filesystem_opened()
    if s3 or "fork" not in get_all_start_methods():
        return get_context("spawn")
    return get_context("fork")


class _InProcess(Executor):
    """`workers=1`: the same code path without a pool (and its start-up)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # as a pool would: raised by result()
            future.set_exception(exc)
        return future


class _Runner:
    """Runs planned shards with at most `2 x workers` in flight and yields results in plan order.
    Leaving the block waits for every running shard and hands whatever they wrote to the writer,
    so an abort (which comes after) removes it all."""

    def __init__(self, writer: DatasetWriter, tasks: list[_Shard], workers: int) -> None:
        self.writer, self.tasks = writer, tasks
        files = [f for t in tasks for f in t.files]
        if workers == 1 or len(tasks) <= 1:
            self.pool: Executor = _InProcess()
        else:
            self.pool = ProcessPoolExecutor(
                min(workers, len(tasks)), mp_context=_context(files, writer.shard_root)
            )
        self.window = 2 * workers
        self.pending: deque[tuple[_Shard, Future]] = deque()

    def __enter__(self) -> _Runner:
        return self

    def _submit(self, task: _Shard) -> None:
        self.pending.append((task, self.pool.submit(_write_planned, task)))

    def results(self) -> Iterator[tuple[_Shard, _Written]]:
        todo = iter(self.tasks)
        for task in todo:
            self._submit(task)
            if len(self.pending) >= self.window:
                break
        while self.pending:
            task, future = self.pending[0]
            written = future.result()  # raises: the pair stays pending for `__exit__`
            self.pending.popleft()
            self.writer.adopt(written.shards)
            nxt = next(todo, None)
            if nxt is not None:
                self._submit(nxt)
            yield task, written

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for _, future in self.pending:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.writer.adopt(future.result().shards)


def write_image_files(
    writer: DatasetWriter,
    items: Sequence[tuple[str, ImageFile, int]],
    opts: ImportOptions,
    *,
    resize: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Import (split, file, label) rows in order, then commit. With `resize`, every image is
    resized to the dataset's fixed size. `progress(n)` is called as shards land. A bad file
    aborts the write (nothing is left behind) unless `opts.skip_bad`."""
    spec: ImageSpec = writer.image
    recipe = imaging.ImageRecipe(
        encoding=spec.encoding,
        channels=spec.channels,
        size=(spec.height, spec.width) if resize and spec.fixed_size else None,
        max_side=opts.max_side,
        quality=opts.quality,
    )
    plan = plan_shards(items, spec, shard_rows=writer.shard_rows, shard_bytes=writer.shard_bytes)
    index: dict[str, int] = {}
    tasks = []
    for split, files, labels in plan:
        index[split] = index.get(split, -1) + 1
        tasks.append(
            _Shard(
                split, index[split], files, labels, recipe, spec, writer.shard_root,
                writer.shard_suffix, writer.shard_bytes, opts.skip_bad, writer.storage,
            )
        )  # fmt: skip
    summary = ImportSummary()
    with writer, _Runner(writer, tasks, opts.pool_size()) as runner:
        for task, written in runner.results():
            if written.error is not None:
                raise DatasetError(written.error)
            summary.skipped += len(written.skipped)
            room = EXAMPLES - len(summary.skipped_examples)
            summary.skipped_examples += written.skipped[: max(room, 0)]
            summary.reencoded += written.reencoded
            assert written.channel_sum is not None and written.channel_sumsq is not None
            writer.add_shards(
                task.split,
                written.shards,
                written.labels,
                stats=(written.channel_sum, written.channel_sumsq, written.pixels),
                sizes=(written.heights, written.widths),
            )
            if progress is not None:
                progress(len(task.files))
        writer.imported = summary
    assert writer.manifest is not None
    return writer.manifest


def first_image_size(f: ImageFile, storage: StorageConfig | None) -> tuple[int, int]:
    """(height, width) of one file as stored after EXIF orientation: sets a fixed-size dataset."""
    try:
        img = imaging.open_image(read_source(f.source, storage))
        transposed = img.getexif().get(imaging.ORIENTATION, 1) in (5, 6, 7, 8)
    except FileNotFoundError:
        raise DatasetError(f"{f.describe()}: file not found") from None
    except (OSError, st.StorageError) as exc:
        raise DatasetError(f"{f.describe()}: cannot be read ({exc})") from None
    except imaging.ImageDecodeError as exc:
        raise DatasetError(f"{f.describe()}: {exc}") from None
    return (img.width, img.height) if transposed else (img.height, img.width)
