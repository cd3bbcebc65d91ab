"""Small helpers every step shares: atomic writes, hashing, config errors, CLI parsing."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message says what is wrong and how to fix it."""


def setup_logging(level: str | int = "INFO") -> None:
    """Configure root logging once for a CLI entry point (never at import time)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def run_cli(
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    *,
    log_level: str = "INFO",
    prepare: Callable[[argparse.ArgumentParser, Sequence[str] | None], None] | None = None,
) -> int:
    """A CLI entry point: parse ``argv``, set up logging (the parser's ``--log-level`` if it has one,
    else ``log_level``) and return ``work(args)``; a :class:`ConfigError` prints ``error: ...`` on
    stderr and exits 2. ``prepare`` adjusts the parser first (e.g. defaults from a ``--config`` file)."""
    try:
        if prepare is not None:
            prepare(parser, argv)
        args = parser.parse_args(argv)
        setup_logging(getattr(args, "log_level", log_level))
        return work(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temp file + rename so readers never see a partial file.

    ``fsync=False`` skips the flush to disk for bulk writes whose integrity is checked another way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; results must be readable like any other file (e.g. by a
        # model server running under another UID).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write pretty, key-sorted JSON atomically (stable diffs, no half-written results)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_dir(dest: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(stage)`` next to ``dest``, then swap it in (replacing ``dest``).

    Readers see the old directory or the new one, never a half-written one; on any error the stage
    is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        fill(stage)
        stage.chmod(0o755)  # mkdtemp is private; a server may run under another UID
        if dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, trash / dest.name)
            os.replace(stage, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dest


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing or broken file into a :class:`ConfigError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed so large files don't load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def parse_int_list(text: str, *, name: str) -> list[int]:
    """Parse ``"1,2,3"`` into ints, with a message naming the flag when it fails."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated integers like 1,2,3, got {text!r}") from e
    if not values:
        raise ConfigError(f"{name}: expected at least one integer, got {text!r}")
    return values


def parse_float_list(text: str, *, name: str) -> list[float]:
    """Parse ``"0.7,0.15,0.15"`` into floats, with a message naming the flag when it fails."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated numbers like 0.7,0.15,0.15, got {text!r}") from e
    if not values:
        raise ConfigError(f"{name}: expected at least one number, got {text!r}")
    return values


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Render a plain-text table for terminal summaries (no extra dependency)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
