"""Training data held on the device vs streamed from the uint8 cache (``--data-on-device``): speed.

``python bench/stream.py [--train /tmp/cal/split/train.csv --data-root /tmp/cal/data] [--limit 1000]
[--image-size 64] [--batch-size 64] [--device cpu] [--repeats 2] [--cold]``

For each mode, ``always`` (:class:`components.data.DeviceImages`: the set copied to the device once) and
``never`` (:class:`components.data.StreamedImages`: each batch read from the memmap by a background thread
while the previous one trains), alternating ``--repeats`` times: the seconds to hold the set (the copy to
the device), images/s of one training epoch (the real train step, augmentation included, ``--batch-size``,
random init; ResNet18 warmed up on a random batch first, so the epoch times the data path and the steps
only) and images/s of the same epoch's batches drawn with no training (the data path alone). Every
run starts from the same seed: the weights after the epoch are the same in both modes (the result
records how far apart: 0 on CPU). ``--cold`` asks the kernel to drop the cache file's pages first
(``posix_fadvise DONTNEED``), so the first pass reads the disk rather than the page cache.

The images: ``--limit`` of ``--train`` (default ``/tmp/cal/split/train.csv`` with data root
``/tmp/cal/data``; without it, a split of ``../shared/abid`` made under ``--work`` by ``components.ingest``
and ``components.split``), decoded once into the cache; or ``--synthetic N`` random images, for a machine
without the photos (the speed does not depend on what the pixels show). Writes
``bench/results/stream_cpu.json`` (``stream_gpu.json`` with ``--device cuda``).

On a GPU: ``python bench/stream.py --device cuda --synthetic 20000 --image-size 224 --batch-size 256``
(``bash bench/gpu_session.sh stream``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.common import atomic_write_json  # noqa: E402
from components.data import CachedImages, StreamedImages  # noqa: E402

MODES = ("always", "never")


def _real_cache(args: argparse.Namespace) -> tuple[CachedImages, str]:
    """``--limit`` images of ``--train`` (or of a split made under ``--work``) in the uint8 cache."""
    from components.data import build_cache
    from components.manifest import load_labelled
    from components.training.splits import limited

    train, data_root = args.train, args.data_root
    if not train.is_file():
        data, split = args.work / "data", args.work / "split"
        train, data_root = split / "train.csv", data
        if not train.is_file():
            print(f"no {args.train}: making a split of ../shared/abid under {args.work}", flush=True)
            py, abid = sys.executable, REPO.parent / "shared" / "abid"
            ingest = ["-m", "components.ingest", "--source", str(abid), "--out", str(data)]
            subprocess.run([py, *ingest, "--per-class", "300"], cwd=REPO, check=True)
            cut = ["-m", "components.split", "--manifest", str(data / "manifest.csv"), "--out", str(split)]
            subprocess.run([py, *cut], cwd=REPO, check=True)
    rows, paths = limited(*load_labelled(train, data_root), args.limit)
    cache = build_cache(rows, paths, args.image_size, args.work / "cache", progress=False)
    return cache, f"{len(rows)} images of {train} (data root {data_root})"


def _synthetic_cache(args: argparse.Namespace) -> tuple[CachedImages, str]:
    """``--synthetic`` random images in the cache's format (a ``.npy`` memmap), made once."""
    n, s = args.synthetic, args.image_size
    path = args.work / f"synthetic_{n}_{s}.npy"
    if not path.is_file():
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
        rng = np.random.default_rng(0)
        step = max(1, (256 << 20) // (s * s * 3))
        for i in range(0, n, step):
            out[i : i + step] = rng.integers(0, 256, out[i : i + step].shape, dtype=np.uint8)
        out.flush()
        del out
        os.replace(tmp, path)
    counts = np.random.default_rng(1).integers(1, 6, n)
    images = np.load(path, mmap_mode="r")
    return CachedImages(images, counts, [str(i) for i in range(n)], "synthetic", path), f"{n} random images"


def _drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s cached pages (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(mode: str, cache: CachedImages, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """One mode, from a fresh memmap of the cache: hold, train one epoch, then draw its batches again."""
    import torch

    from components.data import open_images
    from components.training.config import TrainConfig
    from components.training.loop import Trainer, batch_plan, train_epochs

    gc.collect()  # the previous mode's memmap unmapped: its pages may be dropped
    if args.cold:
        _drop_page_cache(cache.path)
    cache = dataclasses.replace(cache, images=np.load(cache.path, mmap_mode="r"))
    cfg = TrainConfig(
        Path("."),
        Path("."),
        Path("."),
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=1,
        device=str(device),
        seed=0,
        progress=False,
    )
    _sync(device)
    t0 = time.perf_counter()
    images = open_images(cache, device, mode)
    _sync(device)
    hold_s = time.perf_counter() - t0
    bs, steps = batch_plan(len(images), cfg)
    # warm up (cuDNN autotuning, the allocator, thread pools) on a random batch, with a model thrown away
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (bs, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, len(cfg.classes), (bs,), generator=g)
    warm = Trainer(cfg, device, steps)
    for _ in range(args.warmup_steps):
        warm.train_step(x.to(device), y.to(device))
    _sync(device)
    del warm
    torch.manual_seed(0)  # every run starts from the same weights
    trainer = Trainer(cfg, device, steps)
    c0 = cfg.classes[0]
    (epoch,) = train_epochs(
        images, bs, steps, lambda x, y: trainer.train_step(x, y - c0), range(1), start_epoch=0, seed=0
    )
    weights = torch.cat([v.detach().float().flatten().cpu() for v in trainer.model.state_dict().values()])
    # the data path alone: the same epoch's batches, no training
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    _sync(device)
    t0 = time.perf_counter()
    for xb, _ in images.batches([perm[s * bs : (s + 1) * bs] for s in range(steps)]):
        xb.sum()  # touch it on the device (a device copy is asynchronous)
    _sync(device)
    read_s = time.perf_counter() - t0
    record = {
        "data_on_device": mode,
        "source": type(images).__name__,
        "hold_s": hold_s,
        "train_epoch_images_per_s": epoch.images_per_s,
        "train_loss": epoch.train_loss,
        "data_only_images_per_s": steps * bs / read_s,
        "steps": steps,
        "batch_size": bs,
    }
    if isinstance(images, StreamedImages):
        record |= {"peak_batches_queued": images.peak_queued, "host_buffers": images.host_buffers}
    del images, cache
    return record | {"_weights": weights}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, default=Path("/tmp/cal/split/train.csv"))
    p.add_argument("--data-root", type=Path, default=Path("/tmp/cal/data"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_stream"))
    p.add_argument("--limit", type=int, default=1000, help="images of --train")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="N random images instead")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="each mode this many times, alternating")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="drop the cache file's pages before each mode")
    p.add_argument("--note", default="", help="recorded as is (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/stream_{cpu,gpu}.json")
    args = p.parse_args(argv)
    import torch

    from components.training.checkpoint import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or REPO / "bench" / "results" / f"stream_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    args.work.mkdir(parents=True, exist_ok=True)
    cache, what = _synthetic_cache(args) if args.synthetic else _real_cache(args)
    load_before, t_start = os.getloadavg()[0], time.perf_counter()
    runs, weights = [], []
    for r in range(args.repeats):
        for mode in MODES:
            rec = _one(mode, cache, args, device)
            weights.append(rec.pop("_weights"))
            runs.append({"repeat": r, **rec})
            print(
                f"{mode}: hold {rec['hold_s']:.2f} s, train {rec['train_epoch_images_per_s']:.1f} images/s, "
                f"data alone {rec['data_only_images_per_s']:.0f} images/s",
                flush=True,
            )

    def median(mode: str, key: str) -> float:
        return float(np.median([r[key] for r in runs if r["data_on_device"] == mode]))

    summary = {
        mode: {k: median(mode, k) for k in ("hold_s", "train_epoch_images_per_s", "data_only_images_per_s")}
        for mode in MODES
    }
    result = {
        "benchmark": "stream",
        "command": "python bench/stream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "images": what,
            "n": len(cache),
            "image_size": args.image_size,
            "set_bytes": int(cache.images.nbytes),
            "batch_size": args.batch_size,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cold_page_cache": args.cold,
            "weights": "none (random init, seed 0)",
        },
        "env": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": load_before,
            "load_average_1m_after": os.getloadavg()[0],
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "note": args.note,
        },
        "runs": runs,
        "median": summary,
        "streamed_vs_in_memory_train_speed": summary["never"]["train_epoch_images_per_s"]
        / summary["always"]["train_epoch_images_per_s"],
        # every run of either mode against the first: 0 on CPU (the same arithmetic); on CUDA cuDNN's
        # autotuned algorithms may differ from run to run
        "max_weight_diff_after_the_epoch": max((w - weights[0]).abs().max().item() for w in weights),
        "elapsed_s": time.perf_counter() - t_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(
        f"streamed/in-memory training speed {result['streamed_vs_in_memory_train_speed']:.3f}, weights apart "
        f"by {result['max_weight_diff_after_the_epoch']:.1e}; written to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
