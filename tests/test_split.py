"""components.split on manifests over the real ABID sample: determinism, stratification, leakage."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from components.common import ConfigError, sha256_file
from components.ingest import ingest
from components.manifest import ManifestRow, load_labelled, read_manifest, write_manifest
from components.split import SPLITS, main, split_dataset
from tests.fixtures.s3data import real_ids_by_class

PER_CLASS = {1: 12, 2: 30, 3: 30, 4: 24, 5: 18}  # imbalanced, like the real data


@pytest.fixture(scope="module")
def abid_rows(abid_dir: Path) -> list[ManifestRow]:
    """Manifest rows pointing into the shared sample itself (data root = the sample directory)."""
    ids = real_ids_by_class(abid_dir, max(PER_CLASS.values()), tuple(PER_CLASS))
    rows = []
    for cls, n in PER_CLASS.items():
        for i in ids[cls][:n]:
            path = abid_dir / "bin-images" / f"{i}.jpg"
            rows.append(ManifestRow(i, cls, f"bin-images/{i}.jpg", sha256_file(path), 0, 0, str(path)))
    return rows


def _write(tmp_path: Path, rows: list[ManifestRow], name: str = "manifest.csv") -> Path:
    return write_manifest(tmp_path / name, rows)


def _split_rows(out: Path) -> dict[str, list[ManifestRow]]:
    return {s: read_manifest(out / f"{s}.csv") for s in SPLITS}


def test_deterministic_for_content_and_seed(abid_rows: list[ManifestRow], abid_dir: Path, tmp_path: Path):
    manifest = _write(tmp_path, abid_rows)
    shuffled = list(abid_rows)
    random.Random(7).shuffle(shuffled)
    manifest_shuffled = _write(tmp_path, shuffled, "shuffled.csv")

    a = split_dataset(manifest, tmp_path / "a", seed=3, data_root=abid_dir)
    b = split_dataset(manifest_shuffled, tmp_path / "b", seed=3, data_root=abid_dir)
    c = split_dataset(manifest, tmp_path / "c", seed=4, data_root=abid_dir)
    for s in SPLITS:  # same content + seed = same bytes, whatever the row order
        assert a.paths[s].read_bytes() == b.paths[s].read_bytes()
    assert a.paths["test"].read_bytes() != c.paths["test"].read_bytes()
    assert a.counts == c.counts  # a different seed changes membership, not the stratified sizes


def test_stratified_by_count(abid_rows: list[ManifestRow], abid_dir: Path, tmp_path: Path):
    result = split_dataset(_write(tmp_path, abid_rows), tmp_path / "out", seed=0, data_root=abid_dir)
    parts = _split_rows(tmp_path / "out")
    for cls, n in PER_CLASS.items():
        for s, ratio in zip(SPLITS, (0.7, 0.15, 0.15), strict=True):
            got = sum(1 for r in parts[s] if r.count == cls)
            assert got == result.counts[s][cls]
            assert abs(got - n * ratio) <= 1, (cls, s, got)
    summary = json.loads(result.summary_path.read_text())
    assert summary["data_root"] == str(abid_dir.resolve())
    assert summary["counts"]["train"] == {str(c): n for c, n in result.counts["train"].items()}
    assert sum(summary["totals"].values()) == len(abid_rows)
    assert result.histogram_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_leakage_and_duplicates_stay_together(
    abid_rows: list[ManifestRow], abid_dir: Path, tmp_path: Path
):
    rows = list(abid_rows)
    # Plant byte-identical images under other ids (same sha256), as re-uploaded bins would be.
    dup_groups = [rows[0:4], rows[20:23], rows[50:52], rows[100:102]]
    planted = []
    for g in dup_groups:
        for r in g[1:]:
            planted.append(dataclasses.replace(r, sha256=g[0].sha256))
    by_id = {r.id: r for r in planted}
    rows = [by_id.get(r.id, r) for r in rows]
    result = split_dataset(_write(tmp_path, rows), tmp_path / "out", seed=1, data_root=abid_dir)
    parts = _split_rows(tmp_path / "out")

    ids = [r.id for s in SPLITS for r in parts[s]]
    assert sorted(ids) == sorted(r.id for r in rows)  # every row exactly once
    side = {r.sha256: set() for r in rows}
    for s in SPLITS:
        for r in parts[s]:
            side[r.sha256].add(s)
    assert all(len(v) == 1 for v in side.values()), "an image appears on two sides of the split"
    summary = json.loads(result.summary_path.read_text())
    assert summary["duplicate_groups"] == 4 and summary["duplicate_rows"] == 11
    # Manifests reference the images (relative paths, nothing copied) and resolve via summary.json.
    assert not list((tmp_path / "out").glob("*.jpg"))
    train_rows, paths = load_labelled(result.train_csv)
    assert all(p.is_file() and str(p).startswith(str(abid_dir.resolve())) for p in paths)
    assert train_rows[0].path.startswith("bin-images/")


def test_clear_errors(abid_rows: list[ManifestRow], abid_dir: Path, tmp_path: Path):
    manifest = _write(tmp_path, abid_rows)
    bad_ratios = [(0.7, 0.2, 0.2), (0.7, 0.3), (1.2, -0.1, -0.1), (0.0, 0.5, 0.5)]
    for ratios in bad_ratios:
        with pytest.raises(ConfigError, match="--ratios"):
            split_dataset(manifest, tmp_path / "o", ratios=ratios, data_root=abid_dir)
    tiny = [r for r in abid_rows if r.count != 1] + [r for r in abid_rows if r.count == 1][:2]
    with pytest.raises(ConfigError, match=r"too few distinct images .*class 1: 2"):
        split_dataset(_write(tmp_path, tiny, "tiny.csv"), tmp_path / "o", data_root=abid_dir)
    # Two non-zero shares need only two images per class; a zero share stays empty when asked for.
    result = split_dataset(
        _write(tmp_path, tiny, "tiny.csv"), tmp_path / "o2", ratios=(0.8, 0.2, 0.0), data_root=abid_dir
    )
    assert read_manifest(result.test_csv) == [] and result.counts["val"][1] == 1
    with pytest.raises(ConfigError, match="has no rows"):
        split_dataset(_write(tmp_path, [], "empty.csv"), tmp_path / "o", data_root=abid_dir)
    with pytest.raises(ConfigError, match="missing under data root"):
        split_dataset(manifest, tmp_path / "o")  # paths are relative to the sample, not to tmp_path
    with pytest.raises(ConfigError, match="ids more than once"):
        split_dataset(
            _write(tmp_path, [*abid_rows, abid_rows[0]], "rep.csv"), tmp_path / "o", data_root=abid_dir
        )


def test_cli_after_ingest(abid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    ingest(str(abid_dir), data, per_class=4, workers=4, progress=False)
    out = tmp_path / "split"
    assert main(["--manifest", str(data / "manifest.csv"), "--out", str(out), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and str(out / "train.csv") in printed
    counts = Counter(r.count for r in read_manifest(out / "train.csv"))
    assert counts == {c: 2 for c in (1, 2, 3, 4, 5)}  # 4 per class -> 2/1/1
    _, paths = load_labelled(out / "val.csv")  # resolves to the ingest dir through summary.json
    assert all(p.parent == (data / "images").resolve() for p in paths)

    assert main(["--manifest", str(data / "manifest.csv"), "--out", str(out), "--ratios", "0.5,0.5"]) == 2
    assert capsys.readouterr().err.startswith("error: --ratios needs 3 values")
    assert main(["--manifest", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "run components.ingest" in capsys.readouterr().err
