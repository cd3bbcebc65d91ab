"""Calibrated answers: the math of components.answers on synthetic data, the temperature fit, the
validation split, and tiny training runs (32 px, 1 epoch, CPU) that fit and export them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from components.answers import (
    MIN_ACCEPTED,
    REVIEW_EVERYTHING,
    REVIEW_RISK,
    AnswerSpec,
    answer,
    binomial_tail,
    conformity,
    count_sets,
    every_count_threshold,
    expected_calibration_error,
    fit_answer_spec,
    fit_review_threshold,
    fit_set_threshold,
    risk_coverage_points,
)
from components.common import ConfigError
from components.evaluate import answer_metrics
from components.manifest import load_labelled, read_manifest
from components.model import ExportWrapper, build_model, decision_size, decode_outputs
from components.modelspec import load_model_spec
from components.preprocess import preprocess_batch
from components.training.calibration import fit_temperature, graph_outputs
from components.training.splits import calibration_split
from tests.fixtures.models import tiny_train_config

CLASSES = (1, 2, 3, 4, 5)


def _noisy_distributions(n: int, seed: int, sharpness: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` probability rows over 5 classes peaked near a noisy reading of the true class, and the
    true class indices: exchangeable images of a moderately good counter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=n)
    reading = y + rng.normal(0, 0.9, size=n)
    logits = -sharpness * (reading[:, None] - np.arange(5)[None, :]) ** 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


@pytest.mark.parametrize(("n", "coverage"), [(99, 0.9), (50, 0.8), (200, 0.95), (30, 0.5)])
def test_conformal_count_sets_cover_at_least_the_target_on_exchangeable_data(n: int, coverage: float) -> None:
    # The exact finite-sample statement: among n+1 exchangeable images, holding out each in turn and
    # fitting on the other n, the held-out image's set holds its true count for >= coverage of them.
    p, y = _noisy_distributions(n + 1, seed=n)
    held, reached = 0, 0
    for i in range(n + 1):
        rest = np.arange(n + 1) != i
        t = fit_set_threshold(p[rest], y[rest], coverage)
        [(lo, hi)] = count_sets(p[i : i + 1], t)
        held += lo <= y[i] <= hi
        reached += conformity(p[i : i + 1], y[i : i + 1])[0] >= t
    assert held / (n + 1) >= coverage
    # not trivially: the threshold is the tightest valid one (the sets' fallback to the best count when
    # no count reaches the threshold can only add to ``held``)
    assert coverage <= reached / (n + 1) <= coverage + 1 / (n + 1) + 1e-9


def test_conformal_coverage_holds_on_new_images_and_sets_shrink_with_a_better_model() -> None:
    p_cal, y_cal = _noisy_distributions(2000, seed=1)
    p_new, y_new = _noisy_distributions(20000, seed=2)
    t = fit_set_threshold(p_cal, y_cal, 0.9)
    sets = count_sets(p_new, t)
    covered = np.mean([lo <= y <= hi for (lo, hi), y in zip(sets, y_new, strict=True)])
    assert 0.9 - 0.015 <= covered <= 0.9 + 0.03
    size = np.mean([hi - lo + 1 for lo, hi in sets])
    assert 1 < size < 5
    # too few images for the coverage: every set is every count
    assert fit_set_threshold(p_cal[:5], y_cal[:5], 0.9) == -math.inf


def test_contiguous_sets_hold_the_true_count_iff_its_conformity_reaches_the_threshold() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((3000, 6)) ** 3  # any shape, multimodal rows included
    labels = rng.integers(0, 6, size=3000)
    conf = conformity(scores, labels)
    for t in (0.05, 0.2, 0.5, 0.8):
        sets = count_sets(scores, t)
        reached = scores.max(1) >= t
        for row, (lo, hi), y, c, r in zip(scores, sets, labels, conf, reached, strict=True):
            if r:  # the smallest range of every class scoring >= t: its ends score >= t
                assert row[lo] >= t and row[hi] >= t
                assert not (row[:lo] >= t).any() and not (row[hi + 1 :] >= t).any()
                assert (lo <= y <= hi) == (c >= t)
            else:  # no class reaches t: the best-scored class alone
                assert lo == hi == int(row.argmax())
        assert 0 < reached.mean() <= 1


def test_review_threshold_keeps_only_answers_shown_to_reach_the_target() -> None:
    rng = np.random.default_rng(3)
    cert = np.round(rng.random(1000), 2)  # ties, as probabilities have them
    correct = rng.random(1000) < cert**0.7
    for target in (0.6, 0.8):
        t = fit_review_threshold(cert, correct, target)
        kept = cert >= t
        assert kept.sum() >= MIN_ACCEPTED and correct[kept].mean() >= target
        # shown at 95 %: this many right answers would be unlikely at an accuracy of only `target`
        assert binomial_tail(int(correct[kept].sum()), int(kept.sum()), target) <= REVIEW_RISK
        # and the next threshold down is not (the search stops at the first that fails)
        lower = np.unique(cert[cert < t])
        if lower.size:
            nxt = cert >= lower[-1]
            assert binomial_tail(int(correct[nxt].sum()), int(nxt.sum()), target) > REVIEW_RISK
    assert correct.mean() < 0.8  # so the review flag does work here
    # a target no threshold reaches sends everything to review (inf; model.json stores a finite stand-in)
    assert fit_review_threshold(cert, np.zeros(1000, dtype=bool), 0.5) == math.inf
    assert fit_review_threshold(np.array([]), np.array([]), 0.5) == math.inf


def test_the_accepted_answers_reach_the_target_on_new_images_but_for_the_allowed_risk() -> None:
    """The promise is about new images: fitted on one draw, checked on another of the same kind, the
    accepted answers fall short of the target in at most about ``REVIEW_RISK`` of the draws (a point
    estimate of the calibration accuracy falls short in about half of them)."""
    rng = np.random.default_rng(5)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        cert = rng.random(n)
        return cert, rng.random(n) < 0.3 + 0.6 * cert  # accuracy rises with certainty, 0.3 to 0.9

    short = 0
    for _ in range(60):
        t = fit_review_threshold(*draw(400), 0.8)
        cert, correct = draw(20000)
        kept = cert >= t
        short += bool(kept.any()) and correct[kept].mean() < 0.8
    assert short <= 60 * (REVIEW_RISK + 0.07)
    np.testing.assert_allclose(
        binomial_tail(25, 31, 0.8), sum(math.comb(31, k) * 0.8**k * 0.2 ** (31 - k) for k in range(25, 32))
    )


def test_ece_is_small_for_a_calibrated_sample_and_large_for_an_overconfident_one() -> None:
    rng = np.random.default_rng(4)
    conf = rng.uniform(0.2, 1.0, size=40000)
    calibrated = rng.random(40000) < conf
    assert expected_calibration_error(conf, calibrated) < 0.01
    overconfident = rng.random(40000) < conf**4  # says 0.8 where it is right 0.41 of the time
    assert expected_calibration_error(conf, overconfident) > 0.2


def test_fit_answer_spec_is_finite_and_acts_as_the_thresholds_it_stands_for() -> None:
    p, y = _noisy_distributions(300, seed=5)
    counts = p.argmax(1) + 1
    expected = (p * np.arange(1, 6)).sum(1)
    spec = fit_answer_spec(p, counts, expected, y + 1, CLASSES, temperature=1.3, distribution=True,
                           coverage=0.9, review_accuracy=0.7)  # fmt: skip
    assert spec.calibration_images == 300 and spec.temperature == 1.3
    assert spec.set_threshold == pytest.approx(fit_set_threshold(p, y, 0.9))
    fields = answer(p, counts, expected, CLASSES, spec)
    m = answer_metrics({"probabilities": p, "count": counts, "expected": expected}, y + 1, CLASSES, spec)
    assert m["set_coverage"] >= 0.9 and m["accepted_accuracy"] >= 0.7
    assert m["needs_review_share"] == pytest.approx(fields.needs_review.mean())
    lo, hi = m["set_coverage_interval"]
    assert lo < m["set_coverage"] <= hi
    assert len(m["risk_coverage"]) == 20 and m["risk_coverage"][-1] == [1.0, pytest.approx(m["accuracy"])]
    # the most certain half is more accurate than all (certainty ranks the answers)
    assert m["accuracy_at_50"] > m["accuracy"]
    # too few images and an unreachable target: finite thresholds with the effect of -inf and inf
    few = fit_answer_spec(p[:5], counts[:5], expected[:5], (counts[:5] % 5) + 1, CLASSES, temperature=1.0,
                          distribution=True, coverage=0.9, review_accuracy=1.0)  # fmt: skip
    assert few.set_threshold == every_count_threshold(CLASSES) and few.review_threshold == REVIEW_EVERYTHING
    json.dumps(few.to_dict(), allow_nan=False)  # strict JSON
    fields = answer(p[:5], counts[:5], expected[:5], CLASSES, few)
    assert fields.count_set == [list(CLASSES)] * 5 and fields.needs_review.all()
    # regression: certainty from the expected count, no confidence; the every-count threshold still holds
    reg = AnswerSpec(distribution=False, coverage=0.9, set_threshold=every_count_threshold(CLASSES))
    fields = answer(p[:3], np.array([1, 3, 5]), np.array([1.0, 3.0, 5.0]), CLASSES, reg)
    assert fields.confidence is None and fields.count_set == [list(CLASSES)] * 3
    assert risk_coverage_points(np.array([]), np.array([])) == []


def _true_temperature_data(head: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits and labels drawn from the distribution they define."""
    gen = torch.Generator().manual_seed(seed)
    if head == "classification":
        logits = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 1.5
    else:  # decreasing cumulative logits: a valid ordinal distribution
        centre = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 4
        logits = 2.0 * (centre - torch.arange(4, dtype=torch.float64)[None, :] - 0.5)
    probs = decode_outputs(logits, head, 5)[0]
    return logits, torch.multinomial(probs, 1, generator=gen)[:, 0]


