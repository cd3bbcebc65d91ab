"""The rows a run trains and validates on: read, checked against the classes, limited."""

from __future__ import annotations

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
