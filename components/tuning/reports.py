"""What a study leaves: best_params.json, trials.csv and the PNG plots, rewritten from the whole study."""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    atomic_write_json,
    atomic_write_text,
    format_table,
)
from components.plots import save_figure
from components.tuning.config import (
    BEST_PARAMS_JSON,
    HISTORY_PNG,
    IMPORTANCES_PNG,
    INTERMEDIATE_PNG,
    SEARCH_PARAMS,
    TRIALS_CSV,
    TuneConfig,
    TuneResult,
)
from components.tuning.storage import redact_url

if TYPE_CHECKING:
    import optuna


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
