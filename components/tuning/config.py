"""Tuning settings: the search space, a worker's configuration, its result, and the names of its files."""

from __future__ import annotations

import math
import os
import socket
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
)

if TYPE_CHECKING:
    import optuna

    from components.training.config import TrainResult


BEST_PARAMS_JSON = "best_params.json"
TRIALS_CSV = "trials.csv"
HISTORY_PNG = "optimization_history.png"
IMPORTANCES_PNG = "param_importances.png"
INTERMEDIATE_PNG = "intermediate_values.png"
TRIALS_DIR = "trials"
DEFAULT_STUDY_NAME = "inventory-counter"

#: Metrics ``train`` reports after each epoch, and which way is better.
METRICS: dict[str, str] = {"val_accuracy": "maximize", "val_rmse": "minimize", "val_loss": "minimize"}
#: The searched hyperparameters, named as ``TrainConfig`` fields.
SEARCH_PARAMS: tuple[str, ...] = (
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "label_smoothing",
    "aug_strength",
    "image_size",
    "head",
)
PRUNERS: tuple[str, ...] = ("median", "hyperband", "none")
STORAGE_BACKENDS: tuple[str, ...] = ("sqlite", "postgresql", "mysql")
STORAGE_HINT = (
    "use sqlite:///path/to/study.db, postgresql://user:password@host:5432/db or "
    "mysql+pymysql://user:password@host/db"
)

TrainFn = Callable[..., "TrainResult"]


@dataclass(frozen=True)
class SearchSpace:
    """Ranges and choices per hyperparameter; a range with equal ends or a single choice is fixed.

    Float ranges are ``(low, high)``; ``lr`` and ``weight_decay`` are searched on a log scale.
    """

    lr: tuple[float, float] = (0.02, 0.5)
    momentum: tuple[float, float] = (0.8, 0.95)
    weight_decay: tuple[float, float] = (1e-5, 1e-3)
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    label_smoothing: tuple[float, float] = (0.0, 0.2)
    aug_strength: tuple[float, float] = (0.0, 1.5)
    image_sizes: tuple[int, ...] = (128, 160, 224)
    heads: tuple[str, ...] = ("classification", "ordinal", "regression")

    LOG_SCALE: typing.ClassVar[frozenset[str]] = frozenset({"lr", "weight_decay"})

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "label_smoothing": self.label_smoothing,
            "aug_strength": self.aug_strength,
        }

    def choices(self) -> dict[str, tuple[Any, ...]]:
        return {"batch_size": self.batch_sizes, "image_size": self.image_sizes, "head": self.heads}

    def validate(self) -> None:
        """Reject empty or inverted ranges up front, naming the flag to fix."""
        from components.modelspec import HEADS

        for name, (low, high) in self.ranges().items():
            flag = "--" + name.replace("_", "-")
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ConfigError(f"{flag}: expected LOW,HIGH with LOW <= HIGH, got {low},{high}")
            if name in self.LOG_SCALE and low <= 0:
                raise ConfigError(
                    f"{flag} is searched on a log scale: both ends must be > 0, got {low},{high}"
                )
            if name in ("momentum", "label_smoothing") and not (low >= 0 and high < 1):
                raise ConfigError(f"{flag}: values must lie in [0, 1), got {low},{high}")
            if name == "aug_strength" and not (low >= 0 and high <= 3):
                raise ConfigError(f"{flag}: values must lie in [0, 3], got {low},{high}")
            if name in ("lr", "weight_decay") and low < 0:
                raise ConfigError(f"{flag}: values must be >= 0, got {low},{high}")
        for name, values in self.choices().items():
            flag = "--" + name.replace("_", "-") + "s"
            if not values:
                raise ConfigError(f"{flag}: give at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"{flag}: values repeat: {list(values)}")
        for size in self.image_sizes:
            if not 16 <= size <= 1024:
                raise ConfigError(f"--image-sizes: sizes must be in [16, 1024] px, got {size}")
        for b in self.batch_sizes:
            if b < 1:
                raise ConfigError(f"--batch-sizes: batch sizes must be >= 1, got {b}")
        bad = [h for h in self.heads if h not in HEADS]
        if bad:
            raise ConfigError(f"--heads: unknown head(s) {bad}; choose from {','.join(HEADS)}")

    def constants(self) -> dict[str, Any]:
        """Parameters with a single possible value (not searched, but part of the result)."""
        out: dict[str, Any] = {k: lo for k, (lo, hi) in self.ranges().items() if lo == hi}
        out.update({k: v[0] for k, v in self.choices().items() if len(v) == 1})
        return out

    def suggest(self, trial: optuna.Trial, skip: Sequence[str] = ()) -> dict[str, Any]:
        """Sample every searched parameter (except ``skip``) from ``trial``; constants included."""
        params = {k: v for k, v in self.constants().items() if k not in skip}
        for name, (low, high) in self.ranges().items():
            if name not in skip and low != high:
                params[name] = trial.suggest_float(name, low, high, log=name in self.LOG_SCALE)
        for name, values in self.choices().items():
            if name not in skip and len(values) > 1:
                params[name] = trial.suggest_categorical(name, list(values))
        return {k: params[k] for k in SEARCH_PARAMS if k in params}


@dataclass
class TuneConfig:
    """One worker's settings. ``n_trials`` is the study-wide budget, shared by all workers."""

    train_csv: Path
    val_csv: Path
    out_dir: Path
    n_trials: int
    data_root: Path | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    timeout: float | None = None
    epochs: int = 5
    metric: str = "val_accuracy"
    space: SearchSpace = field(default_factory=SearchSpace)
    #: ``TrainConfig`` fields for every trial (device, weights, num_threads, ...); a searched
    #: parameter given here is fixed and not searched.
    train_overrides: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 1
    sampler_startup_trials: int = 10
    seed: int | None = 0
    worker_id: str | None = None
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 3
    max_failures: int = 3
    progress: bool = True
    #: Collect garbage between trials so a finished trial's tensors are freed before the next one
    #: (costs well under a second with torch loaded; worth it next to minutes of training).
    gc_after_trial: bool = True
    #: Seconds between checks while the last trials run on other workers.
    wait_poll_s: float = 2.0
    #: Start no trial and wait for none: only write the reports of the study as it is.
    report_only: bool = False

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    def resolved_storage(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out_dir) / 'study.db').resolve()}"

    @property
    def direction(self) -> str:
        return METRICS[self.metric]


@dataclass
class TuneResult:
    """Where the outputs are and what the study found (``best_*`` are None before any trial completed)."""

    out_dir: Path
    best_params_path: Path
    trials_csv: Path
    history_png: Path
    importances_png: Path
    intermediate_png: Path
    study_name: str
    storage: str  # password redacted
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    n_complete: int
    n_pruned: int
    n_failed: int
    n_run_here: int
