"""Hyperparameter search for the item counter with Optuna, shareable by any number of workers.

Each trial is a real :func:`components.training.stages.train` run into ``TUNE_DIR/trials/<number>/``;
after every epoch the validation metric goes to ``trial.report`` and the pruner may stop the trial
early. The sampler is multivariate TPE (with the constant liar, so concurrent workers do not all try the
same point).

The study lives in a SQLAlchemy database: SQLite (``TUNE_DIR/study.db``) by default, or a shared server
(``postgresql://…``, ``mysql://…``) so several processes or pods work on one study. ``--trials N`` is the
study-wide budget: a worker starts trials while fewer than N are finished (complete or pruned) or in
flight, then waits for the ones other workers are running, so N workers together run N trials, not N
each. Workers record a heartbeat; a trial whose worker died is marked failed by the next worker that
looks and re-queued with the same parameters, so a killed worker loses nothing but its running epoch.

Outputs (rewritten from the whole study by every worker when it stops): ``best_params.json`` (parameters
named as :class:`components.training.config.TrainConfig` fields; :func:`best_train_config` applies them),
``trials.csv``, ``optimization_history.png``, ``param_importances.png``, ``intermediate_values.png``.

``python -m components.tune --train train.csv --val val.csv --out TUNE_DIR --trials 20
[--storage sqlite:///…|postgresql://…] [--study-name NAME] [--timeout S]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import socket
import sys
import time
import typing
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
    atomic_write_json,
    atomic_write_text,
    format_table,
    parse_float_list,
    parse_int_list,
    read_json,
    setup_logging,
)
from components.plots import save_figure
from components.settings import coerce_text, field_types

if TYPE_CHECKING:
    import optuna

    from components.training.config import TrainConfig, TrainResult

LOG = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------
# Configuration


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


class _TrialError(Exception):
    """A trial's training raised: the trial is recorded as failed and the search goes on."""


class _BudgetReachedError(Exception):
    """A trial started after the study-wide budget was already covered (a narrow race between workers)."""


# --------------------------------------------------------------------------------------------------
# Storage


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and result files)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: never echo it back, it may hold a password
        return "<unparsable storage URL>"


