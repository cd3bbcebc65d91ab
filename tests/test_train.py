"""components.train (the components.training package) and components.data on real ABID images, tiny
sizes, CPU (a few seconds each)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common import ConfigError
from components.data import augment_batch, build_cache, normalize_batch
from components.evaluate import bootstrap_intervals, interval_text
from components.manifest import load_labelled, read_manifest, write_manifest
from components.modelspec import load_model_spec
from components.preprocess import PreprocessSpec, load_uint8, normalize, preprocess_batch
from components.train import main
from components.training.config import CHECKPOINT_FILE
from components.training.losses import distill_loss, loss_fn
from components.training.splits import calibration_split
from components.training.stages import train
from tests.fixtures.models import tiny_train_config

ARTIFACTS = (
    "model.onnx",
    "model.pt",
    "model.json",
    "metrics.json",
    "confusion_matrix.png",
    "training_curves.png",
    "calibration.png",
    "risk_coverage.png",
    "MODEL_CARD.md",
    CHECKPOINT_FILE,
)


def test_tiny_run_writes_every_artifact(tiny_trained_model_dir: Path) -> None:
    for name in ARTIFACTS:
        assert (tiny_trained_model_dir / name).stat().st_size > 0, name
    for png in ("confusion_matrix.png", "training_curves.png", "calibration.png", "risk_coverage.png"):
        assert (tiny_trained_model_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = load_model_spec(tiny_trained_model_dir)
    assert spec.classes == (1, 2, 3, 4, 5)
    assert spec.head == "ordinal"
    assert spec.preprocess.image_size == 32 and spec.preprocess.resize == "squash"
    assert len(spec.training_data_sha256 or "") == 64
    # val figures are the selection part's (half the 10 val images; the other half calibrates)
    assert spec.params["epochs"] == 2 and spec.metrics["val"]["n"] == 5 and spec.metrics["test"]["n"] == 10
    assert spec.answers.calibration_images == 5
    metrics = json.loads((tiny_trained_model_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert 1 <= metrics["best_epoch"] <= 2
    assert np.asarray(metrics["val"]["confusion_matrix"]).sum() == 5
    assert (metrics["n_val"], metrics["n_calibration"]) == (5, 5)
    # final val and test figures carry their bootstrap intervals, from their own confusion matrices
    for split in ("val", "test"):
        m = metrics[split]
        assert m["intervals"] == bootstrap_intervals(m["confusion_matrix"], [1, 2, 3, 4, 5])
        assert m["intervals"]["accuracy"][0] <= m["accuracy"] <= m["intervals"]["accuracy"][1]
    assert "intervals" not in metrics["history"][0]
    card = (tiny_trained_model_dir / "MODEL_CARD.md").read_text()
    assert "CC BY-NC-SA 3.0 US" in card
    assert f"| test | 10 | {interval_text(metrics['test'], 'accuracy')} |" in card
    assert "95% bootstrap intervals" in card


def test_onnx_matches_pytorch(tiny_trained_model_dir: Path, tiny_split: dict[str, Path]) -> None:
    import onnxruntime as ort

    from components.model import ExportWrapper, build_model

    spec = load_model_spec(tiny_trained_model_dir)
    model = build_model(len(spec.classes), spec.head)
    model.load_state_dict(torch.load(tiny_trained_model_dir / "model.pt", weights_only=True))
    _, paths = load_labelled(tiny_split["test"], tiny_split["data_root"])
    x = preprocess_batch(paths[:7], spec.preprocess)  # odd batch: the batch axis is dynamic
    with torch.no_grad():
        probs, count, expected = ExportWrapper(
            model.eval(), spec.head, spec.classes, temperature=spec.answers.temperature
        )(torch.from_numpy(x))
    sess = ort.InferenceSession(
        str(tiny_trained_model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    o_probs, o_count, o_expected = sess.run(None, {"input": x})
    np.testing.assert_allclose(o_probs, probs.numpy(), atol=1e-4)
    np.testing.assert_allclose(o_expected, expected.numpy(), atol=1e-4)
    np.testing.assert_array_equal(o_count, count.numpy())
    assert set(o_count.tolist()) <= set(spec.classes)


def test_fitted_decision_is_fitted_on_val_and_baked_into_the_served_graph(
    tiny_split: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import components.training.decision as decision_module
    from components.evaluate import count_metrics, evaluate
    from components.model import build_model, decode_outputs

    # A two-epoch model predicts one count for every image (its logits are in the hundreds), so no
    # offset gains on it; the fit (tested in test_model_contract) is replaced by one that sends every
    # image to 5.
    seen = {}

    def fit(
        raw: torch.Tensor, target: torch.Tensor, head: str, num_classes: int, objective: str
    ) -> torch.Tensor:
        seen.update(n=len(raw), targets=sorted(target.tolist()), objective=objective)
        return torch.full((4,), 1e6)

    monkeypatch.setattr(decision_module, "fit_decision_offsets", fit)
    out = tmp_path / "m"
    cli = [*_cli_args(tiny_split, out), "--test", str(tiny_split["test"]), "--decision", "fitted"]
    cli += ["--data-root", str(tiny_split["data_root"]), "--image-size", "32", "--epochs", "2"]
    cli += ["--batch-size", "10", "--num-threads", "1", "--device", "cpu", "--no-progress"]
    assert main([*cli, "--cache-dir", str(tmp_path / "cache")]) == 0
    rows, paths, _, _ = calibration_split(*load_labelled(tiny_split["val"], tiny_split["data_root"]), 0.5, 0)
    y = [r.count for r in rows]
    # fitted on val's selection part, in index units, for the selection metric (val_accuracy by default)
    assert seen == {"n": 5, "targets": sorted(c - 1 for c in y), "objective": "accuracy"}
    metrics = json.loads((out / "metrics.json").read_text())
    decision = metrics["decision"]
    spec = load_model_spec(out)
    assert decision["rule"] == "fitted" and spec.params["decision"] == "fitted"
    assert list(spec.decision_offsets or ()) == decision["offsets"] == [1e6] * 4
    # The plain rule's validation figure is what the weights score without offsets...
    model = build_model(5, "ordinal")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    with torch.no_grad():
        raw = model.eval()(torch.from_numpy(preprocess_batch(paths, spec.preprocess)))
    plain = count_metrics(y, decode_outputs(raw, "ordinal", 5)[1].numpy() + 1, spec.classes)
    assert decision["val_plain"]["accuracy"] == pytest.approx(plain["accuracy"])
    assert decision["val_plain"]["rmse"] == pytest.approx(plain["rmse"])
    # ...the reported figures are the fitted rule's (every image counted as 5)...
    assert [row[-1] for row in metrics["val"]["confusion_matrix"]] == [1, 1, 1, 1, 1]
    # ...and so is the exported graph: evaluation through ONNX, on val and on test.
    selection = write_manifest(tmp_path / "val_selection.csv", rows)
    val = evaluate(out, selection, tmp_path / "val_eval", data_root=tiny_split["data_root"])
    assert val["confusion_matrix"] == metrics["val"]["confusion_matrix"]
    assert [row[-1] for row in metrics["test"]["confusion_matrix"]] == [2, 2, 2, 2, 2]
    assert set(decision["test_plain"]) == {"accuracy", "rmse", "mae"}
    # the two rules paired on the same test images: fitted (every image 5) minus plain
    paired = decision["test_paired"]
    assert paired["n"] == 10
    assert paired["accuracy_diff"] == pytest.approx(
        metrics["test"]["accuracy"] - decision["test_plain"]["accuracy"]
    )
    assert paired["rmse_diff"] == pytest.approx(metrics["test"]["rmse"] - decision["test_plain"]["rmse"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "fitted on validation" in card and f"{decision['val_plain']['accuracy']:.3f}" in card
    assert f"on the same images: {paired['accuracy_diff']:+.3f}, 95% interval" in card


class _InterruptError(Exception):
    pass


def test_resume_continues_from_checkpoint(
    tiny_split: dict[str, Path],
    tiny_trained_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "model"
    seen: list[int] = []

    def stop_after_first(epoch: int, metrics: dict[str, float]) -> None:
        seen.append(epoch)
        assert {"val_accuracy", "val_rmse", "val_loss"} <= set(metrics)
        raise _InterruptError

    with pytest.raises(_InterruptError):
        train(tiny_train_config(tiny_split, out), on_epoch=stop_after_first)
    assert seen == [1] and not (out / "model.onnx").exists()
    assert torch.load(out / CHECKPOINT_FILE, weights_only=False)["epoch"] == 1

    # Settings that change the training, or other training data, are refused by name.
    with pytest.raises(ConfigError, match=r"lr: 0\.05 -> 0\.1.*new --out.*drop --resume"):
        train(tiny_train_config(tiny_split, out, resume=True, lr=0.1))
    with pytest.raises(ConfigError, match="head: 'ordinal' -> 'classification'"):
        train(tiny_train_config(tiny_split, out, resume=True, head="classification"))
    fewer = write_manifest(tmp_path / "fewer.csv", read_manifest(tiny_split["train"])[:-1])
    with pytest.raises(ConfigError, match="training data"):
        train(tiny_train_config(tiny_split, out, resume=True, train_csv=fewer))
    assert torch.load(out / CHECKPOINT_FILE, weights_only=False)["epoch"] == 1  # left as it was

    # A checkpoint saved before a setting existed resumes while the setting is at its default (below)...
    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=False)
    for key in ("refit", "stop_after"):
        del ckpt["params"][key]
    torch.save(ckpt, out / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match="refit: '<unset>' -> True"):  # ...and only then
        train(tiny_train_config(tiny_split, out, resume=True, refit=True))

    # Run-time settings may change: another thread count resumes.
    threads = torch.get_num_threads()
    try:
        result = train(
            tiny_train_config(tiny_split, out, resume=True, num_threads=2, progress=True),
            on_epoch=lambda e, m: seen.append(e),
        )
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]  # only epoch 2 was trained again
    assert result.epochs_run == 2 and (out / "model.onnx").is_file()
    # Interrupted + resumed == uninterrupted (same seed, same data): the fixture's run.
    reference = json.loads((tiny_trained_model_dir / "metrics.json").read_text())["history"]
    for got, want in zip(result.history, reference, strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)

    # A finished run is not retrained (the CLI returns at once with the stored figures), even after its
    # checkpoint.pt was deleted (as tune and the pipeline do): checkpoint.json is enough.
    (out / CHECKPOINT_FILE).unlink()
    mtime = (out / "model.onnx").stat().st_mtime_ns
    argv = [
        "--train",
        str(tiny_split["train"]),
        "--val",
        str(tiny_split["val"]),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--lr",
        "0.05",
        "--head",
        "ordinal",
        "--resume",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "val_accuracy" in capsys.readouterr().out
    assert (out / "model.onnx").stat().st_mtime_ns == mtime
    assert not (out / CHECKPOINT_FILE).exists()
    # ... and a finished run is checked against the new settings too.
    argv[argv.index("--lr") + 1] = "0.1"
    assert main(argv) == 2
    assert "lr: 0.05 -> 0.1" in capsys.readouterr().err
    assert (out / "model.onnx").stat().st_mtime_ns == mtime


def _cli_args(split: dict[str, Path], out: Path) -> list[str]:
    return ["--train", str(split["train"]), "--val", str(split["val"]), "--out", str(out)]


def test_config_errors_exit_2(
    tiny_split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _cli_args(tiny_split, tmp_path / "m")
    for extra, words in [
        (["--epochs", "0"], "--epochs"),
        (["--classes", "1,3"], "consecutive"),
        (["--weights", "/no/such/file.pt"], "--weights"),
        (["--classes", "1,2,3"], "outside --classes"),  # the manifests hold counts 4 and 5
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--lr", "-1"], "--"),
    ]:
        assert main(base + extra) == 2, extra
        assert words in capsys.readouterr().err
    assert (
        main(
            [
                "--train",
                str(tmp_path / "missing.csv"),
                "--val",
                str(tiny_split["val"]),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_device_normalize_matches_preprocess_and_augment_is_seeded() -> None:
    spec = PreprocessSpec(image_size=24)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    want = normalize(batch, spec)
    got = normalize_batch(torch.from_numpy(batch), spec).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(
        augment_batch(torch.from_numpy(batch), spec, strength=0.0).numpy(), want, atol=1e-5
    )
    a = augment_batch(torch.from_numpy(batch), spec, 1.0, torch.Generator().manual_seed(3))
    b = augment_batch(torch.from_numpy(batch), spec, 1.0, torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b)
    assert not torch.allclose(a, torch.from_numpy(want))
    lo, hi = (0 - np.array(spec.mean)) / np.array(spec.std), (1 - np.array(spec.mean)) / np.array(spec.std)
    assert (a.amin(dim=(0, 2, 3)).numpy() >= lo - 1e-4).all() and (
        a.amax(dim=(0, 2, 3)).numpy() <= hi + 1e-4
    ).all()


def test_cache_is_reused_only_for_the_same_images(tiny_split: dict[str, Path], tmp_path: Path) -> None:
    rows, paths = load_labelled(tiny_split["val"], tiny_split["data_root"])
    first = build_cache(rows, paths, 24, tmp_path, progress=False)
    np.testing.assert_array_equal(first.images[3], load_uint8(paths[3], 24))
    mtime = first.path.stat().st_mtime_ns
    again = build_cache(rows, paths, 24, tmp_path, progress=False)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    other = build_cache(rows[:5], paths[:5], 24, tmp_path, progress=False)
    assert other.path != first.path and other.images.shape == (5, 24, 24, 3)
    first.path.with_suffix(".json").write_text("{broken")
    rebuilt = build_cache(rows, paths, 24, tmp_path, progress=False)
    np.testing.assert_array_equal(rebuilt.images, first.images)
    assert list(rebuilt.counts) == [r.count for r in rows]


@pytest.mark.parametrize("head", ["classification", "ordinal", "regression"])
def test_loss_prefers_the_true_count(head: str) -> None:
    target = torch.tensor([0, 2, 4])
    good = {
        "classification": torch.eye(5)[target] * 8,
        "ordinal": (target[:, None] > torch.arange(4)) * 16.0 - 8,
        "regression": target[:, None].float(),
    }[head]
    bad = good.flip(0)
    assert loss_fn(good, target, head, 5, 0.0) < loss_fn(bad, target, head, 5, 0.0)


def test_flip_averaging_is_exported_into_the_graph(tmp_path: Path) -> None:
    import onnxruntime as ort

    from components.model import ExportWrapper, build_model, export_onnx
    from components.training.loop import AverageModel

    torch.manual_seed(0)
    model = build_model(5, "ordinal").eval()
    graph = AverageModel([model], flips=True).eval()
    export_onnx(graph, "ordinal", (1, 2, 3, 4, 5), 32, tmp_path / "tta.onnx")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = torch.stack([model(v) for v in (x, x.flip(3), x.flip(2), x.flip(2).flip(3))]).mean(0)
        probs, _, _ = ExportWrapper(graph, "ordinal", (1, 2, 3, 4, 5))(x)
        assert torch.allclose(graph(x), want, atol=1e-5)
        assert not torch.allclose(model(x), want, atol=1e-3)  # the flips do change the output
    sess = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probabilities"], {"input": x.numpy()})[0], probs.numpy(), atol=1e-4)


@pytest.mark.parametrize("head", ["classification", "ordinal", "regression"])
def test_distill_loss_is_lowest_at_the_teacher(head: str) -> None:
    torch.manual_seed(0)
    teacher = torch.randn(8, {"classification": 5, "ordinal": 4, "regression": 1}[head]) * 3
    at_teacher = distill_loss(teacher, teacher, head, 2.0)
    for scale in (0.3, 1.0):
        away = teacher + scale * torch.randn_like(teacher)
        assert distill_loss(away, teacher, head, 2.0) > at_teacher
    if head != "ordinal":  # soft BCE keeps the teacher's entropy at its minimum
        assert at_teacher.item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros_like(teacher, requires_grad=True)
    distill_loss(student, teacher, head, 2.0).backward()
    assert (student.grad * teacher).sum() < 0  # a step against the gradient moves toward the teacher


def test_distilled_student_learns_from_the_teacher_not_the_labels(
    tiny_split: dict[str, Path], tiny_trained_model_dir: Path, tmp_path: Path
) -> None:
    # The same images with every count mirrored (1<->5, 2<->4): with the whole loss from the teacher
    # the labels cannot matter, so both students end with identical weights; with half it they do.
    rows = read_manifest(tiny_split["train"])
    wrong = tmp_path / "mirrored.csv"
    write_manifest(wrong, [dataclasses.replace(r, count=6 - r.count) for r in rows])
    teacher = (str(tiny_trained_model_dir),)

    def student(name: str, train_csv: Path, weight: float) -> dict[str, torch.Tensor]:
        cfg = tiny_train_config(tiny_split, tmp_path / name, train_csv=train_csv, teacher=teacher,
                                distill_weight=weight)  # fmt: skip
        train(cfg)
        assert json.loads((tmp_path / name / "model.json").read_text())["params"]["teacher"] == list(teacher)
        return torch.load(tmp_path / name / "model.pt", weights_only=True)

    right, mirrored = student("a", tiny_split["train"], 1.0), student("b", wrong, 1.0)
    assert all(torch.equal(right[k], mirrored[k]) for k in right)
    half = student("c", wrong, 0.5)
    assert not all(torch.equal(right[k], half[k]) for k in right)


def test_teacher_must_fit_the_student(
    tiny_split: dict[str, Path], tiny_trained_model_dir: Path, tmp_path: Path
) -> None:
    def cfg(**kw: object) -> None:
        tiny_train_config(tiny_split, tmp_path / "m", **kw).validate()

    with pytest.raises(ConfigError, match=r"head ordinal.*train the student with the teacher's head"):
        cfg(head="classification", teacher=(str(tiny_trained_model_dir),))
    with pytest.raises(ConfigError, match=r"no model\.pt"):
        cfg(teacher=(str(tmp_path),))
    with pytest.raises(ConfigError, match="--distill-weight"):
        cfg(teacher=(str(tiny_trained_model_dir),), distill_weight=0.0)


def _other_counts_manifest(abid_dir: Path, out: Path, n: int = 6) -> Path:
    """A manifest of ``n`` real images with counts outside 1-5: half empty bins, half with 7+ items."""
    from components.common import sha256_file
    from components.manifest import ManifestRow

    empty, many = [], []
    for meta in sorted((abid_dir / "metadata").glob("*.json")):
        q = json.loads(meta.read_text()).get("EXPECTED_QUANTITY")
        image = abid_dir / "bin-images" / f"{meta.stem}.jpg"
        if not isinstance(q, int) or not image.is_file():
            continue
        row = ManifestRow(meta.stem, q, str(image), sha256_file(image), 0, 0, "abid")
        if q == 0 and len(empty) < n // 2:
            empty.append(row)
        elif q >= 7 and len(many) < n - n // 2:
            many.append(row)
        if len(empty) + len(many) == n:
            break
    assert len(empty) + len(many) == n, "expected empty bins and bins of 7+ items in ../shared/abid"
    return write_manifest(out, empty + many)


def test_pretraining_on_every_count_gives_the_fit_its_backbone(
    abid_dir: Path, tiny_split: dict[str, Path], tmp_path: Path
) -> None:
    extra = _other_counts_manifest(abid_dir, tmp_path / "extra.csv")
    # A learning rate too small to move a weight: the fit's convolutions stay where it started.
    cfg = tiny_train_config(tiny_split, tmp_path / "m", lr=1e-12, pretrain_extra=extra, pretrain_epochs=2,
                            pretrain_count_cap=6)  # fmt: skip
    seen: list[int] = []

    def stop_in_the_fit(epoch: int, metrics: dict[str, float]) -> None:
        seen.append(epoch)
        raise _InterruptError

    with pytest.raises(_InterruptError):
        train(cfg, on_epoch=stop_in_the_fit)
    stage = tmp_path / "m" / "pretrain"
    assert seen == [1] and (stage / "checkpoint.json").is_file()  # stage 1 done, the fit cut off
    stage_done = (stage / "model.pt").stat().st_mtime_ns
    result = train(dataclasses.replace(cfg, resume=True), on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2] and (stage / "model.pt").stat().st_mtime_ns == stage_done  # not pretrained again
    # Interrupted + resumed == uninterrupted, the stage included.
    whole = train(dataclasses.replace(cfg, out_dir=tmp_path / "whole"))
    for got, want in zip(result.history, whole.history, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)

    stage_rows = read_manifest(stage / "pretrain.csv")
    assert len(stage_rows) == len(read_manifest(tiny_split["train"])) + 6
    assert {r.count for r in stage_rows} == {0, 1, 2, 3, 4, 5, 6}  # 7+ capped at 6, the empty bins kept
    assert load_model_spec(stage).classes == tuple(range(7))
    stage_metrics = json.loads((stage / "metrics.json").read_text())
    assert stage_metrics["best_epoch"] == 2  # the last epoch, not a val pick
    backbone = torch.load(stage / "model.pt", weights_only=True)
    fitted = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert torch.allclose(fitted["conv1.weight"], backbone["conv1.weight"], atol=1e-6)
    assert fitted["fc.weight"].shape != backbone["fc.weight"].shape  # the head is the fit's own
    assert result.metrics["pretrain"]["images"] == len(stage_rows)
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert f"first trained for 2 epochs on {len(stage_rows)} images" in card
    params = json.loads((tmp_path / "m" / "model.json").read_text())["params"]
    assert params["pretrain_epochs"] == 2 and params["pretrain_extra"] == str(extra)

    # Without the stage the same fit starts elsewhere.
    train(tiny_train_config(tiny_split, tmp_path / "plain", lr=1e-12))
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    assert not torch.allclose(plain["conv1.weight"], backbone["conv1.weight"], atol=1e-3)


def test_pretrain_only_makes_a_backbone_that_a_later_fit_starts_from_and_reports(
    abid_dir: Path, tiny_split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = _other_counts_manifest(abid_dir, tmp_path / "extra.csv", n=4)
    tiny = ["--image-size", "32", "--epochs", "1", "--batch-size", "10", "--device", "cpu", "--num-threads",
            "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    base = _cli_args(tiny_split, tmp_path / "stage") + tiny
    assert main([*base, "--pretrain-only"]) == 2  # nothing to pretrain on
    assert "pretraining needs --pretrain-extra" in capsys.readouterr().err
    flags = ["--pretrain-only", "--pretrain-extra", str(extra), "--pretrain-epochs", "2",
             "--pretrain-count-cap", "8"]  # fmt: skip
    assert main([*base, *flags]) == 0
    weights = tmp_path / "stage" / "pretrain" / "model.pt"
    assert f"backbone written to {weights}" in capsys.readouterr().out
    assert not (tmp_path / "stage" / "model.onnx").exists()  # the stage alone, no fit
    record = json.loads((weights.parent / "backbone.json").read_text())
    n_stage = len(read_manifest(tiny_split["train"])) + 4
    assert (record["images"], record["epochs"], record["count_cap"]) == (n_stage, 2, 8)

    # Two fits start from the one backbone (a learning rate too small to move a weight) and say so.
    backbone = torch.load(weights, weights_only=True)
    for seed in (0, 1):
        out = tmp_path / f"fit{seed}"
        assert main([*_cli_args(tiny_split, out), *tiny, "--lr", "1e-12", "--seed", str(seed),
                     "--weights", str(weights)]) == 0  # fmt: skip
        fitted = torch.load(out / "model.pt", weights_only=True)
        assert torch.allclose(fitted["conv1.weight"], backbone["conv1.weight"], atol=1e-6)
        pre = json.loads((out / "metrics.json").read_text())["pretrain"]
        assert (pre["images"], pre["epochs"], pre["count_cap"]) == (n_stage, 2, 8)
        card = (out / "MODEL_CARD.md").read_text()
        assert f"first trained for 2 epochs on {n_stage} images" in card and "above 8 as 8" in card
    # A plain state dict is no stage: the fit reports none.
    shutil.copyfile(weights, tmp_path / "plain.pt")
    assert (
        main([*_cli_args(tiny_split, tmp_path / "fit_plain"), *tiny, "--weights", str(tmp_path / "plain.pt")])
        == 0
    )
    assert "pretrain" not in json.loads((tmp_path / "fit_plain" / "metrics.json").read_text())


def test_pretraining_settings_are_checked(
    abid_dir: Path, tiny_split: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = _other_counts_manifest(abid_dir, tmp_path / "extra.csv", n=2)
    base = _cli_args(tiny_split, tmp_path / "m")
    for flags, words in [
        (["--pretrain-epochs", "3"], "needs --pretrain-extra"),
        (["--pretrain-extra", str(extra)], "only with --pretrain-epochs"),
        (["--pretrain-epochs", "3", "--pretrain-extra", str(tmp_path / "nope.csv")], "does not exist"),
        (
            ["--pretrain-epochs", "3", "--pretrain-extra", str(extra), "--pretrain-count-cap", "4"],
            "count-cap",
        ),
        (["--pretrain-epochs", "-1"], ">= 0"),
        (["--pretrain-epochs", "1", "--pretrain-extra", str(tiny_split["val"])], "also in"),  # a leak
    ]:
        assert main(base + flags) == 2, flags
        assert words in capsys.readouterr().err, flags
    assert not (tmp_path / "m" / "pretrain").exists()  # refused before any work


def test_refit_trains_on_train_and_val_up_to_the_selected_epoch_and_exports_that_model(
    tiny_split: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import components.training.loop as loop_module
    from components.data import data_hash
    from components.evaluate import count_metrics, evaluate
    from components.model import build_model, decode_outputs

    select = loop_module.select_key

    def epoch_2_is_best(metrics: dict[str, float], name: str) -> tuple[float, float]:
        # val picks epoch 2 of 3, so the refit must stop before the schedule's end
        return select(metrics, name) if name == "last" else (float(metrics["epoch"] == 2), 0.0)

    monkeypatch.setattr(loop_module, "select_key", epoch_2_is_best)
    out = tmp_path / "m"
    cfg = tiny_train_config(tiny_split, out, epochs=3, refit=True, test_csv=tiny_split["test"])
    result = train(cfg)
    assert result.best_epoch == 2 and result.epochs_run == 3

    stage = out / "refit"
    train_rows, val_rows = read_manifest(tiny_split["train"]), read_manifest(tiny_split["val"])
    # only val's selection part is trained on again: the calibration part stays held out
    val_rows, _, calib_rows, _ = calibration_split(val_rows, [Path(r.path) for r in val_rows], 0.5, cfg.seed)
    assert len(val_rows) == len(calib_rows) == 5
    assert [r.id for r in read_manifest(stage / "train_val.csv")] == [r.id for r in train_rows + val_rows]
    stage_metrics = json.loads((stage / "metrics.json").read_text())
    stage_params = load_model_spec(stage).params
    assert stage_metrics["epochs_run"] == 2 and stage_metrics["n_train"] == len(train_rows) + len(val_rows)
    assert (stage_params["epochs"], stage_params["stop_after"]) == (3, 2)  # same schedule, cut at 2
    assert stage_params["weights"] == "none" and stage_params["seed"] == cfg.seed

    # The exported model is the refit, not the val-selected weights (kept in the checkpoint).
    exported = torch.load(out / "model.pt", weights_only=True)
    refit = torch.load(stage / "model.pt", weights_only=True)
    selected = torch.load(out / CHECKPOINT_FILE, weights_only=False)["best_state"]
    assert all(torch.equal(exported[k], refit[k]) for k in refit)
    assert not torch.allclose(exported["conv1.weight"], selected["conv1.weight"])
    metrics = json.loads((out / "metrics.json").read_text())
    spec = load_model_spec(out)
    assert metrics["refit"]["images"] == len(train_rows) + len(val_rows) and metrics["refit"]["epochs"] == 2
    assert spec.training_data_sha256 == data_hash(train_rows + val_rows) and spec.params["refit"] is True
    assert spec.answers.calibration_images == len(calib_rows)  # fitted with the refit model on them
    assert "val" not in metrics["answers"]  # the refit model was trained on the selection part
    # test: the refit's figures through ONNX; test_selected: the val-selected weights' figures
    refit_eval = evaluate(stage, tiny_split["test"], tmp_path / "refit_eval")
    assert metrics["test"]["confusion_matrix"] == refit_eval["confusion_matrix"]
    test_rows, test_paths = load_labelled(tiny_split["test"])
    model = build_model(5, "ordinal")
    model.load_state_dict(selected)
    with torch.no_grad():
        raw = model.eval()(torch.from_numpy(preprocess_batch(test_paths, spec.preprocess)))
    index = decode_outputs(raw, "ordinal", 5)[1].numpy()
    want = count_metrics([r.count for r in test_rows], index + 1, spec.classes)
    assert metrics["refit"]["test_selected"]["accuracy"] == pytest.approx(want["accuracy"])
    assert metrics["refit"]["test_selected"]["rmse"] == pytest.approx(want["rmse"])
    # val figures are the selected run's (val was trained on), and the card says so
    assert spec.metrics["val"]["accuracy"] == metrics["val"]["accuracy"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "trained again on the training and validation images" in card
    assert "validation (selected run)" in card

    # A run cut off after its refit stage resumes without training that stage again.
    (out / "checkpoint.json").unlink()
    stage_done = (stage / "model.pt").stat().st_mtime_ns
    resumed = train(dataclasses.replace(cfg, resume=True))
    assert (stage / "model.pt").stat().st_mtime_ns == stage_done
    assert resumed.metrics["test"]["confusion_matrix"] == metrics["test"]["confusion_matrix"]


def test_stop_after_is_checked(tiny_split: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stop_after must be in"):
        train(tiny_train_config(tiny_split, tmp_path / "m", epochs=2, stop_after=3))
    assert not (tmp_path / "m" / "model.onnx").exists()
