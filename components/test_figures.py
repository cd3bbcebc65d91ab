"""Put a model's test figures where its readers look: ``metrics.json``, ``model.json``, the model card,
the answer plots (and, through ``model.json``, the store's ``versions.json``).

Training writes them when it is given a test manifest; the pipeline evaluates after training, so its
evaluate step writes them into a copy of the model that challenge and publish then take. Both go
through :func:`merge_test_figures`, so a model carries the same figures whichever way it was tested.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.common import atomic_write_dir, atomic_write_json, read_json
from components.modelspec import CALIBRATION_PNG, RISK_COVERAGE_PNG, ModelSpec, load_model_spec

METRICS_FILE = "metrics.json"
#: what metrics.json keeps of an evaluation under ``test``
DETAIL_KEYS = (
    "accuracy",
    "rmse",
    "mae",
    "rmse_expected",
    "within_one",
    "n",
    "per_class_accuracy",
    "confusion_matrix",
    "intervals",
)
#: what model.json keeps (the figures a consumer shows, with their 95 % intervals)
SUMMARY_KEYS = ("accuracy", "rmse", "mae", "n", "intervals")


def merge_test_figures(metrics: dict[str, Any], spec: ModelSpec, evaluation: Mapping[str, Any]) -> None:
    """Fold a :func:`components.evaluate.evaluate` result into ``metrics`` (metrics.json) and ``spec``
    (model.json): the figures with their intervals, and the answers' test figures as evaluation computed
    them from the ONNX outputs and model.json (ECE and NLL after calibration, beside the torch model's
    before when training recorded it; reliability bins; count-set, review and risk-coverage figures)."""
    metrics["test"] = {k: evaluation[k] for k in DETAIL_KEYS if k in evaluation}
    spec.metrics["test"] = {k: evaluation[k] for k in SUMMARY_KEYS if k in evaluation}
    calibrated = evaluation.get("calibration")
    if calibrated:
        cal = metrics.setdefault("calibration", {})
        cal["test"] = {
            **cal.get("test", {}),
            "ece_after": calibrated["ece"],
            "nll_after": calibrated["nll"],
            "n": calibrated["n"],
        }
        cal.setdefault("reliability", {})["test"] = calibrated["reliability"]
    if evaluation.get("answers"):
        metrics.setdefault("answers", {})["test"] = evaluation["answers"]


def save_answer_plots(metrics: Mapping[str, Any], temperature: float, out_dir: Path) -> None:
    """``calibration.png`` (reliability before/after on val, test when evaluated) and
    ``risk_coverage.png`` (accuracy against the share answered) from the figures in ``metrics``."""
    from components.plots import save_reliability, save_risk_coverage

    reliability = metrics.get("calibration", {}).get("reliability", {})
    save_reliability(
        {
            "val, before": reliability.get("val_before"),
            f"val, after (T = {temperature:.3g})": reliability.get("val_after"),
            "test (calibrated)": reliability.get("test"),
        },
        Path(out_dir) / CALIBRATION_PNG,
    )
    figures = metrics.get("answers", {})
    save_risk_coverage(
        {
            name: (figures.get(key) or {}).get("risk_coverage")
            for key, name in (("val", "val"), ("calibration", "calibration part"), ("test", "test"))
        },
        Path(out_dir) / RISK_COVERAGE_PNG,
    )


def attach_test_figures(model_dir: Path, evaluation: Mapping[str, Any]) -> None:
    """Write ``evaluation`` into ``model_dir``'s ``metrics.json``, ``model.json``, answer plots and
    ``MODEL_CARD.md``."""
    from components.model_card import write_model_card

    model_dir = Path(model_dir)
    spec = load_model_spec(model_dir)
    path = model_dir / METRICS_FILE
    metrics = read_json(path) if path.is_file() else {}
    merge_test_figures(metrics, spec, evaluation)
    spec.save(model_dir)
    if "calibration" in metrics or "answers" in metrics:
        save_answer_plots(metrics, spec.answers.temperature, model_dir)
    atomic_write_json(path, metrics)
    write_model_card(model_dir, spec, metrics)


def evaluated_copy(model_dir: Path, evaluation: Mapping[str, Any], dest: Path) -> Path:
    """``model_dir`` copied to ``dest`` with its test figures attached (the original is an input
    artifact: a pipeline step must not change it)."""

    def fill(stage: Path) -> None:
        shutil.copytree(model_dir, stage, dirs_exist_ok=True)
        attach_test_figures(stage, evaluation)

    return atomic_write_dir(Path(dest), fill)
