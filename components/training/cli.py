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
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.common import format_table, parse_int_list, run_cli
from components.evaluate import range_text
from components.modelspec import HEADS, STATE_DICT_FILE
from components.training.config import DECISIONS, PRETRAIN_OBJECTIVES, SELECTION_METRICS, TrainConfig
from components.training.stages import pretrain_backbone, train


def build_parser() -> argparse.ArgumentParser:
    """The command's flags; their defaults are :class:`TrainConfig`'s."""
    d = TrainConfig(Path("."), Path("."), Path("."))
    p = argparse.ArgumentParser(prog="python -m components.train", description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, type=Path, help="training manifest CSV")
    p.add_argument("--val", required=True, type=Path, help="validation manifest CSV (model selection)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument(
        "--test", type=Path, default=None, help="optional test manifest: reported, never selected on"
    )
    p.add_argument("--data-root", type=Path, default=None, help="directory the manifest paths are under")
    p.add_argument(
        "--classes", default=",".join(map(str, d.classes)), help="consecutive counts, e.g. 1,2,3,4,5"
    )
    p.add_argument("--head", default=d.head, choices=HEADS)
    p.add_argument("--weights", default=d.weights, help="imagenet | none | PATH to a state dict")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup then cosine)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--aug-strength", type=float, default=d.aug_strength, help="0 = no augmentation")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    p.add_argument("--ema", type=float, default=d.ema, help="weight EMA decay per step (0 = off)")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs (0 = off)")
    p.add_argument("--selection-metric", default=d.selection_metric, choices=SELECTION_METRICS)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue MODEL_DIR's run (same settings and data)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use at most N images per manifest (smoke runs)")
    p.add_argument("--cache-dir", type=Path, default=None, help="uint8 image cache (default ~/.cache/...)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    p.add_argument("--tta", action="store_true", help="average the 4 flips (validation and exported graph)")
    p.add_argument(
        "--decision",
        choices=DECISIONS,
        default=d.decision,
        help="count rule: the head's own, or offsets fitted on val for accuracy (baked into the graph)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after val chose the epoch (and rule), train again on train + val up to that epoch and export "
        "that model (under MODEL_DIR/refit; val figures stay the selected run's, test reports both)",
    )
    p.add_argument(
        "--teacher",
        nargs="+",
        default=[],
        metavar="MODEL_DIR",
        help="distil from these trained models (their mean output) on the same augmented images",
    )
    p.add_argument(
        "--distill-weight", type=float, default=d.distill_weight, help="share of the loss from the teacher"
    )
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument(
        "--pretrain-extra",
        type=Path,
        default=None,
        metavar="CSV",
        help="manifest of images with other counts (0, 6+) for a pretraining stage on every count",
    )
    p.add_argument(
        "--pretrain-data-root",
        type=Path,
        default=None,
        help="directory the --pretrain-extra paths are under (default: as for any manifest)",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=d.pretrain_epochs,
        help="first train on --train plus --pretrain-extra for N epochs, then fit from that backbone",
    )
    p.add_argument(
        "--pretrain-count-cap",
        type=int,
        default=d.pretrain_count_cap,
        help="counts above this are this in pretraining",
    )
    p.add_argument(
        "--pretrain-objective",
        choices=PRETRAIN_OBJECTIVES,
        default=d.pretrain_objective,
        help="what the stage learns: counts 0..cap (needs --pretrain-extra) or contrastive (SimCLR views, "
        "no labels; --pretrain-extra optional)",
    )
    p.add_argument(
        "--pretrain-temperature",
        type=float,
        default=d.pretrain_temperature,
        help="NT-Xent temperature of the contrastive stage",
    )
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run only the pretraining stage (MODEL_DIR/pretrain) for other fits or a tune to start "
        "from with --weights MODEL_DIR/pretrain/model.pt",
    )
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints"
    )
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """argparse namespace -> validated TrainConfig."""
    cfg = TrainConfig(
        train_csv=args.train,
        val_csv=args.val,
        out_dir=args.out,
        test_csv=args.test,
        data_root=args.data_root,
        classes=tuple(parse_int_list(args.classes, name="--classes")),
        head=args.head,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        aug_strength=args.aug_strength,
        warmup_frac=args.warmup_frac,
        ema=args.ema,
        patience=args.patience,
        selection_metric=args.selection_metric,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        num_threads=args.num_threads,
        max_steps_per_epoch=args.max_steps_per_epoch,
        limit=args.limit,
        cache_dir=args.cache_dir,
        compile=args.compile,
        amp=args.amp,
        eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every,
        tta=args.tta,
        decision=args.decision,
        refit=args.refit,
        teacher=tuple(args.teacher),
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        pretrain_extra=args.pretrain_extra,
        pretrain_data_root=args.pretrain_data_root,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_count_cap=args.pretrain_count_cap,
        pretrain_objective=args.pretrain_objective,
        pretrain_temperature=args.pretrain_temperature,
        model_name=args.model_name,
        version=args.version,
        progress=args.progress,
    )
    cfg.validate()
    return cfg


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.pretrain_only:
        stage = pretrain_backbone(cfg)
        print(f"backbone written to {stage.model_dir / STATE_DICT_FILE}")
        if stage.metrics.get("knn_val_accuracy") is not None:
            start, end = stage.metrics["knn_val_accuracy_start"], stage.metrics["knn_val_accuracy"]
            print(f"k-NN val accuracy on its features: {start:.4f} at the start, {end:.4f} at the end")
        return 0
    result = train(cfg)
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
    return run_cli(build_parser(), _run, argv)
