"""Adaptive micro-batching of concurrent requests onto one inference engine.

A CNN does more work per second on a batch than on single images, but a request should not wait
long for company. :class:`MicroBatcher` runs ``workers`` inferences at a time, each on its own
thread; whatever arrives while they run forms the next batch (up to ``max_batch_size``), and an idle
worker only waits ``max_wait_ms`` for more before running what it has. Under light load the batch
is one image and latency is minimal; under heavy load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._queue: asyncio.Queue[_Item] | None = None
        self._tasks: list[asyncio.Task[None]] = []

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
        return list(await asyncio.gather(*(self.submit(x) for x in items)))

    def _ensure_started(self) -> None:
        # Started lazily on the serving event loop (the model loads before that loop exists).
        if not self._tasks or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            self._queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._run(i), name=f"micro-batcher-{i}") for i in range(self.workers)
            ]

    async def _collect(self, first: _Item) -> list[_Item]:
        assert self._queue is not None
        batch = [first]
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
        return batch

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
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [it for it in await self._collect(first) if not it.future.done()]
            if not batch:
                continue
            try:
                out, seconds = await loop.run_in_executor(
                    self._executor, self._run_batch, worker, [it.x for it in batch]
                )
            except Exception as e:  # one bad batch must not stop the server
                logger.exception("inference failed for a batch of %d", len(batch))
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(RuntimeError(f"inference failed: {e}"))
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch), seconds)
            for i, it in enumerate(batch):
                if not it.future.done():  # the client may have gone away
                    it.future.set_result({k: v[i] for k, v in out.items()})

    async def aclose(self) -> None:
        """Stop the worker and the inference thread (pending callers get CancelledError)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)
