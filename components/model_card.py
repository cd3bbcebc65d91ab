"""``MODEL_CARD.md`` for an exported model: data, figures, intended use and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.answers import REVIEW_EVERYTHING, every_count_threshold
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
    return (
        "; the hash covers the training and selection images: the model was refit on them"
        if metrics.get("refit")
        else ""
    )


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _coverage(m: dict[str, Any] | None, where: str) -> str:
    if not m or m.get("set_coverage") is None:
        return ""
    lo, hi = m["set_coverage_interval"]
    return (
        f" On {where} ({m['n']} images) the sets hold the true count for {m['set_coverage']:.3f}"
        f" (95% Wilson interval {lo:.3f}-{hi:.3f}), {m['mean_set_size']:.2f} counts on average."
    )


def _review(m: dict[str, Any] | None, where: str) -> str:
    if not m or m.get("accepted_share") is None:
        return ""
    if m["accepted_accuracy"] is None:
        return f" On {where} every answer is flagged."
    return (
        f" On {where}, {m['needs_review_share']:.1%} are flagged and the accepted {m['accepted_share']:.1%}"
        f" are {m['accepted_accuracy']:.3f} accurate."
    )


def _answers(spec: ModelSpec, metrics: dict[str, Any]) -> str:
    """The answers section: temperature, ECE before and after, count sets, review, risk-coverage."""
    a, cal, ans = spec.answers, metrics.get("calibration") or {}, metrics.get("answers") or {}
    if not cal:
        return ""
    lines = ["## Answers: confidence, count sets, review"]
    if a.distribution:
        val = cal.get("val") or {}
        text = (
            f"Probabilities come from the logits divided by a temperature T = {a.temperature:.3f}, fitted"
            f" by log-likelihood on the validation selection part; the count does not depend on it."
            f" Expected calibration error of `confidence` (the returned count's probability) there:"
            f" {_f(val.get('ece_before'))} before, {_f(val.get('ece_after'))} after"
        )
        test = cal.get("test") or {}
        if test.get("ece_after") is not None:
            before = f"{_f(test.get('ece_before'))} before, " if test.get("ece_before") is not None else ""
            text += f"; on test {before}{_f(test['ece_after'])} after"
        lines.append(text + ".")
    else:
        lines.append(
            "The regression head has no distribution: no temperature and no `confidence`; the certainty of"
            " an answer is how far its expected count lies from the nearest rounding cut."
        )
    if a.set_threshold is None:
        lines.append(
            "No calibration split (`--calib-frac 0`): answers carry no `count_set` and no `needs_review`."
        )
    else:
        threshold = (
            "too few calibration images for this coverage: every set is every count"
            if a.set_threshold == every_count_threshold(spec.classes)
            else f"threshold {a.set_threshold:.4g}"
        )
        lines.append(
            f"`count_set` is a range of counts meant to hold the true count for {a.coverage:.0%} of images"
            f" (split-conformal on {a.calibration_images} calibration images held out of every other"
            f" choice; {threshold}).{_coverage(ans.get('calibration'), 'those images')}"
            f"{_coverage(ans.get('test'), 'test')}"
        )
        review = (
            "flags every answer: no certainty threshold reached"
            if a.review_threshold == REVIEW_EVERYTHING
            else f"flags answers whose certainty is below {a.review_threshold:.4g}, fitted so that the"
            " accepted answers reach"
        )
        lines.append(
            f"`needs_review` {review} {a.review_accuracy:.0%} accuracy on the calibration images."
            f"{_review(ans.get('calibration'), 'those images')}{_review(ans.get('test'), 'test')}"
        )
    at50 = [
        f"{name} {m['accuracy_at_50']:.3f}"
        for name, m in (("validation", ans.get("val")), ("test", ans.get("test")))
        if m and m.get("accuracy_at_50") is not None
    ]
    if at50:
        lines.append(f"Accuracy of the 50% most certain answers: {', '.join(at50)}.")
    return "\n" + "\n\n".join(lines) + "\n"


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
images, {metrics.get("n_val", "?")} validation images for selection, {metrics.get("n_calibration", 0)} for
calibration{_refit_data(metrics)}).
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
{_answers(spec, metrics)}
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
