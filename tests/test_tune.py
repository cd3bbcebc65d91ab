"""components.tune: pruning, heartbeat + retry of a killed worker, two workers sharing a PostgreSQL study.

The Optuna machinery (sampler, pruner, storage, heartbeat, budget, reports) always runs for real. Most
tests hand ``tune`` a scripted ``train_fn`` whose per-epoch metric depends on the sampled learning rate,
so pruning is deterministic and fast; the PostgreSQL test runs two real ``python -m components.tune``
worker processes that train ResNet18 for real on a few ABID images at 32 px.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from components.common import ConfigError, sha256_file
from components.manifest import ManifestRow, write_manifest
from components.training.config import TrainConfig, TrainResult
from components.tune import (
    BEST_PARAMS_JSON,
    HISTORY_PNG,
    IMPORTANCES_PNG,
    INTERMEDIATE_PNG,
    TRIALS_CSV,
    SearchSpace,
    TuneConfig,
    best_train_config,
    main,
    redact_url,
    tune,
    validate_storage_url,
)
from tests.fixtures.postgres import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def tune_split(abid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """train.csv (3 per class) and val.csv (1 per class) over real ABID images, read in place."""
    out = tmp_path_factory.mktemp("tune_split")
    picked: dict[int, list[str]] = {c: [] for c in (1, 2, 3, 4, 5)}
    for meta in sorted((abid_dir / "metadata").glob("*.json")):
        count = json.loads(meta.read_text()).get("EXPECTED_QUANTITY")
        if (
            count in picked
            and len(picked[count]) < 4
            and (abid_dir / "bin-images" / f"{meta.stem}.jpg").is_file()
        ):
            picked[count].append(meta.stem)
        if all(len(v) == 4 for v in picked.values()):
            break
    train, val = [], []
    for count, ids in picked.items():
        for k, image_id in enumerate(ids):
            path = abid_dir / "bin-images" / f"{image_id}.jpg"
            with Image.open(path) as im:
                width, height = im.size
            row = ManifestRow(
                image_id, count, f"bin-images/{image_id}.jpg", sha256_file(path), width, height, "abid"
            )
            (val if k == 3 else train).append(row)
    write_manifest(out / "train.csv", train)
    write_manifest(out / "val.csv", val)
    (out / "summary.json").write_text(json.dumps({"data_root": str(abid_dir)}))  # as split writes it
    return out / "train.csv", out / "val.csv"


def lr_quality(lr: float) -> float:
    """1 at lr=0.1, falling off by decade: the scripted 'accuracy' a trial converges to."""
    return max(0.0, 1.0 - (math.log10(lr) + 1.0) ** 2)


def scripted_train(calls: list[dict[str, Any]]) -> Callable[..., TrainResult]:
    """A train_fn with train()'s contract whose val_accuracy climbs to lr_quality(lr) over the epochs."""

    def train_fn(
        cfg: TrainConfig, on_epoch: Callable[[int, dict[str, float]], None] | None = None
    ) -> TrainResult:
        record = {"cfg": cfg, "epochs_run": 0}
        calls.append(record)
        target = lr_quality(cfg.lr)
        history = []
        for epoch in range(1, cfg.epochs + 1):
            acc = target * epoch / cfg.epochs
            metrics = {"epoch": epoch, "val_accuracy": acc, "val_rmse": 2.0 - acc, "val_loss": 2.0 - acc}
            history.append(metrics)
            record["epochs_run"] = epoch
            if on_epoch is not None:
                on_epoch(epoch, dict(metrics))
        best = history[-1]
        val = {"accuracy": best["val_accuracy"], "rmse": best["val_rmse"], "loss": best["val_loss"]}
        return TrainResult(Path(cfg.out_dir), {"val": val}, cfg.epochs, cfg.epochs, False, history)

    return train_fn


def _config(tune_split: tuple[Path, Path], out: Path, **kw: Any) -> TuneConfig:
    space = SearchSpace(
        lr=(0.01, 1.0), image_sizes=(32,), batch_sizes=(4, 8), heads=("classification", "ordinal")
    )
    defaults: dict[str, Any] = {
        "train_csv": tune_split[0],
        "val_csv": tune_split[1],
        "out_dir": out,
        "space": space,
        "worker_id": "w0",
        "progress": False,
        "train_overrides": {"num_threads": 1},
        "gc_after_trial": False,
    }
    return TuneConfig(**{**defaults, **kw})


def _load(cfg: TuneConfig) -> optuna.Study:
    return optuna.load_study(study_name=cfg.study_name, storage=cfg.resolved_storage())


