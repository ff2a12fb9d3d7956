"""Photographs end to end on real JPEG bytes: a generated tree of mixed-size JPEGs (a greyscale, a
CMYK and an EXIF-rotated one among them) imported in parallel, validated, trained (`resnet18`,
RandomResizedCrop to 64 px, 2 CPU workers, 2 epochs) through the CLI against a real MLflow
server, evaluated, pulled as TorchScript and ONNX, and served from a JPEG file with exactly the
evaluation crop training used. A truncated JPEG inside a shard is named by `validate` and stops
training with one clear error line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CropConfig
from pipeline.data.ingest import DecodeCrop
from pipeline.data.photos import ImportOptions
from pipeline.data.shards import SCHEMA, Manifest, Normalization, read_manifest, read_shard
from pipeline.data.sources import WriteOptions, import_image_folder
from pipeline.data.transform import to_float_normalized
from pipeline.data.validate import validate_dataset
from pipeline.evaluation import evaluate_model
from pipeline.storage import resolve
from tests.integration.test_datasets import rewrite_shard
from tests.photos import make_photo_tree

pytestmark = pytest.mark.slow

runner = CliRunner()
SIZE = 64
CROP = CropConfig(size=SIZE)


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory) -> tuple[Path, Path, Manifest]:
    """(source tree, dataset, manifest): 28 photos, mixed sizes, imported by 2 processes."""
    root = tmp_path_factory.mktemp("photos")
    src, out = root / "src", root / "ds"
    make_photo_tree(src, per_class=12)
    opts = WriteOptions(out=str(out), encoding="jpeg", shard_rows=4)
    m = import_image_folder(
        src, opts, val_fraction=0.2, test_fraction=0.2, images=ImportOptions(workers=2)
    )
    return src, out, m


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


def train_args(workdir: Path, data: Path, tracking_uri: str, name: str, *extra: str) -> list[str]:
    sets = [
        f"data.uri={data}",
        "data.prepare=",
        f"data.crop.size={SIZE}",
        "data.crop.scale=[0.25, 1.0]",
        "model.name=resnet18",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=0.05",
        "train.schedule=constant",
        "scaling.num_workers=2",
        f"run.storage_path={workdir / 'runs'}",
        f"run.name={name}",
        f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=photos",
        "registry.model_name=",
        *extra,
    ]
    return ["train", *(a for s in sets for a in ("--set", s))]


def stored_blobs(uri: Path) -> dict[str, bytes]:
    """id -> stored image bytes, over every split."""
    m, root = read_manifest(str(uri)), resolve(str(uri))
    out = {}
    for info in m.splits.values():
        for shard in info.shards:
            t = read_shard(root.join(shard.path))
            out.update(zip(t.column("id").to_pylist(), t.column("image").to_pylist(), strict=True))
    return out


def training_view(blob: bytes, norm: Normalization) -> np.ndarray:
    """What validation and the test split feed the network for one stored image."""
    pixels = DecodeCrop(3, CROP, train=False)({"image": [blob], "label": [0]})["image"]
    return to_float_normalized(torch.from_numpy(pixels), norm).contiguous().numpy()


def test_photos_import_train_evaluate_pull_and_serve_a_jpeg_as_training_saw_it(
    ray_session, tracking, photo_data, tmp_path
):
    from pipeline.serving import load, to_pixels

    src, data, m = photo_data
    assert not m.image.fixed_size and m.imported.reencoded == 3  # CMYK, rotated, palette PNG
    manifest, problems = validate_dataset(str(data))
    assert problems == [] and manifest == m

    r = cli(*train_args(tmp_path, data, tracking, "photos-1"))
    assert r.exit_code == 0, r.output
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("photos")
    (run,) = client.search_runs([exp.experiment_id], "tags.`pipeline.run_name` = 'photos-1'")
    run_id, metrics = run.info.run_id, run.data.metrics
    assert sorted(h.step for h in client.get_metric_history(run_id, "val_acc")) == [0, 1]
    assert 0.0 <= metrics["test_acc"] <= 1.0 and run.data.tags["pipeline.completed"] == "true"
    assert run.data.params["data.crop.size"] == str(SIZE)
    model_uri = f"runs:/{run_id}/model"

    # `evaluate` applies the package's crop and gets the run's own test accuracy.
    r = cli("evaluate", "--model", model_uri, "--data", str(data), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["acc"] == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert result["count"] == m.splits["test"].rows
    # A large split is decoded by Ray Data's tasks instead (forced here): the same numbers.
    through_ray = evaluate_model(model_uri, str(data), ray_data=True)
    assert through_ray["count"] == result["count"]
    assert through_ray["acc"] == pytest.approx(result["acc"], abs=1e-9)
    assert through_ray["loss"] == pytest.approx(result["loss"], rel=1e-4)

    stored = stored_blobs(data)
    original = load(model_uri, tracking_uri=tracking)
    assert original.meta["crop"] == {"size": SIZE, "eval_crop_ratio": 0.875}
    norm = original.normalization
    jpeg = src / "china" / "p00.jpg"
    assert stored["china/p00.jpg"] == jpeg.read_bytes()  # kept byte for byte by the import
    for fmt in ("torchscript", "onnx"):
        dest = tmp_path / f"pulled-{fmt}"
        r = cli("pull", model_uri, "--dest", str(dest), "--format", fmt, "--tracking-uri", tracking)
        assert r.exit_code == 0, r.output
        record = json.loads((dest / "pipeline_pull.json").read_text())
        assert record["input"]["shape"] == ["batch", 3, SIZE, SIZE]
        assert record["crop"] == {"size": SIZE, "eval_crop_ratio": 0.875}
        pulled = load(str(dest))
        # A JPEG file is preprocessed exactly as the evaluation split saw the stored image.
        x = pulled.preprocess(jpeg.read_bytes())
        np.testing.assert_array_equal(x, training_view(stored["china/p00.jpg"], norm))
        # float32 reordering errors grow with the logits (a 2-epoch run here reached 1e4, where
        # one float32 step is 1e-3): the export's own check scales the same way.
        want = original.logits(jpeg.read_bytes())
        scale = max(1.0, float(np.abs(want).max()))
        got = pulled.logits(jpeg.read_bytes())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
        (prediction,) = pulled.predict([jpeg.read_bytes()])
        assert prediction.label in ("china", "flower")

    # A greyscale JPEG is stored as given and served identically; the EXIF-rotated and the CMYK
    # ones were re-encoded upright in RGB by the import, so serving the original files gives the
    # same picture up to JPEG re-encoding (a wrong orientation or colour space would not).
    grey = (src / "china" / "grey.jpg").read_bytes()
    np.testing.assert_array_equal(
        original.preprocess(grey), training_view(stored["china/grey.jpg"], norm)
    )
    for rel in ("china/rotated.jpg", "flower/cmyk.jpg"):
        served = to_pixels([(src / rel).read_bytes()], original.image, original.crop)[0]
        trained = DecodeCrop(3, CROP, train=False)({"image": [stored[rel]], "label": [0]})
        diff = np.abs(served.astype(int) - trained["image"][0].astype(int)).mean()
        assert diff < 4, (rel, diff)
    sideways = np.asarray(Image.open(io.BytesIO((src / "china/rotated.jpg").read_bytes())))
    assert sideways.shape[:2] == (64, 112)  # stored pixels are sideways; the EXIF tag turns them


def test_a_truncated_jpeg_is_named_by_validate_and_stops_training_with_one_error_line(
    ray_session, tracking, photo_data, tmp_path
):
    _, clean, m = photo_data
    data = tmp_path / "ds"
    shutil.copytree(clean, data)
    rel = m.splits["train"].shards[0].path
    table = pq.read_table(data / rel)
    images = table.column("image").to_pylist()
    victim = table.column("id").to_pylist()[1]
    images[1] = images[1][: len(images[1]) // 2]
    bad = table.set_column(
        0, pa.field("image", pa.binary(), nullable=False), pa.array(images, pa.binary())
    )
    rewrite_shard(data, rel, bad.cast(SCHEMA))

    r = cli("data", "validate", str(data))
    assert r.exit_code == 1
    assert f"{rel}: undecodable image (id {victim!r})" in r.output and "truncated" in r.output

    r = cli(*train_args(tmp_path, data, tracking, "photos-truncated", "train.epochs=1"))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert "photos-truncated" in line and f"image {victim!r} in the dataset does not decode" in line
    assert "pipeline data validate" in line
