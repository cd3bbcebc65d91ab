"""The rows a run trains and validates on: read, checked against the classes, limited, and the
validation rows divided into the selection part and the calibration part (:func:`validation_parts`)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from components.common import ConfigError
from components.manifest import load_labelled
from components.training.config import TrainConfig


def limited(rows: list[Any], paths: list[Path], limit: int | None) -> tuple[list[Any], list[Path]]:
    """At most ``limit`` rows, the same ones every time (smoke runs)."""
    if limit is None or limit >= len(rows):
        return rows, paths
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(rows))[:limit])
    return [rows[i] for i in keep], [paths[i] for i in keep]


def load_split(csv: Path, cfg: TrainConfig, what: str) -> tuple[list[Any], list[Path]]:
    """A manifest's rows and image paths; counts outside ``cfg.classes`` are a ConfigError."""
    rows, paths = load_labelled(csv, cfg.data_root)
    outside = sorted({r.count for r in rows} - set(cfg.classes))
    if outside:
        raise ConfigError(
            f"{what} manifest {csv} has counts {outside} outside --classes {list(cfg.classes)}; "
            "filter it (components.ingest --classes) or widen --classes"
        )
    return limited(rows, paths, cfg.limit)


def absolute(rows: list[Any], paths: list[Path]) -> list[Any]:
    """Rows with absolute image paths: a stage's manifest mixes manifests of different data roots."""
    return [replace(r, path=str(p.resolve())) for r, p in zip(rows, paths, strict=True)]


def calibration_split(
    rows: list[Any], paths: list[Path], frac: float, seed: int
) -> tuple[list[Any], list[Path], list[Any], list[Path]]:
    """``(selection rows, paths, calibration rows, paths)``: ``frac`` of ``rows`` (rounded) for the
    calibration part, stratified by count (each count's share rounded by largest remainder) and drawn
    with ``seed``; both parts keep the manifest's order. ``frac`` 0: every row is for selection.

    Why: the count-set and review thresholds are fitted on images that chose nothing else (not the
    epoch, not the count rule, not the temperature), so their coverage and accuracy hold on new images.
    """
    if frac <= 0:
        return rows, paths, [], []
    by_count: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_count.setdefault(int(r.count), []).append(i)
    quota = {c: frac * len(ix) for c, ix in by_count.items()}
    take = {c: math.floor(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (take[c] - quota[c], c))[
        : round(frac * len(rows)) - sum(take.values())
    ]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for c in sorted(by_count):
        ix = by_count[c]
        held.update(ix[j] for j in rng.permutation(len(ix))[: take[c]])
    if not held or len(held) == len(rows):
        raise ConfigError(
            f"--calib-frac {frac} of {len(rows)} validation images leaves {len(rows) - len(held)} for "
            f"selection and {len(held)} for calibration: both need images; use a larger validation "
            "manifest or --calib-frac 0 (no count sets or review flag)"
        )
    sel = [i for i in range(len(rows)) if i not in held]
    cal = sorted(held)
    return [rows[i] for i in sel], [paths[i] for i in sel], [rows[i] for i in cal], [paths[i] for i in cal]


#: the calibration part is drawn with this seed, not the run's: runs of several seeds on one split then
#: select on the same validation images, and their val figures stay comparable
CALIBRATION_SEED = 0


def validation_parts(cfg: TrainConfig) -> tuple[list[Any], list[Path], list[Any], list[Path]]:
    """The validation manifest's selection part (epoch selection, early stopping, the count rule, the
    temperature, the reported val figures) and calibration part (``--calib-frac``; the count-set and
    review thresholds): ``(selection rows, paths, calibration rows, paths)``."""
    rows, paths = load_split(Path(cfg.val_csv), cfg, "val")
    return calibration_split(rows, paths, cfg.calib_frac, CALIBRATION_SEED)
