"""Image preprocessing shared by training, evaluation and serving (torch-free: numpy + Pillow).

The whole frame is resized to ``image_size`` x ``image_size`` (squashed, never centre-cropped, so
items near the bin's edge still count), then normalized with the ImageNet mean/std. JPEGs are
decoded in Pillow's *draft* mode, which lets libjpeg scale by 1/2, 1/4 or 1/8 while decoding, so a
large original costs little more than a small one. Training caches the uint8 output of
:func:`load_uint8`; serving calls :func:`preprocess_bytes`; both go through the same code, so there
is no train/serve skew.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Formats accepted from users; anything else is rejected before decoding.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP")
#: Refuse images with more pixels than this (decompression bombs); ~40 MP covers any camera here.
DEFAULT_MAX_PIXELS = 40_000_000
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageError(ValueError):
    """The input is not a decodable image (empty, truncated, wrong format)."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than allowed (protects against decompression bombs)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to reproduce the model's input; saved in ``model.json``."""

    image_size: int = 224
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    resize: str = "squash"
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be an integer in [16, 1024], got {self.image_size!r}")
        if self.resize != "squash":
            raise ValueError(f"resize must be 'squash' (whole frame, never cropped), got {self.resize!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos don't pass silently."""
        unknown = set(d) - {"image_size", "mean", "std", "resize", "resample"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        kw = dict(d)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


def open_image(data: bytes | str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) an image from bytes or a path, rejecting non-images and bombs early."""
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) == 0:
            raise ImageError("empty image: the request body or field holds no bytes")
        fp: Any = io.BytesIO(data)
    else:
        fp = os.fspath(data)
    try:
        img = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image too large: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"not a supported image: expected {'/'.join(ALLOWED_FORMATS)} data") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a supported image ({'/'.join(ALLOWED_FORMATS)}): {e}") from e
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has an invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
        )
    return img


def load_uint8(
    data: bytes | str | os.PathLike[str],
    image_size: int,
    *,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode and resize the whole frame to ``(image_size, image_size, 3)`` uint8 RGB."""
    img = open_image(data, max_pixels=max_pixels)
    try:
        if img.format == "JPEG":
            # DCT-domain downscale to the smallest scale that is still >= the target size.
            img.draft("RGB", (image_size, image_size))
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), _RESAMPLE[resample])
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image could not be decoded (truncated or corrupt): {e}") from e
    finally:
        img.close()
    return arr


def normalize_constants(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, shift)``, shape ``(3,)``: normalized = ``x_uint8 * scale - shift``.

    The single source of the normalization numbers; :func:`normalize` and the training device path
    (:mod:`components.data`) both use it, so they cannot drift apart.
    """
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (np.float32(1.0) / (np.float32(255.0) * std)).astype(np.float32)
    shift = (np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)
    return scale, shift


def normalize(batch_uint8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 -> float32 NCHW/CHW normalized with ``spec``."""
    x = np.asarray(batch_uint8)
    if x.dtype != np.uint8 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3), got {x.dtype} {x.shape}")
    scale, shift = normalize_constants(spec)
    # Channels first while still uint8 (a quarter of the bytes to shuffle), then scale and shift in
    # place per channel plane: ~10x faster than broadcasting over the interleaved last axis, with
    # the same float32 operations in the same order, so the results are bit-identical.
    out = np.ascontiguousarray(np.moveaxis(x, -1, -3)).astype(np.float32)
    out *= scale[:, None, None]
    out -= shift[:, None, None]
    return out


def preprocess_bytes(data: bytes | str | os.PathLike[str], spec: PreprocessSpec) -> np.ndarray:
    """One image (bytes or path) -> float32 CHW model input, exactly as the model was trained."""
    return normalize(load_uint8(data, spec.image_size, resample=spec.resample), spec)


def preprocess_batch(items: Sequence[bytes | str | os.PathLike[str]], spec: PreprocessSpec) -> np.ndarray:
    """Several images -> float32 NCHW batch."""
    stack = np.stack([load_uint8(d, spec.image_size, resample=spec.resample) for d in items])
    return normalize(stack, spec)
