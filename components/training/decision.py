"""The count rule: ``--decision fitted`` fits per-threshold offsets on the validation outputs.

The test split, with ``--test``, is only reported here: nothing is chosen on it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data import build_cache, open_images
from components.evaluate import count_metrics, paired_difference
from components.model import decode_outputs, fit_decision_offsets
from components.training.config import TrainConfig
from components.training.loop import Trainer
from components.training.splits import load_split

LOG = logging.getLogger(__name__)


def fit_decision(
    cfg: TrainConfig, trainer: Trainer, pred: dict[str, Any], val_counts: np.ndarray, device: torch.device
) -> dict[str, Any]:
    """``--decision fitted``: fit the count rule's offsets on the validation outputs in ``pred``, and
    re-decide ``pred["index"]`` with them. Returns the record for metrics.json: the rule, the offsets,
    and the plain rule's validation figures (and test figures, with ``--test``) to compare against."""
    if cfg.decision == "plain":
        return {"rule": "plain"}
    keys = ("accuracy", "rmse", "mae")
    c0, num_classes = cfg.classes[0], len(cfg.classes)
    plain = count_metrics(val_counts, pred["index"] + c0, cfg.classes)
    # the rule serves the run's selection metric: RMSE when models are chosen on it, else accuracy
    objective = "rmse" if cfg.selection_metric == "val_rmse" else "accuracy"
    offsets = fit_decision_offsets(
        pred["raw"], torch.as_tensor(val_counts) - c0, cfg.head, num_classes, objective=objective
    )
    pred["index"] = decode_outputs(pred["raw"], cfg.head, num_classes, offsets)[1].numpy()
    record: dict[str, Any] = {
        "rule": "fitted",
        "objective": objective,
        "offsets": [round(float(o), 4) for o in offsets],
        "val_plain": {k: plain[k] for k in keys},
    }
    if cfg.test_csv is not None:
        # Reporting only (nothing is chosen on it): what the plain rule would have scored on test.
        test, counts = test_prediction(cfg, trainer, device)
        test_plain = count_metrics(counts, test["index"] + c0, cfg.classes)
        record["test_plain"] = {k: test_plain[k] for k in keys}
        # both rules on the same test images: is the fitted rule's gain more than the split's draw?
        fitted_index = decode_outputs(test["raw"], cfg.head, num_classes, offsets)[1].numpy()
        record["test_paired"] = paired_difference(counts, test["index"] + c0, fitted_index + c0)
    LOG.info(
        "decision offsets %s: val accuracy %.4f -> %.4f",
        record["offsets"],
        plain["accuracy"],
        float((pred["index"] + c0 == np.asarray(val_counts)).mean()),
    )
    return record


def test_prediction(
    cfg: TrainConfig, trainer: Trainer, device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    """The trainer's current model on ``--test`` (for reports only) and the true counts.

    Every test image, as the exported model's evaluation takes them (``--limit`` trims training data).
    """
    assert cfg.test_csv is not None
    rows, paths = load_split(Path(cfg.test_csv), replace(cfg, limit=None), "test")
    cache = build_cache(
        rows, paths, cfg.image_size, cfg.cache_dir, workers=cfg.decode_workers, progress=cfg.progress
    )
    images = open_images(cache, device, cfg.data_on_device)
    return trainer.predict(images, tta=cfg.tta), np.asarray(cache.counts)