@pytest.mark.parametrize(
    ("head", "true_t"), [("classification", 2.5), ("classification", 0.6), ("ordinal", 0.5), ("ordinal", 3.0)]
)
def test_the_temperature_fit_recovers_a_known_temperature(head: str, true_t: float) -> None:
    logits, y = _true_temperature_data(head, 20000, seed=int(true_t * 10))
    raw = logits * true_t  # a head over- (T > 1) or under-confident (T < 1) by this much
    t = fit_temperature(raw, y, head, 5)
    assert t == pytest.approx(true_t, rel=0.08)
    assert fit_temperature(logits, y, head, 5) == pytest.approx(1.0, rel=0.08)
    # calibrating moves the probabilities only: the count is the same, whatever the offsets
    offsets = torch.linspace(-0.5, 0.5, decision_size(head, 5))
    for o in (None, offsets):
        plain, scaled = decode_outputs(raw, head, 5, o), decode_outputs(raw, head, 5, o, t)
        assert torch.equal(plain[1], scaled[1])
        assert not torch.allclose(plain[0], scaled[0])


def test_regression_has_no_temperature() -> None:
    raw = torch.randn(50, 1) + 2
    assert fit_temperature(raw, torch.randint(0, 5, (50,)), "regression", 5) == 1.0
    out = graph_outputs(raw, "regression", CLASSES, None, 2.0)  # ignored for regression
    assert np.array_equal(out["count"], graph_outputs(raw, "regression", CLASSES, None, None)["count"])
    with pytest.raises(ConfigError, match="regression head has no temperature"):
        ExportWrapper(build_model(5, "regression"), "regression", CLASSES, temperature=2.0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ExportWrapper(build_model(5, "ordinal"), "ordinal", CLASSES, temperature=0.0)


def test_the_calibration_split_is_stratified_seeded_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    counts = rng.choice([1, 2, 3, 4, 5], size=101, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    rows = [SimpleNamespace(id=str(i), count=int(c)) for i, c in enumerate(counts)]
    paths = [Path(f"{i}.jpg") for i in range(101)]
    sel, _, cal, cal_paths = calibration_split(rows, paths, 0.3, seed=7)
    assert len(cal) == round(0.3 * 101) and len(sel) + len(cal) == 101
    assert {r.id for r in sel}.isdisjoint(r.id for r in cal)
    assert [p.stem for p in cal_paths] == [r.id for r in cal]  # paths travel with their rows
    assert [int(r.id) for r in sel] == sorted(int(r.id) for r in sel)  # the manifest's order kept
    for c in range(1, 6):
        n_c = int((counts == c).sum())
        assert abs(sum(r.count == c for r in cal) - 0.3 * n_c) < 1
    again = calibration_split(rows, paths, 0.3, seed=7)[2]
    other = calibration_split(rows, paths, 0.3, seed=8)[2]
    assert [r.id for r in again] == [r.id for r in cal] and [r.id for r in other] != [r.id for r in cal]
    assert calibration_split(rows, paths, 0.0, seed=7) == (rows, paths, [], [])
    with pytest.raises(ConfigError, match="--calib-frac"):
        calibration_split(rows[:1], paths[:1], 0.5, seed=0)


@pytest.mark.parametrize(
    ("setting", "value", "flag"),
    [
        ("calib_frac", 1.0, "--calib-frac"),
        ("calib_frac", -0.1, "--calib-frac"),
        ("coverage", 1.0, "--coverage"),
        ("coverage", 0.0, "--coverage"),
        ("review_accuracy", 0.0, "--review-accuracy"),
        ("review_accuracy", 1.5, "--review-accuracy"),
    ],
)
def test_calibration_settings_are_checked(tmp_path: Path, setting: str, value: float, flag: str) -> None:
    split = {"train": tmp_path / "t.csv", "val": tmp_path / "v.csv"}
    with pytest.raises(ConfigError, match=flag):
        tiny_train_config(split, tmp_path / "m", **{setting: value}).validate()


def _onnx(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def _calibration_part(split: dict[str, Path], seed: int = 0) -> tuple[list, list]:
    rows, paths = load_labelled(split["val"], split["data_root"])
    _, _, cal_rows, cal_paths = calibration_split(rows, paths, 0.5, seed)
    return cal_rows, cal_paths


def test_a_tiny_ordinal_run_fits_and_exports_calibrated_answers(
    tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    from components.model import export_onnx
    from components.training.stages import train

    out = tmp_path / "m"
    # coverage 0.5 so that 5 calibration images fit a real set threshold (0.9 would need 9+)
    cfg = tiny_train_config(tiny_split, out, epochs=1, coverage=0.5, test_csv=tiny_split["test"],
                            data_root=tiny_split["data_root"])  # fmt: skip
    train(cfg)
    spec = load_model_spec(out)
    a = spec.answers
    cal_rows, cal_paths = _calibration_part(tiny_split)
    assert a.calibration_images == len(cal_rows) == 5
    assert a.distribution and a.temperature > 0 and a.temperature != 1.0
    assert (a.coverage, a.review_accuracy) == (0.5, 0.8)
    assert a.set_threshold is not None and a.set_threshold != every_count_threshold(CLASSES)
    assert a.review_threshold is not None
    # the thresholds are those the exported graph's outputs on the calibration part give
    probs, count, expected = _onnx(out / "model.onnx", preprocess_batch(cal_paths, spec.preprocess))
    refit = fit_answer_spec(probs, count, expected, [r.count for r in cal_rows], CLASSES,
                            temperature=a.temperature, distribution=True, coverage=0.5,
                            review_accuracy=0.8)  # fmt: skip
    assert refit.set_threshold == pytest.approx(a.set_threshold, abs=1e-4)
    assert refit.review_threshold == pytest.approx(a.review_threshold, abs=1e-4)

    # the count is exactly the uncalibrated rule's: the same weights exported without a temperature
    model = build_model(5, "ordinal")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    export_onnx(model.eval(), "ordinal", CLASSES, 32, tmp_path / "plain.onnx")
    _, test_paths = load_labelled(tiny_split["test"], tiny_split["data_root"])
    x = preprocess_batch([*test_paths, *cal_paths], spec.preprocess)
    calibrated, plain = _onnx(out / "model.onnx", x), _onnx(tmp_path / "plain.onnx", x)
    np.testing.assert_array_equal(calibrated[1], plain[1])
    assert not np.allclose(calibrated[0], plain[0], atol=1e-4)  # the probabilities did move
    with torch.no_grad():
        raw = model(torch.from_numpy(x))
    want = decode_outputs(raw, "ordinal", 5, temperature=a.temperature)
    np.testing.assert_allclose(calibrated[0], want[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(calibrated[2], want[2].numpy() + 1, atol=1e-4)

    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["temperature"] == a.temperature
    assert set(cal["val"]) == {"ece_before", "ece_after", "nll_before", "nll_after", "n"}
    assert cal["val"]["n"] == metrics["n_val"] == 5 and metrics["n_calibration"] == 5
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9  # T minimises the val NLL
    assert set(cal["test"]) == {"ece_before", "ece_after", "nll_before", "nll_after", "n"}
    # test, after: from the ONNX outputs; before: from the torch model's logits on the same images
    test_rows, _ = load_labelled(tiny_split["test"], tiny_split["data_root"])
    y = np.array([r.count for r in test_rows])
    for key, (probs_, count_) in (("ece_after", calibrated[:2]), ("ece_before", plain[:2])):
        conf = [probs_[i, c - 1] for i, c in enumerate(count_[:10])]
        assert cal["test"][key] == pytest.approx(expected_calibration_error(conf, count_[:10] == y), abs=1e-3)
    answers = metrics["answers"]
    for part in ("calibration", "val", "test"):
        m = answers[part]
        assert m["n"] == {"calibration": 5, "val": 5, "test": 10}[part]
        assert 0 <= m["set_coverage"] <= 1 and 1 <= m["mean_set_size"] <= 5
        assert m["accepted_share"] + m["needs_review_share"] == pytest.approx(1)
        assert len(m["risk_coverage"]) == 20 and m["accuracy_at_50"] is not None
    assert answers["calibration"]["set_coverage"] >= 0.5  # conformal on its own data
    lo, hi = answers["test"]["set_coverage_interval"]
    assert lo <= answers["test"]["set_coverage"] <= hi
    for png in (out / "calibration.png", out / "risk_coverage.png", out / "test_eval" / "calibration.png",
                out / "test_eval" / "risk_coverage.png"):  # fmt: skip
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    with (out / "test_eval" / "predictions.csv").open() as fh:
        preds = list(csv.DictReader(fh))
    assert list(preds[0]) == ["id", "true", "pred", "expected", "confidence", "count_set", "needs_review"]
    fields = answer(calibrated[0][:10], calibrated[1][:10], calibrated[2][:10], CLASSES, a)
    assert [p["count_set"] for p in preds] == [f"{s[0]}-{s[-1]}" for s in fields.count_set]
    assert [p["needs_review"] == "true" for p in preds] == fields.needs_review.tolist()
    assert [float(p["confidence"]) for p in preds] == pytest.approx(fields.confidence.tolist(), abs=1e-4)
    card = (out / "MODEL_CARD.md").read_text()
    assert f"T = {a.temperature:.3f}" in card and "`count_set`" in card and "`needs_review`" in card
    assert "50% most certain answers" in card

    # the split shapes training: another --calib-frac is refused on --resume, by name
    with pytest.raises(ConfigError, match=r"calib_frac: 0\.5 -> 0\.3"):
        train(tiny_train_config(tiny_split, out, epochs=1, coverage=0.5, test_csv=tiny_split["test"],
                                data_root=tiny_split["data_root"], resume=True, calib_frac=0.3))  # fmt: skip


def test_a_tiny_regression_run_has_thresholds_but_no_temperature(
    tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    from components.model import export_onnx
    from components.training.stages import train

    out = tmp_path / "m"
    train(tiny_train_config(tiny_split, out, epochs=1, head="regression", test_csv=tiny_split["test"]))
    a = load_model_spec(out).answers
    assert (a.temperature, a.distribution) == (1.0, False)
    assert a.calibration_images == 5 and a.set_threshold is not None and a.review_threshold is not None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == 1.0
    assert metrics["calibration"]["val"]["ece_before"] is None and metrics["calibration"]["val"]["n"] == 5
    assert metrics["answers"]["calibration"]["n"] == 5 and metrics["answers"]["test"]["n"] == 10
    assert (out / "calibration.png").is_file() and (out / "risk_coverage.png").is_file()
    model = build_model(5, "regression")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    export_onnx(model.eval(), "regression", CLASSES, 32, tmp_path / "plain.onnx")
    spec = load_model_spec(out)
    _, paths = load_labelled(tiny_split["test"])
    x = preprocess_batch(paths, spec.preprocess)
    got, plain = _onnx(out / "model.onnx", x), _onnx(tmp_path / "plain.onnx", x)
    np.testing.assert_array_equal(got[1], plain[1])
    np.testing.assert_allclose(got[0], plain[0], atol=1e-6)
    with (out / "test_eval" / "predictions.csv").open() as fh:
        assert "confidence" not in next(csv.DictReader(fh))  # no distribution, no confidence


def test_calib_frac_0_keeps_val_for_selection_and_fits_no_thresholds(
    tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    from components.training.stages import train

    out = tmp_path / "m"
    train(tiny_train_config(tiny_split, out, epochs=1, head="classification", calib_frac=0.0))
    spec = load_model_spec(out)
    a = spec.answers
    assert a.temperature > 0 and a.distribution and a.calibration_images == 0
    assert (a.coverage, a.set_threshold, a.review_accuracy, a.review_threshold) == (None, None, None, None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert spec.metrics["val"]["n"] == metrics["n_val"] == 10 and metrics["n_calibration"] == 0
    assert metrics["answers"]["calibration"] is None and metrics["answers"]["val"]["set_coverage"] is None
    assert "No calibration split" in (out / "MODEL_CARD.md").read_text()
    assert len(read_manifest(tiny_split["val"])) == 10  # every val image selected on


def test_tta_calibrates_the_flip_averaged_outputs_the_graph_computes(
    tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    from components.training.loop import AverageModel
    from components.training.stages import train

    out = tmp_path / "m"
    train(tiny_train_config(tiny_split, out, epochs=1, tta=True, coverage=0.5))
    spec = load_model_spec(out)
    a = spec.answers
    rows, paths = load_labelled(tiny_split["val"], tiny_split["data_root"])
    sel_rows, sel_paths, cal_rows, cal_paths = calibration_split(rows, paths, 0.5, 0)
    model = build_model(5, "ordinal")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    graph = AverageModel([model.eval()], flips=True).eval()
    with torch.no_grad():
        raw = graph(torch.from_numpy(preprocess_batch(sel_paths, spec.preprocess)))
        plain_raw = model(torch.from_numpy(preprocess_batch(sel_paths, spec.preprocess)))
    y = np.array([r.count for r in sel_rows]) - 1
    assert a.temperature == pytest.approx(fit_temperature(raw, y, "ordinal", 5), rel=1e-3)
    assert a.temperature != pytest.approx(fit_temperature(plain_raw, y, "ordinal", 5), rel=1e-3)
    probs, count, expected = _onnx(out / "model.onnx", preprocess_batch(cal_paths, spec.preprocess))
    again = fit_answer_spec(probs, count, expected, [r.count for r in cal_rows], CLASSES,
                            temperature=a.temperature, distribution=True, coverage=0.5,
                            review_accuracy=0.8)  # fmt: skip
    assert again.set_threshold == pytest.approx(a.set_threshold, abs=1e-4)
