"""Every user error through the CLI, in one table: exit 2 and exactly one `error:` line, the last
thing on stderr, naming the file, field or URI (README, CLI: "Every user error prints one `error:`
line naming the file, field or URI and exits 2").

The commands run in-process through typer's CliRunner. No Ray starts: RAY_ADDRESS points at a
closed port on 127.0.0.1, so a command that got as far as needing Ray would fail differently
(and loudly) instead of starting daemons. MLflow is a SQLite store in a tmp dir; S3 is moto.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.shards import Manifest
from tests.conftest import mlflow_uris_kept
from tests.support import closed_port

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = str(REPO / "jobs" / "configs" / "digits.yaml")

pytestmark = pytest.mark.quick


@dataclass
class World:
    """Everything the cases point at, made once for the module."""

    root: Path
    tracking: str  # sqlite:///.../mlflow.db with registered model `tiny` v1
    paths: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str) -> str:
        return text.format(root=self.root, tracking=self.tracking, **self.paths)


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _npz_files(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    y = np.arange(20) % 2
    d = root / "npz"
    d.mkdir()
    (d / "garbage.npz").write_bytes(b"this is not an npz file at all")
    (d / "truncated.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    np.save(d / "plain.npy", x)
    with zipfile.ZipFile(d / "pickled.npz", "w") as z:  # an object array: needs unpickling
        np.save(p := d / "obj.npy", np.array([object()] * 2, dtype=object), allow_pickle=True)
        z.write(p, "x.npy")
        np.save(p, y[:2])
        z.write(p, "y.npy")
    return {
        "npz_garbage": str(d / "garbage.npz"),
        "npz_truncated": str(d / "truncated.npz"),
        "npy_plain": str(d / "plain.npy"),
        "npz_pickled": str(d / "pickled.npz"),
        "npz_no_keys": _npz(d / "no_keys.npz", a=x, b=y),
        "npz_labels_2d": _npz(d / "labels_2d.npz", x=x, y=y.reshape(10, 2)),
        "npz_labels_float": _npz(d / "labels_float.npz", x=x, y=y.astype(np.float32)),
        "npz_labels_short": _npz(d / "labels_short.npz", x=x, y=y[:5]),
        "npz_labels_range": _npz(d / "labels_range.npz", x=x, y=y + 5, classes=np.array(["a"])),
        "npz_labels_negative": _npz(d / "labels_negative.npz", x=x, y=y - 1),
        "npz_images_1d": _npz(d / "images_1d.npz", x=x.reshape(20, 64)[:, 0], y=y),
        "npz_two_channels": _npz(d / "two_channels.npz", x=np.stack([x, x], -1), y=y),
        "npz_float_range": _npz(d / "float_range.npz", x=x.astype(np.float32), y=y),
        "npz_int32": _npz(d / "int32.npz", x=x.astype(np.int32), y=y),
        "npz_split_no_labels": _npz(d / "split_no_labels.npz", x_train=x, y_train=y, x_val=x),
        "npz_good": _npz(d / "good.npz", x=x, y=y),
    }


def _tiny_registered_model(root: Path, tracking: str, data: str) -> None:
    """An untrained cifar_resnet20 logged and registered as `tiny` v1, as training would."""
    import mlflow
    import torch

    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest
    from pipeline.model_package import log_pipeline_model
    from pipeline.registry import register_run_model
    from pipeline.tracking import start_or_resume_run
    from pipeline.train.loop import model_for

    cfg = load_config(
        None,
        [f"data.uri={data}", f"tracking.tracking_uri={tracking}", "registry.model_name=tiny",
         "tracking.experiment=cli-errors"],
    )  # fmt: skip
    manifest = read_manifest(data)
    with mlflow_uris_kept():
        try:
            run_id = start_or_resume_run(tracking, "cli-errors", run_name="tiny")
            torch.manual_seed(0)
            log_pipeline_model(model_for(cfg, manifest), cfg, manifest)
        finally:
            mlflow.end_run()
        register_run_model(cfg, run_id)


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits_uri) -> World:
    from mlflow.tracking import MlflowClient

    from pipeline.data.sources import WriteOptions, import_numpy

    root = tmp_path_factory.mktemp("cli-errors")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    w = World(root, tracking)
    data = _copy(digits_uri, root / "digits")
    w.paths["data"] = str(data)

    missing = _copy(digits_uri, root / "missing-shard")
    manifest = Manifest.model_validate_json((missing / "manifest.json").read_text())
    shard = manifest.split("train").shards[0].path
    (missing / shard).unlink()
    w.paths |= {"missing_shard": str(missing), "missing_shard_file": shard}

    corrupt = _copy(digits_uri, root / "corrupt-manifest")
    (corrupt / "manifest.json").write_text('{"schema_version": 1, "splits": ')
    w.paths["corrupt"] = str(corrupt)

    rng = np.random.default_rng(1)
    shape_npz = _npz(
        root / "shape.npz", x=rng.integers(0, 256, (40, 12, 12), np.uint8), y=np.arange(40) % 10
    )
    classes_npz = _npz(
        root / "classes.npz", x=rng.integers(0, 256, (30, 8, 8), np.uint8), y=np.arange(30) % 3
    )
    for name, npz in (("other_shape", shape_npz), ("other_classes", classes_npz)):
        import_numpy(npz, WriteOptions(out=str(root / name)))
        w.paths[name] = str(root / name)

    images = root / "images" / "a"
    images.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "0.png")
    w.paths["images"] = str(root / "images")
    w.paths |= _npz_files(root)

    _tiny_registered_model(root, tracking, str(data))
    client = MlflowClient(tracking)
    client.delete_experiment(client.create_experiment("gone"))
    return w


def train(*sets: str, data: str = "{data}") -> list[str]:
    args = ["train", "--config", DIGITS_CONFIG]
    base = (f"data.uri={data}", "data.prepare=", "run.storage_path={root}/runs",
            "tracking.tracking_uri={tracking}", "tracking.timeout_s=2")  # fmt: skip
    for s in (*base, *sets):
        args += ["--set", s]
    return args


def numpy_import(file_key: str) -> list[str]:
    return ["data", "import", "numpy", f"{{{file_key}}}", "--out", f"{{root}}/out-{file_key}"]


# (id, argv, text the error line must contain, marks)
CASES = [
    # pipeline train: everything is checked before Ray would start
    ("train-missing-shard", train(data="{missing_shard}"), "{missing_shard_file}"),
    ("train-corrupt-manifest", train(data="{corrupt}"), "{corrupt}/manifest.json"),
    ("train-no-dataset", train(data="{root}/nothing"), "{root}/nothing"),
    ("train-missing-weights-file", train("model.weights={root}/no-such.pt"), "{root}/no-such.pt"),
    ("train-weights-models-uri-without-version", train("model.weights=models:/tiny"),
     "models:/tiny"),
    ("train-weights-unknown-model", train("model.weights=models:/nope/1"), "models:/nope/1"),
    ("train-batch-larger-than-split", train("train.batch_size=100000", "scaling.num_workers=1"),
     "train.batch_size=100000"),
    ("train-unknown-model", train("model.name=resnet19"), "resnet19"),
    ("train-deleted-experiment", train("tracking.experiment=gone"), "'gone'"),
    ("train-mlflow-down",
     train(f"tracking.tracking_uri=http://127.0.0.1:{closed_port()}"), "http://127.0.0.1:"),
    ("train-bad-set-syntax", ["train", "--config", DIGITS_CONFIG, "--set", "train.lr"],
     "--set 'train.lr'"),
    ("train-missing-config", ["train", "--config", "{root}/nope.yaml"], "{root}/nope.yaml"),
    ("train-bad-field-value", train("train.lr=-1"), "train.lr"),
    ("train-unknown-field", train("train.lrr=0.1"), "train.lrr"),
    ("train-bad-choice", train("train.optimizer=adam"), "train.optimizer"),
    # pipeline data ...
    ("inspect-corrupt-manifest", ["data", "inspect", "{corrupt}"], "{corrupt}/manifest.json"),
    ("inspect-no-dataset", ["data", "inspect", "{root}/nothing"], "{root}/nothing"),
    ("prepare-unknown-source", ["data", "prepare", "mnist", "--out", "{root}/m"], "'mnist'"),
    ("image-folder-bad-size", ["data", "import", "image-folder", "{images}", "--out",
                               "{root}/i1", "--size", "32"], "--size '32'"),
    ("image-folder-zero-size", ["data", "import", "image-folder", "{images}", "--out",
                                "{root}/i2", "--size", "0x8"], "--size '0x8'"),
    ("image-folder-missing-src", ["data", "import", "image-folder", "{root}/no-src", "--out",
                                  "{root}/i3"], "{root}/no-src"),
    # pipeline data import numpy: every way an .npz can be unusable
    ("numpy-missing-file", ["data", "import", "numpy", "{root}/none.npz", "--out", "{root}/n"],
     "{root}/none.npz"),
    ("numpy-not-an-npz", numpy_import("npz_garbage"), "{npz_garbage}"),
    ("numpy-truncated-zip", numpy_import("npz_truncated"), "{npz_truncated}"),
    ("numpy-npy-not-npz", numpy_import("npy_plain"), "{npy_plain}"),
    ("numpy-pickled-object-array", numpy_import("npz_pickled"), "{npz_pickled}"),
    ("numpy-no-known-arrays", numpy_import("npz_no_keys"), "{npz_no_keys}"),
    ("numpy-labels-2d", numpy_import("npz_labels_2d"), "{npz_labels_2d}[y]"),
    ("numpy-labels-float", numpy_import("npz_labels_float"), "{npz_labels_float}[y]"),
    ("numpy-labels-count", numpy_import("npz_labels_short"), "{npz_labels_short}[y]"),
    ("numpy-labels-out-of-range", numpy_import("npz_labels_range"), "{npz_labels_range}"),
    ("numpy-labels-negative", numpy_import("npz_labels_negative"), "{npz_labels_negative}"),
    ("numpy-images-bad-rank", numpy_import("npz_images_1d"), "{npz_images_1d}[x]"),
    ("numpy-two-channels", numpy_import("npz_two_channels"), "{npz_two_channels}[x]"),
    ("numpy-float-out-of-range", numpy_import("npz_float_range"), "{npz_float_range}[x]"),
    ("numpy-int32-pixels", numpy_import("npz_int32"), "{npz_int32}[x]"),
    ("numpy-split-without-labels", numpy_import("npz_split_no_labels"), "{npz_split_no_labels}"),
    ("numpy-bad-fractions", [*numpy_import("npz_good"), "--val-fraction", "0.6",
                             "--test-fraction", "0.6"], "val_fraction"),
    # pipeline models list
    ("models-list-bad-input-size", ["models", "list", "--input-size", "3x224"],
     "--input-size '3x224'"),
    # pipeline evaluate
    ("evaluate-shape-mismatch", ["evaluate", "--model", "models:/tiny/1", "--data",
                                 "{other_shape}"], "{other_shape}"),
    ("evaluate-class-mismatch", ["evaluate", "--model", "models:/tiny/1", "--data",
                                 "{other_classes}"], "{other_classes}"),
    ("evaluate-models-uri-without-version", ["evaluate", "--model", "models:/tiny", "--data",
                                             "{data}"], "models:/tiny"),
    ("evaluate-unknown-version", ["evaluate", "--model", "models:/tiny/7", "--data", "{data}"],
     "models:/tiny/7"),
    ("evaluate-missing-data", ["evaluate", "--model", "models:/tiny/1", "--data",
                               "{root}/nothing"], "{root}/nothing"),
    ("evaluate-unknown-split", ["evaluate", "--model", "models:/tiny/1", "--data", "{data}",
                                "--split", "holdout"], "holdout"),
    # pipeline pull
    ("pull-models-uri-without-version", ["pull", "models:/tiny", "--dest", "{root}/p1",
                                         "--format", "state_dict"], "models:/tiny"),
    ("pull-unknown-format", ["pull", "models:/tiny/1", "--dest", "{root}/p2", "--format",
                             "pickle"], "--format 'pickle'"),
    # pipeline predict: everything is checked before Ray would start
    ("predict-missing-data", ["predict", "models:/tiny/1", "--data", "{root}/nothing", "--out",
                              "{root}/p1.parquet"], "{root}/nothing"),
    ("predict-unknown-version", ["predict", "models:/tiny/7", "--data", "{data}", "--out",
                                 "{root}/p2.parquet"], "'tiny' has no version or alias '7'"),
    ("predict-out-is-a-folder", ["predict", "models:/tiny/1", "--data", "{data}", "--out",
                                 "{images}"], "{images}: is a folder"),
    ("predict-unknown-split", ["predict", "models:/tiny/1", "--data", "{data}", "--split",
                               "holdout", "--out", "{root}/p3.parquet"], "holdout"),
    ("predict-bad-device", ["predict", "models:/tiny/1", "--data", "{data}", "--device", "tpu",
                            "--out", "{root}/p4.parquet"], "--device 'tpu'"),
]  # fmt: skip


def _params():
    for case in CASES:
        name, argv, expected, *marks = case
        yield pytest.param(argv, expected, id=name, marks=marks)


def assert_one_error_line(result, expected: str) -> None:
    """Exit 2; exactly one line starts with `error:`, it is the last line on stderr (nothing of
    the message spills onto further lines), and it names `expected`. Lines are not joined."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], f"the message goes on after its error: line:\n{result.stderr}"
    assert expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def cli_env(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.tracking)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")  # no Ray may start
    monkeypatch.chdir(world.root)
    return world


@pytest.mark.parametrize(("argv", "expected"), list(_params()))
def test_user_errors_are_one_line_naming_the_culprit(cli_env, argv, expected):
    result = CliRunner().invoke(app, [cli_env.fill(a) for a in argv])
    assert_one_error_line(result, cli_env.fill(expected))


# --- S3 (moto) -----------------------------------------------------------------------------------


@pytest.mark.s3
def test_a_missing_bucket_names_the_uri(cli_env, s3_server):
    uri = "s3://no-such-bucket-here/datasets/x"
    result = CliRunner().invoke(app, ["data", "inspect", uri])
    assert_one_error_line(result, uri)


@pytest.mark.s3
def test_missing_s3_credentials_name_the_uri(cli_env, s3_server, monkeypatch, tmp_path):
    bucket = s3_server.new_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    # Nothing else in boto3's chain may find credentials, or reach for them off this machine.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    uri = f"s3://{bucket}/datasets/x"
    result = CliRunner().invoke(app, ["data", "inspect", uri])
    assert "no AWS credentials" in result.stderr, result.stderr
    assert_one_error_line(result, uri)
