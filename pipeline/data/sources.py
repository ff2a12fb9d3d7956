"""Sources that become datasets: scikit-learn's bundled digits, an image folder (local or S3), a
CSV/JSONL listing of images, a NumPy file.

Each source assigns rows to splits (stratified and seeded unless the source is already split),
shuffles within each split so every shard mixes classes, and streams rows into a `DatasetWriter`.
Only file paths and labels are held in memory; image files are read, checked and encoded on every
core by `pipeline.data.photos`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.data.photos import (
    ImageFile,
    ImportOptions,
    first_image_size,
    read_source,
    write_image_files,
)
from pipeline.data.shards import DatasetWriter, ImageSpec, Manifest
from pipeline.errors import DatasetError
from pipeline.events import EventSink, WriteProgress

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class WriteOptions:
    """Where and how to write: shared by every source."""

    out: str
    storage: StorageConfig | None = None
    shard_rows: int | None = None
    shard_mb: float = 64.0
    overwrite: bool = False
    encoding: str = "raw"  # "raw" for small images, "png" for large ones, "jpeg" for photos
    on_progress: EventSink | None = None  # gets WriteProgress events (the CLI draws a bar)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign each row to train/val/test keeping class proportions; deterministic per seed."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(idx) * val_fraction)
        n_test = round(len(idx) * test_fraction)
        assignment[idx[:n_test]] = "test"
        assignment[idx[n_test : n_test + n_val]] = "val"
        assignment[idx[n_test + n_val :]] = "train"
    return assignment


class Progress:
    """WriteProgress events for `opts.on_progress`, at most ten a second and always the last."""

    def __init__(self, sink: EventSink | None, description: str, total: int) -> None:
        self.sink, self.description, self.total = sink, description, total
        self.done, self._sent_at = 0, 0.0
        self._send()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.total or time.monotonic() - self._sent_at >= 0.1:
            self._send()

    def _send(self) -> None:
        if self.sink is not None:
            self._sent_at = time.monotonic()
            self.sink(WriteProgress(self.description, self.done, self.total))


def _write_rows(
    opts: WriteOptions,
    *,
    name: str,
    classes: list[str],
    image: ImageSpec,
    source: str,
    rows: Iterable[tuple[str, np.ndarray, int, str]],
    total: int,
) -> Manifest:
    if opts.encoding not in ("raw", "png"):
        raise DatasetError(
            f"encoding must be 'raw' or 'png' for {name} (jpeg keeps JPEG files as given: image "
            f"folders and listings), got {opts.encoding!r}"
        )
    writer = DatasetWriter(
        opts.out,
        name=name,
        classes=classes,
        image=image,
        source=source,
        storage=opts.storage,
        shard_rows=opts.shard_rows,
        shard_mb=opts.shard_mb,
        overwrite=opts.overwrite,
    )
    with writer:
        bar = Progress(opts.on_progress, f"writing {name}", total)
        for split, pixels, label, row_id in rows:
            writer.add(split, pixels, label, row_id)
            bar.advance()
    assert writer.manifest is not None  # set by the commit on leaving the block
    return writer.manifest


def _ordered(assignment: np.ndarray, seed: int) -> Iterator[int]:
    """Row indices grouped by split, shuffled within each split (so shards mix classes)."""
    rng = np.random.default_rng(seed + 1)
    for split in SPLITS:
        yield from rng.permutation(np.flatnonzero(assignment == split)).tolist()


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def prepare_digits(
    opts: WriteOptions, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> Manifest:
    """The 1,797 8x8 greyscale digits bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the full uint8 range so every source looks alike.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    assignment = stratified_split(labels, val_fraction, test_fraction, seed)
    rows = (
        (assignment[i], images[i], int(labels[i]), f"digits-{i:04d}")
        for i in _ordered(assignment, seed)
    )
    return _write_rows(
        opts,
        name="digits",
        classes=[str(d) for d in range(10)],
        image=ImageSpec(encoding=opts.encoding, height=8, width=8, channels=1),
        source=f"sklearn load_digits (seed={seed}, val={val_fraction}, test={test_fraction})",
        rows=rows,
        total=len(labels),
    )


# ---------------------------------------------------------------------------------------------
# Image files: a folder tree SRC/<class>/* or SRC/<split>/<class>/* (local or s3://), or a listing


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except PermissionError:
        raise DatasetError(f"{path}: permission denied; cannot read the source folder") from None
    except NotADirectoryError:
        raise DatasetError(f"{path}: not a directory") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: source folder does not exist") from None


