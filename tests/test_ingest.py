"""components.ingest against a real S3 API (moto_server over HTTP) and the local ABID sample."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

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
from components.manifest import load_labelled, read_manifest
from pipeline.steps import optional_int
from tests.fixtures.aws import free_port
from tests.fixtures.s3data import (
    ABSENT_ID,
    CORRUPT_ID,
    NO_IMAGE_ID,
    UNLABELED_ID,
    AbidBucket,
    AbidSample,
    real_objects,
    upload,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _report(out: Path) -> dict:
    return json.loads((out / REPORT_FILE).read_text())


def _check_images_are_originals(out: Path, abid_dir: Path) -> None:
    """Every manifest row points at the original bytes, with the right label, size and hash."""
    rows, paths = load_labelled(out / "manifest.csv")
    for row, path in zip(rows, paths, strict=True):
        assert row.path == f"images/{row.id}.jpg"
        original = abid_dir / "bin-images" / f"{row.id}.jpg"
        assert path.read_bytes() == original.read_bytes()
        assert row.sha256 == sha256_file(original)
        with Image.open(path) as img:
            assert (row.width, row.height) == img.size
        meta = json.loads((abid_dir / "metadata" / f"{row.id}.json").read_text())
        assert row.count == meta["EXPECTED_QUANTITY"]
        assert (out / "metadata" / f"{row.id}.json").is_file()


# ---------------------------------------------------------------------------------------- S3 source


def test_s3_file_list_skips_and_reports_every_problem(
    abid_bucket: AbidBucket, abid_dir: Path, tmp_path: Path
):
    sample = abid_bucket.sample
    out = tmp_path / "data"
    # No --file-list and no --per-class: the bucket's own file_list.json is used.
    result = ingest(abid_bucket.url, out, endpoint_url=abid_bucket.endpoint, workers=8, progress=False)

    report = _report(out)
    assert report["selection"]["mode"] == "file_list"
    skipped = {reason: v["ids"] for reason, v in report["skipped"].items() if v["count"]}
    assert skipped == {
        "missing": [ABSENT_ID],
        "corrupt": [CORRUPT_ID],
        "missing_image": [NO_IMAGE_ID],
        "unlabeled": [UNLABELED_ID],
        "label_mismatch": [sample.mismatch_id],
    }
    assert "does not decode" in report["details"][CORRUPT_ID]
    # Listed as 4, EXPECTED_QUANTITY 5: kept with the metadata's label and reported.
    assert report["relabelled"] == [{"id": sample.relabelled_id, "listed": 4, "label": 5}]
    rows = read_manifest(result.manifest_path)
    assert sorted(r.id for r in rows) == sample.valid_ids
    assert {r.id: r.count for r in rows}[sample.relabelled_id] == 5
    assert result.counts == {c: len(sample.ids[c]) for c in (1, 2, 3, 4, 5)}
    assert all(r.source == f"{abid_bucket.url}/bin-images/{r.id}.jpg" for r in rows)
    _check_images_are_originals(out, abid_dir)


def test_s3_per_class_fills_past_bad_objects_like_a_local_mirror(
    abid_bucket: AbidBucket, abid_dir: Path, tmp_path: Path
):
    sample = abid_bucket.sample
    s3_out = tmp_path / "s3"
    result = ingest(
        abid_bucket.url, s3_out, endpoint_url=abid_bucket.endpoint, per_class=3, workers=4, progress=False
    )
    # The planted corrupt (class 2) and image-less (class 3) objects come first in key order; the
    # class is filled with the next valid ids instead.
    rows = read_manifest(result.manifest_path)
    assert sorted(r.id for r in rows) == sorted(i for c in (1, 2, 3, 4, 5) for i in sample.ids[c][:3])
    assert not set(sample.other_ids) & {r.id for r in rows}  # counts 0 and 7 are not in --classes
    assert result.skipped == {
        "corrupt": [CORRUPT_ID],
        "missing_image": [NO_IMAGE_ID],
        "unlabeled": [UNLABELED_ID],
    }
    _check_images_are_originals(s3_out, abid_dir)

    # The same objects as a local directory give the same dataset.
    local_out = tmp_path / "local"
    ingest(str(sample.write_dir(tmp_path / "mirror")), local_out, per_class=3, workers=4, progress=False)
    local_rows = read_manifest(local_out / "manifest.csv")
    strip = [(r.id, r.count, r.path, r.sha256, r.width, r.height) for r in rows]
    assert strip == [(r.id, r.count, r.path, r.sha256, r.width, r.height) for r in local_rows]


def test_s3_public_bucket_without_credentials(
    abid_bucket: AbidBucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup on a dev box
    # No credentials anywhere: requests go unsigned, which a public-read bucket accepts.
    result = ingest(
        abid_bucket.url, tmp_path / "out", endpoint_url=abid_bucket.endpoint, per_class=1, progress=False
    )
    assert result.n_images == 5

    # A private bucket refuses unsigned reads: one clear error, before any download.
    upload(abid_bucket.endpoint, "private-abid", "", abid_bucket.sample.objects, public=False)
    with pytest.raises(ConfigError, match=r"access to s3://private-abid denied.*configure credentials"):
        ingest("s3://private-abid", tmp_path / "out2", endpoint_url=abid_bucket.endpoint, per_class=1)


def test_s3_configuration_errors_are_one_line(
    abid_bucket: AbidBucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ep = abid_bucket.endpoint
    cases = [
        (["--source", "s3://no-such-bucket", "--endpoint-url", ep], "bucket 'no-such-bucket' not found"),
        (["--source", f"s3://{abid_bucket.bucket}/wrong", "--endpoint-url", ep], "check the prefix"),
        (["--source", abid_bucket.url, "--endpoint-url", f"http://127.0.0.1:{free_port()}"], "cannot reach"),
        (
            ["--source", abid_bucket.url, "--endpoint-url", ep, "--file-list", "s3://abid-mirror/nope.json"],
            "cannot read --file-list",
        ),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_unreachable_aws_suggests_a_local_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    # No --endpoint-url: the default AWS endpoint, made unreachable for the test (boto3's own env var).
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["--source", "s3://aft-vbi-pds", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach AWS S3 for s3://aft-vbi-pds") and "--source DIR" in err, err


# ------------------------------------------------------------------------------------- local source


def test_local_file_list_with_missing_ids(abid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "data"
    code = main(
        [
            "--source",
            str(abid_dir),
            "--out",
            str(out),
            "--file-list",
            str(abid_dir / "file_list.json"),
            "--limit",
            "30",
            "--workers",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "manifest:" in printed and "missing" in printed
    listed = json.loads((abid_dir / "file_list.json").read_text())
    # --limit takes ids round-robin across classes: 6 of each, in file order.
    selected = {stem_of(k): int(c) for c, keys in listed.items() for k in keys[:6]}
    report = _report(out)
    assert report["n_selected"] == 30
    absent = sorted(i for i in selected if not (abid_dir / "metadata" / f"{i}.json").exists())
    assert absent, "the shared sample is a partial mirror: some listed ids are absent"
    assert report["skipped"]["missing"]["ids"] == absent
    rows = read_manifest(out / "manifest.csv")
    assert sorted(r.id for r in rows) == sorted(set(selected) - set(absent))
    assert all(r.count == selected[r.id] for r in rows)
    _check_images_are_originals(out, abid_dir)
    # readable by other users: a server or a pod under another UID reads these files
    assert all((out / r.path).stat().st_mode & 0o044 == 0o044 for r in rows)


def _linked_source(abid_dir: Path, root: Path, per_class: int) -> tuple[Path, list[str]]:
    """A bucket-layout copy of ``per_class`` listed images per class, as links to the sample's files.

    Returns the root and the ids in the order ingest fetches them (round-robin over the classes).
    """
    listed = json.loads((abid_dir / "file_list.json").read_text())
    by_class: list[list[str]] = []
    for keys in listed.values():
        ids = [stem_of(k) for k in keys]
        present = [
            i
            for i in ids
            if (abid_dir / "metadata" / f"{i}.json").is_file()
            and (abid_dir / "bin-images" / f"{i}.jpg").is_file()
        ]
        by_class.append(present[:per_class])
    for sub in ("metadata", "bin-images"):
        (root / sub).mkdir(parents=True)
    for ids in by_class:
        for i in ids:
            (root / "metadata" / f"{i}.json").symlink_to(abid_dir / "metadata" / f"{i}.json")
            (root / "bin-images" / f"{i}.jpg").symlink_to(abid_dir / "bin-images" / f"{i}.jpg")
    (root / "file_list.json").write_text(
        json.dumps({c: [f"metadata/{i}.json" for i in ids] for c, ids in zip(listed, by_class, strict=True)})
    )
    return root, round_robin(by_class)


def test_resume_after_a_killed_run(abid_dir: Path, tmp_path: Path):
    # The 9th image to be fetched is a FIFO: opening it blocks until a writer appears, so the run
    # stops right there, with exactly 8 objects done, and is killed mid-run (no timing race).
    source, order = _linked_source(abid_dir, tmp_path / "bucket", per_class=20)
    assert len(order) == 100
    blocker = source / "bin-images" / f"{order[8]}.jpg"
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "components.ingest", "--source", str(source), "--out", str(out)]
    cmd += ["--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / STATE_FILE
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "manifest.csv").exists()
    done = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert done == order[:8]
    # Damage one completed image (as a full disk would) and leave a stale temp file behind.
    damaged = out / "images" / f"{done[0]}.jpg"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / "images" / f".{done[1]}.jpg.x.tmp").write_bytes(b"partial")
    blocker.unlink()
    blocker.symlink_to(abid_dir / "bin-images" / blocker.name)

    result = ingest(str(source), out, workers=4, progress=False)
    assert result.n_images == 100
    assert result.n_resumed == 7  # the completed objects were not fetched again...
    assert (
        damaged.read_bytes() == (abid_dir / "bin-images" / damaged.name).read_bytes()
    )  # ...the damaged one was
    assert not list((out / "images").glob(".*.tmp"))

    fresh = ingest(str(source), tmp_path / "fresh", workers=4, progress=False)
    assert fresh.manifest_path.read_text() == result.manifest_path.read_text()
    again = ingest(str(source), out, workers=4, progress=False)
    assert again.n_resumed == 100 and _report(out)["n_downloaded"] == 0


def test_validation_errors(abid_dir: Path, abid_sample: AbidSample, tmp_path: Path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        ingest(str(abid_dir), a_file, per_class=1)
    with pytest.raises(ConfigError, match="inside the source"):
        ingest(str(abid_dir), abid_dir / "out", per_class=1)
    with pytest.raises(ConfigError, match="--workers"):
        ingest(str(abid_dir), tmp_path / "o", per_class=1, workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="bucket layout"):
        ingest(str(tmp_path / "empty"), tmp_path / "o", per_class=1)
    with pytest.raises(ConfigError, match="does not exist"):
        ingest(str(tmp_path / "nowhere"), tmp_path / "o", per_class=1)
    mirror = abid_sample.write_dir(tmp_path / "mirror")
    with pytest.raises(ConfigError, match="no images were ingested"):
        ingest(str(mirror), tmp_path / "o", per_class=1, classes=[42])
    with pytest.raises(SystemExit):  # argparse: the two selections are exclusive
        main(["--source", str(mirror), "--out", str(tmp_path / "o"), "--per-class", "1", "--file-list", "f"])


def test_one_ingest_per_output_directory(abid_dir: Path, tmp_path: Path):
    out = tmp_path / "data"
    out.mkdir()
    with (out / ".ingest.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another ingest is writing"):
            ingest(str(abid_dir), out, per_class=1, progress=False)
    assert ingest(str(abid_dir), out, per_class=1, progress=False).n_images == 5
    assert os.listdir(out / "images")


def test_the_public_bucket_without_file_list_uses_the_standard_subset(
    abid_dir: Path, tmp_path: Path, aws_env: str
):
    # s3://aft-vbi-pds has no file_list.json (and too many objects to list): the shipped 10,441-id
    # subset is selected, here from a local S3 server's bucket of that name.
    standard = json.loads(standard_file_list().read_text())
    assert sum(len(v) for v in standard.values()) == 10_441
    listed = {Path(k).stem for keys in standard.values() for k in keys}
    present = sorted(p.stem for p in (abid_dir / "bin-images").glob("*.jpg") if p.stem in listed)[:3]
    outside = next(p.stem for p in (abid_dir / "metadata").glob("*.json") if p.stem not in listed)
    upload(aws_env, PUBLIC_BUCKET, "", real_objects(abid_dir, [*present, outside]))
    result = ingest(f"s3://{PUBLIC_BUCKET}", tmp_path / "o", endpoint_url=aws_env, workers=4, progress=False)
    assert sorted(r.id for r in read_manifest(result.manifest_path)) == present
    assert len(result.skipped["missing"]) == 10_441 - 3
    assert _report(tmp_path / "o")["selection"]["file_list"] == str(standard_file_list())


def _own_photos(abid_dir: Path, root: Path) -> dict[str, int]:
    """A directory of one's own photos: images + metadata, no file_list.json; returns id -> count.

    Two real images of each count 1..5, one each of counts 0 and 7, and one unlabelled image.
    """
    per_count: dict[int, list[str]] = {c: [] for c in (0, 1, 2, 3, 4, 5, 7)}
    for meta in sorted((abid_dir / "metadata").iterdir()):
        count = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
        wanted = 1 if count in (0, 7) else 2
        if count in per_count and len(per_count[count]) < wanted:
            per_count[count].append(meta.stem)
        if all(len(v) == (1 if c in (0, 7) else 2) for c, v in per_count.items()):
            break
    counts = {i: c for c, ids in per_count.items() for i in ids}
    for key, data in real_objects(abid_dir, list(counts)).items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / "bin-images" / f"{UNLABELED_ID}.jpg").write_bytes(
        (root / "bin-images" / f"{next(iter(counts))}.jpg").read_bytes()
    )
    (root / "metadata" / f"{UNLABELED_ID}.json").write_text(json.dumps({"BIN_FCSKU_DATA": {}}))
    assert not (root / "file_list.json").exists()
    return counts


def test_own_photos_without_file_list_select_every_labelled_image_of_the_classes(
    abid_dir: Path, tmp_path: Path
):
    counts = _own_photos(abid_dir, tmp_path / "mine")
    in_classes = sorted(i for i, c in counts.items() if 1 <= c <= 5)
    assert len(in_classes) == 10 and len(counts) == 12
    # what the pipeline's ingest step passes for per_class 0 (every profile but quick)
    result = ingest(
        str(tmp_path / "mine"), tmp_path / "o", per_class=optional_int(0), workers=4, progress=False
    )
    rows = read_manifest(result.manifest_path)
    assert sorted(r.id for r in rows) == in_classes
    assert {r.id: r.count for r in rows} == {i: counts[i] for i in in_classes}
    assert result.counts == dict.fromkeys((1, 2, 3, 4, 5), 2)
    # counts 0 and 7 are not selected (not skipped); the unlabelled image is reported
    assert result.skipped == {"unlabeled": [UNLABELED_ID]}
    report = _report(tmp_path / "o")
    assert report["selection"]["mode"] == "all" and report["n_selected"] == 10
    # other classes: exactly those
    other = ingest(str(tmp_path / "mine"), tmp_path / "o07", classes=[0, 7], workers=4, progress=False)
    assert sorted(r.id for r in read_manifest(other.manifest_path)) == sorted(
        i for i, c in counts.items() if c in (0, 7)
    )
    # a limit still takes the classes round-robin
    capped = ingest(str(tmp_path / "mine"), tmp_path / "o5", limit=5, workers=4, progress=False)
    assert capped.counts == dict.fromkeys((1, 2, 3, 4, 5), 1)
    # a file_list.json, once there, is what is selected
    first = in_classes[0]
    (tmp_path / "mine" / "file_list.json").write_text(
        json.dumps({str(counts[first]): [f"metadata/{first}.json"]})
    )
    listed = ingest(str(tmp_path / "mine"), tmp_path / "listed", workers=4, progress=False)
    assert [r.id for r in read_manifest(listed.manifest_path)] == [first]


def test_own_photos_in_another_bucket_are_scanned_too(abid_dir: Path, tmp_path: Path, aws_env: str):
    counts = _own_photos(abid_dir, tmp_path / "mine")
    objects = {
        str(p.relative_to(tmp_path / "mine")): p.read_bytes() for p in (tmp_path / "mine").rglob("*.*")
    }
    upload(aws_env, "my-photos", "shop", objects)
    result = ingest("s3://my-photos/shop", tmp_path / "o", endpoint_url=aws_env, workers=4, progress=False)
    assert sorted(r.id for r in read_manifest(result.manifest_path)) == sorted(
        i for i, c in counts.items() if 1 <= c <= 5
    )
    assert _report(tmp_path / "o")["selection"]["mode"] == "all"
