"""Sharded ingest (components.ingest --shard K --num-shards N) and the merge (components.ingest_merge),
against the real local S3 API (moto_server) and the shared ABID sample."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.common import ConfigError, sha256_file
from components.ingest import (
    PUBLIC_BUCKET,
    REPORT_FILE,
    STATE_FILE,
    ingest,
    main,
    round_robin,
    standard_file_list,
    stem_of,
)
from components.ingest_merge import main as merge_main
from components.ingest_merge import merge_shards
from components.manifest import ManifestRow, load_labelled, read_manifest
from components.shards import check_shard, shard_of
from tests.fixtures.s3data import (
    CORRUPT_ID,
    NO_IMAGE_ID,
    UNLABELED_ID,
    AbidBucket,
    AbidSample,
    real_ids_by_class,
    real_objects,
    upload,
)
from tests.test_ingest import _linked_source

REPO_ROOT = Path(__file__).resolve().parents[1]
N = 3


def _report(out: Path) -> dict:
    return json.loads((out / REPORT_FILE).read_text())


def _rows(out: Path) -> set[ManifestRow]:
    return set(read_manifest(out / "manifest.csv"))


def _skipped(out: Path) -> dict[str, list[str]]:
    return {r: v["ids"] for r, v in _report(out)["skipped"].items() if v["count"]}


def _shards(run, root: Path, n: int = N) -> list[Path]:
    """``run(out, shard, num_shards)`` for every shard; returns the shard directories."""
    dirs = [root / f"shard-{k}" for k in range(n)]
    for k, d in enumerate(dirs):
        run(d, k, n)
    return dirs


def _union_equals(unsharded: Path, shard_dirs: list[Path]) -> None:
    """The shards' rows are disjoint and together the unsharded run's (ids, counts, sha256, paths),
    each in the shard its id hashes to; their skipped ids add up to the unsharded run's too."""
    parts = [_rows(d) for d in shard_dirs]
    assert sum(len(p) for p in parts) == len(set().union(*parts))
    assert set().union(*parts) == _rows(unsharded)
    for k, part in enumerate(parts):
        assert all(shard_of(r.id, len(shard_dirs)) == k for r in part)
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    for d in shard_dirs:
        for reason, ids in _skipped(d).items():
            skipped[reason] += ids
    assert {r: sorted(v) for r, v in skipped.items()} == _skipped(unsharded)
    reports = [_report(d) for d in shard_dirs]
    assert [r["shard"] for r in reports] == [
        {"index": k, "count": len(shard_dirs)} for k in range(len(parts))
    ]
    # every shard computed the same selection, the unsharded run's
    assert {r["selection"]["fingerprint"] for r in reports} == {
        _report(unsharded)["selection"]["fingerprint"]
    }


# ------------------------------------------------------------------------------------ shard_of


def test_shard_of_is_the_sha256_prefix_mod_n():
    def formula(id_: str, n: int) -> int:
        return int.from_bytes(hashlib.sha256(id_.encode()).digest()[:8], "big") % n

    # fixed numbers: a change of formula (or a salted hash()) would move every id to another shard
    assert [shard_of("00001", n) for n in (1, 2, 3, 4, 7, 1000)] == [0, 1, 2, 3, 5, 423]
    assert [shard_of("523712", n) for n in (2, 3, 4, 7, 1000)] == [1, 2, 3, 0, 947]
    assert [shard_of("100313", n) for n in (2, 3, 4, 7, 1000)] == [0, 2, 0, 0, 820]
    for id_ in ("00001", "1", "05000", "523712", "bin-ü"):
        assert all(shard_of(id_, n) == formula(id_, n) for n in (1, 2, 3, 16, 97))
    assert shard_of("00001", 4) != shard_of("1", 4)  # stems are ids exactly as written
    # the same in another interpreter (hash() would not be: PYTHONHASHSEED)
    code = "from components.shards import shard_of; print(shard_of('00001', 1000), shard_of('523712', 1000))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["423", "947"], out.stderr


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_shard_of_is_balanced(n: int):
    ids = [f"{i:05d}" for i in range(1, 10_001)]  # ABID-like stems
    sizes = collections.Counter(shard_of(i, n) for i in ids)
    assert sorted(sizes) == list(range(n))
    mean = len(ids) / n
    assert all(abs(s - mean) <= 4 * mean**0.5 for s in sizes.values()), sorted(sizes.values())


