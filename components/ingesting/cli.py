"""``python -m components.ingest``: flags into an ingest run, the summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from components.common import (
    format_table,
    parse_int_list,
    run_cli,
)
from components.ingesting.config import DEFAULT_SOURCE, PUBLIC_BUCKET, SELECT_MODES
from components.ingesting.run import ingest

# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m components.ingest",
        description="Download labelled bin images from S3 (or a local mirror) into a verified dataset dir.",
    )
    p.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help="s3://bucket[/prefix] or a local directory "
        f"with bin-images/ and metadata/ (default {DEFAULT_SOURCE})",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (created; reruns resume)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (MinIO, moto, ...)")
    p.add_argument(
        "--no-sign-request",
        action="store_true",
        help="send unsigned requests (public buckets); automatic when no credentials exist",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--file-list",
        default=None,
        help="file_list.json (local path or s3:// URL); default <source>/file_list.json, else the shipped "
        f"standard subset for s3://{PUBLIC_BUCKET}, else every labelled image of --classes",
    )
    sel.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="take the first N valid images per class, scanning metadata in key order",
    )
    sel.add_argument(
        "--select",
        choices=SELECT_MODES,
        default=None,
        help="'standard': the shipped 10,441-id subset; 'all': every labelled image of --classes from the "
        "bucket's listing, ignoring any file_list.json (the whole public bucket: use shards)",
    )
    p.add_argument("--classes", default="1,2,3,4,5", help="counts to keep (default 1,2,3,4,5)")
    p.add_argument(
        "--limit",
        "--ids-limit",
        dest="limit",
        type=int,
        default=None,
        help="cap the total number of images (taken round-robin across classes)",
    )
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads (default 16)")
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="K",
        help="ingest only shard K (0..N-1) of the selection, by id hash, into --out; with --num-shards",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        metavar="N",
        help="the number of shards the selection is cut in (join them: python -m components.ingest_merge)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--log-level", default="INFO")
    return p


def _run(args: argparse.Namespace) -> int:
    classes = parse_int_list(args.classes, name="--classes")
    result = ingest(
        args.source,
        args.out,
        endpoint_url=args.endpoint_url,
        file_list=args.file_list,
        per_class=args.per_class,
        select=args.select,
        classes=classes,
        workers=args.workers,
        limit=args.limit,
        no_sign_request=args.no_sign_request,
        progress=not args.no_progress,
        shard=args.shard,
        num_shards=args.num_shards,
    )
    rows: list[list[Any]] = [[c, n] for c, n in result.counts.items()]
    rows.append(["total", result.n_images])
    if result.shard[1] > 1:
        print(f"shard {result.shard[0]} of {result.shard[1]}")
    print(format_table(rows, ["count", "images"]))
    if result.skipped:
        print(format_table([[r, len(ids)] for r, ids in result.skipped.items()], ["skipped", "objects"]))
    rate = (result.n_images - result.n_resumed) / result.elapsed_s if result.elapsed_s else 0.0
    print(
        f"{result.n_images} images ({result.n_resumed} already present) in {result.elapsed_s:.1f}s "
        f"({rate:.1f} downloaded/s)"
    )
    print(f"manifest: {result.manifest_path}\nreport:   {result.report_path}")
    if result.n_errors:
        print(
            f"error: {result.n_errors} objects failed after retries (network/server): rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)
