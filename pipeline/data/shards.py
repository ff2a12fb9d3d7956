"""The dataset format: Parquet shards per split plus a manifest written last.

Layout: `<root>/<split>/part-NNNNN.parquet` and `<root>/manifest.json`. Columns: `image` (binary:
JPEG bytes as given, PNG bytes, or raw uint8 pixels in HWC order with the shape recorded in the
manifest), `label` (int64), `id` (string). The manifest is the commit marker: a dataset without one
does not exist. Shard paths in a manifest are `<split>/part-NNNNN[-id].parquet`: a manifest naming
anything else (`..`, an absolute path) is refused, so no reader or clean-up leaves the dataset.

Format versions: 1 is a fixed image size in `raw` or `png`; 2 adds `jpeg` and mixed image sizes
(`image.height`/`width` unset, per-split size statistics instead). A dataset that version 1 can
describe is written as version 1, so older readers keep reading what they could before.

Writes are all-or-nothing. Locally the whole dataset is written into a hidden staging directory
beside the target and renamed into place. On S3 (no rename) the shards go under the final prefix
with a per-write suffix (`part-NNNNN-<write id>.parquet`), so they never clash with a dataset being
replaced; the manifest is uploaded last, then the replaced dataset's shards are deleted. An aborted
write deletes what it wrote and leaves any previous dataset untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.data import imaging
from pipeline.errors import DatasetError

SCHEMA_VERSION = 2  # the newest this code reads and writes; see the module docstring
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
    ]
)


SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SHARD_NAME = re.compile(r"part-[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.parquet")  # no "/" or ".."


class ShardInfo(BaseModel):
    path: str  # relative to the dataset root, e.g. "train/part-00000.parquet"
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SizeStats(BaseModel):
    """Image sizes in one split of a mixed-size dataset (pixels, after EXIF orientation)."""

    min_height: int
    median_height: int
    max_height: int
    min_width: int
    median_width: int
    max_width: int

    @classmethod
    def of(cls, heights: list[int], widths: list[int]) -> SizeStats:
        h, w = np.asarray(heights), np.asarray(widths)
        return cls(
            min_height=int(h.min()),
            median_height=int(np.median(h)),
            max_height=int(h.max()),
            min_width=int(w.min()),
            median_width=int(np.median(w)),
            max_width=int(w.max()),
        )


class SplitInfo(BaseModel):
    rows: int = Field(ge=0)
    class_counts: list[int]
    shards: list[ShardInfo]
    sizes: SizeStats | None = None  # mixed-size datasets only


class ImageSpec(BaseModel):
    encoding: Literal["raw", "png", "jpeg"]
    height: int | None = Field(None, ge=1)  # None (with width): sizes vary, see SplitInfo.sizes
    width: int | None = Field(None, ge=1)
    channels: Literal[1, 3]
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["HWC"] = "HWC"  # raw pixel order

    @model_validator(mode="after")
    def _size_is_fixed_or_mixed(self) -> ImageSpec:
        if (self.height is None) != (self.width is None):
            raise ValueError("height and width are both set (fixed size) or both unset (mixed)")
        if self.encoding == "raw" and self.height is None:
            raise ValueError("raw pixels need a fixed height and width")
        return self

    @property
    def fixed_size(self) -> bool:
        return self.height is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W), the order models see. Mixed-size datasets have none: a crop gives it."""
        if self.height is None or self.width is None:
            raise DatasetError(
                "the dataset's images have mixed sizes, so there is no one image shape; "
                "set data.crop (RandomResizedCrop / CenterCrop size) to train or evaluate on it"
            )
        return (self.channels, self.height, self.width)

    @property
    def raw_size(self) -> int:
        c, h, w = self.shape
        return h * w * c

    def describe(self) -> str:
        """`3x224x224 (png)` or `3 channels, mixed sizes (jpeg)`: for listings."""
        if self.fixed_size:
            return f"{self.channels}x{self.height}x{self.width} ({self.encoding})"
        return f"{self.channels} channel(s), mixed sizes ({self.encoding})"

    @property
    def format_version(self) -> int:
        """The oldest manifest version that can describe these images."""
        return 1 if self.fixed_size and self.encoding in ("raw", "png") else 2


class Normalization(BaseModel):
    mean: list[float]  # per channel, pixels scaled to [0, 1], over the train split
    std: list[float]


