"""What an answer says beyond the count: how sure it is, which counts it may be, and whether a person
should look. Torch-free, so training fits, evaluation scores and the server answers with the same code.

* ``confidence``: the calibrated probability of the returned count (distribution heads only: the
  regression head's "probabilities" are a kernel around one number, so it has none).
* ``count_set``: a contiguous range of counts that holds the true count with a chosen probability
  (split-conformal: the threshold is fitted on a calibration split that model selection never saw).
* ``needs_review``: the answer's certainty is below a threshold fitted so that the answers not sent to
  review reach a target accuracy.

Per-class scores are the probabilities (distribution heads) or, for regression, minus the distance of
each count to the expected count. A count set at threshold ``t`` is the smallest range holding every
count whose score is at least ``t``; the true count ``y`` is inside it exactly when
``min(max score at or below y, max score at or above y) >= t``, which is the conformity score (when no
count reaches ``t`` the set is the best-scored count alone, which can only add coverage).

``model.json`` holds finite thresholds only (strict JSON has no infinity): :func:`fit_answer_spec`
stores "every count" as :func:`every_count_threshold` and "review every answer" as
:data:`REVIEW_EVERYTHING`, which act exactly as ``-inf`` and ``inf`` do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.common import ConfigError

#: the fewest answers the review threshold may keep: a handful of lucky answers prove nothing
MIN_ACCEPTED = 20
#: a review threshold above every certainty (at most 1): every answer needs review
REVIEW_EVERYTHING = 2.0
#: the chance the review threshold is allowed to promise an accuracy new images do not reach
REVIEW_RISK = 0.05
#: points of the compact risk-coverage curve in reports (shares 1/20, 2/20, ..., 1)
CURVE_POINTS = 20


@dataclass(frozen=True)
class AnswerSpec:
    """What ``model.json`` says about the answers (``answers``); defaults = not calibrated."""

    #: divides the head's logits inside the exported graph before its probabilities (1 = none)
    temperature: float = 1.0
    #: the probabilities are a distribution (classification, ordinal), so a confidence can be given
    distribution: bool = True
    #: target coverage of ``count_set`` (None: no set)
    coverage: float | None = None
    #: per-class score threshold of ``count_set``
    set_threshold: float | None = None
    #: target accuracy of the answers not sent to review (None: no review flag)
    review_accuracy: float | None = None
    #: certainty below which ``needs_review`` is true
    review_threshold: float | None = None
    #: images of the calibration split the two thresholds were fitted on
    calibration_images: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"answers.temperature must be > 0, got {self.temperature}")
        if self.coverage is not None and not 0 < self.coverage < 1:
            raise ConfigError(f"answers.coverage must be in (0, 1), got {self.coverage}")
        if (self.coverage is None) != (self.set_threshold is None):
            raise ConfigError("answers.coverage and answers.set_threshold go together")
        if (self.review_accuracy is None) != (self.review_threshold is None):
            raise ConfigError("answers.review_accuracy and answers.review_threshold go together")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AnswerSpec:
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def class_scores(
    probabilities: np.ndarray, expected: np.ndarray, classes: Sequence[int], distribution: bool
) -> np.ndarray:
    """``[N, C]`` per-class scores: probabilities, or minus the distance to the expected count."""
    if distribution:
        return np.asarray(probabilities, dtype=np.float64)
    counts = np.asarray(classes, dtype=np.float64)
    return -np.abs(np.asarray(expected, dtype=np.float64)[:, None] - counts[None, :])


def certainty(
    scores: np.ndarray,
    index: np.ndarray,
    distribution: bool,
    expected: np.ndarray | None = None,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """``[N]``: the probability of the returned count, or (regression) how far the expected count is
    from the nearest rounding cut (0 at a cut, 0.5 on a count)."""
    index = np.asarray(index, dtype=np.int64)
    if distribution:
        return scores[np.arange(len(index)), index]
    if expected is None or classes is None:
        raise ValueError("the regression certainty needs the expected counts and the classes")
    returned = np.asarray(classes, dtype=np.float64)[index]
    return 0.5 - np.minimum(np.abs(np.asarray(expected, dtype=np.float64) - returned), 0.5)


def conformity(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[N]``: the largest threshold whose count set still holds the true class index."""
    labels = np.asarray(labels, dtype=np.int64)
    below = np.maximum.accumulate(scores, axis=1)  # max score at or below each index
    above = np.maximum.accumulate(scores[:, ::-1], axis=1)[:, ::-1]  # max score at or above
    rows = np.arange(len(labels))
    return np.minimum(below[rows, labels], above[rows, labels])


