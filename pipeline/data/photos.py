"""Image files to dataset rows on every core: the engine behind the image importers.

The importers (`pipeline.data.sources`: a folder tree, an S3 prefix, a CSV/JSONL listing) decide
which files, labels and splits; `write_image_files` reads, checks, converts and encodes the files in
a pool of processes (`imaging.prepare`) and streams the results, in a fixed order, into one
`DatasetWriter`. So the dataset is the same whatever the number of workers, memory stays bounded
(at most `workers x 4` chunks of files in flight), and the write stays all-or-nothing: the first bad
file aborts it (or, with `skip_bad`, is left out and counted in the manifest's `imported`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.data import imaging
from pipeline.data.ingest import local_cores
from pipeline.data.shards import DatasetWriter, ImageSpec, ImportSummary, Manifest
from pipeline.errors import DatasetError

CHUNK = 16  # files per task: large enough to hide the pool's per-task cost, small for memory
EXAMPLES = 20  # skipped files named in the manifest


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

    def describe(self) -> str:
        return f"{self.source} ({self.where})" if self.where else self.source


@dataclass
class _Outcome:
    image: imaging.EncodedImage | None = None
    problem: str | None = None  # "<file>: <what is wrong>"


@dataclass
class _Task:
    files: list[ImageFile]
    recipe: imaging.ImageRecipe
    storage: StorageConfig | None = field(default=None)


def read_source(source: str, storage: StorageConfig | None) -> bytes:
    if st.is_s3(source):
        return st.read_bytes(st.resolve(source, storage))
    with open(source, "rb") as f:
        return f.read()


def _prepare_chunk(task: _Task) -> list[_Outcome]:
    """Runs in a pool process: every failure becomes a message naming the file."""
    out = []
    for f in task.files:
        try:
            data = read_source(f.source, task.storage)
            out.append(_Outcome(image=imaging.prepare(data, task.recipe)))
        except FileNotFoundError:
            out.append(_Outcome(problem=f"{f.describe()}: file not found"))
        except (OSError, st.StorageError) as exc:
            out.append(_Outcome(problem=f"{f.describe()}: cannot be read ({exc})"))
        except imaging.ImageDecodeError as exc:
            out.append(_Outcome(problem=f"{f.describe()}: {exc}"))
    return out


def _context(files: Sequence[ImageFile]):
    """fork when everything is local: the children start in milliseconds and only run Pillow
    and NumPy on files they open themselves. spawn as soon as S3 is involved: a forked child
    would inherit the AWS SDK's threads and connections mid-flight (a spawned child starts
    clean, in about a second: it imports the pipeline and the caller's main module)."""
    s3 = any(st.is_s3(f.source) for f in files) or st.s3_filesystem_opened()
    if s3 or "fork" not in get_all_start_methods():
        return get_context("spawn")
    return get_context("fork")


class _InProcess(Executor):
    """`workers=1`: the same code path without a pool (and its start-up)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _outcomes(
    files: Sequence[ImageFile], recipe: imaging.ImageRecipe, storage, opts: ImportOptions
) -> Iterator[tuple[ImageFile, _Outcome]]:
    """Results in the order of `files`, with a bounded number of chunks in flight."""
    workers = opts.pool_size()
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    if workers == 1 or len(chunks) <= 1:
        pool: Executor = _InProcess()
    else:
        pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=_context(files))
    pending: deque[tuple[list[ImageFile], Future]] = deque()
    todo = iter(chunks)
    try:
        for chunk in todo:
            pending.append((chunk, pool.submit(_prepare_chunk, _Task(chunk, recipe, storage))))
            if len(pending) >= 4 * workers:
                break
        while pending:
            chunk, future = pending.popleft()
            results = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_prepare_chunk, _Task(nxt, recipe, storage))))
            yield from zip(chunk, results, strict=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_image_files(
    writer: DatasetWriter,
    items: Sequence[tuple[str, ImageFile, int]],
    opts: ImportOptions,
    *,
    resize: bool = False,
    progress=None,
) -> Manifest:
    """Import (split, file, label) rows in order, then commit. With `resize`, every image is
    resized to the dataset's fixed size. `progress(n)` is called as rows land. A bad file aborts
    the write (nothing is left behind) unless `opts.skip_bad`."""
    spec: ImageSpec = writer.image
    recipe = imaging.ImageRecipe(
        encoding=spec.encoding,
        channels=spec.channels,
        size=(spec.height, spec.width) if resize and spec.fixed_size else None,
        max_side=opts.max_side,
        quality=opts.quality,
    )
    summary = ImportSummary()
    with writer:
        files = [f for _, f, _ in items]
        for (split, f, label), (_, outcome) in zip(
            items, _outcomes(files, recipe, writer.storage, opts), strict=True
        ):
            if outcome.problem is not None:
                if not opts.skip_bad:
                    raise DatasetError(
                        f"{outcome.problem}; fix or remove it, or pass --skip-bad to leave out "
                        "unreadable files"
                    )
                summary.skipped += 1
                if len(summary.skipped_examples) < EXAMPLES:
                    summary.skipped_examples.append(outcome.problem)
            else:
                image = outcome.image
                assert image is not None
                if spec.fixed_size and (image.height, image.width) != (spec.height, spec.width):
                    raise DatasetError(
                        f"{f.describe()}: image is {image.height}x{image.width}, the first was "
                        f"{spec.height}x{spec.width}; pass --size HxW to resize every image"
                        + ("" if spec.encoding == "jpeg" else ", or --encoding jpeg to keep sizes")
                    )
                summary.reencoded += image.reencoded
                writer.add_encoded(split, image, label, f.row_id)
            if progress is not None:
                progress(1)
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
