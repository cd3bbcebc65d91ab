"""``make bench-serve``: load test of the model server against the naive baseline on real ABID JPEGs.

Starts ``python -m serving`` on 127.0.0.1 with the model from ``--model_dir`` (default: an untrained
224 px ResNet18 exported to a temp dir, which costs the same per image as a trained one), optionally
adds the int8 model (calibrated and gated on labelled ABID images), runs :mod:`serving.bench` with
``--baseline`` at 1, 4, 8 and 16 clients, and writes ``bench/results/serve.json`` and ``serve.png``.

Targets (checked and printed, never asserted): at 8 clients >= 3,000 invocations/minute with
p99 <= 300 ms, and >= 3x the naive baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from components.common import ConfigError, parse_int_list, setup_logging  # noqa: E402
from serving.bench import free_port, run_benchmark, stop_process, wait_http  # noqa: E402

DEFAULT_ABID = REPO_ROOT.parent / "shared" / "abid"
RESULTS = REPO_ROOT / "bench" / "results"
TARGET = {"concurrency": 8, "per_minute": 3000, "p99_ms": 300, "ratio": 3.0}


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
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--max_wait_ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    images = args.abid / "bin-images"
    if not images.is_dir():
        print(f"error: no ABID images at {images}; set ABID_DIR or --abid", file=sys.stderr)
        return 2
    levels = parse_int_list(args.concurrency, name="--concurrency")

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

        port = free_port()
        cmd = [sys.executable, "-m", "serving", "--model_dir", str(model_dir), "--http_host", "127.0.0.1",
               "--http_port", str(port), "--int8", args.int8, "--max_batch_size", str(args.max_batch_size),
               "--max_wait_ms", str(args.max_wait_ms)]  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmpdir / "server.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/v2/health/ready", proc)
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
                "notes": "2-core machine shared with other work; numbers may be pessimistic",
            }
            report = run_benchmark(
                f"{base}/v1/models/inventory-counter:predict",
                images,
                levels,
                args.duration,
                out_json=args.out,
                out_png=args.out.with_suffix(".png"),
                baseline_model_dir=model_dir if args.baseline else None,
                warmup=args.warmup,
                extra=extra,
                server_pid=proc.pid,
            )
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            stop_process(proc)

    check_targets(report, args.out)
    return 0


def check_targets(report: dict[str, Any], out: Path) -> None:
    """Print the targets at 8 clients and store the verdicts in the JSON."""
    from components.common import atomic_write_json

    c = str(TARGET["concurrency"])
    server = {str(r["concurrency"]): r for r in report["results"]["server"]}.get(c)
    if server is None:
        return
    verdict = {
        "per_minute": server["per_minute"] >= TARGET["per_minute"],
        "p99_ms": server["p99_ms"] <= TARGET["p99_ms"],
    }
    ratio = report.get("ratio_vs_baseline", {}).get(c)
    if ratio is not None:
        verdict["ratio"] = ratio >= TARGET["ratio"]
    report["targets"] = {"target": TARGET, "met": verdict}
    cpu_ms = server.get("server_cpu_ms_per_request")
    if cpu_ms:
        # On a shared machine the server gets a fraction of the cores; its CPU time per request
        # says what it would sustain with all of them (an estimate, not a measurement).
        cores = report["machine"]["cpus"] or 1
        report["targets"]["estimated_per_minute_on_dedicated_cores"] = round(cores * 60000 / cpu_ms)
    atomic_write_json(out, report)
    print(
        f"at {c} clients: {server['per_minute']:.0f}/min (target {TARGET['per_minute']}), "
        f"p99 {server['p99_ms']:.0f} ms (target {TARGET['p99_ms']}), "
        f"ratio {ratio} (target {TARGET['ratio']}); "
        f"server used {server.get('server_cores')} cores, {cpu_ms} CPU ms/request -> about "
        f"{report['targets'].get('estimated_per_minute_on_dedicated_cores')}/min on all cores"
    )


if __name__ == "__main__":
    sys.exit(main())
