"""Closed-loop HTTP load test of the model server with real JPEGs.

``python bench/loadtest.py --url URL --images DIR --concurrency 1,4,8,16 --duration 30 [--baseline]``

For each concurrency level, that many clients each send one raw ``image/jpeg`` request, wait for
the answer and send the next, for ``--duration`` seconds (after a short warm-up). Reported per
level: invocations/minute, p50/p95/p99 latency and errors, as a table, JSON and a PNG. With
``--baseline`` the naive server (``bench/naive.py``) is started on 127.0.0.1 and measured in the
same run, and the throughput ratio is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/loadtest.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from components.common import (  # noqa: E402
    ConfigError,
    atomic_write_json,
    format_table,
    parse_int_list,
    run_cli,
)

#: the naive baseline server, started as a script next to this one
NAIVE_SCRIPT = Path(__file__).resolve().with_name("naive.py")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_DURATION_S = 600.0


@dataclass
class LevelResult:
    """One concurrency level's outcome."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    per_minute: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    server_cores: float | None = None  # CPU cores the server process used (when its pid is known)
    server_cpu_ms_per_request: float | None = None
    client_cores: float | None = None  # CPU the load generator itself used (it shares the machine)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a local process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check_url(url: str, allow_remote: bool = False) -> None:
    """Only load-test loopback servers unless told otherwise (a load test is a small DoS)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--url must be an http(s) URL like http://127.0.0.1:8080/invocations, got {url!r}")
    if parsed.hostname not in LOCAL_HOSTS and not allow_remote:
        raise ConfigError(f"refusing to load-test {parsed.hostname}: only localhost unless --allow-remote")


def load_images(images_dir: Path, n: int, seed: int = 0) -> list[bytes]:
    """``n`` real JPEGs from ``images_dir`` (a random but reproducible sample), read into memory."""
    if not images_dir.is_dir():
        raise ConfigError(
            f"--images {images_dir} is not a directory of JPEGs (e.g. ../shared/abid/bin-images)"
        )
    paths = sorted(images_dir.glob("*.jpg"))
    if not paths:
        raise ConfigError(f"no .jpg files in {images_dir}")
    random.Random(seed).shuffle(paths)
    return [p.read_bytes() for p in paths[:n]]


def summarize(concurrency: int, latencies: Sequence[float], errors: int, seconds: float) -> LevelResult:
    """Percentiles of successful requests' latencies (seconds in, ms out)."""
    ms = np.asarray(latencies, dtype=np.float64) * 1000
    pct = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return LevelResult(
        concurrency=concurrency,
        requests=len(ms),
        errors=errors,
        seconds=round(seconds, 3),
        per_minute=round(len(ms) / seconds * 60, 1) if seconds > 0 else 0.0,
        p50_ms=round(float(pct[0]), 2),
        p95_ms=round(float(pct[1]), 2),
        p99_ms=round(float(pct[2]), 2),
        mean_ms=round(float(ms.mean()), 2) if len(ms) else float("nan"),
    )


async def run_level(
    url: str,
    images: Sequence[bytes],
    concurrency: int,
    duration: float,
    warmup: float = 2.0,
    content_type: str = "image/jpeg",
    server_pid: int | None = None,
) -> LevelResult:
    """``concurrency`` closed-loop clients for ``warmup + duration`` s; only the last part counts.

    With ``server_pid`` the server's CPU time over the measured window is recorded too: on a shared
    machine, CPU ms per request says what the server would do on dedicated cores.
    """
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = iter(range(1 << 62))
    # aiohttp, not httpx: the load generator shares the machine with the server, and httpx spends
    # ~4 ms of client CPU per request here against aiohttp's ~1 ms, which the server would lose.
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60.0)
    client_cpu0 = own_cpu_seconds()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration

        async def worker() -> None:
            nonlocal errors
            headers = {"content-type": content_type}
            while (now := time.perf_counter()) < end:
                body = images[next(counter) % len(images)]
                try:
                    async with client.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                done = time.perf_counter()
                if now >= measure_from and done <= end:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors += 1

        async def cpu_window() -> tuple[float | None, float | None]:
            if server_pid is None:
                return None, None
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            before = process_cpu_seconds(server_pid)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            return before, process_cpu_seconds(server_pid)

        *_, (cpu0, cpu1) = await asyncio.gather(*(worker() for _ in range(concurrency)), cpu_window())
        elapsed = time.perf_counter() - start
    result = summarize(concurrency, latencies, errors, duration)
    result.client_cores = round((own_cpu_seconds() - client_cpu0) / elapsed, 3)
    if cpu0 is not None and cpu1 is not None:
        used = cpu1 - cpu0
        result.server_cores = round(used / duration, 2)
        done = result.requests + result.errors
        result.server_cpu_ms_per_request = round(used * 1000 / done, 1) if done else None
    return result


