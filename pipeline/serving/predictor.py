"""A predictor over raw images with exactly the training preprocessing.

`load("models:/NAME@champion")` -> `Predictor`: raw images in (uint8 arrays HxW / HxWxC, PIL
images, PNG/JPEG bytes; one or a list), class names and probabilities out, with exactly the
training preprocessing (the dataset import's convert + bilinear resize, then `BatchTransform`).
A folder written by `pipeline pull` is loaded only after every file's sha256 checks out. Nothing
here unpickles Python objects: networks are rebuilt from the zoo and a state dict loaded with
`weights_only=True`, or read from TorchScript / ONNX files whose hashes were checked.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data import imaging
from pipeline.data.shards import ImageSpec
from pipeline.data.transform import BatchTransform, to_float_normalized
from pipeline.errors import ServingError
from pipeline.model_package import EvalCrop, eval_crop, input_resize, preprocessing, rebuild
from pipeline.serving.fetch import download
from pipeline.serving.pulled import FORMATS, ONNX_FILE, PT2_FILE, TORCHSCRIPT_FILE, verify_pulled
from pipeline.tags import PULL_META_FILE

BATCH = 256  # images per forward pass: bounds memory for long lists
# An encoded image is checked before it is decoded: a few KB of PNG can declare 15000x15000
# pixels (a decompression bomb). 36 MP is a 7360x4912 full-frame camera photo.
MAX_IMAGE_PIXELS = 36_000_000

ImageInput = Any  # np.ndarray (HxW, HxWxC, or NxHxWxC), PIL.Image.Image, bytes (PNG/JPEG)
Forward = Callable[[np.ndarray], np.ndarray]  # normalised float32 NCHW -> logits (N, classes)


def to_pixels(
    images: ImageInput | Sequence[ImageInput], image: ImageSpec, crop: EvalCrop | None = None
) -> np.ndarray:
    """One image or a list -> (N, H, W, C) uint8 at the model's size and channels: the
    dataset's fixed size, or with `crop` the evaluation centre crop of an image of any size."""
    items = _as_list(images)
    h, w = (crop.size, crop.size) if crop else (image.height, image.width)
    out = np.empty((len(items), h, w, image.channels), np.uint8)
    for i, item in enumerate(items):
        try:
            out[i] = _one_image(item, image, crop)
        except ValueError as exc:  # imaging.ImageDecodeError included
            raise ServingError(f"image {i}: {exc}") from None
    return out


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:  # a batch N x H x W x C
        return list(images)
    return [images]


def image_pixels(item: ImageInput, image: ImageSpec, crop: EvalCrop | None = None) -> np.ndarray:
    """One image -> (H, W, C) uint8 as the model takes it; a ValueError says what is wrong with
    it (the caller names the image)."""
    return _one_image(item, image, crop)


