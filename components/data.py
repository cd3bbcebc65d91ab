"""Fast training data path: a uint8 image cache on disk plus batch augmentation on the training device.

Decoding JPEGs is the slowest part of training a small CNN on a few thousand photos, so every image is
decoded exactly once, by :func:`components.preprocess.load_uint8` (the function serving uses), into a
memory-mapped ``[N, S, S, 3]`` uint8 ``.npy`` file per (image set, size). Trials of a tuning run and
later fits reuse it. A JSON index beside it lists ids, labels and SHA-256s, so a cache built for other
images is never picked up by mistake.

Training moves uint8 batches (or the whole set, when it fits) to the device and augments and normalizes
there, so the GPU is never waiting for the CPU. Normalization takes its numbers from
:func:`components.preprocess.normalize_constants`, as :func:`components.preprocess.normalize` does; the
augmentations never crop the frame's content away on purpose (items at the edge count), and padding is
black rather than mirrored, which would add items.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.common import ConfigError, atomic_write_json, read_json
from components.manifest import ManifestRow
from components.preprocess import PreprocessSpec, load_uint8, normalize_constants

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
DEFAULT_CACHE_ENV = "INVENTORY_MONITOR_CACHE"


def default_cache_dir() -> Path:
    """``$INVENTORY_MONITOR_CACHE`` or ``~/.cache/inventory-monitor/images`` (shared by trials)."""
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "inventory-monitor" / "images"


def image_set_key(rows: Sequence[ManifestRow], image_size: int, resample: str = "bilinear") -> str:
    """Content key of a cache: the ordered (id, sha256) pairs plus the decode settings."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|{resample}|".encode())
    for r in rows:
        h.update(f"{r.id}|{r.sha256 or r.path}\n".encode())
    return h.hexdigest()


def data_hash(rows: Sequence[ManifestRow]) -> str:
    """Order-independent hash of a labelled set (id, sha256, count); recorded in ``model.json``."""
    h = hashlib.sha256()
    for line in sorted(f"{r.id}|{r.sha256}|{r.count}" for r in rows):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class CachedImages:
    """A decoded image set: ``images`` is a read-only memmap ``[N, S, S, 3]`` uint8."""

    images: np.ndarray
    counts: np.ndarray
    ids: list[str]
    key: str
    path: Path

    def __len__(self) -> int:
        return len(self.ids)


def _index_matches(index: Any, rows: Sequence[ManifestRow], image_size: int, resample: str) -> bool:
    return (
        isinstance(index, dict)
        and index.get("version") == CACHE_VERSION
        and index.get("image_size") == image_size
        and index.get("resample") == resample
        and index.get("ids") == [r.id for r in rows]
        and index.get("sha256s") == [r.sha256 for r in rows]
    )


