"""Ingest: the Ray Data side stays torch-free; the torch side transforms as documented."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import ray.cloudpickle as cloudpickle
import torch

from pipeline.config import AugmentConfig
from pipeline.data.ingest import DecodeImages, TransformBatches
from pipeline.data.shards import ImageSpec, Normalization, encode_image
from pipeline.data.transform import BatchTransform

SPEC = ImageSpec(encoding="raw", height=8, width=8, channels=1)
NORM = Normalization(mean=[0.25], std=[0.5])


def _batch(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    blobs = np.array([encode_image(p, SPEC) for p in pixels], dtype=object)
    return {"image": blobs, "label": np.arange(n) % 10}, pixels


def _imports_in_fresh_python(code: str) -> set[str]:
    """Top-level packages of interest that a fresh interpreter has imported after `code`."""
    watched = "('torch', 'torchvision', 'mlflow')"
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {watched} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def test_ray_data_side_of_ingest_imports_no_torch():
    # Ray Data's DatasetManager and SplitCoordinator actors import this module when they
    # unpickle the dataset plan; torch there costs ~3 CPU-seconds each before the first step.
    assert _imports_in_fresh_python("import pipeline.data.ingest") == set()
    assert _imports_in_fresh_python("import pipeline.data.stream") == set()


@pytest.mark.parametrize("augment", [None, AugmentConfig(random_crop_padding=1)])
def test_map_functions_unpickle_without_torch(tmp_path, augment):
    fns = [DecodeImages(SPEC), TransformBatches(SPEC, NORM, augment)]
    blob = tmp_path / "fns.pkl"
    blob.write_bytes(cloudpickle.dumps(fns))  # what Ray ships with the dataset
    loaded = _imports_in_fresh_python(
        f"import ray.cloudpickle as c; c.loads(open({str(blob)!r}, 'rb').read())"
    )
    assert loaded == set()


def test_training_function_is_shipped_by_reference_to_a_light_module(tmp_path):
    from pipeline.train.trainer import train_loop_per_worker

    blob = tmp_path / "fn.pkl"
    blob.write_bytes(cloudpickle.dumps(train_loop_per_worker))
    # Train V2's controller unpickles it; it never runs the loop, so it must not import it.
    loaded = _imports_in_fresh_python(
        f"import ray.cloudpickle as c; f = c.loads(open({str(blob)!r}, 'rb').read())\n"
        "assert f.__module__ == 'pipeline.train.entry', f.__module__"
    )
    assert "torchvision" not in loaded and "mlflow" not in loaded


def test_transform_batches_matches_batch_transform_and_survives_pickling():
    batch, _ = _batch()
    direct = BatchTransform(SPEC, NORM, None)(batch)
    shipped = cloudpickle.loads(cloudpickle.dumps(TransformBatches(SPEC, NORM, None)))(batch)
    np.testing.assert_array_equal(shipped["image"], direct["image"])
    np.testing.assert_array_equal(shipped["label"], direct["label"])
    assert shipped["image"].shape == (6, 1, 8, 8) and shipped["image"].dtype == np.float32


def test_decode_images_keeps_uint8_nhwc():
    batch, pixels = _batch()
    out = DecodeImages(SPEC)(batch)
    np.testing.assert_array_equal(out["image"], pixels)
    assert out["label"].dtype == np.int64


def test_evaluation_transform_normalises_with_the_manifest_statistics():
    batch, pixels = _batch()
    out = BatchTransform(SPEC, NORM, None)(batch)["image"]
    expected = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.25) / 0.5
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_random_crop_shifts_each_image_by_at_most_the_padding():
    _, pixels = _batch(n=64, seed=1)
    pixels[:, 0, :, :] = 0  # keep a zero border so every shift is recoverable
    pixels[:, -1, :, :] = 0
    pixels[:, :, 0, :] = 0
    pixels[:, :, -1, :] = 0
    transform = BatchTransform(SPEC, Normalization(mean=[0.0], std=[1.0]), AugmentConfig(), 3)
    out = transform.to_tensor(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.allclose(out[i], torch.roll(x[i], shifts=(dy, dx), dims=(1, 2)))
        ]
        assert matches, f"image {i} is not a shift of at most 1 pixel"
        seen.update(matches)
    assert len(seen) >= 5  # shifts are drawn per image, not one per batch


def test_flips_follow_the_config():
    _, pixels = _batch(n=32, seed=2)
    norm = Normalization(mean=[0.0], std=[1.0])
    none = AugmentConfig(random_crop_padding=0, hflip=False)
    x = BatchTransform(SPEC, norm, none, 0).to_tensor(pixels)
    np.testing.assert_allclose(x.numpy(), BatchTransform(SPEC, norm, None).to_tensor(pixels))
    flips = BatchTransform(SPEC, norm, AugmentConfig(random_crop_padding=0, hflip=True), 0)
    y = flips.to_tensor(pixels)
    mirrored = [torch.equal(y[i], torch.flip(x[i], dims=(2,))) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 0 < sum(mirrored) < len(x)


def _digit_like(n: int, seed: int) -> np.ndarray:
    """Bright strokes in the middle of a black 8x8 frame (background 0, like digits)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((n, 8, 8, 1), np.uint8)
    pixels[:, 3:5, 2:6, 0] = rng.integers(64, 256, size=(n, 2, 4))
    return pixels


