"""A run's stages, in order: the pretraining stage (``--pretrain-epochs``), the fit, the refit
(``--refit``). Each supervised stage is one :func:`~components.training.fit.fit` with its own settings,
built here from the run's; a contrastive stage is :mod:`components.training.contrastive`'s.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from components.common import ConfigError, atomic_write_json
from components.evaluate import count_metrics
from components.manifest import load_labelled, read_manifest, write_manifest
from components.model import decode_outputs
from components.modelspec import STATE_DICT_FILE
from components.training import distributed
from components.training.checkpoint import resolve_device, seed_everything
from components.training.config import (
    BACKBONE_FILE,
    PRETRAIN_DIR,
    REFIT_DIR,
    OnEpoch,
    TrainConfig,
    TrainResult,
)
from components.training.contrastive import contrastive_pretrain
from components.training.decision import test_prediction
from components.training.fit import Fitted, finish, fit, open_run
from components.training.splits import absolute, load_split, validation_parts

LOG = logging.getLogger(__name__)


def train(cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> TrainResult:
    """Train, select on validation, export. ``on_epoch(epoch, metrics)`` may raise to stop (pruning).

    Launched by torchrun, every rank calls this: each trains its part of every batch, rank 0 writes,
    and every rank returns rank 0's result (``on_epoch`` is called on every rank, with the same figures).
    """
    run = open_run(cfg)
    if run.finished is not None:
        return run.finished
    if cfg.pretrain_epochs:
        stage = pretrain_backbone(cfg)
        weights = str(stage.model_dir / STATE_DICT_FILE)
        # the stage's record (objective, images, epochs, its monitor), timed as this run saw it
        pretrained = {**(backbone_info(weights) or {}), "dir": str(stage.model_dir), "seconds": stage.seconds}
        seed_everything(cfg.seed)  # the fit starts from the same RNG state whether stage 1 ran or resumed
    else:
        weights, pretrained = cfg.weights, backbone_info(cfg.weights)
    fitted = fit(run, weights, on_epoch)
    if not cfg.refit:
        return finish(run, fitted, pretrained=pretrained)
    refit = _refit(cfg, weights, fitted)
    # from here on, the refit's weights are the model: exported, tested and served (by rank 0)
    if distributed.is_main():
        fitted.model.load_state_dict(
            torch.load(Path(refit["dir"]) / STATE_DICT_FILE, map_location="cpu", weights_only=True)
        )
    return finish(
        run, fitted, pretrained=pretrained, refit=refit, exported_rows=run.train_rows + run.val_rows
    )


def _fit_stage(stage: TrainConfig) -> TrainResult:
    """A stage that is one fit (pretraining on counts, the refit), resumed or finished with the run."""
    run = open_run(stage)
    if run.finished is not None:
        return run.finished
    pretrained = backbone_info(stage.weights)
    return finish(run, fit(run, stage.weights), pretrained=pretrained)


def _stage_manifest(stage_dir: Path, name: str, rows: list[Any]) -> Path:
    """The stage's own training manifest in its directory (rows with absolute paths), written by rank 0."""

    def write() -> Path:
        stage_dir.mkdir(parents=True, exist_ok=True)
        return write_manifest(stage_dir / name, rows)

    return distributed.on_main(write)


