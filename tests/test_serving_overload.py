"""The server under overload and hostile clients: admission control (503 + Retry-After at once, no
work for clients that left, bounded memory) and limits at the door (431, 408, 413 before decoding).

The admission logic is tested as plain objects with a fake clock; everything else against the real
server on 127.0.0.1, each attack bounded in time and in connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import io
import json
import re
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.serving import RunningServer, start_server, stop_server

#: Kubernetes' default readiness-probe timeout in this project's manifests.
PROBE_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 2
QUEUE_IMAGES = 40
PREDICT = "/v1/models/inventory-counter:predict"
#: Pixels per request in the server under test (11 images of 3.8 MP are over it, 8 of 4 MP are not).
REQUEST_PIXELS = 40_000_000


# ----------------------------------------------------------------------------- admission logic


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_controller(
    rate: float = 100.0,
    budget_s: float = 1.0,
    ceiling: int = 256,
    inflight: int = 10_000,
    floor: float = 1.0,
    clock: FakeClock | None = None,
) -> tuple[object, list[str]]:
    from serving.admission import AdmissionController, AdmissionLimits, ThroughputMeter

    shed: list[str] = []
    limits = AdmissionLimits(ceiling, budget_s, inflight)
    meter = ThroughputMeter(rate, floor=floor)
    c = AdmissionController(limits, meter, clock=clock or FakeClock(), on_shed=shed.append)
    return c, shed


def admit(c: object, images: int, *, timeout_s: float | None = None, length: int | None = None) -> object:
    """Let a request in and claim its images, in a context of its own (as the middleware does)."""
    ticket = c.enter(length, timeout_s)  # type: ignore[attr-defined]
    ctx = contextvars.copy_context()
    ctx.run(c.bind, ticket)  # type: ignore[attr-defined]
    ctx.run(c.claim, images)  # type: ignore[attr-defined]
    return ticket


def test_queue_limit_is_half_the_budget_at_measured_throughput_capped() -> None:
    assert make_controller(rate=100, budget_s=1.0)[0].queue_limit() == 50
    assert make_controller(rate=100, budget_s=1.0, ceiling=30)[0].queue_limit() == 30
    assert make_controller(rate=1, budget_s=0.1)[0].queue_limit() == 1  # never below one image


def test_full_queue_is_refused_at_the_door_with_retry_after_and_reopens_on_release() -> None:
    from serving.errors import OverloadedError

    c, shed = make_controller(rate=8, budget_s=1.0)  # limit 4
    tickets = [admit(c, 1) for _ in range(4)]
    assert c.images == 4
    with pytest.raises(OverloadedError) as refused:
        c.enter(1000, None)
    assert refused.value.reason == "queue_full" and refused.value.retry_after_s == 1  # 4 images at 8/s
    assert shed == ["queue_full"] and c.images == 4
    c.release(tickets[0], served=True)
    admit(c, 1)
    assert c.images == 4


def test_claim_admits_a_lone_large_request_but_not_one_that_overflows_others() -> None:
    from serving.errors import OverloadedError

    c, shed = make_controller(rate=8, budget_s=1.0)  # limit 4
    alone = admit(c, 10)  # bigger than the limit, but nothing else is queued
    assert c.images == 10
    c.release(alone, served=True)
    admit(c, 1)
    with pytest.raises(OverloadedError, match="do not fit"):
        admit(c, 4)
    assert c.images == 1 and shed == ["queue_full"]


def test_client_deadline_shorter_than_the_queue_is_refused_at_once() -> None:
    from serving.errors import OverloadedError

    c, shed = make_controller(rate=10, budget_s=10.0)  # limit 50; 4 queued images take 0.4 s
    for _ in range(3):
        admit(c, 1)
    with pytest.raises(OverloadedError, match="the client waits 200 ms"):
        c.enter(None, 0.2)
    admit(c, 1, timeout_s=1.0)
    assert shed == ["too_late"] and c.images == 4


def test_body_bytes_are_counted_as_they_arrive_and_bounded() -> None:
    from serving.errors import OverloadedError

    c, shed = make_controller(inflight=1000)
    slow = c.enter(10_000, None)  # a declared size alone reserves nothing: slow uploads hold little
    c.add_body_bytes(slow, 800)
    assert c.body_bytes == 800
    with pytest.raises(OverloadedError, match="bytes of request bodies"):
        c.enter(300, None)
    other = c.enter(None, None)
    with pytest.raises(OverloadedError):
        c.add_body_bytes(other, 300)
    c.release(slow, served=False)
    c.add_body_bytes(other, 5000)  # alone, a body may use the whole budget and more
    assert c.body_bytes == 5000 and shed == ["body_budget", "body_budget"]


def test_meter_learns_throughput_from_busy_time_only() -> None:
    clock = FakeClock()
    c, _ = make_controller(rate=1000.0, budget_s=1.0, floor=20.0, clock=clock)
    queued = [admit(c, 1) for _ in range(10)]
    # Busy: one image completes every 10 ms while the queue stays at 10 -> 100 images/s.
    for _ in range(300):
        clock.now += 0.01
        c.release(queued.pop(0), served=True)
        queued.append(admit(c, 1))
    assert c.meter.rate == pytest.approx(100, rel=0.05)
    assert c.queue_limit() == 50
    # Idle time is not busy time: long pauses between requests do not lower the estimate.
    while queued:  # the queue drains at the same pace
        clock.now += 0.01
        c.release(queued.pop(), served=True)
    for _ in range(50):
        clock.now += 1.0  # idle
        t = admit(c, 1)
        clock.now += 0.01  # served in 10 ms
        c.release(t, served=True)
    assert c.meter.rate == pytest.approx(100, rel=0.05)
    # Slow single requests (no batching) read slower, but never below the floor.
    for _ in range(100):
        t = admit(c, 1)
        clock.now += 0.2
        c.release(t, served=True)
    assert c.meter.rate == pytest.approx(20.0)


def test_meter_counts_a_whole_batch_completing_at_once() -> None:
    """Closed-loop clients: 16 requests wait for one batch, which answers all 16 after 60 ms; the
    server does 16 / 0.06 = 267 images/s (counting only the first release of each batch would
    read one image per batch, about 17/s, and shed nearly everything)."""
    clock = FakeClock()
    c, shed = make_controller(rate=150.0, budget_s=1.0, clock=clock)
    for _ in range(40):
        batch = [admit(c, 1) for _ in range(16)]
        clock.now += 0.06
        for t in batch:
            c.release(t, served=True)
        clock.now += 0.001  # the clients send their next request
    assert c.meter.rate == pytest.approx(16 / 0.061, rel=0.05)
    assert c.queue_limit() >= 120 and shed == []


def test_request_headers_that_steer_admission() -> None:
    from serving.admission_http import INFERENCE_PATH, client_timeout_s

    def scope(value: bytes) -> dict:
        return {"headers": [(b"x-envoy-expected-rq-timeout-ms", value)]}

    assert client_timeout_s(scope(b"1500")) == 1.5
    assert client_timeout_s(scope(b"0")) is None and client_timeout_s(scope(b"soon")) is None
    assert client_timeout_s({"headers": []}) is None
    for path in ("/v1/models/m:predict", "/v2/models/m/infer", "/invocations"):
        assert INFERENCE_PATH.match(path), path
    for path in ("/v2/health/ready", "/metrics", "/v1/models/m", "/v2/models/m/ready", "/ping"):
        assert not INFERENCE_PATH.match(path), path


def test_memory_bound_of_the_defaults_is_well_under_the_pod_limit() -> None:
    from serving.admission import AdmissionLimits, memory_bound_bytes
    from serving.model import ServingOptions

    d = ServingOptions()
    limits = AdmissionLimits(d.max_queue_images, d.latency_budget_ms / 1000, int(d.max_inflight_mb * 2**20))
    item = 4 * 3 * 224 * 224
    bound = memory_bound_bytes(limits, item, 2, d.max_pixels, d.max_batch_size * item)
    # ~410 MB above a ~250 MB baseline: under a third of the 2 GiB pod limit.
    assert bound < 512 * 2**20, bound / 2**20


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """KServe parses sys.argv when first imported; keep pytest's own flags away from it."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def test_admission_flags_are_checked_in_their_own_words(plain_argv: None) -> None:
    from components.common import ConfigError
    from serving.__main__ import parse_args
    from serving.model import ServingOptions

    with pytest.raises(ConfigError, match="--max_request_pixels must be >= --max_pixels"):
        ServingOptions(max_pixels=4_000_000, max_request_pixels=1_000_000)
    with pytest.raises(ConfigError, match="--latency_budget_ms must be > 0"):
        ServingOptions(latency_budget_ms=0)
    with pytest.raises(ConfigError, match="--read_timeout_s must be > 0"):
        ServingOptions(read_timeout_s=-1)
    with pytest.raises(ConfigError, match="--max_inflight_mb must be >= --max_request_mb"):
        parse_args(["--model_dir", "m", "--max_request_mb", "16", "--max_inflight_mb", "8"])


