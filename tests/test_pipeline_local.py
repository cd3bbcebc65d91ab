"""End to end: the real pipeline under kfp.local on a tiny ABID subset served by the local S3 server.

Every task runs as a subprocess of this venv (SubprocessRunner, use_venv=False), exactly as ``make run``
does: ingest from S3 (moto) -> split -> 2 parallel Optuna workers on one SQLite study -> select best ->
pretrain (on the train split plus two other counts) -> 2 parallel Optuna workers and the final fit
starting from that backbone -> evaluate (ONNX) -> dsl.If ->
publish to s3:// on moto. The published model is then fetched the
way KServe's storage initializer does and must load and predict on a real JPEG.
"""

from __future__ import annotations

import builtins
import io
import json
import re
import shlex
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from components.evaluate import majority_baseline
from components.manifest import read_manifest
from components.modelspec import load_model_spec
from components.publish import publish
from pipeline import run_local
from tests.fixtures.models import constant_model

pytestmark = pytest.mark.slow

PER_CLASS = 6
#: images of two counts outside 1-5 in the bucket, for the pretraining stage
OTHER_COUNTS = {0: 2, 7: 2}
TINY = [
    "--per-class", "5", "--image-size", "32", "--epochs", "1", "--trials", "2", "--tune-epochs", "1",
    "--workers", "2", "--accuracy-margin", "-1", "--param", "batch_size=8",
]  # fmt: skip
#: -1: a margin that lets any model through the accuracy gate (a 1-epoch model on 25 images may score
#: below the majority-class baseline of its 5 test images), so the run always reaches publish


