"""The study-wide search: a budget shared by every worker, pruning, heartbeats, :func:`tune`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
)
from components.tuning.config import (
    METRICS,
    PRUNERS,
    SEARCH_PARAMS,
    TRIALS_DIR,
    TrainFn,
    TuneConfig,
    TuneResult,
)
from components.tuning.params import base_train_config
from components.tuning.reports import write_reports
from components.tuning.storage import create_or_load_study, redact_url, validate_storage_url

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)


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


class _TrialError(Exception):
    """A trial's training raised: the trial is recorded as failed and the search goes on."""


class _BudgetReachedError(Exception):
    """A trial started after the study-wide budget was already covered (a narrow race between workers)."""


@contextlib.contextmanager
def _quiet_optuna_experimental() -> Iterator[None]:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


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
