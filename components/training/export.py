"""Export a fitted model in the serving contract, with its reports.

``model.onnx`` (flip averaging, fitted count offsets and the temperature baked in), ``model.pt``,
``model.json`` (with the answers' thresholds), then the test figures through the ONNX model (``--test``),
the plots (``calibration.png``, ``risk_coverage.png`` among them), ``metrics.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.answers import AnswerSpec
from components.common import atomic_write_json
from components.data import data_hash
from components.model import export_onnx
from components.modelspec import ONNX_FILE, STATE_DICT_FILE, ModelSpec
from components.preprocess import PreprocessSpec
from components.training.checkpoint import atomic_torch_save
from components.training.config import CONFUSION_PNG, CURVES_PNG, METRICS_FILE, TrainConfig
from components.training.distributed import plain_batchnorm
from components.training.loop import AverageModel


def export(
    cfg: TrainConfig,
    model: nn.Module,
    train_rows: list[Any],
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    out_dir: Path,
    offsets: list[float] | None = None,
    *,
    answers: AnswerSpec | None = None,
) -> None:
    """ONNX + state dict + model.json, then test figures (through the ONNX model), plots and card.

    ``answers`` (default: uncalibrated) go into model.json, and their temperature into the graph."""
    from components.model_card import write_model_card
    from components.plots import save_confusion_matrix, save_training_curves
    from components.test_figures import merge_test_figures, save_answer_plots

    answers = answers or AnswerSpec(distribution=cfg.head != "regression")
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    model = plain_batchnorm(model)  # a distributed run's global BatchNorm: plain layers, same weights
    graph = AverageModel([model], flips=True) if cfg.tta else model
    temperature = answers.temperature if answers.distribution else None
    export_onnx(
        graph,
        cfg.head,
        cfg.classes,
        cfg.image_size,
        out_dir / ONNX_FILE,
        offsets=offsets,
        temperature=temperature,
    )
    atomic_torch_save(model.state_dict(), out_dir / STATE_DICT_FILE)
    spec = ModelSpec(
        classes=cfg.classes,
        head=cfg.head,
        preprocess=PreprocessSpec(image_size=cfg.image_size),
        name=cfg.model_name,
        version=cfg.version,
        training_data_sha256=data_hash(train_rows),
        metrics={"val": {k: metrics["val"][k] for k in ("accuracy", "rmse", "mae", "n")}},
        params={**cfg.to_params(), "world_size": metrics.get("world_size", 1)},
        decision_offsets=None if offsets is None else tuple(offsets),
        answers=answers,
    )
    spec.save(out_dir)
    if cfg.test_csv is not None:
        from components.evaluate import evaluate

        test = evaluate(
            out_dir,
            Path(cfg.test_csv),
            out_dir / "test_eval",
            data_root=cfg.data_root,
            progress=cfg.progress,
            num_threads=cfg.num_threads,
        )
        merge_test_figures(metrics, spec, test)
        spec.save(out_dir)
    save_confusion_matrix(
        metrics["val"]["confusion_matrix"],
        list(cfg.classes),
        out_dir / CONFUSION_PNG,
        title=f"validation (epoch {metrics['best_epoch']}): accuracy {metrics['val']['accuracy']:.3f}",
    )
    save_training_curves(history, out_dir / CURVES_PNG)
    save_answer_plots(metrics, answers.temperature, out_dir)
    atomic_write_json(out_dir / METRICS_FILE, {**metrics, "history": history})
    write_model_card(out_dir, spec, metrics)
