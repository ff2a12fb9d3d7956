"""Pulling registered models into services, against a real `mlflow server` subprocess: the Python
predictor, TorchScript / ONNX / state-dict / MLflow exports, hashes, and MLflow's scoring server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import servers, serving
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.shards import decode_images, read_shard
from pipeline.data.sources import WriteOptions, import_image_folder, prepare_digits
from pipeline.errors import IntegrityError, ServingError, TrackingUnavailable
from pipeline.evaluation import evaluate_model
from pipeline.registry import connect, promote
from pipeline.serving import FORMATS, load, pull, sha256_file, to_pixels
from pipeline.tags import CHAMPION, PULL_META_FILE
from tests.conftest import free_port, mlflow_uris_kept, stop
from tests.integration.test_registry import FAST_LOCK
from tests.support import REPO, untrained_accuracy

pytestmark = pytest.mark.slow

PIPELINE = str(Path(sys.executable).parent / "pipeline")
DIGITS_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"
# Probabilities of an export may differ from the original's by at most this (logits are checked
# more strictly, at pull time).
CLOSE = {"torchscript": 1e-5, "onnx": 1e-4, "pt2": 1e-5, "state_dict": 0.0, "mlflow": 0.0}


@pytest.fixture(scope="module")
def env(mlflow_server):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        with mlflow_uris_kept():
            yield mlflow_server


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    return str(out), prepare_digits(WriteOptions(out=str(out)))


@pytest.fixture(scope="module")
def champion(env, trained_model) -> dict[str, str]:
    """The session's model trained by `pipeline train` (the digits recipe: 8x8 digits resized to
    16x16 by `data.resize`), made champion: the predictor, `evaluate` and every export must apply
    the resize the package records."""
    name = trained_model.name
    # The first version to be promoted becomes champion.
    promote(connect(env.uri), name, candidate=trained_model.version, lock=FAST_LOCK)
    return {
        "name": name,
        "version": trained_model.version,
        "run_id": trained_model.run_id,
        "uri": f"models:/{name}@{CHAMPION}",
    }


@pytest.fixture(scope="module")
def test_images(digits) -> tuple[np.ndarray, np.ndarray]:
    """The digits test split as raw uint8 (N, 8, 8, 1) pixels and labels."""
    uri, manifest = digits
    images, labels = [], []
    for shard in manifest.split("test").shards:
        table = read_shard_at(uri, shard.path)
        images.append(decode_images(table.column("image").to_pylist(), manifest.image))
        labels.append(table.column("label").to_numpy())
    return np.concatenate(images), np.concatenate(labels)


def read_shard_at(root: str, rel: str):
    from pipeline.storage import resolve

    return read_shard(resolve(root).join(rel))


@pytest.fixture(scope="module")
def predictor(env, champion):
    return load(champion["uri"])


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 else pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- the Python predictor -----------------------------------------------------------------------


def test_predictor_matches_evaluation_on_the_test_split(predictor, champion, digits, test_images):
    images, labels = test_images
    probs = predictor.probabilities(list(images))
    assert probs.shape == (len(images), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(evaluate_model(champion["uri"], digits[0])["acc"])
    untrained = untrained_accuracy(load_config(DIGITS_CONFIG, [f"data.uri={digits[0]}"]))
    assert accuracy > untrained + 0.3  # 3 epochs of the recipe, against the network at init


def test_predictor_takes_every_raw_image_form(predictor, test_images):
    images = test_images[0][:6]
    expected = predictor.probabilities(images)  # an N x H x W x C uint8 batch
    gray = [im[:, :, 0] for im in images]
    forms = {
        "HxW arrays": gray,
        "HxWx1 arrays": list(images),
        "HxWx3 arrays": [np.repeat(im, 3, axis=2) for im in images],
        "PIL images": [Image.fromarray(g) for g in gray],
        "PNG bytes": [png(g) for g in gray],
    }
    for form, batch in forms.items():
        np.testing.assert_allclose(predictor.probabilities(batch), expected, err_msg=form)
    one = predictor.predict_one(png(gray[0]))
    assert one.label == predictor.classes[int(expected[0].argmax())]
    assert one.probabilities[one.label] == pytest.approx(one.confidence)
    assert [p.label for p in predictor.predict(gray)] == [
        predictor.classes[i] for i in expected.argmax(axis=1)
    ]
    jpeg = io.BytesIO()
    Image.fromarray(gray[0]).save(jpeg, format="JPEG", quality=95)
    assert predictor.predict(jpeg.getvalue())[0].label in predictor.classes


def test_resize_and_channels_match_the_dataset_import(tmp_path):
    """Images of another size and mode become exactly the pixels `data import image-folder`
    stores for them (convert, then bilinear resize)."""
    rng = np.random.default_rng(0)
    originals = {}
    for cls in ("a", "b"):
        (tmp_path / "src" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            rgb = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
            path = tmp_path / "src" / "train" / cls / f"{i}.png"
            Image.fromarray(rgb).save(path)
            originals[f"train/{cls}/{i}.png"] = path.read_bytes()
    out = tmp_path / "imported"
    manifest = import_image_folder(
        tmp_path / "src", WriteOptions(out=str(out)), size=(8, 8), grayscale=True
    )
    stored = {}
    for shard in manifest.split("train").shards:
        table = read_shard_at(str(out), shard.path)
        pixels = decode_images(table.column("image").to_pylist(), manifest.image)
        stored.update(zip(table.column("id").to_pylist(), pixels, strict=True))
    ids = sorted(originals)
    served = to_pixels([originals[i] for i in ids], manifest.image)
    np.testing.assert_array_equal(served, np.stack([stored[i] for i in ids]))
    as_arrays = to_pixels(
        [np.asarray(Image.open(io.BytesIO(originals[i]))) for i in ids], manifest.image
    )
    np.testing.assert_array_equal(as_arrays, served)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (np.zeros((8, 8), np.float32), "uint8"),
        (np.zeros((8, 8, 2), np.uint8), "expected HxW or HxWxC"),
        (b"not an image", "do not decode"),
        ("a string", "unsupported input str"),
    ],
    ids=["float", "two-channels", "garbage-bytes", "string"],
)
def test_unusable_inputs_are_named(predictor, bad, expected):
    with pytest.raises(ServingError, match=expected) as info:
        predictor.predict([np.zeros((8, 8), np.uint8), bad])
    assert "image 1" in str(info.value)


def pixel_bomb(side: int = 15000) -> bytes:
    """A PNG of a few KB that declares side x side pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def test_oversized_images_and_requests_are_refused_before_decoding(predictor, monkeypatch):
    from pipeline.serving import pyfunc

    bomb = pixel_bomb()
    assert len(bomb) < 100_000
    with pytest.raises(ServingError, match=r"image 0: .* more pixels than the limit of 36,000,000"):
        predictor.predict([bomb])
    server_side = pyfunc.PyfuncPredictor()
    server_side.predictor = predictor
    monkeypatch.setattr(pyfunc, "MAX_REQUEST_BYTES", 1000)
    cells = [base64.b64encode(png(np.zeros((8, 8), np.uint8))).decode()] * 20
    with pytest.raises(mlflow.exceptions.MlflowException, match="over the limit of 1,000"):
        server_side.predict(None, pd.DataFrame({"image": cells}))


