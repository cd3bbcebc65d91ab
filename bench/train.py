"""Training benchmarks: throughput (images/s) and quality on the 1-5 subset of the ABID sample.

``python bench/train.py`` (``make bench-train``)
    CPU throughput of the real train step at 224 px with 1 and 2 threads -> ``bench/results/train_cpu.json``;
    on a machine with CUDA also the GPU throughput and an accuracy run (as ``gpu`` does), then ``tune``.
``python bench/train.py tune --pack .gpu/abid_224_q90.npz``
    The pipeline's tune -> final fit on the GPU, timed (20 Optuna trials, then 150 epochs with the best
    parameters) -> ``train_gpu_tune.json``; target: both together in <= 10 minutes. With an
    ``--all-counts`` pack, ``--pretrain-epochs N`` then fits the tuned parameters again from a backbone
    pretrained on every count (if ``--budget-s`` has not passed), and selects between the two on val.
``python bench/train.py pack --out .gpu/abid_224_q90.npz``
    Decodes the subset (file_list.json classes 1-5 present in ../shared/abid) once with
    ``components.preprocess.load_uint8`` at 224 px and re-encodes it as JPEG q90 into one compact file,
    small enough to take to a GPU machine that cannot reach the raw images.
``python bench/train.py gpu --pack .gpu/abid_224_q90.npz --out RESULTS_DIR``
    On the GPU machine: throughput at 224 px (bf16, channels_last), then the accuracy run(s) on a fixed
    stratified 70/15/15 split (seed 0; selection on val only), the chosen model evaluated on test through
    the exported ONNX model (``components.evaluate``). Writes ``train_gpu.json``. With a pack made by
    ``pack --all-counts``, ``--pretrain-epochs N`` first trains on the training split plus the 0 and
    6+ images and starts the runs from that backbone (a run spec ``HEAD:weights=none`` does not).
    A run spec overrides any training setting, e.g. ``ordinal:image_size=288,seed=2``; ``--result-name``
    keeps each comparison in its own file. ``--ensemble`` scores the runs' average in one graph;
    ``--distill`` then trains one more model taught by them (``components.train --teacher``).
    ``--decision fitted`` fits each run's (and the ensemble's) count rule on val; ``--pretrain-per-run``
    gives each run a stage of its own; ``--pretrain-objective contrastive`` makes that stage
    self-supervised (SimCLR, :mod:`components.training.contrastive`); ``--refit`` also trains each run
    again on train + val up to its val-chosen epoch and tests both models.
``python bench/train.py collect --model DIR... --result-name NAME.json``
    The figures (val, test, refit, count rule, settings, device, time) of models trained by
    ``components.train`` directly, kept as a result file.
``python bench/train.py decision --model DIR... --val val.csv --test test.csv``
    The plain count rule against offsets fitted on val (for accuracy, and for RMSE) of trained models,
    on val and test, from their ``model.pt``: no training -> ``train_decision.json``.
``python bench/train.py compare --model BASE OTHER... --test test.csv [--val val.csv]``
    Trained models' served (ONNX) figures on the same images with 95 % bootstrap intervals, and each
    model against the first, paired: the accuracy and RMSE differences with their intervals and McNemar's
    exact p -> ``train_compare.json``. No training.
``python bench/train.py intervals bench/results/train_gpu*.json``
    95 % bootstrap intervals for every recorded figure that kept its confusion matrix (test splits of
    876 images: one model's accuracy is known to about +-3 points) -> ``train_intervals.json``.

The re-encoding (JPEG q90 of the already resized 224 px frames) is a second lossy step that the
training path from raw images does not have; results note it.

Recorded runs (bench/results/, one NVIDIA H200, torch 2.11):
``train_gpu.json``: ``gpu --bench-batch 256 512 --epochs 150 --runs ordinal "classification:lr=0.1"
"ordinal:lr=0.1,aug_strength=1.5,weight_decay=0.001" --budget-s 290``;
``train_gpu_tta.json``: ``gpu --bench-batch --epochs 150 --tta --ensemble --runs "ordinal:seed=1"
"ordinal:lr=0.1,aug_strength=1.5,weight_decay=0.001,seed=2" "ordinal:seed=3" --budget-s 200``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.common import atomic_write_json  # noqa: E402
from components.manifest import ManifestRow, write_manifest  # noqa: E402

if TYPE_CHECKING:
    from components.training.config import TrainConfig

RESULTS = REPO / "bench" / "results"
ABID = Path(os.environ.get("ABID_DIR", REPO.parent / "shared" / "abid"))
LOG = logging.getLogger("bench.train")


def subset_ids(abid: Path, classes: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[tuple[str, int]]:
    """(id, count) of file_list.json entries in ``classes`` whose image is present, sorted by id."""
    file_list = json.loads((abid / "file_list.json").read_text())
    out = []
    for c in classes:
        for meta in file_list.get(str(c), []):
            i = Path(meta).stem
            if (abid / "bin-images" / f"{i}.jpg").is_file():
                out.append((i, c))
    return sorted(out)


def out_of_range_ids(abid: Path, classes: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[tuple[str, int]]:
    """(id, EXPECTED_QUANTITY) of the images whose count is outside ``classes`` (0 and 6+), sorted.

    They are never in val or test (those hold classes 1-5 only), so they may feed a pretraining stage.
    """
    out = []
    for meta in sorted((abid / "metadata").glob("*.json")):
        q = json.loads(meta.read_text()).get("EXPECTED_QUANTITY")
        if isinstance(q, int) and q not in classes and (abid / "bin-images" / f"{meta.stem}.jpg").is_file():
            out.append((meta.stem, q))
    return out


def pack(
    out: Path,
    image_size: int = 224,
    quality: int = 90,
    workers: int = 4,
    all_counts: bool = False,
    abid: Path = ABID,
) -> dict[str, Any]:
    """Resize the subset once (the training decode) and store it as JPEG bytes in one .npz.

    ``all_counts`` adds the images with counts outside 1-5 (for ``gpu --pretrain-epochs``).
    """
    from PIL import Image

    from components.preprocess import load_uint8

    items = subset_ids(abid) + (out_of_range_ids(abid) if all_counts else [])

    def enc(item: tuple[str, int]) -> bytes:
        arr = load_uint8(abid / "bin-images" / f"{item[0]}.jpg", image_size)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    with ThreadPoolExecutor(workers) as pool:
        blobs = list(pool.map(enc, items))
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(
        tmp,
        ids=np.array([i for i, _ in items]),
        labels=np.array([c for _, c in items], np.int64),
        offsets=offsets,
        data=np.frombuffer(b"".join(blobs), np.uint8),
        image_size=np.int64(image_size),
        quality=np.int64(quality),
    )
    os.replace(tmp, out)
    return {"path": str(out), "n": len(items), "mib": out.stat().st_size / 2**20}


def unpack(pack_path: Path, data_root: Path, limit: int | None = None) -> list[ManifestRow]:
    """Write the packed JPEGs as data_root/images/<id>.jpg and return manifest rows for them."""
    from components.common import sha256_bytes

    z = np.load(pack_path)
    ids, labels, offsets, data = z["ids"], z["labels"], z["offsets"], z["data"]
    n = len(ids) if limit is None else min(limit, len(ids))
    pick = np.sort(np.random.default_rng(1).permutation(len(ids))[:n])
    (data_root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in pick:
        blob = data[offsets[i] : offsets[i + 1]].tobytes()
        rel = f"images/{ids[i]}.jpg"
        (data_root / rel).write_bytes(blob)
        s = int(z["image_size"])
        rows.append(ManifestRow(str(ids[i]), int(labels[i]), rel, sha256_bytes(blob), s, s, "abid-pack"))
    return rows


def prepare_data(pack_path: Path, work: Path, limit: int | None = None) -> dict[str, Any]:
    """Unpack, then the pipeline's split of the 1-5 images into work/{train,val,test}.csv.

    Images with other counts (a pack made with ``--all-counts``) go to work/extra.csv only.
    """
    from components.split import assign_splits

    t0 = time.perf_counter()
    rows = unpack(pack_path, work / "data", limit)
    in_range = [r for r in rows if 1 <= r.count <= 5]
    extra = [r for r in rows if not 1 <= r.count <= 5]
    split, _ = assign_splits(in_range, (0.7, 0.15, 0.15), seed=0)  # the same split the pipeline makes
    for name, r in split.items():
        write_manifest(work / f"{name}.csv", r)
    (work / "extra.csv").unlink(missing_ok=True)
    if extra:
        write_manifest(work / "extra.csv", extra)
    z = np.load(pack_path)
    return {
        "source": f"{pack_path}: ../shared/abid resized to {int(z['image_size'])} px by "
        f"components.preprocess.load_uint8, re-encoded as JPEG q{int(z['quality'])}",
        "split": {k: len(v) for k, v in split.items()},
        "out_of_range_images": len(extra),
        "split_seed": 0,
        "test_majority_rate": max(np.bincount([r.count for r in split["test"]])) / len(split["test"]),
        "unpack_s": time.perf_counter() - t0,
    }


def pretrain(
    base: TrainConfig,
    work: Path,
    epochs: int,
    cap: int,
    stage_dir: Path | None = None,
    batch_size: int = 0,
) -> dict[str, Any]:
    """Stage 1 on every count (``components.training.stages.pretrain_backbone``): the training split plus the
    0 and 6+ images of an ``--all-counts`` pack; the runs then start from its backbone.

    ``base`` gives the optimisation settings (the runs' own, or the tuned ones) and the seed; the
    stage is written under ``stage_dir/pretrain`` (default ``work/pretrain``).
    """
    from components.training.stages import pretrain_backbone

    extra = work / "extra.csv"
    if not extra.is_file():
        raise SystemExit("pretraining needs the 0 and 6+ images: make the pack with 'pack --all-counts'")
    cfg = dataclasses.replace(
        base,
        out_dir=stage_dir or work,
        pretrain_extra=extra,
        pretrain_data_root=work / "data",
        pretrain_epochs=epochs,
        pretrain_count_cap=cap,
        resume=False,
        batch_size=batch_size or base.batch_size,
    )
    t = time.perf_counter()
    res = pretrain_backbone(cfg)
    record = {
        "objective": cfg.pretrain_objective,
        "images": res.metrics["n_train"],
        "count_cap": cap,
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "seconds": time.perf_counter() - t,
        "best_epoch": res.best_epoch,
        "weights": str(res.model_dir / "model.pt"),
    }
    if cfg.pretrain_objective == "contrastive":  # its label-free progress: k-NN on its features
        record["knn_val_accuracy_start"] = res.metrics["knn_val_accuracy_start"]
        record["knn_val_accuracy"] = res.metrics["knn_val_accuracy"]
        record["final_loss"] = res.metrics["final_loss"]
    return record


def work_config(work: Path, out_dir: Path, **fields: Any) -> TrainConfig:
    """A TrainConfig over the split ``prepare_data`` wrote under ``work`` (test reported, never selected)."""
    from components.training.config import TrainConfig

    return TrainConfig(
        train_csv=work / "train.csv",
        val_csv=work / "val.csv",
        test_csv=work / "test.csv",
        out_dir=out_dir,
        data_root=work / "data",
        **fields,
    )


def fit_summary(res: Any, cfg: TrainConfig, seconds: float, params: list[str]) -> dict[str, Any]:
    """The figures of one fit that the result files keep (val for selection, test for the report)."""
    m = res.metrics
    return {
        "seconds": seconds,
        "epochs": cfg.epochs,
        "best_epoch": res.best_epoch,
        "weights": cfg.weights,
        "params": {k: getattr(cfg, k) for k in params},
        "val": {k: m["val"][k] for k in ("accuracy", "rmse", "mae", "rmse_expected", "n")},
        "test": {
            k: m["test"][k] for k in ("accuracy", "rmse", "mae", "rmse_expected", "n", "per_class_accuracy")
        },
        "decision": m.get("decision", {"rule": "plain"}),
    }


def tune_run(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's tune -> final fit, timed: ``--trials`` Optuna trials, then the best params' fit.

    With ``--pretrain-first`` the pipeline's full order: the stage on every count first (timed with
    the rest), then trials and fit from its backbone. Otherwise ``--pretrain-epochs`` fits the tuned
    parameters again from a backbone afterwards, to compare.
    """
    import torch

    from components.training.stages import train
    from components.tune import SearchSpace, TuneConfig, best_train_config, tune

    rf = ResultFile(args, "tune_and_final_fit")
    result, save, t0 = rf.data, rf.save, rf.t0
    work = Path(args.work)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    result["data"] = prepare_data(Path(args.pack), work, args.limit)
    if args.pretrain_first and args.pretrain_epochs < 1:
        raise SystemExit("--pretrain-first needs --pretrain-epochs N (N >= 1)")
    if args.pretrain_epochs > 0 and not result["data"]["out_of_range_images"]:
        raise SystemExit(
            f"--pretrain-epochs needs the 0 and 6+ images: {args.pack} has none (pack --all-counts)"
        )
    save()
    # A fresh study and fit every time: an old study.db would be loaded and its used-up trial
    # budget would make the tune look instant.
    for stale in (work / "tune", work / "final"):
        shutil.rmtree(stale, ignore_errors=True)
    shared = {
        "device": dev,
        "cache_dir": work / "cache",
        "num_threads": args.threads,
        "ema": args.ema,
        "checkpoint_every": args.checkpoint_every,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "progress": False,
    }
    # The final fit's settings before the tuned parameters; pretraining borrows them.
    base = work_config(work, work / "final", epochs=args.final_epochs, decision=args.decision, **shared)
    pretrain_s = 0.0
    if args.pretrain_first:
        # The pipeline's pretrain task: default optimisation settings, before any trial.
        result["pretrain"] = pretrain(base, work, args.pretrain_epochs, args.pretrain_cap)
        pretrain_s = result["pretrain"]["seconds"]
        shared["weights"] = result["pretrain"]["weights"]
        base = dataclasses.replace(base, weights=shared["weights"])
        save()
    space = SearchSpace(image_sizes=tuple(args.image_sizes), heads=tuple(args.heads))
    tcfg = TuneConfig(
        train_csv=work / "train.csv",
        val_csv=work / "val.csv",
        out_dir=work / "tune",
        n_trials=args.trials,
        data_root=work / "data",
        epochs=args.trial_epochs,
        space=space,
        train_overrides=shared,
        pruner=args.pruner,
        seed=args.seed,
        timeout=args.tune_timeout,
        progress=False,
    )
    t1 = time.perf_counter()
    tr = tune(tcfg)
    tune_s = time.perf_counter() - t1
    result["tune"] = {
        "seconds": tune_s,
        "trials": args.trials,
        "epochs_per_trial": args.trial_epochs,
        "pruner": args.pruner,
        "complete": tr.n_complete,
        "pruned": tr.n_pruned,
        "failed": tr.n_failed,
        "run_by_this_benchmark": tr.n_run_here,
        # with --tune-timeout a slow machine still reaches the final fit, on fewer trials: say so
        "all_trials_ran": tr.n_complete + tr.n_pruned >= args.trials,
        "timeout_s": args.tune_timeout,
        "best_val_accuracy": tr.best_value,
        "best_params": tr.best_params,
    }
    save()
    if not tr.n_complete:  # nothing to fit: say so instead of a traceback from the final fit
        result["final_fit"] = {"skipped": "no trial completed (see --tune-timeout)"}
        result["target"] = {"seconds": 600, "trials": args.trials, "met": False}
        save()
        return result
    cfg = best_train_config(tr.best_params_path, base)
    t2 = time.perf_counter()
    res = train(cfg)
    fit_s = time.perf_counter() - t2
    m = res.metrics
    result["final_fit"] = fit_summary(res, cfg, fit_s, list(tr.best_params))
    total = tune_s + fit_s
    result["tune_plus_final_fit_s"] = total
    # the target covers everything the pipeline runs before its fit is done, the stage included
    result["pretrain_s"] = pretrain_s
    result["total_s"] = timed = pretrain_s + total
    all_ran = result["tune"]["all_trials_ran"]
    result["target"] = {"seconds": 600, "trials": args.trials, "met": timed <= 600 and all_ran}
    save()
    print(f"pretrain {pretrain_s:.0f} s + tune {tune_s:.0f} s + final fit {fit_s:.0f} s = {timed:.0f} s "
          f"(target 600 s); test accuracy {m['test']['accuracy']:.3f}, rmse {m['test']['rmse']:.3f}",
          flush=True)  # fmt: skip
    fits = [("final_fit", result["final_fit"])]
    if args.pretrain_epochs > 0 and not args.pretrain_first:
        # The same tuned fit again, starting from a backbone pretrained on every count: one pack,
        # one split, one set of hyperparameters, so the difference is the pretraining alone.
        if time.perf_counter() - t0 > args.budget_s:
            result["pretrained_fit"] = {"skipped": f"time budget: {args.budget_s:.0f} s had passed"}
        else:
            result["pretrain"] = pretrain(cfg, work, args.pretrain_epochs, args.pretrain_cap)
            save()
            pcfg = dataclasses.replace(
                cfg, weights=result["pretrain"]["weights"], out_dir=work / "final_pretrained"
            )
            shutil.rmtree(pcfg.out_dir, ignore_errors=True)
            t3 = time.perf_counter()
            pres = train(pcfg)
            result["pretrained_fit"] = fit_summary(pres, pcfg, time.perf_counter() - t3, list(tr.best_params))
            fits.append(("pretrained_fit", result["pretrained_fit"]))
            pm = pres.metrics["test"]
            print(
                f"pretrained on every count: test accuracy {pm['accuracy']:.3f}, rmse {pm['rmse']:.3f}",
                flush=True,
            )
    result["selected"] = select_on_val(fits, "fit")
    save()
    return result


def val_rank(fit: dict[str, Any]) -> tuple[float, float]:
    """Selection order: val accuracy, then lower val RMSE. Test figures never take part."""
    return fit["val"]["accuracy"], -fit["val"]["rmse"]


def select_on_val(fits: list[tuple[str, dict[str, Any]]], label: str) -> dict[str, Any]:
    """The chosen fit's name and figures, ``fits`` being (name, fit) pairs."""
    name, best = max(fits, key=lambda f: val_rank(f[1]))
    return {
        label: name,
        "selected_on": "val accuracy (tie-break val rmse)",
        "val_accuracy": best["val"]["accuracy"],
        "val_rmse": best["val"]["rmse"],
        "test_accuracy": best["test"]["accuracy"],
        "test_rmse": best["test"]["rmse"],
    }


class ResultFile:
    """A benchmark's results, rewritten atomically after each stage: a killed run keeps what it measured."""

    def __init__(self, args: argparse.Namespace, benchmark: str) -> None:
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / args.result_name
        self.data: dict[str, Any] = {
            "benchmark": benchmark,
            "env": env_info(),
            "args": vars(args) | {"out": str(self.out)},
        }

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        atomic_write_json(self.path, self.data)


def env_info() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "load_average_1m": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_bench(
    threads: list[int], image_size: int, batch_size: int, steps: int, out: Path | None = None
) -> dict[str, Any]:
    """The real train step on the CPU at each thread count (``torch.set_num_threads``), one file."""
    from components.training.throughput import benchmark_throughput

    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads must be positive integers, got {threads}")
    result: dict[str, Any] = {
        "benchmark": "train_throughput_cpu",
        "env": env_info(),
        "command": "python bench/train.py cpu --threads "
        + " ".join(map(str, threads))
        + f" --image-size {image_size} --batch-size {batch_size} --steps {steps}",
        "runs": [],
    }
    for n in threads:
        r = benchmark_throughput(image_size, batch_size, steps, warmup=2, device="cpu", num_threads=n)
        result["runs"].append(r)
        print(
            json.dumps({k: r[k] for k in ("threads", "image_size", "batch_size", "images_per_s")}), flush=True
        )
    result["best"] = max(result["runs"], key=lambda r: r["images_per_s"])
    result["env"]["load_average_1m_after"] = os.getloadavg()[0]  # another job on the cores skews it
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    return result


def gpu_run(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput + accuracy run(s) on one device; results dict (also written as it goes)."""
    import torch

    from components.training.throughput import benchmark_throughput
    from components.tune import apply_params

    rf = ResultFile(args, "train_gpu")
    result, save, t0, out = rf.data, rf.save, rf.t0, rf.out
    work = Path(args.work)
    result["data"] = prepare_data(Path(args.pack), work, args.limit)
    save()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    result["throughput"] = []
    for bs in args.bench_batch:
        try:
            r = benchmark_throughput(
                args.bench_size,
                bs,
                args.bench_steps,
                warmup=args.bench_warmup,
                device=dev,
                num_threads=args.threads,
            )
        except Exception as e:
            LOG.exception("throughput benchmark failed")
            r = {"batch_size": bs, "error": f"{type(e).__name__}: {e}", "images_per_s": 0.0}
        result["throughput"].append(r)
        print(json.dumps(r), flush=True)
        save()
    best_eager = max((r["images_per_s"] for r in result["throughput"]), default=float("inf"))
    if args.compile_bench or (args.compile_below and best_eager < args.compile_below):
        try:
            r = benchmark_throughput(
                args.bench_size,
                args.bench_batch[-1],
                args.bench_steps,
                warmup=args.bench_warmup,
                device=dev,
                compile=True,
                num_threads=args.threads,
            )
        except Exception as e:
            LOG.exception("compiled throughput benchmark failed")
            r = {"compile": True, "error": f"{type(e).__name__}: {e}", "images_per_s": 0.0}
        result["throughput"].append(r)
        print(json.dumps(r), flush=True)
        save()

    # The runs' shared settings; a run spec overrides some of them, pretraining borrows them.
    base = work_config(
        work,
        work / "model",
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        ema=args.ema,
        aug_strength=args.aug_strength,
        label_smoothing=args.label_smoothing,
        device=dev,
        seed=args.seed,
        num_threads=args.threads,
        cache_dir=work / "cache",
        checkpoint_every=args.checkpoint_every,
        progress=False,
        max_steps_per_epoch=args.max_steps_per_epoch,
        tta=args.tta,
        decision=args.decision,
        refit=args.refit,
        pretrain_objective=args.pretrain_objective,
    )
    weights = "none"
    if args.pretrain_epochs > 0 and not args.pretrain_per_run:
        result["pretrain"] = pretrain(
            base, work, args.pretrain_epochs, args.pretrain_cap, batch_size=args.pretrain_batch_size
        )
        weights = result["pretrain"]["weights"]
        print(json.dumps(result["pretrain"]), flush=True)
        save()
    result["runs"] = []
    for i, spec in enumerate(args.runs):
        head, _, extra = spec.partition(":")
        # "weights=none" runs a spec from scratch although --pretrain-epochs made a backbone.
        overrides = {
            k: v if k == "weights" else type(getattr(args, k))(v)
            for k, v in (kv.split("=") for kv in extra.split(",") if kv)
        }
        if i > 0 and time.perf_counter() - t0 > args.budget_s:
            result["runs"].append({"run": spec, "skipped": "time budget"})
            break
        mdir = (out if args.keep_models else work) / f"model_{i}_{head}"
        run_base = dataclasses.replace(base, out_dir=mdir, head=head, weights=weights)
        cfg = apply_params(overrides, run_base, source=f"--runs {spec!r}")
        stage = None
        if args.pretrain_epochs > 0 and args.pretrain_per_run and overrides.get("weights") != "none":
            # A backbone of its own, pretrained with the run's seed: members of an ensemble that do
            # not share one (members that do made the same mistakes: train_gpu_ensemble.json).
            stage = pretrain(
                cfg,
                work,
                args.pretrain_epochs,
                args.pretrain_cap,
                stage_dir=work / f"stage_{i}",
                batch_size=args.pretrain_batch_size,
            )
            cfg = dataclasses.replace(cfg, weights=stage["weights"])
        run = run_one(spec, cfg, overrides)
        if stage is not None:
            run["pretrain"] = stage
        result["runs"].append(run)
        save()
    done = [r for r in result["runs"] if "val" in r]
    if args.ensemble and len(done) >= 2:
        try:
            result["ensemble"] = ensemble(done, work, args)
            done.append(result["ensemble"])
        except Exception as e:
            LOG.exception("ensemble failed")
            result["ensemble"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    plain = [r for r in done if "model_dir" in r]
    if args.distill and plain:
        # One more ResNet18 taught by the runs of the best head (their mean output on the same
        # augmented images): an ensemble's accuracy at one model's serving cost, if it transfers.
        head = max(plain, key=val_rank)["head"]
        teachers = [r for r in plain if r["head"] == head]
        name = f"student of {len(teachers)} {head} runs"
        if time.perf_counter() - t0 > args.distill_budget_s:
            result["distilled"] = {
                "run": name,
                "skipped": f"time budget: {args.distill_budget_s:.0f} s had passed",
            }
        else:
            cfg = dataclasses.replace(
                base,
                out_dir=(out if args.keep_models else work) / "model_student",
                head=head,
                weights=weights,
                image_size=teachers[0]["image_size"],
                teacher=tuple(r["model_dir"] for r in teachers),
                distill_weight=args.distill_weight,
                seed=args.seed + 100,
            )
            result["distilled"] = run_one(name, cfg, {"teachers": [r["run"] for r in teachers]})
            if "val" in result["distilled"]:
                done.append(result["distilled"])
        save()
    paired = paired_test(done)
    if paired:
        result["paired_test"] = paired
    if done:
        result["selected"] = select_on_val([(r["run"], r) for r in done], "run")
    save()
    return result


def paired_test(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished run (and the ensemble, the student) against the first on the same test images,
    paired (:func:`components.evaluate.paired_difference`), from the predictions their test
    evaluation wrote: whether a lever's gain is more than which images the split drew."""
    from components.evaluate import load_predictions, paired_difference

    scored = [r for r in records if r.get("test_predictions") and Path(r["test_predictions"]).is_file()]
    if len(scored) < 2:
        return []
    ids, true, base = load_predictions(scored[0]["test_predictions"])
    out = []
    for r in scored[1:]:
        other_ids, _, pred = load_predictions(r["test_predictions"])
        if other_ids != ids:
            LOG.warning("%s was tested on other images than %s: not paired", r["run"], scored[0]["run"])
            continue
        out.append({"run": r["run"], "vs": scored[0]["run"], **paired_difference(true, base, pred)})
    return out


def run_one(name: str, cfg: TrainConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one accuracy run; its figures for the result file, or the error (the others go on)."""
    from components.evaluate import PREDICTIONS_CSV
    from components.training.stages import train

    t1 = time.perf_counter()
    try:
        res = train(cfg)
    except Exception as e:
        LOG.exception("run %s failed", name)
        return {"run": name, "error": f"{type(e).__name__}: {e}"}
    m = res.metrics
    run = {
        "model_dir": str(cfg.out_dir),
        "run": name,
        "head": cfg.head,
        "image_size": cfg.image_size,
        "overrides": overrides,
        "weights": cfg.weights,
        "seconds": time.perf_counter() - t1,
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "train_images_per_s_median_epoch": m["train_images_per_s"],
        "val": {k: m["val"][k] for k in ("accuracy", "rmse", "mae", "rmse_expected", "n")},
        "test": m["test"],  # components.train's test figures (through the ONNX model), as kept there
        "test_predictions": str(Path(cfg.out_dir) / "test_eval" / PREDICTIONS_CSV),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in res.history],
        "decision": m.get("decision", {"rule": "plain"}),
    }
    if "refit" in m:  # test is the refit's; refit.test_selected the val-selected model's
        run["refit"] = m["refit"]
    shown = ("run", "seconds", "best_epoch", "val", "test", "decision", "refit")
    print(json.dumps({k: run[k] for k in shown if k in run}), flush=True)
    return run


def ensemble(runs: list[dict[str, Any]], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Average the runs of the best run's head (and the 4 flips) in one exported graph; score via ONNX."""
    import torch

    from components.evaluate import PREDICTIONS_CSV, evaluate
    from components.model import build_model, export_onnx
    from components.modelspec import ModelSpec, load_model_spec
    from components.training.loop import AverageModel

    head = max(runs, key=val_rank)["head"]
    members = [r for r in runs if r["head"] == head]
    spec = load_model_spec(members[0]["model_dir"])
    models = []
    for r in members:
        m = build_model(len(spec.classes), head)
        m.load_state_dict(torch.load(Path(r["model_dir"]) / "model.pt", weights_only=True))
        models.append(m.eval())
    out = work / "model_ensemble"
    t0 = time.perf_counter()
    graph = AverageModel(models, flips=True).eval()
    offsets, decision = None, {"rule": "plain"}
    if args.decision == "fitted":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        offsets, rules = compare_rules(
            graph.to(dev), spec, work / "val.csv", work / "test.csv", work / "data", work / "cache", dev
        )
        decision = {"rule": "fitted", **rules}
    export_onnx(graph, head, spec.classes, spec.preprocess.image_size, out / "model.onnx", offsets=offsets)
    ModelSpec(
        classes=spec.classes,
        head=head,
        preprocess=spec.preprocess,
        training_data_sha256=spec.training_data_sha256,
        params={"ensemble_of": [r["run"] for r in members], "tta": True, "decision": args.decision},
        decision_offsets=None if offsets is None else tuple(offsets),
    ).save(out)
    val = evaluate(out, work / "val.csv", out / "val_eval", data_root=work / "data", progress=False)
    test = evaluate(out, work / "test.csv", out / "test_eval", data_root=work / "data", progress=False)
    keys = ("accuracy", "rmse", "mae", "n")
    res = {
        "run": f"ensemble of {len(members)} {head} runs + 4 flips",
        "members": [r["run"] for r in members],
        "head": head,
        "seconds": time.perf_counter() - t0,
        "val": {k: val[k] for k in keys},
        "test": {k: test[k] for k in (*keys, "per_class_accuracy", "confusion_matrix")},
        "test_predictions": str(out / "test_eval" / PREDICTIONS_CSV),
        "decision": decision,
    }
    print(json.dumps(res), flush=True)
    return res


def raw_outputs(
    graph: Any, preprocess: Any, csv: Path, data_root: Path | None, cache_dir: Path | None, device: str
) -> tuple[Any, np.ndarray]:
    """``graph``'s raw head outputs (float32, on the CPU) and the true counts of ``csv``'s images."""
    import torch

    from components.data import build_cache, normalize_batch
    from components.manifest import load_labelled

    rows, paths = load_labelled(csv, data_root)
    cache = build_cache(rows, paths, preprocess.image_size, cache_dir, progress=False)
    raws = []
    with torch.no_grad():
        for start in range(0, len(cache), 128):
            x = torch.from_numpy(np.array(cache.images[start : start + 128])).to(device)
            raws.append(graph(normalize_batch(x, preprocess)).float().cpu())
    return torch.cat(raws), np.asarray(cache.counts)


def compare_rules(
    graph: Any, spec: Any, val: Path, test: Path, data_root: Path | None, cache_dir: Path | None, device: str
) -> tuple[list[float], dict[str, Any]]:
    """Offsets fitted on ``val`` for ``graph`` (a model or an average of models) for accuracy
    (``fitted``) and for RMSE (``fitted_rmse``), the three rules' figures on val and test, and each
    fitted rule against the plain one on test, paired (``test_paired``)."""
    import torch

    from components.evaluate import count_metrics, paired_difference
    from components.model import decode_outputs, fit_decision_offsets

    c0, num_classes = spec.classes[0], len(spec.classes)
    outputs = {s: raw_outputs(graph, spec.preprocess, csv, data_root, cache_dir, device) for s, csv in
               (("val", val), ("test", test))}  # fmt: skip
    raw_val, y_val = outputs["val"]
    target = torch.as_tensor(y_val) - c0
    offsets = fit_decision_offsets(raw_val, target, spec.head, num_classes)
    for_rmse = fit_decision_offsets(raw_val, target, spec.head, num_classes, objective="rmse")
    rec: dict[str, Any] = {
        "offsets": [round(float(o), 4) for o in offsets],
        "offsets_rmse": [round(float(o), 4) for o in for_rmse],
    }
    test_counts: dict[str, np.ndarray] = {}
    for rule, o in (("plain", None), ("fitted", offsets), ("fitted_rmse", for_rmse)):
        for split, (raw, y) in outputs.items():
            idx = decode_outputs(raw, spec.head, num_classes, o)[1].numpy() + c0
            m = count_metrics(y, idx, spec.classes, intervals=split == "test")
            keys = ("accuracy", "rmse", "mae", "n", "per_class_accuracy", "intervals")
            rec[f"{split}_{rule}"] = {k: m[k] for k in keys if k in m}
            if split == "test":
                test_counts[rule] = idx
    y_test = outputs["test"][1]
    rec["test_paired"] = {
        rule: paired_difference(y_test, test_counts["plain"], test_counts[rule])
        for rule in ("fitted", "fitted_rmse")
    }
    return rec["offsets"], rec


def decision_run(args: argparse.Namespace) -> dict[str, Any]:
    """Plain vs fitted count rule of trained models: offsets fitted on val, both rules scored on val
    and test. Runs on the model.pt of any ``components.train`` output, so a model trained before
    ``--decision`` existed can be measured without training again."""
    import torch

    from components.model import build_model
    from components.modelspec import load_model_spec
    from components.training.loop import AverageModel

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rf = ResultFile(args, "train_decision")
    rf.data["models"] = []
    for model_dir in args.model:
        spec = load_model_spec(model_dir)
        net = build_model(len(spec.classes), spec.head)
        net.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
        tta = bool(spec.params.get("tta"))
        graph = (AverageModel([net], flips=True) if tta else net).eval().to(dev)
        _, rules = compare_rules(graph, spec, args.val, args.test, args.data_root, args.cache_dir, dev)
        rec = {"model": str(model_dir), "head": spec.head, "tta": tta, "train_params": spec.params}
        rf.data["models"].append({**rec, **rules})
        print(f"{model_dir}: offsets {rules['offsets']} (for RMSE: {rules['offsets_rmse']})")
        for rule in ("plain", "fitted", "fitted_rmse"):
            v, t = rules[f"val_{rule}"], rules[f"test_{rule}"]
            print(
                f"  {rule:11} val acc {v['accuracy']:.4f} RMSE {v['rmse']:.4f}"
                f" | test acc {t['accuracy']:.4f} RMSE {t['rmse']:.4f}",
                flush=True,
            )
        for rule, d in rules["test_paired"].items():
            acc, rmse = (_signed(d[f"{k}_diff"], d[f"{k}_diff_interval"]) for k in ("accuracy", "rmse"))
            print(f"  {rule} - plain on test: accuracy {acc}, RMSE {rmse}, McNemar p {d['mcnemar_p']:.3g}")
        rf.save()
    return rf.data


def answers_line(cal: dict[str, Any], answered: dict[str, Any]) -> str:
    """One line of a model's test answers: calibration, count sets, abstention (None: not fitted)."""

    def f(value: Any, fmt: str = ".3f") -> str:
        return "-" if value is None else format(value, fmt)

    low, high = answered.get("set_coverage_interval") or (None, None)
    return (
        f"ECE {f(cal.get('ece_before'))} -> {f(cal.get('ece_after'))}; count_set coverage "
        f"{f(answered.get('set_coverage'))} ({f(low)}-{f(high)}, target {answered.get('coverage_target')}), "
        f"mean size {f(answered.get('mean_set_size'), '.2f')}; accuracy at 50% coverage "
        f"{f(answered.get('accuracy_at_50'))}; review share {f(answered.get('needs_review_share'))}, "
        f"accepted accuracy {f(answered.get('accepted_accuracy'))}"
    )


def collect_run(args: argparse.Namespace) -> dict[str, Any]:
    """The figures of models trained by ``components.train`` itself (their ``metrics.json`` and
    ``model.json``: every setting, the device, the time), kept like any other result: for runs this
    script does not drive, such as a ``--refit`` run on a CPU."""
    from components.common import ConfigError, read_json
    from components.modelspec import load_model_spec

    rf = ResultFile(args, "train_collect")
    rf.data["models"] = []
    keys = ("accuracy", "rmse", "mae", "rmse_expected", "n", "per_class_accuracy")
    for model_dir in args.model:
        try:
            spec = load_model_spec(model_dir)
            m = read_json(Path(model_dir) / "metrics.json")
        except ConfigError as e:
            raise SystemExit(f"error: {model_dir} is not a components.train output: {e}") from e
        rec: dict[str, Any] = {
            "model": str(model_dir),
            "train_params": spec.params,
            "device": m.get("device"),
            "train_seconds": m.get("train_seconds"),
            "best_epoch": m.get("best_epoch"),
            "epochs_run": m.get("epochs_run"),
            "val": {k: m["val"][k] for k in keys if k in m["val"]},
        }
        if "test" in m:
            rec["test"] = {k: m["test"][k] for k in keys if k in m["test"]}
        rec |= {
            k: m[k]
            for k in ("decision", "pretrain", "refit", "calibration", "answers", "n_calibration")
            if k in m
        }
        rec["answer_spec"] = spec.answers.to_dict()
        rf.data["models"].append(rec)
        test_acc = rec.get("test", {}).get("accuracy", float("nan"))
        print(f"{model_dir}: val acc {rec['val']['accuracy']:.4f} | test acc {test_acc:.4f}")
        answered = (m.get("answers") or {}).get("test")
        if answered:  # the answers a robot gets, scored on test
            print("  " + answers_line(m["calibration"]["test"], answered))
    rf.save()
    return rf.data


def answers_run(args: argparse.Namespace) -> dict[str, Any]:
    """A trained model's answer thresholds fitted again, by today's rules, on its own calibration part
    (the same images training held out) and scored on test beside the thresholds it was exported with:
    how a change of rule (e.g. the review threshold's) moves coverage, review share and the accuracy of
    the accepted answers, without training again. Runs the exported ONNX graph; any machine."""
    from components.answers import fit_answer_spec
    from components.evaluate import answer_metrics, predict_onnx
    from components.manifest import load_labelled
    from components.modelspec import load_model_spec
    from components.training.splits import CALIBRATION_SEED, calibration_split

    rf = ResultFile(args, "train_answers")
    rf.data["models"] = []
    for model_dir in args.model:
        spec = load_model_spec(model_dir)
        rows, paths = load_labelled(args.val, args.data_root)
        _, _, cal_rows, cal_paths = calibration_split(
            rows, paths, spec.params["calib_frac"], CALIBRATION_SEED
        )
        cal = predict_onnx(model_dir, cal_paths, int8="off", num_threads=args.threads, progress=False)
        test_rows, test_paths = load_labelled(args.test, args.data_root)
        test = predict_onnx(model_dir, test_paths, int8="off", num_threads=args.threads, progress=False)
        y = np.asarray([r.count for r in test_rows])
        rec = {
            "model": str(model_dir),
            "calibration_images": len(cal_rows),
            "exported": {
                "spec": spec.answers.to_dict(),
                "test": answer_metrics(test, y, spec.classes, spec.answers),
            },
        }
        for target in args.review_accuracy or [spec.answers.review_accuracy or 0.8]:
            refit = fit_answer_spec(
                cal["probabilities"], cal["count"], cal["expected"], np.asarray([r.count for r in cal_rows]),
                spec.classes, temperature=spec.answers.temperature, distribution=spec.answers.distribution,
                coverage=spec.answers.coverage or 0.9, review_accuracy=target,
            )  # fmt: skip
            rec[f"refit_{target:g}"] = {
                "spec": refit.to_dict(),
                "test": answer_metrics(test, y, spec.classes, refit),
            }
        rf.data["models"].append(rec)
        for name in [k for k in rec if k == "exported" or k.startswith("refit_")]:
            t, threshold = rec[name]["test"], rec[name]["spec"]["review_threshold"]
            print(
                f"{model_dir} {name}: review threshold {threshold:.3f}, review share "
                f"{t['needs_review_share']:.3f}, accepted accuracy {t['accepted_accuracy']}, "
                f"count_set coverage {t['set_coverage']:.3f}"
            )
        rf.save()
    return rf.data


def compare_run(args: argparse.Namespace) -> dict[str, Any]:
    """Trained models side by side on the same manifests, each against the first: their served
    (ONNX) figures with bootstrap intervals, and the paired difference (interval and McNemar's p).

    Runs the exported graphs through the serving preprocessing, so a model's flips or fitted count rule
    count as they do when served. No training; any machine."""
    from components.common import ConfigError, format_table
    from components.evaluate import count_metrics, paired_difference, predict_onnx, range_text
    from components.manifest import load_labelled
    from components.modelspec import load_model_spec

    try:
        classes = {load_model_spec(m).classes for m in args.model}
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from e
    if len(classes) != 1:
        raise SystemExit(
            f"error: the models count different classes {sorted(classes)}; compare like with like"
        )
    rf = ResultFile(args, "train_compare")
    rf.data["models"] = [str(m) for m in args.model]
    rf.data["splits"] = {}
    keys = ("n", "accuracy", "rmse", "mae", "intervals")
    for split, manifest in (("val", args.val), ("test", args.test)):
        if manifest is None:
            continue
        rows, paths = load_labelled(manifest, args.data_root)
        true = np.asarray([r.count for r in rows])
        preds = [
            predict_onnx(m, paths, num_threads=args.threads, progress=False)["count"] for m in args.model
        ]
        figures = []
        for pred in preds:
            m = count_metrics(true, pred, next(iter(classes)), intervals=True)
            figures.append({k: m[k] for k in keys})
        diffs = [paired_difference(true, preds[0], pred) for pred in preds[1:]]
        rf.data["splits"][split] = {"manifest": str(manifest), "figures": figures, "vs_first": diffs}
        rf.save()
        table = [
            [
                str(model),
                f"{f['accuracy']:.4f}",
                range_text(f["intervals"]["accuracy"], 3),
                f"{f['rmse']:.4f}",
            ]
            + (
                ["", "", ""]
                if d is None
                else [
                    _signed(d["accuracy_diff"], d["accuracy_diff_interval"]),
                    _signed(d["rmse_diff"], d["rmse_diff_interval"]),
                    f"{d['mcnemar_p']:.3f}",
                ]
            )
            for model, f, d in zip(args.model, figures, [None, *diffs], strict=True)
        ]
        print(f"{split} ({len(rows)} images)")
        print(
            format_table(
                table,
                ["model", "accuracy", "95% interval", "rmse", "acc - first", "rmse - first", "McNemar p"],
            )
        )
    return rf.data


def _signed(value: float, interval: list[float]) -> str:
    """``+0.0308 (-0.0035 to +0.0628)``: a difference and its interval."""
    from components.evaluate import difference_text

    return difference_text(value, interval)


def _ranged(value: float, interval: list[float]) -> str:
    """``0.4372 (0.4030-0.4703)``: a figure and its interval."""
    from components.evaluate import range_text

    return f"{value:.4f} ({range_text(interval)})"


def intervals_run(args: argparse.Namespace) -> dict[str, Any]:
    """Bootstrap intervals for every figure block with a confusion matrix in earlier result files:
    how far each recorded accuracy and RMSE could move on another draw of as many test images."""
    from components.evaluate import bootstrap_intervals

    rf = ResultFile(args, "train_intervals")
    rf.data["blocks"] = []

    def walk(node: Any, where: str, source: str) -> None:
        if isinstance(node, dict):
            if "confusion_matrix" in node and "accuracy" in node:
                labels = node.get("labels") or args.classes
                iv = bootstrap_intervals(node["confusion_matrix"], labels)
                rf.data["blocks"].append(
                    {
                        "file": source,
                        "where": where or "/",
                        "accuracy": node["accuracy"],
                        "rmse": node.get("rmse"),
                        "n": int(np.asarray(node["confusion_matrix"]).sum()),
                        "intervals": iv,
                    }
                )
                rmse = "" if node.get("rmse") is None else f", RMSE {_ranged(node['rmse'], iv['rmse'])}"
                print(f"{source}{where}: accuracy {_ranged(node['accuracy'], iv['accuracy'])}{rmse}")
            for k, v in node.items():
                walk(v, f"{where}/{k}", source)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}", source)

    for path in args.result:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {path} as JSON: {e}") from e
        walk(data, "", Path(path).name)
    if not rf.data["blocks"]:
        raise SystemExit(
            "error: no block with a confusion matrix and an accuracy in " + ", ".join(map(str, args.result))
        )
    rf.save()
    return rf.data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    pk = sub.add_parser("pack")
    pk.add_argument("--out", type=Path, default=REPO / ".gpu" / "abid_224_q90.npz")
    pk.add_argument("--image-size", type=int, default=224)
    pk.add_argument("--quality", type=int, default=90)
    pk.add_argument(
        "--all-counts", action="store_true", help="also the 0 and 6+ images (for --pretrain-epochs)"
    )
    c = sub.add_parser("cpu")
    c.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="one run per thread count")
    c.add_argument("--out", type=Path, default=RESULTS / "train_cpu.json")
    c.add_argument("--image-size", type=int, default=224)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--steps", type=int, default=5)
    g = sub.add_parser("gpu")
    g.add_argument("--pack", type=Path, default=REPO / ".gpu" / "abid_224_q90.npz")
    g.add_argument("--out", type=Path, default=RESULTS)
    g.add_argument("--result-name", default="train_gpu.json")
    g.add_argument("--work", type=Path, default=Path("/tmp/bench_train"))
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--bench-size", type=int, default=224)
    g.add_argument("--bench-batch", type=int, nargs="*", default=[256, 512])
    g.add_argument("--bench-steps", type=int, default=60)
    g.add_argument("--bench-warmup", type=int, default=15)
    g.add_argument("--compile-bench", action="store_true")
    g.add_argument(
        "--compile-below", type=float, default=10000, help="also time torch.compile if eager is slower"
    )
    g.add_argument("--runs", nargs="+", default=["ordinal"], help="HEAD[:key=value,...] per accuracy run")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--epochs", type=int, default=150)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.2)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--ema", type=float, default=0.998)
    g.add_argument("--aug-strength", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=20)
    g.add_argument("--max-steps-per-epoch", type=int, default=None)
    g.add_argument("--budget-s", type=float, default=300, help="start no further run after this many seconds")
    g.add_argument("--keep-models", action="store_true")
    g.add_argument("--tta", action="store_true", help="flip averaging in each run's exported graph")
    g.add_argument(
        "--decision",
        choices=["plain", "fitted"],
        default="plain",
        help="fitted: each run's count rule fitted on val (its plain figures are recorded beside)",
    )
    g.add_argument("--ensemble", action="store_true", help="also score the average of the runs (one graph)")
    g.add_argument("--distill", action="store_true", help="then train one model taught by the runs")
    g.add_argument("--distill-weight", type=float, default=0.5, help="share of the student's loss from them")
    g.add_argument(
        "--distill-budget-s", type=float, default=420, help="skip the student after this many seconds"
    )
    g.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="first train on every count (train split + the 0/6+ images of an --all-counts pack)",
    )
    g.add_argument("--pretrain-cap", type=int, default=10, help="counts above this are this in pretraining")
    g.add_argument(
        "--pretrain-objective",
        choices=("counts", "contrastive"),
        default="counts",
        help="the stage's objective: counts 0..cap, or contrastive (SimCLR on the same images, no labels)",
    )
    g.add_argument(
        "--pretrain-batch-size",
        type=int,
        default=0,
        help="the stage's batch size (0 = the runs'); contrastive learning gains from more negatives",
    )
    g.add_argument(
        "--pretrain-per-run",
        action="store_true",
        help="a stage per run, with the run's seed (ensemble members that share no backbone)",
    )
    g.add_argument(
        "--refit",
        action="store_true",
        help="each run also refit on train + val up to its val-chosen epoch (components.train --refit): "
        "the refit is tested, the val-selected model's test figures are kept beside",
    )
    dc = sub.add_parser("decision", help="plain vs val-fitted count rule of trained models, on val and test")
    dc.add_argument("--model", type=Path, nargs="+", required=True, help="components.train output dirs")
    dc.add_argument("--val", type=Path, required=True, help="the manifest the rule is fitted on")
    dc.add_argument("--test", type=Path, required=True, help="scored only")
    dc.add_argument("--data-root", type=Path, default=None)
    dc.add_argument("--cache-dir", type=Path, default=None)
    dc.add_argument("--threads", type=int, default=None)
    dc.add_argument("--out", type=Path, default=RESULTS)
    dc.add_argument("--result-name", default="train_decision.json")
    an = sub.add_parser("answers", help="a trained model's answer thresholds refit by today's rules, on test")
    an.add_argument("--model", type=Path, nargs="+", required=True, help="components.train output dirs")
    an.add_argument(
        "--val", type=Path, required=True, help="the validation manifest the model was trained with"
    )
    an.add_argument("--test", type=Path, required=True, help="scored only")
    an.add_argument("--data-root", type=Path, default=None)
    an.add_argument("--threads", type=int, default=None)
    an.add_argument(
        "--review-accuracy",
        type=float,
        nargs="+",
        default=None,
        help="targets to refit the review threshold for",
    )
    an.add_argument("--out", type=Path, default=RESULTS)
    an.add_argument("--result-name", default="train_answers.json")
    co = sub.add_parser("collect", help="the figures of models components.train trained, into one result")
    co.add_argument("--model", type=Path, nargs="+", required=True, help="components.train output dirs")
    co.add_argument("--out", type=Path, default=RESULTS)
    co.add_argument("--result-name", default="train_collect.json")
    cp = sub.add_parser(
        "compare", help="trained models' served figures on the same images, paired against the first"
    )
    cp.add_argument("--model", type=Path, nargs="+", required=True, help="exported model dirs (model.json)")
    cp.add_argument("--val", type=Path, default=None)
    cp.add_argument("--test", type=Path, required=True)
    cp.add_argument("--data-root", type=Path, default=None)
    cp.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    cp.add_argument("--out", type=Path, default=RESULTS)
    cp.add_argument("--result-name", default="train_compare.json")
    iv = sub.add_parser("intervals", help="bootstrap intervals of the figures in earlier result files")
    iv.add_argument("result", type=Path, nargs="+", help="bench/results/*.json files")
    iv.add_argument(
        "--classes",
        type=lambda v: [int(c) for c in v.split(",")],
        default=[1, 2, 3, 4, 5],
        help="the counts of a matrix's rows when its block does not list them (default 1,2,3,4,5)",
    )
    iv.add_argument("--out", type=Path, default=RESULTS)
    iv.add_argument("--result-name", default="train_intervals.json")
    t = sub.add_parser("tune", help="timed Optuna tune + final fit with the best parameters")
    t.add_argument("--pack", type=Path, default=REPO / ".gpu" / "abid_224_q90.npz")
    t.add_argument("--out", type=Path, default=RESULTS)
    t.add_argument("--result-name", default="train_gpu_tune.json")
    t.add_argument("--work", type=Path, default=Path("/tmp/bench_tune"))
    t.add_argument("--limit", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--trials", type=int, default=20)
    t.add_argument("--trial-epochs", type=int, default=15)
    t.add_argument("--final-epochs", type=int, default=150)
    t.add_argument("--image-sizes", type=int, nargs="+", default=[160, 224])
    t.add_argument("--heads", nargs="+", default=["classification", "ordinal", "regression"])
    t.add_argument("--pruner", default="hyperband", choices=["median", "hyperband", "none"])
    t.add_argument(
        "--tune-timeout", type=float, default=None, help="start no trial after S seconds (then the final fit)"
    )
    t.add_argument("--ema", type=float, default=0.998)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--max-steps-per-epoch", type=int, default=None)
    t.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="then the tuned fit again from a backbone pretrained on every count (--all-counts pack)",
    )
    t.add_argument("--pretrain-cap", type=int, default=10, help="counts above this are this in pretraining")
    t.add_argument(
        "--pretrain-first",
        action="store_true",
        help="the pipeline's order: pretrain (timed too), then the trials and the fit from its backbone",
    )
    t.add_argument(
        "--budget-s", type=float, default=420, help="skip the pretrained fit after this many seconds"
    )
    t.add_argument(
        "--decision",
        choices=["plain", "fitted"],
        default="plain",
        help="the fits' count rule (trials score the plain rule); fitted records the plain figures too",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "pack":
        print(json.dumps(pack(args.out, args.image_size, args.quality, all_counts=args.all_counts)))
    elif args.cmd == "tune":
        r = tune_run(args)
        return 0 if "val" in r["final_fit"] else 1
    elif args.cmd == "decision":
        decision_run(args)
    elif args.cmd == "collect":
        collect_run(args)
    elif args.cmd == "answers":
        answers_run(args)
    elif args.cmd == "compare":
        if len(args.model) < 2:
            p.error("--model needs at least two model directories to compare")
        compare_run(args)
    elif args.cmd == "intervals":
        intervals_run(args)
    elif args.cmd == "gpu":
        if args.pretrain_batch_size < 0:
            p.error("--pretrain-batch-size must be >= 0 (0 = the runs' batch size)")
        if args.refit and (args.ensemble or args.distill):
            # refit members were trained on val: it can neither fit their average's rule nor rank them
            p.error("--refit cannot be combined with --ensemble or --distill (both are scored on val)")
        r = gpu_run(args)
        print(json.dumps(r.get("selected", {})))
    else:
        r = cpu_bench(
            getattr(args, "threads", [1, 2]),
            getattr(args, "image_size", 224),
            getattr(args, "batch_size", 32),
            getattr(args, "steps", 5),
            out=getattr(args, "out", RESULTS / "train_cpu.json"),
        )
        print(json.dumps(r["best"]))
        import torch

        if torch.cuda.is_available() and args.cmd is None:
            return main(["gpu"]) or main(["tune"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
