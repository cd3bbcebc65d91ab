"""Where the study lives: SQLite or a shared SQL server; URL checks, drivers, retried connection."""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
)
from components.tuning.config import PRUNERS, STORAGE_BACKENDS, STORAGE_HINT, TuneConfig

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)


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
