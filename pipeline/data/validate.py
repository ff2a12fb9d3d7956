"""Re-check a dataset against its manifest and report every problem, one line each.

`validate_dataset` is the deep check behind `pipeline data validate` (reads every byte: existence,
size, sha256, Parquet schema, row counts, decodable images, labels in range, digest).
`check_shards_present` is the cheap check run before training (existence and size only), and
`ensure_dataset` the whole of it: the manifest, its shards and the configured splits, after
creating the bundled digits when configured and absent. It imports no torch: `pipeline train`
runs it before it starts anything else.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import PipelineConfig, StorageConfig
from pipeline.data.shards import (
    SCHEMA,
    Manifest,
    ShardInfo,
    dataset_digest,
    decode_images,
    decode_one,
    read_manifest,
)
from pipeline.errors import DatasetError

log = logging.getLogger(__name__)


def validate_dataset(
    uri: str, storage: StorageConfig | None = None
) -> tuple[Manifest | None, list[str]]:
    """Return (manifest, problems); an empty list means the dataset is intact."""
    try:
        manifest = read_manifest(uri, storage)
    except DatasetError as exc:  # storage errors (credentials, endpoint) propagate: not the data's
        return None, [str(exc)]
    root = st.resolve(uri, storage)
    problems: list[str] = []
    if dataset_digest(manifest.splits) != manifest.digest:
        problems.append(
            f"{root.join('manifest.json').uri}: digest does not match the shard list "
            "(the manifest was edited); re-create the dataset"
        )
    for split, info in manifest.splits.items():
        if info.rows == 0 or not info.shards:
            problems.append(f"{root.uri}: split {split!r} is empty")
        if sum(s.rows for s in info.shards) != info.rows:
            problems.append(f"{root.uri}: split {split!r} row count disagrees with its shards")
        for shard in info.shards:
            problems.extend(_check_shard(root.join(shard.path), shard, manifest))
    return manifest, problems


def _check_shard(
    loc: st.Location, shard: ShardInfo, manifest: Manifest, decode: bool = True
) -> list[str]:
    if not st.exists(loc):
        return [f"{loc.uri}: shard is missing (listed in the manifest)"]
    data = st.read_bytes(loc)
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{loc.uri}: size {len(data)} bytes, manifest says {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        problems.append(f"{loc.uri}: sha256 checksum mismatch (the file changed after writing)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        return [*problems, f"{loc.uri}: truncated or corrupt Parquet ({exc})"]
    if not table.schema.remove_metadata().equals(SCHEMA, check_metadata=False):
        got = ", ".join(f"{f.name}:{f.type}" for f in table.schema)
        want = ", ".join(f"{f.name}:{f.type}" for f in SCHEMA)
        return [*problems, f"{loc.uri}: wrong schema ({got}); expected ({want})"]
    if table.num_rows != shard.rows:
        problems.append(f"{loc.uri}: {table.num_rows} rows, manifest says {shard.rows}")
    labels = table.column("label").to_numpy()
    bad = labels[(labels < 0) | (labels >= manifest.num_classes)]
    if bad.size:
        problems.append(
            f"{loc.uri}: {bad.size} label(s) out of range 0..{manifest.num_classes - 1} "
            f"(first: {int(bad[0])})"
        )
    if not decode:
        return problems
    blobs = table.column("image").to_pylist()
    try:
        if manifest.image.fixed_size:
            decode_images(blobs, manifest.image)
        else:
            for i, blob in enumerate(blobs):  # one at a time: memory stays one image
                decode_one(blob, manifest.image, i)
    except ValueError as exc:
        ids = table.column("id").to_pylist()
        row = _row_of(str(exc))
        named = f" (id {ids[row]!r})" if row is not None and row < len(ids) else ""
        problems.append(f"{loc.uri}: undecodable image{named}: {exc}")
    return problems


def _row_of(message: str) -> int | None:
    head = message.split(":", 1)[0]
    return int(head[4:]) if head.startswith("row ") and head[4:].isdigit() else None


def check_shards_present(
    uri: str, manifest: Manifest, storage: StorageConfig | None = None
) -> None:
    """Cheap pre-flight check: every listed shard exists with its recorded size."""
    root = st.resolve(uri, storage)
    missing, resized = [], []
    for info in manifest.splits.values():
        paths = [root.join(s.path) for s in info.shards]
        try:
            infos = root.fs.get_file_info([p.path for p in paths])
        except OSError as exc:
            raise DatasetError(f"{root.uri}: cannot list shards: {exc}") from None
        for loc, shard, finfo in zip(paths, info.shards, infos, strict=True):
            if finfo.type.name == "NotFound":
                missing.append(loc.uri)
            elif finfo.size != shard.bytes:
                resized.append(f"{loc.uri} ({finfo.size} bytes, manifest says {shard.bytes})")
    if missing or resized:
        lines = [f"missing shard: {m}" for m in missing] + [f"changed shard: {r}" for r in resized]
        raise DatasetError(
            f"{root.uri}: the dataset does not match its manifest; run `pipeline data validate "
            f"{uri}` for details:\n  " + "\n  ".join(lines)
        )


def ensure_dataset(cfg: PipelineConfig) -> Manifest:
    """Read the manifest; create the bundled dataset first when configured and absent."""
    uri = cfg.data.uri
    root = st.resolve(uri, cfg.storage)
    if (
        cfg.data.prepare == "digits"
        and not root.is_s3
        and not Path(root.path, "manifest.json").exists()
    ):
        from pipeline.data.sources import WriteOptions, prepare_digits

        log.info("preparing the bundled digits dataset at %s", uri)
        prepare_digits(WriteOptions(out=uri, storage=cfg.storage))
    manifest = read_manifest(uri, cfg.storage)
    check_shards_present(uri, manifest, cfg.storage)
    for split in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
        manifest.split(split)  # raises naming the missing split
    if not manifest.image.fixed_size and cfg.data.crop is None:
        raise DatasetError(
            f"{uri}: the images have mixed sizes ({manifest.image.describe()}); set data.crop "
            "(for example `--set data.crop.size=224`) to train on random resized crops and "
            "evaluate on centre crops"
        )
    return manifest


def verify_split(
    uri: str, manifest: Manifest, split: str, storage: StorageConfig | None = None
) -> None:
    """Everything `validate_dataset` checks, for the one split about to be scored: the manifest's
    digest, and each of the split's shards (size, sha256, schema, rows, labels in range, images
    decode). A score on data that does not match its manifest would mean nothing: evaluation and
    the promotion gate call this first. Raises DatasetError naming the shards and what is wrong.

    Images are not decoded here: a matching sha256 means the bytes are those the pipeline wrote
    (and decoded) at import, and the scoring pass that follows decodes each of them anyway."""
    root = st.resolve(uri, storage)
    try:
        info = manifest.split(split)
    except DatasetError as exc:
        raise DatasetError(f"{uri}: {exc}") from None
    problems = []
    if dataset_digest(manifest.splits) != manifest.digest:
        problems.append(f"{root.join('manifest.json').uri}: digest does not match the shard list")
    for shard in info.shards:
        problems.extend(_check_shard(root.join(shard.path), shard, manifest, decode=False))
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise DatasetError(
            f"{uri}: split {split!r} does not match its manifest, so it cannot be scored: {shown}. "
            f"Run `pipeline data validate {uri}`, and re-create the dataset"
        )
