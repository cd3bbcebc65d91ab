"""Ingest throughput from a local S3 server: objects/s and MB/s for several worker counts.

Starts its own ``moto_server`` on 127.0.0.1, uploads ``--n`` real images (and their metadata) from the
shared ABID sample, then times ``components.ingest.ingest`` (per-class selection, as the pipeline runs
it) into a fresh directory for each ``--workers`` value, plus a resumed rerun. ``workers=1`` is the
one-at-a-time baseline (the reference notebook fetched about 11 images/s that way from AWS).

    python bench/ingest.py [--n 500] [--workers 1,16,32] [--out bench/results/ingest.json]

With ``--shards 1,2,4`` it times a fanned-out ingest instead: for each N, N concurrent
``python -m components.ingest --select all --shard K --num-shards N`` processes (``--shard-workers``
threads each) against the same server, wall clock from the first start to the last exit (process start
included, as on a cluster), then ``components.ingest_merge`` of their directories; ``--n`` defaults to
1,200 images there, and the results go to ``bench/results/ingest_shards.json``.

    python bench/ingest.py --shards 1,2,4 [--n 1200] [--shard-workers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/ingest.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

CLASSES = (1, 2, 3, 4, 5)


def machine_info() -> dict[str, Any]:
    """Enough context to compare numbers across machines."""
    import boto3
    import moto

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "boto3": boto3.__version__,
        "moto": moto.__version__,
    }


def run_once(url: str, endpoint: str, out: Path, per_class: int, workers: int) -> dict[str, Any]:
    from components.ingest import ingest

    t0 = time.perf_counter()
    result = ingest(url, out, endpoint_url=endpoint, per_class=per_class, workers=workers, progress=False)
    elapsed = time.perf_counter() - t0
    downloaded = result.n_images - result.n_resumed
    return {
        "workers": workers,
        "n_images": result.n_images,
        "n_downloaded": downloaded,
        "n_resumed": result.n_resumed,
        "seconds": round(elapsed, 3),
        "images_per_s": round(result.n_images / elapsed, 1),
        # each downloaded image is two GETs (metadata + JPEG)
        "objects_per_s": round(2 * downloaded / elapsed, 1),
        "mb_per_s": round(result.n_bytes / elapsed / 1e6, 2),
        "bytes": result.n_bytes,
    }


def get_ceiling(endpoint: str, bucket: str, keys: list[str], workers: int) -> float:
    """GETs/s of bare concurrent boto3 reads (no decode, no writes): what the server can deliver."""
    from concurrent.futures import ThreadPoolExecutor

    from components.s3 import make_s3_client

    client, _ = make_s3_client(endpoint_url=endpoint, workers=workers)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), keys))
    return round(len(keys) / (time.perf_counter() - t0), 1)


def run_shards(url: str, endpoint: str, root: Path, n_shards: int, workers: int) -> dict[str, Any]:
    """N concurrent shard processes (as N pods would run), then the merge of their directories."""
    from components.ingest_merge import merge_shards

    dirs = [root / f"shard-{k}" for k in range(n_shards)]
    t0 = time.perf_counter()
    procs = []
    for k, out in enumerate(dirs):
        cmd = [sys.executable, "-m", "components.ingest", "--source", url, "--endpoint-url", endpoint]
        cmd += ["--out", str(out), "--select", "all", "--shard", str(k), "--num-shards", str(n_shards)]
        cmd += ["--workers", str(workers), "--no-progress", "--log-level", "WARNING"]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for k, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"shard {k} of {n_shards} exited {proc.returncode}: {err.decode()[-2000:]}")
    elapsed = time.perf_counter() - t0
    reports = [json.loads((d / "ingest_report.json").read_text()) for d in dirs]
    t1 = time.perf_counter()
    merged = merge_shards(dirs, root / "merged")
    merge_s = time.perf_counter() - t1
    n_images = sum(r["n_images"] for r in reports)
    n_bytes = sum(r["bytes_downloaded"] for r in reports)
    assert merged.n_images == n_images and all(r["n_resumed"] == 0 for r in reports)
    return {
        "shards": n_shards,
        "workers_per_shard": workers,
        "n_images": n_images,
        "seconds": round(elapsed, 3),
        "images_per_s": round(n_images / elapsed, 1),
        # each image is two GETs (metadata + JPEG); every shard also lists the whole metadata/ prefix
        "objects_per_s": round(2 * n_images / elapsed, 1),
        "mb_per_s": round(n_bytes / elapsed / 1e6, 2),
        # inside the ingest only (no interpreter start): the slowest shard sets the pace
        "shard_elapsed_s": [r["elapsed_s"] for r in reports],
        "objects_per_s_in_ingest": round(2 * n_images / max(r["elapsed_s"] for r in reports), 1),
        "merge_seconds": round(merge_s, 3),
        "merge_images": merged.placed,
    }


def shard_benchmark(args: argparse.Namespace) -> int:
    from components.common import atomic_write_json, format_table, parse_int_list
    from tests.fixtures.aws import running_moto_server
    from tests.fixtures.data import shared_abid_dir
    from tests.fixtures.s3data import real_ids_by_class, real_objects, upload

    shard_counts = parse_int_list(args.shards, name="--shards")
    n = args.n or 1200
    per_class = max(1, n // len(CLASSES))
    abid = shared_abid_dir()
    ids = real_ids_by_class(abid, per_class, CLASSES)
    objects = real_objects(abid, [i for c in CLASSES for i in ids[c]])
    out_path = args.out or REPO_ROOT / "bench" / "results" / "ingest_shards.json"
    runs: list[dict[str, Any]] = []
    with running_moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        t0 = time.perf_counter()
        upload(endpoint, "bench-abid", "", objects, workers=32)
        print(f"uploaded {len(objects)} objects in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for n_shards in shard_counts:
            runs.append(
                run_shards(
                    "s3://bench-abid", endpoint, Path(tmp) / f"n{n_shards}", n_shards, args.shard_workers
                )
            )
            print(f"{n_shards} shards: {runs[-1]['objects_per_s']} objects/s", file=sys.stderr)
    base = runs[0]["objects_per_s"]
    for r in runs:
        r["speedup"] = round(r["objects_per_s"] / base, 2)
    result = {
        "benchmark": "ingest_shards",
        "server": "one moto_server process on 127.0.0.1 (same machine as every shard)",
        "selection": f"--select all over classes {list(CLASSES)}: {per_class * len(CLASSES)} images",
        "n_images": per_class * len(CLASSES),
        "total_mb": round(sum(len(v) for k, v in objects.items() if k.endswith(".jpg")) / 1e6, 2),
        "runs": runs,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out_path, result)
    cols = ["shards", "workers_per_shard", "n_images", "seconds", "objects_per_s", "speedup", "merge_seconds"]
    print(format_table([[r[c] for c in cols] for r in runs], cols))
    print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="images to upload and ingest (split over classes 1-5; default 500, 1200 with --shards)",
    )
    p.add_argument("--workers", default="1,16,32", help="comma-separated worker counts to time")
    p.add_argument("--shards", default=None, help="comma-separated shard-process counts to time, e.g. 1,2,4")
    p.add_argument("--shard-workers", type=int, default=16, help="--workers of each shard process")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/ingest*.json)")
    args = p.parse_args(argv)

    from components.common import atomic_write_json, format_table, parse_int_list
    from tests.fixtures.aws import FAKE_CREDENTIALS, running_moto_server
    from tests.fixtures.data import shared_abid_dir
    from tests.fixtures.s3data import real_ids_by_class, real_objects, upload

    os.environ.update(FAKE_CREDENTIALS)
    if args.shards:
        return shard_benchmark(args)
    args.out = args.out or REPO_ROOT / "bench" / "results" / "ingest.json"
    args.n = args.n or 500
    workers_list = parse_int_list(args.workers, name="--workers")
    per_class = max(1, args.n // len(CLASSES))
    abid = shared_abid_dir()
    ids = real_ids_by_class(abid, per_class, CLASSES)
    objects = real_objects(abid, [i for c in CLASSES for i in ids[c]])
    runs: list[dict[str, Any]] = []
    with running_moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        upload(endpoint, "bench-abid", "", objects, workers=32)
        url = "s3://bench-abid"
        for w in workers_list:
            out = Path(tmp) / f"w{w}"
            runs.append({"run": "cold", **run_once(url, endpoint, out, per_class, w)})
            print(f"workers={w}: {runs[-1]['images_per_s']} images/s", file=sys.stderr)
        best = max(workers_list)
        runs.append({"run": "resume", **run_once(url, endpoint, Path(tmp) / f"w{best}", per_class, best)})
        ceiling = get_ceiling(endpoint, "bench-abid", sorted(objects), best)
        print(f"bare GETs with {best} workers: {ceiling} objects/s", file=sys.stderr)

    cold = [r for r in runs if r["run"] == "cold"]
    top = max(cold, key=lambda r: r["images_per_s"])
    result = {
        "benchmark": "ingest",
        "server": "moto_server on 127.0.0.1 (same machine)",
        "selection": f"--per-class {per_class} over classes {list(CLASSES)}",
        "n_images": per_class * len(CLASSES),
        "total_mb": round(sum(len(v) for k, v in objects.items() if k.endswith(".jpg")) / 1e6, 2),
        "runs": runs,
        "best": {
            "workers": top["workers"],
            "images_per_s": top["images_per_s"],
            "objects_per_s": top["objects_per_s"],
            "mb_per_s": top["mb_per_s"],
        },
        # bare GETs, no processing: the server's limit on this machine, for scale
        "server_get_ceiling_objects_per_s": ceiling,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "target_images_per_s": 100,
        "reference_notebook_images_per_s": 11,
        "machine": machine_info(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(args.out, result)
    cols = ["run", "workers", "n_images", "seconds", "images_per_s", "objects_per_s", "mb_per_s"]
    print(format_table([[r[c] for c in cols] for r in runs], cols))
    print(f"server ceiling (bare GETs, {max(workers_list)} workers): {ceiling} objects/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