class ImportSummary(BaseModel):
    """What an import left out or changed: printed by the CLI, kept for the record."""

    skipped: int = 0  # unreadable files left out with --skip-bad
    skipped_examples: list[str] = []  # the first few, with the reason
    reencoded: int = 0  # images converted (CMYK, EXIF rotation, resize) rather than kept as given


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    created_at: str
    source: str
    classes: list[str]
    image: ImageSpec
    splits: dict[str, SplitInfo]
    normalization: Normalization
    digest: str
    imported: ImportSummary | None = None

    @model_validator(mode="after")
    def _shards_stay_inside(self) -> Manifest:
        for split, info in self.splits.items():
            if not SPLIT_NAME.fullmatch(split):
                raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
            for shard in info.shards:
                check_shard_path(split, shard.path)
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self, split: str) -> list[str]:
        return [s.path for s in self.split(split).shards]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(
                f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]


def check_shard_path(split: str, path: str) -> None:
    """A shard path must be `<split>/part-<name>.parquet` (the pipeline writes part-NNNNN and
    part-NNNNN-<id>; appended shards may name themselves): one file directly in its split's
    folder, never `..`, never absolute."""
    head, _, name = path.partition("/")
    if head != split or not SHARD_NAME.fullmatch(name):
        raise ValueError(
            f"shard path {path!r} is not {split}/part-NNNNN.parquet inside the dataset "
            "(a manifest may not point outside its dataset); re-create the dataset"
        )


def dataset_digest(splits: dict[str, SplitInfo]) -> str:
    """Hash of the shard hashes: equal digests mean byte-identical shards."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for shard in splits[split].shards:  # shard order is row order, so it counts
            h.update(f"{split}:{shard.sha256}:{shard.rows}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Pixels <-> bytes


def to_hwc_uint8(image: np.ndarray, channels: int) -> np.ndarray:
    """Accept HW, HWC; return a contiguous HWC uint8 array with `channels` channels."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an HW or HWC image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.shape[2] != channels:
        raise ValueError(f"expected {channels} channel(s), got {image.shape[2]}")
    return np.ascontiguousarray(image)


