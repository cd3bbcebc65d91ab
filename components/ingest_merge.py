"""Join the directories of a sharded ingest into one self-contained dataset directory.

    python -m components.ingest_merge --out DIR SHARD_DIR [SHARD_DIR ...]

Each ``SHARD_DIR`` is the ``--out`` of one ``components.ingest --shard K --num-shards N`` run. The merge
checks that they are the N shards of one selection (same source, selection flags and selection
fingerprint; shard numbers 0..N-1 each exactly once), then writes ``DIR`` in the ingest layout::

    DIR/images/<id>.jpg  DIR/metadata/<id>.json  DIR/manifest.csv  DIR/ingest_report.json

Images are hard-linked from the shard directories when they share a filesystem and copied otherwise, so
``DIR`` never refers to the shard directories: it stays valid when they are deleted, and a KFP step that
receives ``DIR`` alone (the shards were other steps' artifacts) finds every image. Each image's SHA-256 is
checked against its shard's manifest on the way (``--no-verify`` skips that). The merged manifest has the
same rows as an unsharded ingest of the same selection, sorted by id. Reruns skip images already in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import (
    ConfigError,
    atomic_write_bytes,
    atomic_write_json,
    format_table,
    run_cli,
    sha256_bytes,
    sha256_file,
)
from components.ingest import MANIFEST_FILE, REPORT_FILE, SKIP_REASONS, STATE_FILE, exclusive
from components.manifest import ManifestRow, read_manifest, write_manifest
from components.shards import shard_of

log = logging.getLogger(__name__)

#: Selection fields that may differ between the shards of one selection: the file list's local path
#: (each pod may mount it elsewhere; its content is in the fingerprint).
PATH_FIELDS = frozenset({"file_list"})


@dataclass
class Shard:
    """One shard directory: its report, manifest rows and shard number."""

    dir: Path
    report: dict[str, Any]
    rows: list[ManifestRow]
    index: int
    count: int

    @property
    def name(self) -> str:
        return f"shard {self.index} of {self.count} ({self.dir})"


@dataclass
class MergeResult:
    """What :func:`merge_shards` wrote; ``counts`` maps class -> images in the merged manifest."""

    out_dir: Path
    manifest_path: Path
    report_path: Path
    n_images: int
    counts: dict[int, int]
    n_shards: int
    placed: dict[str, int] = field(default_factory=dict)  # linked / copied / present -> images
    skipped: dict[str, list[str]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def read_shard(shard_dir: str | os.PathLike[str]) -> Shard:
    """A finished shard directory (report + manifest), or a ConfigError saying what is missing."""
    d = Path(shard_dir).expanduser()
    if not d.is_dir():
        raise ConfigError(f"shard directory {d} does not exist")
    report_path = d / REPORT_FILE
    if not report_path.is_file() or not (d / MANIFEST_FILE).is_file():
        raise ConfigError(
            f"{d} has no {REPORT_FILE} and {MANIFEST_FILE}: its ingest did not finish (rerun it to resume) "
            "or it is not an ingest output directory"
        )
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        index, count = int(report["shard"]["index"]), int(report["shard"]["count"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{report_path} records no shard number: write the shards with "
            "python -m components.ingest --shard K --num-shards N"
        ) from e
    return Shard(d, report, read_manifest(d / MANIFEST_FILE), index, count)


def _selection_key(report: dict[str, Any]) -> dict[str, Any]:
    selection = {k: v for k, v in report.get("selection", {}).items() if k not in PATH_FIELDS}
    return {"source": report.get("source"), **{f"selection.{k}": v for k, v in selection.items()}}


def check_shards(shards: Sequence[Shard], *, allow_errors: bool = False) -> int:
    """Refuse anything but the N shards of one selection, each once; returns N."""
    if not shards:
        raise ConfigError("no shard directories given: pass the --out of every shard's ingest")
    counts = sorted({s.count for s in shards})
    if len(counts) > 1:
        names = ", ".join(s.name for s in shards)
        raise ConfigError(f"the shards were cut with different --num-shards {counts}: {names}")
    n = counts[0]
    by_index: dict[int, list[Shard]] = {}
    for s in shards:
        by_index.setdefault(s.index, []).append(s)
    twice = {i: ss for i, ss in by_index.items() if len(ss) > 1}
    if twice:
        i, ss = min(twice.items())
        raise ConfigError(
            f"shard {i} of {n} given {len(ss)} times: {', '.join(str(s.dir) for s in ss)} "
            "(pass each shard's directory once)"
        )
    missing = sorted(set(range(n)) - set(by_index))
    if missing:
        raise ConfigError(
            f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {n} "
            f"(got {', '.join(map(str, sorted(by_index)))}): pass the directory of every shard's ingest"
        )
    first = _selection_key(shards[0].report)
    for s in shards[1:]:
        other = _selection_key(s.report)
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{shards[0].name} and {s.name} are not shards of the same selection ({', '.join(diff)} "
                f"differ: {first.get(k)!r} vs {other.get(k)!r}): rerun every shard with the same --source "
                "and selection flags (--file-list/--per-class/--select, --classes, --limit) on the same data"
            )
    if not allow_errors:
        for s in shards:
            errors = s.report.get("skipped", {}).get("error", {}).get("count", 0)
            if errors:
                raise ConfigError(
                    f"{s.name} has {errors} objects that failed after retries: rerun that shard's ingest "
                    "(the same command) to resume, then merge; or pass --allow-errors to merge without them"
                )
    owner: dict[str, Shard] = {}
    for s in shards:
        for row in s.rows:
            if shard_of(row.id, n) != s.index:
                raise ConfigError(
                    f"{s.dir / MANIFEST_FILE}: id {row.id} belongs to shard {shard_of(row.id, n)} of {n}, "
                    f"not {s.index}: this directory was not written by that shard's ingest"
                )
            if row.id in owner:
                raise ConfigError(f"id {row.id} is in both {owner[row.id].dir} and {s.dir}")
            owner[row.id] = s
            if os.path.isabs(row.path) or ".." in Path(row.path).parts:
                raise ConfigError(f"{s.dir / MANIFEST_FILE}: path {row.path!r} is not inside the shard")
    return n


def _place(src: Path, dest: Path, sha256: str | None) -> str:
    """Hard-link (else copy) ``src`` to ``dest``, checking ``sha256`` when given; 'linked', 'copied' or
    'present' (``dest`` already holds it, e.g. on a rerun)."""
    data: bytes | None = None
    try:
        if sha256 is not None:
            data = src.read_bytes()
            if sha256_bytes(data) != sha256:
                raise ConfigError(
                    f"{src} does not match the sha256 in its shard's manifest: the shard directory was "
                    "changed after its ingest; rerun that shard's ingest"
                )
        size = src.stat().st_size
    except FileNotFoundError as e:
        raise ConfigError(f"{src} is in its shard's manifest but missing: rerun that shard's ingest") from e
    if dest.exists():
        if os.path.samefile(src, dest):
            return "present"
        if dest.stat().st_size == size and (sha256 is None or sha256_file(dest) == sha256):
            return "present"
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link.tmp")
    try:
        os.link(src, tmp)
        os.replace(tmp, dest)
        return "linked"
    except OSError:  # another filesystem (EXDEV), links not allowed: copy
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(dest, data if data is not None else src.read_bytes(), fsync=False)
    return "copied"


def _validate_out(out_dir: Path, shards: Sequence[Shard]) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    res = out_dir.resolve()
    for s in shards:
        d = s.dir.resolve()
        if res == d or d in res.parents:
            raise ConfigError(f"--out {out_dir} is (inside) the shard directory {s.dir}: choose another")
    if (out_dir / STATE_FILE).exists():
        raise ConfigError(f"--out {out_dir} holds an ingest of its own ({STATE_FILE}): merge into a new one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir} is not writable: {e.strerror or e}") from e
    return out_dir


def merge_shards(
    shard_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 8,
    verify: bool = True,
    allow_errors: bool = False,
) -> MergeResult:
    """Check the shards (:func:`check_shards`), place every image and metadata file in ``out_dir`` and
    write one manifest and one report over all of them; see the module docstring."""
    t0 = time.monotonic()
    if not 1 <= workers <= 256:
        raise ConfigError(f"--workers must be in [1, 256], got {workers}")
    shards = [read_shard(d) for d in shard_dirs]
    n = check_shards(shards, allow_errors=allow_errors)
    shards.sort(key=lambda s: s.index)
    out = _validate_out(Path(out_dir), shards)
    jobs: list[tuple[Path, Path, str | None]] = []  # (from, to, sha256 to check)
    for s in shards:
        for row in s.rows:
            jobs.append((s.dir / row.path, out / row.path, row.sha256 if verify else None))
            meta = Path("metadata") / f"{row.id}.json"
            jobs.append((s.dir / meta, out / meta, None))
    is_image = [i % 2 == 0 for i in range(len(jobs))]
    placed = {"linked": 0, "copied": 0, "present": 0}
    with exclusive(out):
        for sub in ("images", "metadata"):
            (out / sub).mkdir(exist_ok=True)
            for p in (out / sub).glob(".*.tmp"):
                p.unlink(missing_ok=True)
        for d in {dest.parent for _, dest, _ in jobs}:
            d.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(workers, thread_name_prefix="merge") as pool:
            for image, how in zip(is_image, pool.map(lambda j: _place(*j), jobs), strict=True):
                if image:
                    placed[how] += 1
        rows = sorted((r for s in shards for r in s.rows), key=lambda r: r.id)
        manifest_path = write_manifest(out / MANIFEST_FILE, rows)
        report = _merged_report(shards, rows, placed, verify, time.monotonic() - t0)
        if not rows:
            atomic_write_json(out / REPORT_FILE, report)
            raise ConfigError(
                f"the {n} shards hold no images at all: see {out / REPORT_FILE} and the shards' reports"
            )
        report_path = atomic_write_json(out / REPORT_FILE, report)
    classes = [int(c) for c in report["counts"]]
    return MergeResult(
        out_dir=out,
        manifest_path=manifest_path,
        report_path=report_path,
        n_images=len(rows),
        counts={c: report["counts"][str(c)] for c in classes},
        n_shards=n,
        placed=placed,
        skipped={r: v["ids"] for r, v in report["skipped"].items() if v["count"]},
        elapsed_s=time.monotonic() - t0,
    )


def _merged_report(
    shards: Sequence[Shard], rows: Sequence[ManifestRow], placed: dict[str, int], verify: bool, elapsed: float
) -> dict[str, Any]:
    """The ingest report of the whole selection, as an unsharded ingest would write it, plus ``merge``."""
    reports = [s.report for s in shards]
    first = reports[0]
    classes = list(first.get("selection", {}).get("classes", sorted({r.count for r in rows})))
    skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
    details: dict[str, str] = {}
    for rep in reports:
        for reason, v in rep.get("skipped", {}).items():
            skipped.setdefault(reason, []).extend(v.get("ids", []))
        details.update(rep.get("details", {}))

    def total(key: str) -> int:
        return sum(int(rep.get(key) or 0) for rep in reports)

    n_resumed = total("n_resumed")
    return {
        "source": first.get("source"),
        "selection": first.get("selection"),
        "n_selected": total("n_selected"),
        "n_images": len(rows),
        "n_resumed": n_resumed,
        "n_downloaded": len(rows) - n_resumed,
        "n_skipped": sum(len(v) for v in skipped.values()),
        "counts": {str(c): sum(1 for r in rows if r.count == c) for c in classes},
        "skipped": {r: {"count": len(ids), "ids": sorted(ids)} for r, ids in skipped.items()},
        "details": dict(sorted(details.items())),
        "relabelled": sorted((x for r in reports for x in r.get("relabelled", [])), key=lambda x: x["id"]),
        "manifest": MANIFEST_FILE,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": None,  # the shards' own rates are under merge.shards
        "bytes_downloaded": total("bytes_downloaded"),
        "shard": {"index": 0, "count": 1},  # the whole selection
        "merge": {
            "n_shards": len(shards),
            "verified_sha256": verify,
            "images": dict(placed),
            "shards": [
                {
                    "index": s.index,
                    "dir": str(s.dir.resolve()),
                    "n_images": len(s.rows),
                    "n_selected": s.report.get("n_selected"),
                    "elapsed_s": s.report.get("elapsed_s"),
                    "images_per_s": s.report.get("images_per_s"),
                }
                for s in shards
            ],
        },
    }


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m components.ingest_merge",
        description="Join the --out directories of `components.ingest --shard K --num-shards N` runs into "
        "one dataset directory (images hard-linked or copied, one manifest.csv and ingest_report.json).",
    )
    p.add_argument("--out", required=True, type=Path, help="merged dataset directory (created; reruns skip)")
    p.add_argument("shard_dirs", nargs="+", type=Path, metavar="SHARD_DIR", help="every shard's --out")
    p.add_argument("--workers", type=int, default=8, help="concurrent file links/copies (default 8)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip checking each image's sha256 against its manifest"
    )
    p.add_argument(
        "--allow-errors",
        action="store_true",
        help="merge shards whose ingest left objects failed after retries (default: refuse, rerun them)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _run(args: argparse.Namespace) -> int:
    result = merge_shards(
        args.shard_dirs,
        args.out,
        workers=args.workers,
        verify=not args.no_verify,
        allow_errors=args.allow_errors,
    )
    rows: list[list[Any]] = [[c, n] for c, n in result.counts.items()]
    rows.append(["total", result.n_images])
    print(format_table(rows, ["count", "images"]))
    if result.skipped:
        print(format_table([[r, len(ids)] for r, ids in result.skipped.items()], ["skipped", "objects"]))
    how = ", ".join(f"{k} {v}" for k, v in result.placed.items() if v)
    print(f"{result.n_images} images from {result.n_shards} shards ({how}) in {result.elapsed_s:.1f}s")
    print(f"manifest: {result.manifest_path}\nreport:   {result.report_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


__all__ = ["MergeResult", "Shard", "check_shards", "main", "merge_shards", "read_shard"]


if __name__ == "__main__":
    sys.exit(main())