def validate_storage_url(url: str) -> str:
    """Check the scheme and shape of a storage URL early; returns it unchanged.

    Raises :class:`ConfigError` with a hint for anything Optuna's RDB storage cannot share.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url.startswith("postgres://"):
        raise ConfigError(
            "storage URL scheme 'postgres://' is not understood by SQLAlchemy: use postgresql://"
        )
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"storage {redact_url(url)!r} is not a database URL: {STORAGE_HINT}") from e
    backend = parsed.get_backend_name()
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(f"storage scheme {parsed.drivername!r} is not supported: {STORAGE_HINT}")
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise ConfigError(
                "an in-memory SQLite study cannot be shared or resumed: give a file, "
                "e.g. sqlite:///TUNE_DIR/study.db"
            )
        if not Path(db).parent.is_dir():
            raise ConfigError(f"SQLite storage directory {Path(db).parent} does not exist: create it first")
    elif not parsed.host or not parsed.database:
        raise ConfigError(f"storage {redact_url(url)!r} needs a host and a database name: {STORAGE_HINT}")
    return url


def with_installed_driver(url: str) -> str:
    """``postgresql://`` means psycopg (v3) to SQLAlchemy 2.1; use psycopg2 when only that is installed.

    URLs that name a driver (``postgresql+psycopg2://``) are returned unchanged.
    """
    import importlib.util

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername != "postgresql" or importlib.util.find_spec("psycopg") is not None:
        return url
    if importlib.util.find_spec("psycopg2") is None:
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def open_storage(cfg: TuneConfig, *, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeat + retry of stale trials (several workers may create it at once)."""
    import optuna
    import sqlalchemy.exc

    url = with_installed_driver(validate_storage_url(cfg.resolved_storage()))
    if url.startswith("sqlite"):
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=cfg.max_retry, inherit_intermediate_values=True
    )
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers sharing one file wait for the lock
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=cfg.heartbeat_interval,
                    grace_period=cfg.grace_period,
                    heartbeat_stale_trial_callback=retry,
                )
        except ImportError as e:
            raise ConfigError(
                f"no database driver for {redact_url(url)}: install it (psycopg2-binary for PostgreSQL, "
                "pymysql for MySQL) or name an installed one in the URL, e.g. postgresql+psycopg2://"
            ) from e
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
        ) as e:
            # Concurrent first-time table creation by several workers can collide; a retry sees the tables.
            # A server that is not there at all fails every attempt and ends up here too.
            if attempt == attempts:
                message = str(e.orig if getattr(e, "orig", None) is not None else e).strip().splitlines()[0]
                raise ConfigError(f"cannot open storage {redact_url(url)}: {message}") from e
            LOG.info("storage not ready (%s), retrying", type(e).__name__)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def create_or_load_study(cfg: TuneConfig, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """``create_study(load_if_exists=True)`` with TPE + the configured pruner; checks the metric matches."""
    import optuna

    storage = storage if storage is not None else open_storage(cfg)
    worker = cfg.resolved_worker_id()
    seed = None if cfg.seed is None else (cfg.seed + zlib.crc32(worker.encode())) % 2**32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            multivariate=True,
            constant_liar=True,
            n_startup_trials=cfg.sampler_startup_trials,
            seed=seed,
        )
        study = optuna.create_study(
            storage=storage,
            study_name=cfg.study_name,
            direction=cfg.direction,
            sampler=sampler,
            pruner=make_pruner(cfg),
            load_if_exists=True,
        )
    if study.direction.name.lower() != cfg.direction:
        raise ConfigError(
            f"study {cfg.study_name!r} already exists and is set to {study.direction.name.lower()}, "
            f"but --metric {cfg.metric} needs {cfg.direction}: use another --study-name"
        )
    existing = study.user_attrs.get("metric")
    if existing is None:
        study.set_user_attr("metric", cfg.metric)
    elif existing != cfg.metric:
        raise ConfigError(
            f"study {cfg.study_name!r} optimizes {existing}, not {cfg.metric}: "
            f"use --metric {existing} or another --study-name"
        )
    return study


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """Median (default), Hyperband (epochs are the resource) or none."""
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs + 1
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs, reduction_factor=3)
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner must be one of {','.join(PRUNERS)}, got {cfg.pruner!r}")


# --------------------------------------------------------------------------------------------------
# TrainConfig plumbing


def _train_config_type() -> type[TrainConfig]:
    from components.training.config import TrainConfig

    return TrainConfig


def parse_overrides(items: Sequence[str], train_config_cls: type | None = None) -> dict[str, Any]:
    """``["device=cuda", "num_threads=2"]`` -> typed ``TrainConfig`` overrides, checking field names."""
    cls = train_config_cls or _train_config_type()
    types_by_field = field_types(cls)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        if key not in types_by_field:
            raise ConfigError(
                f"--set {key}: TrainConfig has no such field; fields: {', '.join(types_by_field)}"
            )
        if key in ("train_csv", "val_csv", "out_dir", "data_root", "epochs"):
            raise ConfigError(
                f"--set {key}: use the tune flag for it (--train/--val/--out/--data-root/--epochs)"
            )
        out[key] = coerce_text(value.strip(), types_by_field[key], where=f"--set {key}={value.strip()}")
    return out


def _check_overrides(cfg: TuneConfig, train_config_cls: type) -> None:
    names = set(field_types(train_config_cls))
    missing = [p for p in SEARCH_PARAMS if p not in names]
    if missing:
        raise ConfigError(
            f"TrainConfig lacks the searched fields {missing}: components.training is out of date"
        )
    unknown = [k for k in cfg.train_overrides if k not in names]
    if unknown:
        raise ConfigError(f"unknown TrainConfig field(s) {unknown}; fields: {', '.join(sorted(names))}")