def build_cache(
    rows: Sequence[ManifestRow],
    paths: Sequence[Path],
    image_size: int,
    cache_dir: Path | None = None,
    *,
    resample: str = "bilinear",
    workers: int | None = None,
    progress: bool = True,
) -> CachedImages:
    """Decode ``paths`` once into a uint8 memmap under ``cache_dir`` (or reuse a matching one).

    The array is written to a temp file and renamed only when complete, and the index is written last,
    so an interrupted build is simply rebuilt next time.
    """
    if len(rows) != len(paths) or not rows:
        raise ConfigError(f"need the same, non-zero number of rows and paths ({len(rows)} vs {len(paths)})")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = image_set_key(rows, image_size, resample)
    stem = f"{key[:24]}_{image_size}"
    array_path, index_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    counts = np.asarray([r.count for r in rows], dtype=np.int64)
    ids = [r.id for r in rows]
    if array_path.is_file() and index_path.is_file():
        try:
            index = read_json(index_path)
        except ConfigError:
            index = None
        if _index_matches(index, rows, image_size, resample):
            images = np.load(array_path, mmap_mode="r")
            if images.shape == (len(rows), image_size, image_size, 3):
                LOG.info("reusing image cache %s (%d images at %d px)", array_path, len(rows), image_size)
                return CachedImages(images, counts, ids, key, array_path)
    tmp = cache_dir / f".{stem}.{os.getpid()}.tmp.npy"
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(rows), image_size, image_size, 3)
    )
    workers = workers or min(16, os.cpu_count() or 1)

    def decode(i: int) -> int:
        out[i] = load_uint8(paths[i], image_size, resample=resample)
        return i

    try:
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in tqdm(
                pool.map(decode, range(len(rows))),
                total=len(rows),
                desc=f"decode {image_size}px",
                disable=not progress,
                leave=False,
            ):
                pass
        out.flush()
        os.replace(tmp, array_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(
        index_path,
        {
            "version": CACHE_VERSION,
            "key": key,
            "image_size": image_size,
            "resample": resample,
            "ids": ids,
            "counts": counts.tolist(),
            "sha256s": [r.sha256 for r in rows],
        },
    )
    LOG.info("built image cache %s (%d images at %d px)", array_path, len(rows), image_size)
    return CachedImages(np.load(array_path, mmap_mode="r"), counts, ids, key, array_path)


# --------------------------------------------------------------------------------------- torch side


def device_normalize_constants(spec: PreprocessSpec, device: Any) -> tuple[Any, Any]:
    """:func:`components.preprocess.normalize_constants` as ``[1,3,1,1]`` tensors on ``device``."""
    import torch

    scale, shift = normalize_constants(spec)
    return (
        torch.from_numpy(scale).view(1, 3, 1, 1).to(device),
        torch.from_numpy(shift).view(1, 3, 1, 1).to(device),
    )


def to_float_nchw(batch_uint8_nhwc: Any, channels_last: bool = False) -> Any:
    """uint8 ``[N,H,W,3]`` tensor -> float32 ``[N,3,H,W]`` in 0..255 (channels_last memory if asked)."""
    import torch

    x = batch_uint8_nhwc.permute(0, 3, 1, 2).float()
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def normalize_batch(batch_uint8_nhwc: Any, spec: PreprocessSpec, channels_last: bool = False) -> Any:
    """Device-side twin of :func:`components.preprocess.normalize` (same formula, same constants)."""
    scale, shift = device_normalize_constants(spec, batch_uint8_nhwc.device)
    return to_float_nchw(batch_uint8_nhwc, channels_last) * scale - shift


def _normalize_unit(x: Any, spec: PreprocessSpec, channels_last: bool) -> Any:
    """Normalize a float batch in 0..1 (the augmentations' scale) like :func:`normalize_batch`."""
    import torch

    scale, shift = device_normalize_constants(spec, x.device)
    x = x * (scale * 255.0) - shift
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment_batch(
    batch_uint8_nhwc: Any,
    spec: PreprocessSpec,
    strength: float = 1.0,
    generator: Any = None,
    channels_last: bool = False,
    part: tuple[int, int, int] | None = None,
) -> Any:
    """Random flips, scale/aspect/translate/small rotation and brightness/contrast, then normalize.

    Everything runs batched on the batch's device. ``strength`` scales every range (0 = none). The
    geometric jitter is biased towards zooming out (black padding), so items at the frame's edge are
    rarely pushed out of view and the count label stays true.

    ``part=(start, stop, size)``: the batch is rows ``start:stop`` of a batch of ``size`` (one process's
    share of a distributed batch); the random draws are the whole batch's, so each image is augmented as
    it would be in the whole batch, and ``generator`` advances as in one process.
    """
    import torch
    from torch.nn import functional as tf

    x = to_float_nchw(batch_uint8_nhwc, channels_last).div_(255.0)
    n, dev = x.shape[0], x.device
    if strength > 0:

        def rand(*shape: int) -> torch.Tensor:
            if part is None:
                return torch.rand(*shape, device=dev, generator=generator)
            start, stop, size = part
            return torch.rand(size, *shape[1:], device=dev, generator=generator)[start:stop]

        # Flips: horizontal and vertical are both label-preserving for a bin seen from above.
        flip_h = rand(n) < 0.5
        flip_v = rand(n) < 0.5
        x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
        x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
        # Affine: zoom in up to 8%, out up to 25%; aspect +-15%; shift +-8%; rotate +-10 deg (at strength 1).
        zoom = torch.exp((rand(n) * (np.log(1.25) + np.log(1.08)) - np.log(1.08)) * strength)
        aspect = torch.exp((rand(n) * 2 - 1) * np.log(1.15) * strength)
        sx, sy = zoom * aspect.sqrt(), zoom / aspect.sqrt()
        angle = (rand(n) * 2 - 1) * (np.pi / 18) * strength
        tx, ty = (rand(n) * 2 - 1) * 0.08 * strength, (rand(n) * 2 - 1) * 0.08 * strength
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1
        )
        grid = tf.affine_grid(theta, list(x.shape), align_corners=False)
        x = tf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Photometric: brightness and contrast +-25% at strength 1.
        b = 1 + (rand(n, 1, 1, 1) * 2 - 1) * 0.25 * strength
        c = 1 + (rand(n, 1, 1, 1) * 2 - 1) * 0.25 * strength
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean * b).clamp_(0, 1)
    return _normalize_unit(x, spec, channels_last)


