"""Evaluate an exported model on a labelled manifest, through the serving path.

The figures come from the ONNX file run by onnxruntime on inputs made by
:func:`components.preprocess.preprocess_batch`, the same code the server uses, so they are the served
model's figures and not the training framework's. Writes ``metrics.json`` (accuracy, RMSE, MAE,
per-class accuracy, confusion matrix; ``calibration``: ECE, NLL and the reliability bins; ``answers``: the
count sets' coverage, the review flag's share and the accepted answers' accuracy, the risk-coverage
curve), ``confusion_matrix.png``, ``calibration.png``, ``risk_coverage.png`` and ``predictions.csv``.

``python -m components.evaluate --model MODEL_DIR --manifest test.csv --out EVAL_DIR``
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.answers import (
    AnswerSpec,
    accuracy_at_coverage,
    answer,
    certainty,
    class_scores,
    expected_calibration_error,
    negative_log_likelihood,
    reliability,
    risk_coverage_points,
    wilson_interval,
)
from components.common import (
    ConfigError,
    atomic_write_json,
    atomic_write_text,
    format_table,
    run_cli,
)
from components.manifest import load_labelled, read_manifest
from components.modelspec import (
    CALIBRATION_PNG,
    INT8_CHOICES,
    RISK_COVERAGE_PNG,
    choose_onnx_file,
    load_model_spec,
)
from components.preprocess import preprocess_batch

LOG = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS_CSV = "predictions.csv"
INTERVAL_LEVEL = 0.95
INTERVAL_DRAWS = 2000


def count_metrics(
    true_counts: Sequence[int] | np.ndarray,
    pred_counts: Sequence[int] | np.ndarray,
    classes: Sequence[int],
    expected: Sequence[float] | np.ndarray | None = None,
    *,
    intervals: bool = False,
) -> dict[str, Any]:
    """Accuracy, RMSE/MAE (of the predicted count), per-class accuracy and the confusion matrix.

    Rows of ``confusion_matrix`` are true classes, columns predicted, both in ``classes`` order. The
    same function scores validation during training and the exported model here, so the numbers agree.
    ``intervals`` adds :func:`bootstrap_intervals` (for final figures; not needed every epoch).
    """
    y = np.asarray(true_counts, dtype=np.int64)
    p = np.asarray(pred_counts, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D arrays, got {y.shape} and {p.shape}")
    labels = [int(c) for c in classes]
    pos = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, q in zip(y.tolist(), p.tolist(), strict=True):
        if t not in pos or q not in pos:
            raise ValueError(f"count {t if t not in pos else q} is outside the classes {labels}")
        cm[pos[t], pos[q]] += 1
    err = (p - y).astype(np.float64)
    support = cm.sum(axis=1)
    out: dict[str, Any] = {
        "n": len(y),
        "accuracy": float((p == y).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mae": float(np.abs(err).mean()),
        "labels": labels,
        "confusion_matrix": cm.tolist(),
        "per_class_accuracy": {
            str(c): (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(labels)
        },
        "support": {str(c): int(support[i]) for i, c in enumerate(labels)},
        "within_one": float((np.abs(err) <= 1).mean()),
    }
    if expected is not None:
        e = np.asarray(expected, dtype=np.float64) - y
        out["rmse_expected"] = float(np.sqrt((e**2).mean()))
    if intervals:
        out["intervals"] = bootstrap_intervals(cm, labels)
    return out


def bootstrap_intervals(
    confusion_matrix: Sequence[Sequence[int]] | np.ndarray,
    labels: Sequence[int],
    *,
    level: float = INTERVAL_LEVEL,
    draws: int = INTERVAL_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals (images resampled with replacement) for accuracy, RMSE, MAE and
    within-one, from the confusion matrix alone (the four depend only on the (true, predicted) pairs).

    Why: on a test split of ~900 images one model's accuracy is only known to about +-3 points, so two
    figures closer than that do not rank two models. Seeded, so the same matrix gives the same interval.
    """
    cm = np.asarray(confusion_matrix, dtype=np.int64)
    k = len(labels)
    if cm.shape != (k, k) or (cm < 0).any() or cm.sum() == 0:
        raise ValueError(f"need a non-negative {k}x{k} confusion matrix with at least one image")
    values = np.asarray(labels, dtype=np.float64)
    err = (values[None, :] - values[:, None]).ravel()  # predicted - true, per cell
    w = _resampled_weights(cm.ravel(), level, draws, seed)
    figures = {
        "accuracy": w @ (err == 0),
        "rmse": np.sqrt(w @ err**2),
        "mae": w @ np.abs(err),
        "within_one": w @ (np.abs(err) <= 1),
    }
    out: dict[str, Any] = {"level": level, "draws": draws, "method": "percentile bootstrap over images"}
    return out | {name: _percentile_interval(v, level) for name, v in figures.items()}