def _raise_walk_error(err: OSError) -> None:
    raise DatasetError(f"{err.filename}: cannot read ({err.strerror}); check permissions") from None


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _local_tree(root: Path) -> tuple[list[str], list[str]]:
    """(image files, directories) under root, as sorted relative POSIX paths."""
    _list_dir(root)  # the clear errors for a missing or unreadable root
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        dirs += [prefix + d for d in dirnames]
        files += [prefix + f for f in sorted(filenames) if _is_image(f)]
    return sorted(files), sorted(dirs)


def _s3_tree(
    root: st.Location, storage: StorageConfig | None, sizes: dict[str, int] | None = None
) -> tuple[list[str], list[str]]:
    """Like `_local_tree`; `sizes` (if given) gets each image's bytes from the listing."""
    st.check_bucket(root.uri, storage)
    try:
        infos = root.fs.get_file_info(
            pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
        )
    except OSError as exc:
        raise DatasetError(f"{root.uri}: cannot list the prefix ({exc})") from None
    if not infos:
        raise DatasetError(f"{root.uri}: no objects under this prefix")
    files, dirs = [], []
    for info in infos:
        rel = info.path[len(root.path) :].strip("/")
        if any(part.startswith(".") for part in rel.split("/")[:-1]):
            continue
        if info.type == pafs.FileType.Directory:
            dirs.append(rel)
        elif _is_image(rel):
            files.append(rel)
            if sizes is not None:
                sizes[rel] = info.size
            parent = rel.rpartition("/")[0]
            while parent:  # S3 has no directories: every prefix of a key is one
                dirs.append(parent)
                parent = parent.rpartition("/")[0]
    return sorted(files), sorted(set(dirs))


def list_images(src: str, storage: StorageConfig | None = None) -> list[str]:
    """Every .png/.jpg/.jpeg under a local folder or an s3:// prefix (hidden folders skipped),
    sorted, as local paths or s3:// URIs: the files `pipeline predict` reads."""
    if st.is_s3(src):
        root = st.resolve(src, storage)
        files, _ = _s3_tree(root, storage)
        return [st.join_uri(root.uri, rel) for rel in files]
    local = Path(src)
    files, _ = _local_tree(local)
    return [str(local / rel) for rel in files]


def _classes_in(files: list[str], dirs: list[str], base: str, where: str) -> dict[str, list[str]]:
    """{class: files} for the class folders directly under `base` ("" or "<split>/")."""
    classes = {d[len(base) :]: [] for d in dirs if d.startswith(base) and "/" not in d[len(base) :]}
    for f in files:
        if f.startswith(base):
            cls, sep, _ = f[len(base) :].partition("/")
            if sep and cls in classes:
                classes[cls].append(f)
    empty = [c for c, fs in classes.items() if not fs]
    if empty:
        raise DatasetError(
            f"{where}/{base}{empty[0]}: class folder has no .png/.jpg/.jpeg images (empty class "
            f"folders: {', '.join(empty)}); add images or remove the folder"
        )
    return classes


def _folder_rows(
    src: str, storage: StorageConfig | None
) -> tuple[list[ImageFile], list[str], list[str], list[str | None]]:
    """(files, their class names, the classes, the given split per file or None)."""
    sizes: dict[str, int] = {}  # an S3 listing's: they plan the shards (local files are stat'ed)
    if st.is_s3(src):
        root = st.resolve(src, storage)
        files, dirs = _s3_tree(root, storage, sizes)
        where = root.uri

        def source(rel: str) -> str:
            return st.join_uri(root.uri, rel)
    else:
        local = Path(src)
        files, dirs = _local_tree(local)
        where = str(local)

        def source(rel: str) -> str:
            return str(local / rel)

    top = {d for d in dirs if "/" not in d}
    presplit = "train" in top
    bases = [f"{s}/" for s in SPLITS if s in top] if presplit else [""]
    out: list[ImageFile] = []
    names: list[str] = []
    given: list[str | None] = []
    for base in bases:
        for cls, paths in _classes_in(files, dirs, base, where).items():
            out += [ImageFile(source(p), p, size=sizes.get(p)) for p in paths]
            names += [cls] * len(paths)
            given += [base.rstrip("/") or None] * len(paths)
    if not names:
        raise DatasetError(
            f"{where}: no class subfolders with images found; expected SRC/<class>/<image>.jpg "
            "(or SRC/train/<class>/...)"
        )
    classes = sorted(set(names))
    return out, names, classes, given


def _check_encoding(opts: WriteOptions) -> None:
    if opts.encoding not in ("raw", "png", "jpeg"):
        raise DatasetError(f"encoding must be 'raw', 'png' or 'jpeg', got {opts.encoding!r}")