def _read_trials_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def test_tuning_prunes_and_writes_reports(tune_split: tuple[Path, Path], tmp_path: Path):
    calls: list[dict[str, Any]] = []
    cfg = _config(
        tune_split,
        tmp_path / "tune",
        n_trials=10,
        epochs=4,
        pruner_startup_trials=2,
        pruner_warmup_epochs=0,
        sampler_startup_trials=5,
        seed=3,
    )
    result = tune(cfg, train_fn=scripted_train(calls))

    study = _load(cfg)
    states = [t.state for t in study.trials]
    assert len(study.get_trials(states=FINISHED)) == 10 and TrialState.FAIL not in states
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "no trial was pruned"
    assert result.n_pruned == len(pruned) and result.n_complete == 10 - len(pruned)
    # Pruned trials really stopped training early, and were behind at the step where they stopped.
    for t in pruned:
        last = max(t.intermediate_values)
        assert last < cfg.epochs
        assert calls[t.number]["epochs_run"] == last
    # Each trial trained into its own directory with the sampled hyperparameters.
    for t in study.trials:
        train_cfg = calls[t.number]["cfg"]
        assert train_cfg.out_dir == cfg.out_dir / "trials" / str(t.number)
        assert train_cfg.lr == t.params["lr"] and train_cfg.head == t.params["head"]
        assert train_cfg.image_size == 32 and train_cfg.num_threads == 1 and train_cfg.epochs == 4
        assert train_cfg.selection_metric == "val_accuracy"

    best = study.best_trial
    summary = json.loads((cfg.out_dir / BEST_PARAMS_JSON).read_text())
    assert summary["best_trial"] == best.number == result.best_trial
    assert summary["best_value"] == pytest.approx(best.value)
    assert summary["params"] == {**best.params, "image_size": 32}
    assert summary["n_trials"] == {"complete": result.n_complete, "pruned": result.n_pruned}
    assert set(summary["param_importances"]) <= set(best.params) and summary["param_importances"]

    rows = _read_trials_csv(cfg.out_dir / TRIALS_CSV)
    assert [int(r["number"]) for r in rows] == list(range(10))
    assert sum(r["state"] == "PRUNED" for r in rows) == len(pruned)
    assert all(r["worker"] == "w0" for r in rows)
    assert float(rows[best.number]["value"]) == pytest.approx(best.value)
    for name in (HISTORY_PNG, IMPORTANCES_PNG, INTERMEDIATE_PNG):
        _assert_png(cfg.out_dir / name)

    # The final fit gets the tuned hyperparameters but keeps its own paths and epochs.
    base = TrainConfig(train_csv=Path("a.csv"), val_csv=Path("b.csv"), out_dir=Path("final"), epochs=60)
    final = best_train_config(cfg.out_dir / BEST_PARAMS_JSON, base)
    assert (final.lr, final.head, final.image_size, final.batch_size) == (
        best.params["lr"],
        best.params["head"],
        32,
        best.params["batch_size"],
    )
    assert (final.out_dir, final.epochs, final.num_threads) == (Path("final"), 60, None)

    # Re-running the same command adds nothing: the study-wide budget is used up.
    again = tune(cfg, train_fn=scripted_train(calls))
    assert again.n_run_here == 0 and len(_load(cfg).trials) == 10
    # A larger budget with report_only still runs nothing; it only rewrites the reports.
    (cfg.out_dir / TRIALS_CSV).unlink()
    report = tune(dataclasses.replace(cfg, n_trials=20, report_only=True), train_fn=scripted_train(calls))
    assert report.n_run_here == 0 and len(_load(cfg).trials) == 10 and (cfg.out_dir / TRIALS_CSV).is_file()


def test_importance_placeholder_with_one_trial_and_fixed_params(
    tune_split: tuple[Path, Path], tmp_path: Path
):
    calls: list[dict[str, Any]] = []
    cfg = _config(tune_split, tmp_path / "tune", n_trials=1, epochs=1, train_overrides={"head": "regression"})
    result = tune(cfg, train_fn=scripted_train(calls))
    summary = json.loads(result.best_params_path.read_text())
    assert summary["param_importances"] is None
    _assert_png(result.importances_png)
    assert summary["params"]["head"] == "regression" and "head" not in _load(cfg).trials[0].params
    assert calls[0]["cfg"].head == "regression"


def _hang_after_first_epoch(cfg: TrainConfig, on_epoch: Callable[..., None] | None = None) -> TrainResult:
    assert on_epoch is not None
    on_epoch(1, {"val_accuracy": 0.25, "val_rmse": 1.5, "val_loss": 1.5})
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "reported").touch()
    time.sleep(600)
    raise AssertionError("the test kills this worker before it gets here")


def _doomed_worker(cfg: TuneConfig) -> None:
    tune(cfg, train_fn=_hang_after_first_epoch)


