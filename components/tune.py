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

The code lives in :mod:`components.tuning` (config, storage, params, search, reports, cli); the names
below are the Python API documented for this module.
"""

from __future__ import annotations

import sys

from components.tuning.cli import (
    config_from_args,
    main,
)
from components.tuning.config import (
    BEST_PARAMS_JSON,
    DEFAULT_STUDY_NAME,
    HISTORY_PNG,
    IMPORTANCES_PNG,
    INTERMEDIATE_PNG,
    METRICS,
    PRUNERS,
    SEARCH_PARAMS,
    STORAGE_BACKENDS,
    STORAGE_HINT,
    TRIALS_CSV,
    TRIALS_DIR,
    SearchSpace,
    TuneConfig,
    TuneResult,
)
from components.tuning.params import (
    apply_params,
    base_train_config,
    best_train_config,
    parse_overrides,
)
from components.tuning.reports import (
    param_importances,
    plot_history,
    plot_importances,
    plot_intermediate,
    write_reports,
    write_trials_csv,
)
from components.tuning.search import (
    TuneError,
    tune,
    validate_config,
)
from components.tuning.storage import (
    create_or_load_study,
    make_pruner,
    open_storage,
    redact_url,
    validate_storage_url,
    with_installed_driver,
)

__all__ = [
    "BEST_PARAMS_JSON",
    "DEFAULT_STUDY_NAME",
    "HISTORY_PNG",
    "IMPORTANCES_PNG",
    "INTERMEDIATE_PNG",
    "METRICS",
    "PRUNERS",
    "SEARCH_PARAMS",
    "STORAGE_BACKENDS",
    "STORAGE_HINT",
    "TRIALS_CSV",
    "TRIALS_DIR",
    "SearchSpace",
    "TuneConfig",
    "TuneError",
    "TuneResult",
    "apply_params",
    "base_train_config",
    "best_train_config",
    "config_from_args",
    "create_or_load_study",
    "main",
    "make_pruner",
    "open_storage",
    "param_importances",
    "parse_overrides",
    "plot_history",
    "plot_importances",
    "plot_intermediate",
    "redact_url",
    "tune",
    "validate_config",
    "validate_storage_url",
    "with_installed_driver",
    "write_reports",
    "write_trials_csv",
]

if __name__ == "__main__":
    sys.exit(main())
