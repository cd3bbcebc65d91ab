"""Calibrated answers, fitted at training time.

* The temperature ``T``: one number dividing the head's logits before its probabilities, fitted by
  negative log-likelihood on the validation selection part's raw outputs (flip-averaged with ``--tta``,
  as the exported graph computes them). Classification: ``softmax(raw / T)``; ordinal: the class
  distribution :func:`~components.model.decode_outputs` builds from ``sigmoid(raw / T)``; regression: no
  distribution, ``T = 1``. The count never depends on ``T``.
* The count-set and review thresholds (:mod:`components.answers`): fitted on the calibration part
  (``--calib-frac``), which chose nothing else, from the exported model's calibrated outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.answers import (
    MIN_ACCEPTED,
    REVIEW_EVERYTHING,
    AnswerSpec,
    every_count_threshold,
    fit_answer_spec,
)
from components.data import build_cache, open_images
from components.evaluate import answer_metrics, calibration_metrics
from components.model import decode_outputs
from components.training.config import TrainConfig
from components.training.loop import Trainer

LOG = logging.getLogger(__name__)
#: where the temperature is searched (log scale)
TEMPERATURE_BOUNDS = (0.05, 20.0)


def nll_at(raw: torch.Tensor, labels: torch.Tensor, head: str, num_classes: int, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` (class indices) under the head's distribution at
    ``temperature`` (probabilities floored at 1e-12)."""
    probs = decode_outputs(raw, head, num_classes, temperature=temperature)[0]
    p = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return float(-torch.log(p).mean())


def fit_temperature(
    raw: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    head: str,
    num_classes: int,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    grid: int = 41,
    iterations: int = 40,
) -> float:
    """The temperature minimising the NLL of ``labels`` (class indices) given raw head outputs.

    A grid over ``log T`` in ``bounds`` finds the best bracket (robust when the NLL is not unimodal),
    golden-section search refines it. Regression has no distribution: 1. No rows: 1.
    """
    if head == "regression" or len(labels) == 0:
        return 1.0
    raw = raw.detach().double().cpu()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if raw.shape[0] != len(y):
        raise ValueError(f"need one label per output row, got {raw.shape[0]} rows and {len(y)} labels")

    def loss(log_t: float) -> float:
        return nll_at(raw, y, head, num_classes, math.exp(log_t))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    xs = np.linspace(lo, hi, grid)
    values = [loss(float(x)) for x in xs]
    i = int(np.argmin(values))
    a, b = float(xs[max(i - 1, 0)]), float(xs[min(i + 1, grid - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    best_x, best_f = (c, fc) if fc <= fd else (d, fd)
    if values[i] < best_f:  # the grid point itself (a bound) was better
        best_x = float(xs[i])
    return float(math.exp(best_x))


def graph_outputs(
    raw: torch.Tensor,
    head: str,
    classes: Sequence[int],
    offsets: Sequence[float] | None,
    temperature: float | None,
) -> dict[str, np.ndarray]:
    """What the exported graph answers for these raw outputs: ``probabilities``, ``count`` and
    ``expected`` in count units (the count rule's offsets and the temperature applied)."""
    off = None if offsets is None else torch.tensor([float(o) for o in offsets])
    t = None if temperature is None or head == "regression" else float(temperature)
    probs, index, expected = decode_outputs(raw.float(), head, len(classes), off, t)
    c0 = int(classes[0])
    return {
        "probabilities": probs.numpy(),
        "count": index.numpy() + c0,
        "expected": expected.numpy() + c0,
    }


def calibration_record(
    raw: torch.Tensor,
    true_counts: np.ndarray,
    cfg: TrainConfig,
    offsets: Sequence[float] | None,
    temperature: float,
) -> dict[str, Any]:
    """ECE and NLL of the returned count's probability before (``T = 1``) and after calibration, with
    the reliability bins of both (for ``calibration.png``); None figures for a regression head."""
    distribution = cfg.head != "regression"
    before, after = (
        calibration_metrics(
            graph_outputs(raw, cfg.head, cfg.classes, offsets, t), true_counts, cfg.classes, distribution
        )
        for t in (None, temperature)
    )
    return {
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "nll_before": before["nll"],
        "nll_after": after["nll"],
        "n": len(true_counts),
        "reliability_before": before["reliability"],
        "reliability_after": after["reliability"],
    }


def fit_answers(
    cfg: TrainConfig,
    trainer: Trainer,
    rows: list[Any],
    paths: list[Path],
    temperature: float,
    offsets: Sequence[float] | None,
) -> tuple[AnswerSpec, dict[str, Any] | None]:
    """``model.json``'s answers: the count-set and review thresholds fitted on the calibration part
    (``rows``) from the trainer's current model (the one exported) through the exported graph's decoding,
    and that part's figures under them. No rows (``--calib-frac 0``): the temperature alone, no figures."""
    distribution = cfg.head != "regression"
    if not rows:
        return AnswerSpec(temperature=temperature, distribution=distribution), None
    cache = build_cache(
        rows, paths, cfg.image_size, cfg.cache_dir, workers=cfg.decode_workers, progress=cfg.progress
    )
    pred = trainer.predict(open_images(cache, trainer.device, cfg.data_on_device), tta=cfg.tta)
    out = graph_outputs(pred["raw"], cfg.head, cfg.classes, offsets, temperature)
    spec = fit_answer_spec(
        out["probabilities"],
        out["count"],
        out["expected"],
        cache.counts,
        cfg.classes,
        temperature=temperature,
        distribution=distribution,
        coverage=cfg.coverage,
        review_accuracy=cfg.review_accuracy,
    )
    figures = answer_metrics(out, cache.counts, cfg.classes, spec)
    if spec.set_threshold == every_count_threshold(cfg.classes):
        LOG.warning(
            "%d calibration images are too few for coverage %g: every count set holds every count",
            len(rows),
            cfg.coverage,
        )
    if spec.review_threshold == REVIEW_EVERYTHING:
        LOG.warning(
            "no certainty threshold keeps at least %d of the %d calibration answers at accuracy %g: "
            "every answer needs review",
            min(MIN_ACCEPTED, len(rows)),
            len(rows),
            cfg.review_accuracy,
        )
    LOG.info(
        "answers on %d calibration images: T %.3f, count_set coverage %.3f (mean size %.2f), "
        "%.0f%% accepted at accuracy %s",
        len(rows),
        temperature,
        figures["set_coverage"],
        figures["mean_set_size"],
        100 * figures["accepted_share"],
        "-" if figures["accepted_accuracy"] is None else f"{figures['accepted_accuracy']:.3f}",
    )
    return spec, figures