def _import_files(
    opts: WriteOptions,
    images: ImportOptions,
    *,
    name: str,
    source: str,
    files: list[ImageFile],
    names: list[str],
    given: list[str | None],
    size: tuple[int, int] | None,
    grayscale: bool,
    split: tuple[float, float, int],
) -> Manifest:
    _check_encoding(opts)
    classes = sorted(set(names))
    labels = np.asarray([classes.index(n) for n in names], dtype=np.int64)
    val_fraction, test_fraction, seed = split
    if any(g is not None for g in given):
        assignment = np.asarray([g or "train" for g in given], dtype=object)
    else:
        assignment = stratified_split(labels, val_fraction, test_fraction, seed)
    channels = 1 if grayscale else 3
    if size is not None:
        height, width = size
    elif opts.encoding == "jpeg":
        height = width = None  # mixed sizes
    else:
        height, width = _first_size(files, opts.storage, images.skip_bad)
    writer = DatasetWriter(
        opts.out,
        name=name,
        classes=classes,
        image=ImageSpec(encoding=opts.encoding, height=height, width=width, channels=channels),
        source=source,
        storage=opts.storage,
        shard_rows=opts.shard_rows,
        shard_mb=opts.shard_mb,
        overwrite=opts.overwrite,
    )
    items = [(assignment[i], files[i], int(labels[i])) for i in _ordered(assignment, seed)]
    bar = Progress(
        opts.on_progress, f"importing {name} ({images.pool_size()} processes)", len(items)
    )
    return write_image_files(writer, items, images, resize=size is not None, progress=bar.advance)


def _first_size(
    files: list[ImageFile], storage: StorageConfig | None, skip_bad: bool
) -> tuple[int, int]:
    """The fixed size of a png/raw dataset: the first (readable, with skip_bad) file's."""
    for f in files:
        try:
            return first_image_size(f, storage)
        except DatasetError:
            if not skip_bad or f is files[-1]:
                raise
    raise AssertionError("unreachable: files is never empty here")


def import_image_folder(
    src: str | Path,
    opts: WriteOptions,
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    images: ImportOptions | None = None,
) -> Manifest:
    """Import a class-per-subfolder tree of PNG/JPEG files (a local folder or an s3:// prefix),
    on every core (`images.workers`).

    With `encoding="jpeg"` JPEGs are stored as given and sizes may differ; with png/raw every image
    must have the first image's size unless `size` resizes them all. If SRC holds train/ (and
    val/, test/) folders, those are the splits; otherwise a stratified split is drawn. An empty
    class folder is refused.
    """
    files, names, _, given = _folder_rows(str(src), opts.storage)
    root = str(src).rstrip("/")
    name = root.rsplit("/", 1)[-1] if st.is_s3(root) else Path(root).resolve().name
    shown = root if st.is_s3(root) else str(Path(root).resolve())
    return _import_files(
        opts,
        images or ImportOptions(),
        name=name,
        source=f"image-folder {shown} (seed={seed})",
        files=files,
        names=names,
        given=given,
        size=size,
        grayscale=grayscale,
        split=(val_fraction, test_fraction, seed),
    )


def _listing_records(listing: str, text: str) -> Iterator[tuple[int, dict]]:
    if listing.lower().endswith((".jsonl", ".ndjson")):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{listing} line {n}: not valid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise DatasetError(f"{listing} line {n}: expected an object with path, label")
                yield n, record
    elif listing.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(
                f"{listing}: the first line must be a header with path and label columns "
                f"(and optionally split); got {reader.fieldnames}"
            )
        for record in reader:
            yield reader.line_num, record
    else:
        raise DatasetError(f"{listing}: a listing must be .csv or .jsonl (path,label[,split])")


