"""The dataset manifest: one CSV row per image, shared by ingest, split, train, tune and evaluate.

Columns: ``id,count,path,sha256,width,height,source``. ``path`` is relative to the *data root*
(the directory ingest wrote, holding ``images/``), so manifests stay valid when the data moves
(KFP artifacts, containers). Readers take an explicit ``data_root``; without one they use the
``data_root`` recorded in a ``summary.json`` next to the CSV (written by split) or else the CSV's
own directory (ingest's layout).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from components.common import ConfigError, atomic_write_text

MANIFEST_COLUMNS: tuple[str, ...] = ("id", "count", "path", "sha256", "width", "height", "source")


@dataclass(frozen=True)
class ManifestRow:
    """One labelled image."""

    id: str
    count: int
    path: str
    sha256: str
    width: int
    height: int
    source: str


def write_manifest(path: str | os.PathLike[str], rows: Iterable[ManifestRow]) -> Path:
    """Write rows atomically with the canonical header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestRow]:
    """Read a manifest CSV, checking the header so a wrong file fails with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist: run components.ingest (or split) first")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(
                f"{path} is not a manifest: missing columns {sorted(missing)}; "
                f"expected {','.join(MANIFEST_COLUMNS)}"
            )
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            try:
                rows.append(
                    ManifestRow(
                        id=rec["id"],
                        count=int(rec["count"]),
                        path=rec["path"],
                        sha256=rec["sha256"],
                        width=int(rec["width"]),
                        height=int(rec["height"]),
                        source=rec["source"],
                    )
                )
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}:{lineno}: bad manifest row {rec}: {e}") from e
    return rows


def resolve_data_root(
    manifest_path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None
) -> Path:
    """Where the manifest's relative ``path`` values point to (see module docstring)."""
    if data_root is not None:
        return Path(data_root)
    manifest_path = Path(manifest_path)
    summary = manifest_path.parent / "summary.json"
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("data_root")
        except json.JSONDecodeError:
            recorded = None
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return manifest_path.parent


def image_paths(rows: Sequence[ManifestRow], data_root: str | os.PathLike[str]) -> list[Path]:
    """Absolute image paths for ``rows`` (absolute ``path`` values are kept as they are)."""
    root = Path(data_root)
    return [Path(r.path) if os.path.isabs(r.path) else root / r.path for r in rows]


def load_labelled(
    manifest_path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None
) -> tuple[list[ManifestRow], list[Path]]:
    """Rows plus resolved image paths, failing early if an image is missing."""
    rows = read_manifest(manifest_path)
    if not rows:
        raise ConfigError(f"manifest {manifest_path} has no rows")
    root = resolve_data_root(manifest_path, data_root)
    paths = image_paths(rows, root)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{len(missing)} images listed in {manifest_path} are missing under data root {root} "
            f"(first: {missing[0]}); pass --data-root pointing at the ingest output directory"
        )
    return rows, paths


__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestRow",
    "image_paths",
    "load_labelled",
    "read_manifest",
    "resolve_data_root",
    "write_manifest",
]
