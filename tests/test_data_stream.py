"""Training data that does not fit in memory (:mod:`components.data`): an image set streamed from the
uint8 cache (:class:`StreamedImages`) gives the rows, the fit and the validation figures of the set held
on the device (:class:`DeviceImages`); ``--data-on-device`` chooses, ``auto`` by the memory free; the
read-ahead holds a bounded number of batches; under torchrun a rank reads only its rows."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components import data
from components.common import ConfigError
from components.data import CachedImages, DeviceImages, StreamedImages, open_images
from components.training import distributed
from components.training.cli import main
from components.training.fit import fit, open_run
from components.training.loop import train_epochs
from tests.fixtures.models import tiny_train_config

N, SIZE = 37, 8


def _cache(tmp_path: Path, n: int = N, size: int = SIZE) -> CachedImages:
    """A random uint8 set in the cache's format: a ``.npy`` memmap read-only, as build_cache opens it."""
    path = tmp_path / "images.npy"
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    out[:] = rng.integers(0, 256, out.shape, dtype=np.uint8)
    out.flush()
    del out
    counts = rng.integers(1, 6, n)
    return CachedImages(np.load(path, mmap_mode="r"), counts, [str(i) for i in range(n)], "key", path)


def _index_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(N, generator=g)
    return [
        perm[:10],  # shuffled
        perm[10:11],  # one image
        torch.tensor([5, 5, 0, 36, 5]),  # repeats, both ends
        torch.arange(N - 1, -1, -1),  # every image, backwards
        torch.randint(0, N, (23,), generator=g),
        torch.sort(perm[11:30]).values,
    ]


