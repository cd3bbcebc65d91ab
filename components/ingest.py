"""Fetch labelled bin images from S3 (or a local mirror) into a verified, resumable dataset directory.

Layout read (the public ``aft-vbi-pds`` bucket, a MinIO copy or a local directory)::

    <source>/bin-images/<id>.jpg   <source>/metadata/<id>.json   [<source>/file_list.json]

Layout written::

    <out>/images/<id>.jpg          original bytes, byte for byte, verified to decode
    <out>/metadata/<id>.json       the bin's record (provenance)
    <out>/manifest.csv             id,count,path,sha256,width,height,source (path relative to <out>)
    <out>/ingest_report.json       what was selected, ingested, resumed and skipped (per reason, with ids)
    <out>/.ingest_state.jsonl      journal of completed objects, so a rerun skips them

The label is always the metadata's ``EXPECTED_QUANTITY``. Bad objects (missing, corrupt, unlabeled) are
skipped and reported, never fatal; only configuration problems (unknown bucket, no access, unreachable
endpoint, empty selection) stop the run, with a one-line :class:`ConfigError`.

Sharded (``--shard K --num-shards N``): the run selects exactly as unsharded, then fetches only the ids
with :func:`components.shards.shard_of` ``== K`` into its own output directory; the report records the
shard and a fingerprint of the selection, and :mod:`components.ingest_merge` joins the N directories.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from components.common import (
    ConfigError,
    atomic_write_bytes,
    atomic_write_json,
    format_table,
    parse_int_list,
    run_cli,
    sha256_bytes,
)
from components.manifest import ManifestRow, write_manifest
from components.s3 import error_code, make_s3_client, parse_s3_url, source_error
from components.shards import Fingerprint, check_shard, shard_of

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "s3://aft-vbi-pds"
#: The public ABID bucket: over 500,000 metadata objects and no file_list.json, so a source under this
#: name (AWS or a mirror of it) without its own list selects the shipped standard subset, not a scan.
PUBLIC_BUCKET = "aft-vbi-pds"
DEFAULT_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5)
IMAGES_DIR = "bin-images"
METADATA_DIR = "metadata"
FILE_LIST = "file_list.json"
MANIFEST_FILE = "manifest.csv"
REPORT_FILE = "ingest_report.json"
STATE_FILE = ".ingest_state.jsonl"
LOCK_FILE = ".ingest.lock"
MAX_WORKERS = 256
#: ``--select``: the shipped standard subset, or every labelled image of ``--classes`` from the listing.
SELECT_MODES: tuple[str, ...] = ("standard", "all")

#: Why an object was skipped (stable keys of ``ingest_report.json["skipped"]``).
SKIP_REASONS: tuple[str, ...] = (
    "missing",  # id selected (e.g. listed in file_list.json) but no metadata object in the source
    "missing_image",  # metadata present, image object absent
    "unlabeled",  # metadata without a valid EXPECTED_QUANTITY (or not valid JSON)
    "label_mismatch",  # file_list class != EXPECTED_QUANTITY and EXPECTED_QUANTITY not in --classes
    "corrupt",  # image bytes do not decode as a JPEG (truncated, wrong format, too large)
    "error",  # transient failure after retries (network, 5xx): rerun to resume
)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class ObjectMissingError(Exception):
    """The requested object does not exist in the source (a data problem, not a config problem)."""


class Source(Protocol):
    """Read-only view of a dataset in the bucket layout; implementations must be thread-safe."""

    def describe(self) -> str: ...

    def url(self, key: str) -> str: ...

    def read(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def iter_keys(self, prefix: str) -> Iterator[str]: ...


class LocalSource:
    """A directory in the bucket layout (a mirror, or the shared sample)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def describe(self) -> str:
        return str(self.root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectMissingError(key) from e

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (a directory, with trailing slash) in S3 key order."""
        directory = self.root / prefix
        if not directory.is_dir():
            return
        for name in sorted(os.listdir(directory)):
            yield f"{prefix}{name}"


class S3Source:
    """A bucket (and optional prefix) read through one shared, thread-safe boto3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix  # "" or "some/prefix/"
        self.endpoint_url = endpoint_url

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return resp["Body"].read()
        except ClientError as e:
            if error_code(e) in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectMissingError(key) from e
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except ClientError as e:
            # S3 answers 403 rather than 404 for a missing key when listing is not allowed; read
            # access itself was checked by open_source, so both mean "not there".
            if error_code(e) in {"NoSuchKey", "404", "NotFound", "403", "AccessDenied", "Forbidden"}:
                return False
            raise

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` relative to the source prefix, in S3 (lexicographic) key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", ()):
                yield obj["Key"][len(self.prefix) :]


def open_source(
    source: str,
    *,
    endpoint_url: str | None = None,
    no_sign_request: bool = False,
    workers: int = 16,
) -> Source:
    """Open and check a source: one cheap request up front turns config mistakes into clear errors."""
    if source.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = parse_s3_url(source)
        # A fail-fast client for the probe (no 10x retry on a wrong endpoint), then the real one.
        import boto3

        probe_session = boto3.Session()
        probe, unsigned = make_s3_client(
            endpoint_url=endpoint_url,
            no_sign_request=no_sign_request,
            max_attempts=2,
            connect_timeout=3,
            session=probe_session,
        )
        try:
            resp = probe.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{METADATA_DIR}/", MaxKeys=1)
            first = [o["Key"] for o in resp.get("Contents", ())]
            if first:  # listing may be public while objects are not: read one to find out now
                probe.get_object(Bucket=bucket, Key=first[0])["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise source_error(e, bucket, endpoint_url, unsigned) from e
        if not first:
            raise ConfigError(
                f"no {METADATA_DIR}/ objects under s3://{bucket}/{prefix}: check the prefix in --source "
                f"(expected {IMAGES_DIR}/ and {METADATA_DIR}/ under it)"
            )
        client, _ = make_s3_client(
            endpoint_url=endpoint_url, workers=workers, session=probe_session, unsigned=unsigned
        )
        return S3Source(client, bucket, prefix, endpoint_url)
    if "://" in source:
        raise ConfigError(f"unsupported source {source!r}: use s3://bucket[/prefix] or a local directory")
    if endpoint_url:
        raise ConfigError("--endpoint-url only applies to an s3:// source")
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ConfigError(f"source directory {root} does not exist (or use s3://bucket[/prefix])")
    if not (root / METADATA_DIR).is_dir() or not (root / IMAGES_DIR).is_dir():
        raise ConfigError(f"{root} is not in the bucket layout: expected {IMAGES_DIR}/ and {METADATA_DIR}/")
    return LocalSource(root)


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
    return Path(__file__).resolve().parent / "resources" / "abid_file_list.json"


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


# --------------------------------------------------------------------------------------------------
# Resume journal
# --------------------------------------------------------------------------------------------------


class Journal:
    """Append-only record of completed objects; a rerun trusts an entry whose file size still matches.

    Each line is a manifest row plus the image's byte size. A run killed mid-write leaves at most a
    partial last line, which is ignored (that object is fetched again).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / STATE_FILE
        self.done: dict[str, tuple[ManifestRow, int]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    size = int(rec.pop("size"))
                    row = ManifestRow(**rec)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    continue
                self.done[row.id] = (row, size)
        self._fh: io.TextIOWrapper | None = None

    def lookup(self, id_: str, source_url: str) -> ManifestRow | None:
        """The recorded row if the image on disk is complete (same source, same size), else None."""
        entry = self.done.get(id_)
        if entry is None or entry[0].source != source_url:
            return None
        row, size = entry
        try:
            complete = (self.out_dir / row.path).stat().st_size == size
        except OSError:
            return None
        return row if complete and (self.out_dir / "metadata" / f"{id_}.json").is_file() else None

    def record(self, row: ManifestRow, size: int) -> None:
        """Append one completed object (called from the coordinating thread only)."""
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps({**asdict(row), "size": size}, sort_keys=True) + "\n")
        self._fh.flush()
        self.done[row.id] = (row, size)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    """What :func:`ingest` produced; ``counts`` maps class -> images in the manifest."""

    out_dir: Path
    manifest_path: Path
    report_path: Path
    n_images: int
    n_selected: int
    n_resumed: int
    counts: dict[int, int]
    skipped: dict[str, list[str]]
    n_bytes: int = 0
    elapsed_s: float = 0.0
    relabelled: list[dict[str, Any]] = field(default_factory=list)
    shard: tuple[int, int] = (0, 1)  # (K, N): shard K of N; (0, 1) when unsharded

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def n_errors(self) -> int:
        return len(self.skipped.get("error", ()))


def validate_out_dir(out_dir: Path, source: str) -> Path:
    """Create ``out_dir`` (or fail now, before any download) and refuse to write into the source."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if "://" not in source:
        src = Path(source).expanduser().resolve()
        res = out_dir.resolve()
        if res == src or src in res.parents:
            raise ConfigError(f"--out {out_dir} is inside the source {source}: choose another directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out_dir} is not writable: {e.strerror or e}") from e
    return out_dir


@contextlib.contextmanager
def _transport_errors(src: Source) -> Iterator[None]:
    """A listing that fails after all retries mid-run ends the run cleanly; a rerun resumes."""
    if not isinstance(src, S3Source):
        yield
        return
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as e:
        raise ConfigError(
            f"S3 request to {src.describe()} failed after retries: {e}; completed objects are kept, "
            "rerun the same command to resume"
        ) from e


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One ingest per output directory at a time (two would race on the journal)."""
    with (out_dir / LOCK_FILE).open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConfigError(
                f"another ingest is writing to {out_dir}: wait for it or use another --out"
            ) from e
        yield


def _clean_stale_temp_files(out_dir: Path) -> None:
    for sub in ("images", "metadata"):
        d = out_dir / sub
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def ingest(
    source: str,
    out_dir: Path,
    *,
    endpoint_url: str | None = None,
    file_list: Path | str | None = None,
    per_class: int | None = None,
    select: str | None = None,
    classes: Sequence[int] = DEFAULT_CLASSES,
    workers: int = 16,
    limit: int | None = None,
    no_sign_request: bool = False,
    progress: bool = True,
    shard: int | None = None,
    num_shards: int | None = None,
) -> IngestResult:
    """Select, download, verify and record images; see the module docstring for the layout.

    Selection: ``file_list`` (local path or s3:// URL), the first ``per_class`` *valid* images per class
    in metadata key order, ``select="standard"`` (the shipped 10,441-id subset), ``select="all"`` (every
    valid image of ``classes`` from the listing, even where the source has a file list), or, when none
    is given, :func:`default_file_list` (every valid image of ``classes`` when the source has no list).
    ``limit`` caps the total, taken round-robin across classes so a small run stays balanced.

    ``shard``/``num_shards``: select as above, then keep the ids with :func:`shard_of` ``== shard``.
    Selection, ``limit`` and per-class quotas apply before sharding, so the shards of one selection
    together hold the unsharded run's images (for quotas: as long as no selected image is bad, see
    :func:`_scan_per_class`).
    """
    t0 = time.monotonic()
    shard_k, shard_n = check_shard(shard, num_shards)
    classes = tuple(dict.fromkeys(int(c) for c in classes))
    if not classes or min(classes) < 0:
        raise ConfigError(f"--classes must be non-negative integers, got {classes}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be in [1, {MAX_WORKERS}], got {workers}")
    given = (("--file-list", file_list), ("--per-class", per_class), ("--select", select))
    chosen = [flag for flag, value in given if value is not None]
    if len(chosen) > 1:
        raise ConfigError(f"use only one of --file-list, --per-class and --select, got {', '.join(chosen)}")
    if select is not None and select not in SELECT_MODES:
        raise ConfigError(f"--select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {per_class}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    out_dir = validate_out_dir(Path(out_dir), source)
    src = open_source(source, endpoint_url=endpoint_url, no_sign_request=no_sign_request, workers=workers)
    select_all = select == "all"
    if select == "standard":
        file_list = standard_file_list()
    elif file_list is None and per_class is None and not select_all:
        file_list = default_file_list(src)
        if file_list is None:
            select_all = True
            log.info("%s has no %s: selecting every labelled image of --classes", source, FILE_LIST)
        elif file_list == standard_file_list():
            log.info("%s has no %s: selecting the standard subset %s", source, FILE_LIST, file_list)
    if shard_n > 1:
        quota = per_class is not None or (select_all and limit is not None)
        log.info(
            "shard %d of %d: fetching only this shard's ids of the selection%s",
            shard_k,
            shard_n,
            " (the quota applies before sharding: every shard reads the labels up to it)" if quota else "",
        )

    with exclusive(out_dir):
        _clean_stale_temp_files(out_dir)
        for sub in ("images", "metadata"):
            (out_dir / sub).mkdir(exist_ok=True)
        journal = Journal(out_dir)
        cls_set = frozenset(classes)
        outcomes: list[Outcome] = []
        try:
            with _transport_errors(src), ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
                if file_list is not None:
                    mapping = load_file_list(
                        file_list, source=src, endpoint_url=endpoint_url, no_sign_request=no_sign_request
                    )
                    unknown = [c for c in classes if c not in mapping]
                    if len(unknown) == len(classes):
                        raise ConfigError(
                            f"--file-list {file_list} has no entries for --classes {list(classes)} "
                            f"(it has classes {sorted(mapping)})"
                        )
                    seen: set[str] = set()
                    cands: list[Candidate] = []
                    for cand in round_robin([[Candidate(i, c) for i in mapping.get(c, [])] for c in classes]):
                        if cand.id not in seen:
                            seen.add(cand.id)
                            cands.append(cand)
                    if limit is not None:
                        cands = cands[:limit]
                    fingerprint = Fingerprint().extend((c.id, c.listed) for c in cands).hexdigest()
                    if shard_n > 1:
                        cands = [c for c in cands if shard_of(c.id, shard_n) == shard_k]
                    selection = {"mode": "file_list", "file_list": str(file_list)}
                    outcomes = _run_batch(
                        pool, src, cands, out_dir, cls_set, journal, _bar(progress, len(cands))
                    )
                    n_selected = len(cands)
                else:
                    if select_all:
                        # a limit keeps the total balanced across classes, as --per-class does
                        quotas = (
                            dict.fromkeys(classes, UNCAPPED)
                            if limit is None
                            else per_class_quotas(classes, limit, limit)
                        )
                        selection = {"mode": "all"}
                    else:
                        assert per_class is not None
                        quotas = per_class_quotas(classes, per_class, limit)
                        selection = {"mode": "per_class", "per_class": per_class, "quotas": quotas}
                    outcomes, n_selected, fingerprint = _scan_per_class(
                        pool, src, quotas, out_dir, cls_set, journal, workers, progress, (shard_k, shard_n)
                    )
        finally:
            journal.close()

    selection["fingerprint"] = fingerprint
    return _finish(
        src,
        out_dir,
        outcomes,
        n_selected,
        selection,
        classes,
        limit,
        time.monotonic() - t0,
        source,
        (shard_k, shard_n),
    )


def _bar(progress: bool, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)


def _run_batch(
    pool: ThreadPoolExecutor,
    src: Source,
    cands: Sequence[Candidate],
    out_dir: Path,
    classes: frozenset[int],
    journal: Journal,
    bar: Any,
    close_bar: bool = True,
) -> list[Outcome]:
    """Fetch candidates concurrently; results come back in candidate order (deterministic output)."""
    outcomes: list[Outcome | None] = [None] * len(cands)
    todo: list[int] = []
    for i, cand in enumerate(cands):
        row = journal.lookup(cand.id, src.url(f"{IMAGES_DIR}/{cand.id}.jpg"))
        if row is not None:
            relabelled = cand.listed if cand.listed not in (None, row.count) else None
            if relabelled is not None and row.count not in classes:
                todo.append(i)  # re-evaluate: the selection changed since the journal entry
                continue
            outcomes[i] = Outcome(cand.id, row=row, resumed=True, relabelled_from=relabelled)
            bar.update(1)
        else:
            todo.append(i)
    futures = {pool.submit(fetch_one, src, cands[i], out_dir, classes): i for i in todo}
    try:
        for fut in as_completed(futures):
            out = fut.result()
            outcomes[futures[fut]] = out
            if out.row is not None:
                journal.record(out.row, out.nbytes)
            bar.update(1)
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        if close_bar:
            bar.close()
    return [o for o in outcomes if o is not None]


def _scan_per_class(
    pool: ThreadPoolExecutor,
    src: Source,
    quotas: dict[int, int],
    out_dir: Path,
    classes: frozenset[int],
    journal: Journal,
    workers: int,
    progress: bool,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[Outcome], int, str]:
    """First ``quota`` valid images per class in metadata key order (all of them for UNCAPPED), page by page.

    Each page's metadata is read concurrently, then the images of classes still short are fetched
    concurrently. A failed image is reported and replaced by the class's next id in key order (from
    the same page first), so the selection is the same whatever the timing or the failures.

    Sharded (``shard`` = (K, N), N > 1), the quota is applied before sharding: every shard reads the
    labels of the first ``quota`` labelled ids of each class in key order (the *base*, the same in
    every shard) and fetches the base ids of shard K; a failed image is replaced by shard K's own next
    id of that class. So the shards together hold the unsharded selection whenever no base image is bad,
    and each class still totals its quota when one is (with a replacement an unsharded run might not
    pick). Uncapped, the base is every labelled id, and a shard reads only its own ids' metadata.

    Returns the outcomes, the number of ids tried and the selection's fingerprint (the same in every
    shard: the base's ids and labels when capped, the listed metadata keys when uncapped).
    """
    shard_k, n = shard
    capped = UNCAPPED not in quotas.values()
    seen = dict.fromkeys(quotas, 0)  # base ids per class so far (all shards)
    target = dict.fromkeys(quotas, 0)  # base ids per class of this shard: the valid images it owes
    got = dict.fromkeys(quotas, 0)
    base_print, listed_print = Fingerprint(), Fingerprint()
    kept: list[Outcome] = []
    failed: list[Outcome] = []
    n_selected = 0
    bar = _bar(progress, sum(quotas.values()) if capped and n == 1 else None)
    page_size = max(64, workers * 8)
    keys = (k for k in src.iter_keys(f"{METADATA_DIR}/") if k.endswith(".json"))

    def mine(id_: str) -> bool:
        return n == 1 or shard_of(id_, n) == shard_k

    def base_open() -> bool:
        return any(seen[c] < q for c, q in quotas.items())

    try:
        while base_open() or any(got[c] < target[c] for c in quotas):
            page = [stem_of(k) for _, k in zip(range(page_size), keys, strict=False)]
            if not page:
                break
            for i in page:
                listed_print.add(i)
            # While the base is still being counted every id's label matters (capped); after, and
            # when uncapped, only this shard's.
            counting = capped and base_open()
            wanted = [i for i in page if counting or mine(i)]
            # Labels come from the journal when the image is already complete, else from the metadata.
            resumed = {i: journal.lookup(i, src.url(f"{IMAGES_DIR}/{i}.jpg")) for i in wanted}
            need_meta = [i for i in wanted if resumed[i] is None]
            metas = dict(zip(need_meta, pool.map(lambda i: _read_or_none(src, i), need_meta), strict=True))
            labelled: list[tuple[str, int, bytes | None]] = []
            for i in wanted:
                row, meta = resumed[i], metas.get(i)
                if row is not None:
                    if row.count in quotas:
                        labelled.append((i, row.count, None))
                elif isinstance(meta, Outcome):
                    if n > 1 and counting:
                        # every shard must count the same base: stop rather than diverge
                        raise ConfigError(
                            f"reading {src.url(f'{METADATA_DIR}/{i}.json')} failed after retries "
                            f"({meta.detail}); completed objects are kept, rerun the same command to resume"
                        )
                    failed.append(meta)
                elif meta is not None:  # None: listed but gone since; nothing to report
                    label = parse_label(meta)
                    if label is None:
                        if mine(i):
                            failed.append(Outcome(i, reason="unlabeled", detail="no valid EXPECTED_QUANTITY"))
                    elif label in quotas:
                        labelled.append((i, label, meta))
            for i, label, _ in labelled:
                if seen[label] < quotas[label]:
                    seen[label] += 1
                    if capped:
                        base_print.add(i, label)
                    if mine(i):
                        target[label] += 1
            labelled = [x for x in labelled if mine(x[0])]
            page_kept: dict[str, Outcome] = {}
            tried: set[str] = set()
            while True:
                # In key order, as many untried ids per class as that class still lacks (base ids come
                # first); a failure is replaced by the class's next id in this page on the following round.
                short = {c: target[c] - got[c] for c in quotas}
                cands: list[Candidate] = []
                for i, label, meta in labelled:
                    if i not in tried and short[label] > 0:
                        short[label] -= 1
                        tried.add(i)
                        cands.append(Candidate(i, None, meta))
                if not cands:
                    break
                n_selected += len(cands)
                for out in _run_batch(pool, src, cands, out_dir, classes, journal, bar, close_bar=False):
                    if out.row is not None:
                        got[out.row.count] += 1
                        page_kept[out.id] = out
                    else:
                        failed.append(out)
            kept.extend(page_kept[i] for i, _, _ in labelled if i in page_kept)
    finally:
        bar.close()
    short_classes = {c: (got[c], target[c]) for c in quotas if got[c] < target[c]}
    short_classes.update({c: (got[c], q) for c, q in quotas.items() if seen[c] < q != UNCAPPED})
    if short_classes:
        log.warning(
            "the source ran out of valid images%s: %s",
            f" in shard {shard_k} of {n}" if n > 1 else "",
            ", ".join(f"class {c}: {g}/{q}" for c, (g, q) in sorted(short_classes.items())),
        )
    return kept + failed, n_selected, (base_print if capped else listed_print).hexdigest()


def _read_or_none(src: Source, id_: str) -> bytes | Outcome | None:
    try:
        return src.read(f"{METADATA_DIR}/{id_}.json")
    except ObjectMissingError:
        return None
    except Exception as e:
        return Outcome(id_, reason="error", detail=f"{METADATA_DIR}/{id_}.json: {type(e).__name__}: {e}")


def _finish(
    src: Source,
    out_dir: Path,
    outcomes: list[Outcome],
    n_selected: int,
    selection: dict[str, Any],
    classes: Sequence[int],
    limit: int | None,
    elapsed: float,
    source: str,
    shard: tuple[int, int] = (0, 1),
) -> IngestResult:
    rows = [o.row for o in outcomes if o.row is not None]
    skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
    details: dict[str, str] = {}
    for o in outcomes:
        if o.row is None and o.reason:
            skipped.setdefault(o.reason, []).append(o.id)
            if o.detail:
                details[o.id] = o.detail
    relabelled = [
        {"id": o.id, "listed": o.relabelled_from, "label": o.row.count}
        for o in outcomes
        if o.row is not None and o.relabelled_from is not None
    ]
    counts = {c: sum(1 for r in rows if r.count == c) for c in classes}
    manifest_path = write_manifest(out_dir / MANIFEST_FILE, rows)
    n_bytes = sum(o.nbytes for o in outcomes)
    n_resumed = sum(1 for o in outcomes if o.resumed)
    report = {
        "source": src.describe(),
        "selection": {**selection, "classes": list(classes), "limit": limit},
        "n_selected": n_selected,
        "n_images": len(rows),
        "n_resumed": n_resumed,
        "n_downloaded": len(rows) - n_resumed,
        "n_skipped": sum(len(v) for v in skipped.values()),
        "counts": {str(c): n for c, n in counts.items()},
        "skipped": {r: {"count": len(ids), "ids": sorted(ids)} for r, ids in skipped.items()},
        "details": dict(sorted(details.items())),
        "relabelled": relabelled,
        "manifest": MANIFEST_FILE,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round((len(rows) - n_resumed) / elapsed, 2) if elapsed > 0 else None,
        "bytes_downloaded": n_bytes,
        # which part of the selection this directory holds (0 of 1: all of it); read by ingest_merge
        "shard": {"index": shard[0], "count": shard[1]},
    }
    report_path = atomic_write_json(out_dir / REPORT_FILE, report)
    result = IngestResult(
        out_dir=out_dir,
        manifest_path=manifest_path,
        report_path=report_path,
        n_images=len(rows),
        n_selected=n_selected,
        n_resumed=n_resumed,
        counts=counts,
        skipped={r: ids for r, ids in skipped.items() if ids},
        n_bytes=n_bytes,
        elapsed_s=elapsed,
        relabelled=relabelled,
        shard=shard,
    )
    reasons = ", ".join(f"{r} {len(ids)}" for r, ids in result.skipped.items()) or "nothing selected"
    if not rows and shard[1] > 1:
        # another shard may hold the whole selection: the merge refuses an empty union
        log.warning("shard %d of %d holds no images (%s): see %s", shard[0], shard[1], reasons, report_path)
    elif not rows:
        raise ConfigError(
            f"no images were ingested from {source} ({reasons}): see {report_path} "
            "and check --source, --classes and the selection"
        )
    return result


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


__all__ = [
    "DEFAULT_SOURCE",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "SELECT_MODES",
    "SKIP_REASONS",
    "Candidate",
    "IngestResult",
    "LocalSource",
    "S3Source",
    "exclusive",
    "fetch_one",
    "ingest",
    "load_file_list",
    "main",
    "open_source",
    "stem_of",
    "verify_jpeg",
]


if __name__ == "__main__":
    sys.exit(main())
