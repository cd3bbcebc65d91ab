"""components.evaluate: hand-checked metrics, and the served (ONNX) model's figures on real images."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from components.common import ConfigError
from components.evaluate import (
    AccuracyGate,
    bootstrap_intervals,
    count_metrics,
    difference_text,
    evaluate,
    interval_text,
    load_predictions,
    main,
    majority_baseline,
    mcnemar_exact_p,
    paired_difference,
)
from components.manifest import load_labelled, read_manifest, write_manifest
from components.modelspec import load_model_spec
from components.preprocess import preprocess_batch


def test_count_metrics_match_a_hand_computed_confusion_matrix() -> None:
    true = [1, 1, 2, 3, 3, 5, 4]
    pred = [1, 2, 2, 3, 5, 4, 4]
    m = count_metrics(true, pred, (1, 2, 3, 4, 5), expected=[1.0, 2.0, 2.0, 3.0, 4.0, 4.5, 4.0])
    assert m["confusion_matrix"] == [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 0],
    ]
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4 + 1) / 7))
    assert m["mae"] == pytest.approx(4 / 7)
    assert m["within_one"] == pytest.approx(6 / 7)
    assert m["rmse_expected"] == pytest.approx(math.sqrt((1 + 1 + 0.25) / 7))
    assert m["per_class_accuracy"] == {"1": 0.5, "2": 1.0, "3": 0.5, "4": 1.0, "5": 0.0}
    assert count_metrics([2], [2], (1, 2, 3))["per_class_accuracy"]["1"] is None
    with pytest.raises(ValueError, match="outside"):
        count_metrics([1, 7], [1, 1], (1, 2, 3))


def test_bootstrap_intervals_agree_with_the_binomial_interval_and_shrink_with_more_images() -> None:
    # 876 images, 43 % right: the accuracy interval is the binomial one, +-1.96 * sqrt(p(1-p)/n).
    cm = np.array(
        [
            [120, 60, 30, 10, 5],
            [50, 70, 50, 20, 10],
            [20, 40, 80, 40, 20],
            [10, 20, 40, 50, 30],
            [5, 10, 25, 40, 71],
        ]
    )
    labels = [1, 2, 3, 4, 5]
    n, acc = cm.sum(), np.trace(cm) / cm.sum()
    iv = bootstrap_intervals(cm, labels)
    lo, hi = iv["accuracy"]
    assert lo < acc < hi
    half = 1.96 * math.sqrt(acc * (1 - acc) / n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.12)
    m = count_metrics(*_pairs(cm, labels), labels, intervals=True)
    assert m["intervals"] == iv  # count_metrics' intervals are these, from its own matrix
    for key in ("rmse", "mae", "within_one"):
        assert iv[key][0] < m[key] < iv[key][1]
    # four times the images: about half the width; the same matrix and seed: the same interval
    wide, narrow = np.diff(iv["rmse"])[0], np.diff(bootstrap_intervals(cm * 4, labels)["rmse"])[0]
    assert narrow == pytest.approx(wide / 2, rel=0.2)
    assert bootstrap_intervals(cm, labels) == iv
    assert bootstrap_intervals(cm, labels, seed=1) != iv
    assert "intervals" not in count_metrics([1, 2], [1, 2], labels)


def test_bootstrap_intervals_use_the_count_values_and_reject_bad_input() -> None:
    # every image right: no resample can be wrong
    perfect = bootstrap_intervals(np.diag([3, 4, 5]), [1, 2, 3])
    assert perfect["accuracy"] == [1.0, 1.0] and perfect["rmse"] == [0.0, 0.0]
    # classes 0 and 10, every empty bin called 10: the error is 10 items in every resample
    far = bootstrap_intervals([[0, 6], [0, 0]], [0, 10])
    assert far["rmse"] == [10.0, 10.0] and far["accuracy"] == [0.0, 0.0] and far["within_one"] == [0.0, 0.0]
    assert interval_text({"accuracy": 0.5, "intervals": {"accuracy": [0.25, 0.75]}}, "accuracy") == (
        "0.500 (0.250-0.750)"
    )
    assert interval_text({"accuracy": 0.5}, "accuracy") == "0.500"
    # a difference's interval may straddle zero: both ends carry their sign
    assert difference_text(0.0308, [-0.0035, 0.0628]) == "+0.0308 (-0.0035 to +0.0628)"
    for bad, kwargs, match in [
        (np.zeros((2, 2)), {}, "at least one image"),
        (np.ones((3, 3)), {}, "2x2"),
        (-np.eye(2), {}, "non-negative"),
        (np.eye(2), {"level": 1.0}, "level"),
        (np.eye(2), {"draws": 10}, "draws"),
    ]:
        with pytest.raises(ValueError, match=match):
            bootstrap_intervals(bad, [1, 2], **kwargs)


def test_paired_difference_of_two_models_on_the_same_images() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(1, 6, size=600)
    a = np.where(rng.random(600) < 0.4, true, rng.integers(1, 6, size=600))
    # B is A with 30 of A's errors fixed: +5 points, and never worse on any image
    wrong = np.flatnonzero(a != true)[:30]
    b = a.copy()
    b[wrong] = true[wrong]
    d = paired_difference(true, a, b)
    assert d["accuracy_diff"] == pytest.approx(30 / 600)
    assert d["only_a_right"] == 0 and d["only_b_right"] == 30
    assert d["mcnemar_p"] == pytest.approx(2 * 0.5**30) and d["mcnemar_p"] < 1e-6
    lo, hi = d["accuracy_diff_interval"]
    assert 0 < lo < 30 / 600 < hi
    # paired: far narrower than the two models' own intervals suggest
    own = bootstrap_intervals(count_metrics(true, b, [1, 2, 3, 4, 5])["confusion_matrix"], [1, 2, 3, 4, 5])
    assert hi - lo < (own["accuracy"][1] - own["accuracy"][0]) / 2
    assert d["rmse_diff"] == pytest.approx(
        math.sqrt(((b - true) ** 2).mean()) - math.sqrt(((a - true) ** 2).mean())
    )
    assert d["rmse_diff_interval"][1] < 0  # fixing errors only lowers RMSE
    same = paired_difference(true, a, a)
    assert (
        same["accuracy_diff"] == 0 and same["accuracy_diff_interval"] == [0.0, 0.0] and same["mcnemar_p"] == 1
    )
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(true, a, b[:-1])
    with pytest.raises(ValueError, match="level"):
        paired_difference(true, a, b, level=0)


def test_mcnemar_exact_p_by_hand() -> None:
    # 1 vs 9 discordant images: 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def _pairs(cm: np.ndarray, labels: list[int]) -> tuple[list[int], list[int]]:
    """(true, predicted) lists that have ``cm`` as their confusion matrix."""
    true, pred = [], []
    for i, j in np.ndindex(cm.shape):
        true += [labels[i]] * int(cm[i, j])
        pred += [labels[j]] * int(cm[i, j])
    return true, pred


def test_majority_baseline_answers_the_training_splits_most_frequent_count() -> None:
    # train: 3 is the most frequent count; on the test counts it is right 2 times out of 5
    base = majority_baseline([1, 2, 2, 3, 3, 3, 5], [3, 1, 3, 2, 4])
    assert base == {"count": 3, "accuracy": 2 / 5, "n_train": 7, "n_test": 5}
    # a tie goes to the smallest count, whatever the order of the rows
    assert majority_baseline([4, 2, 4, 2, 5], [2, 4, 4]) == majority_baseline([2, 5, 4, 2, 4], [2, 4, 4])
    assert majority_baseline([4, 2, 4, 2, 5], [2, 4, 4])["count"] == 2
    assert majority_baseline([4, 2, 4, 2, 5], [2, 4, 4])["accuracy"] == pytest.approx(1 / 3)
    # the test split's own majority does not matter, only the training split's
    assert majority_baseline([5, 5, 1], [1, 1, 2, 3])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        majority_baseline([], [1])
    with pytest.raises(ValueError, match="non-empty"):
        majority_baseline([1], [])


def test_accuracy_gate_requires_the_baseline_plus_the_margin() -> None:
    failed = AccuracyGate(accuracy=0.213, baseline=0.224, margin=0.05)
    assert failed.required == pytest.approx(0.274) and not failed.passed
    assert failed.reason() == "test accuracy 0.213 < majority baseline 0.224 + margin 0.05 = 0.274"
    passed = AccuracyGate(accuracy=0.43, baseline=0.264, margin=0.05)
    assert passed.passed and passed.reason().startswith("test accuracy 0.430 >= majority baseline 0.264")
    # exactly on the line passes, despite 0.2 + 0.05 in floating point
    assert AccuracyGate(accuracy=5 / 20, baseline=4 / 20, margin=0.05).passed
    assert not AccuracyGate(accuracy=0.2, baseline=0.2, margin=0.001).passed
    # a negative margin tolerates a shortfall; -1 lets every model through
    open_gate = AccuracyGate(accuracy=0.0, baseline=0.3, margin=-1.0)
    assert open_gate.passed
    assert (
        open_gate.reason()
        == "no accuracy gate (accuracy_margin -1): test accuracy 0.000, majority baseline 0.300"
    )
    assert not AccuracyGate(accuracy=0.24, baseline=0.3, margin=-0.05).passed


def test_evaluate_scores_the_onnx_model_through_the_serving_path(
    tiny_trained_model_dir: Path, tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    out = tmp_path / "eval"
    m = evaluate(
        tiny_trained_model_dir,
        tiny_split["test"],
        out,
        data_root=tiny_split["data_root"],
        batch_size=3,
        num_threads=1,
    )
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    lo, hi = m["intervals"]["accuracy"]
    assert lo <= m["accuracy"] <= hi and m["intervals"]["level"] == 0.95
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # Independent recomputation: ORT on preprocess_batch, then a confusion matrix by hand.
    rows, paths = load_labelled(tiny_split["test"], tiny_split["data_root"])
    spec = load_model_spec(tiny_trained_model_dir)
    sess = ort.InferenceSession(
        str(tiny_trained_model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    _, count, expected = sess.run(None, {"input": preprocess_batch(paths, spec.preprocess)})
    cm = np.zeros((5, 5), dtype=int)
    for r, p in zip(rows, count, strict=True):
        cm[r.count - 1, p - 1] += 1
    assert m["confusion_matrix"] == cm.tolist()
    assert m["accuracy"] == pytest.approx(np.trace(cm) / len(rows))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((count - [r.count for r in rows]) ** 2)))

    with (out / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    assert [p["id"] for p in preds] == [r.id for r in rows]
    ids, true, pred = load_predictions(out / "predictions.csv")
    assert ids == [r.id for r in rows] and true.tolist() == [r.count for r in rows]
    assert pred.tolist() == count.tolist()
    with pytest.raises(ConfigError, match="not a predictions file"):
        load_predictions(tiny_split["test"])  # a manifest, not predictions
    assert [int(p["pred"]) for p in preds] == count.tolist()
    np.testing.assert_allclose([float(p["expected"]) for p in preds], expected, atol=1e-3)


def test_served_figures_equal_training_figures_on_val(
    tiny_trained_model_dir: Path, tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    from components.training.splits import calibration_split

    # the val figures are the selection part's: the calibration part (half, seed 0) is held out
    rows = read_manifest(tiny_split["val"])
    selection, _, calibration, _ = calibration_split(rows, [Path(r.path) for r in rows], 0.5, 0)
    assert len(selection) == len(calibration) == 5
    manifest = write_manifest(tmp_path / "val_selection.csv", selection)
    m = evaluate(tiny_trained_model_dir, manifest, tmp_path, data_root=tiny_split["data_root"], num_threads=1)
    trained = json.loads((tiny_trained_model_dir / "metrics.json").read_text())["val"]
    assert m["confusion_matrix"] == trained["confusion_matrix"]
    assert m["rmse"] == pytest.approx(trained["rmse"])
    # the expected count is the calibrated graph's in both
    assert m["rmse_expected"] == pytest.approx(trained["rmse_expected"], abs=1e-4)


def test_cli(
    tiny_trained_model_dir: Path,
    tiny_split: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "--manifest",
        str(tiny_split["test"]),
        "--data-root",
        str(tiny_split["data_root"]),
        "--num-threads",
        "1",
    ]
    assert main(["--model", str(tiny_trained_model_dir), "--out", str(tmp_path / "e"), *args]) == 0
    printed = capsys.readouterr().out
    acc = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "95% interval" in printed
    assert "{:.4f}-{:.4f}".format(*acc["intervals"]["accuracy"]) in printed
    assert "majority_baseline" not in acc and "majority baseline" not in printed
    # with the training manifest: the baseline of always answering its most frequent count (4 here)
    test_rows = read_manifest(tiny_split["test"])
    train_rows = read_manifest(tiny_split["train"])
    counts = [4, 4, 4, 2, 2, 1]
    relabelled = [r.__class__(**{**r.__dict__, "count": c}) for r, c in zip(train_rows, counts, strict=False)]
    train = write_manifest(tmp_path / "train.csv", relabelled)
    out = tmp_path / "with_baseline"
    argv = ["--model", str(tiny_trained_model_dir), "--out", str(out), "--train-manifest", str(train)]
    assert main([*argv, *args]) == 0
    base = json.loads((out / "metrics.json").read_text())["majority_baseline"]
    expected = sum(r.count == 4 for r in test_rows) / len(test_rows)
    assert base["count"] == 4 and base["accuracy"] == pytest.approx(expected) and expected > 0
    assert "(always 4)" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e2"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    rows = read_manifest(tiny_split["test"])
    bad = write_manifest(tmp_path / "bad.csv", [rows[0].__class__(**{**rows[0].__dict__, "count": 7})])
    assert (
        main(["--model", str(tiny_trained_model_dir), "--out", str(tmp_path / "e3"), "--manifest", str(bad)])
        == 2
    )
    assert "cannot predict" in capsys.readouterr().err
