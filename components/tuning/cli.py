"""``python -m components.tune``: flags into a TuneConfig, the run, the summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    ConfigError,
    parse_float_list,
    parse_int_list,
    setup_logging,
)
from components.tuning.config import (
    BEST_PARAMS_JSON,
    DEFAULT_STUDY_NAME,
    HISTORY_PNG,
    IMPORTANCES_PNG,
    METRICS,
    PRUNERS,
    TRIALS_CSV,
    SearchSpace,
    TuneConfig,
)
from components.tuning.params import parse_overrides
from components.tuning.search import TuneError, tune
from components.tuning.storage import validate_storage_url

if TYPE_CHECKING:
    pass


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
