"""Starting, checkpointing and resuming a run: what makes ``--resume`` continue a run or refuse it.

A run's fingerprint (its settings and data hashes) goes into every checkpoint and into the
finished-run marker; a resumed run must match it but for :data:`RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common import ConfigError, atomic_write_json, read_json
from components.data import data_hash
from components.modelspec import ONNX_FILE
from components.training import distributed
from components.training.config import (
    CHECKPOINT_FILE,
    DONE_FILE,
    RESUME_MAY_CHANGE,
    TrainConfig,
    TrainResult,
)

LOG = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable explicit device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device (use auto, cpu, cuda, cuda:0)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Python, numpy and torch seeds (the augmentation has its own generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg: TrainConfig) -> tuple[Path, torch.device]:
    """What every run (a fit, a stage) does first: validate, make its directory, set threads, device
    and seeds. Launched by torchrun: join the process group (this rank's device); rank 0 alone writes."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    if distributed.world_from_env().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = distributed.init(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    return out_dir, device


def run_fingerprint(
    cfg: TrainConfig,
    train_rows: Sequence[Any],
    val_rows: Sequence[Any],
    calib_rows: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Settings and data hashes a resumed run must share with the one it continues: ``val_rows`` are
    the rows validation selects on, ``calib_rows`` the calibration part (a fit's; None: none kept)."""
    out = {
        "params": cfg.to_params(),
        "train_data_sha256": data_hash(train_rows),
        "val_data_sha256": data_hash(val_rows),
    }
    if calib_rows is not None:
        out["calib_data_sha256"] = data_hash(calib_rows)
    return out


def resume_checkpoint(cfg: TrainConfig, out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``--resume``: the checkpoint to continue from (refused, by name, if made with other settings or
    data); None to start afresh. The finished-run marker goes either way: MODEL_DIR is about to change."""
    ckpt: dict[str, Any] | None = None
    ckpt_path = out_dir / CHECKPOINT_FILE
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_resume(ckpt, fingerprint, ckpt_path)
    (out_dir / DONE_FILE).unlink(missing_ok=True)
    return ckpt


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves the old file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _resume_mismatches(old: dict[str, Any], fingerprint: dict[str, Any], source: Path) -> list[str]:
    """``name: old -> new`` for every setting or data hash that differs (allowed changes skipped)."""
    diffs = []
    old_params = old.get("params", old.get("args")) or {}
    new_params = fingerprint["params"]
    # a run saved before a setting existed trained as its default does
    defaults = {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in fields(TrainConfig)
        if f.default is not MISSING
    }
    for key in sorted(set(old_params) | set(new_params)):
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in old_params and key in defaults and new_params.get(key) == defaults[key]:
            continue
        a, b = old_params.get(key, "<unset>"), new_params.get(key, "<unset>")
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    for key, what in (
        ("train_data_sha256", "training data"),
        ("val_data_sha256", "validation data"),
        ("calib_data_sha256", "calibration part of the validation data"),
    ):
        if key not in fingerprint:
            continue
        if key not in old:
            LOG.warning("--resume: %s records no hash of the %s; cannot check it is unchanged", source, what)
        elif old[key] != fingerprint[key]:
            diffs.append(f"{what} (manifest rows: ids, sha256, counts)")
    return diffs


def check_resume(old: dict[str, Any], fingerprint: dict[str, Any], source: Path) -> None:
    """ConfigError naming every difference between the run in ``source`` and this one."""
    diffs = _resume_mismatches(old, fingerprint, source)
    if diffs:
        raise ConfigError(
            f"--resume: {source} was made with different settings or data ({'; '.join(diffs)}); "
            "use a new --out for the new settings, or drop --resume to retrain from scratch"
        )


def finished_run(
    cfg: TrainConfig, out_dir: Path, fingerprint: dict[str, Any], t_start: float
) -> TrainResult | None:
    """The stored result when ``out_dir`` holds a finished run of the same settings and data, else None.

    Only the small ``checkpoint.json`` (and the exported model) are needed, not ``checkpoint.pt``.
    """
    done_path = out_dir / DONE_FILE
    if not done_path.is_file():
        return None
    try:
        done = read_json(done_path)
    except ConfigError:
        return None
    if (
        not isinstance(done, dict)
        or not done.get("finished")
        or "params" not in done
        or "metrics" not in done
    ):
        return None  # written by an older version: fall back to checkpoint.pt
    check_resume(done, fingerprint, done_path)
    if cfg.export and (not done.get("exported") or not (out_dir / ONNX_FILE).is_file()):
        return None  # the exported model is missing: finish the run again from checkpoint.pt
    LOG.info("%s already holds a finished run; not retraining", out_dir)
    return TrainResult(
        out_dir,
        done["metrics"],
        int(done["best_epoch"]),
        int(done["epochs_run"]),
        bool(done["stopped_early"]),
        list(done.get("history", [])),
        time.perf_counter() - t_start,
    )


def mark_finished(out_dir: Path, fingerprint: dict[str, Any], record: dict[str, Any]) -> None:
    """Write the finished-run marker, last: a run with it is not trained again (``--resume``)."""
    atomic_write_json(out_dir / DONE_FILE, {"finished": True, **fingerprint, **record})
