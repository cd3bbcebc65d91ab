"""PNG plots for reports (matplotlib with the Agg backend, imported inside each function)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import atomic_write_bytes


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically (a reader never sees half a file), free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    labels: Sequence[int | str],
    path: str | os.PathLike[str],
    *,
    title: str = "confusion matrix",
) -> Path:
    """Counts plus row-normalized shading (rows = true count, columns = predicted count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.6 + 0.8 * len(labels)), dpi=100)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), [str(v) for v in labels])
    ax.set_yticks(range(len(labels)), [str(v) for v in labels])
    ax.set_xlabel("predicted count")
    ax.set_ylabel("true count")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_training_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """Loss, accuracy and RMSE per epoch for train and val (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy", "rmse"), strict=True):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            pts = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if h.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def save_contrastive_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """A contrastive stage per epoch: its NT-Xent loss and the k-NN val accuracy of its features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    for ax, key, title in (
        (axes[0], "train_loss", "NT-Xent loss (train)"),
        (axes[1], "val_accuracy", "k-NN accuracy (val, frozen features)"),
    ):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_class_histogram(
    counts: Mapping[str, Mapping[int, int]],
    path: str | os.PathLike[str],
    *,
    title: str = "images per class and split",
) -> Path:
    """Grouped bars, one group per class and one bar per split: shows imbalance and stratification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(counts)
    classes = sorted({c for per in counts.values() for c in per})
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(classes)), 3.4), dpi=100)
    for k, split in enumerate(splits):
        xs = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(classes))]
        heights = [counts[split].get(c, 0) for c in classes]
        bars = ax.bar(xs, heights, width=width, label=f"{split} ({sum(heights)})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("count (EXPECTED_QUANTITY)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def save_reliability(
    curves: Mapping[str, Sequence[Mapping[str, float]] | None],
    path: str | os.PathLike[str],
    *,
    title: str = "reliability: accuracy per confidence bin",
) -> Path:
    """Reliability diagram: per labelled set of bins (:func:`components.answers.reliability`) the
    accuracy against the mean confidence, the diagonal being perfect calibration. Sets that are None
    (a head without a distribution) leave a note instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    drawn = 0
    for label, bins in curves.items():
        if not bins:
            continue
        conf = [b["confidence"] for b in bins]
        acc = [b["accuracy"] for b in bins]
        sizes = [20 + 300 * b["share"] for b in bins]
        (line,) = ax.plot(conf, acc, marker="", label=label)
        ax.scatter(conf, acc, s=sizes, color=line.get_color(), alpha=0.6)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no confidence:\nthe head has no distribution", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the returned count)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def save_risk_coverage(
    curves: Mapping[str, Sequence[Sequence[float]] | None],
    path: str | os.PathLike[str],
    *,
    title: str = "accuracy of the most certain answers",
) -> Path:
    """Risk-coverage: per labelled curve (``[[share answered, accuracy], ...]``) the accuracy of the
    answers kept when answering the most certain first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.8), dpi=100)
    for label, points in curves.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share answered (the rest sent to review)")
    ax.set_ylabel("accuracy of the answered")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=8)
    return save_figure(fig, path)