def test_streamed_rows_are_the_in_memory_rows_in_the_index_order(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    held = DeviceImages(cache, "cpu")
    streamed = StreamedImages(cache, "cpu", prefetch=2, read_threads=3)
    batches = _index_batches()
    for index in batches:
        want_x, want_y = held.batch(index)
        assert torch.equal(want_x, torch.from_numpy(cache.images[index.numpy()]))
        got_x, got_y = streamed.batch(index)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    for index, (got_x, got_y) in zip(batches, streamed.batches(batches), strict=True):
        want_x, want_y = held.batch(index)
        assert got_x.dtype == torch.uint8 and got_x.shape == (len(index), SIZE, SIZE, 3)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    with pytest.raises(IndexError, match="out of range"):
        streamed.batch(torch.tensor([0, N]))


def test_read_ahead_holds_at_most_k_batches_and_stops_with_its_consumer(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    source = StreamedImages(cache, "cpu", prefetch=2, read_threads=2)
    index = [torch.tensor([i % N, (7 * i) % N, (3 * i) % N]) for i in range(15)]
    for i, (x, _) in enumerate(source.batches(index)):
        assert torch.equal(x, torch.from_numpy(cache.images[index[i].numpy()]))
        time.sleep(0.02)  # a slow step: the reader gets as far ahead as it may
        assert source.peak_queued <= 2 and source.host_buffers <= 4
    # it did read ahead, to the bound and no further; 15 batches went through 4 reused host buffers
    assert source.peak_queued == 2 and source.host_buffers == 4

    batches = source.batches(index)
    next(batches)
    batches.close()  # a consumer that stops early (an exception in the step) stops the reader
    assert not [t for t in threading.enumerate() if t.name == "image-prefetch"]

    with pytest.raises(IndexError, match="out of range"):  # the reader's error reaches the consumer
        list(source.batches([torch.tensor([0]), torch.tensor([N + 5])]))
    assert not [t for t in threading.enumerate() if t.name == "image-prefetch"]


def test_auto_streams_a_set_larger_than_half_the_free_memory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert data.free_memory("cpu") > 0  # the real probe: MemAvailable
    cache = _cache(tmp_path)
    size = cache.images.nbytes
    caplog.set_level(logging.INFO, logger="components.data")
    monkeypatch.setattr(data, "free_memory", lambda device: 4 * size)
    assert isinstance(open_images(cache, "cpu", "auto"), DeviceImages)
    # two processes of a node (CPU under torchrun) would hold two copies in the same RAM
    assert isinstance(open_images(cache, "cpu", "auto", copies=2), DeviceImages)
    assert "streaming" not in caplog.text
    assert isinstance(open_images(cache, "cpu", "auto", copies=3), StreamedImages)
    assert "3 copies" in caplog.text
    caplog.clear()

    monkeypatch.setattr(data, "free_memory", lambda device: 2 * size - 1)
    assert isinstance(open_images(cache, "cpu", "auto"), StreamedImages)
    assert f"streaming {N} images" in caplog.text and "--data-on-device auto" in caplog.text
    assert caplog.text.count("streaming") == 1
    caplog.clear()

    def unasked(device: object) -> int:
        raise AssertionError("the memory is probed only by auto")

    monkeypatch.setattr(data, "free_memory", unasked)
    assert isinstance(open_images(cache, "cpu", "always"), DeviceImages)
    assert isinstance(open_images(cache, "cpu", "never"), StreamedImages)
    assert "--data-on-device never" in caplog.text
    with pytest.raises(ConfigError, match="--data-on-device must be one of auto, always, never"):
        open_images(cache, "cpu", "sometimes")


def test_a_bad_data_on_device_fails_early_naming_the_flag(
    tiny_split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_train_config(tiny_split, tmp_path / "m", data_on_device="sometimes")
    with pytest.raises(ConfigError, match="--data-on-device must be one of auto, always, never"):
        cfg.validate()
    base = [
        "--train",
        str(tiny_split["train"]),
        "--val",
        str(tiny_split["val"]),
        "--out",
        str(tmp_path / "m"),
    ]
    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        main([*base, "--data-on-device", "sometimes"])
    assert exit_.value.code == 2
    assert "argument --data-on-device: invalid choice: 'sometimes'" in capsys.readouterr().err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data_on_device: sometimes\n")
    assert main([*base, "--config", str(recipe)]) == 2
    assert "data_on_device: must be one of ['auto', 'always', 'never']" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing started


def test_a_streamed_fit_is_the_in_memory_fit(
    tiny_split: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same seed: the same weights after 2 epochs, and the same validation figures."""
    caplog.set_level(logging.INFO, logger="components.data")
    fitted = {}
    for mode in ("always", "never"):
        cfg = tiny_train_config(
            tiny_split, tmp_path / mode / "model", data_on_device=mode, cache_dir=tmp_path / "cache"
        )
        fitted[mode] = fit(open_run(cfg), "none")
    held, streamed = fitted["always"], fitted["never"]
    assert caplog.text.count("streaming") == 2  # the training and the validation images
    assert "streaming 20 images" in caplog.text and "--data-on-device never" in caplog.text
    a, b = held.trainer.model.state_dict(), streamed.trainer.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(held.selection.best_state[k], streamed.selection.best_state[k]) for k in a)
    for got, want in zip(streamed.selection.history, held.selection.history, strict=True):
        assert {k: v for k, v in got.items() if k != "train_images_per_s"} == {
            k: v for k, v in want.items() if k != "train_images_per_s"
        }
    assert len(held.selection.history) == 2
    assert streamed.val_metrics == held.val_metrics
    assert streamed.temperature == held.temperature


def test_each_rank_reads_only_its_rows_of_every_global_batch(tmp_path: Path) -> None:
    cache = _cache(tmp_path)

    class Recording(StreamedImages):
        def _read(self, rows: np.ndarray, out: np.ndarray, pool: object = None) -> None:
            read.append(rows.copy())
            super()._read(rows, out, pool)  # type: ignore[arg-type]

    read: list[np.ndarray] = []
    stepped: list[torch.Tensor] = []

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stepped.append(x.clone())
        return torch.zeros(())

    part = distributed.BatchPart(4, 10, 10, 2)  # rank 1 of 2: rows 4..9 of each batch of 10
    passes = train_epochs(Recording(cache, "cpu"), 10, 3, step, range(2), start_epoch=0, seed=5, part=part)
    assert [p.epoch for p in passes] == [0, 1]
    perm_gen = torch.Generator().manual_seed(5)
    want = [
        perm[s * 10 : (s + 1) * 10][4:10].numpy()
        for perm in (torch.randperm(N, generator=perm_gen) for _ in range(2))
        for s in range(3)
    ]
    assert len(read) == len(want) == 6
    for got_rows, want_rows, x in zip(read, want, stepped, strict=True):
        np.testing.assert_array_equal(got_rows, want_rows)
        assert torch.equal(x, torch.from_numpy(cache.images[want_rows]))