def pretrain_backbone(cfg: TrainConfig) -> TrainResult:
    """Stage 1 of ``--pretrain-epochs`` on the training split plus ``--pretrain-extra`` (the 0 and 6+
    images the 1-5 task leaves out). ``--pretrain-objective counts``: an ordinal head over counts
    0..cap, counts above the cap set to it; ``contrastive``: SimCLR, no labels
    (:mod:`components.training.contrastive`; the extra images are optional there).

    More images teach the backbone what bins and "more items" look like; the fit then starts from it
    (any head is dropped). Val images never enter the training side, and the weights kept are the last
    epoch's: val figures over a wider class range than the val split's say little about a backbone.
    Written under ``MODEL_DIR/pretrain``; resumes with the run (``--resume``).
    """
    contrastive = cfg.pretrain_objective == "contrastive"
    if cfg.pretrain_epochs < 1 or (cfg.pretrain_extra is None and not contrastive):
        raise ConfigError(
            "pretraining needs --pretrain-extra and --pretrain-epochs >= 1 (contrastive: the epochs alone)"
        )
    if distributed.world_from_env().distributed:
        if contrastive:
            raise ConfigError(
                "--pretrain-objective contrastive trains in one process only: run that stage without "
                "torchrun (--pretrain-only), then the fit under torchrun with --weights "
                "MODEL_DIR/pretrain/model.pt"
            )
        distributed.init(resolve_device(cfg.device))  # join the group before rank 0 writes anything
    stage_dir = Path(cfg.out_dir) / PRETRAIN_DIR
    cap = cfg.pretrain_count_cap
    train_rows, train_paths = load_labelled(Path(cfg.train_csv), cfg.data_root)
    extra_rows, extra_paths = (
        load_labelled(Path(cfg.pretrain_extra), cfg.pretrain_data_root) if cfg.pretrain_extra else ([], [])
    )
    for csv in [Path(cfg.val_csv)] + ([Path(cfg.test_csv)] if cfg.test_csv else []):
        held_out = read_manifest(csv)
        ids, hashes = {h.id for h in held_out}, {h.sha256 for h in held_out}
        leaked = sorted(e.id for e in extra_rows if e.id in ids or e.sha256 in hashes)
        if leaked:
            raise ConfigError(
                f"{len(leaked)} images of --pretrain-extra are also in {csv} (first: {leaked[0]}): they "
                "would be trained on; ingest the extra images with counts outside --classes"
            )
    stage_rows = absolute(train_rows + extra_rows, train_paths + extra_paths)
    if contrastive:
        stage = _pretrain_config(cfg, _stage_manifest(stage_dir, "pretrain.csv", stage_rows))
        LOG.info("contrastive pretraining on %d images for %d epochs", len(stage_rows), stage.epochs)
        result = contrastive_pretrain(stage)
        record = {
            "objective": "contrastive",
            "temperature": cfg.pretrain_temperature,
            "knn_val_accuracy_start": result.metrics["knn_val_accuracy_start"],
            "knn_val_accuracy": result.metrics["knn_val_accuracy"],
        }
    else:
        stage_rows = [replace(r, count=min(r.count, cap)) for r in stage_rows]
        stage = _pretrain_config(cfg, _stage_manifest(stage_dir, "pretrain.csv", stage_rows), counts=True)
        LOG.info("pretraining on %d images (counts 0..%d) for %d epochs", len(stage_rows), cap, stage.epochs)
        result = _fit_stage(stage)
        record = {"objective": "counts", "count_cap": cap}
    info = {
        "images": result.metrics["n_train"],
        "epochs": result.epochs_run,
        **record,
        "batch_size": cfg.batch_size,  # the stage's own optimisation settings (the run's)
        "lr": cfg.lr,
        # a resumed, finished stage reports its first run's time, not the reload's
        "seconds": result.metrics.get("train_seconds", result.seconds),
    }
    distributed.on_main(lambda: atomic_write_json(stage_dir / BACKBONE_FILE, info))
    return result


def _pretrain_config(cfg: TrainConfig, manifest: Path, *, counts: bool = False) -> TrainConfig:
    """Stage 1's settings: the run's optimisation, on ``manifest``'s images for ``--pretrain-epochs``.

    Every epoch is trained and the last one kept: val, over other counts than the stage's, cannot rank
    a backbone. With ``counts``, an ordinal head over 0..cap, unsmoothed.
    """
    task: dict[str, Any] = {}
    if counts:
        task = {
            "classes": tuple(range(cfg.pretrain_count_cap + 1)),
            "head": "ordinal",
            "label_smoothing": 0.0,
        }
    return replace(
        cfg,
        train_csv=manifest,
        out_dir=manifest.parent,
        epochs=cfg.pretrain_epochs,
        model_name=f"{cfg.model_name}-pretrain",
        teacher=(),  # the teachers count 1-5, the stage 0..cap
        selection_metric="last",
        patience=0,
        stop_after=0,
        test_csv=None,  # the fit reports on test, the stage does not
        tta=False,
        decision="plain",
        export=True,  # the fit reads the stage's model.pt
        # a stage is a single fit, and its params (model.json, checkpoints) say so
        refit=False,
        pretrain_epochs=0,
        pretrain_extra=None,
        pretrain_data_root=None,
        **task,
    )


