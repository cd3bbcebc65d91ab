"""The load-test tool end to end (short levels) against the real server and the naive baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.loadtest import check_url, main, summarize
from components.common import ConfigError
from tests.fixtures.serving import (
    RunningServer,
    served_model_fixture,  # noqa: F401
)


def test_refuses_remote_hosts_unless_allowed() -> None:
    check_url("http://127.0.0.1:8080/invocations")
    check_url("http://localhost:8080/v1/models/m:predict")
    with pytest.raises(ConfigError, match="only localhost"):
        check_url("http://example.com/invocations")
    check_url("http://example.com/invocations", allow_remote=True)
    with pytest.raises(ConfigError, match="http"):
        check_url("ftp://127.0.0.1/x")


def test_summarize_percentiles_and_rate() -> None:
    r = summarize(4, [i / 1000 for i in range(1, 101)], errors=2, seconds=10.0)
    assert r.requests == 100 and r.errors == 2
    assert r.per_minute == 600.0
    assert r.p50_ms == pytest.approx(50.5) and r.p99_ms == pytest.approx(99.01)


def test_bench_against_server_and_naive_baseline(
    served_model: RunningServer, abid_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    argv = ["--url", served_model.predict_url(), "--images", str(abid_dir / "bin-images"),
            "--concurrency", "1,2", "--duration", "1", "--warmup", "0.5", "--n_images", "8",
            "--baseline", "--model_dir", str(served_model.model_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for name in ("server", "naive baseline"):
        levels = report["results"][name]
        assert [lv["concurrency"] for lv in levels] == [1, 2]
        assert all(lv["requests"] > 0 and lv["errors"] == 0 for lv in levels), levels
        assert all(lv["p50_ms"] <= lv["p99_ms"] for lv in levels)
        # The load generator's own CPU is reported: it shares the cores with the server.
        assert all(lv["client_cores"] is not None and lv["client_cores"] > 0 for lv in levels), levels
    # The baseline is started by the tool, so its CPU time per request is known too.
    assert all(lv["server_cpu_ms_per_request"] > 0 for lv in report["results"]["naive baseline"])
    assert set(report["ratio_vs_baseline"]) == {"1", "2"}
    assert out.with_suffix(".png").stat().st_size > 1000


def test_baseline_needs_model_dir(abid_dir: Path, tmp_path: Path) -> None:
    argv = ["--url", "http://127.0.0.1:9/x", "--images", str(abid_dir / "bin-images"), "--baseline"]
    assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2


def test_model_only_ceiling_runs_the_served_file(served_model: RunningServer, abid_dir: Path) -> None:
    from bench.ceiling import model_only_ceiling
    from bench.loadtest import load_images
    from components.modelspec import choose_onnx_file, load_model_spec

    images = load_images(abid_dir / "bin-images", 8)
    r = model_only_ceiling(served_model.model_dir, images, threads=1, batch_size=4, duration=0.5, warmup=0.1)
    served = choose_onnx_file(served_model.model_dir, load_model_spec(served_model.model_dir), "auto")
    assert r["file"] == served.name and r["threads"] == 1 and r["batch_size"] == 4
    assert r["images"] > 0 and r["images"] % 4 == 0, r
    assert r["per_minute"] == pytest.approx(r["images"] / r["seconds"] * 60, rel=0.01)
    with pytest.raises(ValueError, match="at least 16 images"):
        model_only_ceiling(served_model.model_dir, images, threads=1, batch_size=16, duration=0.1)


def test_overload_level_accounts_for_every_request(served_model: RunningServer, abid_dir: Path) -> None:
    import asyncio

    from bench.loadtest import load_images
    from bench.overload import run_overload

    images = load_images(abid_dir / "bin-images", 8)
    r = asyncio.run(
        run_overload(
            served_model.predict_url(), images, rate=20, duration=1.0, timeout=5.0,
            server_pid=served_model.proc.pid,
        )
    )  # fmt: skip
    assert r["requests"] == 20 and sum(r["statuses"].values()) == 20, r
    assert r["statuses"].get("200", 0) > 0 and r["accepted_p99_ms"] is not None
    assert r["goodput_per_minute"] == pytest.approx(r["statuses"]["200"] * 60, rel=0.01)
    assert 0 <= r["shed_rate"] <= 1 and r["peak_rss_mb"] > 10
    with pytest.raises(ValueError, match="requests"):
        asyncio.run(run_overload(served_model.predict_url(), images, rate=1e6, duration=1.0))
