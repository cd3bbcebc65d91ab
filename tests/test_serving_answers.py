"""The answer a robot gets, over real HTTP on every protocol: the confidence of the returned count (not
the top probability), the count set and review flag when model.json has their thresholds, and the
version of the model that answered; each field left out when the model cannot give it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from components.answers import Answers, answer
from components.common import sha256_file
from tests.fixtures.models import head_model
from tests.fixtures.serving import RunningServer, start_server, stop_server

PUBLISHED_VERSION = "v7"
ORDINAL_ANSWERS = {"coverage": 0.9, "set_threshold": 0.12, "review_accuracy": 0.9, "review_threshold": 0.2}
REGRESSION_ANSWERS = {"coverage": 0.9, "set_threshold": -0.8, "review_accuracy": 0.9, "review_threshold": 0.1}
BASE_OUTPUTS = ["count", "probabilities", "expected"]


@dataclass
class Case:
    """A served model and what its answers must hold."""

    name: str
    server: RunningServer
    version: str  # the model_version every answer names
    v2_outputs: list[str]  # exactly the V2 outputs, in order


def _make_case(name: str, root: Path) -> tuple[Path, str, list[str]]:
    """(model dir to serve, its expected model_version, its V2 outputs)."""
    if name == "ordinal-published":
        # thresholds set, then published: the published model.json carries the version
        from components.publish import publish

        src = head_model(root / "src", "ordinal", answers=ORDINAL_ANSWERS)
        served = Path(publish(src, str(root / "store"), version=PUBLISHED_VERSION).uri)
        outputs = ["count", "probabilities", "confidence", "expected"]
        return served, PUBLISHED_VERSION, [*outputs, "count_set_low", "count_set_high", "needs_review"]
    if name == "regression":
        # thresholds set, never published: no confidence, the ONNX file's hash for a version
        served = head_model(root / "model", "regression", answers=REGRESSION_ANSWERS)
        return served, "", [*BASE_OUTPUTS, "count_set_low", "count_set_high", "needs_review"]
    # an older model.json without the answers section: confidence only
    served = head_model(root / "model", "classification", legacy_json=True)
    return served, "", ["count", "probabilities", "confidence", "expected"]


@pytest.fixture(scope="module", params=["ordinal-published", "regression", "legacy-classification"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    root = tmp_path_factory.mktemp(request.param)
    model_dir, version, outputs = _make_case(request.param, root)
    version = version or "sha256:" + sha256_file(model_dir / "model.onnx")[:12]
    server = start_server(model_dir, root / "server.log", ["--max_batch_size", "4"])
    try:
        yield Case(request.param, server, version, outputs)
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def jpegs(abid_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((abid_dir / "bin-images").glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def v1_body(images: list[bytes]) -> dict:
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}} for b in images]}


def onnxruntime_answers(model_dir: Path, images: list[bytes]) -> tuple[dict[str, np.ndarray], Answers]:
    """The graph's outputs for ``images`` straight from onnxruntime, and answers.answer() on them."""
    import onnxruntime as ort

    from components.modelspec import load_model_spec
    from components.preprocess import load_uint8, normalize

    spec = load_model_spec(model_dir)
    pp = spec.preprocess
    x = np.stack([normalize(load_uint8(b, pp.image_size, resample=pp.resample), pp) for b in images])
    session = ort.InferenceSession(str(model_dir / spec.onnx_file), providers=["CPUExecutionProvider"])
    names = list(spec.output_names)
    outputs = dict(zip(names, session.run(names, {spec.input_name: x}), strict=True))
    return outputs, answer(
        outputs["probabilities"], outputs["count"], outputs["expected"], spec.classes, spec.answers
    )


def test_answers_on_v1_v2_and_sagemaker(case: Case, client: httpx.Client, jpegs: list[bytes]) -> None:
    server = case.server
    graph, want = onnxruntime_answers(server.model_dir, jpegs)
    v1 = client.post(server.predict_url(), json=v1_body(jpegs))
    data = [base64.b64encode(b).decode() for b in jpegs]
    v2 = client.post(
        server.infer_url(),
        json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]},
    )
    sagemaker = client.post(f"{server.url}/invocations", json=v1_body(jpegs))
    sagemaker_raw = client.post(
        f"{server.url}/invocations", content=jpegs[1], headers={"content-type": "image/jpeg"}
    )
    for r in (v1, v2, sagemaker, sagemaker_raw):
        assert r.status_code == 200, r.text
    v1, v2, sagemaker, sagemaker_raw = v1.json(), v2.json(), sagemaker.json(), sagemaker_raw.json()

    # the same version everywhere: the published one, else the served ONNX file's hash
    versions = {v1["model_version"], v2["model_version"], sagemaker["model_version"]}
    assert versions == {case.version} and sagemaker_raw["model_version"] == case.version
    assert sagemaker["predictions"] == v1["predictions"]
    assert sagemaker_raw["predictions"] == v1["predictions"][1:]

    # V1: each field equals answers.answer() on onnxruntime's outputs, or is absent
    for i, p in enumerate(v1["predictions"]):
        assert p["count"] == int(graph["count"][i])
        if want.confidence is None:
            assert "confidence" not in p
        else:
            assert p["confidence"] == p["probabilities"][str(p["count"])]  # the returned count's
            assert p["confidence"] == pytest.approx(want.confidence[i], abs=1e-6)
        if want.count_set is None:
            assert "count_set" not in p
        else:
            assert p["count_set"] == want.count_set[i]
        if want.needs_review is None:
            assert "needs_review" not in p
        else:
            assert p["needs_review"] is bool(want.needs_review[i])

    # V2: exactly the outputs the metadata lists, with the same values
    meta = client.get(f"{server.url}/v2/models/{server.model_name}").json()
    assert [o["name"] for o in meta["outputs"]] == case.v2_outputs
    assert [o["name"] for o in v2["outputs"]] == case.v2_outputs
    out = {o["name"]: o for o in v2["outputs"]}
    for o, m in zip(v2["outputs"], meta["outputs"], strict=True):
        assert o["datatype"] == m["datatype"] and len(o["shape"]) == len(m["shape"])
    assert out["count"]["data"] == [p["count"] for p in v1["predictions"]]
    if want.confidence is not None:
        assert out["confidence"]["data"] == pytest.approx(want.confidence.tolist(), abs=1e-6)
    if want.count_set is not None:
        assert out["count_set_low"]["data"] == [s[0] for s in want.count_set]
        assert out["count_set_high"]["data"] == [s[-1] for s in want.count_set]
        assert out["count_set_low"]["datatype"] == "INT64" and out["count_set_low"]["shape"] == [2]
    if want.needs_review is not None:
        assert out["needs_review"]["data"] == want.needs_review.tolist()
        assert out["needs_review"]["datatype"] == "BOOL" and out["needs_review"]["shape"] == [2]

    if case.name == "ordinal-published":
        # the ordinal count is not the most probable count: confidence is its probability, not the max
        p = v1["predictions"][0]
        assert p["count"] == 3 and max(p["probabilities"].values()) == p["probabilities"]["4"]
        assert p["confidence"] == pytest.approx(0.15, abs=1e-5)
        assert p["count_set"] == [2, 3, 4] and p["needs_review"] is True
    if case.name == "regression":
        assert v1["predictions"][0]["count_set"] == [3, 4] and v1["predictions"][0]["needs_review"] is False