def _resampled_weights(counts: np.ndarray, level: float, draws: int, seed: int) -> np.ndarray:
    """``draws`` bootstrap resamples of images that fall into kinds with these ``counts``, as the
    share of each kind per resample (draws x kinds): resampling kinds, not images, keeps memory
    independent of the number of images."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if draws < 100:
        raise ValueError(f"draws must be >= 100 for a percentile interval, got {draws}")
    n = int(counts.sum())
    return np.random.default_rng(seed).multinomial(n, counts / n, size=draws) / n


def _percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(samples, [tail, 100 - tail])]


def paired_difference(
    true_counts: Sequence[int] | np.ndarray,
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    *,
    level: float = INTERVAL_LEVEL,
    draws: int = INTERVAL_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """How much better model B is than model A on the same images: B - A for accuracy and RMSE, with
    paired bootstrap intervals (both models scored on each resample), and McNemar's exact two-sided
    p-value for the accuracy difference.

    Why paired: two models on one test split err on many of the same images, so the interval of their
    difference is much narrower than the two separate intervals suggest.
    """
    y = np.asarray(true_counts, dtype=np.int64)
    a = np.asarray(pred_a, dtype=np.int64)
    b = np.asarray(pred_b, dtype=np.int64)
    if not (y.shape == a.shape == b.shape) or y.ndim != 1 or len(y) == 0:
        raise ValueError(
            f"need three equal-length, non-empty 1-D arrays, got {y.shape}, {a.shape}, {b.shape}"
        )
    ok_a, ok_b = (a == y).astype(np.float64), (b == y).astype(np.float64)
    se_a, se_b = ((a - y) ** 2).astype(np.float64), ((b - y) ** 2).astype(np.float64)
    # Images with the same (right?, right?, error^2, error^2) are interchangeable: resampling the
    # counts of these few kinds is the image bootstrap.
    kinds, counts = np.unique(np.stack([ok_a, ok_b, se_a, se_b], axis=1), axis=0, return_counts=True)
    w = _resampled_weights(counts, level, draws, seed)
    d_acc = w @ kinds[:, 1] - w @ kinds[:, 0]
    d_rmse = np.sqrt(w @ kinds[:, 3]) - np.sqrt(w @ kinds[:, 2])
    only_a, only_b = int(((ok_a == 1) & (ok_b == 0)).sum()), int(((ok_b == 1) & (ok_a == 0)).sum())
    return {
        "n": len(y),
        "level": level,
        "draws": draws,
        "accuracy_diff": float(ok_b.mean() - ok_a.mean()),
        "accuracy_diff_interval": _percentile_interval(d_acc, level),
        "rmse_diff": float(np.sqrt(se_b.mean()) - np.sqrt(se_a.mean())),
        "rmse_diff_interval": _percentile_interval(d_rmse, level),
        "only_a_right": only_a,
        "only_b_right": only_b,
        "mcnemar_p": mcnemar_exact_p(only_a, only_b),
    }


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the chance of a split of the discordant images at least this
    uneven if both models were equally good (a fair coin over ``only_a + only_b`` images)."""
    if only_a < 0 or only_b < 0:
        raise ValueError("counts of discordant images must be >= 0")
    m, k = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0
    # binomial(m, 1/2) lower tail up to k, in log space so that large m neither overflows nor crawls
    log_terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top - m * math.log(2)) * math.fsum(math.exp(t - top) for t in log_terms)
    return float(min(1.0, 2 * tail))


def calibration_metrics(
    outputs: dict[str, np.ndarray],
    true_counts: Sequence[int] | np.ndarray,
    classes: Sequence[int],
    distribution: bool,
) -> dict[str, Any]:
    """How well the confidence (the probability of the returned count) matches the accuracy: ECE (15
    bins), NLL of the true count and the reliability bins, from the graph's outputs in count units
    (``probabilities``, ``count``); None for a head without a distribution (regression)."""
    y = np.asarray(true_counts, dtype=np.int64)
    if not distribution:
        return {"n": len(y), "ece": None, "nll": None, "reliability": None}
    c0 = int(classes[0])
    probs = np.asarray(outputs["probabilities"], dtype=np.float64)
    index = np.asarray(outputs["count"], dtype=np.int64) - c0
    conf = probs[np.arange(len(y)), index]
    correct = index == y - c0
    return {
        "n": len(y),
        "ece": expected_calibration_error(conf, correct),
        "nll": negative_log_likelihood(probs, y - c0),
        "reliability": reliability(conf, correct),
    }