def test_unknown_model_alias_and_unreachable_server_are_clear_errors(env, champion):
    with pytest.raises(ValueError, match="no registered model 'no-such-model'"):
        load("models:/no-such-model@champion")
    with pytest.raises(ValueError, match=r"no version or alias 'nope'.*champion->v"):
        load(f"models:/{champion['name']}@nope")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable, match=dead):
        load(champion["uri"], tracking_uri=dead, timeout_s=1.0)


# --- pull -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_pull_every_format_matches_the_original(
    env, champion, predictor, test_images, tmp_path, fmt
):
    dest = tmp_path / fmt
    record = pull(champion["uri"], dest, fmt)

    on_disk = json.loads((dest / PULL_META_FILE).read_text())
    assert on_disk == record
    assert record["source"]["version"] == champion["version"]
    assert record["source"]["run_id"] == champion["run_id"]
    assert record["classes"] == [str(i) for i in range(10)]
    assert record["input"]["shape"] == ["batch", 1, 16, 16]
    assert record["image"]["height"] == 8 and record["resize"] == [16, 16]
    assert record["normalization"] == predictor.meta["normalization"]
    assert record["check"]["max_abs_diff"] <= record["check"]["tolerance"]
    assert record["files"] and all(
        sha256_file(dest / rel) == sha for rel, sha in record["files"].items()
    )
    pulled = load(str(dest))
    images = list(test_images[0][:32])
    np.testing.assert_allclose(
        pulled.probabilities(images), predictor.probabilities(images), rtol=0, atol=CLOSE[fmt]
    )
    assert not list(tmp_path.glob(".*"))  # no staging left behind


def test_pulled_mlflow_format_is_the_image_pyfunc(env, champion, predictor, test_images, tmp_path):
    dest = tmp_path / "mlflow"
    pull(champion["uri"], dest, "mlflow")
    pyfunc = mlflow.pyfunc.load_model(str(dest))
    images = test_images[0][:4]
    encoded = [base64.b64encode(png(im)).decode() for im in images]
    out = pyfunc.predict(pd.DataFrame({"image": encoded}))
    expected = predictor.predict(list(images))
    assert list(out["label"]) == [p.label for p in expected]
    np.testing.assert_allclose(
        np.stack(out["probabilities"]), predictor.probabilities(list(images)), atol=1e-12
    )


def test_a_corrupted_pulled_file_is_refused(env, champion, tmp_path):
    dest = tmp_path / "weights"
    pull(champion["uri"], dest, "state_dict")
    weights = dest / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"weights\.pt: sha256 .* does not match"):
        load(str(dest))
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load(str(dest))