def fit_set_threshold(scores: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Split-conformal threshold: sets hold the true count with probability >= ``coverage`` on data
    exchangeable with the calibration images (``-inf``: too few images, every set is every count)."""
    if not 0 < coverage < 1:
        raise ConfigError(f"coverage must be in (0, 1), got {coverage}")
    conf = np.sort(conformity(scores, labels))
    k = math.floor((1 - coverage) * (len(conf) + 1))
    return float(conf[k - 1]) if k >= 1 else -math.inf


def count_sets(scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Per image the ``(first, last)`` class index of its set: the range of every class scoring at least
    ``threshold`` (the best-scored class alone when none does)."""
    out = []
    for row in scores:
        members = np.flatnonzero(row >= threshold)
        if members.size == 0:
            best = int(row.argmax())
            out.append((best, best))
        else:
            out.append((int(members[0]), int(members[-1])))
    return out


def binomial_tail(successes: int, n: int, p: float) -> float:
    """``P(X >= successes)`` for ``X ~ Binomial(n, p)``: how likely this many right answers are if the
    true accuracy were only ``p``."""
    if successes <= 0 or p >= 1:
        return 1.0
    if successes > n or p <= 0:
        return 0.0
    logs = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
        for k in range(successes, n + 1)
    ]
    top = max(logs)
    return float(min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs)))


