"""Train the ResNet18 item counter and export it in the serving contract.

``python -m components.train --train train.csv --val val.csv --out MODEL_DIR [--weights none]
[--head ordinal] [--image-size 224] [--epochs E] [--batch-size B] [--lr LR] [--device auto] [--resume]``

Images are decoded once into a uint8 cache (:mod:`components.data`), augmented and normalized on the
training device, and trained with bf16 autocast + channels_last on CUDA. The model is selected on the
validation set only (the test set is never looked at here unless ``--test`` is given, and then only
reported). Each epoch ends with an atomic checkpoint, so ``--resume`` continues an interrupted run and a
finished one is not retrained; either is refused if the data or a setting that shapes training changed.
The output directory holds ``model.onnx``, ``model.pt``, ``model.json``, ``metrics.json``,
``confusion_matrix.png``, ``training_curves.png`` and ``MODEL_CARD.md``.

``torchrun --nproc_per_node G [--nnodes N ...] -m components.train ...`` trains one model over N x G
processes (:mod:`components.training.distributed`): ``--batch-size`` is the global batch, split across
them; rank 0 alone writes and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.common import format_table, run_cli
from components.evaluate import range_text
from components.modelspec import STATE_DICT_FILE
from components.settings import add_arguments, apply_config_file, values_from_args
from components.training import distributed
from components.training.config import TrainConfig
from components.training.stages import pretrain_backbone, train


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, one per :class:`TrainConfig` setting (its help, choices, default and group),
    plus ``--config``, ``--pretrain-only`` and ``--log-level``."""
    p = argparse.ArgumentParser(
        prog="python -m components.train",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="RECIPE.yaml",
        help="settings from a YAML file (setting: value, named as the flags or the fields); flags given "
        "on the command line win",
    )
    add_arguments(p, TrainConfig)
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run only the pretraining stage (MODEL_DIR/pretrain) for other fits or a tune to start "
        "from with --weights MODEL_DIR/pretrain/model.pt",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """argparse namespace -> validated TrainConfig."""
    cfg = TrainConfig(**values_from_args(TrainConfig, args))
    cfg.validate()
    return cfg


def _run(args: argparse.Namespace) -> int:
    try:
        return _work(config_from_args(args), args.pretrain_only)
    finally:
        distributed.cleanup()  # torchrun: leave the process group


def _work(cfg: TrainConfig, pretrain_only: bool) -> int:
    if pretrain_only:
        stage = pretrain_backbone(cfg)
        if not distributed.is_main():
            return 0
        print(f"backbone written to {stage.model_dir / STATE_DICT_FILE}")
        if stage.metrics.get("knn_val_accuracy") is not None:
            start, end = stage.metrics["knn_val_accuracy_start"], stage.metrics["knn_val_accuracy"]
            print(f"k-NN val accuracy on its features: {start:.4f} at the start, {end:.4f} at the end")
        return 0
    result = train(cfg)
    if not distributed.is_main():
        return 0  # rank 0 reports
    rows = [
        [f"{split}_{k}", m[k], range_text(m["intervals"][k]) if "intervals" in m else ""]
        for split in ("val", "test")
        if (m := result.metrics.get(split))
        for k in ("accuracy", "rmse", "mae")
    ]
    selected = result.metrics.get("refit", {}).get("test_selected")
    if selected:  # --refit: the exported model's test figures above, the val-selected run's here
        rows += [[f"test_{k} (val-selected run)", selected[k], ""] for k in ("accuracy", "rmse", "mae")]
    rows += [
        ["best_epoch", result.best_epoch, ""],
        ["epochs_run", result.epochs_run, ""],
        ["train_images_per_s", result.metrics.get("train_images_per_s", 0.0), ""],
    ]
    print(format_table(rows, ["metric", "value", "95% interval"]))
    print(f"model written to {result.model_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exits 2 with ``error: ...`` on configuration errors."""
    return run_cli(build_parser(), _run, argv, prepare=lambda p, a: apply_config_file(p, a, TrainConfig))
