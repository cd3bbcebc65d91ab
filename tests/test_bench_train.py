"""bench/train.py, the script a GPU session runs, on a tiny pack of real ABID images on the CPU.

A GPU session has minutes and no PyPI: the pack, the split, the timed tune + final fit and the
pretraining stage must work before it starts, so they run here at 32 px for a step per epoch.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from components.common import ConfigError
from components.manifest import read_manifest
from tests.fixtures.data import REPO_ROOT

PER_CLASS = 12
N_EXTRA = 10


def _bench_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "bench" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train() -> ModuleType:
    return _bench_train()


@pytest.fixture(scope="module")
def mini_abid(abid_dir: Path, tmp_path_factory: pytest.TempPathFactory, bench_train: ModuleType) -> Path:
    """A bucket-layout directory of links to a few real images per class, plus some 0/6+ images."""
    root = tmp_path_factory.mktemp("mini_abid")
    (root / "bin-images").mkdir()
    (root / "metadata").mkdir()
    file_list = json.loads((abid_dir / "file_list.json").read_text())
    picked: dict[str, list[str]] = {}
    for c in "12345":
        metas = [m for m in file_list[c] if (abid_dir / "bin-images" / f"{Path(m).stem}.jpg").is_file()]
        picked[c] = metas[:PER_CLASS]
    extra = bench_train.out_of_range_ids(abid_dir)[:N_EXTRA]
    ids = [Path(m).stem for metas in picked.values() for m in metas] + [i for i, _ in extra]
    for i in ids:
        (root / "bin-images" / f"{i}.jpg").symlink_to(abid_dir / "bin-images" / f"{i}.jpg")
        (root / "metadata" / f"{i}.json").symlink_to(abid_dir / "metadata" / f"{i}.json")
    (root / "file_list.json").write_text(json.dumps(picked))
    return root


@pytest.fixture(scope="module")
def pack_path(mini_abid: Path, tmp_path_factory: pytest.TempPathFactory, bench_train: ModuleType) -> Path:
    out = tmp_path_factory.mktemp("pack") / "pack.npz"
    info = bench_train.pack(out, image_size=32, quality=90, workers=2, all_counts=True, abid=mini_abid)
    assert info["n"] == 5 * PER_CLASS + N_EXTRA
    return out


def test_pack_keeps_labels_and_out_of_range_images_stay_out_of_val_and_test(
    pack_path: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    z = np.load(pack_path)
    labels = z["labels"]
    assert np.bincount(labels, minlength=6)[1:6].tolist() == [PER_CLASS] * 5
    assert int((labels < 1).sum() + (labels > 5).sum()) == N_EXTRA
    info = bench_train.prepare_data(pack_path, tmp_path)
    assert info["out_of_range_images"] == N_EXTRA
    assert sum(info["split"].values()) == 5 * PER_CLASS
    extra_ids = {r.id for r in read_manifest(tmp_path / "extra.csv")}
    for name in ("train", "val", "test"):
        rows = read_manifest(tmp_path / f"{name}.csv")
        assert rows and all(1 <= r.count <= 5 for r in rows)
        assert not extra_ids & {r.id for r in rows}


def test_timed_tune_then_final_fit(pack_path: Path, bench_train: ModuleType, tmp_path: Path) -> None:
    argv = ["tune", "--pack", str(pack_path), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
            "--trials", "2", "--trial-epochs", "1", "--final-epochs", "1", "--image-sizes", "32",
            "--heads", "ordinal", "--threads", "1", "--max-steps-per-epoch", "1"]  # fmt: skip
    assert bench_train.main(argv) == 0
    r = json.loads((tmp_path / "out" / "train_gpu_tune.json").read_text())
    assert r["tune"]["complete"] + r["tune"]["pruned"] == 2 and r["tune"]["failed"] == 0
    assert r["tune"]["run_by_this_benchmark"] == 2
    assert r["final_fit"]["params"] == r["tune"]["best_params"]  # the fit used the tuned parameters
    assert r["final_fit"]["test"]["n"] == r["data"]["split"]["test"]
    assert r["tune_plus_final_fit_s"] == pytest.approx(r["tune"]["seconds"] + r["final_fit"]["seconds"])
    assert r["tune"]["all_trials_ran"] is True
    assert r["target"]["met"] == (r["tune_plus_final_fit_s"] <= 600)
    assert "pretrained_fit" not in r and r["selected"]["fit"] == "final_fit"
    # A second run in the same work directory measures a fresh study, not the finished one; this
    # time the tuned fit runs again from a backbone pretrained on every count.
    assert bench_train.main([*argv, "--pretrain-epochs", "1"]) == 0
    again = json.loads((tmp_path / "out" / "train_gpu_tune.json").read_text())
    assert again["tune"]["run_by_this_benchmark"] == 2
    assert again["tune"]["complete"] + again["tune"]["pruned"] == 2
    pre, fits = again["pretrain"], (again["final_fit"], again["pretrained_fit"])
    assert pre["images"] == again["data"]["split"]["train"] + N_EXTRA
    assert [f["weights"] for f in fits] == ["none", pre["weights"]]
    assert fits[0]["params"] == fits[1]["params"] == again["tune"]["best_params"]
    chosen = max(fits, key=lambda f: (f["val"]["accuracy"], -f["val"]["rmse"]))
    assert again["selected"]["val_accuracy"] == chosen["val"]["accuracy"]
    assert again["selected"]["test_accuracy"] == chosen["test"]["accuracy"]
    # Out of time: the pretrained fit is skipped and said so, the timed figures stay.
    assert bench_train.main([*argv, "--pretrain-epochs", "1", "--budget-s", "0"]) == 0
    late = json.loads((tmp_path / "out" / "train_gpu_tune.json").read_text())
    assert "time budget" in late["pretrained_fit"]["skipped"] and "pretrain" not in late
    assert late["target"]["met"] == (late["tune_plus_final_fit_s"] <= 600)
    # The pipeline's order: the stage first, timed with the rest; trials and fit start from it.
    assert bench_train.main([*argv, "--pretrain-epochs", "1", "--pretrain-first"]) == 0
    first = json.loads((tmp_path / "out" / "train_gpu_tune.json").read_text())
    weights = first["pretrain"]["weights"]
    assert first["final_fit"]["weights"] == weights and "pretrained_fit" not in first
    trial_specs = list((tmp_path / "w" / "tune").rglob("model.json"))
    assert trial_specs and all(json.loads(p.read_text())["params"]["weights"] == weights for p in trial_specs)
    assert first["total_s"] == pytest.approx(first["pretrain_s"] + first["tune_plus_final_fit_s"])
    assert first["pretrain_s"] == first["pretrain"]["seconds"] > 0
    assert first["target"]["met"] == (first["total_s"] <= 600)
    with pytest.raises(SystemExit, match="needs --pretrain-epochs"):
        bench_train.main([*argv, "--pretrain-first"])
    # A tune out of time before any trial: recorded as such, the target not claimed, exit 1.
    assert bench_train.main([*argv, "--tune-timeout", "0.001"]) == 1
    short = json.loads((tmp_path / "out" / "train_gpu_tune.json").read_text())
    assert short["tune"]["complete"] + short["tune"]["pruned"] == 0
    assert short["tune"]["all_trials_ran"] is False and short["target"]["met"] is False
    assert "no trial completed" in short["final_fit"]["skipped"]


def test_pretraining_needs_the_out_of_range_images(
    mini_abid: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    small = tmp_path / "classes_1_5.npz"
    bench_train.pack(small, image_size=32, quality=90, workers=2, abid=mini_abid)
    argv = ["tune", "--pack", str(small), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
            "--trials", "1", "--pretrain-epochs", "1"]  # fmt: skip
    with pytest.raises(SystemExit, match="all-counts"):
        bench_train.main(argv)
    assert not (tmp_path / "w" / "tune").exists()  # refused before any trial ran


def _tiny_gpu_argv(pack_path: Path, tmp_path: Path) -> list[str]:
    """``gpu`` on the test pack, one step per epoch, no throughput timing: a run's flags go after it."""
    return ["gpu", "--pack", str(pack_path), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
            "--bench-batch", "--compile-below", "0", "--batch-size", "16", "--threads", "1",
            "--max-steps-per-epoch", "1"]  # fmt: skip


