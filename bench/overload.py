"""Overload: impatient clients arriving faster than the server can answer (open loop).

Requests arrive at a fixed ``rate`` per second for ``duration`` seconds whatever the server does (a
closed-loop benchmark slows down with the server and never overloads it), and each client gives up
after ``timeout`` seconds, as a robot on a conveyor would. What counts:

* goodput: answers with 200 within the client's timeout, per minute;
* shed rate: the share of requests the server refused at once (503, or 429);
* timeouts: requests whose client gave up (work a server without admission control still does);
* p99 of the accepted requests' latency;
* the server's peak RSS, sampled from ``/proc/<pid>/status`` every 50 ms.

Traffic goes to loopback only and is bounded: ``rate * duration`` requests at most.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_REQUESTS = 20_000


def rss_mb(pid: int) -> float | None:
    """Resident memory of a local process in MB (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def run_overload(
    url: str,
    images: Sequence[bytes],
    *,
    rate: float,
    duration: float,
    timeout: float = 1.0,
    server_pid: int | None = None,
    content_type: str = "image/jpeg",
) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``duration`` s, each abandoned after ``timeout`` s; summarize."""
    import aiohttp

    total = int(rate * duration)
    if not 0 < total <= MAX_REQUESTS:
        raise ValueError(f"rate x duration must be in (0, {MAX_REQUESTS}] requests, got {total}")
    statuses: Counter[str] = Counter()
    accepted_s: list[float] = []
    peak = {"rss_mb": rss_mb(server_pid) if server_pid else None}
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while server_pid is not None and not stop.is_set():
            now = rss_mb(server_pid)
            if now is not None and (peak["rss_mb"] is None or now > peak["rss_mb"]):
                peak["rss_mb"] = now
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as client:

        async def one(body: bytes) -> None:
            sent = time.perf_counter()
            try:
                async with client.post(url, data=body, headers={"content-type": content_type}) as r:
                    await r.read()
                    statuses[str(r.status)] += 1
                    if r.status == 200:
                        accepted_s.append(time.perf_counter() - sent)
            except TimeoutError:
                statuses["timeout"] += 1
            except aiohttp.ClientError:
                statuses["connection error"] += 1

        sampler = asyncio.create_task(sample_rss())
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(images[i % len(images)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        stop.set()
        await sampler
    ms = np.asarray(accepted_s) * 1000
    shed = statuses.get("503", 0) + statuses.get("429", 0)
    return {
        "offered_per_minute": round(rate * 60, 1),
        "client_timeout_s": timeout,
        "requests": total,
        "seconds": round(elapsed, 2),
        "statuses": dict(statuses),
        "goodput_per_minute": round(len(ms) / duration * 60, 1),
        "shed_rate": round(shed / total, 3),
        "timeout_rate": round(statuses.get("timeout", 0) / total, 3),
        "accepted_p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "accepted_p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "peak_rss_mb": round(peak["rss_mb"], 1) if peak["rss_mb"] is not None else None,
    }