def _one_image(item: Any, image: ImageSpec, crop: EvalCrop | None) -> np.ndarray:
    from PIL import Image

    if isinstance(item, bytes | bytearray | memoryview):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(bytes(item)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(_too_many_pixels("the image")) from None
        except (OSError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
            raise ValueError(f"bytes do not decode as an image ({exc}); send PNG or JPEG") from None
        with img:
            width, height = img.size  # read from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(_too_many_pixels(f"{width}x{height}"))
            try:
                return _from_pil(img, image, crop)
            except (OSError, SyntaxError) as exc:
                raise ValueError(f"bytes do not decode as an image ({exc})") from None
    if isinstance(item, Image.Image):
        return _from_pil(item, image, crop)
    if isinstance(item, np.ndarray):
        return _from_array(item, image, crop)
    raise ValueError(
        f"unsupported input {type(item).__name__}; pass a uint8 array (HxW or HxWxC), a PIL "
        "image or PNG/JPEG bytes"
    )


def _too_many_pixels(what: str) -> str:
    return f"{what} has more pixels than the limit of {MAX_IMAGE_PIXELS:,}; resize it first"


def _from_array(pixels: np.ndarray, image: ImageSpec, crop: EvalCrop | None) -> np.ndarray:
    from PIL import Image

    if pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels are {pixels.dtype}; pass uint8 0-255 (for floats in [0, 1]: "
            "(x * 255).round().astype(np.uint8))"
        )
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"array of shape {pixels.shape}: expected HxW or HxWxC with C in 1, 3, 4 (a batch: "
            "a list of images or an NxHxWxC array)"
        )
    if crop is None and pixels.shape == (image.height, image.width, image.channels):
        return pixels  # already what the dataset stores: no conversion at all
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return _from_pil(img, image, crop)


def _from_pil(img: Any, image: ImageSpec, crop: EvalCrop | None = None) -> np.ndarray:
    from PIL import Image, ImageOps

    if crop is not None:
        # Photographs: the importer stored them upright (EXIF applied) and evaluation takes the
        # centre crop of the stored image (`DecodeCrop`, train=False). An image that needs no
        # rotation is cropped still unloaded, so a JPEG decodes at the same reduced DCT scale
        # (draft mode) as in training, giving the same pixels.
        if img.getexif().get(imaging.ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return imaging.evaluation_crop(img, crop.size, crop.ratio, image.channels)
    # The dataset import's steps (pipeline.data.imaging.prepare): apply the EXIF orientation,
    # convert the mode, then bilinear resize.
    img = ImageOps.exif_transpose(img).convert("L" if image.channels == 1 else "RGB")
    if img.size != (image.width, image.height):
        img = img.resize((image.width, image.height), Image.Resampling.BILINEAR)
    return np.asarray(img).reshape(image.height, image.width, image.channels)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    confidence: float
    probabilities: dict[str, float]  # class name -> probability, in the model's class order


class Predictor:
    """Raw images in, class names and probabilities out, with the training preprocessing."""

    def __init__(self, forward: Forward, meta: dict[str, Any], source: str) -> None:
        self.meta, self.source = meta, source
        self.image, self.normalization = preprocessing(meta)
        self.classes: list[str] = list(meta["classes"])
        self._forward = forward
        self.crop = eval_crop(meta)
        self._transform = BatchTransform(
            self.image, self.normalization, augment=None, resize=input_resize(meta)
        )

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """The normalised float32 NCHW batch the network sees."""
        return self.normalize(to_pixels(images, self.image, self.crop))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 from `to_pixels` / `image_pixels` -> normalised float32 NCHW."""
        if self.crop is not None:
            x = to_float_normalized(torch.from_numpy(pixels), self.normalization)
            return x.contiguous().numpy()
        return self._transform.to_tensor(pixels).numpy()

    def logits(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        return self._logits(self.preprocess(images))

    def _logits(self, x: np.ndarray) -> np.ndarray:
        parts = [self._forward(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """(N, classes) softmax probabilities, columns in `classes` order."""
        return self.pixel_probabilities(to_pixels(images, self.image, self.crop))

    def pixel_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """`probabilities` of images already at the model's size (`to_pixels`' output)."""
        logits = self._logits(self.normalize(pixels))
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Prediction]:
        """One Prediction per image (a single image gives a list of one)."""
        return [
            Prediction(
                label=self.classes[int(p.argmax())],
                index=int(p.argmax()),
                confidence=float(p.max()),
                probabilities=dict(zip(self.classes, map(float, p), strict=True)),
            )
            for p in self.probabilities(images)
        ]

    def predict_one(self, image: ImageInput) -> Prediction:
        return self.predict([image])[0]


def torch_forward(model: nn.Module, device: str = "cpu") -> Forward:
    model = model.eval().to(device)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return forward


def _torchscript_forward(path: Path, device: str = "cpu") -> Forward:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still works
        return torch_forward(torch.jit.load(str(path), map_location="cpu"), device)


def _pt2_forward(path: Path) -> Forward:
    # Only after verify_pulled checked the file's sha256 against what this pull wrote. The
    # program was exported in eval mode (batch norm's running statistics are baked in).
    module = torch.export.load(str(path)).module()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return forward


def _onnx_forward(path: Path) -> Forward:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def load(uri: str, *, tracking_uri: str | None = None, timeout_s: float = 10.0) -> Predictor:
    """A Predictor for `models:/NAME@alias`, `models:/NAME/N`, `runs:/ID/model`, or a local
    directory: one written by `pull` (hashes verified first) or an MLflow model directory."""
    path = Path(uri)
    if path.is_dir():
        return load_local(path)
    if "://" not in uri and ":/" not in uri:
        raise ServingError(f"{uri}: not a directory, nor a models:/ or runs:/ URI")
    with tempfile.TemporaryDirectory(prefix="predictor-") as tmp:
        local, _ = download(uri, Path(tmp), tracking_uri, timeout_s)
        model, meta = rebuild(local)
    return Predictor(torch_forward(model), meta, source=uri)


def load_local(path: Path, device: str = "cpu", source: str | None = None) -> Predictor:
    """A Predictor for a local directory: one written by `pull` (hashes verified first) or a
    downloaded model directory, on `device` (cpu or cuda)."""
    if not (path / PULL_META_FILE).is_file():
        model, meta = rebuild(path)
        return Predictor(torch_forward(model, device), meta, source=source or str(path))
    pulled = verify_pulled(path)
    forward = _forward_of(pulled["format"], path, device)
    return Predictor(forward, pulled["pipeline_model"], source=source or str(path))


def _forward_of(fmt: str, path: Path, device: str = "cpu") -> Forward:
    if fmt in ("onnx", "pt2") and device != "cpu":
        raise ServingError(
            f"{path}: a {fmt} pull runs on the CPU only; use --device cpu, or pull the model "
            "as state_dict or torchscript to run it on a GPU"
        )
    if fmt == "torchscript":
        return _torchscript_forward(path / TORCHSCRIPT_FILE, device)
    if fmt == "onnx":
        return _onnx_forward(path / ONNX_FILE)
    if fmt == "pt2":
        return _pt2_forward(path / PT2_FILE)
    if fmt in ("state_dict", "mlflow"):
        model, _ = rebuild(path)
        return torch_forward(model, device)
    raise ServingError(
        f"{path / PULL_META_FILE}: unknown format {fmt!r}; expected one of {FORMATS}"
    )
