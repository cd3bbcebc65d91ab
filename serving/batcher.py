"""Adaptive micro-batching of concurrent requests onto one inference engine.

A CNN does more work per second on a batch than on single images, but a request should not wait
long for company. :class:`MicroBatcher` runs ``workers`` inferences at a time, each on its own
thread; whatever arrives while they run forms the next batch (up to ``max_batch_size``), and an idle
worker only waits ``max_wait_ms`` for more before running what it has. Under light load the batch
is one image and latency is minimal; under heavy load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("serving.batcher")

#: ``infer(batch) -> {output name: array with the batch on axis 0}``; runs on the inference thread.
InferFn = Callable[[np.ndarray], dict[str, np.ndarray]]
#: Called after each batch with ``(batch size, seconds spent in inference)``.
BatchObserver = Callable[[int, float], None]


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[dict[str, np.ndarray]]


class MicroBatcher:
    """Collect single items into batches, run them on one thread, hand each caller its row."""

    def __init__(
        self,
        infer: InferFn,
        item_shape: tuple[int, ...],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 2.0,
        workers: int = 1,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._infer = infer
        self._item_shape = tuple(item_shape)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self.workers = workers
        # Preallocated inputs, one per worker; a worker writes only its own, one batch at a time.
        self._buffers = [
            np.empty((max_batch_size, *self._item_shape), dtype=np.float32) for _ in range(workers)
        ]
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one item (``item_shape`` float32) and wait for its outputs (one row of each)."""
        if x.shape != self._item_shape:
            raise ValueError(f"expected an item of shape {self._item_shape}, got {x.shape}")
        self._ensure_started()
        assert self._queue is not None
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(x, future))
        return await future

    async def submit_many(self, items: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Queue several items at once (one request with many images); results keep their order."""
        if len(items) == 1:  # the common case: no gather task per request
            return [await self.submit(items[0])]
        return list(await asyncio.gather(*(self.submit(x) for x in items)))

    def _ensure_started(self) -> None:
        # Started lazily on the serving event loop (the model loads before that loop exists).
        if self._closed:
            raise RuntimeError("the micro-batcher is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop: whatever belonged to the old one cannot run here any more.
            for t in self._tasks:
                t.cancel()
            self._loop = loop
            self._queue = asyncio.Queue()
            self._tasks = [self._start_worker(i) for i in range(self.workers)]
            return
        # Same loop: restart only a worker that died and keep the queue, so queued items are served.
        for i, t in enumerate(self._tasks):
            if t.done():
                if not t.cancelled() and t.exception() is not None:
                    logger.error("micro-batcher worker %d died: %r; restarting it", i, t.exception())
                self._tasks[i] = self._start_worker(i)

    def _start_worker(self, worker: int) -> asyncio.Task[None]:
        assert self._loop is not None
        return self._loop.create_task(self._run(worker), name=f"micro-batcher-{worker}")

    async def _collect(self, batch: list[_Item]) -> None:
        # Appends to ``batch`` in place, so a worker cancelled mid-collection still knows its items.
        assert self._queue is not None
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    def _run_batch(self, worker: int, arrays: list[np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        n = len(arrays)
        view = self._buffers[worker][:n]
        for i, a in enumerate(arrays):
            view[i] = a
        start = time.perf_counter()
        out = self._infer(view)
        return out, time.perf_counter() - start

    async def _run(self, worker: int) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        batch: list[_Item] = []
        try:
            while True:
                batch = [await queue.get()]
                await self._collect(batch)
                batch = [it for it in batch if not it.future.done()]
                if not batch:
                    continue
                try:
                    out, seconds = await loop.run_in_executor(
                        self._executor, self._run_batch, worker, [it.x for it in batch]
                    )
                    for i, it in enumerate(batch):
                        if not it.future.done():  # the client may have gone away
                            it.future.set_result({k: v[i] for k, v in out.items()})
                except Exception as e:  # one bad batch must not stop the server
                    logger.exception("inference failed for a batch of %d", len(batch))
                    _fail(batch, RuntimeError(f"inference failed: {e}"))
                    batch = []
                    continue
                size, batch = len(batch), []
                self._observe(size, seconds)
        finally:
            # Cancelled (closed) or died: nobody else will answer the items this worker holds.
            _fail(batch, RuntimeError("the micro-batcher stopped before running this item"))

    def _observe(self, size: int, seconds: float) -> None:
        # Metrics only: a failing observer is logged and must never cost a caller its answer.
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds)
        except Exception:
            logger.exception("batch observer failed (batch of %d)", size)

    def _fail_queued(self) -> None:
        queue = self._queue
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()], RuntimeError("the micro-batcher is closed"))

    def _shutdown_on_loop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._fail_queued()

    def close(self) -> None:
        """Stop accepting items, fail every queued one and release the inference threads.

        Synchronous, for shutdown hooks; callable from the serving loop or from another thread.
        Items a worker is running get their error once the loop processes the cancellation.
        """
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._shutdown_on_loop()
            else:
                loop.call_soon_threadsafe(self._shutdown_on_loop)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Stop the workers and the inference threads; every pending caller gets a RuntimeError."""
        self._closed = True
        tasks = list(self._tasks)
        self._shutdown_on_loop()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_queued()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _fail(items: list[_Item], error: Exception) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(error)