def test_middleware_cancels_work_past_its_deadline_and_answers_503(plain_argv: None) -> None:
    from serving.admission_http import AdmissionMiddleware

    c, shed = make_controller(rate=100, budget_s=0.1)
    c.clock = time.monotonic
    cancelled: list[bool] = []

    async def slow_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        c.claim(1)
        try:
            await asyncio.sleep(30)  # stands for a queue that does not move
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    app = AdmissionMiddleware(slow_app, c, read_timeout_s=5)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/models/m:predict", content=b"x")

    start = time.monotonic()
    r = asyncio.run(call())
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert "deadline" in r.json()["error"]
    assert time.monotonic() - start < 2
    assert cancelled == [True] and shed == ["deadline"]
    assert c.images == 0 and c.body_bytes == 0


# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The server with small limits, so that a few connections on loopback reach them."""
    log_path = tmp_path_factory.mktemp("overload") / "server.log"
    flags = {
        "--max_instances": 16,
        "--max_batch_size": 8,
        "--max_request_mb": 4,
        "--max_inflight_mb": 16,
        "--max_pixels": 4_000_000,
        "--max_request_pixels": REQUEST_PIXELS,
        "--max_queue_images": QUEUE_IMAGES,
        "--latency_budget_ms": 4000,  # the queue limit stays QUEUE_IMAGES at >= 20 images/s
        "--read_timeout_s": READ_TIMEOUT_S,
        "--timeout-keep-alive": KEEP_ALIVE_S,
    }
    s = start_server(random_model_dir, log_path, [str(v) for kv in flags.items() for v in kv])
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture(scope="module")
def jpegs(abid_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((abid_dir / "bin-images").glob("*.jpg"))[:8]]


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def metrics(server: RunningServer) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#\s]\S*) (\S+)$", text, re.M)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def image_bytes(width: int, height: int, fmt: str, smooth: bool = True) -> bytes:
    """A synthetic image: gradients compress to a few KB however many pixels they have."""
    if smooth:
        yy, xx = np.mgrid[0:height, 0:width]
        pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.new("RGB", (width, height), (120, 80, 40))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def v1(images: list[bytes]) -> bytes:
    return json.dumps(
        {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}} for b in images]}
    ).encode()