def test_resize_is_bilinear_and_the_same_in_training_and_evaluation():
    pixels = _digit_like(5, 3)
    plain = Normalization(mean=[0.0], std=[1.0])
    evaluation = BatchTransform(SPEC, plain, None, resize=(16, 12))
    out = evaluation.to_tensor(pixels)
    assert out.shape == (5, 1, 16, 12)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    expected = torch.nn.functional.interpolate(x, size=(16, 12), mode="bilinear")
    torch.testing.assert_close(out, expected)
    # Augmentation without shifts or flips is the identity: training sees what evaluation sees.
    still = AugmentConfig(random_crop_padding=0)
    torch.testing.assert_close(
        BatchTransform(SPEC, plain, still, 0, (16, 12)).to_tensor(pixels), out
    )
    batch, _ = _batch()
    shipped = TransformBatches(SPEC, NORM, None, (16, 16))
    assert cloudpickle.loads(cloudpickle.dumps(shipped))(batch)["image"].shape == (6, 1, 16, 16)


def test_random_affine_rotates_and_zooms_each_image_differently_keeping_the_background():
    pixels = _digit_like(64, 4)
    plain = Normalization(mean=[0.0], std=[1.0])
    aug = AugmentConfig(random_crop_padding=0, rotate_degrees=30, scale=0.2)
    out = BatchTransform(SPEC, plain, aug, 5, resize=(16, 16)).to_tensor(pixels)
    ref = BatchTransform(SPEC, plain, None, resize=(16, 16)).to_tensor(pixels)
    assert out.shape == ref.shape
    # No shift: the strokes turn around the centre and the corners stay black.
    for rows, cols in ((slice(0, 3), slice(0, 3)), (slice(-3, None), slice(-3, None))):
        assert torch.all(out[:, :, rows, cols] == 0)
    changed = [(out[i] - ref[i]).abs().max().item() > 1e-3 for i in range(len(out))]
    assert sum(changed) >= 60  # drawn per image
    # Mass is roughly kept: a zoom of at most 20% scales the strokes' area by at most 1.2^2.
    ratio = out.sum(dim=(1, 2, 3)) / ref.sum(dim=(1, 2, 3))
    assert torch.all(ratio > 1 / 1.2**2 - 0.05) and torch.all(ratio < 1.2**2 + 0.05)
    again = BatchTransform(SPEC, plain, aug, 5, resize=(16, 16)).to_tensor(pixels)
    torch.testing.assert_close(again, out)  # a seed reproduces the draw


def test_random_affine_shifts_by_whole_pixels_within_the_padding():
    pixels = _digit_like(64, 6)
    plain = Normalization(mean=[0.0], std=[1.0])
    # A zoom range too small to move a sample off a pixel centre leaves only the shift.
    aug = AugmentConfig(random_crop_padding=2, scale=1e-7)
    out = BatchTransform(SPEC, plain, aug, 7).to_tensor(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(out[i], torch.roll(x[i], shifts=(dy, dx), dims=(1, 2)), atol=1e-4)
        ]
        assert matches, f"image {i} is not a whole-pixel shift of at most 2"
        seen.update(matches)
    assert len(seen) >= 12
