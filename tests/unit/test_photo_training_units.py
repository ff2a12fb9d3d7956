"""Photographs through training's and serving's pure parts: the input shape a crop gives, the
worker-side conversion, what a model package records, the ImageNet config, and a served JPEG
preprocessed exactly as evaluation saw it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import CropConfig, load_config
from pipeline.data.ingest import DecodeCrop
from pipeline.data.shards import ImageSpec, Manifest, Normalization, SplitInfo
from pipeline.data.transform import photo_batches, to_float_normalized
from pipeline.errors import ConfigError, DatasetError
from pipeline.evaluation import _check_compatible
from pipeline.model_package import eval_crop, example_input, input_shape, package_metadata
from pipeline.serving.predictor import Predictor
from pipeline.train.loop import input_shape as loop_input_shape
from pipeline.train.loop import model_for, steps_per_epoch
from pipeline.train.trainer import cache_in_workers
from tests.photos import photo, save_rotated_jpeg

REPO = Path(__file__).resolve().parents[2]
NORM = Normalization(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def photo_manifest(classes: int = 2, train_rows: int = 100, fixed: bool = False) -> Manifest:
    split = SplitInfo(rows=train_rows, class_counts=[train_rows], shards=[])
    size = {"height": 32, "width": 32} if fixed else {}
    return Manifest(
        name="photos",
        created_at="2026-11-30",
        source="test",
        classes=[f"c{i}" for i in range(classes)],
        image=ImageSpec(encoding="jpeg", channels=3, **size),
        splits={"train": split, "val": split, "test": split},
        normalization=NORM,
        digest="d",
    )


def jpeg_bytes(seed: int = 0, height: int = 90, width: int = 120) -> bytes:
    buf = io.BytesIO()
    photo(np.random.default_rng(seed), height, width).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Training: shape, cache, worker-side conversion


def test_a_crop_sets_the_input_shape_of_a_mixed_size_dataset_and_turns_off_the_cache():
    m = photo_manifest()
    with pytest.raises(DatasetError, match="mixed sizes"):
        model_for(load_config(None, ["model.name=resnet18"]), m)
    cfg = load_config(None, ["model.name=resnet18", "data.crop.size=64", "data.cache=auto"])
    assert loop_input_shape(cfg, m) == (3, 64, 64)
    with torch.device("meta"):
        assert model_for(cfg, m).fc.out_features == 2
    assert cache_in_workers(cfg, m) is False
    digits = load_config(None, ["data.resize=16"])
    fixed = photo_manifest(fixed=True)
    assert loop_input_shape(digits, fixed) == (3, 16, 16)
    assert cache_in_workers(digits, fixed) is True  # fixed-size data keep the worker cache
    with pytest.raises(ConfigError, match=r"data\.cache=always with data\.crop"):
        load_config(None, ["data.crop.size=64", "data.cache=always"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_photo_batches_normalise_uint8_crops_and_auto_augment_keeps_them_uint8(channels_last):
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    y = torch.arange(4)
    (plain,) = photo_batches([{"image": x, "label": y}], NORM, channels_last=channels_last)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(NORM.mean).view(1, 3, 1, 1)) / (
        torch.tensor(NORM.std).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(plain["image"], expected)
    assert plain["image"].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert plain["label"] is y
    torch.manual_seed(0)
    (augmented,) = photo_batches([{"image": x, "label": y}], NORM, policy="trivialaugment")
    assert augmented["image"].shape == (4, 3, 16, 16) and augmented["image"].dtype == torch.float32
    assert not torch.equal(augmented["image"], plain["image"]), "the policy changed something"


# ---------------------------------------------------------------------------------------------
# The model package: what it records, old packages


def test_package_records_the_eval_crop_and_old_packages_keep_their_fixed_shape():
    cfg = load_config(None, ["model.name=resnet18", "data.crop.size=64"])
    meta = package_metadata(cfg, photo_manifest())
    assert meta["crop"] == {"size": 64, "eval_crop_ratio": 0.875}
    assert input_shape(meta) == (3, 64, 64) and example_input(meta).shape == (2, 3, 64, 64)
    old = package_metadata(load_config(None, ["data.resize=16"]), photo_manifest(fixed=True))
    del old["crop"]  # packages written before data.crop existed
    assert eval_crop(old) is None and input_shape(old) == (3, 16, 16)


def test_evaluation_matches_a_crop_model_to_any_size_with_its_channels_only():
    crop_meta = package_metadata(
        load_config(None, ["model.name=resnet18", "data.crop.size=64"]), photo_manifest()
    )
    _check_compatible(crop_meta, photo_manifest(), "m", "ds")  # mixed sizes: fine
    _check_compatible(crop_meta, photo_manifest(fixed=True), "m", "ds")  # fixed: fine too
    grey = photo_manifest().model_copy(
        update={"image": ImageSpec(encoding="jpeg", channels=1), "normalization": NORM}
    )
    with pytest.raises(DatasetError, match="ds: images have 1 channel"):
        _check_compatible(crop_meta, grey, "m", "ds")
    fixed_meta = package_metadata(load_config(None, []), photo_manifest(fixed=True))
    with pytest.raises(DatasetError, match=r"ds: images are 3 channel\(s\), mixed sizes"):
        _check_compatible(fixed_meta, photo_manifest(), "m", "ds")


# ---------------------------------------------------------------------------------------------
# Serving: a JPEG file, as evaluation saw it


def crop_predictor(size: int = 48) -> Predictor:
    cfg = load_config(None, ["model.name=resnet18", f"data.crop.size={size}"])
    meta = package_metadata(cfg, photo_manifest())
    return Predictor(lambda x: np.zeros((len(x), 2), np.float32), meta, source="test")


def eval_view(blob: bytes, size: int = 48) -> np.ndarray:
    pixels = DecodeCrop(3, CropConfig(size=size), train=False)({"image": [blob], "label": [0]})
    return to_float_normalized(torch.from_numpy(pixels["image"]), NORM).contiguous().numpy()


def test_served_jpeg_bytes_get_exactly_the_evaluation_crop(tmp_path):
    predictor = crop_predictor()
    blobs = [jpeg_bytes(1), jpeg_bytes(2, 140, 70)]  # landscape and portrait, any size
    x = predictor.preprocess(blobs)
    assert x.shape == (2, 3, 48, 48) and x.dtype == np.float32 and x.flags.c_contiguous
    for i, blob in enumerate(blobs):
        np.testing.assert_array_equal(x[i], eval_view(blob)[0])
    # A PIL image or decoded pixels of the same photo: the same crop, decoded in full.
    full = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
    from_array = predictor.preprocess(full)
    from_pil = predictor.preprocess(Image.fromarray(full))
    np.testing.assert_array_equal(from_array, from_pil)
    assert np.abs(from_array - x[:1]).mean() < 0.05  # draft decoding differs by rounding only


def test_a_served_exif_rotated_jpeg_is_turned_upright_before_the_crop(tmp_path):
    predictor = crop_predictor()
    img = photo(np.random.default_rng(3), 60, 150)  # stored wide; EXIF says "turn it"
    save_rotated_jpeg(img, tmp_path / "r.jpg")
    served = predictor.preprocess((tmp_path / "r.jpg").read_bytes())
    buf = io.BytesIO()
    img.transpose(Image.Transpose.ROTATE_270).save(buf, format="JPEG", quality=90)
    upright = eval_view(buf.getvalue())
    sideways = eval_view((tmp_path / "r.jpg").read_bytes())
    assert np.abs(served - upright).mean() < 0.1 < np.abs(served - sideways).mean()


def test_a_served_undecodable_image_is_a_serving_error():
    from pipeline.errors import ServingError

    with pytest.raises(ServingError, match=r"image 1: .*decod"):
        crop_predictor().preprocess([jpeg_bytes(), jpeg_bytes()[:300]])


# ---------------------------------------------------------------------------------------------
# The ImageNet job


def test_imagenet_config_loads_and_builds_resnet50_at_224_on_gpu_workers():
    cfg = load_config(REPO / "jobs" / "configs" / "imagenet.yaml")
    assert cfg.model.name == "resnet50" and cfg.train.precision == "bf16"
    assert cfg.scaling.use_gpu and cfg.scaling.resolved_backend() == "nccl"
    assert cfg.data.crop is not None and cfg.data.crop.size == 224
    assert cfg.data.crop.eval_crop_ratio == 0.875 and cfg.data.crop.auto_augment != "none"
    # lr 0.5 is the recipe's for a global batch of 1024
    assert cfg.train.batch_size == 1024 and cfg.train.lr == 0.5
    assert cfg.train.label_smoothing == 0.1 and cfg.train.schedule == "cosine"
    assert cfg.train.warmup_epochs == 5 and 5e-5 <= cfg.train.weight_decay <= 1e-4
    imagenet = photo_manifest(classes=1000, train_rows=1_281_167)
    assert loop_input_shape(cfg, imagenet) == (3, 224, 224)
    assert steps_per_epoch(cfg, imagenet) == 1251
    with torch.device("meta"):
        model = model_for(cfg, imagenet)
    assert model.fc.out_features == 1000
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's ResNet-50


# ---------------------------------------------------------------------------------------------
# A data error raised in a Ray Data task reaches the user as itself


class RemoteTaskError(Exception):
    """Stands in for Ray's wrappers: the remote exception survives only as traceback text."""


class WorkerGroupFailure(Exception):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n... (Output truncated) ...")
        self.worker_failures = failures


def test_root_cause_finds_a_pipeline_error_raised_in_a_ray_task():
    from pipeline.errors import root_cause

    remote = RemoteTaskError(
        "ray::MapBatches(DecodeCrop)() (pid=1)\n"
        '  File "pipeline/data/ingest.py", line 126, in __call__\n'
        "pipeline.errors.DatasetError: image 'a/b.jpg' in the dataset does not decode (x)\n"
        "The above exception was the direct cause of the following exception:\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "To change retry attempts, configure ... if you believe this to be transient."
    )
    wrapped = WorkerGroupFailure({0: remote, 1: remote})
    assert root_cause(wrapped) == "image 'a/b.jpg' in the dataset does not decode (x)"
    try:
        raise RuntimeError("outer") from ValueError("first line\nthe innermost message")
    except RuntimeError as exc:
        assert root_cause(exc) == "the innermost message"  # no remote error: as before