def _upload_subset(endpoint: str, abid_dir: Path, bucket: str, prefix: str) -> list[str]:
    """A few real images per class, and of OTHER_COUNTS, in the bucket layout; returns the ids."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    quota = {**dict.fromkeys((1, 2, 3, 4, 5), PER_CLASS), **OTHER_COUNTS}
    wanted: dict[int, list[str]] = {c: [] for c in quota}
    for meta in sorted((abid_dir / "metadata").iterdir()):
        count = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
        if count in wanted and len(wanted[count]) < quota[count]:
            wanted[count].append(meta.stem)
        if all(len(v) == quota[c] for c, v in wanted.items()):
            break
    ids = [i for v in wanted.values() for i in v]
    for i in ids:
        s3.put_object(
            Bucket=bucket,
            Key=f"{prefix}/metadata/{i}.json",
            Body=(abid_dir / "metadata" / f"{i}.json").read_bytes(),
        )
        s3.put_object(
            Bucket=bucket,
            Key=f"{prefix}/bin-images/{i}.jpg",
            Body=(abid_dir / "bin-images" / f"{i}.jpg").read_bytes(),
        )
    return ids


def _predict(model_dir: Path, image: Path) -> int:
    import onnxruntime as ort

    from components.preprocess import preprocess_batch

    spec = load_model_spec(model_dir)
    sess = ort.InferenceSession(str(model_dir / spec.onnx_file), providers=["CPUExecutionProvider"])
    _, count, _ = sess.run(
        list(spec.output_names), {spec.input_name: preprocess_batch([image], spec.preprocess)}
    )
    return int(count[0])


@pytest.fixture
def tiny_bucket(aws_env: str, abid_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ids = _upload_subset(aws_env, abid_dir, "abid", "mirror")
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="models")
    return aws_env, ids


@pytest.mark.timeout(600)
def test_pipeline_runs_end_to_end_and_publishes_a_servable_model(
    tiny_bucket, tmp_path: Path, abid_dir: Path, capsys: pytest.CaptureFixture[str]
):
    endpoint, ids = tiny_bucket
    # a model already published: the run challenges it on its test images (a loss is tolerated here)
    champion = constant_model(tmp_path / "champion", 3)
    publish(
        champion,
        "s3://models/registry",
        version="v0",
        endpoint_url=endpoint,
        manifest_path=tmp_path / "v0.yaml",
    )
    run_dir = tmp_path / "run"
    argv = ["--source", "s3://abid/mirror", "--endpoint-url", endpoint, "--out", str(run_dir),
            "--store", "s3://models/registry", "--model-version", "e2e", *TINY,
            "--param", "ema=0.9", "--param", "tta=true", "--param", "champion_min_gain=-1",
            "--param", "pretrain_per_class=2",
            "--param", "pretrain_classes=0,7", "--param", "pretrain_epochs=1"]  # fmt: skip
    print_before = builtins.print
    assert run_local.main(argv) == 0
    out = capsys.readouterr().out
    # kfp.local's per-task log indent (a swapped builtins.print) does not outlive the run
    assert builtins.print is print_before

    # every step ran and left its outputs
    runs = list((run_dir / "kfp").iterdir())
    assert len(runs) == 1
    summary = run_local.collect_run(runs[0])
    for task in (
        "shard-ids",
        "ingest-shard",
        "merge-shards",
        "ingest-extra",
        "split",
        "pretrain-model",
        "worker-ids",
        "select-best",
        "train-model",
        "evaluate-model",
        "challenge-model",
        "publish-model",
    ):
        assert task in summary.tasks, f"{task} left no executor output"
    assert summary.errors == []
    workers = [t for t in summary.tasks if t.startswith("for-loop-") and t.endswith("/tune-worker")]
    assert len(workers) == 2, summary.tasks.keys()
    # two workers, one study: together they ran the study-wide budget (2 trials), not 2 each
    assert sum(summary.param(w) for w in workers) == 2, {w: summary.param(w) for w in workers}
    study = summary.artifact("select-best", "study")["metadata"]
    assert study["trials_complete"] + study["trials_pruned"] == 2
    assert summary.artifact("merge-shards", "dataset")["metadata"]["n_images"] == 25
    assert summary.artifact("ingest-extra", "dataset")["metadata"]["n_images"] == sum(OTHER_COUNTS.values())
    best = json.loads(summary.param("select-best"))
    assert best["image_size"] == 32 and "lr" in best
    confusion = summary.artifact("evaluate-model", "confusion")["metadata"]["confusionMatrix"]
    assert [a["displayName"] for a in confusion["annotationSpecs"]] == ["1", "2", "3", "4", "5"]
    test_accuracy = summary.param("evaluate-model", "accuracy")
    assert 0.0 <= test_accuracy <= 1.0 and summary.param("evaluate-model") is True
    figures = summary.artifact("evaluate-model", "metrics")["metadata"]
    assert figures["test_accuracy"] == test_accuracy
    # the gate: the majority-class baseline of this run's own split (train's most frequent count, scored
    # on the test images) plus the margin
    train_counts, test_counts = (
        [r.count for r in read_manifest(summary.artifact("split", part)["uri"])] for part in ("train", "test")
    )
    baseline = majority_baseline(train_counts, test_counts)
    assert figures["majority_baseline_accuracy"] == pytest.approx(baseline["accuracy"])
    assert figures["majority_count"] == baseline["count"]
    assert figures["accuracy_margin"] == -1.0
    assert figures["required_accuracy"] == pytest.approx(baseline["accuracy"] - 1.0)
    report = Path(summary.artifact("evaluate-model", "report")["uri"]).read_text()
    assert "majority baseline accuracy" in report and "required accuracy" in report
    assert figures["test_accuracy_low"] <= test_accuracy <= figures["test_accuracy_high"]
    assert figures["test_rmse_low"] <= figures["test_rmse"] <= figures["test_rmse_high"]
    # the challenge scored the published v0 and this model on the same test images
    assert summary.param("challenge-model") is True
    assert summary.artifact("challenge-model", "report")["metadata"]["champion_version"] == "v0"
    challenged = summary.artifact("challenge-model", "metrics")["metadata"]
    assert challenged["challenger_accuracy"] == pytest.approx(test_accuracy)
    assert challenged["accuracy_gain"] == pytest.approx(test_accuracy - challenged["champion_accuracy"])

    # the summary table names the metrics, the best parameters and the published location
    assert "test_accuracy" in out and "best parameter" in out
    assert "s3://models/registry/inventory-counter/e2e" in out
    # and why it was published, in the gates' own figures
    gate = (
        f"published as version e2e: no accuracy gate (accuracy_margin -1): test accuracy "
        f"{test_accuracy:.3f}, majority baseline {baseline['accuracy']:.3f}; "
        "champion: interval gate: accuracy gain"
    )
    assert gate in out

    isvc = yaml.safe_load(Path(summary.artifact("publish-model", "inference_service")["uri"]).read_text())
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": "s3://models/registry/inventory-counter/e2e"} in env

    # published like KServe's storage initializer expects: fetch the prefix into /mnt/models and load it
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="models", Prefix="registry/inventory-counter/e2e/")["Contents"]
    ]
    mnt = tmp_path / "mnt" / "models"
    mnt.mkdir(parents=True)
    for key in keys:
        s3.download_file("models", key, str(mnt / key.rsplit("/", 1)[1]))
    spec = load_model_spec(mnt)
    assert spec.version == "e2e" and spec.preprocess.image_size == 32
    assert spec.params["ema"] == 0.9 and spec.params["tta"] is True  # pipeline parameters reached the fit
    # the test figures travel with the published model: model.json, metrics.json, the card, versions.json
    n_test = summary.artifact("split", "test")["metadata"]["n_images"]
    assert spec.metrics["test"]["accuracy"] == pytest.approx(test_accuracy)
    assert spec.metrics["test"]["n"] == n_test
    low, high = spec.metrics["test"]["intervals"]["accuracy"]
    assert low <= test_accuracy <= high
    assert json.loads((mnt / "metrics.json").read_text())["test"]["n"] == n_test
    assert f"| test | {n_test} | " in (mnt / "MODEL_CARD.md").read_text()
    index_key = "registry/inventory-counter/versions.json"
    index = json.loads(s3.get_object(Bucket="models", Key=index_key)["Body"].read())
    entry = next(v for v in index["versions"] if v["version"] == "e2e")["metrics"]
    assert entry["test_accuracy"] == pytest.approx(test_accuracy) and entry["test_accuracy_low"] == low
    # the benchmark-only levers keep their defaults in the pipeline's fit
    assert spec.params["decision"] == "plain" and not spec.decision_offsets and spec.params["refit"] is False
    n_train = summary.artifact("split", "train")["metadata"]["n_images"]
    # one backbone pretrained on the train split plus the other counts (0..7); the trials and the fit
    # started from it
    stage = summary.artifact("pretrain-model", "backbone")["metadata"]
    assert stage["pretrained"] and stage["count_cap"] == 7
    assert stage["images"] == summary.param("pretrain-model") == n_train + sum(OTHER_COUNTS.values())
    assert all(summary.artifact(w, "trials")["metadata"]["from_pretrained_backbone"] for w in workers)
    assert spec.params["weights"].endswith("pretrain/model.pt") and spec.params["pretrain_epochs"] == 0
    card = (run_dir / "model" / "MODEL_CARD.md").read_text()
    assert f"first trained for 1 epochs on {stage['images']} images" in card and "above 7 as 7" in card
    gate = spec.metrics["int8_gate"]  # the final fit was quantized and gated on val accuracy
    assert gate["accepted"] == (spec.onnx_int8_file is not None)
    assert gate["accepted"] == (gate["int8_accuracy"] >= gate["fp32_accuracy"] - gate["max_drop"])
    jpeg = abid_dir / "bin-images" / f"{ids[0]}.jpg"
    assert _predict(mnt, jpeg) in spec.classes

    # and the run directory holds a servable copy
    assert _predict(run_dir / "model", jpeg) in load_model_spec(run_dir / "model").classes
    assert not (run_dir / "model" / "pretrain").exists()  # the stage is not part of the model
    assert not list((runs[0] / "pretrain-model").rglob("checkpoint.pt"))  # nor its optimizer state

    # a screenful on the console: a line per task start and end, the tables, what to do next; the
    # tasks' own logs are in run.log
    lines = out.splitlines()
    assert len(lines) <= 150, len(lines)
    assert f"the tasks' logs go to {run_dir / 'run.log'}" in out and "Streamed logs" not in out
    ends = [line for line in lines if "tune-worker" in line]
    assert sum(1 for line in ends if re.search(r"\btune-worker: done in \d+ s$", line)) == 2, ends
    log_text = (run_dir / "run.log").read_text()
    assert "Executing task 'train-model'" in log_text and "Streamed logs" in log_text
    assert "[KFP Executor" in log_text and "\x1b[" not in log_text
    # the HTML reports under a name a browser opens, listed in the summary
    reports = sorted(p.name for p in (run_dir / "reports").glob("*.html"))
    assert reports == sorted(run_local.HTML_REPORTS.values())
    assert all((run_dir / "reports" / name).read_text().startswith("<html>") for name in reports)
    assert str(run_dir / "reports" / "test-report.html") in out
    # the model with its figures
    figures = {"training_curves.png", "confusion_matrix.png", "calibration.png", "risk_coverage.png"}
    assert figures <= {p.name for p in (run_dir / "model").iterdir()}
    # the closing lines: what the model is and the commands to serve and query it
    assert "a smoke test" in out and "not a useful counter" in out
    assert f"-m serving --model_dir {run_dir / 'model'} --http_host 127.0.0.1 --http_port 8080" in out
    curl = lines[-1].split()
    assert curl[:6] == ["curl", "-s", "-H", "'content-type:", "image/jpeg'", "--data-binary"]
    assert Path(curl[6].removeprefix("@")).is_file()
    assert curl[7] == "http://127.0.0.1:8080/v1/models/inventory-counter:predict"


@pytest.mark.timeout(300)
def test_a_failing_step_fails_the_run_with_its_message_and_publishes_nothing(
    tiny_bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    endpoint, _ = tiny_bucket
    run_dir = tmp_path / "run"
    argv = ["--source", "s3://abid/empty-prefix", "--endpoint-url", endpoint, "--out", str(run_dir),
            "--store", "s3://models/registry", *TINY]  # fmt: skip
    assert run_local.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: step failed: ingest: no metadata/ objects under s3://abid/empty-prefix" in err
    # and where the tasks' logs are, which hold the step's traceback
    assert f"the tasks' logs: {run_dir / 'run.log'}" in err
    assert "no metadata/ objects" in (run_dir / "run.log").read_text()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    assert "Contents" not in s3.list_objects_v2(Bucket="models")
    assert not (run_dir / "model").exists()
    (run,) = (run_dir / "kfp").iterdir()
    # only ingest and the independent tasks ran; nothing downstream of ingest did
    ran = {p.name for p in run.iterdir()}
    assert ran <= {"shard-ids", "for-loop-1-iteration-0", "ingest-extra", "worker-ids"}, ran


def test_bad_local_source_is_rejected_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert run_local.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "neither s3://" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_kfp_local_output_goes_to_the_run_log_and_a_line_per_task_to_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # kfp.local's own helpers, as its task dispatcher calls them: a subprocess task's streamed
    # output (SubprocessRunner) and a container's log stream (DockerRunner)
    import logging
    import sys
    from types import SimpleNamespace

    from kfp.local import docker_task_handler, logging_utils, subprocess_task_handler
    from kfp.local.status import Status

    def task(name: str, run: Any, status: Status) -> None:
        with logging_utils.local_logger_context():
            logging.info(f"Executing task {logging_utils.format_task_name(name)}")
            logging.info("Streamed logs:\n")
            with logging_utils.indented_print():
                run()
            done = f"Task {logging_utils.format_task_name(name)} finished with status "
            (logging.info if status is Status.SUCCESS else logging.error)(
                done + logging_utils.format_status(status)
            )

    script = "import sys; print('split says hi'); print('split warns', file=sys.stderr)"
    container = SimpleNamespace(logs=lambda stream: [b"container says hi\n"], wait=lambda: {"StatusCode": 1})
    image = SimpleNamespace(tags=["components:latest"], attrs={"RepoDigests": []})
    client = SimpleNamespace(
        images=SimpleNamespace(list=lambda: [image]), containers=SimpleNamespace(run=lambda **_: container)
    )
    handlers, print_before = logging.getLogger().handlers[:], builtins.print
    log = tmp_path / "run.log"
    with run_local.task_logs_to(log):
        task("split", lambda: subprocess_task_handler.run_local_subprocess([sys.executable, "-c", script]),
             Status.SUCCESS)  # fmt: skip
        task("train-model", lambda: docker_task_handler.run_docker_container(client, "components", [], {}),
             Status.FAILURE)  # fmt: skip
        print("a stray print", file=sys.stderr)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 4 and captured.err == "", captured
    assert lines[0].endswith(" split") and lines[2].endswith(" train-model")
    assert re.search(r" split: done in \d+ s$", lines[1]) and re.search(
        r" train-model: FAILURE in \d+ s$", lines[3]
    )
    text = log.read_text()
    expected = [
        "Executing task 'split'", "    split says hi", "split warns", "container says hi",
        "Found image 'components:latest'", "finished with status FAILURE", "a stray print",
    ]  # fmt: skip
    assert [e for e in expected if e not in text] == []
    assert "\x1b[" not in text
    # kfp.local's swaps of print and of the root handlers end with the run
    assert builtins.print is print_before and logging.getLogger().handlers == handlers


def test_task_lines_from_parallel_tasks_are_not_spliced(tmp_path: Path):
    """print writes its text and its newline as two calls; two ParallelFor tasks ending together
    interleave them, and each task's end must still reach the console and the file as its own line."""
    console = io.StringIO()
    turns = [threading.Event() for _ in range(5)]  # turn k may write once turn k is set

    def task(name: str, first: int, second: int) -> None:
        for turn, text in ((first, f"INFO  Task '{name}' finished with status SUCCESS"), (second, "\n")):
            turns[turn].wait(timeout=10)
            stream.write(text)
            turns[turn + 1].set()

    with (tmp_path / "run.log").open("w") as fh:
        stream = run_local.TaskLog(fh, console)
        # a writes its text, b its text, a its newline, b its newline
        threads = [threading.Thread(target=task, args=(n, i, j)) for n, i, j in (("a", 0, 2), ("b", 1, 3))]
        for t in threads:
            t.start()
        turns[0].set()
        for t in threads:
            t.join(timeout=10)
        stream.write("no newline at the end")
        stream.close_lines()
    ends = sorted(re.sub(r"^\s*\d+:\d\d  ", "", line) for line in console.getvalue().splitlines())
    assert ends == ["a: done in 0 s", "b: done in 0 s"], console.getvalue()
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert sorted(logged[:2]) == [f"INFO  Task '{n}' finished with status SUCCESS" for n in "ab"]
    assert logged[2:] == ["no newline at the end"]


