"""Run the whole pipeline on this machine with ``kfp.local``: ``make run`` / ``python -m pipeline.run_local``.

It executes the same compiled pipeline as a cluster (ParallelFor, Collected, dsl.If included) with
``kfp.local.SubprocessRunner(use_venv=False)``: every task is a subprocess of the current venv, nothing
is pip-installed; or, with ``--runner docker`` (``make run RUNNER=docker``), with
``kfp.local.DockerRunner``: every task runs in the components image (:mod:`pipeline.runners`).
Artifacts go to ``RUN_DIR/kfp/<run>/<task>/``, the Optuna study to the SQLite file
``RUN_DIR/optuna.db``, published models to ``RUN_DIR/models`` (unless ``--store``), and the final model
(with its figures) is copied to ``RUN_DIR/model`` so ``python -m serving --model_dir RUN_DIR/model``
serves it. The tasks' logs go to ``RUN_DIR/run.log`` (the console gets a line per task), and the HTML
reports are copied with an ``.html`` name to ``RUN_DIR/reports/`` (KFP names an artifact file after its
output, without an extension).

What differs from a cluster run: kfp.local ignores the Kubernetes settings (Secrets, GPU requests,
tolerations, resources, image pull policy) and, with the subprocess runner, the image; ingest is not retried
(locally a failure is rarely transient, and its message should come at once); task caching is off;
Optuna uses a SQLite file instead of PostgreSQL; kfp.local runs at most two tuning workers at a time.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from components.common import LOG_FORMAT, ConfigError, atomic_write_dir, format_table, setup_logging
from pipeline.components import DEFAULT_COMPONENTS_IMAGE
from pipeline.profiles import PARAMETER_HELP, pipeline_parameters, profile_names
from pipeline.runners import RUNNERS

if TYPE_CHECKING:
    from components.evaluate import AccuracyGate

log = logging.getLogger(__name__)

SERVED_FILES = ("model.json", "model.onnx", "model.int8.onnx", "MODEL_CARD.md", "metrics.json")
#: The train step's figures, kept beside the model they describe (a published model has none).
MODEL_FIGURES = (
    "training_curves.png",
    "confusion_matrix.png",
    "calibration.png",
    "risk_coverage.png",
)
RUN_LOG = "run.log"
REPORTS_DIR = "reports"
#: Every HTML output of the pipeline, (task, output) -> the name of its copy under RUN_DIR/reports.
HTML_REPORTS: Mapping[tuple[str, str], str] = {
    ("split", "histogram"): "split-histogram.html",
    ("select-best", "report"): "tuning-report.html",
    ("train-model", "curves"): "training-curves.html",
    ("evaluate-model", "report"): "test-report.html",
    ("challenge-model", "report"): "champion-report.html",
}
#: kfp.local's own lines about a task (its per-task log lines are printed in between).
_TASK_EVENT = re.compile(
    r"\b(?:INFO|ERROR)\b.*?(?:Executing task '(?P<start>[^']+)'"
    r"|Task '(?P<end>[^']+)' finished with status (?P<status>\w+))"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class RunSummary:
    """What a finished (or failed) local run produced, read back from the pipeline root."""

    run_dir: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task dir -> executor output
    errors: list[dict[str, str]] = field(default_factory=list)

    def output(self, task: str) -> dict[str, Any]:
        return self.tasks.get(task, {})

    def artifact(self, task: str, name: str) -> dict[str, Any] | None:
        arts = self.output(task).get("artifacts", {}).get(name, {}).get("artifacts", [])
        return arts[0] if arts else None

    def param(self, task: str, name: str = "Output") -> Any:
        return self.output(task).get("parameterValues", {}).get(name)

    @property
    def published(self) -> bool:
        return self.param("publish-model", "storage_uri") is not None


def collect_run(run_dir: Path) -> RunSummary:
    """Read every task's ``executor_output.json`` and ``step_error.json`` under ``run_dir``."""
    from pipeline.steps import ERROR_NOTE

    summary = RunSummary(run_dir=run_dir)
    for out in sorted(run_dir.rglob("executor_output.json")):
        task = out.parent.relative_to(run_dir).as_posix()
        try:
            summary.tasks[task] = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    # tasks of a ParallelFor iteration or a nested DAG live in sub-directories: index them by name too
    for task in list(summary.tasks):
        summary.tasks.setdefault(task.rsplit("/", 1)[-1], summary.tasks[task])
    for note in sorted(run_dir.rglob(ERROR_NOTE)):
        try:
            summary.errors.append(json.loads(note.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            summary.errors.append({"step": note.parent.name, "message": note.read_text(errors="replace")})
    return summary


def latest_run_dir(pipeline_root: Path, started: float) -> Path | None:
    """The run directory kfp.local created after ``started`` (newest first)."""
    runs = [p for p in pipeline_root.iterdir() if p.is_dir() and p.stat().st_mtime >= started - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def install_model(src: Path, dest: Path, figures: Path | None = None) -> Path:
    """Copy the servable files of ``src`` and the figures of ``figures`` (default ``src``: the train
    step's model directory has them, a published copy does not) to ``dest`` atomically."""

    def fill(stage: Path) -> None:
        for folder, names in ((src, SERVED_FILES), (figures or src, MODEL_FIGURES)):
            for name in names:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, stage / name)

    return atomic_write_dir(dest, fill)


def copy_reports(summary: RunSummary, dest: Path) -> dict[tuple[str, str], Path]:
    """The run's HTML reports under ``dest`` with ``.html`` names, so a browser opens them by a click."""
    found = {
        key: Path(art["uri"])
        for key in HTML_REPORTS
        if (art := summary.artifact(*key)) and Path(art["uri"]).is_file()
    }

    def fill(stage: Path) -> None:
        for key, src in found.items():
            shutil.copyfile(src, stage / HTML_REPORTS[key])

    atomic_write_dir(dest, fill)
    return {key: dest / HTML_REPORTS[key] for key in found}


class TaskLog(io.TextIOBase):
    """What kfp.local writes during a run: every line to the log file, one line per task start and end
    to the console, so a run reads in a screen while the tasks' own logs stay complete in the file.

    Lines are assembled per thread: tasks in a ParallelFor run in threads, and ``print`` writes its text
    and its newline as two calls, so a shared buffer would splice two tasks' lines into one.
    """

    def __init__(self, log_file: TextIO, console: TextIO, clock: Callable[[], float] = time.monotonic):
        self._file = log_file
        self._console = console
        self._clock = clock
        self._t0 = clock()
        self._started: dict[str, list[float]] = defaultdict(list)
        self._partial: dict[int, str] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            thread = threading.get_ident()
            *lines, rest = (self._partial.pop(thread, "") + _ANSI.sub("", text)).split("\n")
            if rest:
                self._partial[thread] = rest
            for line in lines:
                self._file.write(line + "\n")
                self._progress(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()
            self._console.flush()

    def close_lines(self) -> None:
        """Write what no newline ended (a last ``print(..., end="")``) so the file loses nothing."""
        with self._lock:
            for rest in self._partial.values():
                self._file.write(rest + "\n")
            self._partial.clear()
            self._file.flush()

    def _progress(self, line: str) -> None:
        event = _TASK_EVENT.search(line)
        if event is None:
            return
        now = self._clock()
        stamp = f"{int(now - self._t0) // 60:3d}:{int(now - self._t0) % 60:02d}"
        if event["start"]:
            self._started[event["start"]].append(now)
            self._console.write(f"{stamp}  {event['start']}\n")
        else:
            task, status = event["end"], event["status"]
            began = self._started[task].pop(0) if self._started[task] else now
            outcome = "done" if status == "SUCCESS" else status
            self._console.write(f"{stamp}  {task}: {outcome} in {now - began:.0f} s\n")
        self._console.flush()


@contextlib.contextmanager
def task_logs_to(path: Path, console: TextIO | None = None) -> Iterator[TaskLog]:
    """Send what kfp.local prints (builtins.print, the root logger, stderr) to ``path`` for the block.

    kfp.local writes a task's streamed output (a subprocess's or a container's) with ``print`` and its
    own lines with root-logger handlers it creates on ``sys.stdout``, and restores the root handlers it
    found after each task; so the stream and the root handlers are swapped for the whole run.
    """
    console = console or sys.stdout
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    original_print = builtins.print
    last_resort = logging.lastResort
    with path.open("w", encoding="utf-8") as fh:
        stream = TaskLog(fh, console)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.handlers = [handler]
        # kfp.local sets the root level to INFO around each task and restores the level it found; with
        # tasks in parallel threads, one that started while another had already raised it restores INFO,
        # and one that started first restores this level while the other is still running: so the level
        # it finds is INFO, or a parallel task's end line (logged at INFO) is dropped
        root.setLevel(logging.INFO)
        # kfp.local clears the root handlers and adds its own around every task; with tasks in parallel
        # threads, one task's line can be logged in the instant another has cleared them, and logging
        # then hands it to lastResort (stderr, warnings only): a task's end would vanish
        gap = logging.StreamHandler(stream)
        gap.setFormatter(logging.Formatter(LOG_FORMAT))
        gap.setLevel(logging.INFO)
        logging.lastResort = gap
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield stream
        finally:
            logging.lastResort = last_resort
            stream.close_lines()
            # kfp.local indents task logs by swapping builtins.print per task; tasks that run in
            # parallel threads restore each other's swap, and the indent outlives the run
            builtins.print = original_print
            root.handlers = handlers
            root.setLevel(level)


def _absolute_source(source: str) -> str:
    if source.startswith("s3://"):
        return source
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"--source {source!r} is neither s3://bucket[/prefix] nor an existing directory "
            "(e.g. ../shared/abid with bin-images/ and metadata/)"
        )
    return str(path.resolve())


def prepare_parameters(
    profile: str, run_dir: Path, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Profile + overrides, with the local defaults: SQLite study and model store under ``run_dir``."""
    overrides = dict(overrides or {})
    params = pipeline_parameters(profile, overrides)
    params["source"] = _absolute_source(params["source"])
    if not overrides.get("optuna_storage"):
        params["optuna_storage"] = f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    store = overrides.get("model_store") or str(run_dir / "models")
    params["model_store"] = store if store.startswith("s3://") else str(Path(store).expanduser().resolve())
    return params


def run_pipeline(
    params: Mapping[str, Any],
    run_dir: Path,
    runner: str = "subprocess",
    image: str = DEFAULT_COMPONENTS_IMAGE,
) -> RunSummary:
    """Execute the pipeline with kfp.local, its tasks in this venv or (``runner`` docker) in ``image``;
    raises RuntimeError (with the step's message) on failure, ConfigError without an engine or image."""
    from kfp import local

    from pipeline.pipeline import BuildOptions, build_pipeline
    from pipeline.runners import docker_runner

    pipeline_root = (run_dir / "kfp").resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        task_runner = docker_runner(image, run_dir, dict(params))
    else:
        task_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=task_runner, pipeline_root=str(pipeline_root))
    pipeline_func = build_pipeline(
        BuildOptions(image=image, optuna_secret=None, s3_secret=None, image_pull_policy="", ingest_retries=0)
    )
    started = time.time()
    failure: Exception | None = None
    log_path = run_dir / RUN_LOG
    print(f"running the pipeline with kfp.local; the tasks' logs go to {log_path}", flush=True)
    with warnings.catch_warnings(), task_logs_to(log_path):
        # the components image name does not contain "python": expected, the subprocess runner ignores it
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # resources, display names etc. are cluster settings; kfp.local says so once per task
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            pipeline_func(**params)
        except RuntimeError as e:
            failure = e
    run = latest_run_dir(pipeline_root, started)
    summary = collect_run(run) if run else RunSummary(run_dir=pipeline_root)
    if failure is not None:
        detail = "; ".join(f"{e.get('step')}: {e.get('message')}" for e in summary.errors)
        raise RuntimeError(f"step failed: {detail}" if detail else str(failure)) from failure
    return summary


def accuracy_gate(summary: RunSummary) -> AccuracyGate | None:
    """The publish gate of the run, from the figures in the evaluate step's Metrics (None if it left none)."""
    from components.evaluate import AccuracyGate

    figures = (summary.artifact("evaluate-model", "metrics") or {}).get("metadata") or {}
    keys = ("test_accuracy", "majority_baseline_accuracy", "accuracy_margin")
    if not all(k in figures for k in keys):
        return None
    return AccuracyGate(*(float(figures[k]) for k in keys))


def _challenge_note(summary: RunSummary) -> dict[str, Any]:
    return (summary.artifact("challenge-model", "report") or {}).get("metadata") or {}


def publish_decision(summary: RunSummary, gate: AccuracyGate) -> str:
    """Why the model was or was not published: the accuracy gate's figures, then the champion gate's
    reason, e.g. ``"not published: test accuracy 0.213 < majority baseline 0.224 + margin 0.05 = 0.274"``."""
    champion = _challenge_note(summary).get("reason", "")
    if summary.published:
        version = summary.param("publish-model", "version")
        return f"published as version {version}: {gate.reason()}; champion: {champion}"
    if summary.param("evaluate-model") is False:
        return f"not published: {gate.reason()}"
    return f"not published: {gate.reason()}, but champion: {champion or 'no decision'}"


def summary_tables(
    summary: RunSummary,
    params: Mapping[str, Any],
    model_dir: Path | None,
    reports: Mapping[tuple[str, str], Path] | None = None,
) -> str:
    """Metrics, best parameters and where every artifact is (an HTML report's ``.html`` copy in
    ``reports`` rather than its extensionless artifact file), as plain-text tables."""
    metrics: list[tuple[str, Any]] = []
    for task, name in (
        ("train-model", "metrics"),
        ("evaluate-model", "metrics"),
        ("challenge-model", "metrics"),
        ("select-best", "study"),
    ):
        art = summary.artifact(task, name)
        metrics += sorted((k, v) for k, v in ((art or {}).get("metadata") or {}).items())
    ingest = summary.artifact("merge-shards", "dataset")
    if ingest:
        metrics.insert(0, ("images ingested", ingest["metadata"].get("n_images")))
    best = json.loads(summary.param("select-best") or "{}")
    where: list[tuple[str, Any]] = []
    for label, task, name in (
        ("dataset (images + manifest)", "merge-shards", "dataset"),
        ("train / val / test manifests", "split", "train"),
        ("split histogram (HTML)", "split", "histogram"),
        ("tuning report (HTML)", "select-best", "report"),
        ("trained model", "train-model", "model"),
        ("evaluated model (with its test figures)", "evaluate-model", "evaluated"),
        ("training curves (HTML)", "train-model", "curves"),
        ("model card", "train-model", "model_card"),
        ("test report (HTML)", "evaluate-model", "report"),
        ("published model vs this one (HTML)", "challenge-model", "report"),
    ):
        art = summary.artifact(task, name)
        if (task, name) in (reports or {}):
            where.append((label, str((reports or {})[task, name])))
        elif art:
            uri = art["uri"]
            where.append((label, str(Path(uri).parent) if name == "train" else uri))
    where.append(("Optuna study", params.get("optuna_storage", "")))
    gate = accuracy_gate(summary)
    if summary.published:
        where.append(("published model", summary.param("publish-model", "storage_uri")))
        isvc = summary.artifact("publish-model", "inference_service")
        if isvc:
            where.append(("InferenceService manifest", isvc["uri"]))
    elif summary.param("challenge-model") is False:
        version = _challenge_note(summary).get("champion_version", "")
        where.append(("published model", f"not published (no better than the published version {version})"))
    else:
        where.append(("published model", "not published (below the accuracy gate)"))
    if gate is not None:
        where.append(("publish decision", publish_decision(summary, gate)))
    if model_dir is not None:
        where.append(("servable model", str(model_dir)))
    parts = [
        format_table(metrics, ["metric", "value"]),
        format_table(sorted(best.items()) or [("-", "-")], ["best parameter", "value"]),
        format_table(where, ["artifact", "location"]),
    ]
    return "\n\n".join(parts)


def model_note(profile: str, params: Mapping[str, Any], summary: RunSummary) -> str:
    """What the trained model is, so a smoke test is not mistaken for a counter."""
    dataset = summary.artifact("merge-shards", "dataset") or {}
    n_images = (dataset.get("metadata") or {}).get("n_images", "?")
    what = f"{n_images} images at {params['image_size']} px, {params['epochs']} epochs"
    if profile == "quick":
        return (
            f"the model: a smoke test ({what}) that shows the whole path works; it is not a useful "
            "counter (PROFILE=full trains one, on a GPU)"
        )
    accuracy = summary.param("evaluate-model", "accuracy")
    scored = f": test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
    return f"the model: a counter of counts {params['classes']}, {params['head']} head ({what}){scored}"


def example_image(summary: RunSummary) -> Path | None:
    """One of the run's own test images, for the curl line."""
    from components.manifest import read_manifest

    dataset, test = summary.artifact("merge-shards", "dataset"), summary.artifact("split", "test")
    if not dataset or not test:
        return None
    try:
        rows = read_manifest(test["uri"])
    except (OSError, ValueError):
        return None
    return Path(dataset["uri"]) / rows[0].path if rows else None


def _shell_path(path: Path) -> str:
    """``path`` relative to the working directory when under it (how a newcomer types it), quoted."""
    text = str(path)
    cwd = os.getcwd()
    if text.startswith(cwd + os.sep):
        text = os.path.relpath(text, cwd)
    return shlex.quote(text)


def next_steps(model_dir: Path, model_name: str, image: Path | None) -> str:
    """The commands that serve the model and ask it for a count, runnable as printed."""
    from components.publish import DEFAULT_MODEL_NAME

    serve = [_shell_path(Path(sys.executable)), "-m", "serving", "--model_dir", shlex.quote(str(model_dir))]
    if model_name != DEFAULT_MODEL_NAME:
        serve += ["--model_name", shlex.quote(model_name)]
    serve += ["--http_host", "127.0.0.1", "--http_port", "8080"]
    jpeg = shlex.quote(f"@{image}") if image else "@bin.jpg"
    curl = (
        f"curl -s -H 'content-type: image/jpeg' --data-binary {jpeg} "
        f"http://127.0.0.1:8080/v1/models/{model_name}:predict"
    )
    return f"serve it:\n  {' '.join(serve)}\nthen, from another shell, count the items of a bin:\n  {curl}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.run_local",
        description="Run the inventory-monitor pipeline locally with kfp.local.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--profile", default="quick", choices=profile_names(), help="parameter preset")
    p.add_argument("--source", default=None, help=PARAMETER_HELP["source"] + " (default: the profile's)")
    p.add_argument("--out", type=Path, default=Path("runs/local"), help="run directory")
    p.add_argument(
        "--runner",
        default="subprocess",
        choices=RUNNERS,
        help="where the tasks run: subprocess (this venv) or docker (the components image, as on a "
        "cluster; needs a Docker engine and the image: make images)",
    )
    p.add_argument(
        "--image", default=DEFAULT_COMPONENTS_IMAGE, help="components image of the tasks (--runner docker)"
    )
    p.add_argument("--endpoint-url", default=None, help=PARAMETER_HELP["endpoint_url"])
    p.add_argument("--per-class", type=int, default=None, help=PARAMETER_HELP["per_class"])
    p.add_argument("--image-size", type=int, default=None, help=PARAMETER_HELP["image_size"])
    p.add_argument("--epochs", type=int, default=None, help=PARAMETER_HELP["epochs"])
    p.add_argument("--trials", type=int, default=None, help=PARAMETER_HELP["tune_trials"])
    p.add_argument("--tune-epochs", type=int, default=None, help=PARAMETER_HELP["tune_epochs"])
    p.add_argument("--workers", type=int, default=None, help=PARAMETER_HELP["n_tune_workers"])
    p.add_argument("--accuracy-margin", type=float, default=None, help=PARAMETER_HELP["accuracy_margin"])
    p.add_argument("--store", default=None, help=PARAMETER_HELP["model_store"] + " (default RUN_DIR/models)")
    p.add_argument("--model-version", default=None, help=PARAMETER_HELP["model_version"])
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other pipeline parameter (repeatable), e.g. --param head=classification",
    )
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.compile import parse_param_overrides

    overrides = parse_param_overrides(args.param, args.profile)
    overrides.update(
        {
            k: v
            for k, v in {
                "source": args.source,
                "endpoint_url": args.endpoint_url,
                "per_class": args.per_class,
                "image_size": args.image_size,
                "epochs": args.epochs,
                "tune_trials": args.trials,
                "tune_epochs": args.tune_epochs,
                "n_tune_workers": args.workers,
                "accuracy_margin": args.accuracy_margin,
                "model_store": args.store,
                "model_version": args.model_version,
            }.items()
            if v is not None
        }
    )
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    run_dir: Path = args.out.expanduser().resolve()
    try:
        params = prepare_parameters(args.profile, run_dir, overrides_from_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        summary = run_pipeline(params, run_dir, args.runner, args.image)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"the tasks' logs: {run_dir / RUN_LOG}", file=sys.stderr)
        return 1
    model_dir: Path | None = None
    # the evaluated copy carries the test figures; a run that failed before evaluation has the trained one
    trained = summary.artifact("evaluate-model", "evaluated") or summary.artifact("train-model", "model")
    source_model = summary.param("publish-model", "storage_uri")
    if not source_model or str(source_model).startswith("s3://"):
        source_model = trained["uri"] if trained else None
    if source_model:
        figures = Path(trained["uri"]) if trained else None
        model_dir = install_model(Path(source_model), run_dir / "model", figures)
    reports = copy_reports(summary, run_dir / REPORTS_DIR)
    print()
    print(summary_tables(summary, params, model_dir, reports))
    print(f"\nprofile {args.profile}: finished in {time.perf_counter() - t0:.0f} s; run directory {run_dir}")
    if model_dir is not None:
        print(model_note(args.profile, params, summary))
        print(next_steps(model_dir, params["model_name"], example_image(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
