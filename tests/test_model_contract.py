"""Model heads, ONNX export and the model.json contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from components.common import ConfigError
from components.model import (
    ExportWrapper,
    build_model,
    decision_size,
    decode_outputs,
    export_onnx,
    fit_decision_offsets,
)
from components.modelspec import INPUT_NAME, OUTPUT_NAMES, ModelSpec, load_model_spec


def test_decode_outputs_per_head() -> None:
    cls_raw = torch.tensor([[0.0, 5.0, 0.0]])
    probs, idx, exp = decode_outputs(cls_raw, "classification", 3)
    assert idx.tolist() == [1] and torch.allclose(probs.sum(1), torch.ones(1))
    # ordinal: P(y>0) high, P(y>1) low -> index 1
    probs, idx, exp = decode_outputs(torch.tensor([[4.0, -4.0]]), "ordinal", 3)
    assert idx.tolist() == [1] and probs.argmax(1).tolist() == [1]
    # regression: 1.7 rounds to 2, out-of-range clips
    probs, idx, exp = decode_outputs(torch.tensor([[1.7], [9.0], [-3.0]]), "regression", 3)
    assert idx.tolist() == [2, 2, 0]
    assert exp[0].item() == pytest.approx(1.7, abs=1e-5)


@pytest.mark.parametrize("head", ["classification", "ordinal", "regression"])
def test_zero_offsets_are_the_plain_rule_and_offsets_move_only_the_count(head: str) -> None:
    raw = torch.randn(500, {"classification": 5, "ordinal": 4, "regression": 1}[head]) * 2
    if head == "regression":
        raw = raw + 2
    probs, index, expected = decode_outputs(raw, head, 5)
    _, z_index, _ = decode_outputs(raw, head, 5, torch.zeros(decision_size(head, 5)))
    assert torch.equal(index, z_index)
    # a negative offset on the last decision: fewer images reach the top class, probabilities unchanged
    shift = torch.zeros(decision_size(head, 5))
    shift[-1] = -0.45 if head == "regression" else -3.0
    s_probs, s_index, s_expected = decode_outputs(raw, head, 5, shift)
    assert (s_index == 4).sum() < (index == 4).sum()
    assert torch.equal(probs, s_probs) and torch.equal(expected, s_expected)


def test_fitted_offsets_recover_a_biased_ordinal_head() -> None:
    # One noisy "size" per image read by four thresholds; the "more than 3" one sits 1.0 too high,
    # so the plain rule under-counts class 5.
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (2000,), generator=gen)
    latent = y + torch.randn(2000, generator=gen) * 0.6
    raw = 3.0 * (latent[:, None] - torch.arange(4)[None, :] - 0.5)
    raw[:, 3] -= 1.0
    plain = (decode_outputs(raw, "ordinal", 5)[1] == y).float().mean()
    offsets = fit_decision_offsets(raw, y, "ordinal", 5)
    fitted = (decode_outputs(raw, "ordinal", 5, offsets)[1] == y).float().mean()
    assert fitted > plain + 0.01
    for head, out in (("ordinal", raw), ("regression", raw.mean(1, keepdim=True) / 3 + 2)):
        # never worse than the plain rule on the data it was fitted on (it starts there)
        o = fit_decision_offsets(out, y, head, 5, min_gain=0)
        assert (decode_outputs(out, head, 5, o)[1] == y).float().mean() >= (
            decode_outputs(out, head, 5)[1] == y
        ).float().mean()
    assert offsets[3] == pytest.approx(1.0, abs=0.35)  # it found the shift on the biased threshold
    assert offsets[:3].abs().max() == 0  # and left the calibrated ones alone
    # a calibrated head keeps the plain rule: noise-sized gains are not taken...
    raw[:, 3] += 1.0
    assert fit_decision_offsets(raw, y, "ordinal", 5).abs().max() == 0
    # ...unless asked to (min_gain 0 fits the sample's noise)
    assert fit_decision_offsets(raw, y, "ordinal", 5, min_gain=0).abs().max() > 0
    with pytest.raises(ConfigError, match="one target per output row"):
        fit_decision_offsets(raw, y[:10], "ordinal", 5)


def test_offsets_fitted_for_rmse_lower_the_squared_error() -> None:
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, 5, (2000,), generator=gen)
    latent = y + torch.randn(2000, generator=gen) * 0.8
    raw = 3.0 * (latent[:, None] - torch.arange(4)[None, :] - 0.5)
    raw[:, 0] += 2.0  # too eager to say "more than 1": costly in squared error
    raw[:, 3] -= 2.0

    def mse(o: torch.Tensor | None) -> float:
        return float(((decode_outputs(raw, "ordinal", 5, o)[1] - y).float() ** 2).mean())

    o_rmse = fit_decision_offsets(raw, y, "ordinal", 5, objective="rmse")
    assert mse(o_rmse) < mse(None) - 0.03
    assert mse(o_rmse) <= mse(fit_decision_offsets(raw, y, "ordinal", 5))
    with pytest.raises(ConfigError, match="objective"):
        fit_decision_offsets(raw, y, "ordinal", 5, objective="mae")


def test_fitted_offsets_for_classification_and_regression() -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (2000,), generator=gen)
    latent = y + torch.randn(2000, generator=gen) * 0.6
    # regression read too low by 0.35: the cuts move down
    offsets = fit_decision_offsets((latent - 0.35)[:, None], y, "regression", 5)
    assert offsets.min() > 0.1
    # classification logits that under-rate the last class: its offset goes up, the first stays 0
    logits = -((latent[:, None] - torch.arange(5)[None, :]) ** 2)
    logits[:, 4] -= 1.0
    offsets = fit_decision_offsets(logits, y, "classification", 5)
    assert offsets[0] == 0 and offsets[4] > 0.3


@pytest.mark.parametrize("head", ["classification", "ordinal", "regression"])
def test_onnx_bakes_in_the_decision_offsets(tmp_path: Path, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(5, head).eval()
    offsets = [0.0, 0.3, -0.4, 0.2, 0.1][: decision_size(head, 5)]
    path = export_onnx(model, head, (1, 2, 3, 4, 5), 32, tmp_path / "m.onnx", offsets=offsets)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    _, count, _ = sess.run(None, {INPUT_NAME: x})
    with torch.no_grad():
        raw = model(torch.from_numpy(x))
    want = decode_outputs(raw, head, 5, torch.tensor(offsets))[1] + 1
    np.testing.assert_array_equal(count, want.numpy())
    with pytest.raises(ConfigError, match="decision offsets"):
        ExportWrapper(model, head, (1, 2, 3, 4, 5), offsets=[0.0] * 7)


@pytest.mark.parametrize("head", ["classification", "ordinal", "regression"])
def test_onnx_matches_torch(tmp_path: Path, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(5, head).eval()
    path = export_onnx(model, head, (1, 2, 3, 4, 5), 32, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    probs, count, expected = sess.run(None, {INPUT_NAME: x})
    with torch.no_grad():
        t_probs, t_count, t_expected = ExportWrapper(model, head, (1, 2, 3, 4, 5))(torch.from_numpy(x))
    np.testing.assert_allclose(probs, t_probs.numpy(), atol=1e-4)
    np.testing.assert_array_equal(count, t_count.numpy())
    assert set(count.tolist()) <= {1, 2, 3, 4, 5}
    np.testing.assert_allclose(expected, t_expected.numpy(), atol=1e-4)


def test_model_spec_round_trip_and_errors(tmp_path: Path) -> None:
    spec = ModelSpec(classes=(1, 2, 3), head="ordinal", metrics={"accuracy": 0.5})
    spec.save(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.onnx"):
        load_model_spec(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"x")
    loaded = load_model_spec(tmp_path)
    assert loaded.to_dict() == spec.to_dict()
    with pytest.raises(ConfigError, match="consecutive"):
        ModelSpec(classes=(1, 3, 5))
    with pytest.raises(ConfigError, match="head"):
        ModelSpec(head="softmax")
    fitted = ModelSpec(classes=(1, 2, 3), head="ordinal", decision_offsets=(0.5, -0.25))
    assert ModelSpec.from_dict(fitted.to_dict()).decision_offsets == (0.5, -0.25)
    with pytest.raises(ConfigError, match="decision_offsets"):
        ModelSpec(classes=(1, 2, 3), head="ordinal", decision_offsets=(0.5, -0.25, 1.0))


def test_weights_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected imagenet, none or a path"):
        build_model(5, weights=str(tmp_path / "nope.pt"))


def test_failed_onnx_export_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(*args: object, **kwargs: object) -> None:
        Path(str(args[2])).write_bytes(b"partial")
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="export failed"):
        export_onnx(build_model(5, "ordinal"), "ordinal", (1, 2, 3, 4, 5), 32, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
