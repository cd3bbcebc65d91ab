"""The ingest run: select, fetch in parallel, resume, shard, and write the manifest and report."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import (
    ConfigError,
    atomic_write_json,
)
from components.ingesting.config import (
    DEFAULT_CLASSES,
    FILE_LIST,
    IMAGES_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_WORKERS,
    METADATA_DIR,
    REPORT_FILE,
    SELECT_MODES,
    SKIP_REASONS,
)
from components.ingesting.fetch import Outcome, fetch_one, parse_label
from components.ingesting.journal import Journal
from components.ingesting.select import (
    UNCAPPED,
    Candidate,
    default_file_list,
    load_file_list,
    per_class_quotas,
    round_robin,
    standard_file_list,
    stem_of,
)
from components.ingesting.sources import ObjectMissingError, S3Source, Source, open_source
from components.manifest import write_manifest
from components.shards import Fingerprint, check_shard, shard_of

log = logging.getLogger(__name__)

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