def http_request(path: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


class HealthProbe:
    """Polls /v2/health/ready from a thread, as a kubelet would, and keeps the latencies."""

    def __init__(self, server: RunningServer, every_s: float = 0.1) -> None:
        self.url = f"{server.url}/v2/health/ready"
        self.every_s = every_s
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    assert r.status == 200
                self.latencies.append(time.perf_counter() - start)
            except Exception:
                self.latencies.append(float("inf"))
            self._stop.wait(self.every_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_requests_whose_client_left_are_never_decoded_or_inferred(
    server: RunningServer, jpegs: list[bytes]
) -> None:
    port = port_of(server)
    blocker = v1([image_bytes(2000, 2000, "PNG")] * 8)  # 8 x 4 MP: ~0.3 s on the one decode thread
    before = metrics(server)

    async def scenario() -> list[int]:
        async def post_blocker() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(http_request(PREDICT, blocker, "application/json"))
            status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
            writer.close()
            return status

        blockers = [asyncio.ensure_future(post_blocker()) for _ in range(2)]
        deadline = time.monotonic() + 10
        while metrics(server)["inventory_queue_images"] < 16:  # both blockers hold their images
            assert time.monotonic() < deadline, "the blocking requests never reached the queue"
            await asyncio.sleep(0.02)
        for jpeg in jpegs[:6]:  # each sends a whole request, then hangs up without waiting
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(http_request(PREDICT, jpeg, "image/jpeg"))
        return list(await asyncio.gather(*blockers))

    assert asyncio.run(scenario()) == [200, 200]
    deadline = time.monotonic() + 5
    while (after := metrics(server))["inventory_queue_images"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta('inventory_shed_requests_total{reason="disconnected"}') == 6
    assert delta("inventory_images_total") == 16  # decoded: the blockers' images only
    assert delta("inventory_batch_size_sum") == 16  # inferred: the same
    assert after["inventory_inflight_body_bytes"] == 0


@pytest.mark.parametrize("route", ["/v1/models/inventory-counter:predict", "/invocations"])
def test_client_deadline_that_the_queue_cannot_meet_gets_503_at_once(
    server: RunningServer, jpegs: list[bytes], route: str
) -> None:
    blocker = v1([image_bytes(2000, 2000, "PNG")] * 8)

    async def scenario() -> tuple[httpx.Response, float, int]:
        async with httpx.AsyncClient(timeout=30) as c:
            blocking = asyncio.ensure_future(
                c.post(server.predict_url(), content=blocker, headers={"content-type": "application/json"})
            )
            while metrics(server)["inventory_queue_images"] < 8:
                await asyncio.sleep(0.02)
            start = time.monotonic()
            r = await c.post(
                f"{server.url}{route}",
                content=jpegs[0],
                headers={"content-type": "image/jpeg", "x-envoy-expected-rq-timeout-ms": "50"},
            )
            return r, time.monotonic() - start, (await blocking).status_code

    r, seconds, blocker_status = asyncio.run(scenario())
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert re.search(r"\((too_late|deadline)\)", r.json()["error"])
    assert seconds < 0.5
    assert blocker_status == 200


def test_huge_header_is_refused_without_stalling_health_checks(server: RunningServer) -> None:
    with HealthProbe(server, every_s=0.05) as probe:
        time.sleep(0.2)
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port_of(server))) as s:
            # The server may answer and close before the header is all sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(
                    b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 2**20) + b"\r\n\r\n"
                )
            data, closed = read_until_closed(s, 5)
        seconds = time.perf_counter() - start
        time.sleep(0.3)
    assert closed and seconds < 2
    assert data == b"" or data.startswith(b"HTTP/1.1 431"), data[:100]
    assert probe.latencies and max(probe.latencies) < 0.5, probe.latencies

    with socket.create_connection(("127.0.0.1", port_of(server))) as s:
        fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(150))
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        data, closed = read_until_closed(s, 5)
    assert closed and data.startswith(b"HTTP/1.1 431") and b"header fields" in data