def _label(listing: str, n: int, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise DatasetError(
            f"{listing} line {n}: bad label {value!r}; a label is a non-empty class name "
            "(or an integer)"
        )
    return str(value).strip()


def import_listing(
    listing: str | Path,
    opts: WriteOptions,
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    images: ImportOptions | None = None,
) -> Manifest:
    """Import the images a CSV (`path,label[,split]` header) or JSONL (`{"path", "label"[,
    "split"]}` per line) listing names. Paths are local, s3:// or relative to the listing; the
    classes are the sorted distinct labels; a `split` column, when given, decides the splits."""
    listing = str(listing)
    try:
        text = read_source(listing, opts.storage).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{listing}: listing file not found") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{listing}: not UTF-8 text") from None
    if st.is_s3(listing):
        base = listing.rsplit("/", 1)[0]

        def source(p: str) -> str:
            return p if st.is_s3(p) else st.join_uri(base, p)
    else:
        base_dir = Path(listing).resolve().parent

        def source(p: str) -> str:
            return p if st.is_s3(p) else str(base_dir / p)

    files: list[ImageFile] = []
    names: list[str] = []
    given: list[str | None] = []
    for n, record in _listing_records(listing, text):
        path = record.get("path")
        if not isinstance(path, str) or not path.strip():
            raise DatasetError(f"{listing} line {n}: missing path")
        names.append(_label(listing, n, record.get("label")))
        split = record.get("split") or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{listing} line {n}: split {split!r} is not one of {SPLITS}")
        given.append(split)
        files.append(ImageFile(source(path.strip()), path.strip(), f"{listing} line {n}"))
    if not files:
        raise DatasetError(f"{listing}: lists no images")
    if any(g is None for g in given) and any(g is not None for g in given):
        raise DatasetError(f"{listing}: give a split for every row or for none")
    name = PurePosixPath(listing.replace("\\", "/")).stem
    return _import_files(
        opts,
        images or ImportOptions(),
        name=name,
        source=f"listing {listing if st.is_s3(listing) else Path(listing).resolve()} (seed={seed})",
        files=files,
        names=names,
        given=given,
        size=size,
        grayscale=grayscale,
        split=(val_fraction, test_fraction, seed),
    )


# ---------------------------------------------------------------------------------------------
# NumPy: x/y (or images/labels), or x_train/y_train/x_val/... already split


def _as_nhwc_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DatasetError(
            f"{where}: expected images shaped (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}"
        )
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))
    if x.shape[-1] not in (1, 3):
        raise DatasetError(f"{where}: images need 1 or 3 channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
            raise DatasetError(f"{where}: float images must be in [0, 1]; got other values")
        return np.round(x * 255).astype(np.uint8)
    raise DatasetError(f"{where}: unsupported pixel dtype {x.dtype}; use uint8 or float in [0, 1]")


def _array(npz: Any, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise DatasetError(
            f"{path}[{key}]: not a plain numeric array ({exc}); pickled object arrays are never "
            "loaded: save uint8 images and integer labels"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}[{key}]: cannot be read ({exc})") from None


def import_numpy(
    path: str | Path,
    opts: WriteOptions,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Manifest:
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    if not hasattr(npz, "files"):  # a plain .npy: one array, no names
        raise DatasetError(
            f"{path}: a single .npy array, not an .npz; save images and labels together with "
            "np.savez(path, x=images, y=labels)"
        )
    keys = set(npz.files)
    if {"x_train", "y_train"} <= keys:
        parts = {s: (f"x_{s}", f"y_{s}") for s in SPLITS if f"x_{s}" in keys}
        unpaired = [f"x_{s}" for s in parts if f"y_{s}" not in keys]
        if unpaired:
            raise DatasetError(
                f"{path}: {', '.join(unpaired)} without its labels "
                f"({', '.join('y' + k[1:] for k in unpaired)}); every x_<split> needs y_<split>"
            )
    else:
        xk = next((k for k in ("x", "images") if k in keys), None)
        yk = next((k for k in ("y", "labels") if k in keys), None)
        if xk is None or yk is None:
            raise DatasetError(
                f"{path}: expected arrays x and y (or images and labels, or x_train/y_train/...); "
                f"found {sorted(keys)}"
            )
        parts = {"all": (xk, yk)}
    xs, ys, splits = [], [], []
    for split, (xk, yk) in parts.items():
        x = _as_nhwc_uint8(_array(npz, xk, path), f"{path}[{xk}]")
        y = np.asarray(_array(npz, yk, path))
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"{path}[{yk}]: labels must be 1-D integers, one per image")
        xs.append(x)
        ys.append(y.astype(np.int64))
        splits += [split] * len(y)
    images, labels = np.concatenate(xs), np.concatenate(ys)
    if "classes" in keys:
        classes = [str(c) for c in npz["classes"].tolist()]
    else:
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.size else []
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(f"{path}: labels must be in 0..{len(classes) - 1}")
    assignment = (
        stratified_split(labels, val_fraction, test_fraction, seed)
        if "all" in parts
        else np.asarray(splits, dtype=object)
    )
    rows = (
        (assignment[i], images[i], int(labels[i]), f"{path.stem}-{i:06d}")
        for i in _ordered(assignment, seed)
    )
    return _write_rows(
        opts,
        name=path.stem,
        classes=classes,
        image=ImageSpec(
            encoding=opts.encoding,
            height=images.shape[1],
            width=images.shape[2],
            channels=images.shape[3],
        ),
        source=f"numpy {path.resolve()} (seed={seed})",
        rows=rows,
        total=len(labels),
    )
