"""Admission control: a bounded queue sized by measured throughput and a latency budget.

Without it an overloaded server queues everything: requests wait longer than their clients do, the
server computes answers nobody reads, and memory grows with the backlog until the pod is killed.
Here, as in Triton's queue policy and Envoy's overload manager, work that cannot be answered in time
is refused at once with 503 and ``Retry-After``, and work whose client left is dropped:

* at the door (headers only, before the body is read): :meth:`AdmissionController.enter` refuses a
  request when the images already admitted fill the queue limit, when its body would push the
  in-flight bodies past ``--max_inflight_mb``, or when the client's deadline header leaves less time
  than the queue ahead of it needs;
* once its images are counted (after parsing, before any decode): :meth:`AdmissionController.claim`
  refuses a request whose images do not fit;
* while it runs, :class:`AdmissionMiddleware` cancels it when the client disconnects or its deadline
  passes. Cancellation reaches the decode pool (jobs not started are dropped) and the micro-batcher
  (cancelled items are skipped), so nothing is decoded or inferred for a request nobody waits for.

The queue limit is ``min(--max_queue_images, throughput x --latency_budget_ms / 2)``: a full queue
answers in about half the budget, and the other half is margin before deadlines. Throughput starts
at a measurement taken after loading (decode and inference of a reference photo, so an upper bound:
it leaves out HTTP and parsing) and follows the images actually completed per second while the
queue is busy, so the limit tracks the machine the server really runs on.
"""

from __future__ import annotations

import contextvars
import io
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from serving.errors import OverloadedError

if TYPE_CHECKING:
    from serving.model import InventoryCounter

#: Reasons a request is shed (the ``reason`` label of ``inventory_shed_requests_total``).
QUEUE_FULL = "queue_full"  # the admitted images fill the queue limit
BODY_BUDGET = "body_budget"  # the in-flight request bodies would pass --max_inflight_mb
TOO_LATE = "too_late"  # the client's deadline is shorter than the wait ahead of it
DEADLINE = "deadline"  # admitted, but not answered before its deadline
DISCONNECTED = "disconnected"  # the client left before its answer
SHED_REASONS = (QUEUE_FULL, BODY_BUDGET, TOO_LATE, DEADLINE, DISCONNECTED)
#: Peak bytes per pixel while one image decodes (RGB(A) frame, conversion and resize buffers).
DECODE_BYTES_PER_PIXEL = 8
#: Copies of a request body alive at once: the bytes, the parsed JSON text, the decoded base64.
BODY_COPIES = 3
#: Share of the latency budget the queue may hold at the measured throughput. A full queue then
#: answers its last request in about half the budget: the other half absorbs the estimate's error
#: before requests reach their deadline.
QUEUE_SHARE = 0.5
#: the throughput estimate never sinks below this share of the rate measured at start-up
MIN_RATE_SHARE = 0.5


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission settings (flags in :mod:`serving.__main__`, validated by ``ServingOptions``)."""

    max_queue_images: int  # ceiling on admitted images, whatever the throughput
    latency_budget_s: float  # time an admitted request may take once its body has arrived
    max_inflight_bytes: int  # request bodies admitted at once


class ThroughputMeter:
    """Images per second the server completes while it has work, smoothed over windows of that time.

    Idle time does not count (a server waiting for requests says nothing about its speed), and every
    completion in busy time does: a batch releases all its images at once, so counting only those
    released while the queue stays full would see one image per batch. Light load (a request or two at
    a time, no batching) reads slower than the server can go; ``floor`` keeps the estimate from sinking
    below a fraction of the measured capacity for that reason.
    """

    def __init__(self, initial: float, *, window_s: float = 0.25, weight: float = 0.5, floor: float = 1.0):
        if initial <= 0:
            raise ValueError(f"initial throughput must be > 0, got {initial}")
        self.rate = max(floor, initial)
        self.window_s = window_s
        self.weight = weight
        self.floor = floor
        self._seconds = 0.0
        self._images = 0

    def record(self, busy_seconds: float, images: int) -> None:
        """Add a stretch of busy time and the images completed during it."""
        self._seconds += busy_seconds
        self._images += images
        if self._seconds >= self.window_s:
            sample = self._images / self._seconds
            self.rate = max(self.floor, (1 - self.weight) * self.rate + self.weight * sample)
            self._seconds, self._images = 0.0, 0


@dataclass
class Ticket:
    """One admitted request's share of the queue, until :meth:`AdmissionController.release`."""

    images: int = 0  # known once the body is parsed (claim); a body still arriving holds none
    body_bytes: int = 0  # received so far
    client_deadline: float = math.inf

    def deadline(self, now: float, budget_s: float) -> float:
        """When an answer stops being useful: the budget from now, or the client's own deadline."""
        return min(now + budget_s, self.client_deadline)


