"""What ingest reads and writes: the bucket layout, the file names it leaves, the selection modes and skip
reasons."""

from __future__ import annotations

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