def base_train_config(cfg: TuneConfig, train_config_cls: type | None = None) -> TrainConfig:
    """The TrainConfig every trial starts from (search parameters are filled in per trial)."""
    cls = train_config_cls or _train_config_type()
    _check_overrides(cfg, cls)
    # The trial's best epoch is chosen on the metric the study optimizes, unless told otherwise.
    defaults = {"selection_metric": cfg.metric, "progress": cfg.progress}
    base = cls(
        train_csv=Path(cfg.train_csv),
        val_csv=Path(cfg.val_csv),
        out_dir=Path(cfg.out_dir) / TRIALS_DIR / "base",
        data_root=cfg.data_root,
        epochs=cfg.epochs,
        **{**defaults, **cfg.train_overrides},
    )
    validate = getattr(base, "validate", None)
    if callable(validate):
        validate()  # bad --set values fail here, before any trial
    return base


def best_train_config(best_params_json: str | os.PathLike[str], base: TrainConfig) -> TrainConfig:
    """``base`` with the tuned hyperparameters from ``best_params.json`` (for the final fit).

    Only the hyperparameters are applied (``params``); paths, epochs and the settings used to make
    tuning cheap (``overrides`` in the file) stay as in ``base``.
    """
    data = read_json(best_params_json)
    params = data.get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{best_params_json} holds no tuned params: did a trial complete?")
    return apply_params(params, base, source=str(best_params_json))


def apply_params(
    params: Mapping[str, Any], base: TrainConfig, *, source: str = "tuned parameters"
) -> TrainConfig:
    """``base`` with ``params`` applied; a name that is no TrainConfig field is an error, not ignored."""
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"{source}: {unknown} are not TrainConfig fields")
    return dataclasses.replace(base, **params)


# --------------------------------------------------------------------------------------------------
# The search


def _budget_counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials, after failing and re-queueing those whose worker died."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # re-queues dead workers' trials before we count
    trials = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    )
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def _finished_or_running(study: optuna.Study) -> int:
    """Trials that use up the budget: complete, pruned, or running now."""
    return sum(_budget_counts(study))


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise KeyError(number)


def _trial_value(result: Any, history: list[tuple[int, float]], metric: str, direction: str) -> float:
    """The value of the model the trial exported (``result.metrics["val"]``), else the best epoch's.

    ``train`` selects its best epoch on the same metric (``selection_metric``), so this is the figure
    of the model in the trial's directory.
    """
    metrics = getattr(result, "metrics", None)
    val = metrics.get("val") if isinstance(metrics, Mapping) else None
    key = metric.removeprefix("val_")
    if isinstance(val, Mapping) and val.get(key) is not None:
        return float(val[key])
    if not history:
        raise _TrialError(f"training reported no {metric}")
    values = [v for _, v in history]
    return max(values) if direction == "maximize" else min(values)