def fit_review_threshold(
    cert: np.ndarray, correct: np.ndarray, target: float, *, risk: float = REVIEW_RISK
) -> float:
    """The lowest certainty threshold whose kept answers (certainty >= it) are shown, at confidence
    ``1 - risk``, to be at least ``target`` accurate on new images (``inf``: none is, review everything).

    Thresholds are tried from the most certain answers down, each one's accuracy tested against
    ``target`` with an exact binomial test on the calibration answers it keeps; the first that fails ends
    the search (fixed-sequence testing, as in Learn-then-Test: no correction for the many thresholds is
    needed). A point estimate instead would pick a threshold that 20 lucky answers pass and new images
    do not (measured: 81 % on calibration, 58 % on test). At least :data:`MIN_ACCEPTED` answers are kept.
    """
    if not 0 < target <= 1:
        raise ConfigError(f"review accuracy must be in (0, 1], got {target}")
    if len(cert) == 0:
        return math.inf
    order = np.argsort(-np.asarray(cert), kind="stable")
    c, ok = np.asarray(cert)[order], np.asarray(correct, dtype=np.int64)[order]
    right = np.cumsum(ok)
    # the sequence starts where a test can pass at all (all m right: target**m <= risk), so that a few
    # top answers too few to show anything do not end it; this depends on target and risk, not the data
    start = max(MIN_ACCEPTED, math.ceil(math.log(risk) / math.log(target)) if target < 1 else len(c))
    best = math.inf
    for m in range(min(start, len(c)), len(c) + 1):
        # a threshold keeps every tie of its last answer: only places where the certainty drops count
        if m < len(c) and c[m] >= c[m - 1]:
            continue
        if binomial_tail(int(right[m - 1]), m, target) > risk:
            break
        best = float(c[m - 1])
    return best


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE over ``bins`` equal-width confidence bins (the usual 15)."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(total)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin: mean confidence, accuracy, share of images (the reliability diagram)."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "confidence": float(conf[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "share": float((which == b).mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def risk_coverage(cert: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share answered, accuracy of those) when answering the most certain first."""
    order = np.argsort(-np.asarray(cert), kind="stable")
    ok = np.asarray(correct, dtype=np.float64)[order]
    n = np.arange(1, len(ok) + 1)
    return n / len(ok), np.cumsum(ok) / n


def accuracy_at_coverage(cert: np.ndarray, correct: np.ndarray, share: float = 0.5) -> float:
    """Accuracy of the ``share`` most certain answers."""
    shares, accuracy = risk_coverage(cert, correct)
    return float(accuracy[max(0, math.ceil(share * len(shares)) - 1)])


def risk_coverage_points(
    cert: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS
) -> list[list[float]]:
    """The risk-coverage curve at ``points`` evenly spaced shares: ``[[share, accuracy], ...]``."""
    if len(cert) == 0:
        return []
    return [[k / points, accuracy_at_coverage(cert, correct, k / points)] for k in range(1, points + 1)]


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, floor: float = 1e-12) -> float:
    """Mean ``-log p(true class)`` (probabilities floored at ``floor``: a zero is not an infinite loss)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.log(np.maximum(p[np.arange(len(labels)), labels], floor)).mean())


def every_count_threshold(classes: Sequence[int]) -> float:
    """A set threshold at or below every class score (probabilities >= 0, regression scores >=
    ``-(C - 1)``): every set is every count, as ``-inf`` would make it."""
    return -float(len(classes))


def fit_answer_spec(
    probabilities: np.ndarray,
    counts: np.ndarray,
    expected: np.ndarray,
    true_counts: np.ndarray,
    classes: Sequence[int],
    *,
    temperature: float,
    distribution: bool,
    coverage: float,
    review_accuracy: float,
) -> AnswerSpec:
    """The answers of ``model.json`` fitted on a calibration split from the graph's (calibrated) outputs
    in count units, as :func:`answer` reads them: the count-set threshold for ``coverage`` and the review
    threshold for ``review_accuracy``, both finite (see the module's note)."""
    y = np.asarray(true_counts, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("the answers need at least one calibration image")
    c0 = int(classes[0])
    index = np.asarray(counts, dtype=np.int64) - c0
    scores = class_scores(probabilities, expected, classes, distribution)
    cert = certainty(scores, index, distribution, expected, classes)
    set_threshold = fit_set_threshold(scores, y - c0, coverage)
    review = fit_review_threshold(cert, index == y - c0, review_accuracy)
    return AnswerSpec(
        temperature=float(temperature),
        distribution=distribution,
        coverage=coverage,
        set_threshold=set_threshold if math.isfinite(set_threshold) else every_count_threshold(classes),
        review_accuracy=review_accuracy,
        review_threshold=review if math.isfinite(review) else REVIEW_EVERYTHING,
        calibration_images=len(y),
    )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of a proportion (Wilson score), for coverage figures."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Answers:
    """Per image: the fields an answer carries besides the count and its probabilities."""

    confidence: np.ndarray | None
    count_set: list[list[int]] | None
    needs_review: np.ndarray | None


def answer(
    probabilities: np.ndarray,
    counts: np.ndarray,
    expected: np.ndarray,
    classes: Sequence[int],
    spec: AnswerSpec,
) -> Answers:
    """The answer fields of a batch from the graph's three outputs (counts and expected counts in
    count units, as the graph gives them)."""
    index = np.asarray(counts, dtype=np.int64) - int(classes[0])
    scores = class_scores(probabilities, expected, classes, spec.distribution)
    cert = certainty(scores, index, spec.distribution, expected, classes)
    sets = None
    if spec.set_threshold is not None:
        sets = [list(classes[a : b + 1]) for a, b in count_sets(scores, spec.set_threshold)]
    review = None if spec.review_threshold is None else cert < spec.review_threshold
    return Answers(confidence=cert if spec.distribution else None, count_set=sets, needs_review=review)
