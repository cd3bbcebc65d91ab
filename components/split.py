"""Split a manifest into train/val/test: stratified by count, deterministic, duplicate-safe.

Outputs are manifests that *reference* the ingested images (no copies) plus ``summary.json``, which
records the absolute data root so ``components.manifest.resolve_data_root`` finds the images from the
split directory, and ``class_histogram.png``.

Determinism: the split depends only on the manifest's *content* (not its row order) and the seed.
Leakage: rows with the same sha256 (byte-identical images) form one group that is never divided.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import (
    ConfigError,
    atomic_write_json,
    format_table,
    parse_float_list,
    run_cli,
    sha256_file,
)
from components.manifest import ManifestRow, load_labelled, resolve_data_root, write_manifest

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_RATIOS: tuple[float, float, float] = (0.7, 0.15, 0.15)
SUMMARY_FILE = "summary.json"
HISTOGRAM_FILE = "class_histogram.png"


@dataclass
class SplitResult:
    """Paths written and the per-split, per-class counts (``counts[split][class]``)."""

    out_dir: Path
    paths: dict[str, Path]
    summary_path: Path
    histogram_path: Path
    counts: dict[str, dict[int, int]]
    data_root: Path

    @property
    def train_csv(self) -> Path:
        return self.paths["train"]

    @property
    def val_csv(self) -> Path:
        return self.paths["val"]

    @property
    def test_csv(self) -> Path:
        return self.paths["test"]


def validate_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative numbers summing to 1; train must be > 0 (val/test may be 0 if asked for)."""
    if len(ratios) != 3:
        raise ConfigError(f"--ratios needs 3 values train,val,test (e.g. 0.7,0.15,0.15), got {list(ratios)}")
    r = tuple(float(x) for x in ratios)
    if any(not math.isfinite(x) or x < 0 for x in r):
        raise ConfigError(f"--ratios must be non-negative numbers, got {list(ratios)}")
    if abs(sum(r) - 1.0) > 1e-6:
        raise ConfigError(f"--ratios must sum to 1, got {list(ratios)} (sum {sum(r):.6g})")
    if r[0] <= 0:
        raise ConfigError(f"--ratios: the train share must be > 0, got {list(ratios)}")
    return r[0], r[1], r[2]


def _targets(n: int, ratios: Sequence[float]) -> list[int]:
    """Integer sizes summing to ``n`` (largest remainder), each non-zero-ratio split getting >= 1."""
    raw = [n * r for r in ratios]
    sizes = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    for i, r in enumerate(ratios):
        if r > 0 and sizes[i] == 0:
            donor = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes


def _group_label(rows: Sequence[ManifestRow]) -> int:
    """The stratum of a duplicate group: its most common count (smallest on ties)."""
    counts = Counter(r.count for r in rows)
    return min(counts, key=lambda c: (-counts[c], c))


def assign_splits(
    rows: Sequence[ManifestRow], ratios: Sequence[float], seed: int
) -> tuple[dict[str, list[ManifestRow]], dict[str, Any]]:
    """Stratified, duplicate-grouped assignment; returns rows per split and duplicate statistics."""
    ratios = validate_ratios(ratios)
    ids = Counter(r.id for r in rows)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        raise ConfigError(f"manifest lists {len(repeated)} ids more than once (first: {repeated[0]!r})")
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        groups[r.sha256].append(r)
    by_class: dict[int, list[list[ManifestRow]]] = defaultdict(list)
    conflicts: list[list[str]] = []
    for members in groups.values():
        members.sort(key=lambda r: r.id)
        by_class[_group_label(members)].append(members)
        if len({r.count for r in members}) > 1:
            conflicts.append([r.id for r in members])
    n_nonzero = sum(1 for r in ratios if r > 0)
    too_few = {c: len(g) for c, g in by_class.items() if len(g) < n_nonzero}
    if too_few:
        detail = ", ".join(f"class {c}: {n}" for c, n in sorted(too_few.items()))
        raise ConfigError(
            f"too few distinct images to split {n_nonzero} ways with ratios {list(ratios)} ({detail}): "
            "ingest more images for those classes, drop them with ingest --classes, or set a ratio to 0"
        )
    out: dict[str, list[ManifestRow]] = {s: [] for s in SPLITS}
    for cls in sorted(by_class):
        cls_groups = sorted(by_class[cls], key=lambda g: g[0].id)  # content order, not file order
        random.Random(f"{seed}:{cls}").shuffle(cls_groups)
        # Big groups first (stable after the shuffle), each to the split furthest below its target.
        cls_groups.sort(key=len, reverse=True)
        targets = _targets(sum(len(g) for g in cls_groups), ratios)
        filled = [0, 0, 0]
        groups_in = [0, 0, 0]
        for g in cls_groups:
            # A non-zero split that has no group yet goes first, so it can never end up empty.
            empty = [i for i in range(3) if ratios[i] > 0 and groups_in[i] == 0]
            if empty:
                k = max(empty, key=lambda i: (targets[i] - filled[i], -i))
            else:
                k = max((i for i in range(3) if ratios[i] > 0), key=lambda i: (targets[i] - filled[i], -i))
            out[SPLITS[k]].extend(g)
            filled[k] += len(g)
            groups_in[k] += 1
    for split_rows in out.values():
        split_rows.sort(key=lambda r: (r.count, r.id))
    stats = {
        "duplicate_groups": sum(1 for g in groups.values() if len(g) > 1),
        "duplicate_rows": sum(len(g) for g in groups.values() if len(g) > 1),
        "conflicting_labels": conflicts,
    }
    return out, stats


