"""One fit: open a run (or find it already finished), train it with validation choosing the epoch,
then record and export it.

Every supervised stage of a run is one fit (the pretraining stage on counts, the fit itself, the
refit); :mod:`components.training.stages` says which, with which settings, in which order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.answers import AnswerSpec
from components.data import build_cache, open_images
from components.evaluate import answer_metrics, calibration_metrics, count_metrics
from components.training import distributed
from components.training.calibration import (
    calibration_record,
    fit_answers,
    fit_temperature,
    graph_outputs,
)
from components.training.checkpoint import (
    finished_run,
    mark_finished,
    resume_checkpoint,
    run_fingerprint,
    start_run,
)
from components.training.config import CHECKPOINT_FILE, OnEpoch, TrainConfig, TrainResult
from components.training.decision import fit_decision, test_prediction
from components.training.export import export
from components.training.loop import Selection, Trainer, batch_plan, fit_epochs
from components.training.splits import load_split, validation_parts


@dataclass
class Run:
    """An opened run: settings, directory, device, rows, fingerprint, and where it goes on from.

    ``val_rows`` are the validation selection part; ``calib_rows`` the calibration part
    (:func:`~components.training.splits.validation_parts`)."""

    cfg: TrainConfig
    out_dir: Path
    device: torch.device
    t_start: float
    train_rows: list[Any]
    train_paths: list[Path]
    val_rows: list[Any]
    val_paths: list[Path]
    fingerprint: dict[str, Any]
    #: ``--resume``: the checkpoint to continue from
    ckpt: dict[str, Any] | None = None
    #: ``--resume`` of a finished run of the same settings and data: its stored result
    finished: TrainResult | None = None
    calib_rows: list[Any] = field(default_factory=list)
    calib_paths: list[Path] = field(default_factory=list)


def open_run(cfg: TrainConfig) -> Run:
    """Validate, read the splits, and find what ``--resume`` continues (refused, by name, if the settings
    or data changed). Nothing is trained or decoded yet. Distributed: rank 0 finds it, and every rank
    gets rank 0's finished result or checkpoint; the other ranks show no progress bars."""
    t_start = time.perf_counter()
    out_dir, device = start_run(cfg)
    if not distributed.is_main():
        cfg = replace(cfg, progress=False)
    train_rows, train_paths = load_split(Path(cfg.train_csv), cfg, "train")
    val_rows, val_paths, calib_rows, calib_paths = validation_parts(cfg)
    fingerprint = run_fingerprint(cfg, train_rows, val_rows, calib_rows)
    run = Run(cfg, out_dir, device, t_start, train_rows, train_paths, val_rows, val_paths, fingerprint)
    run.calib_rows, run.calib_paths = calib_rows, calib_paths

    def resume() -> tuple[TrainResult | None, dict[str, Any] | None]:
        if cfg.resume:
            finished = finished_run(cfg, out_dir, fingerprint, t_start)
            if finished is not None:
                return finished, None
        return None, resume_checkpoint(cfg, out_dir, fingerprint)

    run.finished, run.ckpt = distributed.on_main(resume)
    return run


@dataclass
class Fitted:
    """A trained fit before export: its model holds the val-chosen weights."""

    trainer: Trainer
    model: nn.Module
    selection: Selection
    n_train: int
    n_val: int
    val_metrics: dict[str, Any]
    decision: dict[str, Any]
    #: fitted on the validation selection part (1: regression)
    temperature: float = 1.0
    #: its figures there: ECE and NLL before and after, reliability bins
    calibration: dict[str, Any] = field(default_factory=dict)
    #: the selection part's outputs through the exported graph's decoding, and its true counts
    val_outputs: dict[str, Any] = field(default_factory=dict)
    val_counts: Any = None


def fit(run: Run, weights: str, on_epoch: OnEpoch | None = None) -> Fitted:
    """Train ``run`` from ``weights`` (``none``, ``imagenet`` or a state dict) and select on validation
    (its selection part); the validation figures are the exported graph's (``--tta``, the count rule,
    the temperature fitted there). Distributed: every rank trains; rank 0 alone takes the figures after
    the epochs (the others return the selection only)."""
    cfg = run.cfg
    with distributed.main_first():  # each node's first rank decodes the images, the others reuse them
        train_cache = build_cache(
            run.train_rows,
            run.train_paths,
            cfg.image_size,
            cfg.cache_dir,
            workers=cfg.decode_workers,
            progress=cfg.progress,
        )
        val_cache = build_cache(
            run.val_rows,
            run.val_paths,
            cfg.image_size,
            cfg.cache_dir,
            workers=cfg.decode_workers,
            progress=cfg.progress,
        )
    # CPU under torchrun: each process of the node holds its copy in the same RAM
    copies = distributed.world().local_world_size if run.device.type == "cpu" else 1
    train_images = open_images(train_cache, run.device, cfg.data_on_device, copies=copies)
    val_images = open_images(val_cache, run.device, cfg.data_on_device, copies=copies)
    _, steps = batch_plan(len(train_images), cfg)
    trainer = Trainer(replace(cfg, weights=weights), run.device, steps * cfg.epochs)
    selection = fit_epochs(
        trainer,
        train_images,
        val_images,
        val_cache.counts,
        ckpt=run.ckpt,
        fingerprint=run.fingerprint,
        ckpt_path=run.out_dir / CHECKPOINT_FILE,
        on_epoch=on_epoch,
    )
    # Best weights -> final validation figures.
    model = trainer.eval_model()
    model.load_state_dict(selection.best_state)
    if not distributed.is_main():
        return Fitted(trainer, model, selection, len(train_images), len(val_images), {}, {})
    pred = trainer.predict(val_images, tta=cfg.tta)  # the exported graph's figures
    decision = fit_decision(cfg, trainer, pred, val_cache.counts, run.device)
    c0 = cfg.classes[0]
    temperature = fit_temperature(pred["raw"], np.asarray(val_cache.counts) - c0, cfg.head, len(cfg.classes))
    offsets = decision.get("offsets")
    outputs = graph_outputs(pred["raw"], cfg.head, cfg.classes, offsets, temperature)
    val_metrics = count_metrics(
        val_cache.counts, outputs["count"], cfg.classes, outputs["expected"], intervals=True
    )
    val_metrics["loss"] = pred["loss"]
    calibration = calibration_record(pred["raw"], val_cache.counts, cfg, offsets, temperature)
    return Fitted(
        trainer,
        model,
        selection,
        len(train_images),
        len(val_images),
        val_metrics,
        decision,
        temperature,
        calibration,
        outputs,
        np.asarray(val_cache.counts),
    )


