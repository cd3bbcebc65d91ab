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

The code lives in :mod:`components.ingesting` (config, sources, select, fetch, journal, run, cli); the
names below are the Python API documented for this module.
"""

from __future__ import annotations

import sys

from components.ingesting.cli import (
    build_parser,
    main,
)
from components.ingesting.config import (
    DEFAULT_CLASSES,
    DEFAULT_SOURCE,
    FILE_LIST,
    IMAGES_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_WORKERS,
    METADATA_DIR,
    PUBLIC_BUCKET,
    REPORT_FILE,
    SELECT_MODES,
    SKIP_REASONS,
    STATE_FILE,
)
from components.ingesting.fetch import (
    Outcome,
    fetch_one,
    parse_label,
    verify_jpeg,
    write_file,
)
from components.ingesting.journal import (
    Journal,
)
from components.ingesting.run import (
    IngestResult,
    exclusive,
    ingest,
    validate_out_dir,
)
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
from components.ingesting.sources import (
    LocalSource,
    ObjectMissingError,
    S3Source,
    Source,
    open_source,
)

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_SOURCE",
    "FILE_LIST",
    "IMAGES_DIR",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MAX_WORKERS",
    "METADATA_DIR",
    "PUBLIC_BUCKET",
    "REPORT_FILE",
    "SELECT_MODES",
    "SKIP_REASONS",
    "STATE_FILE",
    "UNCAPPED",
    "Candidate",
    "IngestResult",
    "Journal",
    "LocalSource",
    "ObjectMissingError",
    "Outcome",
    "S3Source",
    "Source",
    "build_parser",
    "default_file_list",
    "exclusive",
    "fetch_one",
    "ingest",
    "load_file_list",
    "main",
    "open_source",
    "parse_label",
    "per_class_quotas",
    "round_robin",
    "standard_file_list",
    "stem_of",
    "validate_out_dir",
    "verify_jpeg",
    "write_file",
]

if __name__ == "__main__":
    sys.exit(main())
