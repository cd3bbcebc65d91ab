"""KFP v2 components: thin wrappers that call the same functions as ``python -m components.<step>``.

Each function under "component bodies" is a lightweight-component body: KFP serializes its source, so
it imports what it needs inside the body (the project is installed in the components image, and in the
local venv). The bodies only map artifacts to paths, call the package function and record metadata;
the shared glue (error notes, HTML reports, the fits' configs) lives in :mod:`pipeline.steps`, imported
the same way.

:func:`make_components` turns the bodies into components for a given image. With
``install_kfp_package=False`` and no ``packages_to_install`` nothing is pip-installed when a task
starts: on a cluster the image provides kfp and the project; locally (``kfp.local.SubprocessRunner``
with ``use_venv=False``) the tasks run in the current venv, which stays untouched.

This module deliberately does not use ``from __future__ import annotations``: KFP reads the
annotations of the component functions at runtime to build their interfaces.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, List, NamedTuple  # noqa: UP035 - KFP reads typing.List annotations

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import __version__

DEFAULT_COMPONENTS_IMAGE = f"inventory-monitor/components:{__version__}"


# ------------------------------------------------------------------------------------ component bodies


def ingest_shard(
    source: str,
    endpoint_url: str,
    per_class: int,
    classes: str,
    shard: int,
    num_shards: int,
    dataset: Output[Dataset],
) -> int:
    """Ingest shard ``shard`` of ``num_shards`` of the selection (ids by hash, each shard resumable on its
    own) into a Dataset directory (images/ + manifest.csv); returns its image count."""

    from pathlib import Path

    from components.common import parse_int_list
    from components.ingest import ingest as run_ingest
    from pipeline.steps import optional_int, step_errors

    with step_errors("ingest", dataset.path):
        result = run_ingest(
            source,
            Path(dataset.path),
            endpoint_url=endpoint_url or None,
            per_class=optional_int(per_class),
            classes=parse_int_list(classes, name="classes"),
            progress=False,
            shard=shard,
            num_shards=num_shards,
        )
    dataset.metadata.update(
        {
            "n_images": result.n_images,
            "counts": {str(k): v for k, v in result.counts.items()},
            "source": source,
            "shard": shard,
            "num_shards": num_shards,
        }
    )
    return result.n_images


def merge_shards(
    shards: Input[List[Dataset]],  # noqa: UP006 - KFP needs typing.List
    source: str,
    dataset: Output[Dataset],
    report: Output[Markdown],
) -> int:
    """One Dataset from the ingest shards (one manifest and report; images linked or copied and
    checked): what split and training read. Refuses shards of different selections or missing ones."""

    from pathlib import Path

    from components.ingest_merge import merge_shards as run_merge
    from pipeline.steps import step_errors

    with step_errors("merge", dataset.path):
        result = run_merge([Path(s.path) for s in shards], Path(dataset.path))
    dataset.metadata.update(
        {
            "n_images": result.n_images,
            "counts": {str(k): v for k, v in result.counts.items()},
            "source": source,
            "shards": result.n_shards,
        }
    )
    lines = ["# Ingest", "", f"Source: `{source}`, {result.n_shards} shard(s)", "", "| count | images |"]
    lines += ["|---|---|", *(f"| {k} | {v} |" for k, v in sorted(result.counts.items()))]
    reasons = ", ".join(f"{k}: {len(v)}" for k, v in result.skipped.items() if v) or "none"
    lines += ["", f"Skipped: {sum(len(v) for v in result.skipped.values())} ({reasons})"]
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return result.n_images


def ingest_extra(
    source: str,
    endpoint_url: str,
    per_class: int,
    classes: str,
    dataset: Output[Dataset],
) -> int:
    """Images with the counts the task leaves out (empty bins, 6+ items) for the pretrain task.

    ``per_class`` 0 (pretraining off) writes an empty manifest and reads nothing, so the graph is the
    same either way (a conditional producer could not feed the one pretrain task).
    """

    from pathlib import Path

    from components.common import parse_int_list
    from components.ingest import MANIFEST_FILE
    from components.ingest import ingest as run_ingest
    from components.manifest import write_manifest
    from pipeline.steps import step_errors

    out = Path(dataset.path)
    with step_errors("ingest_extra", dataset.path):
        if per_class < 1:
            out.mkdir(parents=True, exist_ok=True)
            write_manifest(out / MANIFEST_FILE, [])
            n_images = 0
        else:
            result = run_ingest(
                source,
                out,
                endpoint_url=endpoint_url or None,
                per_class=per_class,
                classes=parse_int_list(classes, name="pretrain_classes"),
                progress=False,
            )
            n_images = result.n_images
    dataset.metadata.update({"n_images": n_images, "source": source, "classes": classes})
    return n_images


def split(
    dataset: Input[Dataset],
    ratios: str,
    seed: int,
    train: Output[Dataset],
    val: Output[Dataset],
    test: Output[Dataset],
    histogram: Output[HTML],
):
    """Stratified train/val/test manifests; their paths are relative to the ingest Dataset."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.common import parse_float_list
    from components.manifest import read_manifest
    from components.split import split_dataset
    from pipeline.steps import html_report, step_errors

    data_root = Path(dataset.path)
    with step_errors("split", train.path), tempfile.TemporaryDirectory() as tmp:
        split_dataset(
            data_root / "manifest.csv",
            Path(tmp),
            ratios=tuple(parse_float_list(ratios, name="split_ratios")),
            seed=seed,
            data_root=data_root,
        )
        tables = {}
        for name, art in (("train", train), ("val", val), ("test", test)):
            shutil.copyfile(Path(tmp) / f"{name}.csv", art.path)
            rows = read_manifest(art.path)
            counts: dict[str, int] = {}
            for r in rows:
                counts[str(r.count)] = counts.get(str(r.count), 0) + 1
            art.metadata.update({"n_images": len(rows), "counts": dict(sorted(counts.items()))})
            tables[f"{name}: {len(rows)} images"] = dict(sorted(counts.items()))
        with open(histogram.path, "w", encoding="utf-8") as fh:
            fh.write(html_report("Split", tables=tables, images=[Path(tmp) / "class_histogram.png"]))


