"""components.champion: the published model against a new one on the same test images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import pytest

from components import champion
from components.champion import GateRule, challenge, decide
from components.common import ConfigError
from components.evaluate import paired_difference
from components.manifest import write_manifest
from components.publish import publish
from tests.fixtures.models import constant_model

# A test manifest of real images whose labels the tests choose: four 1s and two 2s.
LABELS = (1, 1, 1, 1, 2, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("constant_models")
    return {
        "ones": constant_model(root / "ones", 1, data_sha="a" * 64),
        "twos": constant_model(root / "twos", 2, data_sha="a" * 64),
        "twos_other_data": constant_model(root / "twos_other", 2, data_sha="b" * 64),
        "ones_of_four": constant_model(root / "ones_of_four", 1, classes=(1, 2, 3, 4)),
    }


@pytest.fixture(scope="module")
def manifest(tiny_split: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.manifest import load_labelled

    rows, _ = load_labelled(tiny_split["train"], tiny_split["data_root"])
    relabelled = [dataclasses.replace(r, count=label) for r, label in zip(rows, LABELS, strict=False)]
    return write_manifest(tmp_path_factory.mktemp("champion_manifest") / "test.csv", relabelled)


def _paired(a_right: int, b_right: int, both: int = 0, neither: int = 0) -> dict:
    """A paired difference of A and B over constructed predictions (true count 1 everywhere)."""
    true = [1] * (a_right + b_right + both + neither)
    a = [1] * a_right + [2] * b_right + [1] * both + [2] * neither
    b = [2] * a_right + [1] * b_right + [1] * both + [3] * neither
    return paired_difference(true, a, b)


def test_the_default_gate_promotes_only_a_gain_the_split_can_tell_from_noise():
    slight = _paired(a_right=10, b_right=14, both=176)  # +2 points on 200 images, well inside the noise
    promote, reason = decide(slight, GateRule())
    assert promote is False and reason.startswith("interval gate:") and "lower end" in reason
    clear = _paired(a_right=0, b_right=40, both=100, neither=60)  # +20 points, p ~ 1e-12
    promote, reason = decide(clear, GateRule())
    assert promote is True and reason.startswith("interval gate:") and "promote the challenger" in reason


def test_the_point_gate_promotes_a_gain_only_on_enough_images_and_with_no_worse_rmse():
    slight = _paired(a_right=10, b_right=14, both=176)
    assert decide(slight, GateRule(gate="point"))[0] is True
    # one image better on a 10-image split: the kind of win that decided nothing
    tiny = _paired(a_right=1, b_right=2, both=7)
    promote, reason = decide(tiny, GateRule(gate="point"))
    assert promote is False and "on 10 test images, fewer than the 200" in reason
    assert decide(tiny, GateRule(gate="point", min_images=10))[0] is True
    # more right, but much further off where wrong: a worse RMSE keeps the champion
    wider = _paired(a_right=10, b_right=14, both=100, neither=76)
    assert wider["rmse_diff"] > 0 and wider["accuracy_diff"] > 0
    promote, reason = decide(wider, GateRule(gate="point"))
    assert promote is False and "RMSE" in reason and "worse" in reason
    assert decide(wider, GateRule(gate="point", rmse_no_worse=False))[0] is True
    # a margin asks for more than no loss; a negative margin tolerates a loss
    assert decide(slight, GateRule(gate="point", min_gain=0.05))[0] is False
    worse = _paired(a_right=14, b_right=10, both=176)
    assert decide(worse, GateRule(gate="point"))[0] is False
    assert decide(worse, GateRule(gate="point", min_gain=-0.03, rmse_no_worse=False))[0] is True


def test_rmse_gain_is_the_reduction_so_that_larger_is_better():
    # B is right where A is off by 1 and off by 1 where A is off by 2: B has the lower RMSE
    true = [1] * 10
    a, b = [2] * 5 + [3] * 5, [1] * 5 + [2] * 5
    paired = paired_difference(true, a, b)
    value, (low, high) = champion.gain(paired, "rmse")
    assert value == pytest.approx(-paired["rmse_diff"]) and value > 0
    assert low <= value <= high
    assert decide(paired, GateRule(metric="rmse"))[0] is True
    assert decide(paired_difference(true, b, a), GateRule(metric="rmse"))[0] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "f1"}, "--metric"),
        ({"gate": "strict"}, "--gate"),
        ({"min_gain": 3.0}, "one point"),
    ],
)
def test_bad_rules_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GateRule(**kwargs)


def test_nothing_published_promotes_without_evaluating(models, manifest: Path, tmp_path: Path):
    record = challenge(models["ones"], str(tmp_path / "store"), manifest, tmp_path / "out", progress=False)
    assert record["promote"] is True and record["champion"] is None
    assert "nothing published" in record["reason"]
    assert json.loads((tmp_path / "out" / champion.CHALLENGE_FILE).read_text()) == record
    assert not (tmp_path / "out" / "challenger").exists()


def test_a_better_model_is_promoted_a_worse_one_kept(models, manifest: Path, tmp_path: Path):
    store = str(tmp_path / "store")
    publish(models["twos"], store, version="v1", manifest_path=tmp_path / "v1.yaml")

    # six images: only a point gate told to accept so few promotes (the default interval gate would not)
    point = GateRule(gate="point", min_images=6)
    record = challenge(models["ones"], store, manifest, tmp_path / "up", rule=point, progress=False)
    assert record["champion"]["version"] == "v1"
    assert record["champion"]["accuracy"] == pytest.approx(2 / 6)
    assert record["challenger"]["accuracy"] == pytest.approx(4 / 6)
    paired = record["paired"]
    assert paired["accuracy_diff"] == pytest.approx(2 / 6)
    assert (paired["only_a_right"], paired["only_b_right"], paired["n"]) == (2, 4, 6)
    assert record["promote"] is True and record["same_training_data"] is True
    # both evaluations are kept beside the decision
    for role in ("champion", "challenger"):
        assert (tmp_path / "up" / role / "predictions.csv").is_file()

    # the same pair the other way round: the challenger loses 2 of 6 images' worth
    publish(models["ones"], store, model_name="counter-b", version="v1", manifest_path=tmp_path / "b.yaml")
    down = challenge(
        models["twos"], store, manifest, tmp_path / "down", model_name="counter-b", rule=point, progress=False
    )
    assert down["promote"] is False and down["paired"]["accuracy_diff"] == pytest.approx(-2 / 6)
    # six images cannot show +2/6 to be more than the split's draw: the interval gate keeps the champion
    cautious = challenge(
        models["ones"], store, manifest, tmp_path / "iv", rule=GateRule(gate="interval"), progress=False
    )
    assert cautious["promote"] is False and cautious["gain"]["interval"][0] < 0 < cautious["gain"]["value"]


def test_cli_exit_code_says_promote_or_keep(models, manifest: Path, tmp_path: Path, capsys):
    store = str(tmp_path / "store")
    publish(models["twos"], store, version="v1", manifest_path=tmp_path / "v1.yaml")
    common = ["--store", store, "--manifest", str(manifest), "--no-progress"]
    argv = ["--model", str(models["ones"]), "--out", str(tmp_path / "a"), *common]
    assert champion.main(argv) == 1  # the default interval gate: six images tell nothing apart
    assert "keep: interval gate: accuracy gain +0.3333 (" in capsys.readouterr().out
    assert champion.main([*argv, "--gate", "point", "--min-images", "6"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("promote: point gate: accuracy gain +0.3333 (")
    assert "0.3333" in out and "0.6667" in out  # the table: champion and challenger accuracy
    keep = ["--model", str(models["twos_other_data"]), "--out", str(tmp_path / "b"), "--min-gain", "0.01"]
    assert champion.main([*keep, *common]) == 1
    out = capsys.readouterr().out
    assert "keep: interval gate: accuracy gain +0.0000" in out and "different data" in out
    assert json.loads((tmp_path / "b" / "challenge.json").read_text())["same_training_data"] is False


def test_models_of_different_classes_cannot_be_compared(models, manifest: Path, tmp_path: Path, capsys):
    store = str(tmp_path / "store")
    publish(models["twos"], store, version="v1", manifest_path=tmp_path / "v1.yaml")
    argv = ["--model", str(models["ones_of_four"]), "--store", store, "--manifest", str(manifest)]
    assert champion.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "counts [1, 2, 3, 4, 5], this model [1, 2, 3, 4]" in err and "another --model-name" in err


def test_an_index_naming_a_missing_version_is_an_error(models, manifest: Path, tmp_path: Path):
    store = tmp_path / "store"
    publish(models["twos"], str(store), version="v1", manifest_path=tmp_path / "v1.yaml")
    index_path = store / "inventory-counter" / "versions.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(index | {"latest": "v9"}))
    with pytest.raises(ConfigError, match="no usable latest version"):
        challenge(models["ones"], str(store), manifest, tmp_path / "o", progress=False)


def test_the_champion_comes_from_an_s3_store(models, manifest: Path, tmp_path: Path, aws_env: str):
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="models")
    store = "s3://models/prod"
    assert (
        challenge(models["ones"], store, manifest, tmp_path / "0", endpoint_url=aws_env)["champion"] is None
    )
    publish(models["twos"], store, version="v1", endpoint_url=aws_env, manifest_path=tmp_path / "v1.yaml")
    publish(models["ones"], store, version="v2", endpoint_url=aws_env, manifest_path=tmp_path / "v2.yaml")
    # the latest version (v2, all ones) is the champion: the all-twos model loses to it
    record = challenge(models["twos"], store, manifest, tmp_path / "o", endpoint_url=aws_env, progress=False)
    assert record["champion"]["version"] == "v2"
    assert record["champion"]["uri"] == "s3://models/prod/inventory-counter/v2"
    assert record["champion"]["accuracy"] == pytest.approx(4 / 6)
    assert record["promote"] is False


def test_pipeline_step_returns_the_gate_and_logs_both_models(models, manifest: Path, tmp_path: Path):
    from kfp.dsl import HTML, Dataset, Metrics, Model

    from pipeline import run_local
    from pipeline.components import challenge_model

    store = str(tmp_path / "store")
    publish(models["ones"], store, version="v1", manifest_path=tmp_path / "v1.yaml")

    def step(gate: str, min_gain: float = 0.0, model_store: str = store) -> tuple[bool, Metrics, HTML]:
        metrics, report = (
            Metrics(uri=str(tmp_path / gate / "metrics")),
            HTML(uri=str(tmp_path / gate / "r.html")),
        )
        (tmp_path / gate).mkdir()
        promote = challenge_model(
            model=Model(uri=str(models["twos"])),
            dataset=Dataset(uri=str(manifest.parent)),
            test=Dataset(uri=str(manifest)),
            model_store=model_store,
            endpoint_url="",
            model_name="inventory-counter",
            champion_gate=gate,
            champion_min_gain=min_gain,
            metrics=metrics,
            report=report,
        )
        return promote, metrics, report

    promote, metrics, report = step("point")
    assert promote is False and report.metadata["champion_version"] == "v1"
    assert report.metadata["promote"] is False and report.metadata["reason"].endswith("keep the champion")
    assert metrics.metadata["champion_accuracy"] == pytest.approx(4 / 6)
    assert metrics.metadata["challenger_accuracy"] == pytest.approx(2 / 6)
    low, gain, high = (metrics.metadata[f"accuracy_gain{s}"] for s in ("_low", "", "_high"))
    assert gain == pytest.approx(-2 / 6) and low <= gain <= high
    assert "keep the champion" in Path(report.path).read_text()
    # the run summary says why nothing was published: the accuracy gate passed, the champion gate did not
    figures = {"test_accuracy": 2 / 6, "majority_baseline_accuracy": 1 / 6, "accuracy_margin": 0.05}
    summary = run_local.RunSummary(
        run_dir=tmp_path,
        tasks={
            "evaluate-model": {
                "parameterValues": {"Output": True, "accuracy": 2 / 6},
                "artifacts": {"metrics": {"artifacts": [{"uri": "m", "metadata": figures}]}},
            },
            "challenge-model": {
                "parameterValues": {"Output": promote},
                "artifacts": {"report": {"artifacts": [{"uri": report.uri, "metadata": report.metadata}]}},
            },
        },
    )
    text = run_local.summary_tables(summary, {"optuna_storage": ""}, None)
    assert "not published (no better than the published version v1)" in text
    assert (
        "not published: test accuracy 0.333 >= majority baseline 0.167 + margin 0.05 = 0.217, "
        f"but champion: {report.metadata['reason']}"
    ) in text

    # a tolerated loss, or no comparison at all, lets it through
    assert step("interval", min_gain=-1.0)[0] is True
    promote, metrics, report = step("off")
    assert promote is True and metrics.metadata == {} and report.metadata["champion_version"] == ""
    # without a store there is nothing to challenge or publish to: the step says which parameter
    with pytest.raises(ConfigError, match="model_store is empty"):
        step("nostore", model_store="")
    assert "model_store is empty" in (tmp_path / "nostore" / "step_error.json").read_text()