def test_a_failed_pull_leaves_no_partial_dest(env, champion, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no version or alias 'nope'"):
        pull(f"models:/{champion['name']}@nope", tmp_path / "a", "onnx")
    monkeypatch.setitem(serving.export.TOLERANCE, "onnx", -1.0)  # any difference fails the check
    with pytest.raises(ServingError, match="nothing was written"):
        pull(champion["uri"], tmp_path / "b", "onnx")
    assert list(tmp_path.iterdir()) == []  # neither DEST nor a staging directory

    monkeypatch.undo()
    existing = tmp_path / "c"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ServingError, match="already exists; pass --overwrite"):
        pull(champion["uri"], existing, "torchscript")
    # --overwrite never deletes what a pull did not write: not a folder of other files...
    with pytest.raises(ServingError, match="did not write"):
        pull(champion["uri"], existing, "torchscript", overwrite=True)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    plain = tmp_path / "d"
    plain.write_text("a file")
    with pytest.raises(ServingError, match="not a folder"):  # ...nor a file
        pull(champion["uri"], plain, "torchscript", overwrite=True)
    assert plain.read_text() == "a file"
    # An empty folder or an earlier pull is replaced, and nothing is left beside it.
    empty = tmp_path / "e"
    empty.mkdir()
    pull(champion["uri"], empty, "torchscript", overwrite=True)
    pull(champion["uri"], empty, "onnx", overwrite=True)
    assert json.loads((empty / PULL_META_FILE).read_text())["format"] == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d", "e"]


def test_cli_pull(env, champion, tmp_path):
    dest = tmp_path / "ts"
    result = CliRunner().invoke(
        app, ["pull", champion["uri"], "--dest", str(dest), "--format", "torchscript"]
    )
    assert result.exit_code == 0, result.output
    assert f"(version {champion['version']})" in result.stdout and "sha256" in result.stdout
    card = (dest / "model_card.md").read_text()  # the card travels with the model, hashed
    assert card.startswith(f"# {champion['name']} version {champion['version']}")
    assert "model_card.md" in json.loads((dest / PULL_META_FILE).read_text())["files"]
    bad = CliRunner().invoke(
        app,
        [
            "pull",
            "models:/no-such-model@champion",
            "--dest",
            str(tmp_path / "x"),
            "--format",
            "onnx",
        ],
    )
    assert bad.exit_code == 2 and "error:" in bad.stderr and "no-such-model" in bad.stderr
    assert not (tmp_path / "x").exists()
    unknown = CliRunner().invoke(
        app, ["pull", champion["uri"], "--dest", str(tmp_path / "y"), "--format", "pickle"]
    )
    assert unknown.exit_code == 2 and "--format 'pickle'" in unknown.stderr


# --- MLflow's scoring server --------------------------------------------------------------------


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_scoring_server_answers_posted_images(env, champion, predictor, test_images, tmp_path):
    """`pipeline serve` starts `mlflow models serve` on the champion's image pyfunc."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [PIPELINE, "serve", champion["uri"], "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": env.uri},
    )
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}/ping", proc, log)
        images = test_images[0][:5]
        rows = [[base64.b64encode(png(im)).decode()] for im in images]
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": rows}})
        assert status == 200, body
        expected = predictor.predict(list(images))
        assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
        np.testing.assert_allclose(
            [p["probabilities"] for p in body["predictions"]],
            predictor.probabilities(list(images)),
            atol=1e-9,
        )
        status, body = post(url, {"dataframe_records": [{"image": "not base64!"}]})
        assert status == 400 and "not base64" in body["message"]
        bomb = base64.b64encode(pixel_bomb()).decode()  # a few KB declaring 225 MP
        status, body = post(url, {"dataframe_records": [{"image": bomb}]})
        assert status == 400 and "more pixels than the limit" in body["message"]
        assert proc.poll() is None  # and the server is still up
    finally:
        stop(proc)


def _wait_for_ping(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"scoring server exited {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s: {log.read_text()}")


def test_every_trained_model_carries_the_pyfunc(env, champion):
    info = mlflow.models.get_model_info(f"runs:/{champion['run_id']}/predictor")
    assert "python_function" in info.flavors
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image"]
    registered = mlflow.models.get_model_info(champion["uri"])
    assert "pytorch" in registered.flavors  # the registered artifact is still model/


def test_tracking_server_command_binds_localhost_and_proxies_artifacts(monkeypatch):
    cmd = servers.tracking_server_command("sqlite:///x.db", "s3://bucket/mlflow", port=5055)
    joined = " ".join(cmd)
    assert "--host 127.0.0.1" in joined and "--port 5055" in joined
    assert "--serve-artifacts --artifacts-destination s3://bucket/mlflow" in joined
    assert "--allowed-hosts" not in joined
    wide = servers.tracking_server_command(host="0.0.0.0", allowed_hosts="mlflow.example.com")
    assert wide[-2:] == ["--allowed-hosts", "mlflow.example.com"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ServingError, match="psycopg2-binary") as info:
        servers.tracking_server_command("postgresql://u:secret@db/mlflow")
    assert "secret" not in str(info.value)
