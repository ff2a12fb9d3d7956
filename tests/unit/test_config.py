"""Config: YAML + --set overrides, every error at once with its field path."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig, flatten, load_config, parse_overrides
from pipeline.errors import ConfigError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.digest() == cfg.digest()


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\nmodel:\n  name: resnet18\n")
    cfg = load_config(
        path,
        [
            "train.lr=0.05",
            "scaling.num_workers=1",
            "train.grad_clip=2.5",
            "model.weights=",
            "data.augment.hflip=true",
        ],
    )
    assert cfg.train.lr == 0.05 and cfg.scaling.num_workers == 1
    assert cfg.train.grad_clip == 2.5 and cfg.model.weights is None
    assert cfg.model.name == "resnet18" and cfg.data.augment.hflip is True


def test_all_errors_reported_at_once_with_field_paths(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: -1\n  optimizer: rmsprop\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "3 invalid setting(s)" in msg
    assert "train.lr: Input should be greater than 0 (got -1)" in msg
    assert "train.optimizer" in msg and "'sgd' or 'adamw'" in msg
    assert "modle: unknown field" in msg


def test_batch_smaller_than_workers_is_refused():
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(2\) is smaller than scaling.num_workers \(4\)"
    ):
        load_config(None, ["train.batch_size=2", "scaling.num_workers=4"])


def test_fp16_needs_gpu():
    with pytest.raises(ConfigError, match=r"fp16 needs scaling\.use_gpu"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("pair", ["noequals", "a..b=1", "=3"])
def test_malformed_overrides(pair):
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides([pair])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_flatten_for_mlflow_params():
    flat = flatten(PipelineConfig().to_dict())
    assert flat["train.lr"] == 0.2 and flat["data.augment.hflip"] is False
    assert all(not isinstance(v, dict) for v in flat.values())


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = PipelineConfig()
    assert cfg.tracking.resolved_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking.resolved_uri(tmp_path) == "http://127.0.0.1:5000"
    cfg.tracking.tracking_uri = "sqlite:///x.db"
    assert cfg.tracking.resolved_uri(tmp_path) == "sqlite:///x.db"


def test_resize_takes_a_side_or_height_and_width():
    assert load_config(None, ["data.resize=16"]).data.resize == (16, 16)
    cfg = load_config(None, ["data.resize=[12, 20]"])
    assert cfg.data.resize == (12, 20)
    assert flatten(cfg.to_dict())["data.resize"] == [12, 20]
    assert PipelineConfig.model_validate(cfg.to_dict()).data.resize == (12, 20)  # round trip
    assert load_config(None, []).data.resize is None


@pytest.mark.parametrize("value", ["0", "[16]", "[16, 16, 3]", "sixteen", "true", "5000"])
def test_bad_resize_is_named(value):
    with pytest.raises(ConfigError, match=r"data\.resize: expected a side in pixels"):
        load_config(None, [f"data.resize={value}"])


def test_affine_augmentation_bounds():
    cfg = load_config(None, ["data.augment.rotate_degrees=10", "data.augment.scale=0.1"])
    assert cfg.data.augment.affine
    assert not load_config(None, []).data.augment.affine
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.augment.rotate_degrees=-1", "data.augment.scale=1"])
    assert "data.augment.rotate_degrees" in str(err.value)
    assert "data.augment.scale" in str(err.value)


# --- GPU workers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        # Two ranks on one GPU: NCCL refuses them ("Duplicate GPU detected", ray#48012).
        (["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.gpus_per_worker=0.5"],
         "scaling.gpus_per_worker"),
        # use_gpu with no GPU per worker would pick NCCL with no GPU.
        (["scaling.use_gpu=true", "scaling.gpus_per_worker=0"], "scaling.gpus_per_worker"),
        (["scaling.use_gpu=true", "scaling.gpus_per_worker=1.5"], "scaling.gpus_per_worker"),
        (["scaling.backend=nccl"], "scaling.backend"),
        (["train.sync_bn=true", "scaling.num_workers=2"], "train.sync_bn"),
    ],
)  # fmt: skip
def test_gpu_scaling_that_cannot_work_is_a_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_gpu_scaling_that_works_validates_and_picks_the_backend():
    one_shared = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=1",
                                    "scaling.gpus_per_worker=0.5"])  # fmt: skip
    assert one_shared.scaling.resolved_backend() == "nccl"
    gpus = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=4",
                              "train.sync_bn=true", "scaling.timeout_s=600"])  # fmt: skip
    assert gpus.scaling.resolved_backend() == "nccl" and gpus.scaling.timeout_s == 600
    assert load_config().scaling.resolved_backend() == "gloo"
    gloo_on_gpus = load_config(None, ["scaling.use_gpu=true", "scaling.backend=gloo"])
    assert gloo_on_gpus.scaling.resolved_backend() == "gloo"
