"""components.evaluate: hand-checked metrics, and the served (ONNX) model's figures on real images."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from components.evaluate import count_metrics, evaluate, main
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
    assert [int(p["pred"]) for p in preds] == count.tolist()
    np.testing.assert_allclose([float(p["expected"]) for p in preds], expected, atol=1e-3)


def test_served_figures_equal_training_figures_on_val(
    tiny_trained_model_dir: Path, tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    m = evaluate(
        tiny_trained_model_dir, tiny_split["val"], tmp_path, data_root=tiny_split["data_root"], num_threads=1
    )
    trained = json.loads((tiny_trained_model_dir / "metrics.json").read_text())["val"]
    assert m["confusion_matrix"] == trained["confusion_matrix"]
    assert m["rmse"] == pytest.approx(trained["rmse"])


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
    assert "accuracy" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e2"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    rows = read_manifest(tiny_split["test"])
    bad = write_manifest(tmp_path / "bad.csv", [rows[0].__class__(**{**rows[0].__dict__, "count": 7})])
    assert (
        main(["--model", str(tiny_trained_model_dir), "--out", str(tmp_path / "e3"), "--manifest", str(bad)])
        == 2
    )
    assert "cannot predict" in capsys.readouterr().err
