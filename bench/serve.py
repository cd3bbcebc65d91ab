"""``make bench-serve``: load test of the model server against the naive baseline on real ABID JPEGs.

Starts ``python -m serving`` on 127.0.0.1 with the model from ``--model_dir`` (default: an untrained
224 px ResNet18 exported to a temp dir, which costs the same per image as a trained one), optionally
adds the int8 model (calibrated and gated on labelled ABID images), and measures, in one run:

* the model-only ceiling (:mod:`bench.ceiling`): onnxruntime alone on the file the server serves, with
  the server's threads, at batch 16;
* the server at 1, 4, 8 and 16 closed-loop clients (:mod:`bench.loadtest`), and the naive baseline;
* overload (:mod:`bench.overload`): impatient clients (1 s timeout) arriving at about 4x the
  capacity measured at 8 clients: goodput, shed rate, p99 of the accepted requests, peak RSS;
* a 1-CPU pod (the kind overlay's size): the server and the ceiling pinned to one core, the clients
  on the other.

It writes ``bench/results/serve.json`` and ``serve.png``. Targets (checked and printed, never
asserted): at 8 clients >= 90% of the model-only ceiling, p99 <= 200 ms, >= 5x the naive baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.loadtest import free_port, run_benchmark, stop_process, wait_http  # noqa: E402
from components.common import ConfigError, parse_int_list, setup_logging  # noqa: E402

DEFAULT_ABID = REPO_ROOT.parent / "shared" / "abid"
RESULTS = REPO_ROOT / "bench" / "results"
TARGET = {"concurrency": 8, "share_of_ceiling": 0.9, "p99_ms": 200, "ratio": 5.0}
#: overload: arrivals at this multiple of the capacity measured at TARGET["concurrency"] clients
OVERLOAD_FACTOR = 4.0
OVERLOAD_TIMEOUT_S = 1.0


def make_bench_model(out_dir: Path, image_size: int) -> Path:
    """Untrained ResNet18 in the serving contract (speed does not depend on the weights)."""
    import torch

    from components.model import build_model, export_onnx
    from components.modelspec import ONNX_FILE, STATE_DICT_FILE, ModelSpec
    from components.preprocess import PreprocessSpec

    torch.set_num_threads(2)
    torch.manual_seed(0)
    classes = (1, 2, 3, 4, 5)
    model = build_model(len(classes), "classification").eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(model, "classification", classes, image_size, out_dir / ONNX_FILE)
    torch.save(model.state_dict(), out_dir / STATE_DICT_FILE)
    spec = ModelSpec(classes=classes, preprocess=PreprocessSpec(image_size=image_size))
    spec.params = {"note": "untrained weights for serving benchmarks"}
    spec.save(out_dir)
    return out_dir


def abid_manifests(abid: Path, out_dir: Path, n_calib: int, n_eval: int) -> tuple[Path, Path]:
    """Two disjoint labelled manifests (absolute paths) from ABID's file_list.json."""
    from components.manifest import ManifestRow, write_manifest

    file_list = json.loads((abid / "file_list.json").read_text())
    items = [
        (int(count), abid / "bin-images" / f"{Path(meta).stem}.jpg")
        for count, metas in file_list.items()
        for meta in metas
    ]
    items = [(c, p) for c, p in items if c in (1, 2, 3, 4, 5) and p.is_file()]
    random.Random(0).shuffle(items)
    rows = [ManifestRow(p.stem, c, str(p), "", 0, 0, "abid") for c, p in items[: n_calib + n_eval]]
    calib = write_manifest(out_dir / "calib.csv", rows[:n_calib])
    evaluation = write_manifest(out_dir / "eval.csv", rows[n_calib:])
    return calib, evaluation


@contextmanager
def running_server(
    cmd: list[str], log_path: Path, cpus: set[int] | None = None
) -> Iterator[subprocess.Popen]:
    """The model server as a child process (pinned to ``cpus`` if given), ready, stopped afterwards."""
    port = int(cmd[cmd.index("--http_port") + 1])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run this process (and threads it starts meanwhile, e.g. onnxruntime's) on ``cpus`` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server_cmd(model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "serving", "--model_dir", str(model_dir), "--http_host", "127.0.0.1",
            "--http_port", str(port), "--int8", args.int8, "--max_batch_size", str(args.max_batch_size),
            "--max_wait_ms", str(args.max_wait_ms)]  # fmt: skip


