"""The compiled pipeline IR: tasks, edges, parameters, artifact types, ParallelFor, If, Kubernetes settings.

Also the argument handling of ``pipeline.compile`` and ``pipeline.submit`` (submit is not run against a
live KFP API here: only its validation, which happens before any network call).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import compile as compile_cli
from pipeline import submit as submit_cli
from pipeline.pipeline import BuildOptions, build_pipeline
from pipeline.profiles import PARAMETER_HELP, PROFILES, parameter_table, pipeline_parameters

IMAGE = "registry.example/inventory-monitor/components:abc123"
EXPECTED_ROOT_TASKS = {
    "shard-ids",
    "for-loop-1",
    "merge-shards",
    "ingest-extra",
    "split",
    "pretrain-model",
    "worker-ids",
    "for-loop-2",
    "select-best",
    "train-model",
    "evaluate-model",
    "condition-3",
}
EXPECTED_EDGES = {
    "shard-ids": set(),
    "for-loop-1": {"shard-ids"},
    "merge-shards": {"for-loop-1"},
    "ingest-extra": set(),
    "worker-ids": set(),
    "split": {"merge-shards"},
    "pretrain-model": {"merge-shards", "ingest-extra", "split"},
    "for-loop-2": {"merge-shards", "pretrain-model", "split", "worker-ids"},
    "select-best": {"for-loop-2", "merge-shards", "pretrain-model", "split"},
    "train-model": {"merge-shards", "pretrain-model", "select-best", "split"},
    "evaluate-model": {"merge-shards", "split", "train-model"},
    "condition-3": {"evaluate-model", "merge-shards", "split"},  # it takes evaluate's copy of the model
}


def _compile(tmp_path: Path, profile: str, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path / f"{profile}.yaml"
    assert compile_cli.main(["--profile", profile, "--out", str(out), "--image", IMAGE, *extra]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2, "pipeline spec + Kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return _compile(tmp_path_factory.mktemp("full"), "full")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return _compile(tmp_path_factory.mktemp("quick"), "quick")


def _output_types(spec: dict[str, Any], component: str) -> dict[str, str]:
    arts = spec["components"][component].get("outputDefinitions", {}).get("artifacts", {})
    return {name: a["artifactType"]["schemaTitle"] for name, a in arts.items()}


def test_tasks_and_edges(full):
    spec, _ = full
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == EXPECTED_ROOT_TASKS
    assert {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()} == EXPECTED_EDGES
    # train, tune and evaluate resolve the manifests against the merged ingest Dataset, passed explicitly
    assert tasks["train-model"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset",
        "producerTask": "merge-shards",
    }
    # ingest fans out over ingest_shards shards (each a cached, retried task) and merges them into one
    shards = tasks["for-loop-1"]
    assert shards["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--shard-ids-Output"}
    body = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["ingest-shard"]
    assert (
        body["inputs"]["parameters"]["num_shards"]["componentInputParameter"]
        == "pipelinechannel--ingest_shards"
    )
    assert body["retryPolicy"]["maxRetryCount"] == 3 and body["cachingOptions"]["enableCache"]
    merged = tasks["merge-shards"]["inputs"]["artifacts"]["shards"]
    assert merged["taskOutputArtifact"] == {
        "outputArtifactKey": "pipelinechannel--ingest-shard-dataset",
        "producerTask": "for-loop-1",
    }
    assert tasks["train-model"]["inputs"]["parameters"]["best_params"]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "select-best",
    }


def test_parallel_for_fans_out_tuning_and_collects(full, quick):
    spec, _ = full
    loop = spec["root"]["dag"]["tasks"]["for-loop-2"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--worker-ids-Output"}
    assert loop["iteratorPolicy"] == {"parallelismLimit": 4}
    assert quick[0]["root"]["dag"]["tasks"]["for-loop-2"]["iteratorPolicy"] == {"parallelismLimit": 2}
    body = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    assert set(body) == {"tune-worker"}
    params = body["tune-worker"]["inputs"]["parameters"]
    assert params["worker"]["componentInputParameter"] == "pipelinechannel--worker-ids-Output-loop-item"
    # every worker and select_best share one study: the run id names it
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["n_trials"]["componentInputParameter"] == "pipelinechannel--tune_trials"
    best = spec["root"]["dag"]["tasks"]["select-best"]["inputs"]["parameters"]
    assert best["trials_run"]["taskOutputParameter"]["producerTask"] == "for-loop-2"
    assert best["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # the weight average is part of the recipe the trials score, the flips only of the exported model
    assert params["ema"]["componentInputParameter"] == "pipelinechannel--ema"
    assert best["ema"]["componentInputParameter"] == "ema"
    train = spec["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]
    assert train["ema"]["componentInputParameter"] == "ema"
    assert train["tta"]["componentInputParameter"] == "tta"
    assert "tta" not in params and "tta" not in best
    # pretraining: one task gets the other counts' images and the stage's settings; every trial,
    # select_best and the final fit get its backbone
    tasks = spec["root"]["dag"]["tasks"]
    pre = tasks["pretrain-model"]["inputs"]
    assert pre["artifacts"]["extra"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset",
        "producerTask": "ingest-extra",
    }
    assert pre["parameters"]["pretrain_epochs"]["componentInputParameter"] == "pretrain_epochs"
    assert pre["parameters"]["pretrain_classes"]["componentInputParameter"] == "pretrain_classes"
    backbone = {"outputArtifactKey": "backbone", "producerTask": "pretrain-model"}
    assert tasks["train-model"]["inputs"]["artifacts"]["backbone"]["taskOutputArtifact"] == backbone
    assert tasks["select-best"]["inputs"]["artifacts"]["backbone"]["taskOutputArtifact"] == backbone
    assert body["tune-worker"]["inputs"]["artifacts"]["backbone"]["componentInputArtifact"] == (
        "pipelinechannel--pretrain-model-backbone"
    )
    assert (
        tasks["for-loop-2"]["inputs"]["artifacts"]["pipelinechannel--pretrain-model-backbone"][
            "taskOutputArtifact"
        ]
        == backbone
    )
    extra = tasks["ingest-extra"]["inputs"]["parameters"]
    assert extra["per_class"]["componentInputParameter"] == "pretrain_per_class"
    for consumer in (params, best, train):
        assert "pretrain_epochs" not in consumer and "extra" not in consumer


def test_publish_is_gated_on_test_accuracy_then_on_the_published_model(full):
    spec, _ = full
    tasks = spec["root"]["dag"]["tasks"]
    cond = tasks["condition-3"]
    # the accuracy gate is evaluate's own verdict (baseline + margin), not a constant threshold
    assert cond["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-model-Output'] == true"
    )
    evaluate = tasks["evaluate-model"]["inputs"]
    assert evaluate["parameters"]["accuracy_margin"] == {"componentInputParameter": "accuracy_margin"}
    for part in ("train", "test"):  # the baseline's majority count comes from the training split
        assert evaluate["artifacts"][part]["taskOutputArtifact"] == {
            "outputArtifactKey": part,
            "producerTask": "split",
        }
    # inside the accuracy gate: challenge the published model, publish only if it says so
    inner = spec["components"]["comp-condition-3"]["dag"]["tasks"]
    assert set(inner) == {"challenge-model", "condition-4"}
    assert inner["condition-4"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--challenge-model-Output'] == true"
    )
    assert set(spec["components"]["comp-condition-4"]["dag"]["tasks"]) == {"publish-model"}
    # both take the model with its test figures (evaluate's copy), not the train step's
    evaluated = {"outputArtifactKey": "evaluated", "producerTask": "evaluate-model"}
    outer = spec["root"]["dag"]["tasks"]["condition-3"]["inputs"]["artifacts"]
    assert any(a.get("taskOutputArtifact") == evaluated for a in outer.values()), outer
    challenge = spec["components"]["comp-challenge-model"]
    assert challenge["outputDefinitions"]["parameters"]["Output"] == {"parameterType": "BOOLEAN"}
    params = inner["challenge-model"]["inputs"]["parameters"]
    for name in ("champion_gate", "champion_min_gain", "model_store", "model_name"):
        assert params[name]["componentInputParameter"] == f"pipelinechannel--{name}"
    assert spec["components"]["comp-evaluate-model"]["outputDefinitions"]["parameters"] == {
        "Output": {"parameterType": "BOOLEAN"},  # passed the gate
        "accuracy": {"parameterType": "NUMBER_DOUBLE"},
    }
    publish = spec["components"]["comp-condition-4"]["dag"]["tasks"]["publish-model"]["inputs"]
    assert publish["parameters"]["test_accuracy"] == {
        "componentInputParameter": "pipelinechannel--evaluate-model-accuracy"
    }


def test_artifact_types(full):
    spec, _ = full
    assert _output_types(spec, "comp-ingest-shard") == {"dataset": "system.Dataset"}
    merged = {"dataset": "system.Dataset", "report": "system.Markdown"}
    assert _output_types(spec, "comp-merge-shards") == merged
    assert _output_types(spec, "comp-split") == {
        "train": "system.Dataset",
        "val": "system.Dataset",
        "test": "system.Dataset",
        "histogram": "system.HTML",
    }
    assert _output_types(spec, "comp-pretrain-model") == {"backbone": "system.Model"}
    assert _output_types(spec, "comp-tune-worker") == {"trials": "system.Dataset"}
    assert _output_types(spec, "comp-select-best") == {"study": "system.Metrics", "report": "system.HTML"}
    assert _output_types(spec, "comp-train-model") == {
        "model": "system.Model",
        "metrics": "system.Metrics",
        "curves": "system.HTML",
        "model_card": "system.Markdown",
    }
    assert _output_types(spec, "comp-evaluate-model") == {
        "evaluated": "system.Model",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
        "report": "system.HTML",
    }
    assert _output_types(spec, "comp-publish-model") == {
        "inference_service": "system.Artifact",
        "summary": "system.Markdown",
    }


@pytest.mark.parametrize("profile", list(PROFILES))
def test_parameters_and_defaults_come_from_the_profile(tmp_path, profile):
    spec, _ = _compile(tmp_path, profile)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == set(PROFILES[profile]) == set(PARAMETER_HELP)
    for name, value in PROFILES[profile].items():
        assert inputs[name]["defaultValue"] == value, name
    kinds = {name: p["parameterType"] for name, p in inputs.items()}
    assert kinds["accuracy_margin"] == "NUMBER_DOUBLE" and kinds["tune_trials"] == "NUMBER_INTEGER"
    assert kinds["source"] == "STRING"


def test_pipeline_signature_matches_the_profiles():
    params = inspect.signature(build_pipeline(BuildOptions()).pipeline_func).parameters
    assert set(params) == set(PARAMETER_HELP)


def test_executors_run_in_the_image_and_install_nothing(full):
    spec, _ = full
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 13
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        assert "pip install" not in " ".join(container["command"] + container["args"]), name


def test_resources_retries_and_caching(full, quick):
    spec, k8s = full
    ex = spec["deploymentSpec"]["executors"]
    for name in ("exec-pretrain-model", "exec-tune-worker", "exec-train-model"):
        res = ex[name]["container"]["resources"]
        assert (
            res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            and res["accelerator"]["resourceCount"] == "1"
        )
        assert res["resourceMemoryLimit"] == "32G"
        assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in k8s[name][
            "tolerations"
        ]
    assert "accelerator" not in ex["exec-evaluate-model"]["container"]["resources"]
    quick_ex = quick[0]["deploymentSpec"]["executors"]
    assert all("accelerator" not in e["container"].get("resources", {}) for e in quick_ex.values())

    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["ingest-extra"]["retryPolicy"]["maxRetryCount"] == 3
    caching = {name: t.get("cachingOptions", {}).get("enableCache", False) for name, t in tasks.items()}
    assert (
        caching["merge-shards"] and caching["ingest-extra"] and caching["split"] and caching["evaluate-model"]
    )
    assert caching["pretrain-model"]  # a rerun with the same data and settings reuses the backbone
    assert not caching["select-best"] and not caching["train-model"]
    loop_body = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]["tune-worker"]
    assert not loop_body.get("cachingOptions", {}).get("enableCache", False)
    # the published model changes between runs: neither the challenge nor the publish may be cached
    for comp, task in (("comp-condition-3", "challenge-model"), ("comp-condition-4", "publish-model")):
        gated = spec["components"][comp]["dag"]["tasks"][task]
        assert not gated.get("cachingOptions", {}).get("enableCache", False)


def test_secrets_for_optuna_and_s3(full):
    _, k8s = full
    for name in ("exec-tune-worker", "exec-select-best"):
        (secret,) = k8s[name]["secretAsEnv"]
        assert secret["secretName"] == "optuna-db" and not secret.get("optional", False)
        assert secret["keyToEnv"] == [{"envVar": "OPTUNA_STORAGE", "secretKey": "url"}]
    for name in ("exec-ingest-shard", "exec-challenge-model", "exec-publish-model"):
        (secret,) = k8s[name]["secretAsEnv"]
        assert secret["secretName"] == "aws-credentials" and secret["optional"] is True
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "secretAsEnv" not in k8s["exec-train-model"]
    assert all(e["imagePullPolicy"] == "IfNotPresent" for e in k8s.values())


def test_compile_flags_override_build_options(tmp_path):
    spec, k8s = _compile(
        tmp_path,
        "full",
        "--no-gpu",
        "--tune-parallelism",
        "3",
        "--optuna-secret",
        "tune-db",
        "--param",
        "tune_trials=40",
        "--param",
        "model_store=s3://models/prod",
    )
    assert spec["root"]["dag"]["tasks"]["for-loop-2"]["iteratorPolicy"] == {"parallelismLimit": 3}
    assert (
        "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]["resources"]
    )
    assert k8s["exec-tune-worker"]["secretAsEnv"][0]["secretName"] == "tune-db"
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["tune_trials"]["defaultValue"] == 40
    assert inputs["model_store"]["defaultValue"] == "s3://models/prod"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--param", "tune_trials=many"], "expected a int"),
        (["--param", "no_such=1"], "not a pipeline parameter"),
        (["--param", "tune_trials"], "NAME=VALUE"),
        (["--param", "split_ratios=0.5,0.5"], "split_ratios"),
        (
            ["--param", "n_tune_workers=8", "--param", "tune_trials=4"],
            "tune_trials (4) must be >= n_tune_workers",
        ),
        (["--param", "accuracy_margin=1.5"], "accuracy_margin is accuracy points above the majority-class"),
        (["--param", "accuracy_margin=-2"], "in [-1, 1] (0.05 = 5 points), got -2.0"),
        (["--param", "ema=1.0"], "ema must be in [0, 1)"),
        (["--param", "tta=maybe"], "tta"),
        (["--param", "decision=fitted"], "--param decision is a benchmark experiment"),
        (["--param", "tune_trial=3"], "did you mean tune_trials"),
        (["--param", "head=softmax"], "head must be one of classification, ordinal, regression"),
        (["--param", "champion_gate=strict"], "champion_gate must be point, interval or off"),
        (["--param", "champion_min_gain=5"], "champion_min_gain is an accuracy difference"),
        (["--param", "pretrain_epochs=10"], "set pretrain_per_class >= 1"),
        (["--param", "pretrain_per_class=5", "--param", "pretrain_classes=0,5"], "also in classes"),
        (["--tune-parallelism", "0"], "--tune-parallelism"),
    ],
)
def test_compile_rejects_bad_settings(tmp_path, capsys, argv, message):
    out = tmp_path / "p.yaml"
    assert compile_cli.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def _submission(**params: Any) -> Any:
    merged = pipeline_parameters("full", params)
    return submit_cli.validate_submission("http://kfp.example:8080", "full", merged, experiment="inventory")


def test_submit_builds_a_run_from_the_profile():
    sub = _submission()
    assert sub.host == "http://kfp.example:8080" and sub.experiment == "inventory"
    assert sub.run_name.startswith("full-") and sub.params == dict(PROFILES["full"])


@pytest.mark.parametrize(
    ("host", "params", "message"),
    [
        ("kfp.example:8080", {}, "--host"),
        ("http://kfp", {"model_store": "/tmp/models"}, "model_store"),
        ("http://kfp", {"source": "/work/shared/abid"}, "local path"),
        ("http://kfp", {"optuna_storage": "sqlite:///x.db"}, "SQLite"),
    ],
)
def test_submit_rejects_settings_that_cannot_work_on_a_cluster(host, params, message):
    with pytest.raises(compile_cli.ConfigError, match=message):
        submit_cli.validate_submission(host, "full", pipeline_parameters("full", params), experiment="e")


def test_submit_cli_fails_before_contacting_the_server(capsys):
    # quick's model_store is a local default: a cluster run must name an s3:// store
    assert submit_cli.main(["--host", "http://127.0.0.1:9", "--profile", "quick"]) == 2
    assert "model_store" in capsys.readouterr().err
    assert submit_cli.main(["--host", "http://127.0.0.1:9", "--experiment", "bad/name"]) == 2
    assert "--experiment" in capsys.readouterr().err


def test_component_bodies_import_what_they_use():
    """KFP runs each body's source alone (its file has only kfp's and typing's names): a body that uses a
    name from this module's globals works under a plain import and fails in the task."""
    import builtins
    import inspect
    import symtable
    import typing

    from kfp import dsl

    from pipeline import components as comp

    given = set(dir(builtins)) | set(dir(typing)) | set(dir(dsl)) | {"dsl"}
    bodies = [f for f in vars(comp).values() if inspect.isfunction(f) and f.__module__ == comp.__name__]
    assert len(bodies) >= 12
    for func in bodies:
        if func.__name__ == "make_components":
            continue
        table = symtable.symtable(inspect.getsource(func), "<body>", "exec").get_children()[0]
        missing = sorted(set(table.get_globals()) - given)
        assert not missing, f"{func.__name__} uses {missing} without importing them in its body"


