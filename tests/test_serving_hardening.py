"""The server against hostile clients and bad model directories: only the routes users need,
readiness that follows the model, logs that cannot be forged, no tracebacks for client mistakes, and
a model.json that disagrees with its graph stopping the server before it is ready."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.aws import free_port
from tests.fixtures.models import constant_model
from tests.fixtures.serving import (
    MODEL_NAME,
    REPO_ROOT,
    RunningServer,
    served_model_fixture,  # noqa: F401
)


@pytest.fixture(scope="module")
def jpeg(abid_dir: Path) -> bytes:
    return sorted((abid_dir / "bin-images").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """KServe parses sys.argv when first imported; keep pytest's own flags away from it."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def log_offset(server: RunningServer) -> int:
    return len(server.log())


def new_log(server: RunningServer, offset: int, *, until: str, count: int = 1, timeout: float = 10) -> str:
    """The log written since ``offset``, once ``until`` occurs ``count`` times in it (the access line
    is written just after the answer is sent, so the client can be a moment ahead of the log)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log()[offset:]
        if text.count(until) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def access_lines(text: str) -> list[dict]:
    return [json.loads(ln[ln.index("{") :]) for ln in text.splitlines() if '"event": "request"' in ln]


def predict_ok(server: RunningServer, client: httpx.Client, jpeg: bytes) -> None:
    r = client.post(server.predict_url(), content=jpeg, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["count"] in (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------- routes


def test_model_repository_routes_are_not_served(
    served_model: RunningServer, client: httpx.Client, jpeg: bytes
) -> None:
    base = f"{served_model.url}/v2/repository/models/{MODEL_NAME}"
    for action in ("unload", "load"):
        r = client.post(f"{base}/{action}")
        assert r.status_code == 404, (action, r.status_code, r.text)
    # The model is still there, serving, and the probes say so.
    predict_ok(served_model, client, jpeg)
    assert client.get(f"{served_model.url}/v2/health/ready").status_code == 200
    assert client.get(f"{served_model.url}/v1/models/{MODEL_NAME}").json()["ready"] is True
    assert client.get(f"{served_model.url}/v2").json()["extensions"] == []


def test_model_repository_is_read_only_over_grpc_too(plain_argv: None) -> None:
    from grpc_interceptor.exceptions import Unimplemented
    from kserve import Model

    from serving.server import HostModelServer

    server = HostModelServer(http_host="127.0.0.1", http_port=free_port(), enable_grpc=False)
    model = Model(MODEL_NAME)
    model.ready = True
    server.registered_models.update(model)
    for call in (server.model_repository_extension.unload, server.model_repository_extension.load):
        with pytest.raises(Unimplemented, match="read-only"):
            asyncio.run(call(MODEL_NAME))
    assert server.registered_models.get_model(MODEL_NAME) is model and model.ready


def test_unimplemented_routes_are_404_with_one_log_line_each(
    served_model: RunningServer, client: httpx.Client
) -> None:
    m = f"{served_model.url}/v2/models/{MODEL_NAME}"
    calls = [
        ("POST", f"{served_model.url}/v1/models/{MODEL_NAME}:explain"),
        ("POST", f"{m}/versions/1/infer"),
        ("GET", f"{m}/versions/1"),
        ("GET", f"{m}/versions/1/ready"),
        ("GET", f"{served_model.url}/openapi.json"),
    ]
    offset = log_offset(served_model)
    for method, url in calls:
        r = client.request(method, url, json={"instances": []})
        assert r.status_code == 404, (method, url, r.status_code, r.text)
    text = new_log(served_model, offset, until='"event": "request"', count=len(calls))
    assert "Traceback" not in text
    assert len(text.splitlines()) == len(calls), text
    assert [e["status"] for e in access_lines(text)] == [404] * len(calls)
    # KServe's handlers answer 501 to any version; served routes ignore the unsupported parameter.
    r = client.get(m, params={"model_version": "1"})
    assert r.status_code == 200 and r.json()["name"] == MODEL_NAME


def test_served_routes_still_answer(served_model: RunningServer, client: httpx.Client) -> None:
    url = served_model.url
    for path in ("/", "/v2/health/live", "/v2/health/ready", "/v1/models", "/v2/models", "/metrics", "/ping"):
        assert client.get(f"{url}{path}").status_code == 200, path
    meta = client.get(f"{url}/v2/models/{MODEL_NAME}").json()
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert client.get(f"{url}/v2/models/{MODEL_NAME}/ready").json()["ready"] is True
    assert client.get(f"{url}/v2/models/nope/ready").status_code == 404


def test_readiness_follows_the_model(random_model_dir: Path, plain_argv: None) -> None:
    from fastapi import FastAPI
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane

    from serving.errors import install_client_error_handlers
    from serving.model import InventoryCounter, ServingOptions
    from serving.routes import models_ready, register_served_routes

    registry = ModelRepository()
    model = InventoryCounter(MODEL_NAME, random_model_dir, ServingOptions(intra_op_threads=1))
    registry.update(model)
    app = FastAPI()
    register_served_routes(app, DataPlane(model_registry=registry))
    install_client_error_handlers(app)

    async def probes() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            paths = ("/v2/health/ready", f"/v1/models/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/ready")
            return [(await c.get(p)).status_code for p in paths]

    assert asyncio.run(probes()) == [503, 503, 503]  # registered, not loaded
    try:
        model.load()
        assert asyncio.run(probes()) == [200, 200, 200]
    finally:
        model.stop()
    assert asyncio.run(probes()) == [503, 503, 503]  # stopped (as on shutdown)
    registry.unload(MODEL_NAME)
    assert asyncio.run(models_ready(registry)) is False
    assert asyncio.run(probes())[0] == 503  # no model at all


# ----------------------------------------------------------------------------- logs


def test_newline_in_model_name_cannot_forge_a_log_line(
    served_model: RunningServer, client: httpx.Client
) -> None:
    offset = log_offset(served_model)
    r = client.post(f"{served_model.url}/v1/models/x%0AFORGED%20ERROR%0D:predict", content=b"{}")
    assert r.status_code == 404
    text = new_log(served_model, offset, until="FORGED")
    assert "FORGED" in text
    assert "\r" not in text and not [ln for ln in text.split("\n") if ln.startswith("FORGED")], text
    assert len(text.split("\n")) == 2, text  # one line (and the newline that ends it)
    (entry,) = access_lines(text)
    assert entry["status"] == 404 and "x\nFORGED ERROR\r" in entry["error"]  # escaped in the line


def test_log_records_are_escaped_whoever_logs_them() -> None:
    from kserve.errors import ModelNotFound

    from serving.logs import EscapeControlChars, escape_control
    from serving.server import QuietClientErrors

    assert escape_control("a\nb\r\x1b[31m\u2028ok\tz") == "a\\nb\\r\\x1b[31m\\u2028ok\\tz"
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(EscapeControlChars())
    logger = logging.getLogger("test.kserve-like")
    logger.addFilter(QuietClientErrors())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("Exception:", exc_info=ModelNotFound("m\nINFO forged"))  # KServe's handler
        logger.warning("request id %s", "r1\r\nWARNING forged")
    finally:
        logger.removeHandler(handler)
    assert lines == [
        "client error: Model with name m\\nINFO forged does not exist.",
        "request id r1\\r\\nWARNING forged",
    ]


def _send_raw(port: int, data: bytes, *, read: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if read:
            s.recv(1)
        time.sleep(0.2)


def test_client_disconnects_leave_no_traceback(
    served_model: RunningServer, client: httpx.Client, jpeg: bytes
) -> None:
    port = int(served_model.url.rsplit(":", 1)[1])
    path = f"/v1/models/{MODEL_NAME}:predict"
    predict_ok(served_model, client, jpeg)  # one-time warnings of the first answer land before the window
    offset = log_offset(served_model)
    # Half a body, then gone.
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nx-request-id: half-body\r\n"
    _send_raw(port, f"{head}Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg[: len(jpeg) // 2])
    # The whole body, then gone before the answer.
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nx-request-id: no-read\r\n"
    _send_raw(port, f"{head}Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg)
    text = new_log(served_model, offset, until='"event": "request"', count=2)
    entries = {e["request_id"]: e for e in access_lines(text)}
    assert entries["half-body"]["status"] == 499 and entries["half-body"]["error"] == "client disconnected"
    assert "no-read" in entries
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
    assert len(text.splitlines()) == 2, text
    predict_ok(served_model, client, jpeg)
    assert served_model.proc.poll() is None


# ----------------------------------------------------------------------------- model contract


def _model_dir(src: Path, dest: Path, **changes: object) -> Path:
    """A model directory sharing ``src``'s ONNX graph with ``changes`` applied to its model.json."""
    dest.mkdir(parents=True)
    os.symlink(src / "model.onnx", dest / "model.onnx")
    spec = json.loads((src / "model.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[key] = value
    (dest / "model.json").write_text(json.dumps(spec))
    return dest


@pytest.fixture(scope="module")
def always_five(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px classifier that predicts count 5 for every image (classes 1-5)."""
    return constant_model(tmp_path_factory.mktemp("always_five"), 5)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"classes": [1, 2, 3, 4, 5, 6]}, "6 classes but the graph's 'probabilities' output has 5"),
        ({"preprocess__image_size": 32}, "image_size is 32 but the graph's input 'input' is 64x64"),
        ({"input_name": "pixels"}, "input_name 'pixels' is not a graph input"),
        ({"output_names": ["probs", "count", "expected"]}, "lacks ['probabilities']"),
    ],
    ids=["classes", "image size", "input name", "output names"],
)
def test_model_json_that_disagrees_with_the_graph_exits_2(
    changes: dict, named: str, random_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = _model_dir(random_model_dir, tmp_path / "model", **changes)
    _assert_exits_2(model_dir, named)


def test_counts_outside_the_classes_are_caught_by_the_warm_up(always_five: Path, tmp_path: Path) -> None:
    # Same number of classes, so the graph's shapes agree; only running it shows the offset.
    model_dir = _model_dir(always_five, tmp_path / "model", classes=[0, 1, 2, 3, 4])
    _assert_exits_2(model_dir, "the graph predicts counts [5], which are not in classes [0, 1, 2, 3, 4]")


def test_sagemaker_serve_checks_the_model_too(random_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _model_dir(random_model_dir, tmp_path / "model", classes=[1, 2, 3])
    _assert_exits_2(model_dir, "3 classes but the graph's 'probabilities' output has 5", head=["serve"])


def _assert_exits_2(model_dir: Path, named: str, head: list[str] | None = None) -> None:
    cmd = [sys.executable, "-m", "serving", *(head or []), "--model_dir", str(model_dir)]
    cmd += ["--http_host", "127.0.0.1", "--http_port", str(free_port()), "--intra_op_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], r.stderr
    assert "re-export the model" in errors[0]
    assert "Traceback" not in r.stderr and "Uvicorn running" not in r.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s to refuse the model"
