"""Sources that become datasets: scikit-learn's bundled digits, an image folder, a NumPy file.

Each source assigns rows to splits (stratified and seeded unless the source is already split),
shuffles within each split so every shard mixes classes, and streams rows into a `DatasetWriter`.
Only file paths and labels are held in memory; pixels are read one image at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.config import StorageConfig
from pipeline.data.shards import DatasetWriter, ImageSpec, Manifest
from pipeline.errors import DatasetError

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
    encoding: str = "raw"  # "raw" for small images, "png" for large ones
    progress: bool = False


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


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


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
        raise DatasetError(f"encoding must be 'raw' or 'png', got {opts.encoding!r}")
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
    with writer, _progress(opts.progress) as bar:
        task = bar.add_task(f"writing {name}", total=total)
        for split, pixels, label, row_id in rows:
            writer.add(split, pixels, label, row_id)
            bar.advance(task)
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
# Image folder: SRC/<class>/*.png, or SRC/<split>/<class>/*.png


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except PermissionError:
        raise DatasetError(f"{path}: permission denied; cannot read the source folder") from None
    except NotADirectoryError:
        raise DatasetError(f"{path}: not a directory") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: source folder does not exist") from None


def _scan_classes(root: Path) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for sub in _list_dir(root):
        if sub.is_dir() and not sub.name.startswith("."):
            files = []
            for dirpath, dirnames, filenames in os.walk(sub, onerror=_raise_walk_error):
                dirnames.sort()
                files += [
                    Path(dirpath, f)
                    for f in sorted(filenames)
                    if Path(f).suffix.lower() in IMAGE_SUFFIXES
                ]
            classes[sub.name] = files
    return classes


def _raise_walk_error(err: OSError) -> None:
    raise DatasetError(f"{err.filename}: cannot read ({err.strerror}); check permissions") from None


def _load_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a decodable image ({exc})") from None


def import_image_folder(
    src: str | Path,
    opts: WriteOptions,
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Manifest:
    """Import a class-per-subfolder tree of PNG/JPEG files of any size.

    Without `size`, every image must have the first image's size. If SRC holds train/ (and val/,
    test/) folders, those are the splits; otherwise a stratified split is drawn.
    """
    root = Path(src)
    entries = {p.name for p in _list_dir(root)}
    presplit = "train" in entries and (root / "train").is_dir()
    files: list[Path] = []
    labels: list[int] = []
    given: list[str] = []
    if presplit:
        per_split = {s: _scan_classes(root / s) for s in SPLITS if (root / s).is_dir()}
        classes = sorted(set().union(*(c.keys() for c in per_split.values())))
        for split, by_class in per_split.items():
            for cls, paths in by_class.items():
                files += paths
                labels += [classes.index(cls)] * len(paths)
                given += [split] * len(paths)
    else:
        by_class = _scan_classes(root)
        classes = sorted(by_class)
        for cls in classes:
            files += by_class[cls]
            labels += [classes.index(cls)] * len(by_class[cls])
    if not classes:
        raise DatasetError(f"{root}: no class subfolders found; expected SRC/<class>/<image>.png")
    if not files:
        raise DatasetError(f"{root}: no .png/.jpg/.jpeg files found under the class folders")
    label_arr = np.asarray(labels, dtype=np.int64)
    assignment = (
        np.asarray(given, dtype=object)
        if presplit
        else stratified_split(label_arr, val_fraction, test_fraction, seed)
    )
    mode = "L" if grayscale else "RGB"
    first = _load_image(files[0], mode, size)
    height, width = first.shape[:2]

    def rows() -> Iterator[tuple[str, np.ndarray, int, str]]:
        for i in _ordered(assignment, seed):
            pixels = _load_image(files[i], mode, size)
            if pixels.shape[:2] != (height, width):
                raise DatasetError(
                    f"{files[i]}: image is {pixels.shape[0]}x{pixels.shape[1]}, the first was "
                    f"{height}x{width}; pass --size HxW to resize every image"
                )
            yield assignment[i], pixels, int(label_arr[i]), str(files[i].relative_to(root))

    return _write_rows(
        opts,
        name=root.resolve().name,
        classes=classes,
        image=ImageSpec(
            encoding=opts.encoding, height=height, width=width, channels=1 if grayscale else 3
        ),
        source=f"image-folder {root.resolve()} (seed={seed})",
        rows=rows(),
        total=len(files),
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
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    keys = set(npz.files)
    if {"x_train", "y_train"} <= keys:
        parts = {s: (f"x_{s}", f"y_{s}") for s in SPLITS if f"x_{s}" in keys}
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
        x = _as_nhwc_uint8(npz[xk], f"{path}[{xk}]")
        y = np.asarray(npz[yk])
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
