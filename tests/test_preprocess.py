"""The shared, torch-free preprocessing: whole-frame resize, draft decoding, bad input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.preprocess import (
    ImageError,
    ImageTooLargeError,
    PreprocessSpec,
    load_uint8,
    normalize,
    normalize_constants,
    preprocess_batch,
    preprocess_bytes,
)


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_whole_frame_is_kept_not_centre_cropped() -> None:
    # A wide image whose left and right edges are red: a centre crop would lose them.
    img = Image.new("RGB", (400, 100), (0, 0, 255))
    for x in list(range(0, 40)) + list(range(360, 400)):
        for y in range(100):
            img.putpixel((x, y), (255, 0, 0))
    arr = load_uint8(_jpeg(img), 50)
    assert arr.shape == (50, 50, 3) and arr.dtype == np.uint8
    assert arr[25, 1, 0] > 200 and arr[25, 1, 2] < 60  # left edge still red
    assert arr[25, 48, 0] > 200  # right edge still red
    assert arr[25, 25, 2] > 200 and arr[25, 25, 0] < 60  # middle blue


def test_real_abid_image_bytes_and_path_agree(abid_dir: Path) -> None:
    path = sorted((abid_dir / "bin-images").glob("*.jpg"))[0]
    spec = PreprocessSpec(image_size=64)
    from_path = preprocess_bytes(path, spec)
    from_bytes = preprocess_bytes(path.read_bytes(), spec)
    assert from_path.shape == (3, 64, 64) and from_path.dtype == np.float32
    np.testing.assert_array_equal(from_path, from_bytes)
    batch = preprocess_batch([path, path.read_bytes()], spec)
    assert batch.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(batch[0], batch[1])


def test_normalize_matches_definition() -> None:
    spec = PreprocessSpec(image_size=16)
    x = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    out = normalize(x, spec)
    expected = (x / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out, np.moveaxis(expected, -1, 1), atol=1e-5)


def test_normalize_constants_are_the_ones_normalize_uses() -> None:
    spec = PreprocessSpec(image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    scale, shift = normalize_constants(spec)
    assert scale.shape == shift.shape == (3,) and scale.dtype == shift.dtype == np.float32
    np.testing.assert_allclose(scale, 1 / (255 * np.array(spec.std)), rtol=1e-6)
    np.testing.assert_allclose(shift, np.array(spec.mean) / np.array(spec.std), rtol=1e-6)
    x = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    np.testing.assert_array_equal(normalize(x, spec), np.moveaxis(x * scale - shift, -1, 0))
    # A batch gets exactly (bit for bit) the same float32 arithmetic, each image on its own.
    batch = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    out = normalize(batch, spec)
    assert out.shape == (3, 3, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.moveaxis(batch.astype(np.float32) * scale - shift, -1, 1))
    np.testing.assert_array_equal(out[2], normalize(batch[2], spec))


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", _jpeg(Image.new("RGB", (64, 64)))[:200]],
    ids=["empty", "text", "truncated"],
)
def test_bad_input_is_an_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_uint8(data, 32)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")  # tiny file, 36 MP
    with pytest.raises(ImageTooLargeError):
        load_uint8(buf.getvalue(), 32, max_pixels=10_000_000)


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(image_size=96)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSpec.from_dict({**spec.to_dict(), "imagesize": 3})
    with pytest.raises(ValueError, match="squash"):
        PreprocessSpec(resize="center_crop")
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSpec(image_size=4)


def test_preprocessing_does_not_import_torch() -> None:
    code = (
        "import sys, components.preprocess, components.modelspec, components.manifest;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
