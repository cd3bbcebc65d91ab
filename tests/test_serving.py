"""The model server over real HTTP on 127.0.0.1: protocols, SageMaker routes, bad input, parity."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from components.common import sha256_file
from tests.fixtures.aws import free_port
from tests.fixtures.serving import (
    REPO_ROOT,
    RunningServer,
    served_model_fixture,  # noqa: F401
    start_server,
    stop_server,
)

CLASSES = ["1", "2", "3", "4", "5"]


@pytest.fixture(scope="module")
def jpegs(abid_dir: Path) -> list[bytes]:
    """A few real ABID JPEGs (read in place)."""
    paths = sorted((abid_dir / "bin-images").glob("*.jpg"))[:6]
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(timeout=30) as c:
        yield c


def v1_body(images: list[bytes]) -> dict:
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}} for b in images]}


def assert_prediction(p: dict) -> None:
    assert p["count"] in (1, 2, 3, 4, 5)
    assert list(p["probabilities"]) == CLASSES
    probs = np.array(list(p["probabilities"].values()))
    assert probs.min() >= 0 and abs(probs.sum() - 1) < 1e-3
    assert p["confidence"] == p["probabilities"][str(p["count"])]  # the returned count's probability
    assert 1.0 <= p["expected"] <= 5.0
    assert "count_set" not in p and "needs_review" not in p  # model.json has no thresholds


# ----------------------------------------------------------------------------- torch-free path


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import serving.model, serving.server, serving.batcher, serving.errors\n"
        "import serving.sagemaker_routes, serving.__main__ as m\n"
        "m.build_parser()\n"
        "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- in-process pieces


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """KServe parses sys.argv when first imported; keep pytest's own flags away from it."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def test_readiness_false_until_load_and_ping_follows(random_model_dir: Path, plain_argv: None) -> None:
    from fastapi import FastAPI

    from serving.model import InventoryCounter, ServingOptions
    from serving.sagemaker_routes import register_sagemaker_routes

    model = InventoryCounter("inventory-counter", random_model_dir, ServingOptions(intra_op_threads=1))
    app = FastAPI()
    register_sagemaker_routes(app, model)

    async def ping() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/ping")).status_code

    assert model.ready is False
    assert asyncio.run(ping()) == 503
    try:
        assert model.load() is True and model.ready is True
        assert asyncio.run(ping()) == 200
    finally:
        model.stop()
    assert model.ready is False and asyncio.run(ping()) == 503
    assert model.batcher is not None and model.batcher._executor._shutdown


@pytest.mark.parametrize("workers", [1, 2])
def test_micro_batcher_batches_keeps_order_and_survives_errors(workers: int) -> None:
    from serving.batcher import MicroBatcher

    sizes: list[int] = []

    def infer(x: np.ndarray) -> dict[str, np.ndarray]:
        if np.any(x < 0):
            raise ValueError("negative input")
        return {"double": x[:, 0] * 2}

    async def scenario() -> tuple[list[float], Exception | None, float]:
        b = MicroBatcher(
            infer,
            (1,),
            max_batch_size=4,
            max_wait_ms=20,
            workers=workers,
            on_batch=lambda n, s: sizes.append(n),
        )
        results = await asyncio.gather(*(b.submit(np.array([float(i)], np.float32)) for i in range(10)))
        err = None
        try:
            await b.submit(np.array([-1.0], np.float32))
        except RuntimeError as e:
            err = e
        after = await b.submit(np.array([7.0], np.float32))
        await b.aclose()
        return [float(r["double"]) for r in results], err, float(after["double"])

    doubled, err, after = asyncio.run(scenario())
    assert doubled == [2.0 * i for i in range(10)]
    assert max(sizes) == 4 and sum(sizes[:3]) == 10  # 10 concurrent items -> batches of 4, 4, 2
    assert err is not None and "negative" in str(err)
    assert after == 14.0


def test_micro_batcher_answers_every_caller_when_the_observer_raises() -> None:
    from serving.batcher import MicroBatcher

    observed: list[int] = []

    def observer(n: int, seconds: float) -> None:
        observed.append(n)
        raise RuntimeError("metrics backend down")

    async def scenario() -> list[float]:
        b = MicroBatcher(
            lambda x: {"double": x[:, 0] * 2}, (1,), max_batch_size=4, max_wait_ms=5, on_batch=observer
        )
        try:
            first = await asyncio.wait_for(
                asyncio.gather(*(b.submit(np.array([float(i)], np.float32)) for i in range(10))), 10
            )
            # The worker survived the observer: later items are still served.
            later = await asyncio.wait_for(b.submit(np.array([21.0], np.float32)), 10)
        finally:
            await b.aclose()
        return [float(r["double"]) for r in [*first, later]]

    assert asyncio.run(scenario()) == [2.0 * i for i in range(10)] + [42.0]
    assert sum(observed) == 11