def contrastive_view(
    batch_uint8_nhwc: Any,
    spec: PreprocessSpec,
    generator: Any = None,
    channels_last: bool = False,
) -> Any:
    """One random view per image for contrastive pretraining (two calls give a positive pair).

    Unlike :func:`augment_batch`, views may crop items away: there is no count label to keep true
    here. Random resized crop (20-100 % of the area, aspect 3/4-4/3), both flips, colour jitter
    (brightness, contrast, saturation +-40 %, with probability 0.8) and greyscale (probability 0.2),
    as in SimCLR minus hue and blur, batched on the batch's device; then the same normalization.
    """
    import torch
    from torch.nn import functional as tf

    x = to_float_nchw(batch_uint8_nhwc, channels_last).div_(255.0)
    n, dev = x.shape[0], x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=dev, generator=generator)

    area = 0.2 + 0.8 * rand(n)
    log_aspect = (rand(n) * 2 - 1) * float(np.log(4 / 3))
    w = (area * torch.exp(log_aspect)).sqrt().clamp_(max=1.0)  # half-extents in [-1, 1] coordinates
    h = (area / torch.exp(log_aspect)).sqrt().clamp_(max=1.0)
    cx, cy = (rand(n) * 2 - 1) * (1 - w), (rand(n) * 2 - 1) * (1 - h)  # the crop stays in the frame
    w = torch.where(rand(n) < 0.5, -w, w)  # a negative scale is a flip
    h = torch.where(rand(n) < 0.5, -h, h)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = tf.affine_grid(theta, list(x.shape), align_corners=False)
    x = tf.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = rand(n, 1, 1, 1) < 0.8
    b, c, s = (1 + (rand(n, 1, 1, 1) * 2 - 1) * 0.4 for _ in range(3))
    luma = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    y = (x * b).clamp(0, 1)
    y = ((y - mean * b) * c + mean * b).clamp(0, 1)
    y_grey = (y * luma).sum(1, keepdim=True)
    y = ((y - y_grey) * s + y_grey).clamp(0, 1)
    x = torch.where(jitter, y, x)
    x_grey = (x * luma).sum(1, keepdim=True)
    x = torch.where(rand(n, 1, 1, 1) < 0.2, x_grey.expand_as(x), x)
    return _normalize_unit(x, spec, channels_last)


class DeviceImages:
    """A cached image set, held on the training device when it fits, else read from the memmap."""

    def __init__(self, cache: CachedImages, device: Any, *, max_device_fraction: float = 0.4) -> None:
        import torch

        self.cache = cache
        self.device = torch.device(device)
        self.counts = torch.as_tensor(cache.counts)
        self._on_device: torch.Tensor | None = None
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if cache.images.nbytes < max_device_fraction * free:
                self._on_device = torch.from_numpy(np.array(cache.images)).to(self.device)
        elif cache.images.nbytes < (1 << 30):
            # Small sets: one copy in RAM beats a page fault per batch.
            self._on_device = torch.from_numpy(np.array(cache.images))

    def __len__(self) -> int:
        return len(self.cache)

    def batch_order(self, index: Any) -> Any:
        """``index`` in the order :meth:`batch` returns its rows (sorted when read from the memmap)."""
        import torch

        if self._on_device is not None:
            return index
        return torch.from_numpy(np.sort(index.cpu().numpy()))

    def batch(self, index: Any) -> tuple[Any, Any]:
        """uint8 NHWC images and class counts for ``index`` (a 1-D int64 tensor on any device)."""
        import torch

        if self._on_device is not None:
            idx = index.to(self._on_device.device)
            x = self._on_device.index_select(0, idx)
        else:
            order = np.sort(index.cpu().numpy())  # sorted reads are sequential on the memmap
            index = torch.from_numpy(order)
            x = torch.from_numpy(np.ascontiguousarray(self.cache.images[order]))
        x = x.to(self.device, non_blocking=True)
        y = self.counts.index_select(0, index.cpu()).to(self.device, non_blocking=True)
        return x, y
