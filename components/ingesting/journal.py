"""The resume journal: the objects a run has finished, so a rerun skips them."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

from components.ingesting.config import STATE_FILE
from components.manifest import ManifestRow

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
