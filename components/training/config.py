"""Every training setting (:class:`TrainConfig`), how each is checked, and the run's file names.

Nothing here needs torch: the pipeline builds configs, and the CLI fails on a bad flag, before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import ConfigError
from components.modelspec import (
    DEFAULT_CLASSES,
    HEADS,
    STATE_DICT_FILE,
    load_model_spec,
    validate_classes,
)

CHECKPOINT_FILE = "checkpoint.pt"
#: Written last, after the export: the run's settings, data hashes and results. Its presence means the
#: run is complete and need not be retrained, even after ``checkpoint.pt`` was deleted (tune, pipeline).
DONE_FILE = "checkpoint.json"
#: Settings that may differ on ``--resume``: where things are read from or written to, and how fast or
#: verbosely the run goes. The data behind the manifest paths is checked by content hash instead.
#: Everything else in :meth:`TrainConfig.to_params` must match the run being resumed.
RESUME_MAY_CHANGE = frozenset(
    {
        "train_csv",
        "val_csv",
        "test_csv",
        "out_dir",
        "data_root",
        "cache_dir",
        "device",
        "num_threads",
        "decode_workers",
        "compile",
        "eval_batch_size",
        "checkpoint_every",
        "progress",
        "resume",
        "pretrain_extra",
        "pretrain_data_root",
        "export",
        "model_name",
        "version",
    }
)
METRICS_FILE = "metrics.json"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
SELECTION_METRICS = ("val_accuracy", "val_rmse", "val_loss", "last")
#: what the pretraining stage learns: counts 0..cap (supervised) or SimCLR views (no labels)
PRETRAIN_OBJECTIVES = ("counts", "contrastive")
#: the count rule: the head's own (``plain``) or offsets fitted on validation (``fitted``)
DECISIONS = ("plain", "fitted")
OnEpoch = Callable[[int, dict[str, float]], None]
PRETRAIN_DIR = "pretrain"
#: next to a pretraining stage's model.pt: what the stage was, so a fit started from it can say so
BACKBONE_FILE = "backbone.json"
REFIT_DIR = "refit"


@dataclass
class TrainConfig:
    """Every training setting; saved in the checkpoint and in ``model.json`` (params)."""

    train_csv: Path
    val_csv: Path
    out_dir: Path
    data_root: Path | None = None
    test_csv: Path | None = None
    classes: tuple[int, ...] = DEFAULT_CLASSES
    head: str = "ordinal"
    weights: str = "none"
    image_size: int = 224
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    aug_strength: float = 1.0
    warmup_frac: float = 0.1
    ema: float = 0.0
    patience: int = 0
    selection_metric: str = "val_accuracy"
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    num_threads: int | None = None
    max_steps_per_epoch: int | None = None
    limit: int | None = None
    cache_dir: Path | None = None
    decode_workers: int | None = None
    compile: bool = False
    channels_last: bool = True
    amp: bool = True
    eval_batch_size: int = 256
    checkpoint_every: int = 1
    model_name: str = "inventory-counter"
    version: str = "0"
    progress: bool = True
    export: bool = True
    tta: bool = False
    decision: str = "plain"
    teacher: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    pretrain_extra: Path | None = None
    pretrain_data_root: Path | None = None
    pretrain_epochs: int = 0
    pretrain_count_cap: int = 10
    pretrain_objective: str = "counts"
    pretrain_temperature: float = 0.2
    refit: bool = False
    stop_after: int = 0

    def validate(self) -> None:
        """Fail early, with a message that says how to fix the setting."""
        self.classes = validate_classes(self.classes)
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {list(HEADS)}, got {self.head!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(f"--selection-metric must be one of {list(SELECTION_METRICS)}")
        if self.decision not in DECISIONS:
            raise ConfigError(f"--decision must be one of {list(DECISIONS)}, got {self.decision!r}")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.label_smoothing < 1,
                f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (0 <= self.aug_strength <= 3, f"--aug-strength must be in [0, 3], got {self.aug_strength}"),
            (0 <= self.warmup_frac < 1, f"--warmup-frac must be in [0, 1), got {self.warmup_frac}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.patience >= 0, f"--patience must be >= 0 (0 = off), got {self.patience}"),
            (16 <= self.image_size <= 1024, f"--image-size must be in [16, 1024], got {self.image_size}"),
            (self.num_threads is None or self.num_threads >= 1, "--num-threads must be >= 1"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch >= 1"),
            (self.limit is None or self.limit >= 1, "--limit must be >= 1"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (
                0 <= self.stop_after <= self.epochs,
                f"stop_after must be in [0, --epochs {self.epochs}] (0 = off), got {self.stop_after}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.weights not in ("none", "imagenet") and not Path(self.weights).is_file():
            raise ConfigError(
                f"--weights must be imagenet, none or an existing state-dict path; got {self.weights!r}"
            )
        self.teacher = tuple(str(t) for t in self.teacher)
        if self.teacher:
            if not 0 < self.distill_weight <= 1:
                raise ConfigError(f"--distill-weight must be in (0, 1], got {self.distill_weight}")
            if self.distill_temperature <= 0:
                raise ConfigError(f"--distill-temperature must be > 0, got {self.distill_temperature}")
            for t in self.teacher:
                check_teacher(Path(t), self.head, self.classes)
        self._validate_pretrain()

    def _validate_pretrain(self) -> None:
        if self.pretrain_epochs < 0:
            raise ConfigError(f"--pretrain-epochs must be >= 0 (0 = off), got {self.pretrain_epochs}")
        if self.pretrain_objective not in PRETRAIN_OBJECTIVES:
            raise ConfigError(
                f"--pretrain-objective must be one of {list(PRETRAIN_OBJECTIVES)}, "
                f"got {self.pretrain_objective!r}"
            )
        if self.pretrain_temperature <= 0:
            raise ConfigError(f"--pretrain-temperature must be > 0, got {self.pretrain_temperature}")
        if self.pretrain_epochs == 0:
            if self.pretrain_extra is not None:
                raise ConfigError("--pretrain-extra is used only with --pretrain-epochs N (N >= 1)")
            return
        if self.pretrain_extra is None:
            if self.pretrain_objective == "contrastive":
                return  # the training images alone will do: no labels needed
            raise ConfigError(
                "--pretrain-epochs needs --pretrain-extra: a manifest of images with other counts "
                "(e.g. components.ingest --per-class N --classes 0,6,7,8,9,10)"
            )
        if not Path(self.pretrain_extra).is_file():
            raise ConfigError(f"--pretrain-extra {self.pretrain_extra} does not exist")
        if self.classes[0] < 0 or not self.classes[-1] <= self.pretrain_count_cap <= 100:
            raise ConfigError(
                f"--pretrain-count-cap must be in [{self.classes[-1]}, 100] (at least the largest class) "
                f"and the classes non-negative; got cap {self.pretrain_count_cap}, "
                f"classes {list(self.classes)}"
            )

    def to_params(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
        }


@dataclass
class TrainResult:
    """What a caller (tune, the pipeline) needs from a finished run."""

    model_dir: Path
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def val_accuracy(self) -> float:
        return float(self.metrics["val"]["accuracy"])

    @property
    def val_rmse(self) -> float:
        return float(self.metrics["val"]["rmse"])


def check_teacher(model_dir: Path, head: str, classes: tuple[int, ...]) -> None:
    """A teacher must be a trained model directory with the student's head and classes."""
    if not (model_dir / STATE_DICT_FILE).is_file():
        raise ConfigError(
            f"--teacher {model_dir}: no model.pt there; pass the directory a training run wrote"
        )
    spec = load_model_spec(model_dir)
    if spec.head != head or tuple(spec.classes) != tuple(classes):
        raise ConfigError(
            f"--teacher {model_dir} has head {spec.head} and classes {list(spec.classes)}; the student has "
            f"head {head} and classes {list(classes)}: train the student with the teacher's head and classes"
        )