def test_the_second_of_two_parallel_tasks_keeps_its_end_line(tmp_path: Path, capsys):
    """Two tasks in parallel threads, as kfp.local runs a ParallelFor: the first to start ends first and
    restores the root level it found, while the second still has its end to log at INFO."""
    import logging

    from kfp.local import logging_utils

    logging.getLogger().setLevel(logging.WARNING)  # what a process that never set a level has
    with run_local.task_logs_to(tmp_path / "run.log"):
        first, second = logging_utils.local_logger_context(), logging_utils.local_logger_context()
        first.__enter__()
        logging.info("Executing task 'tune-worker'")
        second.__enter__()
        logging.info("Executing task 'tune-worker'")
        logging.info("Task 'tune-worker' finished with status SUCCESS")
        first.__exit__(None, None, None)
        logging.info("Task 'tune-worker' finished with status SUCCESS")
        second.__exit__(None, None, None)
    ends = [line for line in capsys.readouterr().out.splitlines() if "done in" in line]
    assert len(ends) == 2, ends
    assert (tmp_path / "run.log").read_text().count("finished with status SUCCESS") == 2


def test_a_task_line_logged_while_another_task_has_cleared_the_handlers_is_kept(tmp_path: Path, capsys):
    """kfp.local clears the root logger's handlers around each task; a parallel task's end logged in that
    instant (logging then finds no handler and falls back to lastResort, warnings only) must still reach
    the console and the log."""
    import logging

    last_resort = logging.lastResort
    with run_local.task_logs_to(tmp_path / "run.log"):
        root = logging.getLogger()
        root.setLevel(logging.INFO)  # as kfp.local sets it for its tasks
        # another task's local_logger_context clears the list while this record is on its way (the
        # logger method, not logging.info, which would call basicConfig on an empty list)
        root.handlers.clear()
        root.info("Task 'tune-worker' finished with status SUCCESS")
    assert logging.lastResort is last_resort
    assert re.search(r" tune-worker: done in \d+ s$", capsys.readouterr().out.strip())
    assert "Task 'tune-worker' finished with status SUCCESS" in (tmp_path / "run.log").read_text()