def run_levels(
    url: str,
    images: Sequence[bytes],
    levels: Sequence[int],
    duration: float,
    warmup: float = 2.0,
    server_pid: int | None = None,
) -> list[LevelResult]:
    """All levels against one server, printing each as it finishes."""
    results = []
    for c in levels:
        r = asyncio.run(run_level(url, images, c, duration, warmup, server_pid=server_pid))
        cpu = (
            f", server {r.server_cores} cores, {r.server_cpu_ms_per_request} CPU ms/req" if server_pid else ""
        )
        print(
            f"  {url} c={c}: {r.per_minute:.0f}/min p99 {r.p99_ms:.0f} ms errors {r.errors}{cpu}", flush=True
        )
        results.append(r)
    return results


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200 (or fail if ``proc`` exits)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become ready within {timeout:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_naive(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``bench/naive.py`` on 127.0.0.1 and a free port; returns the process and its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(NAIVE_SCRIPT), "--model_dir", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ping", proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, f"{base}/invocations"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def plot(results: dict[str, list[LevelResult]], path: Path) -> Path:
    """Throughput and p99 latency vs concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in results.items():
        c = [r.concurrency for r in levels]
        ax1.plot(c, [r.per_minute for r in levels], marker="o", label=name)
        ax2.plot(c, [r.p99_ms for r in levels], marker="o", label=name)
    ax1.set(xlabel="concurrent clients", ylabel="invocations / minute", title="Throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p99 latency (ms)", title="Tail latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def table(results: dict[str, list[LevelResult]]) -> str:
    rows = [
        [name, r.concurrency, f"{r.per_minute:.0f}", r.p50_ms, r.p95_ms, r.p99_ms, r.errors,
         "-" if r.server_cores is None else r.server_cores,
         "-" if r.server_cpu_ms_per_request is None else r.server_cpu_ms_per_request,
         "-" if r.client_cores is None else r.client_cores]
        for name, levels in results.items()
        for r in levels
    ]  # fmt: skip
    headers = [
        "server",
        "clients",
        "inv/min",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "cores",
        "CPU ms/req",
        "client cores",
    ]
    return format_table(rows, headers)


def run_benchmark(
    url: str,
    images_dir: Path,
    levels: Sequence[int],
    duration: float,
    *,
    out_json: Path,
    out_png: Path | None = None,
    baseline_model_dir: Path | None = None,
    n_images: int = 200,
    warmup: float = 2.0,
    extra: dict[str, Any] | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Measure the server at ``url`` (and the naive baseline if a model dir is given); write results."""
    if not 0 < duration <= MAX_DURATION_S:
        raise ConfigError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds, got {duration}")
    if any(c < 1 or c > 256 for c in levels):
        raise ConfigError(f"--concurrency levels must be in [1, 256], got {list(levels)}")
    images = load_images(images_dir, n_images)
    load_before = os.getloadavg()
    results: dict[str, list[LevelResult]] = {
        "server": run_levels(url, images, levels, duration, warmup, server_pid)
    }
    if baseline_model_dir is not None:
        proc, naive_url = start_naive(baseline_model_dir)
        try:
            results["naive baseline"] = run_levels(naive_url, images, levels, duration, warmup, proc.pid)
        finally:
            stop_process(proc)
    report: dict[str, Any] = {
        "url": url,
        "images": {
            "dir": str(images_dir),
            "n": len(images),
            "mean_bytes": int(np.mean([len(b) for b in images])),
        },
        "duration_s": duration,
        "warmup_s": warmup,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "results": {k: [asdict(r) for r in v] for k, v in results.items()},
        **(extra or {}),
    }
    if "naive baseline" in results:
        report["ratio_vs_baseline"] = {
            str(s.concurrency): round(s.per_minute / b.per_minute, 2) if b.per_minute else None
            for s, b in zip(results["server"], results["naive baseline"], strict=True)
        }
    atomic_write_json(out_json, report)
    if out_png is not None:
        plot(results, out_png)
    print(table(results))
    if "ratio_vs_baseline" in report:
        print("throughput ratio server / naive baseline:", report["ratio_vs_baseline"])
    return report


def _run(args: argparse.Namespace) -> int:
    check_url(args.url, args.allow_remote)
    if args.baseline and args.model_dir is None:
        raise ConfigError("--baseline needs --model_dir (the naive server loads model.pt from it)")
    levels = parse_int_list(args.concurrency, name="--concurrency")
    run_benchmark(
        args.url,
        args.images,
        levels,
        args.duration,
        out_json=args.out,
        out_png=args.plot or args.out.with_suffix(".png"),
        baseline_model_dir=args.model_dir if args.baseline else None,
        n_images=args.n_images,
        warmup=args.warmup,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/loadtest.py", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="prediction URL, e.g. http://127.0.0.1:8080/invocations")
    p.add_argument("--images", required=True, type=Path, help="directory of real JPEGs (bin-images/)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    p.add_argument("--n_images", type=int, default=200, help="JPEGs preloaded and cycled through")
    p.add_argument(
        "--baseline", action="store_true", help="also measure the naive server (needs --model_dir)"
    )
    p.add_argument("--model_dir", type=Path, default=None, help="model for the naive baseline (model.pt)")
    p.add_argument("--out", type=Path, default=Path("bench/results/serve.json"), help="JSON results")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default: next to --out)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-localhost --url")
    return run_cli(p, _run, argv, log_level="WARNING")


if __name__ == "__main__":
    sys.exit(main())