def test_killed_workers_trial_is_failed_and_retried(tune_split: tuple[Path, Path], tmp_path: Path):
    cfg = _config(tune_split, tmp_path / "tune", n_trials=2, epochs=2, heartbeat_interval=1, grace_period=2)
    doomed = multiprocessing.get_context("fork").Process(target=_doomed_worker, args=(cfg,))
    doomed.start()
    try:
        marker = cfg.out_dir / "trials" / "0" / "reported"
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the first worker never reported an epoch"
            assert doomed.is_alive(), "the first worker died on its own"
            time.sleep(0.1)
        os.kill(doomed.pid, signal.SIGKILL)  # no cleanup: the trial stays RUNNING in the study
    finally:
        doomed.join(10)
    dead = _load(cfg).trials[0]
    assert dead.state == TrialState.RUNNING

    time.sleep(cfg.grace_period + 1)  # heartbeat goes stale
    calls: list[dict[str, Any]] = []
    result = tune(cfg, train_fn=scripted_train(calls))

    trials = {t.number: t for t in _load(cfg).trials}
    assert trials[0].state == TrialState.FAIL
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1
    retry = retried[0]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.intermediate_values[1] == pytest.approx(0.25)  # the dead worker's report is kept
    # The retry continues in the dead trial's directory, resuming its checkpoint.
    first = calls[0]["cfg"]
    assert first.out_dir == cfg.out_dir / "trials" / "0" and first.resume is True
    assert result.n_complete + result.n_pruned == 2 and result.n_failed == 1
    rows = _read_trials_csv(cfg.out_dir / TRIALS_CSV)
    assert [r["retry_of"] for r in rows if int(r["number"]) == retry.number] == ["0"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://localhost:6379/0", "not supported"),
        ("postgres://u:pw@h/db", "use postgresql://"),
        ("sqlite:///:memory:", "in-memory"),
        ("not a url", "not a database URL"),
        ("postgresql://user:pw@/db", "needs a host"),
    ],
)
def test_bad_storage_urls_are_config_errors(url: str, message: str):
    with pytest.raises(ConfigError, match=message) as e:
        validate_storage_url(url)
    assert "pw" not in str(e.value)


def test_cli_rejects_bad_input_with_exit_2(tune_split: tuple[Path, Path], tmp_path: Path, capsys):
    common = ["--train", str(tune_split[0]), "--val", str(tune_split[1]), "--out", str(tmp_path / "t")]
    cases = [
        (["--trials", "2", "--storage", "mongodb://u:secret@h/db"], "not supported"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--trials", "2", "--lr", "0.1,0.01"], "LOW <= HIGH"),
        (["--trials", "2", "--heads", "classification,softmax"], "unknown head"),
        (["--trials", "2", "--set", "colour=red"], "no such field"),
        (["--trials", "2", "--set", "num_threads=two"], "expected int"),
    ]
    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert "secret" not in err
    assert not (tmp_path / "t" / "study.db").exists()


def test_redact_url():
    assert (
        redact_url("postgresql+psycopg2://u:s3cret@db:5432/optuna")
        == "postgresql+psycopg2://u:***@db:5432/optuna"
    )
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_share_one_postgres_study(
    postgres_server: PostgresServer, postgres_url: str, tune_split: tuple[Path, Path], tmp_path: Path
):
    n_trials = 3
    cache = tmp_path / "cache"
    # w2 names no driver: SQLAlchemy 2.1 reads that as psycopg 3, tune falls back to the installed psycopg2.
    urls = {"w1": postgres_url, "w2": postgres_url.replace("postgresql+psycopg2://", "postgresql://")}
    procs, logs = [], {}
    try:
        for worker, url in urls.items():
            cmd = [
                sys.executable, "-m", "components.tune",
                "--train", str(tune_split[0]), "--val", str(tune_split[1]),
                "--out", str(tmp_path / worker), "--trials", str(n_trials), "--storage", url,
                "--study-name", "shared", "--worker-id", worker, "--epochs", "1",
                "--image-sizes", "32", "--batch-sizes", "4,8", "--heads", "classification,ordinal",
                "--set", "num_threads=1", "--set", f"cache_dir={cache}", "--set", "export=false",
                "--set", "decode_workers=1", "--no-progress",
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
            logs[worker] = tmp_path / f"{worker}.log"
            with logs[worker].open("wb") as log:
                procs.append(
                    subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (worker, log) in zip(procs, logs.items(), strict=True):
        out = log.read_text(errors="replace")
        assert proc.returncode == 0, f"{worker}:\n{out[-3000:]}"
        assert postgres_server.password not in out and ":***@127.0.0.1" in out

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == n_trials
    # either worker may take any trial (one can finish them all while the other imports torch)
    assert {t.user_attrs["worker"] for t in finished} <= {"w1", "w2"}
    for worker in urls:
        summary = json.loads((tmp_path / worker / BEST_PARAMS_JSON).read_text())
        assert sum(summary["n_trials"].get(s, 0) for s in ("complete", "pruned")) == n_trials
        assert postgres_server.password not in summary["storage"] and summary["study_name"] == "shared"
        assert summary["best_trial"] == study.best_trial.number