def pretrain_model(
    dataset: Input[Dataset],
    train: Input[Dataset],
    val: Input[Dataset],
    test: Input[Dataset],
    extra: Input[Dataset],
    classes: str,
    pretrain_classes: str,
    pretrain_epochs: int,
    weights: str,
    image_size: int,
    batch_size: int,
    ema: float,
    seed: int,
    device: str,
    num_threads: int,
    backbone: Output[Model],
) -> int:
    """Stage 1 on every count, once per run: the tuning trials and the final fit all start from it.

    Trained on the training split plus ``extra`` (ingest_extra's images, counts outside ``classes``),
    counts capped at the largest of both lists; val and test images never enter it. With
    ``pretrain_epochs`` 0 it writes only a note, and the trials and the fit start from ``weights``.
    Returns the number of images the stage trained on (0 when off).
    """
    import json
    from pathlib import Path

    from pipeline.steps import step_errors

    out = Path(backbone.path)
    with step_errors("pretrain", backbone.path):
        out.mkdir(parents=True, exist_ok=True)
        if pretrain_epochs < 1:
            (out / "no_backbone.json").write_text(
                json.dumps({"pretrain_epochs": pretrain_epochs, "weights": weights}), encoding="utf-8"
            )
            backbone.metadata.update({"pretrained": False})
            return 0
        # imported only when there is a stage to train: torch takes seconds to load
        from components.common import parse_int_list
        from components.ingest import MANIFEST_FILE
        from components.manifest import read_manifest
        from components.training.config import CHECKPOINT_FILE
        from components.training.stages import pretrain_backbone
        from pipeline.steps import fit_config

        extra_manifest = Path(extra.path) / MANIFEST_FILE
        counts = parse_int_list(pretrain_classes, name="pretrain_classes") + parse_int_list(
            classes, name="classes"
        )
        cfg = fit_config(
            backbone.path,
            dataset.path,
            train.path,
            val.path,
            classes,
            weights,
            image_size,
            batch_size,
            ema,
            seed,
            device,
            num_threads,
            test_csv=Path(test.path),
            # ingest_extra with per_class 0 leaves an empty manifest: the training split alone
            pretrain_extra=extra_manifest if read_manifest(extra_manifest) else None,
            pretrain_data_root=Path(extra.path),
            pretrain_epochs=pretrain_epochs,
            pretrain_count_cap=max(counts),
        )
        stage = pretrain_backbone(cfg)
        # the optimizer state is only for resuming this task: the consumers need the weights
        (stage.model_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    n_images = int(stage.metrics["n_train"])
    meta = {
        "pretrained": True,
        "images": n_images,
        "epochs": stage.epochs_run,
        "count_cap": max(counts),
    }
    backbone.metadata.update(meta)
    return n_images


def shard_ids(n: int) -> List[int]:  # noqa: UP006 - KFP needs typing.List
    """``[0, .., n-1]``: the ParallelFor items for ``ingest_shards``."""
    if n < 1:
        raise ValueError(f"ingest_shards must be >= 1, got {n}")
    return list(range(n))


def worker_ids(n: int) -> List[int]:  # noqa: UP006 - KFP needs typing.List
    """``[0, .., n-1]``: the ParallelFor items for ``n_tune_workers`` (a parameter, not a static list)."""
    if n < 1:
        raise ValueError(f"n_tune_workers must be >= 1, got {n}")
    return list(range(n))


def tune_worker(
    worker: int,
    run_id: str,
    optuna_storage: str,
    n_trials: int,
    dataset: Input[Dataset],
    train: Input[Dataset],
    val: Input[Dataset],
    classes: str,
    head: str,
    weights: str,
    backbone: Input[Model],
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    seed: int,
    device: str,
    num_threads: int,
    trials: Output[Dataset],
) -> int:
    """One parallel tuning worker: runs trials of the shared study until the study-wide budget is used."""
    import tempfile
    from pathlib import Path

    from components.tune import tune as run_tuning
    from pipeline.steps import backbone_weights, keep_tune_reports, make_tune_config, step_errors

    with step_errors("tune", trials.path), tempfile.TemporaryDirectory() as scratch:
        # trial model dirs stay in scratch space; only the study reports become the artifact
        cfg = make_tune_config(
            Path(scratch),
            f"{run_id[:12]}-w{worker}",
            run_id,
            optuna_storage,
            n_trials,
            dataset.path,
            train.path,
            val.path,
            classes,
            head,
            backbone_weights(backbone.path, weights),
            image_size,
            batch_size,
            epochs,
            ema,
            seed,
            device,
            num_threads,
        )
        result = run_tuning(cfg)
        keep_tune_reports(result, Path(trials.path))
    trials.metadata.update(
        {
            "worker": worker,
            "study": cfg.study_name,
            "trials_run_here": result.n_run_here,
            "from_pretrained_backbone": cfg.train_overrides["weights"] != weights,
        }
    )
    return int(result.n_run_here)


def select_best(
    trials_run: List[int],  # noqa: UP006 - KFP needs typing.List
    run_id: str,
    optuna_storage: str,
    n_trials: int,
    dataset: Input[Dataset],
    train: Input[Dataset],
    val: Input[Dataset],
    classes: str,
    head: str,
    weights: str,
    backbone: Input[Model],
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    seed: int,
    device: str,
    num_threads: int,
    study: Output[Metrics],
    report: Output[HTML],
) -> str:
    """The study's best parameters (JSON) for the final fit.

    Runs the same ``components.tune.tune`` as the workers: with the budget used up it starts no trial
    and only writes the reports for the whole study.
    """
    import json
    import tempfile
    from pathlib import Path

    from components.common import ConfigError
    from components.tune import tune as run_tuning
    from pipeline.steps import backbone_weights, html_report, make_tune_config, step_errors

    with step_errors("select-best", report.path), tempfile.TemporaryDirectory() as scratch:
        cfg = make_tune_config(
            Path(scratch),
            f"{run_id[:12]}-select",
            run_id,
            optuna_storage,
            n_trials,
            dataset.path,
            train.path,
            val.path,
            classes,
            head,
            backbone_weights(backbone.path, weights),
            image_size,
            batch_size,
            epochs,
            ema,
            seed,
            device,
            num_threads,
        )
        cfg.report_only = True  # the workers ran the budget: only read the study, never train here
        result = run_tuning(cfg)
        if not result.best_params or result.best_value is None:
            raise ConfigError(
                f"study {cfg.study_name} has no completed trial ({result.n_failed} failed, {result.n_pruned} "
                "pruned): see the tune_worker logs"
            )
        page = html_report(
            f"Tuning: study {result.study_name}",
            tables={
                "best trial": {"trial": result.best_trial, "val_accuracy": result.best_value},
                "best parameters": result.best_params,
                "trials": {
                    "complete": result.n_complete,
                    "pruned": result.n_pruned,
                    "failed": result.n_failed,
                    "run by workers": sum(trials_run),
                },
            },
            images=[result.history_png, result.intermediate_png, result.importances_png],
        )
    study.log_metric("best_val_accuracy", float(result.best_value))
    study.log_metric("best_trial", float(result.best_trial))
    study.log_metric("trials_complete", float(result.n_complete))
    study.log_metric("trials_pruned", float(result.n_pruned))
    study.log_metric("trials_failed", float(result.n_failed))
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return json.dumps(result.best_params, sort_keys=True)


def train_model(
    best_params: str,
    dataset: Input[Dataset],
    train: Input[Dataset],
    val: Input[Dataset],
    backbone: Input[Model],
    classes: str,
    head: str,
    weights: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    tta: bool,
    seed: int,
    device: str,
    num_threads: int,
    model_name: str,
    int8: bool,
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    model_card: Output[Markdown],
):
    """The final fit with the tuned parameters, in this task; exports model.onnx + model.json into the
    Model. It starts from the pretrain task's backbone when that task made one (as the tuning trials did).
    """
    from components.training.stages import train as run_training
    from pipeline.steps import final_fit_config, record_final_fit, step_errors

    with step_errors("train", model.path):
        cfg = final_fit_config(
            best_params, model.path, dataset.path, train.path, val.path, backbone.path, classes, head,
            weights, image_size, batch_size, epochs, ema, tta, seed, device, num_threads, model_name,
        )  # fmt: skip
        result = run_training(cfg)
        record_final_fit(result, cfg, best_params, int8, model, metrics, curves, model_card)


def train_trainjob(
    best_params: str,
    dataset: Input[Dataset],
    train: Input[Dataset],
    val: Input[Dataset],
    backbone: Input[Model],
    classes: str,
    head: str,
    weights: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    tta: bool,
    seed: int,
    device: str,
    num_threads: int,
    model_name: str,
    int8: bool,
    run_id: str,
    image: str,
    trainjob_nodes: int,
    trainjob_gpus_per_node: int,
    trainjob_cpu: str,
    trainjob_memory: str,
    trainjob_timeout_s: int,
    trainjob_keep: str,
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    model_card: Output[Markdown],
):
    """The final fit as a Kubeflow Trainer TrainJob (``trainjob_nodes`` x ``trainjob_gpus_per_node``,
    torchrun when more than one process): the data staged on the shared volume, the job created and
    awaited, its model copied back into this task's Model (:mod:`components.trainjob`)."""
    from components.trainjob import fit_on_trainjob, job_name
    from pipeline.steps import final_fit_config, record_final_fit, step_errors

    with step_errors("train", model.path):
        cfg = final_fit_config(
            best_params, model.path, dataset.path, train.path, val.path, backbone.path, classes, head,
            weights, image_size, batch_size, epochs, ema, tta, seed, device, num_threads, model_name,
        )  # fmt: skip
        result = fit_on_trainjob(
            cfg,
            name=job_name(run_id),
            image=image,
            nodes=trainjob_nodes,
            gpus_per_node=trainjob_gpus_per_node,
            cpu=trainjob_cpu,
            memory=trainjob_memory,
            timeout_s=trainjob_timeout_s,
            keep=trainjob_keep,
            labels={"inventory-monitor/kfp-run-id": run_id},
        )
        record_final_fit(result, cfg, best_params, int8, model, metrics, curves, model_card)


def evaluate_model(
    model: Input[Model],
    dataset: Input[Dataset],
    train: Input[Dataset],
    test: Input[Dataset],
    accuracy_margin: float,
    evaluated: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
) -> NamedTuple("EvaluateOutputs", [("Output", bool), ("accuracy", float)]):
    """Score the exported ONNX model on the test split; returns whether it passes the publish gate
    (``Output``: at least the majority-class baseline, from the ``train`` split's counts scored on the test
    images, plus ``accuracy_margin``) and the test ``accuracy``.

    ``evaluated`` is the model with its test figures in ``metrics.json``, ``model.json`` and the card
    (the input artifact stays as trained): what challenge and publish take, so the published model and
    the store's ``versions.json`` carry them.

    The verdict is named ``Output`` because kfp.local (2.17) resolves only outputs of that name in a
    ``dsl.If`` condition; ``accuracy`` is passed on to publish as an ordinary input.
    """
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from components.evaluate import AccuracyGate, range_text
    from components.evaluate import evaluate as run_evaluation
    from components.test_figures import evaluated_copy
    from pipeline.steps import html_report, step_errors

    with step_errors("evaluate", metrics.path), tempfile.TemporaryDirectory() as tmp:
        m = run_evaluation(
            Path(model.path),
            Path(test.path),
            Path(tmp),
            data_root=Path(dataset.path),
            progress=False,
            train_manifest=Path(train.path),
        )
        evaluated_copy(Path(model.path), m, Path(evaluated.path))
        evaluated.metadata.update({**model.metadata, "test_accuracy": float(m["accuracy"])})
        baseline = m["majority_baseline"]
        gate = AccuracyGate(float(m["accuracy"]), float(baseline["accuracy"]), float(accuracy_margin))
        page = html_report(
            "Test set",
            tables={
                "metrics": {k: m[k] for k in ("n", "accuracy", "rmse", "mae", "within_one") if k in m},
                "95% bootstrap intervals": {
                    k: range_text(v) for k, v in m.get("intervals", {}).items() if k in m
                },
                "publish gate": {
                    "majority count (most frequent in train)": baseline["count"],
                    "majority baseline accuracy (always that count)": gate.baseline,
                    "accuracy_margin": gate.margin,
                    "required accuracy": gate.required,
                    "test accuracy": gate.accuracy,
                    "passed": gate.passed,
                },
                "per-class accuracy": m["per_class_accuracy"],
            },
            images=[Path(tmp) / "confusion_matrix.png"],
        )
    for key in ("accuracy", "rmse", "mae", "within_one"):
        if key in m:
            metrics.log_metric(f"test_{key}", float(m[key]))
        if key in m.get("intervals", {}):  # the 95 % bootstrap interval: how far the split can move it
            low, high = m["intervals"][key]
            metrics.log_metric(f"test_{key}_low", float(low))
            metrics.log_metric(f"test_{key}_high", float(high))
    metrics.log_metric("majority_count", float(baseline["count"]))
    metrics.log_metric("majority_baseline_accuracy", gate.baseline)
    metrics.log_metric("accuracy_margin", gate.margin)
    metrics.log_metric("required_accuracy", gate.required)
    confusion.log_confusion_matrix(
        [str(label) for label in m["labels"]], [list(map(int, r)) for r in m["confusion_matrix"]]
    )
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    outputs = namedtuple("EvaluateOutputs", ["Output", "accuracy"])
    return outputs(gate.passed, gate.accuracy)


def challenge_model(
    model: Input[Model],
    dataset: Input[Dataset],
    test: Input[Dataset],
    model_store: str,
    endpoint_url: str,
    model_name: str,
    champion_gate: str,
    champion_min_gain: float,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """Score the model against the store's latest published version on the same test images; returns
    whether to publish it (the champion gate: True when nothing is published yet or the gate is off)."""
    import tempfile
    from pathlib import Path

    from components.champion import GateRule, challenge, summary_rows
    from components.evaluate import difference_text
    from pipeline.steps import html_report, require_model_store, step_errors

    with step_errors("challenge", report.path), tempfile.TemporaryDirectory() as tmp:
        require_model_store(model_store)
        if champion_gate == "off":
            record = {"promote": True, "reason": "champion_gate is off: no comparison", "champion": None}
        else:
            record = challenge(
                Path(model.path),
                model_store,
                Path(test.path),
                Path(tmp),
                data_root=Path(dataset.path),
                model_name=model_name,
                endpoint_url=endpoint_url or None,
                rule=GateRule(min_gain=champion_min_gain, gate=champion_gate),
                progress=False,
            )
    tables = {"decision": {"promote": record["promote"], "reason": record["reason"]}}
    if record["champion"]:
        tables["same test images"] = {k: f"{a} | {b}" for k, a, b in summary_rows(record)}
        gain = record["gain"]
        tables["accuracy gain (challenger - champion)"] = {
            "gain (95% paired interval)": difference_text(gain["value"], gain["interval"]),
            "McNemar p": record["paired"]["mcnemar_p"],
        }
        for key in ("accuracy", "rmse"):
            metrics.log_metric(f"champion_{key}", float(record["champion"][key]))
            metrics.log_metric(f"challenger_{key}", float(record["challenger"][key]))
        metrics.log_metric("accuracy_gain", float(gain["value"]))
        metrics.log_metric("accuracy_gain_low", float(gain["interval"][0]))
        metrics.log_metric("accuracy_gain_high", float(gain["interval"][1]))
    report.metadata.update(
        {
            "promote": record["promote"],
            "champion_version": (record["champion"] or {}).get("version", ""),
            "reason": record["reason"],
        }
    )
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(html_report("Published model vs this one", tables=tables))
    return bool(record["promote"])


def publish_model(
    model: Input[Model],
    test_accuracy: float,
    model_store: str,
    endpoint_url: str,
    model_name: str,
    model_version: str,
    serving_image: str,
    inference_service: Output[Artifact],
    summary: Output[Markdown],
) -> NamedTuple("PublishOutputs", [("storage_uri", str), ("version", str)]):
    """Copy the model to the store (KServe layout); ``inference_service`` is the rendered manifest (YAML)."""
    from collections import namedtuple
    from pathlib import Path

    from components.publish import publish as run_publish
    from pipeline.steps import require_model_store, step_errors

    with step_errors("publish", summary.path):
        require_model_store(model_store)
        result = run_publish(
            Path(model.path),
            model_store,
            model_name=model_name,
            version=model_version or None,
            endpoint_url=endpoint_url or None,
            manifest_path=Path(inference_service.path),
            image=serving_image,
        )
    yaml_text = result.manifest_path.read_text(encoding="utf-8")
    with open(summary.path, "w", encoding="utf-8") as fh:
        fh.write(
            f"# {model_name} {result.version}\n\nTest accuracy {test_accuracy:.4f}. Published to "
            f"`{result.uri}`.\n\n```yaml\n{yaml_text}```\n"
        )
    info = {"storage_uri": result.uri, "version": result.version, "index": result.index_uri}
    summary.metadata.update(info)
    inference_service.metadata.update(info)
    outputs = namedtuple("PublishOutputs", ["storage_uri", "version"])
    return outputs(result.uri, result.version)


# ------------------------------------------------------------------------------------------ factory


@dataclass(frozen=True)
class Components:
    """The pipeline's components, built for one image."""

    shard_ids: Callable[..., Any]
    ingest_shard: Callable[..., Any]
    merge_shards: Callable[..., Any]
    ingest_extra: Callable[..., Any]
    split: Callable[..., Any]
    pretrain: Callable[..., Any]
    worker_ids: Callable[..., Any]
    tune_worker: Callable[..., Any]
    select_best: Callable[..., Any]
    train: Callable[..., Any]
    train_trainjob: Callable[..., Any]
    evaluate: Callable[..., Any]
    challenge: Callable[..., Any]
    publish: Callable[..., Any]


def make_components(image: str = DEFAULT_COMPONENTS_IMAGE) -> Components:
    """Wrap the bodies above as KFP components that run in ``image`` and pip-install nothing."""

    def build(func: Callable[..., Any]) -> Callable[..., Any]:
        return dsl.component(base_image=image, install_kfp_package=False, packages_to_install=[])(func)

    return Components(
        shard_ids=build(shard_ids),
        ingest_shard=build(ingest_shard),
        merge_shards=build(merge_shards),
        ingest_extra=build(ingest_extra),
        split=build(split),
        pretrain=build(pretrain_model),
        worker_ids=build(worker_ids),
        tune_worker=build(tune_worker),
        select_best=build(select_best),
        train=build(train_model),
        train_trainjob=build(train_trainjob),
        evaluate=build(evaluate_model),
        challenge=build(challenge_model),
        publish=build(publish_model),
    )