def test_slow_clients_get_408_and_are_disconnected(server: RunningServer) -> None:
    port = port_of(server)
    path = PREDICT
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_head = socket.create_connection(("127.0.0.1", port))
    idle = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    slow_body.sendall(
        http_request(path, b"\xff" * 100_000, "image/jpeg")[:2000]
    )  # headers + part of the body
    slow_head.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    results = {}
    for name, sock in (("body", slow_body), ("head", slow_head), ("idle", idle)):
        data, closed = read_until_closed(sock, KEEP_ALIVE_S + 3)
        results[name] = (data, closed, time.perf_counter() - start)
        sock.close()
    for name in ("body", "head"):
        data, closed, seconds = results[name]
        assert data.startswith(b"HTTP/1.1 408"), (name, data[:200])
        assert closed and seconds < READ_TIMEOUT_S + 1.5, (name, seconds)
    data, closed, seconds = results["idle"]
    assert data == b"" and closed and seconds < KEEP_ALIVE_S + 1.5, seconds  # never sent a byte
    assert urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=2).status == 200


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "JPEG"])
def test_oversized_image_is_413_from_its_header(server: RunningServer, fmt: str) -> None:
    big = image_bytes(6000, 6000, fmt, smooth=False)  # 36 MP, a few hundred KB at most
    assert len(big) < 1_000_000
    before = metrics(server)["inventory_images_total"]
    start = time.perf_counter()
    r = httpx.post(
        server.predict_url(), content=big, headers={"content-type": f"image/{fmt.lower()}"}, timeout=30
    )
    seconds = time.perf_counter() - start
    assert r.status_code == 413 and "36,000,000 pixels" in r.json()["error"], r.text
    assert seconds < 0.25  # a full decode of the WebP alone takes ~0.4 s here
    assert metrics(server)["inventory_images_total"] == before


