"""``MODEL_CARD.md`` for an exported model: data, figures, intended use and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.common import atomic_write_text
from components.evaluate import interval_text
from components.modelspec import ModelSpec

CARD_FILE = "MODEL_CARD.md"


def _row(name: str, m: dict[str, Any] | None) -> str:
    if not m:
        return f"| {name} | - | - | - | - |"
    figures = " | ".join(interval_text(m, k) for k in ("accuracy", "rmse", "mae"))
    return f"| {name} | {m['n']} | {figures} |"


def _interval_note(metrics: dict[str, Any]) -> str:
    m = next((m for m in (metrics.get("val"), metrics.get("test")) if m and "intervals" in m), None)
    if m is None:
        return ""
    return (
        f" In brackets: {m['intervals']['level']:.0%} bootstrap intervals over the images; two models"
        " whose intervals overlap widely are not ranked by these figures."
    )


def _pretraining(p: dict[str, Any], metrics: dict[str, Any]) -> str:
    pre = metrics.get("pretrain")
    if not pre:
        return ""
    if pre.get("objective") == "contrastive":
        knn, start = pre.get("knn_val_accuracy"), pre.get("knn_val_accuracy_start", float("nan"))
        monitor = (
            f" (k-NN validation accuracy on its features: {start:.3f} at the start, {knn:.3f} at the end)"
            if knn is not None
            else ""
        )
        return (
            f" The backbone was first trained self-supervised (SimCLR, no labels) for {pre.get('epochs')}"
            f" epochs on {pre.get('images')} images: the training images plus any images with other"
            f" counts, never validation or test images{monitor}."
        )
    cap = pre.get("count_cap", p.get("pretrain_count_cap"))
    return (
        f" The backbone was first trained for {pre.get('epochs')} epochs on {pre.get('images')} images: the"
        f" training images plus images with other counts (empty bins, more items; counts above"
        f" {cap} as {cap}), never validation or test images."
    )


def _decision(metrics: dict[str, Any]) -> str:
    d = metrics.get("decision") or {}
    if d.get("rule") != "fitted":
        return ""
    plain = d.get("val_plain") or {"accuracy": float("nan"), "rmse": float("nan")}
    text = (
        f" The count rule's offsets {d.get('offsets')} were fitted on validation for"
        f" {d.get('objective', 'accuracy')} (plain"
        f" rule there: accuracy {plain['accuracy']:.3f}, RMSE {plain['rmse']:.3f}), so the validation"
        " figures below are optimistic"
    )
    test = d.get("test_plain")
    if test:
        text += f"; on test the plain rule scores {test['accuracy']:.3f} accuracy, RMSE {test['rmse']:.3f}"
    paired = d.get("test_paired")
    if paired:
        lo, hi = paired["accuracy_diff_interval"]
        text += (
            f" (the fitted rule's test accuracy minus the plain rule's, on the same images:"
            f" {paired['accuracy_diff']:+.3f}, {paired['level']:.0%} interval {lo:+.3f} to {hi:+.3f})"
        )
    return text + "."


def _refit(metrics: dict[str, Any]) -> str:
    r = metrics.get("refit")
    if not r:
        return ""
    text = (
        f" Validation chose epoch {metrics.get('best_epoch')}; this model is the same recipe trained"
        f" again on the training and validation images ({r.get('images')}) up to that epoch, so the"
        " validation figures below are the selected run's, not this model's"
    )
    sel = r.get("test_selected")
    if sel:
        text += f" (that run scored {sel['accuracy']:.3f} accuracy, RMSE {sel['rmse']:.3f} on test)"
    return text + "."


def _refit_data(metrics: dict[str, Any]) -> str:
    return "; the hash covers both: the model was refit on them" if metrics.get("refit") else ""


def render_model_card(spec: ModelSpec, metrics: dict[str, Any]) -> str:
    """Markdown text; figures come from ``metrics`` (val always, test when it was given)."""
    p = spec.params
    classes = ", ".join(map(str, spec.classes))
    return f"""# {spec.name} {spec.version}

Counts the items in a warehouse bin from one photo: {spec.architecture} with a {spec.head} head over
the counts {classes}, input {spec.preprocess.image_size}x{spec.preprocess.image_size} RGB (the whole
frame resized, never cropped; ImageNet mean/std). Files: `{spec.onnx_file}` (ONNX, dynamic batch;
outputs `probabilities`, `count`, `expected`), `model.pt` (PyTorch state dict), `model.json` (contract).

## Data
Amazon Bin Image Dataset photos with their `EXPECTED_QUANTITY` inventory record as label, restricted to
counts {classes}. Training data SHA-256: `{spec.training_data_sha256}` ({metrics.get("n_train", "?")} training
images, {metrics.get("n_val", "?")} validation images{_refit_data(metrics)}).
The dataset is licensed CC BY-NC-SA 3.0 US
(non-commercial, share-alike); models trained on it inherit those terms.

## Training
Weights: `{p.get("weights")}`; {p.get("epochs")} epochs planned, {metrics.get("epochs_run")} run, best epoch
{metrics.get("best_epoch")} (selected on validation {metrics.get("selection_metric")}; the test set is
never used for selection). Optimizer {p.get("optimizer")}, peak lr {p.get("lr")}, batch {p.get("batch_size")},
augmentation strength {p.get("aug_strength")}, seed {p.get("seed")}.{_pretraining(p, metrics)}\
{_decision(metrics)}{_refit(metrics)}

## Metrics
RMSE and MAE are in items, of the predicted (rounded, clipped) count.{_interval_note(metrics)}

| split | images | accuracy | RMSE | MAE |
| --- | --- | --- | --- | --- |
{_row("validation (selected run)" if metrics.get("refit") else "validation", metrics.get("val"))}
{_row("test", metrics.get("test"))}

## Intended use and limits
Flags bins whose photographed count likely disagrees with the inventory record, for a person to check.
It is not an exact counter: labels are inventory records, not counts made from the photo, so some are
wrong; items hidden under others or by the bin's tape cannot be seen; bins with counts outside
{classes} are out of scope and will be reported as the nearest class. Accuracy on photos from other
cameras, lighting or bin types is unknown.
"""


def write_model_card(model_dir: Path, spec: ModelSpec, metrics: dict[str, Any]) -> Path:
    """Write ``MODEL_CARD.md`` atomically."""
    return atomic_write_text(Path(model_dir) / CARD_FILE, render_model_card(spec, metrics))