def test_pretraining_on_every_count_feeds_the_runs(
    pack_path: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    argv = [*_tiny_gpu_argv(pack_path, tmp_path), "--image-size", "32", "--epochs", "1",
            "--pretrain-epochs", "1", "--runs", "ordinal:weights=none", "ordinal"]  # fmt: skip
    assert bench_train.main(argv) == 0
    r = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    pre = r["pretrain"]
    assert pre["images"] == r["data"]["split"]["train"] + N_EXTRA
    pretrain_rows = read_manifest(tmp_path / "w" / "pretrain" / "pretrain.csv")
    assert max(row.count for row in pretrain_rows) <= pre["count_cap"]
    assert [run["weights"] for run in r["runs"]] == ["none", pre["weights"]]
    assert "selected" in r
    # a stage per run, with the run's seed: members that share no backbone
    per_run = [
        *argv[:-3],
        "--pretrain-per-run",
        "--runs",
        "ordinal:seed=1",
        "ordinal:seed=2",
        "ordinal:weights=none",
    ]
    assert bench_train.main(per_run) == 0
    r = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    assert "pretrain" not in r
    first, second, scratch = r["runs"]
    for i, run in enumerate((first, second)):
        assert (
            run["weights"]
            == run["pretrain"]["weights"]
            == str(tmp_path / "w" / f"stage_{i}" / "pretrain" / "model.pt")
        )
    assert Path(first["weights"]).read_bytes() != Path(second["weights"]).read_bytes()
    assert scratch["weights"] == "none" and "pretrain" not in scratch


def test_a_contrastive_stage_feeds_the_runs_with_its_own_batch_size(
    pack_path: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    stage = ["--pretrain-epochs", "2", "--pretrain-objective", "contrastive", "--pretrain-batch-size", "8"]
    argv = [
        *_tiny_gpu_argv(pack_path, tmp_path),
        "--image-size",
        "32",
        "--epochs",
        "1",
        *stage,
        "--runs",
        "ordinal",
    ]
    assert bench_train.main(argv) == 0
    r = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    pre = r["pretrain"]
    assert pre["objective"] == "contrastive" and pre["batch_size"] == 8 and pre["epochs"] == 2
    assert pre["images"] == r["data"]["split"]["train"] + N_EXTRA
    assert 0 <= pre["knn_val_accuracy_start"] <= 1 and 0 <= pre["knn_val_accuracy"] <= 1
    assert r["runs"][0]["weights"] == pre["weights"]
    stage = json.loads((tmp_path / "w" / "pretrain" / "checkpoint.json").read_text())
    assert stage["params"]["batch_size"] == 8 and stage["params"]["pretrain_objective"] == "contrastive"
    with pytest.raises(SystemExit):
        bench_train.main([*argv[:-2], "--pretrain-batch-size", "-1", "--runs", "ordinal"])


def test_refit_runs_record_both_models_test_figures(
    pack_path: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    from components.modelspec import load_model_spec

    argv = [*_tiny_gpu_argv(pack_path, tmp_path), "--image-size", "32", "--epochs", "2",
            "--pretrain-epochs", "1", "--refit", "--runs", "ordinal"]  # fmt: skip
    assert bench_train.main(argv) == 0
    r = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    (run,) = r["runs"]
    split = r["data"]["split"]
    # train + the validation selection part: the calibration part stays out, for the answers' thresholds
    from components.training.config import TrainConfig

    calibration = round(TrainConfig.calib_frac * split["val"])
    assert run["refit"]["images"] == split["train"] + split["val"] - calibration
    assert run["refit"]["epochs"] == run["best_epoch"]
    assert set(run["refit"]["test_selected"]) == {"accuracy", "rmse", "mae", "n"}
    assert run["refit"]["test_selected"]["n"] == run["test"]["n"] == split["test"]
    # the refit starts where the run did: from the shared pretrained backbone
    assert load_model_spec(Path(run["refit"]["dir"])).params["weights"] == r["pretrain"]["weights"]
    # the stage itself is no fit: it is neither refit nor trained on val
    stage = Path(r["pretrain"]["weights"]).parent
    assert not (stage / "refit").exists() and load_model_spec(stage).params["refit"] is False
    for flag in ("--ensemble", "--distill"):  # both are scored on val, which refit members learnt
        with pytest.raises(SystemExit) as e:
            bench_train.main([*argv, flag])
        assert e.value.code == 2


def test_collect_keeps_the_figures_of_trained_models(
    bench_train: ModuleType, tiny_trained_model_dir: Path, tmp_path: Path
) -> None:
    argv = [
        "collect",
        "--model",
        str(tiny_trained_model_dir),
        "--out",
        str(tmp_path),
        "--result-name",
        "c.json",
    ]
    assert bench_train.main(argv) == 0
    (rec,) = json.loads((tmp_path / "c.json").read_text())["models"]
    metrics = json.loads((tiny_trained_model_dir / "metrics.json").read_text())
    assert (
        rec["val"]["accuracy"] == metrics["val"]["accuracy"]
        and rec["test"]["rmse"] == metrics["test"]["rmse"]
    )
    assert rec["train_params"]["epochs"] == 2 and rec["device"] == metrics["device"] == "cpu"
    assert "refit" not in rec  # only what the run recorded
    with pytest.raises(SystemExit, match=r"not a components\.train output"):
        bench_train.main(["collect", "--model", str(tmp_path), "--out", str(tmp_path)])


def test_cpu_throughput_at_each_thread_count(bench_train: ModuleType, tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        out = tmp_path / "train_cpu.json"
        assert bench_train.main(["cpu", "--threads", "1", "2", "--image-size", "32", "--batch-size", "4",
                                 "--steps", "1", "--out", str(out)]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(before)
    r = json.loads(out.read_text())
    assert [run["threads"] for run in r["runs"]] == [1, 2]
    assert all(run["image_size"] == 32 and run["images_per_s"] > 0 for run in r["runs"])
    assert r["best"] == max(r["runs"], key=lambda run: run["images_per_s"])
    assert r["env"]["cpu_count"] >= 1 and "load_average_1m_after" in r["env"]
    with pytest.raises(SystemExit, match="--threads"):
        bench_train.cpu_bench([0], 32, 4, 1)


def test_runs_at_two_image_sizes_from_one_pack(
    pack_path: Path, bench_train: ModuleType, tmp_path: Path
) -> None:
    argv = [*_tiny_gpu_argv(pack_path, tmp_path), "--result-name", "train_gpu_resolution.json",
            "--epochs", "1",
            "--runs", "ordinal:image_size=24,decision=fitted", "ordinal:image_size=32"]  # fmt: skip
    assert bench_train.main(argv) == 0
    assert not (tmp_path / "out" / "train_gpu.json").exists()
    r = json.loads((tmp_path / "out" / "train_gpu_resolution.json").read_text())
    assert [run["image_size"] for run in r["runs"]] == [24, 32]
    for run in r["runs"]:  # each exported model preprocesses at its own size
        spec = json.loads((Path(run["model_dir"]) / "model.json").read_text())
        assert spec["preprocess"]["image_size"] == run["image_size"]
    # a run spec may fit its count rule on val: the plain rule's figures are kept beside
    fitted, plain = r["runs"]
    assert fitted["decision"]["rule"] == "fitted" and set(fitted["decision"]["val_plain"]) >= {"accuracy"}
    assert plain["decision"] == {"rule": "plain"}
    # the decision command measures both rules on trained models, without training
    work = tmp_path / "w"
    dargv = ["decision", "--model", fitted["model_dir"], plain["model_dir"], "--val", str(work / "val.csv"),
             "--test", str(work / "test.csv"), "--data-root", str(work / "data"), "--threads", "1",
             "--out", str(tmp_path / "out"), "--cache-dir", str(work / "cache")]  # fmt: skip
    assert bench_train.main(dargv) == 0
    d = json.loads((tmp_path / "out" / "train_decision.json").read_text())
    assert [m["model"] for m in d["models"]] == [fitted["model_dir"], plain["model_dir"]]
    for m in d["models"]:
        assert m["val_fitted"]["accuracy"] >= m["val_plain"]["accuracy"]
        assert m["val_fitted_rmse"]["rmse"] <= m["val_plain"]["rmse"]
        assert m["test_plain"]["n"] == m["test_fitted"]["n"] == r["data"]["split"]["test"]
        # each fitted rule against the plain one on the same test images, paired
        for rule in ("fitted", "fitted_rmse"):
            paired = m["test_paired"][rule]
            diff = m[f"test_{rule}"]["accuracy"] - m["test_plain"]["accuracy"]
            assert paired["accuracy_diff"] == pytest.approx(diff)
            assert (
                paired["accuracy_diff_interval"][0]
                <= paired["accuracy_diff"]
                <= paired["accuracy_diff_interval"][1]
            )
    # same weights, same val images: the command's plain figure is the run's own
    assert d["models"][1]["val_plain"]["accuracy"] == pytest.approx(plain["val"]["accuracy"])
    # the two runs paired on the test images, by the bench itself and by the compare command
    (pair,) = r["paired_test"]
    assert pair["run"] == r["runs"][1]["run"] and pair["vs"] == r["runs"][0]["run"]
    assert pair["accuracy_diff"] == pytest.approx(plain["test"]["accuracy"] - fitted["test"]["accuracy"])
    assert pair["n"] == r["data"]["split"]["test"]
    cargv = ["compare", "--model", fitted["model_dir"], plain["model_dir"], "--test", str(work / "test.csv"),
             "--val", str(work / "val.csv"), "--data-root", str(work / "data"), "--threads", "1",
             "--out", str(tmp_path / "out")]  # fmt: skip
    assert bench_train.main(cargv) == 0
    c = json.loads((tmp_path / "out" / "train_compare.json").read_text())
    for split in ("val", "test"):  # the served graphs' figures: the runs' own, fitted rule included
        figures = c["splits"][split]["figures"]
        assert [f["accuracy"] for f in figures] == pytest.approx(
            [run[split]["accuracy"] for run in r["runs"]]
        )
        lo, hi = figures[0]["intervals"]["accuracy"]
        assert lo <= figures[0]["accuracy"] <= hi
    assert c["splits"]["test"]["vs_first"][0]["accuracy_diff"] == pytest.approx(pair["accuracy_diff"])
    assert c["splits"]["test"]["vs_first"][0]["mcnemar_p"] == pytest.approx(pair["mcnemar_p"])
    with pytest.raises(SystemExit):
        bench_train.main([*cargv[:2], fitted["model_dir"], *cargv[4:]])  # one model: nothing to compare
    # intervals for every recorded test matrix of the result file, from the matrix alone
    assert bench_train.main(["intervals", str(tmp_path / "out" / "train_gpu_resolution.json"), "--out",
                             str(tmp_path / "out")]) == 0  # fmt: skip
    blocks = json.loads((tmp_path / "out" / "train_intervals.json").read_text())["blocks"]
    assert [b["where"] for b in blocks] == ["/runs/0/test", "/runs/1/test"]
    for b, run in zip(blocks, r["runs"], strict=True):
        assert b["accuracy"] == run["test"]["accuracy"] and b["n"] == run["test"]["n"]
        assert b["intervals"]["accuracy"][0] <= b["accuracy"] <= b["intervals"]["accuracy"][1]
    with pytest.raises(SystemExit, match="no block"):
        bench_train.main(["intervals", str(tmp_path / "out" / "train_compare.json"), "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="not TrainConfig fields"):
        bench_train.main([*argv[:-2], "ordinal:budget_s=3"])


def test_a_student_is_taught_by_the_runs(pack_path: Path, bench_train: ModuleType, tmp_path: Path) -> None:
    argv = [*_tiny_gpu_argv(pack_path, tmp_path), "--image-size", "32", "--epochs", "1", "--distill",
            "--ensemble", "--decision", "fitted",
            "--runs", "ordinal:seed=1", "ordinal:seed=2", "classification"]  # fmt: skip
    assert bench_train.main(argv) == 0
    r = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    # the ensemble of the best head's runs, its count rule fitted on val like each run's: the figures
    # through its ONNX graph are the fitted rule's, the plain ones are kept beside
    ens = r["ensemble"]
    assert ens["decision"]["rule"] == "fitted"
    assert len(ens["decision"]["offsets"]) == (5 if ens["head"] == "classification" else 4)
    for split in ("val", "test"):
        assert ens[split]["accuracy"] == pytest.approx(ens["decision"][f"{split}_fitted"]["accuracy"])
    assert all(run["decision"]["rule"] == "fitted" for run in r["runs"])
    student = r["distilled"]
    best_head = max((run for run in r["runs"]), key=bench_train.val_rank)["head"]
    teachers = [run for run in r["runs"] if run["head"] == best_head]
    assert student["head"] == best_head and student["overrides"]["teachers"] == [t["run"] for t in teachers]
    params = json.loads((Path(student["model_dir"]) / "model.json").read_text())["params"]
    assert params["teacher"] == [t["model_dir"] for t in teachers] and params["distill_weight"] == 0.5
    names = [run["run"] for run in r["runs"]] + [student["run"], ens["run"]]
    assert r["selected"]["run"] in names
    # every other model, ensemble and student included, paired against the first run on test
    assert {p["run"] for p in r["paired_test"]} == set(names[1:])
    assert all(p["vs"] == names[0] and p["n"] == ens["test"]["n"] for p in r["paired_test"])
    # Out of time: the student is skipped and said so.
    assert bench_train.main([*argv, "--distill-budget-s", "0"]) == 0
    late = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    assert "time budget" in late["distilled"]["skipped"]