def one_cpu_pod(
    model_dir: Path, images: list[bytes], args: argparse.Namespace, log_path: Path
) -> dict[str, Any] | None:
    """The kind overlay's replica (1 CPU): server and ceiling pinned to core 0, clients on core 1."""
    from dataclasses import asdict

    from bench.ceiling import model_only_ceiling
    from bench.loadtest import run_level

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("  1-CPU pod: skipped (needs two cores: one for the server, one for the clients)")
        return None
    server_core, client_core = {cores[0]}, {cores[1]}
    with pinned(server_core):
        ceiling = model_only_ceiling(model_dir, images, threads=1, duration=args.duration, int8=args.int8)
    port = free_port()
    with (
        running_server(server_cmd(model_dir, port, args), log_path, server_core) as proc,
        pinned(client_core),
    ):
        url = f"http://127.0.0.1:{port}/v1/models/inventory-counter:predict"
        level = asyncio.run(run_level(url, images, 8, args.duration, args.warmup, server_pid=proc.pid))
    share = round(level.per_minute / ceiling["per_minute"], 3) if ceiling["per_minute"] else None
    print(f"  1-CPU pod at 8 clients: {level.per_minute:.0f}/min, p99 {level.p99_ms:.0f} ms, "
          f"{share} of its ceiling {ceiling['per_minute']:.0f}/min")  # fmt: skip
    return {"ceiling": ceiling, "server_8_clients": asdict(level), "share_of_ceiling": share}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", type=Path, default=None, help="exported model (default: untrained 224 px)")
    p.add_argument("--image_size", type=int, default=224, help="size of the default untrained model")
    p.add_argument("--abid", type=Path, default=Path(os.environ.get("ABID_DIR", DEFAULT_ABID)))
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level and server")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--int8", choices=("auto", "on", "off"), default="auto", help="server's --int8")
    p.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                   help="make the int8 model first if the model dir has none")  # fmt: skip
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--overload", action=argparse.BooleanOptionalAction, default=True,
                   help=f"impatient clients at {OVERLOAD_FACTOR:g}x the capacity at 8 clients")  # fmt: skip
    p.add_argument("--one_cpu", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a 1-CPU pod (server pinned to one core)")  # fmt: skip
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--max_wait_ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    images_dir = args.abid / "bin-images"
    if not images_dir.is_dir():
        print(f"error: no ABID images at {images_dir}; set ABID_DIR or --abid", file=sys.stderr)
        return 2
    levels = parse_int_list(args.concurrency, name="--concurrency")
    from bench.ceiling import model_only_ceiling
    from bench.loadtest import load_images
    from bench.overload import run_overload
    from serving.model import cpu_count

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmpdir = Path(tmp)
        model_dir = args.model_dir or make_bench_model(tmpdir / "model", args.image_size)
        from components.modelspec import load_model_spec

        spec = load_model_spec(model_dir)
        gate: dict[str, Any] | None = None
        if args.quantize and args.int8 != "off" and not spec.onnx_int8_file:
            from components.quantize import quantize_model

            print("quantizing (calibration + accuracy gate on labelled ABID images) ...", flush=True)
            calib, evaluation = abid_manifests(args.abid, tmpdir, n_calib=64, n_eval=200)
            gate = vars(quantize_model(model_dir, calib, evaluation))
            print(f"  int8 gate: {gate}", flush=True)
            spec = load_model_spec(model_dir)

        images = load_images(images_dir, 200)
        threads = cpu_count()
        print(f"model-only ceiling ({threads} threads, batch 16) ...", flush=True)
        ceiling = model_only_ceiling(
            model_dir, images, threads=threads, duration=args.duration, int8=args.int8
        )
        print(f"  {ceiling['per_minute']:.0f} images/min on {ceiling['file']}", flush=True)

        port = free_port()
        cmd = server_cmd(model_dir, port, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with running_server(cmd, tmpdir / "server.log") as proc:
                served_int8 = args.int8 != "off" and bool(spec.onnx_int8_file)
                extra = {
                    "model": {
                        "dir": str(model_dir) if args.model_dir else "untrained ResNet18 (temp dir)",
                        "image_size": spec.preprocess.image_size,
                        "head": spec.head,
                        "precision": "int8" if served_int8 else "fp32",
                        "int8_gate": gate or spec.metrics.get("int8_gate"),
                    },
                    "server_cmd": " ".join(cmd[1:]),
                    "ceiling": ceiling,
                    "notes": "2-core machine; the load generator shares the server's cores",
                }
                url = f"http://127.0.0.1:{port}/v1/models/inventory-counter:predict"
                report = run_benchmark(
                    url,
                    images_dir,
                    levels,
                    args.duration,
                    out_json=args.out,
                    out_png=None,
                    baseline_model_dir=model_dir if args.baseline else None,
                    warmup=args.warmup,
                    extra=extra,
                    server_pid=proc.pid,
                )
                report["share_of_ceiling"] = {
                    str(r["concurrency"]): round(r["per_minute"] / ceiling["per_minute"], 3)
                    for r in report["results"]["server"]
                }
                at8 = {r["concurrency"]: r for r in report["results"]["server"]}.get(TARGET["concurrency"])
                if args.overload and at8:
                    rate = OVERLOAD_FACTOR * at8["per_minute"] / 60
                    print(
                        f"overload: {rate:.0f} requests/s, clients give up after {OVERLOAD_TIMEOUT_S:g} s ..."
                    )
                    report["overload"] = asyncio.run(
                        run_overload(
                            url, images, rate=rate, duration=args.duration,
                            timeout=OVERLOAD_TIMEOUT_S, server_pid=proc.pid,
                        )
                    )  # fmt: skip
                    print(f"  {report['overload']}", flush=True)
            if args.one_cpu:
                report["one_cpu_pod"] = one_cpu_pod(model_dir, images, args, tmpdir / "server-1cpu.log")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    check_targets(report, args.out)
    plot_report(report, args.out.with_suffix(".png"))
    return 0


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Throughput (with the ceiling), p99 latency, and the overload level's outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.plots import save_figure

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, levels in report["results"].items():
        c = [r["concurrency"] for r in levels]
        ax1.plot(c, [r["per_minute"] for r in levels], marker="o", label=name)
        ax2.plot(c, [r["p99_ms"] for r in levels], marker="o", label=name)
    ceiling = report.get("ceiling", {}).get("per_minute")
    if ceiling:
        ax1.axhline(ceiling, color="grey", linestyle="--", label="model-only ceiling")
        ax1.axhline(TARGET["share_of_ceiling"] * ceiling, color="grey", linestyle=":", label="90% of it")
    ax2.axhline(TARGET["p99_ms"], color="grey", linestyle="--", label="p99 target")
    ax1.set(xlabel="concurrent clients", ylabel="invocations / minute", title="Throughput")
    ax2.set(xlabel="concurrent clients", ylabel="p99 latency (ms)", title="Tail latency")
    overload = report.get("overload")
    if overload:
        n = overload["requests"]
        shares = {
            "answered (200)": overload["statuses"].get("200", 0) / n,
            "shed (503)": overload["shed_rate"],
            "client gave up": overload["timeout_rate"],
        }
        ax3.bar(list(shares), list(shares.values()), color=["tab:green", "tab:orange", "tab:red"])
        ax3.set(ylabel="share of requests", ylim=(0, 1))
        ax3.set_title(
            f"Overload: {overload['offered_per_minute']:.0f}/min offered, "
            f"{overload['client_timeout_s']:g} s timeout\n"
            f"goodput {overload['goodput_per_minute']:.0f}/min, accepted p99 "
            f"{overload['accepted_p99_ms']} ms, peak RSS {overload['peak_rss_mb']} MB",
            fontsize=9,
        )
    else:
        ax3.axis("off")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def check_targets(report: dict[str, Any], out: Path) -> None:
    """Print the targets at 8 clients and store the verdicts in the JSON."""
    from components.common import atomic_write_json

    c = str(TARGET["concurrency"])
    server = {str(r["concurrency"]): r for r in report["results"]["server"]}.get(c)
    if server is None:
        return
    share = report.get("share_of_ceiling", {}).get(c)
    verdict = {"p99_ms": server["p99_ms"] <= TARGET["p99_ms"]}
    if share is not None:
        verdict["share_of_ceiling"] = share >= TARGET["share_of_ceiling"]
    ratio = report.get("ratio_vs_baseline", {}).get(c)
    if ratio is not None:
        verdict["ratio"] = ratio >= TARGET["ratio"]
    report["targets"] = {"target": TARGET, "met": verdict}
    atomic_write_json(out, report)
    print(
        f"at {c} clients: {server['per_minute']:.0f}/min = {share} of the model-only ceiling "
        f"(target {TARGET['share_of_ceiling']}), p99 {server['p99_ms']:.0f} ms (target {TARGET['p99_ms']}), "
        f"{ratio}x the naive server (target {TARGET['ratio']})"
    )


if __name__ == "__main__":
    sys.exit(main())