def encode_image(image: np.ndarray, spec: ImageSpec) -> bytes:
    if spec.encoding == "raw":
        return image.tobytes()
    if spec.encoding == "jpeg":
        raise ValueError("JPEG datasets store encoded files: import them (pipeline.data.photos)")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if spec.channels == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def decode_images(blobs: list[bytes], spec: ImageSpec) -> np.ndarray:
    """Encoded column -> (N, H, W, C) uint8 for a fixed-size dataset. Raises ValueError on a blob
    that does not decode (mixed-size datasets are decoded one image at a time: `decode_one`)."""
    n = len(blobs)
    if not spec.fixed_size:
        raise ValueError("mixed-size images do not stack into one array; decode them one by one")
    if spec.encoding == "raw":
        sizes = {len(b) for b in blobs}
        if sizes - {spec.raw_size}:
            raise ValueError(
                f"raw image of {sorted(sizes - {spec.raw_size})[0]} bytes; the manifest says "
                f"{spec.height}x{spec.width}x{spec.channels} = {spec.raw_size} bytes"
            )
        flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        return flat.reshape(n, spec.height, spec.width, spec.channels)
    out = np.empty((n, spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        arr = decode_one(blob, spec, i)
        if arr.shape[:2] != (spec.height, spec.width):
            raise ValueError(
                f"row {i}: image is {arr.shape[0]}x{arr.shape[1]}, manifest says "
                f"{spec.height}x{spec.width}"
            )
        out[i] = arr
    return out


def decode_one(blob: bytes, spec: ImageSpec, row: int) -> np.ndarray:
    """One PNG/JPEG -> HWC uint8; ValueError naming the row when it does not decode."""
    try:
        return imaging.decode(blob, spec.channels)
    except imaging.ImageDecodeError as exc:
        raise ValueError(f"row {row}: {spec.encoding.upper()} {exc}") from None


# ---------------------------------------------------------------------------------------------
# Writing


def shard_rel(split: str, stem: str, suffix: str = "") -> str:
    """A shard's path inside its dataset: `<split>/part-<stem><suffix>.parquet`."""
    return f"{split}/part-{stem}{suffix}.parquet"


def write_shard(
    root: st.Location, rel: str, rows: list[tuple[bytes, int, str]], encoding: str
) -> ShardInfo:
    """Write (image, label, id) rows as one Parquet shard under `root`, atomically; its size and
    sha256 go into the manifest. PNG and JPEG bytes are stored uncompressed (they are already),
    raw pixels with zstd. The encoded file is hashed and written from Arrow's buffer (no copy)."""
    table = pa.table(
        {
            "image": pa.array([r[0] for r in rows], pa.binary()),
            "label": pa.array([r[1] for r in rows], pa.int64()),
            "id": pa.array([r[2] for r in rows], pa.string()),
        },
        schema=SCHEMA,
    )
    sink = pa.BufferOutputStream()
    compression = "zstd" if encoding == "raw" else "none"
    pq.write_table(table, sink, compression=compression, row_group_size=4096)
    data = memoryview(sink.getvalue())
    st.write_bytes_atomic(root.join(rel), data)
    return ShardInfo(
        path=rel, rows=len(rows), bytes=data.nbytes, sha256=hashlib.sha256(data).hexdigest()
    )


class DatasetWriter:
    """Streams rows into shards and commits the dataset with its manifest.

    Use as a context manager: leaving the block normally commits; an exception (or Ctrl-C) aborts
    and removes everything written, so no partial dataset is ever visible.
    """

    def __init__(
        self,
        uri: str,
        *,
        name: str,
        classes: list[str],
        image: ImageSpec,
        source: str,
        storage: StorageConfig | None = None,
        shard_rows: int | None = None,
        shard_mb: float = 64.0,
        overwrite: bool = False,
    ) -> None:
        if not classes:
            raise DatasetError(f"{uri}: a dataset needs at least one class")
        if shard_rows is not None and shard_rows < 1:
            raise DatasetError(f"shard_rows must be >= 1, got {shard_rows}")
        if shard_mb <= 0:
            raise DatasetError(f"shard_mb must be > 0, got {shard_mb}")
        self.target = st.resolve(uri, storage)
        self.name, self.classes, self.image, self.source = name, list(classes), image, source
        self.storage = storage
        self.shard_rows, self.shard_bytes = shard_rows, int(shard_mb * 1024 * 1024)
        self.overwrite = overwrite
        self._buffers: dict[str, list[tuple[bytes, int, str]]] = {}
        self._buffer_bytes: dict[str, int] = {}
        self._splits: dict[str, SplitInfo] = {}
        self._sum = np.zeros(image.channels)
        self._sumsq = np.zeros(image.channels)
        self._pixels = 0
        self._heights: dict[str, array] = {}
        self._widths: dict[str, array] = {}
        self.imported: ImportSummary | None = None  # set by an importer before the commit
        self.manifest: Manifest | None = None
        self._write_id = uuid.uuid4().hex[:8]
        self._replaced: Manifest | None = None
        self._written: list[str] = []  # shard paths under `root`, deleted by an abort
        self._prepare_target()

    # -- target handling ------------------------------------------------------------------------
    def _prepare_target(self) -> None:
        if self.target.is_s3:
            st.check_bucket(self.target.uri, self.storage)
        manifest = self.target.join(MANIFEST)
        if st.exists(manifest):
            if not self.overwrite:
                raise DatasetError(
                    f"{self.target.uri}: a dataset already exists here; pass --overwrite to "
                    "replace it or choose another --out"
                )
            # Read (and so check) what is being replaced: clean-up deletes only the shards it
            # lists, and a manifest pointing outside its dataset is refused here.
            self._replaced = read_manifest(self.target.uri, self.storage)
            if not self.target.is_s3:
                _check_only_pipeline_files(Path(self.target.path), self._replaced)
        elif not self.target.is_s3 and _non_empty_dir(Path(self.target.path)):
            raise DatasetError(
                f"{self.target.uri}: exists, is not empty and holds no dataset; choose another "
                "--out (the pipeline replaces only datasets it wrote)"
            )
        if self.target.is_s3:
            self.root = self.target
        else:
            parent = Path(self.target.path).parent
            parent.mkdir(parents=True, exist_ok=True)
            staging = parent / f".{Path(self.target.path).name}.staging-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            self.root = st.Location(self.target.fs, str(staging), str(staging))

    def add(self, split: str, image: np.ndarray, label: int, row_id: str) -> None:
        self._check_label(label, row_id)
        self._check_size(row_id, *image.shape[:2])
        pixels = to_hwc_uint8(image, self.image.channels)
        if split == "train":
            x = pixels.reshape(-1, self.image.channels).astype(np.float64) / 255.0
            self._sum += x.sum(0)
            self._sumsq += (x * x).sum(0)
            self._pixels += x.shape[0]
        self._append(split, encode_image(pixels, self.image), label, row_id)

    def _check_label(self, label: int, row_id: str) -> None:
        if not 0 <= label < len(self.classes):
            raise DatasetError(
                f"row {row_id!r}: label {label} is out of range for {len(self.classes)} classes"
            )

    def _check_size(self, row_id: str, h: int, w: int) -> None:
        if self.image.fixed_size and (h, w) != (self.image.height, self.image.width):
            raise DatasetError(
                f"row {row_id!r}: image is {h}x{w}, the dataset is "
                f"{self.image.height}x{self.image.width}; resize it first (--size)"
            )

    def _append(self, split: str, blob: bytes, label: int, row_id: str) -> None:
        self._buffers.setdefault(split, []).append((blob, int(label), str(row_id)))
        self._buffer_bytes[split] = self._buffer_bytes.get(split, 0) + len(blob)
        full_rows = self.shard_rows is not None and len(self._buffers[split]) >= self.shard_rows
        if full_rows or self._buffer_bytes[split] >= self.shard_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._buffers.get(split) or []
        if not rows:
            return
        index = len(self._splits[split].shards) if split in self._splits else 0
        rel = shard_rel(split, f"{index:05d}", self.shard_suffix)
        self._written.append(rel)
        shard = write_shard(self.root, rel, rows, self.image.encoding)
        self.add_shards(split, [shard], [label for _, label, _ in rows])
        self._buffers[split] = []
        self._buffer_bytes[split] = 0

    # -- shards written elsewhere (the image importer's worker processes) ------------------------
    @property
    def shard_root(self) -> str:
        """Where shards go until the commit: the staging directory, or the S3 target."""
        return self.root.uri

    @property
    def shard_suffix(self) -> str:
        return f"-{self._write_id}" if self.target.is_s3 else ""

    def adopt(self, shards: list[ShardInfo]) -> None:
        """Shards written into `shard_root` by another process: deleted if the write aborts."""
        self._written += [s.path for s in shards]

    def add_shards(
        self,
        split: str,
        shards: list[ShardInfo],
        labels: list[int],
        stats: tuple[np.ndarray, np.ndarray, int] | None = None,
        sizes: tuple[list[int], list[int]] | None = None,
    ) -> None:
        """Record written shards in order: their rows' labels, the train split's pixel sums
        (`stats`: sum, sum of squares, pixels) and a mixed-size dataset's (heights, widths)."""
        if not shards:
            return
        info = self._splits.setdefault(
            split, SplitInfo(rows=0, class_counts=[0] * len(self.classes), shards=[])
        )
        if sum(s.rows for s in shards) != len(labels):
            raise AssertionError("every row of a shard needs its label")
        info.shards += shards
        info.rows += len(labels)
        for label in labels:
            info.class_counts[label] += 1
        if stats is not None and split == "train":
            self._sum += stats[0]
            self._sumsq += stats[1]
            self._pixels += stats[2]
        if sizes is not None and not self.image.fixed_size:
            self._heights.setdefault(split, array("I")).extend(sizes[0])
            self._widths.setdefault(split, array("I")).extend(sizes[1])

    # -- commit / abort -------------------------------------------------------------------------
    def commit(self) -> Manifest:
        for split in list(self._buffers):
            self._flush(split)
        empty = [s for s, info in self._splits.items() if info.rows == 0]
        if not self._splits or empty:
            raise DatasetError(f"{self.target.uri}: no rows were written for split(s) {empty}")
        if "train" not in self._splits:
            raise DatasetError(f"{self.target.uri}: the dataset has no 'train' split")
        self._settle_sizes()
        mean = self._sum / max(self._pixels, 1)
        std = np.sqrt(np.maximum(self._sumsq / max(self._pixels, 1) - mean**2, 1e-12))
        manifest = Manifest(
            schema_version=self.image.format_version,
            name=self.name,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=self.source,
            classes=self.classes,
            image=self.image,
            splits=self._splits,
            normalization=Normalization(
                mean=[round(float(m), 6) for m in mean], std=[round(float(s), 6) for s in std]
            ),
            digest=dataset_digest(self._splits),
            imported=self.imported,
        )
        blob = manifest.model_dump_json(indent=2, exclude_none=True).encode()
        st.write_bytes_atomic(self.root.join(MANIFEST), blob)  # the commit marker, last
        if self.target.is_s3:
            # Committed the moment the manifest landed: nothing after this may undo the write,
            # not even an error or Ctrl-C while the replaced dataset's shards are deleted.
            self.manifest = manifest
            self._delete_replaced_shards(manifest)
        else:
            self._swap_into_place()
            self.manifest = manifest
        return manifest

    def _settle_sizes(self) -> None:
        """Mixed-size datasets get per-split size statistics; one whose images all turned out the
        same size is recorded as fixed-size, so the fixed-size paths can use it."""
        sizes = {
            (h, w)
            for split in self._heights
            for h, w in zip(self._heights[split], self._widths[split], strict=True)
        }
        if len(sizes) == 1:
            (h, w) = sizes.pop()
            self.image = self.image.model_copy(update={"height": h, "width": w})
            return
        for split, heights in self._heights.items():
            self._splits[split].sizes = SizeStats.of(heights.tolist(), self._widths[split].tolist())

    def _swap_into_place(self) -> None:
        final = Path(self.target.path)
        old = None
        if final.exists():
            if not self.overwrite and any(final.iterdir()):
                raise DatasetError(
                    f"{final}: exists and is not empty; pass --overwrite or choose another --out"
                )
            if self._replaced is not None:  # checked again: nothing else may have arrived
                _check_only_pipeline_files(final, self._replaced)
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(self.root.path, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _delete_replaced_shards(self, manifest: Manifest) -> None:
        """Best effort, after the commit: a shard left behind is invisible to readers (no
        manifest lists it), so a failure here is a warning, never an error."""
        if self._replaced is None:
            return
        keep = {s.path for info in manifest.splits.values() for s in info.shards}
        for info in self._replaced.splits.values():
            for shard in info.shards:
                if shard.path not in keep:
                    check_shard_path(shard.path.partition("/")[0], shard.path)  # never outside
                    _delete_quietly(self.root.join(shard.path))

    def abort(self) -> None:
        if self.manifest is not None:
            return
        if self.target.is_s3:
            for rel in self._written:
                _delete_quietly(self.root.join(rel))
            if self._replaced is None:  # drop the directory markers pyarrow leaves behind
                for split in sorted({rel.partition("/")[0] for rel in self._written}):
                    _delete_quietly(self.root.join(split), directory=True)
                _delete_quietly(self.root, directory=True)
        else:
            shutil.rmtree(self.root.path, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.manifest is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        elif exc_type is not None:
            self.abort()


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_only_pipeline_files(root: Path, manifest: Manifest) -> None:
    """Refuse to replace a local dataset directory that holds files the pipeline did not write:
    the swap deletes the old directory as a whole."""
    ours = {MANIFEST} | {s.path for info in manifest.splits.values() for s in info.shards}
    foreign = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in ours and not _LEFTOVER_TMP.search(name):
                foreign.append(rel)
    if foreign:
        raise DatasetError(
            f"{root}: holds files the pipeline did not write ({', '.join(sorted(foreign)[:5])}); "
            "--overwrite replaces only a dataset's own files: move them away or choose another "
            "--out"
        )


_LEFTOVER_TMP = re.compile(r"\.tmp-[0-9a-f]{8}$")  # an interrupted write_bytes_atomic


def _delete_quietly(loc: st.Location, directory: bool = False) -> None:
    """Best-effort clean-up: without a manifest, leftovers are invisible to readers anyway."""
    with contextlib.suppress(OSError):
        if directory:
            # Only an empty directory (a marker): never delete someone else's files.
            if not loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)):
                loc.fs.delete_dir(loc.path)
        else:
            loc.fs.delete_file(loc.path)


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(uri: str, storage: StorageConfig | None = None) -> Manifest:
    """Load and check a dataset's manifest; errors say what is wrong and what to do."""
    root = st.resolve(uri, storage)
    if root.is_s3:
        st.check_bucket(root.uri, storage)
    loc = root.join(MANIFEST)
    if not st.exists(loc):
        raise DatasetError(
            f"{root.uri}: no {MANIFEST} here, so this is not a dataset (or its write did not "
            "finish); create one with `pipeline data prepare digits --out URI` or "
            "`pipeline data import ...`"
        )
    raw = st.read_bytes(loc)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{loc.uri}: not valid JSON ({exc}); re-create the dataset") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_VERSIONS:
        raise DatasetError(
            f"{loc.uri}: schema_version {version!r} is not supported (this pipeline reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade the pipeline or re-create the "
            "dataset"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise DatasetError(f"{loc.uri}: invalid manifest field {field}: {first['msg']}") from None


def shard_location(uri: str, shard: ShardInfo, storage: StorageConfig | None = None) -> st.Location:
    return st.resolve(uri, storage).join(shard.path)


def read_shard(loc: st.Location) -> pa.Table:
    """Read one shard, turning pyarrow's errors into ones that name the file."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.read_table(f)
    except FileNotFoundError:
        raise DatasetError(f"{loc.uri}: shard is missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{loc.uri}: not a readable Parquet file ({exc})") from None