def test_the_model_directory_keeps_the_train_steps_figures_and_reports_get_html_names(tmp_path: Path):
    trained, published = tmp_path / "train-model" / "model", tmp_path / "published"
    for folder in (trained, published):
        folder.mkdir(parents=True)
        (folder / "model.json").write_text("{}")
    for name in ("training_curves.png", "confusion_matrix.png", "model.pt"):
        (trained / name).write_bytes(b"x")
    # a published copy has no figures: they come from the train step's directory
    model = run_local.install_model(published, tmp_path / "run" / "model", trained)
    assert sorted(p.name for p in model.iterdir()) == [
        "confusion_matrix.png",
        "model.json",
        "training_curves.png",
    ]
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "histogram").write_text("<html>split</html>")
    summary = run_local.RunSummary(
        run_dir=tmp_path,
        tasks={
            "split": {
                "artifacts": {"histogram": {"artifacts": [{"uri": str(tmp_path / "split" / "histogram")}]}}
            },
            "train-model": {"artifacts": {"curves": {"artifacts": [{"uri": str(tmp_path / "missing")}]}}},
        },
    )
    (tmp_path / "run" / "reports").mkdir()
    (tmp_path / "run" / "reports" / "stale.html").write_text("a previous run's")
    reports = run_local.copy_reports(summary, tmp_path / "run" / "reports")
    assert reports == {("split", "histogram"): tmp_path / "run" / "reports" / "split-histogram.html"}
    assert [p.name for p in (tmp_path / "run" / "reports").iterdir()] == ["split-histogram.html"]
    assert reports["split", "histogram"].read_text() == "<html>split</html>"
    table = run_local.summary_tables(summary, {"optuna_storage": ""}, model, reports)
    assert str(reports["split", "histogram"]) in table and str(model) in table


