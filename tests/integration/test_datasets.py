"""Datasets: every source round-trips locally and over S3; every corruption has its own message."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import StorageConfig
from pipeline.data.shards import SCHEMA, dataset_digest, decode_images, read_manifest, read_shard
from pipeline.storage import resolve
from tests.support import closed_port

pytestmark = pytest.mark.quick

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def read_split(uri: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    m = read_manifest(uri)
    root = resolve(uri)
    images, labels, ids = [], [], []
    for shard in m.split(split).shards:
        table = read_shard(root.join(shard.path))
        images.append(decode_images(table.column("image").to_pylist(), m.image))
        labels.append(table.column("label").to_numpy())
        ids += table.column("id").to_pylist()
    return np.concatenate(images), np.concatenate(labels), ids


# ---------------------------------------------------------------------------------------------
# Round trips


def check_digits(uri: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    m = read_manifest(uri)
    assert m.classes == [str(i) for i in range(10)]
    assert m.image.shape == (1, 8, 8)
    assert sum(s.rows for s in m.splits.values()) == 1797
    assert m.digest == dataset_digest(m.splits)
    seen = set()
    for split in ("train", "val", "test"):
        images, labels, ids = read_split(uri, split)
        assert len(set(labels.tolist())) == 10, "stratified: every class in every split"
        for img, label, row_id in zip(images, labels, ids, strict=True):
            i = int(row_id.split("-")[1])
            expected = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            np.testing.assert_array_equal(img[:, :, 0], expected)
            assert label == digits.target[i]
            seen.add(i)
    assert len(seen) == 1797


def test_digits_prepare_validate_local(tmp_path):
    out = str(tmp_path / "digits")
    r = cli("data", "prepare", "digits", "--out", out, "--shard-rows", "500")
    assert r.exit_code == 0, r.output
    check_digits(out)
    m = read_manifest(out)
    assert len(m.split("train").shards) == 3  # 1259 rows at 500 per shard
    assert cli("data", "validate", out).exit_code == 0
    inspected = cli("data", "inspect", out)
    assert "train" in inspected.output and "digest" in inspected.output
    # the same seed gives byte-identical shards
    again = str(tmp_path / "again")
    assert cli("data", "prepare", "digits", "--out", again, "--shard-rows", "500").exit_code == 0
    assert read_manifest(again).digest == m.digest


def test_prepare_refuses_to_overwrite_without_flag(tmp_path):
    out = str(tmp_path / "digits")
    assert cli("data", "prepare", "digits", "--out", out).exit_code == 0
    digest = read_manifest(out).digest
    r = cli("data", "prepare", "digits", "--out", out, "--seed", "3")
    assert r.exit_code == 2 and "already exists" in r.output
    assert read_manifest(out).digest == digest
    assert (
        cli("data", "prepare", "digits", "--out", out, "--seed", "3", "--overwrite").exit_code == 0
    )
    assert read_manifest(out).digest != digest


def test_shard_size_by_megabytes(tmp_path):
    out = str(tmp_path / "d")
    assert (
        cli(
            "data", "prepare", "digits", "--out", out, "--encoding", "png", "--shard-mb", "0.02"
        ).exit_code
        == 0
    )
    m = read_manifest(out)
    assert len(m.split("train").shards) > 2
    assert all(s.bytes < 40_000 for s in m.split("train").shards)
    check_digits(out)


def make_image_folder(root: Path, n_per_class: int = 6, sizes=((20, 30), (12, 12))) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            h, w = sizes[i % len(sizes)]
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class signal
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(arr).save(root / name / f"img{i}{suffix}")


def test_image_folder_import_with_resize(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src)
    out = str(tmp_path / "ds")
    r = cli(
        "data",
        "import",
        "image-folder",
        str(src),
        "--out",
        out,
        "--size",
        "16x16",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--shard-rows",
        "4",
    )
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m.classes == ["cat", "dog", "emu"]
    assert m.image.shape == (3, 16, 16) and m.image.encoding == "png"
    assert sum(s.rows for s in m.splits.values()) == 18
    images, labels, ids = read_split(out, "train")
    for img, label, row_id in zip(images, labels, ids, strict=True):
        assert row_id.startswith(m.classes[label] + "/")
        assert img.mean((0, 1)).argmax() == label  # the class channel survived resize + JPEG
    assert cli("data", "validate", out).exit_code == 0


def test_image_folder_presplit_and_grayscale(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 4), ("test", 2)):
        make_image_folder(src / split, n_per_class=n, sizes=((10, 10),))
    out = str(tmp_path / "ds")
    assert (
        cli("data", "import", "image-folder", str(src), "--out", out, "--grayscale").exit_code == 0
    )
    m = read_manifest(out)
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 12, "test": 6}
    assert m.image.shape == (1, 10, 10)


def test_image_folder_mixed_sizes_without_resize_is_refused(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src)
    out = tmp_path / "ds"
    r = cli("data", "import", "image-folder", str(src), "--out", str(out))
    assert r.exit_code == 2 and "--size" in r.output
    assert not out.exists() and not list(tmp_path.glob(".ds.staging-*"))


def test_numpy_import_layouts(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((40, 3, 6, 5)).astype(np.float32)  # NCHW floats in [0, 1]
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y, classes=np.array(["a", "b", "c", "d"]))
    out = str(tmp_path / "a")
    assert cli("data", "import", "numpy", str(tmp_path / "a.npz"), "--out", out).exit_code == 0
    m = read_manifest(out)
    assert m.classes == ["a", "b", "c", "d"] and m.image.shape == (3, 6, 5)
    images, labels, ids = read_split(out, "train")
    for img, label, row_id in zip(images, labels, ids, strict=True):
        i = int(row_id.rsplit("-", 1)[1])
        np.testing.assert_array_equal(img, np.round(x[i].transpose(1, 2, 0) * 255).astype(np.uint8))
        assert label == y[i]
    # already split, greyscale uint8 NHW
    np.savez(
        tmp_path / "b.npz",
        x_train=np.zeros((5, 4, 4), np.uint8),
        y_train=np.arange(5) % 2,
        x_test=np.ones((3, 4, 4), np.uint8),
        y_test=np.array([0, 1, 1]),
    )
    out_b = str(tmp_path / "b")
    assert cli("data", "import", "numpy", str(tmp_path / "b.npz"), "--out", out_b).exit_code == 0
    assert {s: i.rows for s, i in read_manifest(out_b).splits.items()} == {"train": 5, "test": 3}


# ---------------------------------------------------------------------------------------------
# S3 (moto's standalone server over HTTP)


@pytest.mark.s3
def test_digits_round_trip_s3(s3_uri):
    r = cli("data", "prepare", "digits", "--out", s3_uri, "--shard-rows", "400")
    assert r.exit_code == 0, r.output
    check_digits(s3_uri)
    assert cli("data", "validate", s3_uri).exit_code == 0


@pytest.mark.s3
def test_image_folder_and_numpy_round_trip_s3(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    src = tmp_path / "src"
    make_image_folder(src)
    folder_uri = f"s3://{bucket}/folder"
    assert (
        cli(
            "data", "import", "image-folder", str(src), "--out", folder_uri, "--size", "8x8"
        ).exit_code
        == 0
    )
    assert read_manifest(folder_uri).image.shape == (3, 8, 8)
    np.savez(tmp_path / "n.npz", x=np.zeros((20, 4, 4), np.uint8), y=np.arange(20) % 2)
    numpy_uri = f"s3://{bucket}/numpy"
    assert (
        cli("data", "import", "numpy", str(tmp_path / "n.npz"), "--out", numpy_uri).exit_code == 0
    )
    for uri in (folder_uri, numpy_uri):
        assert cli("data", "validate", uri).exit_code == 0


@pytest.mark.s3
def test_failed_s3_write_leaves_no_manifest_and_no_shards(tmp_path, s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    src = tmp_path / "src"
    make_image_folder(src, sizes=((10, 10),))
    (src / "dog" / "zz-broken.png").write_bytes(b"not a png")  # fails after shards were written
    uri = f"s3://{bucket}/ds"
    r = cli("data", "import", "image-folder", str(src), "--out", uri, "--shard-rows", "2")
    assert r.exit_code == 2 and "zz-broken.png" in r.output
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    # A failed --overwrite leaves the dataset that was there intact.
    assert cli("data", "prepare", "digits", "--out", uri).exit_code == 0
    before = read_manifest(uri)
    r = cli(
        "data", "import", "image-folder", str(src), "--out", uri, "--overwrite", "--shard-rows", "2"
    )
    assert r.exit_code == 2
    assert read_manifest(uri) == before
    assert cli("data", "validate", uri).exit_code == 0
    # A successful overwrite removes the replaced shards.
    assert (
        cli("data", "prepare", "digits", "--out", uri, "--overwrite", "--seed", "1").exit_code == 0
    )
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    files = {o["Key"] for o in listed if not o["Key"].endswith("/")}  # not directory markers
    assert len(files) == 4, files  # manifest + one shard per split


@pytest.mark.s3
def test_missing_bucket(s3_server):
    r = cli("data", "prepare", "digits", "--out", "s3://no-such-bucket-xyz/d")
    assert r.exit_code == 2
    assert "no-such-bucket-xyz" in r.output and "does not exist" in r.output


@pytest.mark.s3
def test_wrong_s3_credentials(s3_server_with_auth, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    r = cli("data", "validate", "s3://bucket/d", "--endpoint-url", s3_server_with_auth)
    assert r.exit_code == 2
    assert "s3://bucket/d" in r.output and "denied" in r.output and "credentials" in r.output


def test_unreachable_s3_endpoint_fails_fast(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    r = cli(
        "data",
        "prepare",
        "digits",
        "--out",
        "s3://b/d",
        "--endpoint-url",
        f"http://127.0.0.1:{port}",
    )
    assert r.exit_code == 2
    assert "cannot reach" in r.output and f"127.0.0.1:{port}" in r.output
    # Bounded by the connect timeout times the attempts, which the message states (no clock).
    assert re.search(r"within [\d.]+s x \d+ attempts", " ".join(r.output.split())), r.output


# ---------------------------------------------------------------------------------------------
# Corruption: each ends in its own message naming the file


@pytest.fixture
def digits_dir(tmp_path) -> Path:
    out = tmp_path / "digits"
    assert cli("data", "prepare", "digits", "--out", str(out), "--shard-rows", "700").exit_code == 0
    return out


def rewrite_shard(root: Path, rel: str, table: pa.Table) -> None:
    """Replace a shard and re-sign the manifest, so only the content problem remains."""
    path = root / rel
    pq.write_table(table, path)
    data = path.read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            if shard["path"] == rel:
                shard.update(
                    rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
    from pipeline.data.shards import SplitInfo

    manifest["digest"] = dataset_digest({k: SplitInfo(**v) for k, v in manifest["splits"].items()})
    (root / "manifest.json").write_text(json.dumps(manifest))


def validate_problems(root: Path) -> str:
    r = cli("data", "validate", str(root))
    assert r.exit_code == 1, r.output
    return r.output


def test_missing_shard(digits_dir):
    (digits_dir / "train" / "part-00001.parquet").unlink()
    out = validate_problems(digits_dir)
    assert "train/part-00001.parquet: shard is missing" in out


def test_truncated_parquet(digits_dir):
    path = digits_dir / "val" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-200])
    out = validate_problems(digits_dir)
    assert "val/part-00000.parquet: truncated or corrupt Parquet" in out


def test_wrong_schema(digits_dir):
    table = pq.read_table(digits_dir / "test" / "part-00000.parquet")
    wrong = table.rename_columns(["pixels", "label", "id"])
    rewrite_shard(digits_dir, "test/part-00000.parquet", wrong)
    out = validate_problems(digits_dir)
    assert "test/part-00000.parquet: wrong schema (pixels:binary" in out
    assert "checksum" not in out


def test_undecodable_image(digits_dir):
    table = pq.read_table(digits_dir / "test" / "part-00000.parquet")
    images = table.column("image").to_pylist()
    images[5] = images[5][:10]
    bad = table.set_column(
        0, pa.field("image", pa.binary(), nullable=False), pa.array(images, pa.binary())
    )
    rewrite_shard(digits_dir, "test/part-00000.parquet", bad.cast(SCHEMA))
    out = validate_problems(digits_dir)
    assert "test/part-00000.parquet: undecodable image" in out and "checksum" not in out


def test_label_out_of_range(digits_dir):
    table = pq.read_table(digits_dir / "val" / "part-00000.parquet")
    labels = table.column("label").to_numpy().copy()
    labels[3] = 12
    bad = table.set_column(1, pa.field("label", pa.int64(), nullable=False), pa.array(labels))
    rewrite_shard(digits_dir, "val/part-00000.parquet", bad.cast(SCHEMA))
    out = validate_problems(digits_dir)
    assert "val/part-00000.parquet: 1 label(s) out of range 0..9 (first: 12)" in out


def test_empty_split(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["splits"]["val"] = {"rows": 0, "class_counts": [0] * 10, "shards": []}
    from pipeline.data.shards import SplitInfo

    manifest["digest"] = dataset_digest({k: SplitInfo(**v) for k, v in manifest["splits"].items()})
    (digits_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "split 'val' is empty" in validate_problems(digits_dir)


def test_checksum_mismatch(digits_dir):
    path = digits_dir / "train" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, compression="gzip")  # same rows, different bytes
    out = validate_problems(digits_dir)
    assert "train/part-00000.parquet: sha256 checksum mismatch" in out
    assert "wrong schema" not in out and "undecodable" not in out


def test_edited_manifest_digest(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (digits_dir / "manifest.json").write_text(json.dumps(manifest))
    out = validate_problems(digits_dir)
    assert "digest does not match" in out and "checksum mismatch" in out


def test_not_a_dataset(tmp_path):
    r = cli("data", "validate", str(tmp_path))
    assert r.exit_code == 1 and "no manifest.json" in r.output


def test_unreadable_source_folder(tmp_path):
    r = cli("data", "import", "image-folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "nope: source folder does not exist" in r.output
    (tmp_path / "file").write_text("x")
    r = cli("data", "import", "image-folder", str(tmp_path / "file"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "file: not a directory" in r.output


def test_undecodable_source_image_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, sizes=((10, 10),))
    (src / "emu" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    r = cli(
        "data",
        "import",
        "image-folder",
        str(src),
        "--out",
        str(tmp_path / "ds"),
        "--shard-rows",
        "2",
    )
    assert r.exit_code == 2 and "broken.jpg: not a decodable image" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "no dataset, no staging directory"


def test_interrupted_local_write_leaves_nothing(tmp_path, monkeypatch):
    from pipeline.data import shards

    calls = {"n": 0}
    real = shards.DatasetWriter._flush

    def flaky(self, split):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, split)

    monkeypatch.setattr(shards.DatasetWriter, "_flush", flaky)
    r = cli("data", "prepare", "digits", "--out", str(tmp_path / "d"), "--shard-rows", "300")
    assert r.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_storage_config_reads_standard_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    resolved = StorageConfig().resolved()
    assert resolved.endpoint_url == "http://127.0.0.1:9" and resolved.region == "eu-west-1"
    assert StorageConfig(endpoint_url="http://x:1").resolved().endpoint_url == "http://x:1"