class _Objective:
    """``objective(trial)``: sample, train into trials/<n>/, report every epoch, prune."""

    def __init__(self, cfg: TuneConfig, study: optuna.Study, base: Any, train_fn: TrainFn) -> None:
        self.cfg = cfg
        self.study = study
        self.base = base
        self.train_fn = train_fn
        self.worker = cfg.resolved_worker_id()
        self.fixed = {k: v for k, v in cfg.train_overrides.items() if k in SEARCH_PARAMS}

    def _check_budget(self, trial: optuna.Trial) -> None:
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        ahead = [t for t in self.study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
        if len(ahead) >= self.cfg.n_trials:
            trial.set_user_attr("skipped", f"study budget of {self.cfg.n_trials} trials already in use")
            self.study.stop()
            raise _BudgetReachedError(f"trial {trial.number}: budget of {self.cfg.n_trials} trials reached")

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        self._check_budget(trial)
        params = self.cfg.space.suggest(trial, skip=tuple(self.fixed))
        params.update(self.fixed)
        frozen = _frozen(self.study, trial.number)
        origin = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        trial.set_user_attr("worker", self.worker)
        # A retried trial continues in its original directory (train resumes from its checkpoint).
        trial_dir = Path(self.cfg.out_dir) / TRIALS_DIR / str(trial.number if origin is None else origin)
        trial.set_user_attr("trial_dir", str(trial_dir))
        changes: dict[str, Any] = {**params, "out_dir": trial_dir}
        if origin is not None and any(f.name == "resume" for f in dataclasses.fields(self.base)):
            changes["resume"] = True
        train_cfg = dataclasses.replace(self.base, **changes)
        LOG.info("trial %d (%s): %s", trial.number, self.worker, _fmt_params(params))
        history: list[tuple[int, float]] = []

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            if self.cfg.metric not in metrics:
                raise _TrialError(f"train reported {sorted(metrics)} but not {self.cfg.metric}")
            value = float(metrics[self.cfg.metric])
            history.append((int(epoch), value))
            # A retried trial inherits its predecessor's reports; report only the epochs it lacks.
            if int(epoch) not in frozen.intermediate_values:
                trial.report(value, int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {self.cfg.metric}={value:.4g}")

        try:
            result = self.train_fn(train_cfg, on_epoch=on_epoch)
        except optuna.TrialPruned:
            _drop_checkpoint(trial_dir)
            raise
        except (ConfigError, _TrialError, KeyboardInterrupt):
            raise
        except Exception as e:  # one bad setting (e.g. out of memory) must not end the search
            raise _TrialError(f"trial {trial.number}: training failed: {type(e).__name__}: {e}") from e
        _drop_checkpoint(trial_dir)
        value = _trial_value(result, history, self.cfg.metric, self.cfg.direction)
        if not math.isfinite(value):
            raise _TrialError(f"trial {trial.number}: {self.cfg.metric} is {value}")
        return value


def _drop_checkpoint(trial_dir: Path) -> None:
    """A finished trial's resume checkpoint (model + optimizer + best weights) is dead weight: delete it.

    The exported model of a complete trial stays; only a trial that is still running needs its
    checkpoint, to resume after its worker dies.
    """
    from components.training.config import CHECKPOINT_FILE

    (trial_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class _StopWhenBudgetUsed:
    """After each trial: stop when the study-wide budget is covered, or after repeated failures."""

    def __init__(self, cfg: TuneConfig, bar: Any) -> None:
        self.cfg = cfg
        self.bar = bar
        self.failures_in_a_row = 0
        self.run_here = 0
        self.too_many_failures = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from optuna.trial import TrialState

        if "skipped" in trial.user_attrs:
            study.stop()
            return
        self.run_here += 1
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= self.cfg.max_failures:
            self.too_many_failures = True
            study.stop()
        used = _finished_or_running(study)
        if self.bar is not None:
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            self.bar.n = min(done, self.cfg.n_trials)
            self.bar.refresh()
        if used >= self.cfg.n_trials:
            study.stop()


def validate_config(cfg: TuneConfig) -> None:
    """Everything that can be checked before the first trial starts."""
    if cfg.n_trials < 1:
        raise ConfigError(f"--trials must be >= 1 (the study-wide total), got {cfg.n_trials}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.metric not in METRICS:
        raise ConfigError(f"--metric must be one of {','.join(METRICS)}, got {cfg.metric!r}")
    if cfg.pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {','.join(PRUNERS)}, got {cfg.pruner!r}")
    if cfg.timeout is not None and cfg.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {cfg.timeout}")
    if cfg.heartbeat_interval < 1:
        raise ConfigError(f"--heartbeat-interval must be >= 1 second, got {cfg.heartbeat_interval}")
    if cfg.grace_period is not None and cfg.grace_period <= cfg.heartbeat_interval:
        raise ConfigError(
            f"--grace-period ({cfg.grace_period}s) must exceed --heartbeat-interval "
            f"({cfg.heartbeat_interval}s), or live trials would be declared dead"
        )
    if cfg.max_retry < 0 or cfg.max_failures < 1:
        raise ConfigError("--max-retry must be >= 0 and --max-failures >= 1")
    for name, path in (("--train", cfg.train_csv), ("--val", cfg.val_csv)):
        if not Path(path).is_file():
            raise ConfigError(f"{name} {path} does not exist: run components.split first")
    if cfg.data_root is not None and not Path(cfg.data_root).is_dir():
        raise ConfigError(f"--data-root {cfg.data_root} is not a directory")
    cfg.space.validate()
    if cfg.storage:
        validate_storage_url(cfg.storage)


class TuneError(RuntimeError):
    """The search cannot go on (e.g. every trial fails); the message says where to look."""


def tune(cfg: TuneConfig, *, train_fn: TrainFn | None = None) -> TuneResult:
    """Run this worker's share of the study, then write the reports for the whole study.

    ``train_fn`` defaults to :func:`components.training.stages.train`; any callable with its signature
    ``(TrainConfig, on_epoch=...) -> result`` works (``result.metrics["val"]`` gives the trial's
    value; without it the best reported epoch does).
    """
    with _quiet_optuna_experimental():
        return _tune(cfg, train_fn)


def _tune(cfg: TuneConfig, train_fn: TrainFn | None) -> TuneResult:
    validate_config(cfg)
    if train_fn is None:
        from components.training.stages import train as train_fn
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_train_config(cfg)
    study = create_or_load_study(cfg)
    storage_shown = redact_url(cfg.resolved_storage())
    worker = cfg.resolved_worker_id()
    LOG.info(
        "worker %s joins study %r at %s: budget %d trials, %s %s, pruner %s",
        worker,
        cfg.study_name,
        storage_shown,
        cfg.n_trials,
        cfg.direction,
        cfg.metric,
        cfg.pruner,
    )
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.n_trials, desc=f"tune {cfg.study_name}", unit="trial")
    stopper = _StopWhenBudgetUsed(cfg, bar)
    objective = _Objective(cfg, study, base, train_fn)
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    waiting_logged = False
    try:
        # Run trials while the budget has room; when the rest is in flight on other workers, wait for
        # it, so the reports cover the whole budget and a trial whose worker dies meanwhile is re-run here.
        while not stopper.too_many_failures and not cfg.report_only:
            finished, running = _budget_counts(study)
            left = None if deadline is None else deadline - time.monotonic()
            if finished >= cfg.n_trials or (left is not None and left <= 0):
                break
            if finished + running < cfg.n_trials:
                study.optimize(
                    objective,
                    timeout=left,
                    catch=(_TrialError, _BudgetReachedError),
                    callbacks=[stopper],
                    gc_after_trial=cfg.gc_after_trial,
                )
                continue
            if not waiting_logged:
                LOG.info("waiting for %d trial(s) running on other workers", running)
                waiting_logged = True
            time.sleep(min(cfg.wait_poll_s, left) if left is not None else cfg.wait_poll_s)
    finally:
        if bar is not None:
            bar.close()
    result = write_reports(study, cfg, n_run_here=stopper.run_here)
    if stopper.too_many_failures:
        raise TuneError(
            f"{cfg.max_failures} trials in a row failed on worker {worker}: "
            f"see the log and {result.trials_csv}"
        )
    return result


# --------------------------------------------------------------------------------------------------
# Reports


def _duration_s(t: optuna.trial.FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return round((t.datetime_complete - t.datetime_start).total_seconds(), 3)


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """One row per trial: number, state, value, duration, epochs reported, who ran it, params."""
    trials = study.get_trials(deepcopy=False)
    names = [p for p in SEARCH_PARAMS if any(p in t.params for t in trials)]
    names += sorted({p for t in trials for p in t.params} - set(names))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["number", "state", "value", "duration_s", "epochs_reported", "worker", "retry_of", "datetime_start"]
        + [f"param_{n}" for n in names]
    )
    for t in sorted(trials, key=lambda t: t.number):
        w.writerow(
            [
                t.number,
                t.state.name,
                "" if t.value is None else repr(float(t.value)),
                _duration_s(t) if _duration_s(t) is not None else "",
                len(t.intermediate_values),
                t.user_attrs.get("worker", ""),
                t.system_attrs.get("failed_trial", ""),
                t.datetime_start.isoformat() if t.datetime_start else "",
            ]
            + [t.params.get(n, "") for n in names]
        )
    return atomic_write_text(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(study: optuna.Study, metric: str, path: Path) -> Path:
    """Each trial's value (pruned ones at their last report) and the best so far."""
    from optuna.trial import TrialState

    plt = _pyplot()
    maximize = study.direction.name.lower() == "maximize"
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [
        (t.number, t.intermediate_values[max(t.intermediate_values)])
        for t in trials
        if t.state == TrialState.PRUNED and t.intermediate_values
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if complete:
        xs, ys = zip(*complete, strict=True)
        ax.scatter(xs, ys, color="tab:blue", label="complete", zorder=3)
        best, best_line = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if maximize else min(best, y))
            best_line.append(best)
        ax.step(xs, best_line, where="post", color="tab:red", label="best so far")
    if pruned:
        xs, ys = zip(*pruned, strict=True)
        ax.scatter(xs, ys, color="tab:gray", marker="x", label="pruned (last epoch)", zorder=2)
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    ax.set_title(f"study {study.study_name}: optimization history", fontsize=10)
    if complete or pruned:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_intermediate(study: optuna.Study, metric: str, path: Path) -> Path:
    """The per-epoch curve of every trial: shows where the pruner cut trials short."""
    from optuna.trial import TrialState

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drawn = False
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        style = (
            {"color": "tab:gray", "alpha": 0.6, "ls": "--"}
            if t.state == TrialState.PRUNED
            else {"alpha": 0.9}
        )
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker=".", lw=1, **style)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no epoch reported yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("per-epoch validation metric (dashed gray: pruned)", fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances, or None and the reason they cannot be computed yet."""
    import optuna
    from optuna.trial import TrialState

    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None
    ]
    if len(complete) < 2:
        return None, f"parameter importance needs at least 2 complete trials (have {len(complete)})"
    if len({t.value for t in complete}) < 2:
        return None, f"all {len(complete)} complete trials scored the same: nothing to attribute"
    varying = [p for p in complete[0].params if len({repr(t.params.get(p)) for t in complete}) > 1]
    if not varying:
        return None, "no searched parameter varies across the complete trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study, params=varying), ""
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        return None, f"importance could not be computed: {e}"


def plot_importances(study: optuna.Study, path: Path) -> tuple[Path, dict[str, float] | None]:
    """Horizontal bars of parameter importance, or a figure that says why there are none yet."""
    from optuna.trial import TrialState

    plt = _pyplot()
    importances, reason = param_importances(study)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (sums to 1)")
        n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        ax.set_title(f"parameter importance (PED-ANOVA over {n_complete} complete trials)", fontsize=10)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_title("parameter importance: not available yet", fontsize=10)
    return save_figure(fig, path), importances


def write_reports(study: optuna.Study, cfg: TuneConfig, *, n_run_here: int = 0) -> TuneResult:
    """best_params.json, trials.csv and the plots for the whole study; prints a summary table."""
    from optuna.trial import TrialState

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = [t for t in by_state[TrialState.COMPLETE] if t.value is not None]
    maximize = cfg.direction == "maximize"
    best = (max if maximize else min)(complete, key=lambda t: t.value) if complete else None
    constants = cfg.space.constants()
    fixed = {k: v for k, v in cfg.train_overrides.items() if k in SEARCH_PARAMS}
    best_params: dict[str, Any] = {}
    if best is not None:
        best_params = {**constants, **best.params, **fixed}
        best_params = {k: best_params[k] for k in SEARCH_PARAMS if k in best_params}
    trials_csv = write_trials_csv(study, out_dir / TRIALS_CSV)
    history = plot_history(study, cfg.metric, out_dir / HISTORY_PNG)
    intermediate = plot_intermediate(study, cfg.metric, out_dir / INTERMEDIATE_PNG)
    importances_png, importances = plot_importances(study, out_dir / IMPORTANCES_PNG)
    storage_shown = redact_url(cfg.resolved_storage())
    summary = {
        "study_name": study.study_name,
        "storage": storage_shown,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "best_value": None if best is None else float(best.value),
        "best_trial": None if best is None else best.number,
        "best_trial_dir": None if best is None else best.user_attrs.get("trial_dir"),
        "params": best_params,
        "overrides": {k: v for k, v in cfg.train_overrides.items() if k not in SEARCH_PARAMS},
        "epochs_per_trial": cfg.epochs,
        "n_trials_budget": cfg.n_trials,
        "n_trials": {s.name.lower(): len(v) for s, v in by_state.items() if v},
        "param_importances": importances,
    }
    best_path = atomic_write_json(out_dir / BEST_PARAMS_JSON, summary)
    _print_summary(study, cfg, complete, best, storage_shown, by_state)
    return TuneResult(
        out_dir=out_dir,
        best_params_path=best_path,
        trials_csv=trials_csv,
        history_png=history,
        importances_png=importances_png,
        intermediate_png=intermediate,
        study_name=study.study_name,
        storage=storage_shown,
        best_value=summary["best_value"],
        best_params=best_params,
        best_trial=summary["best_trial"],
        n_complete=len(by_state[TrialState.COMPLETE]),
        n_pruned=len(by_state[TrialState.PRUNED]),
        n_failed=len(by_state[TrialState.FAIL]),
        n_run_here=n_run_here,
    )


def _print_summary(
    study: optuna.Study,
    cfg: TuneConfig,
    complete: list[Any],
    best: Any,
    storage: str,
    by_state: Mapping[Any, list],
) -> None:
    counts = ", ".join(f"{len(v)} {s.name.lower()}" for s, v in by_state.items() if v) or "no trials"
    print(f"study {study.study_name} at {storage}: {counts}")
    top = sorted(complete, key=lambda t: t.value, reverse=cfg.direction == "maximize")[:10]
    if top:
        names = [p for p in SEARCH_PARAMS if any(p in t.params for t in top)]
        rows = [[t.number, t.value, _duration_s(t)] + [t.params.get(n, "") for n in names] for t in top]
        print(format_table(rows, ["trial", cfg.metric, "seconds", *names]))
    if best is not None:
        print(f"best: trial {best.number}, {cfg.metric}={best.value:.4g}")


# --------------------------------------------------------------------------------------------------
# CLI


def _float_pair(text: str, name: str) -> tuple[float, float]:
    values = parse_float_list(text, name=name)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ConfigError(f"{name}: expected LOW,HIGH (or one value to fix it), got {text!r}")
    return (values[0], values[1])


def _parser() -> argparse.ArgumentParser:
    d = SearchSpace()

    def pair(v: tuple[float, float]) -> str:
        return f"{v[0]:g},{v[1]:g}"

    def items(v: tuple[Any, ...]) -> str:
        return ",".join(map(str, v))

    p = argparse.ArgumentParser(prog="python -m components.tune", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--train", required=True, type=Path, help="training manifest (train.csv from split)")
    add("--val", required=True, type=Path, help="validation manifest (val.csv from split)")
    add("--data-root", type=Path, default=None, help="directory the manifest paths are under")
    add("--out", required=True, type=Path, help="TUNE_DIR: reports, trials/<n>/ and the default study.db")
    add("--trials", required=True, type=int, help="study-wide number of trials, all workers together")
    add("--storage", default=None, help="SQLAlchemy URL of the study (default sqlite:///TUNE_DIR/study.db)")
    add(
        "--study-name",
        default=DEFAULT_STUDY_NAME,
        help=f"workers with one name share a study ({DEFAULT_STUDY_NAME})",
    )
    add("--timeout", type=float, default=None, help="this worker starts no trial after S seconds")
    add("--epochs", type=int, default=5, help="epochs per trial, the pruner's steps (5)")
    add(
        "--metric",
        default="val_accuracy",
        choices=list(METRICS),
        help="what the study optimizes (val_accuracy)",
    )
    add("--pruner", default="median", choices=list(PRUNERS), help="median (default), hyperband or none")
    add("--pruner-startup-trials", type=int, default=3, help="median pruner: trials before pruning (3)")
    add("--pruner-warmup-epochs", type=int, default=1, help="median pruner: epochs before pruning (1)")
    add("--sampler-startup-trials", type=int, default=10, help="random trials before TPE takes over (10)")
    add("--seed", type=int, default=0, help="sampler seed, mixed with --worker-id (0); -1 for random")
    add("--worker-id", default=None, help="this worker's name in logs and trials.csv (default host-pid)")
    add("--lr", default=pair(d.lr), help=f"LOW,HIGH on a log scale ({pair(d.lr)}); one value fixes it")
    add("--momentum", default=pair(d.momentum), help=f"LOW,HIGH ({pair(d.momentum)})")
    add(
        "--weight-decay",
        default=pair(d.weight_decay),
        help=f"LOW,HIGH on a log scale ({pair(d.weight_decay)})",
    )
    add("--batch-sizes", default=items(d.batch_sizes), help=f"choices ({items(d.batch_sizes)})")
    add("--label-smoothing", default=pair(d.label_smoothing), help=f"LOW,HIGH ({pair(d.label_smoothing)})")
    add("--aug-strength", default=pair(d.aug_strength), help=f"LOW,HIGH within 0..3 ({pair(d.aug_strength)})")
    add("--image-sizes", default=items(d.image_sizes), help=f"choices in px ({items(d.image_sizes)})")
    add("--heads", default=items(d.heads), help=f"choices ({items(d.heads)})")
    add(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="TrainConfig field for every trial, e.g. device=cuda, weights=imagenet, num_threads=4; "
        "a searched parameter set here (head=ordinal) is fixed. Repeatable.",
    )
    add(
        "--heartbeat-interval", type=int, default=60, help="seconds between a running trial's heartbeats (60)"
    )
    add(
        "--grace-period",
        type=int,
        default=None,
        help="seconds without a heartbeat before a trial is dead (2x)",
    )
    add("--max-retry", type=int, default=3, help="times a dead worker's trial is re-queued (3)")
    add("--max-failures", type=int, default=3, help="this worker stops after N failed trials in a row (3)")
    add("--report-only", action="store_true", help="run no trial: only write the reports of the study")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """argparse namespace -> validated-shape :class:`TuneConfig` (range checks happen in :func:`tune`)."""
    space = SearchSpace(
        lr=_float_pair(args.lr, "--lr"),
        momentum=_float_pair(args.momentum, "--momentum"),
        weight_decay=_float_pair(args.weight_decay, "--weight-decay"),
        batch_sizes=tuple(parse_int_list(args.batch_sizes, name="--batch-sizes")),
        label_smoothing=_float_pair(args.label_smoothing, "--label-smoothing"),
        aug_strength=_float_pair(args.aug_strength, "--aug-strength"),
        image_sizes=tuple(parse_int_list(args.image_sizes, name="--image-sizes")),
        heads=tuple(h.strip() for h in args.heads.split(",") if h.strip()),
    )
    if args.storage:
        validate_storage_url(args.storage)
    return TuneConfig(
        train_csv=args.train,
        val_csv=args.val,
        out_dir=args.out,
        n_trials=args.trials,
        data_root=args.data_root,
        storage=args.storage,
        study_name=args.study_name,
        timeout=args.timeout,
        epochs=args.epochs,
        metric=args.metric,
        space=space,
        train_overrides=parse_overrides(args.overrides) if args.overrides else {},
        pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials,
        pruner_warmup_epochs=args.pruner_warmup_epochs,
        sampler_startup_trials=args.sampler_startup_trials,
        seed=None if args.seed < 0 else args.seed,
        worker_id=args.worker_id,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
        max_retry=args.max_retry,
        max_failures=args.max_failures,
        progress=not args.no_progress,
        report_only=args.report_only,
    )


@contextlib.contextmanager
def _quiet_optuna_experimental() -> Iterator[None]:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the summary table; exits 2 on configuration errors."""
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = config_from_args(args)
        result = tune(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: finished trials are kept in the study; run the same command to go on",
            file=sys.stderr,
        )
        return 130
    if result.best_trial is None:
        print("error: no trial completed yet; see trials.csv", file=sys.stderr)
        return 1
    print(f"reports in {result.out_dir}: {BEST_PARAMS_JSON}, {TRIALS_CSV}, {HISTORY_PNG}, {IMPORTANCES_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