def split_dataset(
    manifest: Path,
    out_dir: Path,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    data_root: Path | None = None,
) -> SplitResult:
    """Write train/val/test manifests, ``summary.json`` and ``class_histogram.png`` to ``out_dir``."""
    from components.plots import save_class_histogram

    ratios = validate_ratios(ratios)
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    outputs = {s: out_dir / f"{s}.csv" for s in SPLITS}
    if manifest.resolve() in {p.resolve() for p in outputs.values()}:
        raise ConfigError(f"--manifest {manifest} would be overwritten by the split: choose another --out")
    # Fails early, with a hint, on a missing/empty manifest or images not under the data root.
    rows, _ = load_labelled(manifest, data_root)
    root = resolve_data_root(manifest, data_root).resolve()
    parts, stats = assign_splits(rows, ratios, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_manifest(outputs[s], parts[s])
    classes = sorted({r.count for r in rows})
    counts = {s: {c: sum(1 for r in parts[s] if r.count == c) for c in classes} for s in SPLITS}
    summary = {
        "data_root": str(root),
        "manifest": str(manifest.resolve()),
        "manifest_sha256": sha256_file(manifest),
        "seed": seed,
        "ratios": dict(zip(SPLITS, ratios, strict=True)),
        "classes": classes,
        "counts": {s: {str(c): n for c, n in counts[s].items()} for s in SPLITS},
        "totals": {s: len(parts[s]) for s in SPLITS},
        "n_images": len(rows),
        "files": {s: outputs[s].name for s in SPLITS},
        **stats,
    }
    summary_path = atomic_write_json(out_dir / SUMMARY_FILE, summary)
    histogram_path = save_class_histogram(
        counts, out_dir / HISTOGRAM_FILE, title=f"images per count and split (seed {seed})"
    )
    return SplitResult(out_dir, outputs, summary_path, histogram_path, counts, root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m components.split",
        description="Stratified, duplicate-safe train/val/test split of a manifest (no image copies).",
    )
    p.add_argument("--manifest", required=True, type=Path, help="manifest.csv from components.ingest")
    p.add_argument(
        "--out", required=True, type=Path, help="directory for train/val/test.csv and summary.json"
    )
    p.add_argument("--ratios", default="0.7,0.15,0.15", help="train,val,test shares summing to 1")
    p.add_argument("--seed", type=int, default=0, help="random seed (same manifest + seed = same split)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="directory the manifest's paths are relative to (default: the manifest's directory)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _run(args: argparse.Namespace) -> int:
    ratios = parse_float_list(args.ratios, name="--ratios")
    result = split_dataset(args.manifest, args.out, ratios=ratios, seed=args.seed, data_root=args.data_root)
    classes = sorted({c for per in result.counts.values() for c in per})
    rows = [
        [c, *(result.counts[s][c] for s in SPLITS), sum(result.counts[s][c] for s in SPLITS)] for c in classes
    ]
    totals = [sum(result.counts[s].values()) for s in SPLITS]
    rows.append(["total", *totals, sum(totals)])
    print(format_table(rows, ["count", *SPLITS, "total"]))
    for s in SPLITS:
        print(f"{s + ':':6} {result.paths[s]}")
    print(f"summary: {result.summary_path}\nplot:    {result.histogram_path}\ndata root: {result.data_root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


__all__ = [
    "DEFAULT_RATIOS",
    "SPLITS",
    "SplitResult",
    "assign_splits",
    "main",
    "split_dataset",
    "validate_ratios",
]


if __name__ == "__main__":
    sys.exit(main())
