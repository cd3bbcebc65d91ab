"""The model-only ceiling: what onnxruntime alone does with the file the server serves.

No HTTP, no JPEG decoding: the images are preprocessed once, then batches of ``batch_size`` run
back to back on one session with the server's own session settings (the file ``--int8`` picks,
``intra_op_threads`` threads, sequential execution, no spinning). A server can only approach this
rate, since it must also parse requests and decode JPEGs on the same cores; ``bench/serve.py`` reports
the server's throughput as a share of it, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def preprocessed(model_dir: Path, images: Sequence[bytes]) -> np.ndarray:
    """The images as the server feeds them to the model (shared preprocessing, NCHW float32)."""
    from components.modelspec import load_model_spec
    from components.preprocess import preprocess_batch

    spec = load_model_spec(model_dir)
    return preprocess_batch(list(images), spec.preprocess)


def model_only_ceiling(
    model_dir: Path,
    images: Sequence[bytes],
    *,
    threads: int,
    batch_size: int = 16,
    duration: float = 10.0,
    warmup: float = 2.0,
    int8: str = "auto",
) -> dict[str, Any]:
    """Images per minute of the served ONNX file on ``threads`` onnxruntime threads at ``batch_size``."""
    from serving.model import OnnxCounter, ServingOptions

    options = ServingOptions(
        max_batch_size=batch_size, inference_workers=1, intra_op_threads=threads, int8=int8
    )
    model = OnnxCounter(model_dir, options)
    x = preprocessed(model_dir, images)
    batches = [x[i : i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"need at least {batch_size} images for one batch, got {len(x)}")
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration
    done, k, measured_s = 0, 0, 0.0
    while (now := time.perf_counter()) < end:
        model.run(batches[k % len(batches)])
        k += 1
        if now >= measure_from:
            done += batch_size
            measured_s = time.perf_counter() - measure_from
    return {
        "file": model.onnx_path.name,
        "threads": threads,
        "batch_size": batch_size,
        "seconds": round(measured_s, 3),
        "images": done,
        "per_minute": round(done / measured_s * 60, 1) if measured_s else 0.0,
    }
