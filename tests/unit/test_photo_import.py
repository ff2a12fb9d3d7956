"""How the image importer plans its shards: the plan decides the dataset, whatever the pool."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.photos import ASSUMED_FILE_BYTES, ImageFile, plan_shards
from pipeline.data.shards import ImageSpec

JPEG = ImageSpec(encoding="jpeg", height=None, width=None, channels=3)


def sized(name: str, size: int) -> ImageFile:
    return ImageFile(f"s3://bucket/{name}", name, size=size)


def test_shards_close_once_their_files_reach_the_bytes_or_rows_per_split():
    items = [
        ("train", sized("a", 40), 0),
        ("val", sized("v1", 70), 1),
        ("train", sized("b", 40), 1),
        ("train", sized("c", 40), 0),  # train reaches 120 >= 100 here
        ("val", sized("v2", 70), 0),  # val reaches 140
        ("train", sized("d", 10), 1),
    ]
    plan = plan_shards(items, JPEG, shard_rows=None, shard_bytes=100)
    assert [(s, [f.row_id for f in fs], ls) for s, fs, ls in plan] == [
        ("train", ["a", "b", "c"], [0, 1, 0]),
        ("val", ["v1", "v2"], [1, 0]),
        ("train", ["d"], [1]),  # what is left over, in the order the splits were opened
    ]
    by_rows = plan_shards(items, JPEG, shard_rows=2, shard_bytes=10**9)
    assert [[f.row_id for f in fs] for _, fs, _ in by_rows] == [
        ["a", "b"],
        ["v1", "v2"],
        ["c", "d"],
    ]


def test_sizes_come_from_the_listing_the_disk_the_pixel_count_or_an_estimate(tmp_path: Path):
    (tmp_path / "x.jpg").write_bytes(b"\xff" * 300)
    local = ImageFile(str(tmp_path / "x.jpg"), "x")
    missing = ImageFile(str(tmp_path / "gone.jpg"), "gone")  # named later, when it is read
    listed = ImageFile("s3://bucket/y.jpg", "y")  # a listing row: no size known
    items = [("train", f, 0) for f in (local, local, missing, listed)]
    plan = plan_shards(items, JPEG, shard_rows=None, shard_bytes=600)
    assert [len(fs) for _, fs, _ in plan] == [2, 1, 1]  # 300 + 300, then an estimate each
    for shard_bytes, lengths in ((ASSUMED_FILE_BYTES, [1, 1]), (ASSUMED_FILE_BYTES + 1, [2])):
        plan = plan_shards(items[2:], JPEG, shard_rows=None, shard_bytes=shard_bytes)
        assert [len(fs) for _, fs, _ in plan] == lengths
    raw = ImageSpec(encoding="raw", height=10, width=10, channels=3)  # 300 bytes a row, always
    plan = plan_shards([("train", sized("z", 1), 0)] * 5, raw, shard_rows=None, shard_bytes=600)
    assert [len(fs) for _, fs, _ in plan] == [2, 2, 1]
