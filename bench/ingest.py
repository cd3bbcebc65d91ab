"""Ingest throughput from a local S3 server: objects/s and MB/s for several worker counts.

Starts its own ``moto_server`` on 127.0.0.1, uploads ``--n`` real images (and their metadata) from the
shared ABID sample, then times ``components.ingest.ingest`` (per-class selection, as the pipeline runs
it) into a fresh directory for each ``--workers`` value, plus a resumed rerun. ``workers=1`` is the
one-at-a-time baseline (the reference notebook fetched about 11 images/s that way from AWS).

    python bench/ingest.py [--n 500] [--workers 1,16,32] [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import os
import platform
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="images to upload and ingest (split over classes 1-5)")
    p.add_argument("--workers", default="1,16,32", help="comma-separated worker counts to time")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "ingest.json")
    args = p.parse_args(argv)

    from components.common import atomic_write_json, format_table, parse_int_list
    from tests.fixtures.aws import FAKE_CREDENTIALS, running_moto_server
    from tests.fixtures.data import shared_abid_dir
    from tests.fixtures.s3data import real_ids_by_class, real_objects, upload

    os.environ.update(FAKE_CREDENTIALS)
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