def test_the_printed_next_steps_are_the_servers_own_flags(tmp_path: Path):
    from serving.__main__ import parse_args

    text = run_local.next_steps(tmp_path / "run dir" / "model", "shelf-counter", tmp_path / "a.jpg")
    serve, curl = (line.strip() for line in text.splitlines()[1::2])
    argv = shlex.split(serve)
    assert argv[1:3] == ["-m", "serving"]
    args = parse_args(argv[3:])
    assert (args.model_dir, args.model_name) == (str(tmp_path / "run dir" / "model"), "shelf-counter")
    assert (args.http_host, args.http_port) == ("127.0.0.1", 8080)
    assert shlex.split(curl) == [
        "curl", "-s", "-H", "content-type: image/jpeg", "--data-binary", f"@{tmp_path / 'a.jpg'}",
        "http://127.0.0.1:8080/v1/models/shelf-counter:predict",
    ]  # fmt: skip
    # quick is a smoke test; another profile says what it trained and how it scored
    summary = run_local.RunSummary(
        run_dir=tmp_path,
        tasks={
            "merge-shards": {
                "artifacts": {"dataset": {"artifacts": [{"uri": "d", "metadata": {"n_images": 75}}]}}
            },
            "evaluate-model": {"parameterValues": {"accuracy": 0.4}},
        },
    )
    params = {"image_size": 40, "epochs": 2, "head": "ordinal", "classes": "1,2,3,4,5"}
    assert "a smoke test (75 images at 40 px, 2 epochs)" in run_local.model_note("quick", params, summary)
    note = run_local.model_note("full", params, summary)
    assert "smoke" not in note and "test accuracy 0.400" in note