def answer_metrics(
    outputs: dict[str, np.ndarray],
    true_counts: Sequence[int] | np.ndarray,
    classes: Sequence[int],
    spec: AnswerSpec,
) -> dict[str, Any]:
    """What the answers' extra fields are worth on labelled images, from the graph's outputs in count
    units (``probabilities``, ``count``, ``expected``) and ``model.json``'s answers (:func:`answer`):
    the count sets' coverage (95 % Wilson interval) and mean size, the share flagged needs_review and
    the accuracy of the rest, the risk-coverage curve (accuracy of the most certain answers) and the
    accuracy at half coverage. Set and review figures are None when the model has no such threshold."""
    y = np.asarray(true_counts, dtype=np.int64)
    n = len(y)
    counts = np.asarray(outputs["count"], dtype=np.int64)
    fields = answer(outputs["probabilities"], counts, outputs["expected"], classes, spec)
    correct = counts == y
    scores = class_scores(outputs["probabilities"], outputs["expected"], classes, spec.distribution)
    cert = certainty(scores, counts - int(classes[0]), spec.distribution, outputs["expected"], classes)
    out: dict[str, Any] = {
        "n": n,
        "coverage_target": spec.coverage,
        "set_coverage": None,
        "set_coverage_interval": None,
        "mean_set_size": None,
        "review_accuracy_target": spec.review_accuracy,
        "needs_review_share": None,
        "accepted_share": None,
        "accepted_accuracy": None,
        "accuracy": float(correct.mean()) if n else None,
        "risk_coverage": risk_coverage_points(cert, correct),
        "accuracy_at_50": accuracy_at_coverage(cert, correct, 0.5) if n else None,
    }
    if fields.count_set is not None and n:
        covered = sum(s[0] <= t <= s[-1] for s, t in zip(fields.count_set, y.tolist(), strict=True))
        out["set_coverage"] = covered / n
        out["set_coverage_interval"] = list(wilson_interval(covered, n))
        out["mean_set_size"] = float(np.mean([len(s) for s in fields.count_set]))
    if fields.needs_review is not None and n:
        accepted = ~fields.needs_review
        out["needs_review_share"] = float(fields.needs_review.mean())
        out["accepted_share"] = float(accepted.mean())
        out["accepted_accuracy"] = float(correct[accepted].mean()) if accepted.any() else None
    return out


def range_text(interval: Sequence[float], digits: int = 4) -> str:
    """``"0.3980-0.4640"``: an interval as tables and reports print it."""
    return f"{interval[0]:.{digits}f}-{interval[1]:.{digits}f}"


def difference_text(value: float, interval: Sequence[float], digits: int = 4) -> str:
    """``"+0.0308 (-0.0035 to +0.0628)"``: a difference and its interval, whose ends may have either sign."""
    return f"{value:+.{digits}f} ({interval[0]:+.{digits}f} to {interval[1]:+.{digits}f})"


def majority_baseline(train_counts: Sequence[int], test_counts: Sequence[int]) -> dict[str, Any]:
    """The majority-class baseline: the accuracy on ``test_counts`` of always answering the count that
    is most frequent in ``train_counts`` (the smallest such count on a tie, so it is deterministic).

    Why: it is what a model that learnt nothing about the images scores on this test split, so a gate
    relative to it means the same on any subset, where an absolute accuracy does not. A majority count
    absent from the test split gives 0.
    """
    train = Counter(int(c) for c in train_counts)
    test = [int(c) for c in test_counts]
    if not train or not test:
        raise ValueError(f"need non-empty train and test counts, got {sum(train.values())} and {len(test)}")
    majority = min(train, key=lambda c: (-train[c], c))
    return {
        "count": majority,
        "accuracy": sum(c == majority for c in test) / len(test),
        "n_train": sum(train.values()),
        "n_test": len(test),
    }


@dataclass(frozen=True)
class AccuracyGate:
    """The publish gate: test accuracy must reach the majority-class baseline plus ``margin``."""

    accuracy: float
    baseline: float
    margin: float

    @property
    def required(self) -> float:
        return self.baseline + self.margin

    @property
    def passed(self) -> bool:
        # a difference below 1e-9 is float rounding, not an image: 0.2 + 0.05 must admit 0.25
        return self.accuracy >= self.required - 1e-9

    def reason(self) -> str:
        """``"test accuracy 0.213 < majority baseline 0.224 + margin 0.05 = 0.274"``."""
        if self.margin <= -1.0:  # every accuracy passes: say so rather than print a negative bar
            return (
                f"no accuracy gate (accuracy_margin {self.margin:g}): test accuracy {self.accuracy:.3f}, "
                f"majority baseline {self.baseline:.3f}"
            )
        return (
            f"test accuracy {self.accuracy:.3f} {'>=' if self.passed else '<'} majority baseline "
            f"{self.baseline:.3f} + margin {self.margin:g} = {self.required:.3f}"
        )


