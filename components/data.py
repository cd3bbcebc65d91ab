"""Fast training data path: a uint8 image cache on disk plus batch augmentation on the training device.

Decoding JPEGs is the slowest part of training a small CNN on a few thousand photos, so every image is
decoded exactly once, by :func:`components.preprocess.load_uint8` (the function serving uses), into a
memory-mapped ``[N, S, S, 3]`` uint8 ``.npy`` file per (image set, size). Trials of a tuning run and
later fits reuse it. A JSON index beside it lists ids, labels and SHA-256s, so a cache built for other
images is never picked up by mistake.

Training holds the whole uint8 set on the device when it fits (:class:`DeviceImages`), else streams it
from the cache a few batches at a time, read ahead by a background thread (:class:`StreamedImages`;
:func:`open_images` chooses, ``--data-on-device``), and augments and normalizes batches on the device, so
the GPU is never waiting for the CPU. Normalization takes its numbers from
:func:`components.preprocess.normalize_constants`, as :func:`components.preprocess.normalize` does; the
augmentations never crop the frame's content away on purpose (items at the edge count), and padding is
black rather than mirrored, which would add items.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

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


# ------------------------------------------------------------------------------------- image sources

#: ``--data-on-device``: where training holds an image set (:func:`open_images`)
DATA_ON_DEVICE = ("auto", "always", "never")
#: ``auto`` holds a set on the device when it takes at most this share of the memory free there
AUTO_DEVICE_FRACTION = 0.5
#: batches a streamed set reads ahead of the one in use
PREFETCH_BATCHES = 2
#: threads reading one streamed batch's rows (parallel page faults: the disk serves several at once)
READ_THREADS = 4
#: a set held on the device is copied there this much at a time (host memory: a chunk, not the set)
_LOAD_CHUNK_BYTES = 256 << 20
_POLL_S = 0.05
_END = object()


class ImageSource(Protocol):
    """What training and prediction draw batches from: :class:`DeviceImages` (the whole set on the
    device) or :class:`StreamedImages` (read from the cache batch by batch). Both give the rows of an
    index in its order, so a fit is the same with either."""

    cache: CachedImages
    device: Any
    counts: Any

    def __len__(self) -> int: ...

    def batch(self, index: Any) -> tuple[Any, Any]: ...

    def batches(self, indices: Iterable[Any]) -> Iterator[tuple[Any, Any]]: ...


class DeviceImages:
    """A cached image set held whole on the training device (in RAM on CPU)."""

    def __init__(self, cache: CachedImages, device: Any) -> None:
        import torch

        self.cache = cache
        self.device = torch.device(device)
        self.counts = torch.as_tensor(cache.counts)
        images = cache.images
        self.images = torch.empty(images.shape, dtype=torch.uint8, device=self.device)
        step = max(1, _LOAD_CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
        for start in range(0, len(images), step):  # chunks: the host never holds the whole set twice
            self.images[start : start + step].copy_(torch.from_numpy(np.array(images[start : start + step])))

    def __len__(self) -> int:
        return len(self.cache)

    def batch(self, index: Any) -> tuple[Any, Any]:
        """uint8 NHWC images and counts of ``index`` (a 1-D int64 tensor on any device), in its order."""
        x = self.images.index_select(0, index.to(self.images.device))
        y = self.counts.index_select(0, index.cpu()).to(self.device, non_blocking=True)
        return x, y

    def batches(self, indices: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """:meth:`batch` of each index in turn."""
        for index in indices:
            yield self.batch(index)


class StreamedImages:
    """A cached image set read from its memmap batch by batch: host memory stays a few batches whatever
    the set's size, and the device holds only the batches in use.

    :meth:`batches` reads ahead in a background thread: each batch's rows go from the memmap (the page
    cache, else the disk) straight into a reused host buffer (pinned on CUDA), split across
    ``read_threads`` threads; at most ``prefetch`` batches wait ready, and the copy to the device is
    non-blocking. Host buffers: ``prefetch + 2`` at most (those waiting, the one being read, the one in
    use). Rows come in the index's order, as :class:`DeviceImages` gives them: a fit is the same.
    """

    def __init__(
        self,
        cache: CachedImages,
        device: Any,
        *,
        prefetch: int = PREFETCH_BATCHES,
        read_threads: int = READ_THREADS,
    ) -> None:
        import torch

        if prefetch < 1 or read_threads < 1:
            raise ValueError(f"prefetch and read_threads must be >= 1, got {prefetch} and {read_threads}")
        self.cache = cache
        self.device = torch.device(device)
        self.counts = torch.as_tensor(cache.counts)
        self.prefetch = prefetch
        self.read_threads = read_threads
        #: the most batches seen waiting in the read-ahead queue (never more than ``prefetch``)
        self.peak_queued = 0
        #: host buffers the latest :meth:`batches` allocated (never more than ``prefetch + 2``)
        self.host_buffers = 0

    def __len__(self) -> int:
        return len(self.cache)

    def _rows(self, index: Any) -> np.ndarray:
        rows = np.asarray(index.cpu().numpy() if hasattr(index, "cpu") else index, dtype=np.int64).ravel()
        n = len(self.cache)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"image index out of range [0, {n}): {rows.min()}..{rows.max()}")
        return rows

    def _read(self, rows: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
        """``cache.images[rows]`` into ``out``, in that order (split across ``pool``'s threads)."""
        images = self.cache.images
        parts = min(self.read_threads, max(1, len(rows) // 4))
        # mode "clip": the rows are checked; "raise" would read into a temporary, then copy
        if pool is None or parts == 1:
            np.take(images, rows, 0, out, "clip")
            return
        cuts = np.linspace(0, len(rows), parts + 1).astype(int)
        jobs = [pool.submit(np.take, images, rows[a:b], 0, out[a:b], "clip") for a, b in pairwise(cuts)]
        for job in jobs:
            job.result()

    def batch(self, index: Any) -> tuple[Any, Any]:
        """uint8 NHWC images and counts of ``index``, in its order, read now (no read-ahead)."""
        import torch

        rows = self._rows(index)
        out = np.empty((len(rows), *self.cache.images.shape[1:]), np.uint8)
        self._read(rows, out)
        y = self.counts.index_select(0, torch.from_numpy(rows))
        return torch.from_numpy(out).to(self.device), y.to(self.device)

    def batches(self, indices: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """:meth:`batch` of each index in turn, read ahead by a background thread (which also iterates
        ``indices``). On CPU a batch's images are valid until the next batch is drawn (its buffer is then
        reused); on CUDA they are the device's copy. Closing the iterator early stops the thread."""
        import torch

        cuda = self.device.type == "cuda"
        shape = self.cache.images.shape[1:]
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        free: queue.Queue[tuple[Any, Any]] = queue.Queue()
        stop = threading.Event()
        self.host_buffers = 0
        gpu = None  # the reader's thread works on this thread's GPU (pinned buffers belong to its context)
        if cuda:
            gpu = self.device.index if self.device.index is not None else torch.cuda.current_device()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=_POLL_S)
                except queue.Full:
                    continue
                self.peak_queued = max(self.peak_queued, ready.qsize())
                return True
            return False

        def buffer(n: int) -> Any:
            """A host buffer for ``n`` rows: a free one, a new one while fewer than the bound exist."""
            while not stop.is_set():
                if free.empty() and self.host_buffers < self.prefetch + 2:
                    self.host_buffers += 1
                    return torch.empty((n, *shape), dtype=torch.uint8, pin_memory=cuda)
                try:
                    buf, copied = free.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if copied is not None:
                    copied.synchronize()  # its copy to the device has finished
                if len(buf) < n:
                    buf = torch.empty((n, *shape), dtype=torch.uint8, pin_memory=cuda)
                return buf
            return None

        def produce() -> None:
            try:
                if gpu is not None:
                    torch.cuda.set_device(gpu)
                pool = ThreadPoolExecutor(self.read_threads, "image-read") if self.read_threads > 1 else None
                try:
                    for index in indices:
                        rows = self._rows(index)
                        buf = buffer(len(rows))
                        if buf is None:
                            return
                        self._read(rows, buf.numpy()[: len(rows)], pool)
                        if not put((buf, rows)):
                            return
                finally:
                    if pool is not None:
                        pool.shutdown()
                put(_END)
            except BaseException as e:  # raised again in the consumer's thread
                put(e)

        thread = threading.Thread(target=produce, name="image-prefetch", daemon=True)
        thread.start()
        held = None
        try:
            while True:
                if held is not None:  # the previous batch is done with: its buffer may be refilled
                    free.put((held, None))
                    held = None
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                buf, rows = item
                y = self.counts.index_select(0, torch.from_numpy(rows))
                if cuda:
                    x = buf[: len(rows)].to(self.device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(torch.cuda.current_stream(self.device))
                    free.put((buf, copied))
                    yield x, y.to(self.device, non_blocking=True)
                else:
                    held = buf
                    yield buf[: len(rows)], y
        finally:
            stop.set()
            thread.join()


def free_memory(device: Any) -> int:
    """Bytes an image set could take on ``device``: CUDA's free memory there (with torch's cached
    blocks); on CPU the RAM the kernel
    says is available (``MemAvailable``), or the physical memory where there is no /proc/meminfo."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # plus what torch's allocator keeps cached for reuse (e.g. a set freed since)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 0


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def open_images(
    cache: CachedImages, device: Any, data_on_device: str = "auto", *, copies: int = 1
) -> ImageSource:
    """The image set as training draws it (``--data-on-device``): ``always`` held whole on ``device``
    (:class:`DeviceImages`), ``never`` streamed from the cache (:class:`StreamedImages`), ``auto`` held
    when ``copies`` of it (CPU under torchrun: one per process of the node, all in its RAM) take at most
    :data:`AUTO_DEVICE_FRACTION` of :func:`free_memory`, else streamed. Streaming is logged, with why."""
    import torch

    if data_on_device not in DATA_ON_DEVICE:
        raise ConfigError(
            f"--data-on-device must be one of {', '.join(DATA_ON_DEVICE)}, got {data_on_device!r}"
        )
    device = torch.device(device)
    size = cache.images.nbytes
    if data_on_device == "always":
        return DeviceImages(cache, device)
    if data_on_device == "never":
        why = "--data-on-device never"
    else:
        free, need = free_memory(device), size * max(1, copies)
        if need <= AUTO_DEVICE_FRACTION * free:
            return DeviceImages(cache, device)
        what = f"{copies} copies ({_size(need)})" if copies > 1 else "that"
        where = f"free on {device}" if device.type == "cuda" else "of RAM available"
        why = (
            f"{what} is over {AUTO_DEVICE_FRACTION:.0%} of the {_size(free)} {where} "
            "(--data-on-device auto; always holds it there anyway)"
        )
    LOG.info("streaming %d images (%s) from the cache: %s; %s", len(cache), _size(size), why, cache.path)
    return StreamedImages(cache, device)
