"""The run on the shared volume: the config with its paths there, the manifests and only their images
copied in, and the model rank 0 wrote copied back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from components.common import ConfigError
from components.trainjobs.spec import CHECKPOINT_FILE, METRICS_FILE, TrainJobError


def staged_config(cfg: Any, run_dir: Path) -> Any:
    """``cfg`` with every path in ``run_dir`` (the layout :func:`stage_inputs` writes) and the settings a
    pod needs: no progress bars, the image cache per pod (``$INVENTORY_MONITOR_CACHE``), no resume."""
    if getattr(cfg, "pretrain_extra", None) or getattr(cfg, "teacher", ()):
        raise ConfigError(
            "pretraining (pretrain_extra) and teachers do not run on a TrainJob: the pipeline's pretrain "
            "task makes the backbone this fit starts from"
        )
    changes: dict[str, Any] = {
        "train_csv": run_dir / "train.csv",
        "val_csv": run_dir / "val.csv",
        "data_root": run_dir / "data",
        "out_dir": run_dir / "model",
        "cache_dir": None,
        "progress": False,
        "resume": False,
    }
    if cfg.test_csv is not None:
        changes["test_csv"] = run_dir / "test.csv"
    if cfg.weights not in ("none", "imagenet"):
        changes["weights"] = str(run_dir / "weights" / Path(cfg.weights).name)
    return dataclasses.replace(cfg, **changes)


def _staged_path(path: str) -> str:
    """Where an image of a manifest goes under ``data/``: its relative path, or, for an absolute path or
    one that leaves the data root, ``external/<hash>/<file name>``."""
    p = Path(path)
    if p.is_absolute() or ".." in p.parts:
        return str(Path("external") / hashlib.sha256(path.encode()).hexdigest()[:16] / p.name)
    return str(p)


def stage_inputs(cfg: Any, staged: Any) -> int:
    """Copy what ``staged`` (:func:`staged_config`) reads from where ``cfg`` has it: each manifest
    (rewritten with the staged image paths), the images they list, the starting weights (and the
    backbone record next to them). Returns the number of images copied."""
    from components.manifest import read_manifest, resolve_data_root, write_manifest
    from components.training.config import BACKBONE_FILE

    copied: set[str] = set()
    pairs = [(cfg.train_csv, staged.train_csv), (cfg.val_csv, staged.val_csv)]
    if cfg.test_csv is not None:
        pairs.append((cfg.test_csv, staged.test_csv))
    for src_csv, dst_csv in pairs:
        src_root = resolve_data_root(src_csv, cfg.data_root)
        rows = read_manifest(src_csv)
        out_rows = []
        for row in rows:
            rel = _staged_path(row.path)
            if rel not in copied:
                src = Path(row.path) if os.path.isabs(row.path) else src_root / row.path
                if not src.is_file():
                    raise ConfigError(f"{src_csv}: image {src} does not exist")
                dst = Path(staged.data_root) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                copied.add(rel)
            out_rows.append(dataclasses.replace(row, path=rel))
        Path(dst_csv).parent.mkdir(parents=True, exist_ok=True)
        write_manifest(dst_csv, out_rows)
    if staged.weights != cfg.weights:
        dst = Path(staged.weights)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cfg.weights, dst)
        record = Path(cfg.weights).parent / BACKBONE_FILE
        if record.is_file():
            shutil.copyfile(record, dst.parent / BACKBONE_FILE)
    return len(copied)


def collect_model(run_model: Path, out_dir: Path, seconds: float = 0.0) -> Any:
    """Copy the model directory the TrainJob wrote into ``out_dir`` (without ``checkpoint.pt``) and return
    its :class:`~components.training.config.TrainResult` (from ``metrics.json``)."""
    from components.training.config import TrainResult

    metrics_path = Path(run_model) / METRICS_FILE
    if not metrics_path.is_file():
        raise TrainJobError(
            f"the TrainJob completed but {metrics_path} does not exist: rank 0 exports the model into --out"
        )
    shutil.copytree(run_model, out_dir, ignore=shutil.ignore_patterns(CHECKPOINT_FILE), dirs_exist_ok=True)
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    history = list(metrics.pop("history", []))
    return TrainResult(
        Path(out_dir),
        metrics,
        int(metrics.get("best_epoch", 0)),
        int(metrics.get("epochs_run", len(history))),
        bool(metrics.get("stopped_early", False)),
        history,
        seconds,
    )
