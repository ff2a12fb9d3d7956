"""Photographs for tests, cut and rescaled from scikit-learn's two bundled sample photos."""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def _samples() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)  # china.jpg, flower.jpg: 427x640 RGB


def photo(
    rng: np.random.Generator, height: int, width: int, index: int | None = None
) -> Image.Image:
    """A random window of a sample photo, rescaled to width x height."""
    src = _samples()[int(rng.integers(2)) if index is None else index]
    h = int(rng.integers(src.shape[0] // 3, src.shape[0] + 1))
    w = int(rng.integers(src.shape[1] // 3, src.shape[1] + 1))
    top = int(rng.integers(0, src.shape[0] - h + 1))
    left = int(rng.integers(0, src.shape[1] - w + 1))
    window = Image.fromarray(src[top : top + h, left : left + w])
    return window.resize((width, height), Image.Resampling.BILINEAR)


def save_rotated_jpeg(img: Image.Image, path: Path, orientation: int = 6) -> None:
    """Store pixels as given with an EXIF orientation tag (6: display rotated 90 deg clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=90, exif=exif.tobytes())


def bomb_png(side: int = 15000) -> bytes:
    """A tiny PNG that claims side x side 1-bit pixels (all black): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_photo_tree(root: Path, per_class: int = 6, seed: int = 0) -> dict[str, Path]:
    """root/<class>/*.jpg of mixed sizes around 96x72, plus the awkward cases; returns them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["china", "flower"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(60, 110)), int(rng.integers(60, 130))
            photo(rng, h, w, index=c).save(root / name / f"p{i:02d}.jpg", quality=90)
    special = {
        "grey": root / "china" / "grey.jpg",
        "cmyk": root / "flower" / "cmyk.jpg",
        "rotated": root / "china" / "rotated.jpg",
        "palette": root / "flower" / "palette.png",
    }
    photo(rng, 80, 100, 0).convert("L").save(special["grey"], quality=90)
    photo(rng, 70, 90, 1).convert("CMYK").save(special["cmyk"], quality=90)
    save_rotated_jpeg(photo(rng, 64, 112, 0), special["rotated"])
    photo(rng, 66, 77, 1).convert("P").save(special["palette"])
    return special
