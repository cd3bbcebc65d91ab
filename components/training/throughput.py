"""Training throughput of the real train step (augmentation included), on synthetic batches."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from components.training.checkpoint import resolve_device
from components.training.config import TrainConfig
from components.training.loop import Trainer


def benchmark_throughput(
    image_size: int = 224,
    batch_size: int = 256,
    steps: int = 50,
    warmup: int = 10,
    *,
    device: str = "auto",
    head: str = "ordinal",
    compile: bool = False,
    channels_last: bool = True,
    amp: bool = True,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Training images/s of the real train step (augmentation included) on synthetic uint8 batches."""
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    cfg = TrainConfig(
        Path("."),
        Path("."),
        Path("."),
        image_size=image_size,
        batch_size=batch_size,
        head=head,
        compile=compile,
        channels_last=channels_last,
        amp=amp,
        device=str(dev),
    )
    trainer = Trainer(cfg, dev, steps + warmup)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(
        0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, device=dev, generator=g
    )
    y = torch.randint(0, len(cfg.classes), (batch_size,), device=dev, generator=g)
    t_compile = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(x, y)
    if trainer.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(x, y)
    loss.item()
    if trainer.cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "images_per_s": steps * batch_size / dt,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_seconds": t0 - t_compile,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "bf16_autocast": trainer.amp,
        "channels_last": trainer.channels_last,
        "compile": compile,
        "head": head,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
