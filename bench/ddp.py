"""Distributed data-parallel training on CPU: 1 process against 2 gloo processes (torchrun), same fit.

``python bench/ddp.py [--split /tmp/cal/split --data-root /tmp/cal/data] [--limit 384] [--epochs 4]``

Trains the same fit (``--limit`` images of each manifest, from scratch, ``--epochs`` epochs, the same global
``--batch-size``) three ways with ``components.train``: 1 process on 1 thread, 1 process on 2 threads, and
``torchrun --nproc_per_node 2`` (gloo) on 1 thread each. Records the training speed (images/s of the steady
epochs, rank 0's clock over global batches, validation not counted) and wall time of each, and how far the
2-process results are from the 1-process ones: exported weights (max |difference|) and val figures. The
1-thread and 2-thread single-process runs differ by float rounding alone; their distance is the yardstick for
the 2-process run's. Writes ``bench/results/ddp_cpu.json``; a few minutes at the defaults on 2 cores.

Without a split, one is made from ``../shared/abid`` (``components.ingest`` then ``components.split``) under
``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.common import atomic_write_json  # noqa: E402

#: name -> (processes, threads per process)
RUNS = {"1proc_1thread": (1, 1), "1proc_2threads": (1, 2), "2proc_1thread": (2, 1)}


def _split(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--split`` and its data root, or a split of the shared ABID sample made under ``--work``."""
    if args.split is not None:
        return args.split, args.data_root
    data, split = args.work / "data", args.work / "split"
    if not (split / "train.csv").is_file():
        abid = REPO.parent / "shared" / "abid"
        py = sys.executable
        subprocess.run(
            [py, "-m", "components.ingest", "--source", str(abid), "--out", str(data), "--per-class", "150"],
            cwd=REPO,
            check=True,
        )
        subprocess.run(
            [py, "-m", "components.split", "--manifest", str(data / "manifest.csv"), "--out", str(split)],
            cwd=REPO,
            check=True,
        )
    return split, data


def _train(name: str, args: argparse.Namespace, split: Path, data_root: Path) -> dict[str, Any]:
    procs, threads = RUNS[name]
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    flags = [
        *(
            "--train",
            str(split / "train.csv"),
            "--val",
            str(split / "val.csv"),
            "--data-root",
            str(data_root),
        ),
        *("--out", str(out), "--image-size", str(args.image_size), "--epochs", str(args.epochs)),
        *("--batch-size", str(args.batch_size), "--lr", str(args.lr), "--limit", str(args.limit)),
        *("--device", "cpu", "--num-threads", str(threads), "--cache-dir", str(args.work / "cache")),
        *("--seed", "0", "--no-progress", "--log-level", "WARNING"),
    ]
    cmd = [sys.executable, "-m", "components.train", *flags]
    if procs > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        cmd = [sys.executable, *launch, "-m", "components.train", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    print(f"{name}: {metrics['train_images_per_s']:.1f} images/s, {wall:.0f} s", flush=True)
    return {
        "name": name,
        "processes": procs,
        "threads_per_process": threads,
        "world_size": metrics["world_size"],
        "images_per_s": metrics["train_images_per_s"],  # median over the epochs after the first
        "epoch_images_per_s": [h["train_images_per_s"] for h in history],
        "wall_s": wall,
        "best_epoch": metrics["best_epoch"],
        "n_train": metrics["n_train"],
        "val": {k: metrics["val"][k] for k in ("accuracy", "rmse", "mae", "loss")},
        "history": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy")} for h in history],
        "model_dir": str(out),
    }


def _distance(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far run ``b`` ended from run ``a``: exported weights (learnt parameters, and BatchNorm's running
    statistics apart), each tensor's max |difference| also relative to its own max |value|; val figures;
    per-epoch losses."""
    import torch

    wa = torch.load(Path(a["model_dir"]) / "model.pt", weights_only=True)
    wb = torch.load(Path(b["model_dir"]) / "model.pt", weights_only=True)
    out: dict[str, Any] = {"runs": f"{b['name']} vs {a['name']}"}
    for kind, keys in (
        ("params", [k for k in wa if wa[k].is_floating_point() and "running_" not in k]),
        ("bn_running_stats", [k for k in wa if "running_" in k]),
    ):
        diff = {k: (wa[k].double() - wb[k].double()).abs().max().item() for k in keys}
        rel = {k: diff[k] / max(wa[k].double().abs().max().item(), 1e-12) for k in keys}
        worst = max(rel, key=lambda k: rel[k])
        out[kind] = {"max_abs_diff": max(diff.values()), "max_rel_diff": rel[worst], "worst_tensor": worst}
    out.update(
        {
            "val_accuracy_diff": b["val"]["accuracy"] - a["val"]["accuracy"],
            "val_rmse_diff": b["val"]["rmse"] - a["val"]["rmse"],
            "val_loss_rel_diff": (b["val"]["loss"] - a["val"]["loss"]) / a["val"]["loss"],
            "train_loss_rel_diff_per_epoch": [
                (y["train_loss"] - x["train_loss"]) / x["train_loss"]
                for x, y in zip(a["history"], b["history"], strict=True)
            ],
            "same_best_epoch": a["best_epoch"] == b["best_epoch"],
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", type=Path, default=Path("/tmp/cal/split"), help="dir with train.csv, val.csv")
    p.add_argument("--data-root", type=Path, default=Path("/tmp/cal/data"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_ddp"))
    p.add_argument("--limit", type=int, default=384, help="images per manifest")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--note", default="", help="recorded as is (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ddp_cpu.json")
    args = p.parse_args(argv)
    if args.split is not None and not (args.split / "train.csv").is_file():
        print(f"no {args.split}/train.csv: making a split of ../shared/abid under {args.work}", flush=True)
        args.split = None
    args.work.mkdir(parents=True, exist_ok=True)
    split, data_root = _split(args)
    load_before = os.getloadavg()[0]
    runs = {name: _train(name, args, split, data_root) for name in RUNS}
    import torch

    one, two, threaded = runs["1proc_1thread"], runs["2proc_1thread"], runs["1proc_2threads"]
    result = {
        "benchmark": "ddp_cpu",
        "command": "python bench/ddp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "split": str(split),
            "data_root": str(data_root),
            "images_per_manifest": args.limit,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "global_batch_size": args.batch_size,
            "lr": args.lr,
            "weights": "none",
            "backend": "gloo",
        },
        "env": {
            "cpu_count": os.cpu_count(),
            "load_average_1m": load_before,
            "load_average_1m_after": os.getloadavg()[0],
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "note": args.note,
        },
        "runs": list(runs.values()),
        "speedup_2proc_vs_1proc_1thread": two["images_per_s"] / one["images_per_s"],
        "speedup_2proc_vs_1proc_2threads": two["images_per_s"] / threaded["images_per_s"],
        "differences": [_distance(one, two), _distance(one, threaded)],
    }
    atomic_write_json(args.out, result)
    for d in result["differences"]:
        print(
            f"{d['runs']}: parameters max |diff| {d['params']['max_abs_diff']:.2e} (relative "
            f"{d['params']['max_rel_diff']:.2%}, {d['params']['worst_tensor']}), "
            f"val accuracy {d['val_accuracy_diff']:+.4f}, val loss {d['val_loss_rel_diff']:+.2%}"
        )
    print(
        f"speedup of 2 processes: {result['speedup_2proc_vs_1proc_1thread']:.2f}x over 1 thread, "
        f"{result['speedup_2proc_vs_1proc_2threads']:.2f}x over 2 threads; written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
