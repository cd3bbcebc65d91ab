"""One object: its metadata's label, its JPEG verified to decode, both written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.common import (
    ConfigError,
    atomic_write_bytes,
    sha256_bytes,
)
from components.ingesting.config import IMAGES_DIR, METADATA_DIR
from components.ingesting.select import Candidate
from components.ingesting.sources import ObjectMissingError, Source
from components.manifest import ManifestRow

# --------------------------------------------------------------------------------------------------
# Fetch one object
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Result of fetching one candidate: a manifest row, or a skip reason with a detail message."""

    id: str
    row: ManifestRow | None = None
    reason: str | None = None
    detail: str = ""
    resumed: bool = False
    relabelled_from: int | None = None
    nbytes: int = 0


def parse_label(metadata: bytes) -> int | None:
    """``EXPECTED_QUANTITY`` as a non-negative int, or None when absent/invalid."""
    try:
        value = json.loads(metadata).get("EXPECTED_QUANTITY")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def verify_jpeg(data: bytes) -> tuple[int, int]:
    """Decode every block of ``data`` and return its (width, height); raises ImageError.

    Draft mode (libjpeg's 1/8 DCT scaling, as training uses) still entropy-decodes the whole
    stream, so truncated or broken files fail exactly as with a full decode, at half the cost.
    """
    from components.preprocess import ImageError, open_image

    img = open_image(data)
    try:
        if img.format != "JPEG":
            raise ImageError(f"expected a JPEG, got {img.format}")
        size = img.size
        img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        img.load()
        return size
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"does not decode: {e}") from e
    finally:
        img.close()


def write_file(path: Path, data: bytes) -> None:
    """Temp file + rename, so a killed run never leaves a partial file under the final name.

    No fsync per file (it dominated the cost of small images): after a power loss a file could be
    short, and the resume journal's size check catches exactly that.
    """
    atomic_write_bytes(path, data, fsync=False)


def fetch_one(src: Source, cand: Candidate, out_dir: Path, classes: frozenset[int]) -> Outcome:
    """Download, label, verify and store one image; every data problem becomes a skip reason."""
    from components.preprocess import ImageError

    meta_key = f"{METADATA_DIR}/{cand.id}.json"
    img_key = f"{IMAGES_DIR}/{cand.id}.jpg"
    try:
        metadata = cand.metadata if cand.metadata is not None else src.read(meta_key)
    except ObjectMissingError:
        return Outcome(cand.id, reason="missing", detail=f"no {src.url(meta_key)}")
    except Exception as e:
        return Outcome(cand.id, reason="error", detail=f"{meta_key}: {type(e).__name__}: {e}")
    label = parse_label(metadata)
    if label is None:
        return Outcome(cand.id, reason="unlabeled", detail=f"{meta_key} has no valid EXPECTED_QUANTITY")
    relabelled = None
    if cand.listed is not None and cand.listed != label:
        if label not in classes:
            return Outcome(
                cand.id,
                reason="label_mismatch",
                detail=f"listed as {cand.listed}, EXPECTED_QUANTITY is {label} (not in --classes)",
            )
        relabelled = cand.listed
    try:
        data = src.read(img_key)
    except ObjectMissingError:
        return Outcome(cand.id, reason="missing_image", detail=f"no {src.url(img_key)}")
    except Exception as e:
        return Outcome(cand.id, reason="error", detail=f"{img_key}: {type(e).__name__}: {e}")
    try:
        width, height = verify_jpeg(data)
    except ImageError as e:
        return Outcome(cand.id, reason="corrupt", detail=f"{img_key}: {e}")
    rel = f"images/{cand.id}.jpg"
    try:
        write_file(out_dir / rel, data)
        write_file(out_dir / "metadata" / f"{cand.id}.json", metadata)
    except OSError as e:  # disk full, permissions: stop; completed objects are kept for a rerun
        raise ConfigError(f"cannot write to {out_dir}: {e.strerror or e}; fix it and rerun to resume") from e
    row = ManifestRow(
        id=cand.id,
        count=label,
        path=rel,
        sha256=sha256_bytes(data),
        width=width,
        height=height,
        source=src.url(img_key),
    )
    return Outcome(cand.id, row=row, relabelled_from=relabelled, nbytes=len(data))