def test_shard_flags_are_checked_before_anything_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert check_shard(None, None) == (0, 1) and check_shard(2, 3) == (2, 3)
    nowhere = str(tmp_path / "no-such-source")  # would fail later, with another message
    cases = [
        (["--shard", "3", "--num-shards", "3"], "--shard must be in [0, 3) for --num-shards 3, got 3"),
        (["--shard", "-1", "--num-shards", "3"], "--shard must be in [0, 3)"),
        (["--shard", "0", "--num-shards", "0"], "--num-shards must be >= 1, got 0"),
        (["--shard", "1"], "--shard 1 needs --num-shards"),
        (["--num-shards", "4"], "--num-shards 4 needs --shard K"),
        (["--select", "all", "--per-class", "3"], "not allowed with argument"),  # argparse, exit 2 too
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) if "argument" in message else contextlib.nullcontext():
            assert main(["--source", nowhere, "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "no-such-source" not in err, err
    assert not (tmp_path / "o").exists()  # refused before creating the output directory
    with pytest.raises(ConfigError, match="only one of --file-list, --per-class and --select"):
        ingest(nowhere, tmp_path / "o", per_class=2, select="all")


# ------------------------------------------------------------------------------ sharded ingest


def test_three_shards_from_s3_make_the_unsharded_dataset(
    abid_bucket: AbidBucket, abid_dir: Path, tmp_path: Path
):
    # The bucket's file_list.json selection, with its planted problems (absent, corrupt, image-less,
    # unlabelled, relabelled, label mismatch): sharded, each lands in exactly one shard.
    ep = abid_bucket.endpoint
    whole = ingest(abid_bucket.url, tmp_path / "whole", endpoint_url=ep, workers=4, progress=False)
    dirs = _shards(
        lambda out, k, n: ingest(
            abid_bucket.url, out, endpoint_url=ep, workers=4, progress=False, shard=k, num_shards=n
        ),
        tmp_path,
    )
    _union_equals(whole.out_dir, dirs)
    assert sum(_report(d)["n_selected"] for d in dirs) == whole.n_selected

    merged = merge_shards(dirs, tmp_path / "merged")
    assert _rows(merged.out_dir) == _rows(whole.out_dir)
    assert [r.id for r in read_manifest(merged.manifest_path)] == sorted(r.id for r in _rows(whole.out_dir))
    mine, theirs = _report(merged.out_dir), _report(whole.out_dir)
    for key in (
        "source",
        "selection",
        "n_selected",
        "n_images",
        "counts",
        "skipped",
        "details",
        "relabelled",
    ):
        assert mine[key] == theirs[key], key
    assert merged.counts == whole.counts
    # self-contained: every path resolves under the merged directory, to the original bytes, as a hard
    # link to the shard's file (same filesystem here), so the shards can go
    rows, paths = load_labelled(merged.manifest_path)
    for row, path in zip(rows, paths, strict=True):
        assert path.is_relative_to(merged.out_dir) and path.stat().st_nlink == 2
        assert sha256_file(path) == row.sha256 == sha256_file(abid_dir / "bin-images" / f"{row.id}.jpg")
        assert (merged.out_dir / "metadata" / f"{row.id}.json").is_file()
    assert merged.placed == {"linked": whole.n_images, "copied": 0, "present": 0}
    # a rerun finds everything in place
    assert merge_shards(dirs, tmp_path / "merged").placed["present"] == whole.n_images


def test_per_class_quota_is_applied_before_sharding(aws_env: str, abid_dir: Path, tmp_path: Path):
    # Quota first (the first 5 labelled ids per class in key order, read by every shard), then shards:
    # on a bucket without bad images the union is exactly the unsharded run.
    ids = real_ids_by_class(abid_dir, 9, (1, 2, 3, 4, 5))
    upload(aws_env, "clean", "", real_objects(abid_dir, [i for v in ids.values() for i in v]))
    whole = ingest(
        "s3://clean", tmp_path / "whole", endpoint_url=aws_env, per_class=5, workers=4, progress=False
    )
    assert sorted(r.id for r in _rows(whole.out_dir)) == sorted(i for v in ids.values() for i in v[:5])

    def run(out: Path, k: int, n: int) -> None:
        ingest(
            "s3://clean",
            out,
            endpoint_url=aws_env,
            per_class=5,
            workers=4,
            progress=False,
            shard=k,
            num_shards=n,
        )

    _union_equals(whole.out_dir, _shards(run, tmp_path))
    # --limit with --select all is a quota too: applied before sharding
    capped = ingest(
        "s3://clean", tmp_path / "cap", endpoint_url=aws_env, select="all", limit=12, progress=False
    )

    def run_capped(out: Path, k: int, n: int) -> None:
        ingest(
            "s3://clean",
            out,
            endpoint_url=aws_env,
            select="all",
            limit=12,
            progress=False,
            shard=k,
            num_shards=n,
        )

    _union_equals(capped.out_dir, _shards(run_capped, tmp_path / "capped", n=4))


def test_per_class_shards_replace_their_own_bad_images(abid_bucket: AbidBucket, tmp_path: Path):
    # The planted corrupt (class 2) and image-less (class 3) objects are the first of their classes in
    # key order, so in every shard's base. The shard holding one replaces it by its own next id of that
    # class (it cannot know the others' failures): the class totals its quota when that shard has one.
    ep, sample, quota = abid_bucket.endpoint, abid_bucket.sample, 2
    whole = ingest(abid_bucket.url, tmp_path / "whole", endpoint_url=ep, per_class=quota, progress=False)

    def run(out: Path, k: int, n: int) -> None:
        ingest(abid_bucket.url, out, endpoint_url=ep, per_class=quota, progress=False, shard=k, num_shards=n)

    dirs = _shards(run, tmp_path)
    union = {r.id: r.count for d in dirs for r in _rows(d)}
    expected = {i for c in (1, 4, 5) for i in sample.ids[c][:quota]}  # no bad image: as unsharded
    for c, bad, reason in ((2, CORRUPT_ID, "corrupt"), (3, NO_IMAGE_ID, "missing_image")):
        holder = shard_of(bad, N)
        assert _skipped(dirs[holder])[reason] == [bad]
        good_base = sample.ids[c][: quota - 1]  # the base: the bad id, then the class's first good one
        spare = [i for i in sample.ids[c][quota - 1 :] if shard_of(i, N) == holder]
        expected |= {*good_base, *spare[:1]}
    assert set(union) == expected
    # here class 3's holder had a spare id (as unsharded: a full class) and class 2's had none
    assert sum(1 for c in union.values() if c == 3) == whole.counts[3] == quota
    assert sum(1 for c in union.values() if c == 2) == quota - 1
    merged = merge_shards(dirs, tmp_path / "merged")
    assert merged.counts == {**whole.counts, 2: quota - 1}


def test_select_all_lists_the_public_bucket_and_shards(abid_dir: Path, tmp_path: Path, aws_env: str):
    # A bucket named like the public one: without flags it means the shipped standard subset; --select all
    # asks for every labelled image of --classes from the listing instead.
    ids = real_ids_by_class(abid_dir, 4, (0, 1, 2, 3, 4, 5, 7))
    labels = {i: c for c, v in ids.items() for i in v}
    upload(aws_env, PUBLIC_BUCKET, "", real_objects(abid_dir, list(labels)))
    url = f"s3://{PUBLIC_BUCKET}"
    wanted = sorted(i for i, c in labels.items() if 1 <= c <= 5)
    out = tmp_path / "all"
    base = ["--source", url, "--endpoint-url", aws_env, "--no-progress", "--workers", "4"]
    assert main([*base, "--out", str(out), "--select", "all"]) == 0
    assert sorted(r.id for r in _rows(out)) == wanted
    assert _report(out)["selection"]["mode"] == "all" and _report(out)["n_selected"] == len(wanted)
    assert all(r.count == labels[r.id] for r in _rows(out))

    dirs = [tmp_path / f"s{k}" for k in range(N)]
    for k, d in enumerate(dirs):
        assert (
            main([*base, "--out", str(d), "--select", "all", "--shard", str(k), "--num-shards", str(N)]) == 0
        )
    _union_equals(out, dirs)
    assert merge_main(["--out", str(tmp_path / "merged"), *map(str, dirs)]) == 0
    assert _rows(tmp_path / "merged") == _rows(out)

    # --select standard names the shipped subset explicitly, over a source's own file_list.json too
    std = ingest(str(abid_dir), tmp_path / "std", select="standard", limit=25, workers=4, progress=False)
    listed = json.loads(standard_file_list().read_text())
    first = set(round_robin([[stem_of(k) for k in listed[c]] for c in ("1", "2", "3", "4", "5")])[:25])
    present = {i for i in first if (abid_dir / "metadata" / f"{i}.json").is_file()}
    assert present and {r.id for r in _rows(std.out_dir)} == present
    assert _report(std.out_dir)["selection"]["file_list"] == str(standard_file_list())


def test_select_all_ignores_the_bucket_file_list(abid_bucket: AbidBucket, tmp_path: Path):
    sample = abid_bucket.sample
    result = ingest(
        abid_bucket.url, tmp_path / "o", endpoint_url=abid_bucket.endpoint, select="all", progress=False
    )
    assert _report(tmp_path / "o")["selection"]["mode"] == "all"
    assert sorted(r.id for r in _rows(result.out_dir)) == sample.valid_ids  # the relabelled one too
    assert result.skipped == {
        "corrupt": [CORRUPT_ID],
        "missing_image": [NO_IMAGE_ID],
        "unlabeled": [UNLABELED_ID],
    }


def test_an_interrupted_shard_resumes_without_fetching_again(abid_dir: Path, tmp_path: Path):
    source, order = _linked_source(abid_dir, tmp_path / "bucket", per_class=12)
    mine = [i for i in order if shard_of(i, N) == 1]
    assert len(mine) > 10
    # the shard's 5th image is a FIFO: the run blocks there with 4 done, and is killed
    blocker = source / "bin-images" / f"{mine[4]}.jpg"
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "shard-1"
    cmd = [sys.executable, "-m", "components.ingest", "--source", str(source), "--out", str(out)]
    cmd += ["--shard", "1", "--num-shards", str(N), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / STATE_FILE
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert done == mine[:4] and not (out / REPORT_FILE).exists()
    inodes = {i: (out / "images" / f"{i}.jpg").stat().st_ino for i in done}
    blocker.unlink()
    blocker.symlink_to(abid_dir / "bin-images" / blocker.name)

    result = ingest(str(source), out, workers=4, progress=False, shard=1, num_shards=N)
    assert result.n_images == len(mine) and result.n_resumed == 4
    assert _report(out)["n_downloaded"] == len(mine) - 4
    # the journaled images were not written again (a rewrite is a new file: temp + rename)
    assert {i: (out / "images" / f"{i}.jpg").stat().st_ino for i in done} == inodes
    whole = ingest(str(source), tmp_path / "whole", workers=4, progress=False)
    assert _rows(out) == {r for r in _rows(whole.out_dir) if shard_of(r.id, N) == 1}


# ----------------------------------------------------------------------------------------- merge


def test_merge_refuses_shards_that_do_not_fit(
    abid_sample: AbidSample, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    src = str(abid_sample.write_dir(tmp_path / "mirror"))

    def shards(name: str, n: int, **kw: object) -> list[Path]:
        return _shards(
            lambda out, k, n: ingest(src, out, workers=2, progress=False, shard=k, num_shards=n, **kw),
            tmp_path / name,
            n,
        )

    listed = shards("listed", N)  # the mirror's file_list.json
    scanned = shards("scanned", N, per_class=2)
    halves = shards("halves", 2)
    limited = shards("limited", N, limit=10)
    (tmp_path / "unfinished").mkdir()
    cases = [
        ([listed[0], listed[1]], "missing shard 2 of 3 (got 0, 1)"),
        ([listed[0], listed[1], listed[1], listed[2]], "shard 1 of 3 given 2 times"),
        ([listed[0], halves[1], listed[2]], "different --num-shards [2, 3]"),
        ([scanned[0], listed[1], listed[2]], "not shards of the same selection (selection.fingerprint"),
        ([limited[0], listed[1], listed[2]], "not shards of the same selection"),
        ([*listed[:2], tmp_path / "unfinished"], "its ingest did not finish"),
    ]
    for dirs, message in cases:
        assert merge_main(["--out", str(tmp_path / "m"), *map(str, dirs)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "m").exists()

    # a shard with objects that failed after retries: rerun it first (or say so)
    report = json.loads((listed[2] / REPORT_FILE).read_text())
    report["skipped"]["error"] = {"count": 1, "ids": ["x"]}
    (listed[2] / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(ConfigError, match=r"shard 2 of 3 .* 1 objects that failed after retries: rerun"):
        merge_shards(listed, tmp_path / "m")
    assert merge_shards(listed, tmp_path / "m", allow_errors=True).n_images > 0
    # a shard's image changed after its ingest: refused on the sha256
    row = read_manifest(halves[0] / "manifest.csv")[0]
    (halves[0] / row.path).write_bytes(b"not the image")
    with pytest.raises(ConfigError, match="does not match the sha256"):
        merge_shards(halves, tmp_path / "m2")
    with pytest.raises(ConfigError, match="inside"):
        merge_shards(halves, halves[0] / "merged")