def backbone_info(weights: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stage record of ``--weights PATH`` when PATH is a pretraining stage's ``model.pt``, else None.

    A fit started from a separately run stage (``--pretrain-only``, the pipeline's pretrain task) then
    reports the stage in its metrics and model card, as a fit with its own stage does.
    """
    if str(weights) in ("none", "imagenet"):
        return None
    record = Path(weights).parent / BACKBONE_FILE
    if not record.is_file():
        return None
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{record} is not a readable stage record: {e}") from e
    return {"dir": str(record.parent), **info}


def refit_train_val(cfg: TrainConfig, weights: str, epochs: int) -> TrainResult:
    """``--refit``: the selected run's recipe trained again on train + val, stopped after ``epochs``.

    Why: with a few thousand images, the validation split is data the selected model never learnt
    from. Once val has chosen the epoch (and the count rule), the same start (``weights``: the
    pretrained backbone, if any), seed and schedule (it still spans ``--epochs``) on train + val give
    that epoch's counterpart with ~20 % more data. Val figures cannot score it (val is trained on):
    test only reports it. Only val's selection part joins the training images: the calibration part
    (``--calib-frac``) stays held out, so the answers' thresholds, fitted on it with the refit model,
    still hold. Written under ``MODEL_DIR/refit``; resumes with the run (``--resume``).
    """
    train_rows, train_paths = load_split(Path(cfg.train_csv), cfg, "train")
    val_rows, val_paths, _, _ = validation_parts(cfg)  # the calibration part stays held out
    rows = absolute(train_rows + val_rows, train_paths + val_paths)
    stage_dir = Path(cfg.out_dir) / REFIT_DIR
    stage = replace(
        cfg,
        train_csv=_stage_manifest(stage_dir, "train_val.csv", rows),
        out_dir=stage_dir,
        weights=weights,
        limit=None,  # the rows above are already limited
        model_name=f"{cfg.model_name}-refit",
        selection_metric="last",  # val is trained on: it cannot choose
        patience=0,
        stop_after=epochs,  # the schedule still spans cfg.epochs
        test_csv=None,  # the fit reports the refit on test
        tta=False,
        decision="plain",  # the fit's rule, fitted on val by the selected run, is the one exported
        export=True,  # the fit reads the stage's model.pt
        # a stage is a single fit, and its params (model.json, checkpoints) say so
        refit=False,
        pretrain_epochs=0,
        pretrain_extra=None,
        pretrain_data_root=None,
    )
    LOG.info(
        "refit on train + val (%d images) for %d of %d epochs; its val figures are of trained-on images",
        len(rows),
        epochs,
        cfg.epochs,
    )
    return _fit_stage(stage)


def _refit(cfg: TrainConfig, weights: str, fitted: Fitted) -> dict[str, Any]:
    """Run :func:`refit_train_val` to the fit's chosen epoch; its record for metrics.json.

    With ``--test``, the record keeps the val-selected model's test figures (count rule included) to
    compare the refit against; they must be taken before the refit's weights replace it.
    """
    selected: dict[str, Any] | None = None
    if cfg.test_csv is not None and distributed.is_main():
        test, counts = test_prediction(cfg, fitted.trainer, fitted.trainer.device)
        c0, num_classes = cfg.classes[0], len(cfg.classes)
        offsets = fitted.decision.get("offsets")
        index = decode_outputs(
            test["raw"], cfg.head, num_classes, None if offsets is None else torch.tensor(offsets)
        )[1].numpy()
        m = count_metrics(counts, index + c0, cfg.classes)
        selected = {k: m[k] for k in ("accuracy", "rmse", "mae", "n")}
    stage = refit_train_val(cfg, weights, fitted.selection.best_epoch)
    record: dict[str, Any] = {
        "dir": str(stage.model_dir),
        "images": stage.metrics["n_train"],
        "epochs": stage.epochs_run,
        # a resumed, finished stage reports its first run's time, not the reload's
        "seconds": stage.metrics.get("train_seconds", stage.seconds),
    }
    if selected is not None:
        record["test_selected"] = selected
    return record