def test_micro_batcher_aclose_fails_pending_callers() -> None:
    import threading

    from serving.batcher import MicroBatcher

    release = threading.Event()

    def slow_infer(x: np.ndarray) -> dict[str, np.ndarray]:
        release.wait(10)
        return {"double": x[:, 0] * 2}

    async def scenario() -> list[BaseException | dict]:
        b = MicroBatcher(slow_infer, (1,), max_batch_size=2, max_wait_ms=0)
        # Two items run (blocked in inference), four more wait in the queue.
        calls = [asyncio.ensure_future(b.submit(np.array([float(i)], np.float32))) for i in range(6)]
        await asyncio.sleep(0.1)
        await b.aclose()
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        with pytest.raises(RuntimeError, match="closed"):
            await b.submit(np.array([1.0], np.float32))
        return results

    results = asyncio.run(scenario())
    assert len(results) == 6
    assert all(isinstance(r, RuntimeError) for r in results), results


def test_request_guard_counts_every_4xx(plain_argv: None) -> None:
    from fastapi import FastAPI

    from serving.errors import BadRequest, install_error_handlers
    from serving.server import RequestGuard

    app = FastAPI()
    install_error_handlers(app)
    rejected: list[int] = []

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    @app.get("/bad")
    async def bad() -> dict:
        raise BadRequest("no good")

    @app.get("/items/{n}")
    async def item(n: int) -> dict:
        return {"n": n}

    app.add_middleware(RequestGuard, max_body_bytes=10, on_reject=rejected.append)

    async def calls() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [
                (await c.get("/ok")).status_code,
                (await c.get("/bad")).status_code,  # our handler
                (await c.get("/items/abc")).status_code,  # FastAPI validation
                (await c.get("/missing")).status_code,  # routing
                (await c.post("/ok", content=b"x" * 11)).status_code,  # the guard's own limit
            ]

    statuses = asyncio.run(calls())
    assert statuses == [200, 400, 422, 404, 413]
    assert sorted(rejected) == [400, 404, 413, 422]  # each once, the 200 not at all


def test_sagemaker_serve_defaults(plain_argv: None) -> None:
    from serving.__main__ import SAGEMAKER_MODEL_DIR, parse_args

    args = parse_args(["serve"])
    assert args.sagemaker and args.model_dir == SAGEMAKER_MODEL_DIR and args.http_port == 8080
    assert args.model_name == "inventory-counter"


def test_cli_config_errors_exit_2(tmp_path: Path, plain_argv: None) -> None:
    from serving.__main__ import main

    assert main(["--model_name", "x"]) == 2  # no --model_dir
    missing = ["--model_dir", str(tmp_path / "missing"), "--http_host", "127.0.0.1"]
    # Should loading ever succeed, the server must not take a fixed port such as 8080.
    assert main([*missing, "--http_port", str(free_port())]) == 2


# ----------------------------------------------------------------------------- protocols over HTTP


def test_v1_predict_several_images(
    served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]
) -> None:
    r = client.post(served_model.predict_url(), json=v1_body(jpegs[:3]))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for p in preds:
        assert_prediction(p)
    # version "0" in model.json: the hash of the ONNX file served names the model
    digest = sha256_file(served_model.model_dir / "model.onnx")
    assert r.json()["model_version"] == "sha256:" + digest[:12]


