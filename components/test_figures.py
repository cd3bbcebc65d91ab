"""Put a model's test figures where its readers look: ``metrics.json``, ``model.json``, the model card
(and, through ``model.json``, the store's ``versions.json``).

Training writes them when it is given a test manifest; the pipeline evaluates after training, so its
evaluate step writes them into a copy of the model that challenge and publish then take.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.common import atomic_write_dir, atomic_write_json, read_json
from components.modelspec import load_model_spec

METRICS_FILE = "metrics.json"
#: what metrics.json keeps of an evaluation
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
    "answers",
)
#: what model.json keeps (the figures a consumer shows, with their 95 % intervals)
SUMMARY_KEYS = ("accuracy", "rmse", "mae", "n", "intervals")


def attach_test_figures(model_dir: Path, evaluation: Mapping[str, Any]) -> None:
    """Write ``evaluation`` (a :func:`components.evaluate.evaluate` result) into ``model_dir``'s
    ``metrics.json`` (``test``), ``model.json`` (``metrics.test``) and ``MODEL_CARD.md``."""
    from components.model_card import write_model_card

    model_dir = Path(model_dir)
    spec = load_model_spec(model_dir)
    spec.metrics["test"] = {k: evaluation[k] for k in SUMMARY_KEYS if k in evaluation}
    spec.save(model_dir)
    path = model_dir / METRICS_FILE
    metrics = read_json(path) if path.is_file() else {}
    metrics["test"] = {k: evaluation[k] for k in DETAIL_KEYS if k in evaluation}
    atomic_write_json(path, metrics)
    write_model_card(model_dir, spec, metrics)


def evaluated_copy(model_dir: Path, evaluation: Mapping[str, Any], dest: Path) -> Path:
    """``model_dir`` copied to ``dest`` with its test figures attached (the original is an input
    artifact: a pipeline step must not change it)."""

    def fill(stage: Path) -> None:
        shutil.copytree(model_dir, stage, dirs_exist_ok=True)
        attach_test_figures(stage, evaluation)

    return atomic_write_dir(Path(dest), fill)
