"""Trials as TrainConfigs: ``--set`` overrides, every trial's base config, the tuned parameters applied."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
    read_json,
)
from components.settings import coerce_text, field_types
from components.tuning.config import SEARCH_PARAMS, TRIALS_DIR, TuneConfig

if TYPE_CHECKING:
    from components.training.config import TrainConfig


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
