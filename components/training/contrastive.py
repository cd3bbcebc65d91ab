"""Self-supervised (contrastive) pretraining of the ResNet18 backbone: ``--pretrain-objective contrastive``.

SimCLR: two random views of each image (:func:`components.data.contrastive_view`) go through the
backbone and a small projection MLP; the NT-Xent loss pulls each image's two views together and pushes
the batch's other images away. No label is used, so the stage may learn from every image, whatever its
count, including the ones the 1-5 task leaves out (empty bins, 6+ items). The fit then starts from the
backbone (:func:`components.model.build_model` with ``--weights PATH`` drops everything but it).

Progress is measured without labels touching the weights: after every epoch a k-nearest-neighbour
classifier on the backbone's features (the stage's 1-5 training images as references, val as queries)
gives ``knn_val_accuracy``, the usual monitor of self-supervised runs. The stage checkpoints every epoch
and resumes like a fit (same settings and data, else refused by name).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.common import ConfigError, read_json
from components.data import ImageSource, build_cache, contrastive_view, normalize_batch, open_images
from components.manifest import load_labelled
from components.model import build_model
from components.modelspec import STATE_DICT_FILE
from components.plots import save_contrastive_curves
from components.preprocess import PreprocessSpec
from components.training.checkpoint import (
    atomic_torch_save,
    check_resume,
    mark_finished,
    resume_checkpoint,
    run_fingerprint,
    start_run,
)
from components.training.config import CHECKPOINT_FILE, CURVES_PNG, DONE_FILE, TrainConfig, TrainResult
from components.training.loop import batch_plan, make_optimizer, make_scheduler, train_epochs
from components.training.splits import limited, load_split

LOG = logging.getLogger(__name__)
PROJECTION_DIM = 128
KNN_K = 20
KNN_TEMPERATURE = 0.07


class ContrastiveModel(nn.Module):
    """ResNet18 backbone (its ``fc`` removed) plus SimCLR's projection MLP; only the backbone is kept."""

    def __init__(self, weights: str | None = None, projection_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        backbone = build_model(2, "classification", weights)
        dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, projection_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: for each of the 2N views, cross-entropy of picking its partner among the other
    2N-1 by cosine similarity / ``temperature``."""
    n = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Accuracy of a weighted k-NN vote (weights ``exp(cos / T)``) on L2-normalized features.

    Labels are class indices ``0..num_classes-1``.
    """
    q = nn.functional.normalize(query.float(), dim=1)
    r = nn.functional.normalize(ref.float(), dim=1)
    sim, idx = (q @ r.T).topk(min(k, r.shape[0]), dim=1)
    votes = torch.zeros(q.shape[0], num_classes, device=q.device)
    votes.scatter_add_(1, ref_labels.to(q.device)[idx], torch.exp(sim / temperature))
    return float((votes.argmax(1) == query_labels.to(q.device)).float().mean().item())


@torch.no_grad()
def _features(
    backbone: nn.Module, images: ImageSource, index: torch.Tensor, spec: PreprocessSpec, cfg: TrainConfig
) -> torch.Tensor:
    backbone.eval()
    out = []
    device = images.device
    amp = cfg.amp and device.type == "cuda"
    channels_last = cfg.channels_last and device.type == "cuda"
    ebs = cfg.eval_batch_size
    for x_u8, _ in images.batches([index[s : s + ebs] for s in range(0, len(index), ebs)]):
        x = normalize_batch(x_u8, spec, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out.append(backbone(x).float())
    return torch.cat(out)


def _finished(out_dir: Path, fingerprint: dict[str, Any], t_start: float) -> TrainResult | None:
    done_path = out_dir / DONE_FILE
    if not (done_path.is_file() and (out_dir / STATE_DICT_FILE).is_file()):
        return None
    try:
        done = read_json(done_path)
    except ConfigError:
        return None
    if not isinstance(done, dict) or not done.get("finished") or "metrics" not in done:
        return None
    check_resume(done, fingerprint, done_path)
    LOG.info("%s already holds a finished contrastive stage; not retraining", out_dir)
    history = list(done.get("history", []))
    return TrainResult(
        out_dir, done["metrics"], len(history), len(history), False, history, time.perf_counter() - t_start
    )


def contrastive_pretrain(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg``'s backbone contrastively on every image of ``cfg.train_csv`` (labels unused) for
    ``cfg.epochs``; write its state dict to ``cfg.out_dir/model.pt``.

    ``cfg.val_csv`` and the training images with counts in ``cfg.classes`` only feed the k-NN monitor.
    """
    t_start = time.perf_counter()
    out_dir, device = start_run(cfg)
    ckpt_path = out_dir / CHECKPOINT_FILE
    rows, paths = limited(*load_labelled(Path(cfg.train_csv), cfg.data_root), cfg.limit)
    val_rows, val_paths = load_split(Path(cfg.val_csv), cfg, "val")
    fingerprint = run_fingerprint(cfg, rows, val_rows)
    if cfg.resume and (finished := _finished(out_dir, fingerprint, t_start)) is not None:
        return finished
    ckpt = resume_checkpoint(cfg, out_dir, fingerprint)

    kw: dict[str, Any] = {"workers": cfg.decode_workers, "progress": cfg.progress}
    images = open_images(
        build_cache(rows, paths, cfg.image_size, cfg.cache_dir, **kw), device, cfg.data_on_device
    )
    val_cache = build_cache(val_rows, val_paths, cfg.image_size, cfg.cache_dir, **kw)
    val_images = open_images(val_cache, device, cfg.data_on_device)
    first = cfg.classes[0]
    in_task = [i for i, r in enumerate(rows) if r.count in cfg.classes]
    ref_index = torch.as_tensor(in_task, dtype=torch.long)
    ref_labels = torch.as_tensor([rows[i].count - first for i in in_task], dtype=torch.long)
    val_labels = torch.as_tensor([r.count - first for r in val_rows], dtype=torch.long)
    val_index = torch.arange(len(val_rows))
    spec = PreprocessSpec(image_size=cfg.image_size)

    def probe(backbone: nn.Module) -> float | None:
        if not in_task:
            return None
        feats = _features(backbone, images, ref_index, spec, cfg)
        return knn_accuracy(
            _features(backbone, val_images, val_index, spec, cfg),
            val_labels,
            feats,
            ref_labels,
            len(cfg.classes),
        )

    n = len(images)
    if min(cfg.batch_size, n) < 2:
        raise ConfigError(
            "contrastive pretraining needs at least 2 images per batch (other images are negatives)"
        )
    bs, steps = batch_plan(n, cfg)
    cuda = device.type == "cuda"
    channels_last = cfg.channels_last and cuda
    amp = cfg.amp and cuda
    weights = None if cfg.weights == "none" else cfg.weights
    model = ContrastiveModel(weights).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps * cfg.epochs)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    knn_start: float | None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"].to(gen.get_state().device))
        start_epoch, history, knn_start = ckpt["epoch"], ckpt["history"], ckpt["knn_start"]
        LOG.info("resuming contrastive stage %s from epoch %d", out_dir, start_epoch)
    else:
        knn_start = probe(model.backbone)
    LOG.info(
        "contrastive pretraining on %d images at %d px on %s, %d steps x %d epochs (k-NN val accuracy at "
        "start: %s)",
        n,
        cfg.image_size,
        device,
        steps,
        cfg.epochs,
        "n/a" if knn_start is None else f"{knn_start:.4f}",
    )

    def step(x_u8: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        model.train()  # the monitor left it in eval mode
        views = torch.cat(
            [
                contrastive_view(x_u8, spec, gen, channels_last),
                contrastive_view(x_u8, spec, gen, channels_last),
            ]
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            z = model(views)
        loss = nt_xent(z[: len(x_u8)], z[len(x_u8) :], cfg.pretrain_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    from tqdm.auto import tqdm

    bar = tqdm(range(start_epoch, cfg.epochs), desc="contrastive epochs", disable=not cfg.progress)
    for epoch, train_loss, images_per_s in train_epochs(
        images, bs, steps, step, bar, start_epoch=start_epoch, seed=cfg.seed
    ):
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": opt.param_groups[0]["lr"],
            "train_images_per_s": images_per_s,
        }
        knn = probe(model.backbone)
        if knn is not None:
            metrics["val_accuracy"] = knn  # k-NN on frozen features: the curve's "accuracy" panel
        history.append(metrics)
        bar.set_postfix(
            loss=f"{metrics['train_loss']:.3f}", knn=f"{knn if knn is not None else float('nan'):.3f}"
        )
        if not cfg.progress:
            LOG.info(
                "contrastive epoch %d/%d: loss %.4f, k-NN val accuracy %s (%.0f images/s)",
                epoch + 1,
                cfg.epochs,
                metrics["train_loss"],
                "n/a" if knn is None else f"{knn:.4f}",
                metrics["train_images_per_s"],
            )
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "generator": gen.get_state(),
                    "epoch": epoch + 1,
                    "history": history,
                    "knn_start": knn_start,
                    **fingerprint,
                },
                ckpt_path,
            )

    atomic_torch_save(
        {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}, out_dir / STATE_DICT_FILE
    )
    save_contrastive_curves(history, out_dir / CURVES_PNG)
    steady = [h["train_images_per_s"] for h in history[1:]] or [h["train_images_per_s"] for h in history]
    result_metrics: dict[str, Any] = {
        "objective": "contrastive",
        "n_train": n,
        "epochs_run": len(history),
        "final_loss": history[-1]["train_loss"] if history else None,
        "knn_val_accuracy_start": knn_start,
        "knn_val_accuracy": history[-1].get("val_accuracy") if history else knn_start,
        "device": str(device) if not cuda else torch.cuda.get_device_name(device),
        "train_images_per_s": float(np.median(steady)) if steady else 0.0,
        "train_seconds": time.perf_counter() - t_start,
    }
    mark_finished(out_dir, fingerprint, {"metrics": result_metrics, "history": history})
    return TrainResult(
        out_dir, result_metrics, len(history), len(history), False, history, time.perf_counter() - t_start
    )