def test_raw_jpeg_body_matches_v1(
    served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]
) -> None:
    raw = client.post(served_model.predict_url(), content=jpegs[0], headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    v1 = client.post(served_model.predict_url(), json=v1_body(jpegs[:1]))
    assert raw.json()["predictions"] == v1.json()["predictions"]


def test_v2_bytes_input(served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]) -> None:
    data = [base64.b64encode(b).decode() for b in jpegs[:2]]
    body = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]}
    r = client.post(served_model.infer_url(), json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1"
    assert out["count"]["datatype"] == "INT64" and out["count"]["shape"] == [2]
    assert out["probabilities"]["shape"] == [2, 5]
    probs = np.array(out["probabilities"]["data"]).reshape(2, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    counts = np.array(out["count"]["data"])
    np.testing.assert_allclose(out["confidence"]["data"], probs[np.arange(2), counts - 1], atol=1e-6)
    v1 = client.post(served_model.predict_url(), json=v1_body(jpegs[:2])).json()
    assert out["count"]["data"] == [p["count"] for p in v1["predictions"]]
    assert r.json()["model_version"] == v1["model_version"]


def test_sagemaker_routes(served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]) -> None:
    assert client.get(f"{served_model.url}/ping").status_code == 200
    r = client.post(
        f"{served_model.url}/invocations", content=jpegs[1], headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    assert_prediction(r.json()["predictions"][0])
    r = client.post(f"{served_model.url}/invocations", json=v1_body(jpegs[:2]))
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    r = client.post(f"{served_model.url}/invocations", content=b"x", headers={"content-type": "text/csv"})
    assert r.status_code == 415 and "image/jpeg" in r.json()["error"]
    r = client.post(
        f"{served_model.url}/invocations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post(f"{served_model.url}/invocations", json={"instances": [{"b64": "***"}]})
    assert r.status_code == 400 and "instance 0: invalid base64" in r.json()["error"]


def test_readiness_and_metrics(served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]) -> None:
    assert client.get(f"{served_model.url}/v2/models/inventory-counter/ready").status_code == 200
    assert client.get(f"{served_model.url}/v1/models/inventory-counter").json()["ready"] is True
    # Metrics are cumulative over the module's server (earlier multi-image requests formed batches
    # too), so judge the burst of single-image requests by the difference it makes.
    before = client.get(f"{served_model.url}/metrics").text

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            reqs = [
                c.post(
                    served_model.predict_url(), content=jpegs[i % 6], headers={"content-type": "image/jpeg"}
                )
                for i in range(24)
            ]
            assert all(r.status_code == 200 for r in await asyncio.gather(*reqs))

    asyncio.run(burst())
    text = client.get(f"{served_model.url}/metrics").text
    assert "request_predict_seconds" in text  # KServe's own

    def delta(name: str) -> float:
        return _metric(text, name) - _metric(before, name, default=0.0)

    batches = delta("inventory_batch_size_count")
    singles = delta('inventory_batch_size_bucket{le="1.0"}')
    assert batches >= 1 and delta("inventory_batch_size_sum") == 24
    assert singles < batches, "the concurrent requests were never batched together"
    assert delta("inventory_images_total") == 24


def _metric(text: str, name: str, default: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is not None:
        return default
    raise AssertionError(f"{name} not in /metrics")


def _request_log_lines(server: RunningServer) -> list[dict]:
    lines = [ln for ln in server.log().splitlines() if '"event": "request"' in ln]
    return [json.loads(ln[ln.index("{") :]) for ln in lines]


def test_structured_request_log_one_line_per_request(
    served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]
) -> None:
    assert _request_log_lines(served_model), "no structured request log lines"
    before = len(_request_log_lines(served_model))
    rid = "log-test-1"
    r = client.post(
        served_model.predict_url(),
        content=jpegs[0],
        headers={"content-type": "image/jpeg", "x-request-id": rid},
    )
    assert r.status_code == 200
    entries = _request_log_lines(served_model)
    assert len(entries) == before + 1
    assert {"method", "path", "status", "ms"} <= set(entries[-1]) and entries[-1]["request_id"] == rid
    # uvicorn's own access line and KServe's latency line would repeat the same request.
    log = served_model.log()
    assert "uvicorn.access" not in log and "preprocess_ms" not in log


def test_server_runs_on_uvloop(served_model: RunningServer) -> None:
    # KServe 0.21 ignores --event-loop in a single process; the server installs the policy itself.
    assert "event loop: uvloop" in served_model.log()


def test_event_loop_policy_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from components.common import ConfigError
    from serving.server import install_event_loop_policy

    monkeypatch.setattr(asyncio, "set_event_loop_policy", lambda policy: None)  # keep pytest's loop
    assert install_event_loop_policy("asyncio") == "asyncio"
    assert install_event_loop_policy("auto") == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if uvloop were not installed
    assert install_event_loop_policy("auto") == "asyncio"
    with pytest.raises(ConfigError, match="needs the uvloop package"):
        install_event_loop_policy("uvloop")


@pytest.mark.parametrize(
    ("asked", "cores", "expected"), [(0, 1, 1), (0, 2, 1), (0, 8, 2), (0, 16, 4), (3, 2, 3)]
)
def test_inference_workers_default_scales_with_cores(asked: int, cores: int, expected: int) -> None:
    from serving.model import ServingOptions

    assert ServingOptions(inference_workers=asked).resolve_workers(cores) == expected


# ----------------------------------------------------------------------------- bad input


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def v2(name: str, datatype: str, shape: list[int], data: list) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


def _bad_requests(server: RunningServer, jpeg: bytes) -> list[tuple[str, str, dict, int, str]]:
    """(name, url, httpx kwargs, expected status, text in the error)."""
    img = {"content-type": "image/jpeg"}
    p, i = server.predict_url(), server.infer_url()
    b64 = base64.b64encode(jpeg).decode()
    return [
        ("not an image", p, {"content": b"hello, not a jpeg", "headers": img}, 400, "not a supported image"),
        ("truncated jpeg", p, {"content": jpeg[: len(jpeg) // 2], "headers": img}, 400, "truncated"),
        ("empty body", p, {"content": b"", "headers": img}, 400, "empty"),
        (
            "empty json body",
            p,
            {"content": b"", "headers": {"content-type": "application/json"}},
            400,
            "Unrecognized request format",
        ),
        ("wrong field", p, {"json": {"inputs": [b64]}}, 400, "instances"),
        ("bad instance", p, {"json": {"instances": [{"image": b64}]}}, 400, "image_bytes"),
        ("bad base64", p, {"json": {"instances": [{"b64": "***"}]}}, 400, "base64"),
        ("no instances", p, {"json": {"instances": []}}, 400, "no images"),
        ("too many", p, {"json": {"instances": [{"b64": b64}] * 9}}, 413, "limit of 8"),
        ("body too large", p, {"content": b"\0" * (1024 * 1024 + 1), "headers": img}, 413, "over the limit"),
        ("pixel bomb", p, {"content": _png((2500, 2000)), "headers": img}, 413, "pixels"),
        ("unknown model", server.predict_url("nope"), {"content": jpeg, "headers": img}, 404, "nope"),
        ("v2 not bytes", i, {"json": v2("x", "FP32", [1], [1.0])}, 400, "BYTES"),
        ("v2 shape", i, {"json": v2("image", "BYTES", [2], [b64])}, 400, "shape"),
        (
            "v2 binary",
            i,
            {"content": b"{}", "headers": {"inference-header-content-length": "2"}},
            415,
            "base64",
        ),
    ]


def test_bad_inputs_get_4xx_with_message(
    served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]
) -> None:
    bad = _bad_requests(served_model, jpegs[0])
    before = client.get(f"{served_model.url}/metrics").text
    failures = []
    for name, url, kwargs, status, text in bad:
        r = client.post(url, **kwargs)
        if r.status_code != status or text not in r.json().get("error", ""):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # Every rejection is counted once, KServe's own 400 (empty JSON) and 404 (unknown model) included.
    after = client.get(f"{served_model.url}/metrics").text
    for status in sorted({s for _, _, _, s, _ in bad}):
        name = f'inventory_rejected_requests_total{{status="{status}"}}'
        expected = sum(1 for *_, s, _ in bad if s == status)
        assert _metric(after, name) - _metric(before, name, default=0.0) == expected, status


def test_chunked_body_over_limit_is_413(served_model: RunningServer, client: httpx.Client) -> None:
    def chunks():
        for _ in range(40):
            yield b"\0" * 65536  # 2.5 MiB in total, no Content-Length

    r = client.post(served_model.predict_url(), content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413


def test_flood_of_bad_requests_leaves_server_healthy(
    served_model: RunningServer, client: httpx.Client, jpegs: list[bytes]
) -> None:
    bad = _bad_requests(served_model, jpegs[0])

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as c:
            reqs = [c.post(url, **kw) for _ in range(10) for _, url, kw, _, _ in bad]
            return [r.status_code for r in await asyncio.gather(*reqs)]

    statuses = asyncio.run(flood())
    assert statuses and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert served_model.proc.poll() is None
    assert client.get(f"{served_model.url}/v2/health/ready").status_code == 200
    r = client.post(served_model.predict_url(), content=jpegs[2], headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    assert "Traceback" not in served_model.log()


# ----------------------------------------------------------------------------- parity with evaluate


@pytest.mark.slow
def test_served_predictions_equal_evaluate(
    tiny_trained_model_dir: Path, tiny_split: dict[str, Path], tmp_path: Path, client: httpx.Client
) -> None:
    from components.evaluate import evaluate
    from components.manifest import load_labelled

    out = tmp_path / "eval"
    evaluate(
        tiny_trained_model_dir, tiny_split["test"], out, data_root=tiny_split["data_root"], progress=False
    )
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        expected = {row["id"]: row for row in csv.DictReader(fh)}
    rows, paths = load_labelled(tiny_split["test"], tiny_split["data_root"])
    server = start_server(tiny_trained_model_dir, tmp_path / "server.log")
    try:
        r = client.post(server.predict_url(), json=v1_body([Path(p).read_bytes() for p in paths]))
    finally:
        stop_server(server)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(rows) == len(expected)
    for row, pred in zip(rows, preds, strict=True):
        assert pred["count"] == int(expected[row.id]["pred"]), row.id
        assert pred["expected"] == pytest.approx(float(expected[row.id]["expected"]), abs=1e-3), row.id
        # the answer's other fields: the same calibrated confidence, count set and review flag
        assert pred["confidence"] == pytest.approx(float(expected[row.id]["confidence"]), abs=1e-3), row.id
        first, last = (int(c) for c in expected[row.id]["count_set"].split("-"))
        assert pred["count_set"] == list(range(first, last + 1)), row.id
        assert str(pred["needs_review"]).lower() == expected[row.id]["needs_review"], row.id
    assert r.json()["model_version"].startswith("sha256:")  # trained, not published: named by its bytes