class AdmissionController:
    """Counts admitted images and body bytes and decides who gets in (single event loop; no locks)."""

    def __init__(
        self,
        limits: AdmissionLimits,
        meter: ThroughputMeter,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.meter = meter
        self.clock = clock
        self.on_shed = on_shed
        self.images = 0
        self.body_bytes = 0
        self._changed = clock()
        # The ticket of the request being handled, for code that runs inside it (the model).
        self._current: ContextVar[Ticket | None] = ContextVar(f"admission-{id(self)}", default=None)

    # Limits ------------------------------------------------------------------------------------
    def queue_limit(self) -> int:
        """Images the queue may hold: what its share of the budget allows at the measured throughput."""
        by_budget = math.floor(self.meter.rate * self.limits.latency_budget_s * QUEUE_SHARE)
        return max(1, min(self.limits.max_queue_images, by_budget))

    def expected_wait_s(self, images: int | None = None) -> float:
        """Seconds to work through ``images`` (default: the admitted ones) at the measured rate."""
        return (self.images if images is None else images) / self.meter.rate

    def retry_after_s(self) -> int:
        """Whole seconds until the admitted images should have drained (1 to 60)."""
        return min(60, max(1, math.ceil(self.expected_wait_s())))

    # Lifecycle of a request --------------------------------------------------------------------
    def enter(self, content_length: int | None, client_timeout_s: float | None) -> Ticket:
        """Let a request in from its headers, or raise :class:`OverloadedError`.

        Nothing is reserved yet: a body still arriving holds only the bytes it has sent, so clients
        that upload slowly cannot hold the queue (they meet the read timeout instead).
        """
        now = self.clock()
        limit = self.queue_limit()
        busy = self.images > 0
        if busy and self.images + 1 > limit:
            raise self._shed(QUEUE_FULL, f"{self.images} images are queued, the limit is {limit}")
        if busy and client_timeout_s is not None and self.expected_wait_s(self.images + 1) > client_timeout_s:
            raise self._shed(
                TOO_LATE,
                f"the queue needs ~{self.expected_wait_s(self.images + 1) * 1000:.0f} ms, "
                f"the client waits {client_timeout_s * 1000:.0f} ms",
            )
        declared = content_length or 0
        if self.body_bytes > 0 and self.body_bytes + declared > self.limits.max_inflight_bytes:
            raise self._shed(
                BODY_BUDGET,
                f"{self.body_bytes:,} bytes of request bodies are in flight, "
                f"the limit is {self.limits.max_inflight_bytes:,}",
            )
        ticket = Ticket()
        if client_timeout_s is not None:
            ticket.client_deadline = now + client_timeout_s
        return ticket

    def add_body_bytes(self, ticket: Ticket, n: int) -> None:
        """Count a chunk of a body as it arrives; past the in-flight budget, raise OverloadedError."""
        if n <= 0:
            return
        if self.body_bytes + n > self.limits.max_inflight_bytes and self.body_bytes > ticket.body_bytes:
            raise self._shed(
                BODY_BUDGET,
                f"{self.body_bytes + n:,} bytes of request bodies in flight, "
                f"over the limit of {self.limits.max_inflight_bytes:,}",
            )
        ticket.body_bytes += n
        self._change(self.clock(), body_bytes=n)

    def claim(self, n: int) -> None:
        """The current request holds ``n`` images: keep them queued or raise :class:`OverloadedError`.

        Called by the model once the body is parsed, before anything is decoded. A request alone in
        the queue is always admitted, so a request of ``--max_instances`` images is never refused
        just for its size. Outside an admitted request (in-process tests) it does nothing.
        """
        ticket = self._current.get()
        if ticket is None or n == ticket.images:
            return
        now = self.clock()
        others = self.images - ticket.images
        if others > 0:
            limit = self.queue_limit()
            if others + n > limit:
                raise self._shed(
                    QUEUE_FULL, f"{n} images do not fit: {others} are queued, the limit is {limit}"
                )
            time_left = ticket.client_deadline - now
            if self.expected_wait_s(others + n) > time_left:
                raise self._shed(
                    TOO_LATE,
                    f"{n} images need ~{self.expected_wait_s(others + n) * 1000:.0f} ms, "
                    f"the client waits {max(0.0, time_left) * 1000:.0f} ms more",
                )
        self._change(now, images=n - ticket.images)
        ticket.images = n

    def release(self, ticket: Ticket, *, served: bool) -> None:
        """The request is over; ``served``: its images were answered (they count as throughput)."""
        self._change(
            self.clock(),
            images=-ticket.images,
            body_bytes=-ticket.body_bytes,
            done=ticket.images if served else 0,
        )

    def shed(self, reason: str) -> None:
        """Count a request dropped after admission (deadline passed, client gone)."""
        if self.on_shed is not None:
            self.on_shed(reason)

    def bind(self, ticket: Ticket) -> contextvars.Token[Ticket | None]:
        """Make ``ticket`` the current request's (in the request's own context) until :meth:`unbind`."""
        return self._current.set(ticket)

    def unbind(self, token: contextvars.Token[Ticket | None]) -> None:
        self._current.reset(token)

    # Internals ---------------------------------------------------------------------------------
    def _change(self, now: float, *, images: int = 0, body_bytes: int = 0, done: int = 0) -> None:
        # A stretch with admitted work is busy time; what completes at its end counts.
        if self.images > 0:
            self.meter.record(now - self._changed, done)
        self._changed = now
        self.images += images
        self.body_bytes += body_bytes

    def _shed(self, reason: str, detail: str) -> OverloadedError:
        self.shed(reason)
        retry = self.retry_after_s()
        return OverloadedError(
            f"server overloaded ({reason}): {detail}; retry after {retry} s",
            reason=reason,
            retry_after_s=retry,
        )


# ----------------------------------------------------------------------------- sizing


def reference_photo(width: int = 800, height: int = 600, seed: int = 0) -> bytes:
    """A synthetic bin photo as a JPEG: gradients plus noise, slower to decode than a real one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def pipeline_rate(decode_s: float, batch_s: float, batch: int, decode_threads: int, workers: int) -> float:
    """Images per second through decode then inference, both on the same cores (their costs add)."""
    per_image = decode_s / max(1, decode_threads) + batch_s / (max(1, batch) * max(1, workers))
    return 1.0 / per_image


def measure_throughput(model: InventoryCounter, repeats: int = 3) -> float:
    """Time the decode of :func:`reference_photo` and a full batch on the loaded model (~0.3 s)."""
    from serving.model import cpu_count, decode_one

    counter, options = model.counter, model.options
    if counter is None or model.batcher is None:
        raise RuntimeError("measure_throughput needs a loaded model")
    photo = reference_photo()
    decode_s = _best_of(repeats, lambda: decode_one(photo, counter.spec, options.max_pixels))
    batch = np.zeros((options.max_batch_size, *counter.item_shape), dtype=np.float32)
    batch_s = _best_of(repeats, lambda: counter.run(batch))
    threads = min(options.decode_threads or cpu_count(), cpu_count())
    return pipeline_rate(decode_s, batch_s, options.max_batch_size, threads, model.batcher.workers)


def _best_of(n: int, fn: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bound_bytes(
    limits: AdmissionLimits, item_bytes: int, decode_threads: int, max_pixels: int, batch_bytes: int
) -> int:
    """Worst case the admitted work can add to the process's memory, whatever the load.

    Request bodies (each alive as bytes, parsed JSON text and decoded base64), decoded model inputs
    for every admitted image, the images being decoded at ``--max_pixels``, and the batch buffers.
    """
    bodies = BODY_COPIES * limits.max_inflight_bytes
    inputs = limits.max_queue_images * item_bytes
    decoding = decode_threads * DECODE_BYTES_PER_PIXEL * max_pixels
    return bodies + inputs + decoding + batch_bytes


# ----------------------------------------------------------------------------- metrics


class AdmissionMetrics:
    """Prometheus metrics of admission (same registry as KServe's, so ``/metrics`` shows them)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.shed = Counter(
            "inventory_shed_requests",
            "requests answered 503 or dropped by admission control, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in SHED_REASONS:
            self.shed.labels(reason=reason)
        self.admitted = Counter(
            "inventory_admitted_requests", "inference requests let in by admission control", registry=registry
        )
        self._gauges = {
            name: Gauge(name, doc, registry=registry)
            for name, doc in (
                ("inventory_queue_images", "images admitted and not yet answered"),
                (
                    "inventory_queue_limit_images",
                    "images the queue may hold now (throughput x budget, capped)",
                ),
                ("inventory_inflight_body_bytes", "request body bytes admitted and not yet answered"),
                ("inventory_throughput_images_per_second", "measured images per second while busy"),
            )
        }

    def watch(self, controller: AdmissionController) -> None:
        """Read the gauges from ``controller`` at scrape time (nothing to update per request)."""
        g = self._gauges
        g["inventory_queue_images"].set_function(lambda: controller.images)
        g["inventory_queue_limit_images"].set_function(controller.queue_limit)
        g["inventory_inflight_body_bytes"].set_function(lambda: controller.body_bytes)
        g["inventory_throughput_images_per_second"].set_function(lambda: controller.meter.rate)
        controller.on_shed = lambda reason: self.shed.labels(reason=reason).inc()

    def observe_admitted(self) -> None:
        self.admitted.inc()


def build_admission(model: InventoryCounter, metrics: AdmissionMetrics | None = None) -> AdmissionController:
    """Measure the loaded model's throughput and set up admission from its options; log the sizing."""
    from serving.model import cpu_count

    options = model.options
    assert model.counter is not None and model.batcher is not None
    limits = AdmissionLimits(
        max_queue_images=options.max_queue_images,
        latency_budget_s=options.latency_budget_ms / 1000.0,
        max_inflight_bytes=int(options.max_inflight_mb * 1024 * 1024),
    )
    rate = measure_throughput(model)
    # Without batching (light load) a server reads about a third of its batched speed here: never
    # size the queue from less than half of what it measured at full batches.
    controller = AdmissionController(limits, ThroughputMeter(rate, floor=rate * MIN_RATE_SHARE))
    if metrics is not None:
        metrics.watch(controller)
    item_bytes = 4 * int(np.prod(model.counter.item_shape))
    bound = memory_bound_bytes(
        limits,
        item_bytes,
        options.decode_threads or cpu_count(),
        options.max_pixels,
        model.batcher.workers * options.max_batch_size * item_bytes,
    )
    logging.getLogger("serving.admission").info(
        "admission: ~%.0f images/s measured (decode + inference), budget %.0f ms -> queue limit %d "
        "images (ceiling %d), %.0f MB of bodies in flight; admitted work adds at most ~%.0f MB",
        rate,
        options.latency_budget_ms,
        controller.queue_limit(),
        limits.max_queue_images,
        options.max_inflight_mb,
        bound / 2**20,
    )
    return controller