def test_component_helpers(monkeypatch, tmp_path):
    from pipeline import components as comp
    from pipeline import steps

    assert comp.worker_ids(3) == [0, 1, 2] and comp.shard_ids(2) == [0, 1]
    from components.training.config import TrainConfig
    from components.tune import apply_params

    base = TrainConfig(train_csv=tmp_path / "t.csv", val_csv=tmp_path / "v.csv", out_dir=tmp_path / "m")
    tuned = apply_params({"lr": 0.1, "head": "ordinal"}, base)
    assert (tuned.lr, tuned.head, tuned.out_dir) == (0.1, "ordinal", base.out_dir)
    with pytest.raises(compile_cli.ConfigError, match="not TrainConfig fields"):
        apply_params({"lr": 0.1, "learning_rate": 1}, base)
    overrides = compile_cli.parse_param_overrides(["int8=false", "epochs=3"], "quick")
    assert overrides == {"int8": False, "epochs": 3}
    with pytest.raises(compile_cli.ConfigError, match="int8"):
        compile_cli.parse_param_overrides(["int8=maybe"], "quick")
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    with pytest.raises(compile_cli.ConfigError, match="optuna-db Secret"):
        steps.resolve_storage("")
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql://u@db/optuna")
    assert steps.resolve_storage("") == "postgresql://u@db/optuna"
    assert steps.resolve_storage("sqlite:///x.db") == "sqlite:///x.db"

    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = steps.html_report(
        "a <b>", tables={"t": {"acc": 0.123456, "k": [1, 2]}}, images=[png, tmp_path / "no.png"]
    )
    assert "a &lt;b&gt;" in page and "0.1235" in page and page.count("data:image/png;base64,") == 1

    out = tmp_path / "task" / "dataset"
    with pytest.raises(ValueError, match="boom"), steps.step_errors("ingest", str(out)):
        raise ValueError("boom")
    note = (tmp_path / "task" / steps.ERROR_NOTE).read_text()
    assert '"step": "ingest"' in note and '"message": "boom"' in note