def interval_text(m: dict[str, Any], key: str, digits: int = 3) -> str:
    """``"0.431 (0.398-0.464)"``: a figure with its interval when ``m`` has one."""
    text = f"{m[key]:.{digits}f}"
    iv = (m.get("intervals") or {}).get(key)
    return f"{text} ({range_text(iv, digits)})" if iv else text


def predict_onnx(
    model_dir: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str] | bytes],
    *,
    batch_size: int = 64,
    num_threads: int | None = None,
    progress: bool = True,
    int8: str = "auto",
) -> dict[str, np.ndarray]:
    """Run the exported model on images (paths or bytes) the way the server does."""
    import onnxruntime as ort
    from tqdm.auto import tqdm

    spec = load_model_spec(model_dir)
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = num_threads
    sess = ort.InferenceSession(
        str(choose_onnx_file(model_dir, spec, int8)), opts, providers=["CPUExecutionProvider"]
    )
    outs: dict[str, list[np.ndarray]] = {n: [] for n in spec.output_names}
    for start in tqdm(range(0, len(paths), batch_size), desc="evaluate", disable=not progress, leave=False):
        x = preprocess_batch(list(paths[start : start + batch_size]), spec.preprocess)
        for name, value in zip(
            spec.output_names, sess.run(list(spec.output_names), {spec.input_name: x}), strict=True
        ):
            outs[name].append(value)
    return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate(
    model_dir: Path,
    manifest: Path,
    out_dir: Path,
    *,
    data_root: Path | None = None,
    batch_size: int = 64,
    num_threads: int | None = None,
    progress: bool = True,
    int8: str = "auto",
    train_manifest: Path | None = None,
) -> dict[str, Any]:
    """Score the exported model on ``manifest``; writes metrics.json, confusion_matrix.png, predictions.

    With ``train_manifest`` (the split the model was trained on) ``majority_baseline`` records the
    accuracy of always answering its most frequent count on these images (:func:`majority_baseline`).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    spec = load_model_spec(model_dir)
    rows, paths = load_labelled(manifest, data_root)
    outside = sorted({r.count for r in rows} - set(spec.classes))
    if outside:
        raise ConfigError(
            f"{manifest} has counts {outside} that the model cannot predict (classes {list(spec.classes)}); "
            "filter the manifest to the model's classes"
        )
    onnx_file = choose_onnx_file(model_dir, spec, int8)
    pred = predict_onnx(
        model_dir, paths, batch_size=batch_size, num_threads=num_threads, progress=progress, int8=int8
    )
    true = [r.count for r in rows]
    metrics = count_metrics(true, pred["count"], spec.classes, pred["expected"], intervals=True)
    if train_manifest is not None:
        train_rows = read_manifest(train_manifest)
        if not train_rows:
            raise ConfigError(f"--train-manifest {train_manifest} has no rows: the baseline needs its counts")
        baseline = majority_baseline([r.count for r in train_rows], true)
        metrics["majority_baseline"] = baseline | {"train_manifest": str(train_manifest)}
    answers = spec.answers
    metrics["calibration"] = {
        "temperature": answers.temperature,
        **calibration_metrics(pred, true, spec.classes, answers.distribution),
    }
    metrics["answers"] = answer_metrics(pred, true, spec.classes, answers)
    metrics.update(
        {
            "model": spec.name,
            "model_version": spec.version,
            "manifest": str(manifest),
            "onnx_file": onnx_file.name,
        }
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions(out_dir / PREDICTIONS_CSV, rows, pred, spec.classes, answers)
    from components.plots import save_confusion_matrix, save_reliability, save_risk_coverage

    name = Path(manifest).name
    save_confusion_matrix(
        metrics["confusion_matrix"],
        metrics["labels"],
        out_dir / CONFUSION_PNG,
        title=f"{spec.name} on {name}: accuracy {metrics['accuracy']:.3f}",
    )
    save_reliability({name: metrics["calibration"]["reliability"]}, out_dir / CALIBRATION_PNG)
    save_risk_coverage({name: metrics["answers"]["risk_coverage"]}, out_dir / RISK_COVERAGE_PNG)
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def _write_predictions(
    path: Path, rows: Sequence[Any], pred: dict[str, np.ndarray], classes: Sequence[int], spec: AnswerSpec
) -> None:
    """``id,true,pred,expected`` per image, then what the answer adds where the model has it:
    ``confidence`` (distribution heads), ``count_set`` (``first-last``), ``needs_review``."""
    fields = answer(pred["probabilities"], pred["count"], pred["expected"], classes, spec)
    header = ["id", "true", "pred", "expected"]
    header += ["confidence"] * (fields.confidence is not None) + ["count_set"] * (
        fields.count_set is not None
    )
    header += ["needs_review"] * (fields.needs_review is not None)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, (r, c, e) in enumerate(zip(rows, pred["count"].tolist(), pred["expected"].tolist(), strict=True)):
        line = [r.id, r.count, c, f"{e:.4f}"]
        if fields.confidence is not None:
            line.append(f"{fields.confidence[i]:.4f}")
        if fields.count_set is not None:
            line.append(f"{fields.count_set[i][0]}-{fields.count_set[i][-1]}")
        if fields.needs_review is not None:
            line.append(str(bool(fields.needs_review[i])).lower())
        writer.writerow(line)
    atomic_write_text(path, buf.getvalue())


def load_predictions(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The image ids, true counts and predicted counts of a ``predictions.csv`` written by
    :func:`evaluate`, in its order: what a paired comparison of two evaluated models needs."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return (
            [r["id"] for r in rows],
            np.asarray([int(r["true"]) for r in rows], dtype=np.int64),
            np.asarray([int(r["pred"]) for r in rows], dtype=np.int64),
        )
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{path} is not a predictions file of components.evaluate: {e}") from e


def answer_rows(m: dict[str, Any]) -> list[list[Any]]:
    """Table rows (name, value, interval) of an evaluation's calibration and answer figures."""
    cal, ans = m.get("calibration") or {}, m.get("answers") or {}
    rows: list[list[Any]] = []
    if cal.get("ece") is not None:
        rows.append(["ECE (T = {:.3g})".format(cal["temperature"]), cal["ece"], ""])
    if ans.get("set_coverage") is not None:
        rows.append(
            [
                f"count_set coverage (target {ans['coverage_target']:g})",
                ans["set_coverage"],
                range_text(ans["set_coverage_interval"]),
            ]
        )
        rows.append(["count_set mean size", ans["mean_set_size"], ""])
    if ans.get("needs_review_share") is not None:
        rows.append(["needs_review share", ans["needs_review_share"], ""])
        accepted = ans["accepted_accuracy"]
        rows.append(
            [
                f"accepted accuracy (target {ans['review_accuracy_target']:g})",
                "-" if accepted is None else accepted,
                "",
            ]
        )
    if ans.get("accuracy_at_50") is not None:
        rows.append(["accuracy at 50% coverage", ans["accuracy_at_50"], ""])
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="exported model directory (model.json)")
    p.add_argument("--manifest", required=True, type=Path, help="labelled manifest CSV, e.g. test.csv")
    p.add_argument("--out", required=True, type=Path, help="output directory for metrics.json and plots")
    p.add_argument("--data-root", type=Path, default=None, help="directory the manifest paths are under")
    p.add_argument(
        "--train-manifest",
        type=Path,
        default=None,
        help="the model's training manifest, e.g. train.csv: also report the majority-class baseline "
        "(always answering its most frequent count) on --manifest",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument(
        "--int8",
        choices=INT8_CHOICES,
        default="auto",
        help="which model to score, as the server picks it (auto: int8 when it passed the gate)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _run(args: argparse.Namespace) -> int:
    m = evaluate(
        args.model,
        args.manifest,
        args.out,
        data_root=args.data_root,
        batch_size=args.batch_size,
        num_threads=args.num_threads,
        int8=args.int8,
        train_manifest=args.train_manifest,
    )
    level = f"{m['intervals']['level']:.0%} interval"
    rows = [["n", m["n"], ""]]
    rows += [[k, m[k], range_text(m["intervals"][k])] for k in ("accuracy", "rmse", "mae", "within_one")]
    if "majority_baseline" in m:
        base = m["majority_baseline"]
        rows.append(["majority baseline", base["accuracy"], f"(always {base['count']})"])
    rows += answer_rows(m)
    print(format_table(rows, ["metric", "value", level]))
    print(
        format_table(
            [[c, m["support"][c], m["per_class_accuracy"][c]] for c in m["per_class_accuracy"]],
            ["class", "n", "accuracy"],
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints a summary table, exits 2 on configuration errors."""
    return run_cli(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
