"""Encoded image bytes in, uint8 pixels out: the Pillow side shared by import, validation, ingest
and serving.

It imports neither torch nor torchvision (the Ray Data side of ingest loads it in every map task).
Every function treats its bytes as untrusted: an image over Pillow's pixel limit is refused as a
possible decompression bomb before any pixel is decoded, and any decoding failure is an
`ImageDecodeError` whose message says what is wrong.

Reduced-size JPEG decoding: when an image is only needed at a fraction of its size, Pillow's draft
mode lets libjpeg decode it at 1/2, 1/4 or 1/8 scale (its DCT scaling), never below the size the
crop needs, and the crop then resamples from there.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (Pillow filters by the scale)
ORIENTATION = 0x0112  # the EXIF tag


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message says why (no file name: callers add it)."""


def mode_for(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def open_image(data: bytes) -> Image.Image:
    """Open (header only) with the decompression-bomb guard on."""
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"refused as a possible decompression bomb ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"not a decodable image ({exc})") from None
    if limit and img.width * img.height > limit:  # Pillow warns only above the limit
        raise ImageDecodeError(
            f"refused as a possible decompression bomb ({img.width}x{img.height} pixels, over "
            f"the limit of {limit:,})"
        )
    return img


def load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except Exception as exc:  # Pillow raises many types for damaged data
        raise ImageDecodeError(f"not a decodable image ({exc})") from None
    return img


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode (CMYK, palette, greyscale, 16-bit, alpha) -> L or RGB."""
    mode = mode_for(channels)
    if img.mode == mode:
        return img
    if img.mode.startswith("I;16"):  # 16-bit greyscale: keep the high byte, not a clipped low one
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(mode)


def decode(data: bytes, channels: int) -> np.ndarray:
    """Full decode -> HWC uint8 (stored orientation; the importer has applied EXIF already)."""
    pixels = np.asarray(to_channels(load(open_image(data)), channels))
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


# ---------------------------------------------------------------------------------------------
# Import: a source file -> the bytes a dataset stores


@dataclass(frozen=True)
class ImageRecipe:
    """How the importer turns a source file into a stored image."""

    encoding: str  # raw, png or jpeg
    channels: int
    size: tuple[int, int] | None = None  # resize every image to (height, width)
    max_side: int | None = None  # jpeg: shrink larger images to this longer side
    quality: int = 90  # jpeg quality when an image has to be re-encoded


@dataclass
class EncodedImage:
    """One stored image with the per-channel sums the manifest's normalisation is built from."""

    blob: bytes
    height: int
    width: int
    channel_sum: np.ndarray  # float64 per channel, pixels scaled to [0, 1]
    channel_sumsq: np.ndarray
    pixels: int
    reencoded: bool


def _stats(pixels: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    x = pixels.reshape(-1, channels).astype(np.float64) / 255.0
    return x.sum(0), (x * x).sum(0), x.shape[0]


def prepare(data: bytes, recipe: ImageRecipe) -> EncodedImage:
    """Check, orient, convert and encode one source image. JPEGs in RGB or greyscale without a
    rotation are kept byte for byte (the statistics come from a reduced-size decode, which still
    reads every byte, so a damaged file is caught); anything else is re-encoded. A `size` resize
    decodes in full, then converts and resizes bilinearly: exactly what serving does to a raw
    image (`pipeline.serving.to_pixels`), so a model sees the same pixels in both."""
    img = open_image(data)
    c = recipe.channels
    orientation = img.getexif().get(ORIENTATION, 1)
    too_big = recipe.max_side is not None and max(img.size) > recipe.max_side
    if (
        recipe.encoding == "jpeg"
        and img.format == "JPEG"
        and img.mode in ("L", "RGB")
        and orientation == 1
        and recipe.size is None
        and not too_big
    ):
        width, height = img.size
        img.draft(mode_for(c), (max(1, width // 8), max(1, height // 8)))
        small = np.asarray(to_channels(load(img), c))
        return EncodedImage(data, height, width, *_stats(small, c), reencoded=False)
    if img.format == "JPEG" and too_big and recipe.size is None:
        img.draft(img.mode, (recipe.max_side, recipe.max_side))  # never below it on either side
    img = to_channels(ImageOps.exif_transpose(load(img)), c)
    if recipe.size is not None and img.size != (recipe.size[1], recipe.size[0]):
        img = img.resize((recipe.size[1], recipe.size[0]), RESAMPLE)
    elif recipe.max_side is not None and max(img.size) > recipe.max_side:
        scale = recipe.max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), RESAMPLE
        )
    pixels = np.asarray(img).reshape(img.height, img.width, c)
    if recipe.encoding == "raw":
        blob = pixels.tobytes()
    else:
        buf = io.BytesIO()
        if recipe.encoding == "jpeg":
            img.save(buf, format="JPEG", quality=recipe.quality)
        else:
            img.save(buf, format="PNG")
        blob = buf.getvalue()
    return EncodedImage(blob, img.height, img.width, *_stats(pixels, c), reencoded=True)


# ---------------------------------------------------------------------------------------------
# Training and evaluation crops: encoded bytes -> a fixed-size HWC uint8 image

Box = tuple[float, float, float, float]  # (top, left, height, width) in source pixels


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> Box:
    """torchvision's `RandomResizedCrop.get_params`, drawn from a NumPy generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (top, left, h, w)
    in_ratio = width / height  # fall back to a central crop, as torchvision does
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w)


def center_crop_box(height: int, width: int, crop_ratio: float) -> Box:
    """Resize(size / crop_ratio) then CenterCrop(size), as a box in the source: the central
    square whose side is `crop_ratio` of the shorter side."""
    side = min(height, width) * crop_ratio
    return ((height - side) / 2, (width - side) / 2, side, side)


def crop_resize(
    img: Image.Image, box: Box, size: int, channels: int, *, flip: bool = False
) -> np.ndarray:
    """Crop `box` out of an opened (not yet loaded) image and resize it to size x size, decoding
    a JPEG at the smallest DCT scale that still gives the box at least `size` pixels a side;
    `flip` mirrors the result left to right (in Pillow: a NumPy `[:, ::-1]` copy is a strided
    byte-by-byte copy, ~7% of a crop's time)."""
    top, left, h, w = box
    full_w, full_h = img.size
    img.draft(mode_for(channels), (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
    sx, sy = img.width / full_w, img.height / full_h
    img = to_channels(load(img), channels)
    out = img.resize(
        (size, size), RESAMPLE, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    )
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out).reshape(size, size, channels)


def evaluation_crop(
    image: bytes | Image.Image | np.ndarray, size: int, crop_ratio: float, channels: int
) -> np.ndarray:
    """The evaluation transform, for evaluate, promote and serving alike: Resize(size /
    crop_ratio) then CenterCrop(size), HWC uint8 out. Bytes are decoded with the guard above."""
    if isinstance(image, bytes):
        img = open_image(image)
    elif isinstance(image, np.ndarray):
        img = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    else:
        img = image
    return crop_resize(img, center_crop_box(img.height, img.width, crop_ratio), size, channels)