def test_the_docs_tables_are_the_generated_ones():
    """docs/pipeline.md's parameter table and docs/training.md's settings table are what the
    declarations give now (``make docs`` rewrites them)."""
    from pipeline import docgen

    assert docgen.stale() == [], "run make docs"
    doc = (docgen.DOCS / "pipeline.md").read_text()
    assert parameter_table() in doc and "| `--head` |" in (docgen.DOCS / "training.md").read_text()
    # a stale block is found, and a doc that lost its block is an error, not a silent pass
    assert docgen.render("<!-- generated: x -->\nold\n<!-- end generated -->", "x", "new").count("new") == 1
    with pytest.raises(ValueError, match="no '<!-- generated: x -->' block"):
        docgen.render("no block here", "x", "new")


def test_tune_workers_train_with_the_pipeline_weight_average(tmp_path):
    from pipeline.steps import make_tune_config

    cfg = make_tune_config(tmp_path, "w0", "run-1", "sqlite:///x.db", 4, "d", "t.csv", "v.csv", "1,2,3",
                           "ordinal", "none", 32, 8, 1, 0.9, 0, "cpu", 1)  # fmt: skip
    assert cfg.train_overrides["ema"] == 0.9
    assert cfg.train_overrides["classes"] == (1, 2, 3) and cfg.train_overrides["image_size"] == 32


