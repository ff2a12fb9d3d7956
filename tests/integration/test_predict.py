"""`pipeline predict` end to end on the session's Ray: a registered model over a dataset's split,
an untrained local model package over a JPEG folder (a bad image named, then skipped) and over
an S3 prefix (moto), each checked row by row against the in-process Predictor."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline import storage as st
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.shards import decode_images, read_manifest, read_shard
from pipeline.model_package import package_metadata
from pipeline.models.zoo import build_model
from pipeline.serving import load
from pipeline.serving.batch import META_KEY
from pipeline.tags import MODEL_META_FILE, WEIGHTS_FILE
from tests.integration.test_cli_errors import assert_one_error_line
from tests.photos import make_photo_tree
from tests.support import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_model(tmp_path_factory, digits_uri) -> str:
    """An untrained digits model package in a folder (what `rebuild` reads): no MLflow needed."""
    cfg = load_config(REPO / "jobs" / "configs" / "digits.yaml", [f"data.uri={digits_uri}"])
    meta = package_metadata(cfg, read_manifest(digits_uri))
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, num_classes=10, image_size=16)
    root = tmp_path_factory.mktemp("predict-model")
    torch.save(model.state_dict(), root / WEIGHTS_FILE)
    (root / MODEL_META_FILE).write_text(json.dumps(meta))
    return str(root)


def predict(*args: str):
    return CliRunner().invoke(app, ["predict", *args])


# float32 forward passes over other batch compositions and thread counts (an actor has one
# thread) differ in the last bits.
CLOSE = 1e-5


def check_rows(table, predictor, images: list, k: int = 5) -> None:
    """Every row's label, confidence and top-k are the in-process Predictor's on the same image."""
    probs = predictor.probabilities(images)
    assert table.num_rows == len(images)
    rows = table.to_pylist()
    for row, p in zip(rows, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        assert row["label"] == predictor.classes[int(p.argmax())]
        assert row["confidence"] == pytest.approx(float(p.max()), abs=CLOSE)
        assert row["top_k_labels"] == [predictor.classes[i] for i in order]
        assert row["top_k_probabilities"] == pytest.approx(p[order].tolist(), abs=CLOSE)
        assert row["top_k_probabilities"] == sorted(row["top_k_probabilities"], reverse=True)


def test_a_registered_model_over_a_datasets_split(trained_model, ray_session, tmp_path):
    out = tmp_path / "preds.parquet"
    args = [trained_model.uri, "--data", trained_model.data_uri, "--split", "test", "--out",
            str(out), "--tracking-uri", trained_model.tracking_uri, "--json"]  # fmt: skip
    result = predict(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    manifest = read_manifest(trained_model.data_uri)
    assert summary["rows"] == manifest.split("test").rows and summary["skipped"] == 0
    assert (summary["model"], summary["version"]) == (trained_model.name, trained_model.version)
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[META_KEY])
    assert meta["classes"] == manifest.classes and meta["model_uri"] == trained_model.uri
    assert set(table.column("model").to_pylist()) == {trained_model.name}
    assert set(table.column("version").to_pylist()) == {trained_model.version}
    # Rows in the split's order, each predicted as the in-process Predictor predicts it.
    ids, images = [], []
    for shard in manifest.split("test").shards:
        t = read_shard(st.resolve(trained_model.data_uri).join(shard.path))
        ids += t.column("id").to_pylist()
        images += list(decode_images(t.column("image").to_pylist(), manifest.image))
    assert table.column("id").to_pylist() == ids
    check_rows(table, load(trained_model.uri, tracking_uri=trained_model.tracking_uri), images)
    # An existing --out is refused before anything runs, and stays as it was.
    before = out.read_bytes()
    assert_one_error_line(predict(*args), f"{out}: already exists; pass --overwrite")
    assert out.read_bytes() == before


def test_a_bad_image_is_named_and_nothing_written_or_skipped_and_counted(
    local_model, ray_session, tmp_path
):
    folder = tmp_path / "photos"
    make_photo_tree(folder, per_class=2)
    (folder / "flower" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out" / "preds.parquet"
    base = [local_model, "--data", str(folder), "--out", str(out), "--batch-size", "4"]
    assert_one_error_line(predict(*base), f"{folder / 'flower' / 'broken.jpg'}:")
    assert not out.parent.exists() or not any(out.parent.iterdir())  # not even a temporary file

    result = predict(*base, "--skip-bad", "--top-k", "3", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))
    assert (summary["rows"], summary["skipped"]) == (len(files) - 1, 1)
    assert "broken.jpg" in summary["skipped_examples"][0]
    table = pq.read_table(out)
    good = [p for p in files if p.name != "broken.jpg"]
    assert table.column("path").to_pylist() == [str(p) for p in good]
    check_rows(table, load(local_model), [p.read_bytes() for p in good], k=3)
    assert [p.name for p in out.parent.iterdir()] == ["preds.parquet"]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.s3
def test_images_under_an_s3_prefix_to_predictions_on_s3(local_model, ray_session, s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 256, (8 + i, 8), np.uint8)) for i in range(5)]
    for i, data in enumerate(images):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=data)
    out = f"s3://{bucket}/predictions/p.parquet"
    result = predict(local_model, "--data", f"s3://{bucket}/in", "--out", out, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["rows"] == 5
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="predictions/")["Contents"]]
    assert keys == ["predictions/p.parquet"]  # the temporary object is gone
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()))
    assert table.column("path").to_pylist() == [f"s3://{bucket}/in/{i}.png" for i in range(5)]
    check_rows(table, load(local_model), images)
