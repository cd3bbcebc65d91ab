"""Contrastive (SimCLR) pretraining: loss, k-NN monitor, views, and the stage on real ABID images (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import components.training.contrastive as contrastive
from components.common import ConfigError
from components.data import contrastive_view
from components.manifest import read_manifest, write_manifest
from components.model import build_model
from components.preprocess import PreprocessSpec, normalize_constants
from components.train import main
from components.training.config import CHECKPOINT_FILE
from components.training.contrastive import ContrastiveModel, contrastive_pretrain, knn_accuracy, nt_xent
from components.training.stages import train
from tests.fixtures.models import tiny_train_config
from tests.test_train import _cli_args, _other_counts_manifest


def test_nt_xent_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    t = 0.5
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    want = 0.0
    for i in range(6):
        partner = (i + 3) % 6
        logits = [float(z[i] @ z[j]) / t for j in range(6) if j != i]
        pos = float(z[i] @ z[partner]) / t
        want += -(pos - math.log(sum(math.exp(v) for v in logits)))
    assert nt_xent(z1, z2, t).item() == pytest.approx(want / 6, rel=1e-5)
    # Matching views score better than the same views paired with another image's.
    assert nt_xent(z1, z1 + 0.01 * z2, t) < nt_xent(z1, torch.roll(z1, 1, 0), t)


def test_knn_accuracy_votes_by_weighted_nearest_references() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    ref_labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, -0.1], [1.0, 0.02]])
    assert knn_accuracy(query, torch.tensor([0, 1, 2, 0]), ref, ref_labels, 3, k=2) == 1.0
    assert knn_accuracy(query, torch.tensor([0, 1, 2, 2]), ref, ref_labels, 3, k=2) == 0.75
    # k larger than the references: every reference votes, the closest ones weigh the most.
    assert knn_accuracy(query[:1], torch.tensor([0]), ref, ref_labels, 3, k=50) == 1.0


def test_contrastive_views_are_seeded_different_crops_in_the_normalized_range() -> None:
    spec = PreprocessSpec(image_size=32)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    views = [contrastive_view(x, spec, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert views[0].shape == (6, 3, 32, 32) and views[0].dtype == torch.float32
    assert torch.equal(views[0], views[1]) and not torch.allclose(views[0], views[2])
    scale, shift = (torch.from_numpy(a).view(1, 3, 1, 1) for a in normalize_constants(spec))
    assert (views[0] >= -shift - 1e-4).all() and (views[0] <= 255 * scale - shift + 1e-4).all()
    # A crop is a zoom into the frame, not a shrink with black padding: a white frame stays white
    # unless the colour jitter darkened it, and then the whole view is darker alike.
    white = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)
    v = (contrastive_view(white, spec, torch.Generator().manual_seed(0)) + shift) / (255 * scale)
    per_image = v.flatten(1)
    assert (per_image.max(1).values - per_image.min(1).values < 0.02).all()


def test_contrastive_backbone_loads_into_the_counting_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ContrastiveModel()
    path = tmp_path / "backbone.pt"
    torch.save(model.backbone.state_dict(), path)
    counter = build_model(5, "ordinal", str(path))
    assert torch.equal(counter.conv1.weight, model.backbone.conv1.weight)
    assert counter.fc.out_features == 4
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 128)


class _InterruptError(Exception):
    pass


def test_contrastive_stage_trains_on_train_plus_extra_and_the_fit_starts_from_it(
    abid_dir: Path, tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    extra = _other_counts_manifest(abid_dir, tmp_path / "extra.csv", n=6)
    # A learning rate too small to move a weight in the fit: its convolutions stay where the stage left them.
    # (the stage inherits it too: the resume test below shows the stage itself learns)
    cfg = tiny_train_config(tiny_split, tmp_path / "m", pretrain_extra=extra, pretrain_epochs=2,
                            pretrain_objective="contrastive", lr=1e-12)  # fmt: skip
    result = train(cfg)
    stage = tmp_path / "m" / "pretrain"
    stage_rows = read_manifest(stage / "pretrain.csv")
    train_ids = {r.id for r in read_manifest(tiny_split["train"])}
    assert {r.id for r in stage_rows} == train_ids | {r.id for r in read_manifest(extra)}
    held_out = {r.id for s in ("val", "test") for r in read_manifest(tiny_split[s])}
    assert not held_out & {r.id for r in stage_rows}
    assert {r.count for r in stage_rows} & {0, 7}  # labels kept as they are: none is used

    record = json.loads((stage / "backbone.json").read_text())
    assert record["objective"] == "contrastive" and record["images"] == len(stage_rows)
    assert record["epochs"] == 2 and 0 <= record["knn_val_accuracy"] <= 1
    assert (record["batch_size"], record["lr"]) == (cfg.batch_size, cfg.lr)
    done = json.loads((stage / "checkpoint.json").read_text())
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in done["history"])
    assert (stage / "training_curves.png").stat().st_size > 1000

    backbone = torch.load(stage / "model.pt", weights_only=True)
    assert not any(k.startswith(("fc.", "projector.")) for k in backbone)
    fitted = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert torch.allclose(fitted["conv1.weight"], backbone["conv1.weight"], atol=1e-6)
    pre = result.metrics["pretrain"]
    assert pre["objective"] == "contrastive" and pre["images"] == len(stage_rows)
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert f"self-supervised (SimCLR, no labels) for 2 epochs on {len(stage_rows)} images" in card
    params = json.loads((tmp_path / "m" / "model.json").read_text())["params"]
    assert params["pretrain_objective"] == "contrastive"


def test_contrastive_stage_resumes_to_the_uninterrupted_result_and_refuses_other_settings(
    tiny_split: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stage(out: Path, **kw: object):  # the stage's own config, as pretrain_backbone builds it
        return tiny_train_config(tiny_split, out, epochs=3, pretrain_objective="contrastive", **kw)

    whole = contrastive_pretrain(stage(tmp_path / "whole"))
    assert [h["epoch"] for h in whole.history] == [1, 2, 3]
    # The stage moved the weights away from its start (the same seed builds the same untrained model).
    torch.manual_seed(0)
    start = ContrastiveModel().backbone.state_dict()
    trained = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert not torch.allclose(start["conv1.weight"], trained["conv1.weight"], atol=1e-4)

    # Cut after epoch 2's monitor, before its checkpoint: only epoch 1 is saved.
    calls = {"n": 0}
    real = contrastive.knn_accuracy

    def cut(*a: object, **k: object) -> float:
        calls["n"] += 1
        if calls["n"] == 3:  # start, epoch 1, epoch 2
            raise _InterruptError
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(contrastive, "knn_accuracy", cut)
    out = tmp_path / "cut"
    with pytest.raises(_InterruptError):
        contrastive_pretrain(stage(out))
    monkeypatch.setattr(contrastive, "knn_accuracy", real)
    assert torch.load(out / CHECKPOINT_FILE, weights_only=False)["epoch"] == 1
    assert not (out / "model.pt").exists()

    with pytest.raises(ConfigError, match=r"pretrain_temperature: 0\.2 -> 0\.5"):
        contrastive_pretrain(stage(out, resume=True, pretrain_temperature=0.5))
    resumed = contrastive_pretrain(stage(out, resume=True))
    for got, want in zip(resumed.history, whole.history, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in b)

    # A finished stage is not trained again.
    mtime = (out / "model.pt").stat().st_mtime_ns
    again = contrastive_pretrain(stage(out, resume=True))
    assert (out / "model.pt").stat().st_mtime_ns == mtime
    assert again.metrics["knn_val_accuracy"] == resumed.metrics["knn_val_accuracy"]


def test_contrastive_settings_are_checked(
    tiny_split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _cli_args(tiny_split, tmp_path / "m")
    ssl = ["--pretrain-epochs", "1", "--pretrain-objective", "contrastive"]
    for flags, words in [
        ([*ssl, "--pretrain-temperature", "0"], "> 0"),
        ([*ssl, "--pretrain-extra", str(tiny_split["val"])], "also in"),  # a leak, labels or not
    ]:
        assert main(base + flags) == 2, flags
        assert words in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        main([*base, "--pretrain-objective", "rotation"])
    assert not (tmp_path / "m" / "pretrain").exists()
    # Without --pretrain-extra the stage learns from the training images alone.
    tiny = ["--image-size", "32", "--epochs", "1", "--batch-size", "10", "--device", "cpu", "--num-threads",
            "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    flags = ["--pretrain-only", "--pretrain-epochs", "1", "--pretrain-objective", "contrastive"]
    assert main([*base, *tiny, *flags]) == 0
    assert "k-NN val accuracy on its features" in capsys.readouterr().out
    rows = read_manifest(tmp_path / "m" / "pretrain" / "pretrain.csv")
    assert {r.id for r in rows} == {r.id for r in read_manifest(tiny_split["train"])}
    # One image per batch has no negatives.
    one = write_manifest(tmp_path / "one.csv", read_manifest(tiny_split["train"])[:1])
    with pytest.raises(ConfigError, match="at least 2 images"):
        contrastive_pretrain(tiny_train_config(tiny_split, tmp_path / "one", train_csv=one,
                                               pretrain_objective="contrastive"))  # fmt: skip