def test_trials_and_the_fit_start_from_the_backbone_only_when_one_was_made(tmp_path):
    from pipeline.steps import backbone_weights

    off = tmp_path / "off"  # pretrain_epochs 0: the task leaves only a note
    off.mkdir()
    (off / "no_backbone.json").write_text("{}")
    assert backbone_weights(str(off), "imagenet") == "imagenet"
    assert backbone_weights(str(tmp_path / "missing"), "none") == "none"
    stage = tmp_path / "on" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "model.pt").write_bytes(b"state dict")
    assert backbone_weights(str(tmp_path / "on"), "none") == str(stage / "model.pt")


def test_the_pipeline_offers_the_training_settings_that_measured_a_gain_and_not_the_experiments():
    """The levers in TrainConfig's experiments group (measured as noise) are neither pipeline parameters
    nor profile values; the training settings the pipeline does take describe themselves with
    TrainConfig's own help text."""
    import dataclasses

    from components.settings import help_of
    from components.training.config import EXPERIMENTS, TrainConfig

    experiments = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") == EXPERIMENTS}
    assert {"decision", "refit", "teacher", "pretrain_objective"} <= experiments
    signature = set(inspect.signature(build_pipeline().pipeline_func).parameters)
    assert not experiments & signature and not experiments & set(PARAMETER_HELP)
    assert all(not experiments & set(values) for values in PROFILES.values())
    shared = signature & {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"head", "epochs", "ema", "tta", "image_size", "weights"} <= shared
    assert all(PARAMETER_HELP[name].startswith(help_of(TrainConfig, name)) for name in shared)


