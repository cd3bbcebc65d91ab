"""Model heads, ONNX export and the model.json contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from components.common import ConfigError
from components.model import ExportWrapper, build_model, decode_outputs, export_onnx
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