def test_request_over_its_total_pixels_is_413_before_any_decode(server: RunningServer) -> None:
    img = image_bytes(2000, 1900, "WEBP")  # 3.8 MP each, under --max_pixels
    before = metrics(server)["inventory_images_total"]
    r = httpx.post(server.predict_url(), content=v1([img] * 11), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max_request_pixels" in r.json()["error"], r.text
    assert "instance 10" in r.json()["error"]
    ok = httpx.post(server.predict_url(), content=v1([img] * 8), headers={"content-type": "application/json"})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 8
    assert metrics(server)["inventory_images_total"] == before + 8


async def impatient_burst(
    port: int, body: bytes, clients: int, seconds: float, timeout: float
) -> list[tuple[int | None, float, bytes | None]]:
    """``clients`` closed-loop clients, each request on a new connection with a ``timeout``-second
    deadline (sent as Envoy's header too): ``(status or None on timeout, seconds, Retry-After)``."""
    request = http_request(
        PREDICT,
        body,
        "image/png",
        f"X-Envoy-Expected-Rq-Timeout-Ms: {int(timeout * 1000)}\r\nConnection: close\r\n",
    )
    results: list[tuple[int | None, float, bytes | None]] = []
    stop = time.monotonic() + seconds

    async def one() -> None:
        start = time.monotonic()
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            retry = re.search(rb"(?im)^retry-after: *(\S+)", head)
            results.append((int(head.split()[1]), time.monotonic() - start, retry and retry.group(1)))
        except TimeoutError:
            results.append((None, time.monotonic() - start, None))
        finally:
            if writer is not None:
                writer.close()

    async def client() -> None:
        while time.monotonic() < stop:
            await one()

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def test_burst_of_impatient_clients_is_shed_fast_with_memory_bounded(
    server: RunningServer, jpegs: list[bytes]
) -> None:
    from serving.admission import AdmissionLimits, memory_bound_bytes

    pid = server.proc.pid
    baseline = rss_mb(pid)
    peak = [baseline]
    stop = threading.Event()

    def watch_rss() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mb(pid))

    watcher = threading.Thread(target=watch_rss, daemon=True)
    body = image_bytes(1500, 1500, "PNG")  # ~20 ms to decode: ~50 images/s on the one decode thread
    before = metrics(server)
    with HealthProbe(server) as probe:
        watcher.start()
        try:
            results = asyncio.run(impatient_burst(port_of(server), body, clients=120, seconds=4, timeout=2.0))
        finally:
            stop.set()
            watcher.join(5)
    after = metrics(server)
    start = time.perf_counter()
    single = httpx.post(
        server.predict_url(), content=jpegs[0], headers={"content-type": "image/jpeg"}, timeout=10
    )
    single_s = time.perf_counter() - start

    statuses = [s for s, _, _ in results]
    shed = [(t, r) for s, t, r in results if s == 503]
    timeouts = statuses.count(None)
    ok = statuses.count(200)
    summary = f"{len(results)} requests: {ok} ok, {len(shed)} shed, {timeouts} timed out"
    assert ok > 0 and len(shed) > len(results) / 4, summary
    assert set(statuses) <= {200, 503, None}, summary
    assert timeouts <= 0.05 * len(results), summary
    assert all(r is not None and int(r) >= 1 for _, r in shed), "503 without Retry-After"
    shed_s = sorted(t for t, _ in shed)
    assert shed_s[int(0.9 * (len(shed_s) - 1))] < 0.5, (
        f"503s are not prompt: p90 {shed_s[-len(shed_s) // 10]:.2f}s"
    )
    assert probe.latencies and max(probe.latencies) < PROBE_TIMEOUT_S, max(probe.latencies)
    assert single.status_code == 200 and single_s < 1.0, single_s
    shed_metric = sum(
        after[k] - before.get(k, 0.0) for k in after if k.startswith("inventory_shed_requests_total{")
    )
    assert shed_metric >= len(shed)
    # Memory: what admission lets in, over the RSS before the burst, plus allocator slack.
    limits = AdmissionLimits(QUEUE_IMAGES, 4.0, 16 * 2**20)
    item = 4 * 3 * 64 * 64
    bound_mb = memory_bound_bytes(limits, item, 1, 4_000_000, 8 * item) / 2**20 + 64
    assert peak[0] - baseline < bound_mb, f"RSS {baseline:.0f} -> {peak[0]:.0f} MB, bound +{bound_mb:.0f} MB"
    p50 = shed_s[len(shed_s) // 2] * 1000
    print(f"\n{summary}; 503 p50 {p50:.0f} ms; RSS {baseline:.0f} -> {peak[0]:.0f} MB")