def test_ingest_shard_tasks_and_their_merge_make_the_unsharded_dataset(abid_dir, tmp_path):
    """The component bodies the ParallelFor and the merge run: two shards of a per-class selection,
    merged, hold exactly the images one unsharded ingest takes."""
    from types import SimpleNamespace

    from components.ingest import ingest
    from components.manifest import read_manifest
    from pipeline.components import ingest_shard, merge_shards

    def artifact(path):
        return SimpleNamespace(path=str(path), metadata={})

    shards = [artifact(tmp_path / f"shard{k}") for k in range(2)]
    counts = [ingest_shard(str(abid_dir), "", 3, "1,2,3", k, 2, shards[k]) for k in range(2)]
    assert [s.metadata["shard"] for s in shards] == [0, 1] and sum(counts) == 9
    merged, report = artifact(tmp_path / "merged"), artifact(tmp_path / "report.md")
    assert merge_shards(shards, str(abid_dir), merged, report) == 9
    assert merged.metadata["shards"] == 2 and merged.metadata["counts"] == {"1": 3, "2": 3, "3": 3}
    whole = ingest(str(abid_dir), tmp_path / "whole", per_class=3, classes=[1, 2, 3], progress=False)
    rows = {(r.id, r.count, r.sha256) for r in read_manifest(Path(merged.path) / "manifest.csv")}
    assert rows == {(r.id, r.count, r.sha256) for r in read_manifest(whole.manifest_path)}
    assert "2 shard(s)" in Path(report.path).read_text()


