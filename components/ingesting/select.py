"""Which images to take: the shipped standard list, a file list, per-class quotas, every labelled image."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import (
    ConfigError,
)
from components.ingesting.config import FILE_LIST, PUBLIC_BUCKET
from components.ingesting.sources import S3Source, Source
from components.s3 import error_code, make_s3_client, parse_s3_url

# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One id to ingest; ``listed`` is the class file_list.json gave it (None when scanning)."""

    id: str
    listed: int | None = None
    metadata: bytes | None = None


#: A per-class quota with no cap: the scan takes every valid image of that class.
UNCAPPED = sys.maxsize


def stem_of(key: str) -> str:
    """``"data/metadata/00001.json"`` -> ``"00001"`` (S3 stems kept exactly: ``00001`` != ``1``)."""
    name = key.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".json")] if name.endswith(".json") else name


def standard_file_list() -> Path:
    """The widely used 10,441-image, 5-class ABID subset (ids only), shipped with the package."""
    return Path(__file__).resolve().parents[1] / "resources" / "abid_file_list.json"


def default_file_list(src: Source) -> Path | str | None:
    """The selection when neither ``--file-list`` nor ``--per-class`` is given.

    ``<source>/file_list.json`` when there is one; the shipped standard subset for the public bucket
    (listing its half a million metadata objects would cost more than the download); else None: every
    labelled image of the source, as a directory of one's own photos expects.
    """
    if src.exists(FILE_LIST):
        return src.url(FILE_LIST) if isinstance(src, S3Source) else Path(src.url(FILE_LIST))
    if isinstance(src, S3Source) and src.bucket == PUBLIC_BUCKET:
        return standard_file_list()
    return None


def load_file_list(
    file_list: str | os.PathLike[str],
    *,
    source: Source,
    endpoint_url: str | None = None,
    no_sign_request: bool = False,
) -> dict[int, list[str]]:
    """Read a starter-style ``file_list.json`` (local path or s3:// URL) into ``{class: [ids]}``."""
    text = os.fspath(file_list)
    try:
        if text.startswith("s3://"):
            bucket, key = parse_s3_url(text)
            key = key.rstrip("/")
            if isinstance(source, S3Source) and source.bucket == bucket:
                raw = source.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            else:
                client, _ = make_s3_client(endpoint_url=endpoint_url, no_sign_request=no_sign_request)
                raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            raw = Path(text).read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"--file-list {text} does not exist") from e
    except Exception as e:  # botocore errors: name the object
        raise ConfigError(f"cannot read --file-list {text}: {error_code(e) or e}") from e
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--file-list {text} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(f'--file-list {text}: expected {{"1": ["metadata/<id>.json", ...], ...}}')
    out: dict[int, list[str]] = {}
    for key, values in data.items():
        try:
            cls = int(key)
        except ValueError as e:
            raise ConfigError(f"--file-list {text}: class keys must be integers, got {key!r}") from e
        out[cls] = [stem_of(str(v)) for v in values]
    return out


def round_robin(lists: Sequence[Sequence[Any]]) -> list[Any]:
    """Interleave lists (a1, b1, c1, a2, ...) so a capped selection stays balanced across classes."""
    out: list[Any] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def per_class_quotas(classes: Sequence[int], per_class: int, limit: int | None) -> dict[int, int]:
    """How many images each class gets: ``per_class``, spread so the total stays within ``limit``."""
    quotas = dict.fromkeys(classes, 0)
    remaining = sum(per_class for _ in classes) if limit is None else min(limit, per_class * len(classes))
    while remaining > 0:
        for c in classes:
            if remaining and quotas[c] < per_class:
                quotas[c] += 1
                remaining -= 1
    return quotas
