"""Photographs: JPEG datasets of mixed sizes, the parallel import and every way it can go wrong,
and manifests that try to point outside their dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import StorageConfig
from pipeline.data import imaging
from pipeline.data.photos import ImportOptions
from pipeline.data.shards import SCHEMA, read_manifest, read_shard
from pipeline.data.sources import WriteOptions, import_image_folder, import_listing
from pipeline.data.validate import validate_dataset
from pipeline.errors import DatasetError
from pipeline.storage import resolve
from tests.integration.test_datasets import rewrite_shard
from tests.photos import bomb_png, make_photo_tree, photo

runner = CliRunner()
JPEG = ("--encoding", "jpeg")


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def stored(uri: str) -> dict[str, bytes]:
    """id -> stored image bytes, over every split."""
    m = read_manifest(uri)
    root = resolve(uri)
    out = {}
    for info in m.splits.values():
        for shard in info.shards:
            t = read_shard(root.join(shard.path))
            out.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist(), strict=True))
    return out


def jpeg_import(src, out, workers=2, **kwargs):
    opts = WriteOptions(out=str(out), encoding="jpeg", shard_rows=5)
    images = ImportOptions(workers=workers, **kwargs)
    return import_image_folder(src, opts, val_fraction=0.2, test_fraction=0.0, images=images)


def test_parallel_jpeg_import_keeps_files_converts_the_awkward_ones_and_validates(tmp_path):
    src = tmp_path / "src"
    special = make_photo_tree(src)
    m = jpeg_import(src, tmp_path / "ds", workers=2)
    assert m.schema_version == 2 and m.image.encoding == "jpeg" and not m.image.fixed_size
    assert m.classes == ["china", "flower"] and sum(i.rows for i in m.splits.values()) == 16
    sizes = m.splits["train"].sizes
    assert sizes is not None and 60 <= sizes.min_height <= sizes.max_height <= 112
    assert m.imported is not None and m.imported.skipped == 0
    assert m.imported.reencoded == 3  # CMYK, EXIF-rotated, the palette PNG
    blobs = stored(str(tmp_path / "ds"))
    # RGB and greyscale JPEGs are stored byte for byte; greyscale decodes to the dataset's RGB.
    assert blobs["china/p00.jpg"] == (src / "china" / "p00.jpg").read_bytes()
    assert blobs["china/grey.jpg"] == special["grey"].read_bytes()
    assert imaging.decode(blobs["china/grey.jpg"], 3).shape == (80, 100, 3)
    cmyk = Image.open(io.BytesIO(blobs["flower/cmyk.jpg"]))
    assert cmyk.format == "JPEG" and cmyk.mode == "RGB"
    # The EXIF rotation is applied: stored upright (64x112 displayed as 112x64), tag gone.
    rotated = Image.open(io.BytesIO(blobs["china/rotated.jpg"]))
    assert rotated.size == (64, 112) and rotated.getexif().get(0x0112, 1) == 1
    assert Image.open(io.BytesIO(blobs["flower/palette.png"])).format == "JPEG"
    manifest, problems = validate_dataset(str(tmp_path / "ds"))
    assert problems == [] and manifest == m
    assert cli("data", "validate", str(tmp_path / "ds")).exit_code == 0
    # The pool changes nothing: one process writes the same bytes.
    assert jpeg_import(src, tmp_path / "one", workers=1).digest == m.digest


def test_pool_processes_write_shards_planned_by_file_size_the_same_for_any_pool(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    sizes = {p.relative_to(src).as_posix(): p.stat().st_size for p in src.rglob("*.*")}
    shard_bytes = 3 * sum(sizes.values()) // len(sizes)  # about three files a shard
    opts = WriteOptions(
        out=str(tmp_path / "ds"), encoding="jpeg", shard_mb=shard_bytes / 2**20, overwrite=True
    )
    m = import_image_folder(src, opts, val_fraction=0.2, images=ImportOptions(workers=2))
    root = resolve(str(tmp_path / "ds"))
    assert len(m.splits["train"].shards) >= 3
    for info in m.splits.values():
        for shard in info.shards[:-1]:  # closed by the rule: the file that reached the bytes
            ids = read_shard(root.join(shard.path)).column("id").to_pylist()
            source = [sizes[i] for i in ids]
            assert sum(source) >= shard_bytes > sum(source[:-1])
    assert [s.path for s in m.splits["train"].shards][:2] == [
        "train/part-00000.parquet",
        "train/part-00001.parquet",
    ]
    assert validate_dataset(str(tmp_path / "ds"))[1] == []
    one = WriteOptions(out=str(tmp_path / "one"), encoding="jpeg", shard_mb=opts.shard_mb)
    m1 = import_image_folder(src, one, val_fraction=0.2, images=ImportOptions(workers=1))
    assert m1.digest == m.digest and m1.normalization == m.normalization


def test_a_shard_that_encodes_far_over_its_plan_is_written_in_parts(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    sizes = [p.stat().st_size for p in src.rglob("*.*")]
    shard_mb = 4 * sum(sizes) / len(sizes) / 2**20  # four source files; their PNGs are larger

    def png_import(out, workers):
        opts = WriteOptions(out=str(tmp_path / out), encoding="png", shard_mb=shard_mb)
        return import_image_folder(
            src,
            opts,
            size=(64, 64),
            val_fraction=0,
            test_fraction=0,
            images=ImportOptions(workers=workers),
        )

    m = png_import("ds", 2)
    paths = [s.path for s in m.splits["train"].shards]
    assert "train/part-00000-0.parquet" in paths and "train/part-00000-1.parquet" in paths
    assert m.splits["train"].rows == 16 and validate_dataset(str(tmp_path / "ds"))[1] == []
    assert png_import("one", 1).digest == m.digest


def test_max_side_reencodes_only_larger_images_at_the_stated_quality(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    photo(rng, 300, 400).save(src / "a" / "big.jpg", quality=95)
    photo(rng, 60, 80).save(src / "a" / "small.jpg", quality=95)
    opts = WriteOptions(out=str(tmp_path / "ds"), encoding="jpeg")
    images = ImportOptions(workers=1, max_side=100, quality=50)
    import_image_folder(src, opts, val_fraction=0, test_fraction=0, images=images)
    blobs = stored(str(tmp_path / "ds"))
    assert blobs["a/small.jpg"] == (src / "a" / "small.jpg").read_bytes()
    assert Image.open(io.BytesIO(blobs["a/big.jpg"])).size == (100, 75)
    requantised = io.BytesIO()
    Image.open(io.BytesIO(blobs["a/big.jpg"])).save(requantised, "JPEG", quality=50)
    assert abs(len(requantised.getvalue()) - len(blobs["a/big.jpg"])) < 0.1 * len(
        blobs["a/big.jpg"]
    )


def test_truncated_jpeg_inside_a_shard_is_named_by_validate(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    out = tmp_path / "ds"
    m = jpeg_import(src, out, workers=1)
    rel = m.splits["train"].shards[0].path
    table = pq.read_table(out / rel)
    images = table.column("image").to_pylist()
    images[2] = images[2][: len(images[2]) // 2]
    victim = table.column("id").to_pylist()[2]
    bad = table.set_column(
        0, pa.field("image", pa.binary(), nullable=False), pa.array(images, pa.binary())
    )
    rewrite_shard(out, rel, bad.cast(SCHEMA))
    r = cli("data", "validate", str(out))
    assert r.exit_code == 1
    assert f"{rel}: undecodable image (id {victim!r}): row 2: JPEG" in r.output
    assert "truncated" in r.output and "checksum" not in r.output


# ---------------------------------------------------------------------------------------------
# Every way an import can fail: the file is named, nothing is left behind


def test_corrupt_file_is_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    (src / "flower" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = cli("data", "import", "image-folder", str(src), "--out", str(tmp_path / "ds"), *JPEG)
    assert r.exit_code == 2 and "zz-broken.jpg: not a decodable image" in r.output
    assert "--skip-bad" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.s3
def test_an_aborted_s3_import_removes_every_shard_its_pool_wrote(tmp_path, s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    src = tmp_path / "src"
    make_photo_tree(src, per_class=10)
    (src / "flower" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    opts = WriteOptions(
        out=f"s3://{bucket}/ds",
        encoding="jpeg",
        shard_rows=2,
        storage=StorageConfig(endpoint_url=s3_server.endpoint),
    )
    with pytest.raises(DatasetError, match=r"zz-broken\.jpg: not a decodable image"):
        import_image_folder(src, opts, images=ImportOptions(workers=2))
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_skip_bad_leaves_bad_files_out_and_counts_them(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    (src / "flower" / "zz-broken.jpg").write_bytes(b"garbage")
    (src / "china" / "zz-bomb.png").write_bytes(bomb_png())
    m = jpeg_import(src, tmp_path / "ds", skip_bad=True)
    assert m.imported.skipped == 2 and sum(i.rows for i in m.splits.values()) == 16
    examples = " ".join(m.imported.skipped_examples)
    assert "zz-broken.jpg: not a decodable image" in examples
    assert "zz-bomb.png: refused as a possible decompression bomb" in examples
    assert "zz-broken.jpg" not in stored(str(tmp_path / "ds"))


def test_decompression_bomb_is_refused_with_exit_2(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    (src / "china" / "bomb.png").write_bytes(bomb_png())  # 27 KB, 15000x15000
    r = cli("data", "import", "image-folder", str(src), "--out", str(tmp_path / "ds"), *JPEG)
    assert r.exit_code == 2, r.output
    assert "bomb.png: refused as a possible decompression bomb" in r.output
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_empty_class_folder_is_refused(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    (src / "zebra").mkdir()
    (src / "zebra" / "notes.txt").write_text("no images here")
    r = cli("data", "import", "image-folder", str(src), "--out", str(tmp_path / "ds"), *JPEG)
    assert r.exit_code == 2
    assert "zebra: class folder has no .png/.jpg/.jpeg images" in r.output


def test_listing_imports_with_splits_and_names_missing_files_and_bad_labels(tmp_path):
    src = tmp_path / "src"
    make_photo_tree(src)
    rows = [("china/p00.jpg", "china", "train"), ("flower/p00.jpg", "flower", "train")]
    rows += [("china/p01.jpg", "china", "val"), ("flower/p01.jpg", "flower", "val")]
    listing = src / "list.csv"
    listing.write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    opts = WriteOptions(out=str(tmp_path / "ds"), encoding="jpeg")
    m = import_listing(listing, opts, images=ImportOptions(workers=1))
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 2, "val": 2}
    assert m.classes == ["china", "flower"]
    jsonl = src / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c, _ in rows))
    opts = WriteOptions(out=str(tmp_path / "ds2"), encoding="jpeg")
    m2 = import_listing(jsonl, opts, val_fraction=0, test_fraction=0)
    assert m2.splits["train"].rows == 4

    missing = src / "missing.csv"
    missing.write_text("path,label\nchina/p00.jpg,china\nchina/nope.jpg,china\n")
    opts = WriteOptions(out=str(tmp_path / "ds3"), encoding="jpeg")
    with pytest.raises(DatasetError, match=r"nope\.jpg \(.*missing\.csv line 3\): file not found"):
        import_listing(missing, opts, val_fraction=0, test_fraction=0)
    assert not (tmp_path / "ds3").exists()
    m3 = import_listing(
        missing, opts, val_fraction=0, test_fraction=0, images=ImportOptions(skip_bad=True)
    )
    assert m3.imported.skipped == 1 and m3.splits["train"].rows == 1

    bad = src / "bad.jsonl"
    bad.write_text(
        '{"path": "china/p00.jpg", "label": "china"}\n{"path": "x.jpg", "label": null}\n'
    )
    with pytest.raises(DatasetError, match=r"bad\.jsonl line 2: bad label None"):
        import_listing(bad, WriteOptions(out=str(tmp_path / "ds4"), encoding="jpeg"))
    blank = src / "blank.csv"
    blank.write_text("path,label\nchina/p00.jpg,\n")
    with pytest.raises(DatasetError, match=r"blank\.csv line 2: bad label ''"):
        import_listing(blank, WriteOptions(out=str(tmp_path / "ds5"), encoding="jpeg"))


@pytest.mark.s3
def test_s3_prefix_imports_like_the_local_tree(tmp_path, s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    src = tmp_path / "src"
    make_photo_tree(src)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    for path in src.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"photos/{path.relative_to(src)}", Body=path.read_bytes()
            )
    local = jpeg_import(src, tmp_path / "local")
    opts = WriteOptions(
        out=f"s3://{bucket}/ds",
        encoding="jpeg",
        shard_rows=5,
        storage=StorageConfig(endpoint_url=s3_server.endpoint),
    )
    remote = import_image_folder(
        f"s3://{bucket}/photos",
        opts,
        val_fraction=0.2,
        test_fraction=0.0,
        images=ImportOptions(workers=2),
    )
    assert remote.digest == local.digest
    assert (
        cli("data", "validate", f"s3://{bucket}/ds", "--endpoint-url", s3_server.endpoint).exit_code
        == 0
    )


# ---------------------------------------------------------------------------------------------
# Manifests that point outside their dataset


def point_outside(root: Path, rel: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = rel
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("rel", ["../victim/x.parquet", "/tmp/x.parquet", "train/../../x.parquet"])
def test_shard_paths_outside_the_dataset_are_refused_everywhere(tmp_path, rel):
    ds = tmp_path / "ds"
    assert cli("data", "prepare", "digits", "--out", str(ds)).exit_code == 0
    victim = tmp_path / "victim" / "x.parquet"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    point_outside(ds, rel)
    with pytest.raises(DatasetError, match="inside the dataset"):
        read_manifest(str(ds))
    r = cli("data", "validate", str(ds))
    assert r.exit_code == 1 and "is not train/part-NNNNN.parquet inside the dataset" in r.output
    r = cli("data", "prepare", "digits", "--out", str(ds), "--overwrite")
    assert r.exit_code == 2 and "inside the dataset" in r.output
    assert victim.read_bytes() == b"precious" and (ds / "manifest.json").exists()


def test_overwrite_never_deletes_files_the_pipeline_did_not_write(tmp_path):
    ds = tmp_path / "ds"
    assert cli("data", "prepare", "digits", "--out", str(ds)).exit_code == 0
    (ds / "notes.txt").write_text("mine")
    r = cli("data", "prepare", "digits", "--out", str(ds), "--overwrite", "--seed", "2")
    assert r.exit_code == 2 and "notes.txt" in r.output
    assert (ds / "notes.txt").read_text() == "mine"
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    r = cli("data", "prepare", "digits", "--out", str(other), "--overwrite")
    assert r.exit_code == 2 and "holds no dataset" in r.output
    assert (other / "thesis.tex").exists()


@pytest.mark.s3
def test_s3_overwrite_cleanup_stays_inside_the_prefix(s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/data/ds"
    ep = ("--endpoint-url", s3_server.endpoint)
    assert cli("data", "prepare", "digits", "--out", uri, *ep).exit_code == 0
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="data/victim/x.parquet", Body=b"precious")
    key = "data/ds/manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    manifest["splits"]["train"]["shards"][0]["path"] = "../victim/x.parquet"
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
    r = cli("data", "prepare", "digits", "--out", uri, "--overwrite", "--seed", "1", *ep)
    assert r.exit_code == 2 and "inside the dataset" in r.output
    body = client.get_object(Bucket=bucket, Key="data/victim/x.parquet")["Body"].read()
    assert body == b"precious"
    r = cli("data", "validate", uri, *ep)
    assert r.exit_code == 1 and "inside the dataset" in r.output


# ---------------------------------------------------------------------------------------------
# Through Ray Data: what a training worker receives


def test_photo_dataset_hands_workers_uint8_crops_in_one_stream_of_reshuffled_epochs(
    ray_session, tmp_path
):
    import ray.data

    src = tmp_path / "src"
    make_photo_tree(src, per_class=10)
    out = str(tmp_path / "ds")
    opts = WriteOptions(out=out, encoding="jpeg", shard_rows=2)
    m = import_image_folder(src, opts, val_fraction=0.2, test_fraction=0, seed=1)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # so that file order is visible in row order
    try:
        check_photo_dataset(out, m)
    finally:
        ctx.execution_options.preserve_order = False


def check_photo_dataset(out: str, m) -> None:
    import ray
    import torch

    from pipeline.config import CropConfig
    from pipeline.data.ingest import photo_dataset
    from pipeline.data.transform import iter_split, to_float_normalized

    crop = CropConfig(size=32)
    rows = m.splits["train"].rows
    train = photo_dataset(out, m, "train", crop=crop, train=True, batch_size=4, seed=3, epochs=3)

    def labels_of_one_run(ds) -> list[int]:
        batches = list(ds.iter_batches(batch_size=4, batch_format="numpy"))
        images = np.concatenate([b["image"] for b in batches])
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        return np.concatenate([b["label"] for b in batches]).tolist()

    # One run of the dataset reads three epochs, each every image once, in its own file order.
    first_run = labels_of_one_run(train)
    assert len(first_run) == 3 * rows
    epochs = [first_run[i * rows : (i + 1) * rows] for i in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert len({tuple(e) for e in epochs}) > 1, "file order changes between epochs"
    # The next run reads the three epochs after those (Ray counts a dataset's runs).
    second_run = labels_of_one_run(train)
    assert len(second_run) == 3 * rows and second_run != first_run
    # Read, decode and crop run in one task per (epoch, shard): no map operator after the read.
    stats = train.stats()
    assert "ReadPhotoShards" in stats and "MapBatches" not in stats, stats
    again = photo_dataset(out, m, "train", crop=crop, train=True, batch_size=4, seed=3, epochs=3)
    assert labels_of_one_run(again) == first_run, "the same seed gives the same epochs"
    # A read task hands on a block per batch as it crops it (Ray Data would merge them up to
    # 128 MiB), its batches spanning shards: only a task's last block may be short.
    one = photo_dataset(out, m, "train", crop=crop, train=True, batch_size=4, seed=3)
    sizes = [len(b["label"]) for b in one.iter_batches(batch_size=None, batch_format="numpy")]
    tasks = min(int(ray.cluster_resources()["CPU"]), len(m.splits["train"].shards))  # per CPU
    assert sum(sizes) == rows and max(sizes) == 4 and sum(n < 4 for n in sizes) <= tasks
    # Validation through Ray is exactly the single-process evaluation path, before normalising.
    val = photo_dataset(out, m, "val", crop=crop, train=False, batch_size=4)
    pixels = np.concatenate([b["image"] for b in val.iter_batches(batch_format="numpy")])
    x, _ = zip(*iter_split(out, m, "val", crop=crop), strict=True)
    torch.testing.assert_close(
        torch.cat(x), to_float_normalized(torch.from_numpy(pixels), m.normalization).contiguous()
    )


def test_a_resized_import_and_serving_see_the_same_pixels_of_a_rotated_jpeg(tmp_path):
    from pipeline.serving import to_pixels
    from tests.photos import save_rotated_jpeg

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    save_rotated_jpeg(photo(np.random.default_rng(5), 120, 200), src / "a" / "r.jpg")
    photo(np.random.default_rng(6), 90, 90).save(src / "a" / "s.jpg")
    out = str(tmp_path / "ds")
    opts = WriteOptions(out=out, encoding="png")
    m = import_image_folder(src, opts, size=(24, 16), val_fraction=0, test_fraction=0)
    stored_pixels = imaging.decode(stored(out)["a/r.jpg"], 3)
    served = to_pixels([(src / "a" / "r.jpg").read_bytes()], m.image)[0]
    np.testing.assert_array_equal(served, stored_pixels)
    # Upright: the stored 120x200 pixels, turned 90 degrees clockwise, then resized.
    upright = Image.open(src / "a" / "r.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    expected = np.asarray(upright.resize((16, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(stored_pixels, expected)


@pytest.mark.s3
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError], ids=["ctrl-c", "error"])
def test_an_s3_overwrite_interrupted_in_cleanup_leaves_the_new_dataset_valid(
    s3_server, monkeypatch, interruption
):
    """The manifest's upload is the commit: a Ctrl-C or an error while the replaced dataset's
    old shards are deleted must not take the new dataset's shards with it."""
    from pipeline.config import StorageConfig
    from pipeline.data import shards
    from pipeline.data.sources import WriteOptions, prepare_digits
    from pipeline.data.validate import validate_dataset

    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/data/ds"
    storage = StorageConfig(endpoint_url=s3_server.endpoint)
    prepare_digits(WriteOptions(out=uri, storage=storage, shard_rows=200))

    original = shards._delete_quietly
    calls = []

    def interrupted(loc, directory=False):  # the first deletion is interrupted, later ones run
        calls.append(loc)
        if len(calls) == 1:
            raise interruption("interrupted while cleaning up")
        original(loc, directory)

    monkeypatch.setattr(shards, "_delete_quietly", interrupted)
    again = WriteOptions(out=uri, storage=storage, shard_rows=300, overwrite=True)
    with pytest.raises(interruption):
        prepare_digits(again, seed=1)
    monkeypatch.setattr(shards, "_delete_quietly", original)
    manifest, problems = validate_dataset(uri, storage)
    assert problems == [], problems
    assert max(s.rows for s in manifest.split("train").shards) > 200  # the new one, committed
