"""Photographs: crops follow torchvision's recipe, batches stay uint8 until the worker, and the
worker's conversion is the normalisation the manifest records."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import ray.cloudpickle as cloudpickle
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import CropConfig, load_config
from pipeline.data import imaging
from pipeline.data.ingest import DecodeCrop, epoch_shard_order
from pipeline.data.shards import Normalization
from pipeline.data.transform import auto_augment, to_float_normalized
from pipeline.errors import ConfigError
from tests.photos import photo
from tests.unit.test_ingest import _imports_in_fresh_python


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_random_resized_crop_boxes_follow_the_scale_and_ratio_ranges():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = imaging.random_resized_crop_box(375, 500, scale, ratio, rng)
        assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
        areas.append(h * w / (375 * 500))
        aspects.append(w / h)
    # Rounding to whole pixels moves both a little past the bounds, as in torchvision.
    assert min(areas) > 0.07 and max(areas) <= 1.0
    assert min(aspects) > 0.7 and max(aspects) < 1.4
    assert np.median(areas) < 0.6 and len({round(a, 2) for a in areas}) > 50  # drawn, not fixed
    # A 10:1 strip cannot hold any 3:4-4:3 crop of the drawn areas: torchvision's central fallback
    assert imaging.random_resized_crop_box(10, 100, (0.9, 1.0), ratio, rng) == (0, 43, 10, 13)


def test_reduced_size_decoding_gives_the_crop_a_full_decode_gives():
    img = photo(np.random.default_rng(1), 375, 500)
    blob = jpeg(img)
    box = (40.0, 60.0, 300.0, 320.0)  # 300 px tall to 224: libjpeg may not reduce (1/2 < 224)
    small = (100.0, 120.0, 150.0, 160.0)
    for b in (box, (0.0, 0.0, 375.0, 500.0), small):
        drafted = imaging.crop_resize(imaging.open_image(blob), b, 64, 3)
        full = Image.open(io.BytesIO(blob)).convert("RGB")
        top, left, h, w = b

        def ref(dy: float, full=full, top=top, left=left, h=h, w=w) -> np.ndarray:
            box = (left, top + dy, left + w, top + dy + h)
            return np.asarray(full.resize((64, 64), imaging.RESAMPLE, box=box)).astype(int)

        assert drafted.shape == (64, 64, 3) and drafted.dtype == np.uint8
        err = np.abs(drafted - ref(0)).mean()
        assert err < 6  # DCT scaling vs. filtering: a few levels
        if top >= h / 8:  # the box moved up by an eighth: clearly worse, so the box is placed right
            assert np.abs(drafted - ref(-h / 8)).mean() > 1.5 * err
    whole = imaging.open_image(blob)
    whole.draft("RGB", (63, 47))
    assert whole.size[0] < 500, "draft mode does reduce this JPEG"


def test_evaluation_crop_is_torchvisions_resize_then_center_crop():
    img = photo(np.random.default_rng(2), 300, 450)
    ours = imaging.evaluation_crop(png(img), 224, 0.875, 3)  # PNG: no reduced decoding
    ref = v2.Compose([v2.Resize(256), v2.CenterCrop(224)])(img)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).mean() < 3
    # The same function on an array, a PIL image or bytes: one transform for every caller.
    np.testing.assert_array_equal(imaging.evaluation_crop(np.asarray(img), 224, 0.875, 3), ours)
    np.testing.assert_array_equal(imaging.evaluation_crop(img, 224, 0.875, 3), ours)


def test_decode_crop_hands_on_fixed_size_uint8_batches_and_flips_some():
    rng = np.random.default_rng(3)
    blobs = [
        jpeg(photo(rng, int(rng.integers(200, 400)), int(rng.integers(200, 500))))
        for _ in range(16)
    ]
    batch = {"image": np.array(blobs, dtype=object), "label": np.arange(16)}
    crop = CropConfig(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    train = DecodeCrop(3, crop, train=True, seed=0)(batch)
    assert train["image"].shape == (16, 32, 32, 3) and train["image"].dtype == np.uint8
    assert train["label"].dtype == np.int64
    # scale = ratio = 1: the crop is the largest centred square... up to the random offset;
    # without flips it is deterministic per seed, and the flips are per image.
    no_flip = CropConfig(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    a = DecodeCrop(3, no_flip, train=True, seed=5)(batch)["image"]
    b = DecodeCrop(3, no_flip, train=True, seed=5)(batch)["image"]
    np.testing.assert_array_equal(a, b)
    flipped = DecodeCrop(3, crop, train=True, seed=5)(batch)["image"]
    mirrored = [np.array_equal(flipped[i], a[i, :, ::-1]) for i in range(16)]
    kept = [np.array_equal(flipped[i], a[i]) for i in range(16)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and 0 < sum(mirrored) < 16
    evaluation = DecodeCrop(3, crop, train=False)(batch)["image"]
    for i in (0, 7):
        np.testing.assert_array_equal(
            evaluation[i], imaging.evaluation_crop(blobs[i], 32, 0.875, 3)
        )


def test_decode_crop_ships_without_torch_and_names_undecodable_images(tmp_path):
    fn = DecodeCrop(3, CropConfig(), train=True)
    blob = tmp_path / "fn.pkl"
    blob.write_bytes(cloudpickle.dumps(fn))
    loaded = _imports_in_fresh_python(
        f"import ray.cloudpickle as c; c.loads(open({str(blob)!r}, 'rb').read())"
    )
    assert loaded == set()
    from pipeline.errors import DatasetError

    with pytest.raises(DatasetError, match=r"does not decode.*pipeline data validate"):
        fn({"image": np.array([b"\xff\xd8junk"], dtype=object), "label": np.array([0])})


def test_to_float_normalized_matches_the_reference_and_keeps_channels_last():
    x = torch.randint(0, 256, (4, 8, 6, 3), dtype=torch.uint8)
    norm = Normalization(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    y = to_float_normalized(x, norm)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(norm.mean).view(1, 3, 1, 1)) / (
        torch.tensor(norm.std).view(1, 3, 1, 1)
    )
    assert y.shape == (4, 3, 8, 6) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert to_float_normalized(x, norm, channels_last=False).is_contiguous()
    with pytest.raises(ValueError, match="uint8 NHWC"):
        to_float_normalized(x.float(), norm)
    with pytest.raises(ValueError, match="1 channel"):
        to_float_normalized(x, Normalization(mean=[0.5], std=[0.5]))


def test_auto_augment_draws_per_image_and_stays_uint8():
    torch.manual_seed(0)
    img = np.asarray(photo(np.random.default_rng(4), 64, 64))
    x = torch.from_numpy(np.stack([img] * 16))
    for policy in ("trivialaugment", "randaugment"):
        y = auto_augment(x, policy)
        assert y.shape == x.shape and y.dtype == torch.uint8
        distinct = {y[i].numpy().tobytes() for i in range(16)}
        assert len(distinct) > 4, policy  # one draw per image, not one per batch
    assert auto_augment(x, "none") is x


def test_epoch_shard_order_is_seeded_and_differs_by_epoch():
    paths = [f"train/part-{i:05d}.parquet" for i in range(20)]
    e0, e1 = epoch_shard_order(paths, 0, 0), epoch_shard_order(paths, 0, 1)
    assert sorted(e0) == paths and sorted(e1) == paths
    assert e0 == epoch_shard_order(paths, 0, 0)  # reproducible
    assert e0 != e1 and e0 != epoch_shard_order(paths, 1, 0)
    firsts = {epoch_shard_order(paths, 0, e)[0] for e in range(40)}
    assert len(firsts) > 10  # every file gets its turn at the front


def test_crop_config_is_validated():
    cfg = load_config(overrides=["data.crop.size=160", "data.crop.scale=[0.35, 1]"])
    assert cfg.data.crop.size == 160 and cfg.data.crop.scale == (0.35, 1.0)
    assert math.isclose(cfg.data.crop.eval_crop_ratio, 0.875)
    for bad, field in (
        ("data.crop.scale=[0.5, 0.2]", "data.crop.scale"),
        ("data.crop.ratio=[0, 1]", "data.crop.ratio"),
        ("data.crop.eval_crop_ratio=1.5", "data.crop.eval_crop_ratio"),
        ("data.crop.auto_augment=autoaugment", "data.crop.auto_augment"),
        ("data.crop.size=4", "data.crop.size"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match=r"data\.crop and data\.resize"):
        load_config(overrides=["data.crop.size=64", "data.resize=32"])
