"""The manifest format and data-root resolution shared by every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.common import ConfigError, atomic_write_json, format_table, parse_float_list
from components.manifest import (
    ManifestRow,
    load_labelled,
    read_manifest,
    resolve_data_root,
    write_manifest,
)


def _row(i: int, path: str) -> ManifestRow:
    return ManifestRow(id=str(i), count=i % 5 + 1, path=path, sha256="ab" * 32, width=8, height=8, source="x")


def test_round_trip_and_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "ingest"
    (root / "images").mkdir(parents=True)
    (root / "images" / "7.jpg").write_bytes(b"jpg")
    write_manifest(root / "manifest.csv", [_row(7, "images/7.jpg")])
    assert read_manifest(root / "manifest.csv") == [_row(7, "images/7.jpg")]
    rows, paths = load_labelled(root / "manifest.csv")
    assert paths == [root / "images" / "7.jpg"]

    # A split directory elsewhere resolves through summary.json's data_root.
    split = tmp_path / "split"
    write_manifest(split / "train.csv", rows)
    atomic_write_json(split / "summary.json", {"data_root": str(root)})
    assert resolve_data_root(split / "train.csv") == root
    assert load_labelled(split / "train.csv")[1] == paths
    # ... and an explicit data root wins.
    assert resolve_data_root(split / "train.csv", tmp_path) == tmp_path


def test_missing_images_and_bad_files_fail_clearly(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m.csv", [_row(1, "images/1.jpg")])
    with pytest.raises(ConfigError, match="--data-root"):
        load_labelled(tmp_path / "m.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="missing columns"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


def test_common_helpers(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}
    assert not list(tmp_path.glob(".*tmp"))
    assert (tmp_path / "a.json").stat().st_mode & 0o044 == 0o044  # readable by other users
    with pytest.raises(ConfigError, match="--ratios"):
        parse_float_list("0.7,x", name="--ratios")
    table = format_table([["a", 0.123456]], ["name", "value"])
    assert "0.1235" in table and table.splitlines()[1].startswith("----")