def test_trainjob_build_runs_the_final_fit_as_a_trainjob_task(tmp_path):
    spec, executors = _compile(tmp_path, "full", "--trainjob", "--param", "trainjob_nodes=2")
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-trainjob" in tasks and "train-model" not in tasks
    params = tasks["train-trainjob"]["inputs"]["parameters"]
    for name in ("trainjob_nodes", "trainjob_gpus_per_node", "trainjob_timeout_s", "trainjob_keep"):
        assert params[name] == {"componentInputParameter": name}
    assert params["image"]["runtimeValue"]["constant"] == IMAGE
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert spec["root"]["inputDefinitions"]["parameters"]["trainjob_nodes"]["defaultValue"] == 2
    ex = executors["exec-train-trainjob"]
    assert ex["pvcMount"][0]["mountPath"] == "/mnt/training"
    assert ex["fieldPathAsEnv"] == [{"fieldPath": "metadata.namespace", "name": "POD_NAMESPACE"}]
    # the job's pods hold the GPUs, not the task that waits for them
    container = spec["deploymentSpec"]["executors"]["exec-train-trainjob"]["container"]
    assert "accelerator" not in container.get("resources", {})
    # evaluate takes the TrainJob's model
    evaluate = tasks["evaluate-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert evaluate["producerTask"] == "train-trainjob"
    # without --trainjob the fit runs in its task and nothing mounts the volume
    plain, plain_executors = _compile(tmp_path / "plain", "full")
    assert "train-model" in plain["root"]["dag"]["tasks"]
    assert all("pvcMount" not in e for e in plain_executors.values())


def test_the_trainjob_task_hands_the_jobs_model_on_like_the_in_task_fit(tiny_split, tmp_path, monkeypatch):
    """The task body with a stand-in for the cluster: it gets the run's TrainConfig and sizing, and what
    the job trained becomes the task's Model, metrics and card as the in-task fit does."""
    from types import SimpleNamespace

    import components.trainjob as trainjob
    from components.training.stages import train
    from pipeline.components import train_trainjob

    monkeypatch.setenv("INVENTORY_MONITOR_CACHE", str(tmp_path / "cache"))
    seen = {}

    def fake_fit(cfg, **kwargs):
        seen.update(kwargs, cfg=cfg)
        return train(cfg)

    monkeypatch.setattr(trainjob, "fit_on_trainjob", fake_fit)

    def artifact(path):
        return SimpleNamespace(path=str(path), metadata={}, log_metric=lambda k, v: logged.__setitem__(k, v))

    logged = {}
    (tmp_path / "backbone").mkdir()
    names = ("model", "metrics", "curves.html", "card.md")
    model, metrics, curves, card = (artifact(tmp_path / n) for n in names)
    data, train_csv, val_csv = (artifact(tiny_split[k]) for k in ("data_root", "train", "val"))
    train_trainjob(
        '{"lr": 0.05}', data, train_csv, val_csv, artifact(tmp_path / "backbone"), "1,2,3,4,5", "ordinal",
        "none", 32, 10, 1, 0.0, False, 0, "cpu", 1, "counter", False, "run-123", "img:1", 2, 0, "2", "4Gi",
        600, "never", model, metrics, curves, card,
    )  # fmt: skip
    assert seen["name"].startswith("inventory-train-run123-")  # the run's id names the job
    assert (seen["image"], seen["nodes"], seen["gpus_per_node"]) == ("img:1", 2, 0)
    assert (seen["timeout_s"], seen["keep"]) == (600, "never") and seen["cfg"].lr == 0.05
    assert (tmp_path / "model" / "model.onnx").is_file()
    assert not (tmp_path / "model" / "checkpoint.pt").exists()
    assert "val_accuracy" in logged and model.metadata["head"] == "ordinal"
    assert Path(card.path).read_text().startswith("#")


def test_submit_names_the_model_store_in_the_callers_words(capsys, monkeypatch):
    # the CLI in flag words; run by `make submit` (which sets SUBMIT_VIA_MAKE=1) in make variables
    monkeypatch.delenv(submit_cli.VIA_MAKE_ENV, raising=False)
    assert submit_cli.main(["--host", "http://127.0.0.1:9", "--profile", "quick"]) == 2
    err = capsys.readouterr().err
    assert "no model_store" in err and "pass --param model_store=s3://" in err and "SUBMIT_ARGS" not in err
    monkeypatch.setenv(submit_cli.VIA_MAKE_ENV, "1")
    argv = ["--host", "http://127.0.0.1:9", "--profile", "full", "--param", "model_store=/tmp/models"]
    assert submit_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model_store '/tmp/models' is not reachable" in err
    assert (
        'make submit KFP_HOST=http://127.0.0.1:9 PROFILE=full SUBMIT_ARGS="--param model_store=s3://' in err
    )


def _make(*args: str) -> Any:
    """``make`` in the repository without reinstalling the venv (-o: the stamp counts as up to date)."""
    import os
    import shutil
    import subprocess
    import sys

    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    repo = Path(__file__).resolve().parents[1]
    drop = {"KFP_HOST", "SUBMIT_ARGS", "PROFILE", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "SUBMIT_VIA_MAKE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [make, "--no-print-directory", "-o", ".venv/.installed-dev", f"PY={sys.executable}", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_submit_without_a_model_store_names_the_make_variable():
    # quick (make's default PROFILE) has no model store: stopped with the make command to run, before
    # compiling or contacting the (unreachable) host
    proc = _make("submit", "KFP_HOST=http://127.0.0.1:9")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert (
        "set the model store: make submit KFP_HOST=http://127.0.0.1:9 PROFILE=quick "
        'SUBMIT_ARGS="--param model_store=s3://bucket/prefix"'
    ) in out
    assert "submitting to" not in out and "started run" not in out
    # the host is still checked first, by make itself
    proc = _make("submit")
    assert proc.returncode == 2 and "set KFP_HOST, e.g. make submit KFP_HOST=" in proc.stdout
    assert "pipeline.submit" not in proc.stdout + proc.stderr


def test_every_pipeline_parameter_is_described_in_the_kfp_run_form(full, monkeypatch):
    # the KFP UI's run form shows root.inputDefinitions' descriptions: each is PARAMETER_HELP's text
    from pipeline import pipeline as pipeline_module

    spec, _ = full
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    signature = inspect.signature(build_pipeline(BuildOptions()).pipeline_func).parameters
    assert set(signature) == set(PARAMETER_HELP) == set(inputs)
    for name, text in PARAMETER_HELP.items():
        described = inputs[name].get("description", "")
        assert described and " ".join(described.split()) == " ".join(text.split()), name
    # the docstring carries the descriptions; the pipeline's own description stays the decorator's
    assert spec["pipelineInfo"]["description"] == pipeline_module.PIPELINE_DESCRIPTION
    # a parameter without help text cannot be built into a pipeline
    monkeypatch.setattr(
        pipeline_module, "PARAMETER_HELP", {k: v for k, v in PARAMETER_HELP.items() if k != "seed"}
    )
    with pytest.raises(RuntimeError, match=r"only in the signature \['seed'\]"):
        build_pipeline(BuildOptions())


def test_every_html_report_of_the_pipeline_is_copied_with_an_html_name(full):
    # kfp.local names an artifact file after its output (no extension): run_local copies each HTML
    # output of every task, in the root DAG or a nested one, to RUN_DIR/reports/<name>.html
    from pipeline.run_local import HTML_REPORTS

    spec, _ = full
    html = set()
    for component in [spec["root"], *spec["components"].values()]:
        for task, task_spec in component.get("dag", {}).get("tasks", {}).items():
            outputs = _output_types(spec, task_spec["componentRef"]["name"])
            html |= {(task, name) for name, kind in outputs.items() if kind == "system.HTML"}
    assert html and html == set(HTML_REPORTS)
    assert all(name.endswith(".html") for name in HTML_REPORTS.values())
    assert len(set(HTML_REPORTS.values())) == len(HTML_REPORTS)


def test_make_run_passes_run_args_to_run_local():
    import shlex

    from pipeline.run_local import build_parser

    run_args = "RUN_ARGS=--epochs 3 --param head=classification"
    proc = _make("-n", "run", "PROFILE=full", "DATA_SOURCE=/data/mine", run_args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    command = proc.stdout.replace("\\\n", " ")
    line = next(line for line in command.splitlines() if "-m pipeline.run_local" in line)
    args = build_parser().parse_args(shlex.split(line.split("-m pipeline.run_local", 1)[1]))
    assert (args.profile, args.source, args.epochs) == ("full", "/data/mine", 3)
    assert args.param == ["head=classification"]


def _make_variable(name: str) -> list[str]:
    """A ``NAME := a b c`` list of the Makefile."""
    import re

    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    (value,) = re.findall(rf"^{name} := (.*)$", text, flags=re.M)
    return value.split()


def test_an_unknown_profile_stops_make_before_anything_runs(tmp_path):
    from pipeline.profiles import profile_names

    assert sorted(_make_variable("PIPELINE_PROFILES")) == profile_names()
    for target in ("run", "compile", "submit"):
        proc = _make(target, "PROFILE=ful", "KFP_HOST=http://127.0.0.1:9", f"RUN_DIR={tmp_path}/run",
                     f"PIPELINE_YAML={tmp_path}/p.yaml")  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert "PROFILE=ful: use PROFILE=quick, full or scratch" in out
        assert "pipeline." not in out  # stopped before any recipe line
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.yaml").exists()
    # sagemaker is a deploy profile, not a pipeline's
    proc = _make("run", "PROFILE=sagemaker")
    assert proc.returncode == 2 and "PROFILE=sagemaker: use PROFILE=quick, full or scratch" in proc.stderr
    # every real profile passes the check
    for profile in profile_names():
        proc = _make("-n", "compile", f"PROFILE={profile}")
        assert proc.returncode == 0 and f"--profile {profile}" in proc.stdout, proc.stderr


def test_an_unknown_cluster_stops_make_deploy(tmp_path):
    assert _make_variable("CLUSTERS") == ["kind", "minikube"]
    for target in ("deploy", "undeploy"):
        proc = _make(target, "CLUSTER=knd")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "CLUSTER=knd: use CLUSTER=kind or minikube (or PROFILE=sagemaker)" in proc.stderr
        assert "deploy.sh" not in proc.stdout
        # kind and minikube pass; with PROFILE=sagemaker the cluster is not used, so not checked
        for ok in (["CLUSTER=kind"], ["CLUSTER=minikube"], ["PROFILE=sagemaker", "CLUSTER=knd"]):
            proc = _make("-n", target, *ok)
            assert proc.returncode == 0 and "deploy.sh" in proc.stdout, proc.stderr
    # run does not look at CLUSTER
    assert _make("-n", "run", "CLUSTER=knd").returncode == 0