def finish(
    run: Run,
    fitted: Fitted,
    *,
    pretrained: dict[str, Any] | None = None,
    refit: dict[str, Any] | None = None,
    exported_rows: list[Any] | None = None,
) -> TrainResult:
    """Record the fit (metrics, with its stages' records), export ``fitted.model`` (trained on
    ``exported_rows``, default the training rows) and mark the run finished: on rank 0 when distributed,
    every rank getting its result."""
    return distributed.on_main(lambda: _finish(run, fitted, pretrained, refit, exported_rows))


def _finish(
    run: Run,
    fitted: Fitted,
    pretrained: dict[str, Any] | None,
    refit: dict[str, Any] | None,
    exported_rows: list[Any] | None,
) -> TrainResult:
    cfg, device = run.cfg, run.device
    sel = fitted.selection
    history = sel.history
    steady = [h["train_images_per_s"] for h in history[1:]] or [h["train_images_per_s"] for h in history]
    metrics: dict[str, Any] = {
        "val": fitted.val_metrics,
        "best_epoch": sel.best_epoch,
        "epochs_run": len(history),
        "stopped_early": sel.stopped_early,
        "selection_metric": cfg.selection_metric,
        "n_train": fitted.n_train,
        "n_val": fitted.n_val,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "train_images_per_s": float(np.median(steady)),
        "train_seconds": time.perf_counter() - run.t_start,
        "decision": fitted.decision,
        "world_size": distributed.world().world_size,  # processes that trained it (torchrun)
    }
    if pretrained is not None:
        metrics["pretrain"] = pretrained
    if refit is not None:
        metrics["refit"] = refit
    answers = _answers(run, fitted, metrics, refitted=refit is not None)
    if cfg.export:
        rows = run.train_rows if exported_rows is None else exported_rows
        export(
            cfg,
            fitted.model,
            rows,
            metrics,
            history,
            run.out_dir,
            fitted.decision.get("offsets"),
            answers=answers,
        )
    mark_finished(
        run.out_dir,
        run.fingerprint,
        {
            "exported": cfg.export,
            "epochs_run": len(history),
            "best_epoch": sel.best_epoch,
            "stopped_early": sel.stopped_early,
            "metrics": metrics,
            "history": history,
        },
    )
    return TrainResult(
        run.out_dir,
        metrics,
        sel.best_epoch,
        len(history),
        sel.stopped_early,
        history,
        time.perf_counter() - run.t_start,
    )


def _answers(run: Run, fitted: Fitted, metrics: dict[str, Any], *, refitted: bool) -> AnswerSpec:
    """The exported model's answers (temperature from the selection part, thresholds fitted on the
    calibration part with the model being exported) and their records in ``metrics``: ``calibration``
    (the temperature, its val figures; with ``--test`` the test figures before it, from the torch model)
    and ``answers`` (the thresholds and their figures on the calibration part, and on the selection part
    unless the exported model was refit on it)."""
    cfg = run.cfg
    offsets = fitted.decision.get("offsets")
    spec, calib_figures = fit_answers(
        cfg, fitted.trainer, run.calib_rows, run.calib_paths, fitted.temperature, offsets
    )
    val = dict(fitted.calibration)
    reliability = {"val_before": val.pop("reliability_before"), "val_after": val.pop("reliability_after")}
    metrics["n_calibration"] = len(run.calib_rows)
    metrics["calibration"] = {
        "temperature": fitted.temperature,
        "fitted_on": "validation selection part" + (" (the val-selected run's outputs)" if refitted else ""),
        "val": val,
        "reliability": reliability,
    }
    metrics["answers"] = {
        "coverage": spec.coverage,
        "set_threshold": spec.set_threshold,
        "review_accuracy": spec.review_accuracy,
        "review_threshold": spec.review_threshold,
        "calibration": calib_figures,
    }
    if not refitted:
        metrics["answers"]["val"] = answer_metrics(fitted.val_outputs, fitted.val_counts, cfg.classes, spec)
    if cfg.export and cfg.test_csv is not None and spec.distribution:
        # the figures before calibration need the logits, which the exported graph no longer shows
        test, counts = test_prediction(cfg, fitted.trainer, run.device)
        before = calibration_metrics(
            graph_outputs(test["raw"], cfg.head, cfg.classes, offsets, None), counts, cfg.classes, True
        )
        metrics["calibration"]["test"] = {
            "ece_before": before["ece"],
            "nll_before": before["nll"],
            "n": len(counts),
        }
    return spec
