"""Every training setting (:class:`TrainConfig`), how each is checked, and the run's file names.

Nothing here needs torch: the pipeline builds configs, and the CLI fails on a bad flag, before torch loads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import ConfigError, parse_int_list
from components.data import DATA_ON_DEVICE
from components.modelspec import (
    DEFAULT_CLASSES,
    HEADS,
    STATE_DICT_FILE,
    load_model_spec,
    validate_classes,
)
from components.settings import setting

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
        "data_on_device",
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
OPTIMIZERS = ("sgd", "adamw")
#: the count rule: the head's own (``plain``) or offsets fitted on validation (``fitted``)
DECISIONS = ("plain", "fitted")
OnEpoch = Callable[[int, dict[str, float]], None]
PRETRAIN_DIR = "pretrain"
#: next to a pretraining stage's model.pt: what the stage was, so a fit started from it can say so
BACKBONE_FILE = "backbone.json"
REFIT_DIR = "refit"


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_int_list(text, name="--classes"))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


DATA, MODEL, OPTIM, SELECT, RUNTIME, OUTPUT, PRETRAIN = (
    "data",
    "model",
    "optimization",
    "regularization and selection",
    "runtime",
    "output",
    "pretraining on every count",
)
#: the answers' calibration: the temperature, the count sets and the review flag (components.answers)
CALIBRATION = "calibration"
#: levers kept for the benchmarks that measure them: none has shown a gain beyond the test split's noise
#: (docs/benchmarks.md), so the pipeline and its profiles do not offer them
EXPERIMENTS = "experiments (benchmarks only; measured as noise so far, see docs/benchmarks.md)"


@dataclass
class TrainConfig:
    """Every training setting, declared once (help, choices, flag, group): the CLI, ``--config`` files,
    the pipeline's parameter descriptions and SageMaker's hyperparameters are read from these fields.
    Saved in the checkpoint and in ``model.json`` (params)."""

    train_csv: Path = setting(help="training manifest CSV", group=DATA, flag="--train")
    val_csv: Path = setting(help="validation manifest CSV (model selection)", group=DATA, flag="--val")
    out_dir: Path = setting(help="model directory to write", group=OUTPUT, flag="--out")
    data_root: Path | None = setting(None, help="directory the manifest paths are under", group=DATA)
    test_csv: Path | None = setting(
        None, help="optional test manifest: reported, never selected on", group=DATA, flag="--test"
    )
    classes: tuple[int, ...] = setting(
        DEFAULT_CLASSES,
        help="the counts to learn, comma-separated consecutive integers",
        group=DATA,
        parse=_classes,
        metavar="N,N,...",
        hyperparameter=True,
    )
    head: str = setting(
        "ordinal",
        help="output head (ordinal: cumulative logits; classification: softmax; regression: one number)",
        group=MODEL,
        choices=HEADS,
        hyperparameter=True,
    )
    weights: str = setting(
        "none",
        help="initial weights: imagenet (torchvision's, downloaded once), none (random init) or the path "
        "of a state dict",
        group=MODEL,
        hyperparameter=True,
    )
    image_size: int = setting(
        224,
        help="square input size in pixels (the whole frame is resized, never cropped)",
        group=MODEL,
        hyperparameter=True,
    )
    epochs: int = setting(
        60, help="training epochs (warmup, then a cosine schedule)", group=OPTIM, hyperparameter=True
    )
    batch_size: int = setting(
        128,
        help="training batch size; under torchrun the global batch, split across the processes",
        group=OPTIM,
        hyperparameter=True,
    )
    optimizer: str = setting(
        "sgd", help="SGD (Nesterov) or AdamW", group=OPTIM, choices=OPTIMIZERS, hyperparameter=True
    )
    lr: float = setting(0.2, help="peak learning rate (warmup then cosine)", group=OPTIM, hyperparameter=True)
    momentum: float = setting(0.9, help="SGD momentum", group=OPTIM, hyperparameter=True)
    weight_decay: float = setting(5e-4, help="weight decay", group=OPTIM, hyperparameter=True)
    warmup_frac: float = setting(
        0.1, help="share of the steps spent warming up", group=OPTIM, hyperparameter=True
    )
    label_smoothing: float = setting(
        0.1, help="label smoothing (classification and ordinal targets)", group=SELECT, hyperparameter=True
    )
    aug_strength: float = setting(
        1.0, help="augmentation strength, 0 = no augmentation, up to 3", group=SELECT, hyperparameter=True
    )
    ema: float = setting(
        0.0,
        help="decay of an exponential moving average of the weights, used for validation and export (0 = "
        "off; 0.998 suits long from-scratch schedules)",
        group=SELECT,
        hyperparameter=True,
    )
    patience: int = setting(0, help="early-stopping epochs (0 = off)", group=SELECT, hyperparameter=True)
    selection_metric: str = setting(
        "val_accuracy",
        help="what chooses the epoch to keep (ties broken by val RMSE)",
        group=SELECT,
        choices=SELECTION_METRICS,
        hyperparameter=True,
    )
    device: str = setting("auto", help="training device: auto, cpu, cuda or cuda:N", group=RUNTIME)
    seed: int = setting(
        0, help="seed of initialization, augmentation and batch order", group=RUNTIME, hyperparameter=True
    )
    resume: bool = setting(False, help="continue MODEL_DIR's run (same settings and data)", group=RUNTIME)
    num_threads: int | None = setting(None, help="torch CPU threads (default: torch's)", group=RUNTIME)
    max_steps_per_epoch: int | None = setting(
        None, help="stop each epoch after N steps (smoke runs)", group=RUNTIME, hyperparameter=True
    )
    limit: int | None = setting(
        None, help="use at most N images per manifest (smoke runs)", group=RUNTIME, hyperparameter=True
    )
    cache_dir: Path | None = setting(
        None, help="uint8 image cache (default $INVENTORY_MONITOR_CACHE or ~/.cache/...)", group=RUNTIME
    )
    data_on_device: str = setting(
        "auto",
        help="where training holds each image set: always on the training device (GPU memory; RAM on "
        "CPU), never (streamed from the uint8 cache, a few batches read ahead by a background thread), or "
        "auto: on the device when it takes at most half the memory free there (CUDA's free memory; on CPU "
        "the RAM available), else streamed. The results are the same",
        group=RUNTIME,
        choices=DATA_ON_DEVICE,
    )
    decode_workers: int | None = setting(None, help="processes decoding JPEGs into the cache", group=RUNTIME)
    compile: bool = setting(False, help="torch.compile the model", group=RUNTIME)
    channels_last: bool = setting(True, help="channels_last memory format on CUDA", group=RUNTIME, cli=False)
    amp: bool = setting(True, help="bf16 autocast on CUDA", group=RUNTIME)
    eval_batch_size: int = setting(
        256, help="batch size of validation and test", group=RUNTIME, hyperparameter=True
    )
    checkpoint_every: int = setting(1, help="epochs between checkpoints", group=RUNTIME)
    model_name: str = setting(
        "inventory-counter", help="model name in model.json", group=OUTPUT, hyperparameter=True
    )
    version: str = setting("0", help="model version in model.json", group=OUTPUT, hyperparameter=True)
    progress: bool = setting(True, help="progress bars", group=OUTPUT)
    export: bool = setting(True, help="export ONNX + model.json at the end", group=OUTPUT, cli=False)
    tta: bool = setting(
        False,
        help="average the 4 flips of each image inside the exported graph: the served model does 4 forward "
        "passes per image (about 4x the inference cost) for a point or two of accuracy",
        group=MODEL,
    )
    pretrain_extra: Path | None = setting(
        None,
        help="manifest of images with other counts (0, 6+) for a pretraining stage on every count",
        group=PRETRAIN,
        metavar="CSV",
    )
    pretrain_data_root: Path | None = setting(
        None,
        help="directory the --pretrain-extra paths are under (default: as for any manifest)",
        group=PRETRAIN,
    )
    pretrain_epochs: int = setting(
        0,
        help="epochs of a first stage that trains the backbone on every count (the training images plus "
        "the other counts' images; counts 0..cap, ordinal), which the fit then starts from (0 = off)",
        group=PRETRAIN,
    )
    pretrain_count_cap: int = setting(10, help="counts above this are this in pretraining", group=PRETRAIN)
    calib_frac: float = setting(
        0.5,
        help="share of the validation manifest (stratified by count, the same images whatever --seed) held "
        "out of epoch selection and of the count rule's fit, on which the count_set and needs_review "
        "thresholds are fitted (0 = no calibration split: no count sets, no review flag; the temperature "
        "is still fitted)",
        group=CALIBRATION,
        hyperparameter=True,
    )
    coverage: float = setting(
        0.9,
        help="target coverage of count_set: the share of answers whose set of counts holds the true count",
        group=CALIBRATION,
        hyperparameter=True,
    )
    review_accuracy: float = setting(
        0.8,
        help="target accuracy of the answers not flagged needs_review (the least certain are flagged)",
        group=CALIBRATION,
        hyperparameter=True,
    )
    decision: str = setting(
        "plain",
        help="count rule: the head's own, or offsets fitted on val for accuracy (baked into the graph)",
        group=EXPERIMENTS,
        choices=DECISIONS,
    )
    refit: bool = setting(
        False,
        help="after val chose the epoch (and rule), train again on train + val (its selection part: the "
        "calibration part stays held out) up to that epoch and export that model (under MODEL_DIR/refit; "
        "val figures stay the selected run's, test reports both)",
        group=EXPERIMENTS,
    )
    teacher: tuple[str, ...] = setting(
        (),
        help="distil from these trained models (their mean output) on the same augmented images",
        group=EXPERIMENTS,
        nargs="+",
        metavar="MODEL_DIR",
    )
    distill_weight: float = setting(0.5, help="share of the loss from the teacher", group=EXPERIMENTS)
    distill_temperature: float = setting(2.0, help="softening of the teacher's outputs", group=EXPERIMENTS)
    pretrain_objective: str = setting(
        "counts",
        help="what the pretraining stage learns: counts 0..cap (needs --pretrain-extra) or contrastive "
        "(SimCLR views, no labels; --pretrain-extra optional)",
        group=EXPERIMENTS,
        choices=PRETRAIN_OBJECTIVES,
    )
    pretrain_temperature: float = setting(
        0.2, help="NT-Xent temperature of the contrastive stage", group=EXPERIMENTS
    )
    stop_after: int = setting(
        0, help="end after this epoch, the schedule still spanning epochs (0 = off)", group=RUNTIME, cli=False
    )

    def validate(self) -> None:
        """Fail early, with a message that says how to fix the setting."""
        self.classes = validate_classes(self.classes)
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {list(HEADS)}, got {self.head!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(f"--selection-metric must be one of {list(SELECTION_METRICS)}")
        if self.data_on_device not in DATA_ON_DEVICE:
            raise ConfigError(
                f"--data-on-device must be one of {', '.join(DATA_ON_DEVICE)}, got {self.data_on_device!r}"
            )
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
                0 <= self.calib_frac < 1,
                f"--calib-frac must be in [0, 1) (0 = no calibration split), got {self.calib_frac}",
            ),
            (0 < self.coverage < 1, f"--coverage must be in (0, 1), got {self.coverage}"),
            (
                0 < self.review_accuracy <= 1,
                f"--review-accuracy must be in (0, 1], got {self.review_accuracy}",
            ),
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
