"""The model being trained and its one epoch loop: :class:`Trainer` (model, optimizer, schedule, EMA,
teacher, the train and eval steps), :func:`train_epochs` (the shuffled passes every stage makes) and
:func:`fit_epochs` (a supervised fit's epochs: validation, selection, early stop, checkpoints).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from components.data import ImageSource, augment_batch, normalize_batch
from components.evaluate import count_metrics
from components.model import build_model, decode_outputs
from components.modelspec import STATE_DICT_FILE
from components.preprocess import PreprocessSpec
from components.training import distributed
from components.training.checkpoint import atomic_torch_save
from components.training.config import OnEpoch, TrainConfig
from components.training.losses import distill_loss, loss_fn

LOG = logging.getLogger(__name__)


class AverageModel(nn.Module):
    """Mean raw output over several models and, with ``flips``, the four flips of the input.

    Flip averaging (test-time augmentation) and ensembling live inside the exported graph, so the
    served model and the evaluated model are the same thing.
    """

    def __init__(self, models: list[nn.Module], flips: bool = True) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.flips = flips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if self.flips else [x]
        outs = [m(v) for m in self.models for v in views]
        return torch.stack(outs).mean(dim=0)


class Ema:
    """Exponential moving average of weights and BN buffers (smoother selection on small val sets)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [v for v in self.model.state_dict().values() if v.dtype.is_floating_point]
        cur = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
        torch._foreach_lerp_(ema, cur, 1 - self.decay)


class Trainer:
    """One model + optimizer + the train/eval steps; also used by the throughput benchmark."""

    def __init__(self, cfg: TrainConfig, device: torch.device, steps_total: int) -> None:
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            # Speed on GPU: cuDNN autotuning pays off with the fixed input shapes here, and TF32 matmuls
            # and convolutions run several times faster on Ampere+ at accuracy that does not matter for
            # training (bf16 autocast is coarser still). These flags are process-wide, so they are set
            # only when training on CUDA; CPU runs and CPU-only processes are left untouched.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.channels_last = cfg.channels_last and self.cuda
        self.amp = cfg.amp and self.cuda
        self.spec = PreprocessSpec(image_size=cfg.image_size)
        self.num_classes = len(cfg.classes)
        weights = None if cfg.weights == "none" else cfg.weights
        self.model = build_model(self.num_classes, cfg.head, weights).to(device)
        # torchrun: BatchNorm over the global batch, and DDP (self.forward) averaging the gradients
        self.model = distributed.sync_batchnorm(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg, steps_total)
        self.ema = Ema(self.model, cfg.ema) if cfg.ema > 0 else None
        self.teacher = load_teacher(cfg.teacher, cfg.head, self.num_classes, device) if cfg.teacher else None
        if self.teacher is not None and self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = distributed.wrap(self.model, device)
        if cfg.compile:
            self.forward = torch.compile(self.forward)  # type: ignore[assignment]
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.seed)

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_step(
        self, x_uint8: torch.Tensor, y_index: torch.Tensor, part: distributed.BatchPart | None = None
    ) -> torch.Tensor:
        """One optimizer step on a uint8 NHWC batch; returns the (device) loss without syncing.

        ``part``: the batch is this rank's part of a global batch; the loss returned is its share of the
        global batch's mean loss (the ranks' sum is that mean), and the gradient, averaged over the
        ranks by DDP, is the global batch's."""
        self.model.train()
        rows = None if part is None else part[:3]
        x = augment_batch(x_uint8, self.spec, self.cfg.aug_strength, self.gen, self.channels_last, rows)
        with self.autocast():
            raw = self.forward(x)
        loss = loss_fn(raw, y_index, self.cfg.head, self.num_classes, self.cfg.label_smoothing)
        if self.teacher is not None:  # the teacher sees the very same augmented view
            with torch.no_grad(), self.autocast():
                teacher_raw = self.teacher(x)
            w = self.cfg.distill_weight
            soft = distill_loss(raw, teacher_raw, self.cfg.head, self.cfg.distill_temperature)
            loss = (1 - w) * loss + w * soft
        self.opt.zero_grad(set_to_none=True)
        if part is not None:
            loss = loss * part.share
            (loss * part.world_size).backward()
        else:
            loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def eval_model(self) -> nn.Module:
        """The weights validated and exported: the EMA's when there is one."""
        return self.ema.model if self.ema is not None else self.model

    def eval_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of :meth:`eval_model`'s weights (the best epoch's, kept while training goes on)."""
        return {k: v.detach().cpu().clone() for k, v in self.eval_model().state_dict().items()}

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue training exactly: weights, EMA, optimizer, schedule, RNG."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "generator": self.gen.get_state(),
        }

    @torch.no_grad()
    def predict(
        self, images: ImageSource, tta: bool = False, *, shard: bool = False
    ) -> dict[str, np.ndarray]:
        """Loss, class index, expected index and raw output per image (flip-averaged with ``tta``).

        ``shard`` (distributed): each rank predicts (and reads) its share of the images, and every rank
        gets all."""
        model: nn.Module = self.eval_model().eval()
        if tta:
            model = AverageModel([model], flips=True)
        losses, idx, exp, raws = [], [], [], []
        order = torch.arange(len(images))
        lo, hi = distributed.rows_of(len(images)) if shard else (0, len(images))
        ebs = self.cfg.eval_batch_size
        for x_u8, y in images.batches([order[s : min(s + ebs, hi)] for s in range(lo, hi, ebs)]):
            x = normalize_batch(x_u8, self.spec, self.channels_last)
            with self.autocast():
                raw = model(x)
            raw = raw.float()
            yi = y - self.cfg.classes[0]
            losses.append(loss_fn(raw, yi, self.cfg.head, self.num_classes, 0.0) * len(y))
            _, index, expected = decode_outputs(raw, self.cfg.head, self.num_classes)
            idx.append(index)
            exp.append(expected)
            raws.append(raw)
        if shard and distributed.is_distributed():  # every rank's share, in rank order
            mine = [torch.stack(losses).sum().cpu().view(1) if losses else None]
            mine += [torch.cat(t).cpu() if t else None for t in (idx, exp, raws)]
            losses, idx, exp, raws = ([distributed.cat_ranks(t)] for t in mine)
        return {
            "loss": float(torch.stack(losses).sum().item() / len(images)),
            "index": torch.cat(idx).cpu().numpy(),
            "expected": torch.cat(exp).cpu().numpy(),
            "raw": torch.cat(raws).cpu(),
        }


def load_teacher(dirs: Sequence[str], head: str, num_classes: int, device: torch.device) -> nn.Module:
    """The teachers' mean raw output, frozen, in eval mode (BatchNorm uses its running statistics)."""
    models = []
    for d in dirs:
        m = build_model(num_classes, head)
        m.load_state_dict(torch.load(Path(d) / STATE_DICT_FILE, map_location="cpu", weights_only=True))
        models.append(m)
    teacher = AverageModel(models, flips=False).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW; no weight decay on BatchNorm and bias parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then cosine decay to ~0, stepped per batch."""
    warm = max(1, int(cfg.warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def select_key(metrics: dict[str, float], name: str) -> tuple[float, float]:
    """Larger is better: accuracy (tie-break RMSE), negated RMSE / loss, or the latest epoch.

    ``last`` is for a pretraining stage whose val figures do not measure what the weights are for
    (a wider class range than the val split's): its final backbone is the one worth keeping.
    """
    if name == "last":
        return (float(metrics["epoch"]), 0.0)
    if name == "val_accuracy":
        return (metrics["val_accuracy"], -metrics["val_rmse"])
    return (-metrics[name], metrics["val_accuracy"])


def batch_plan(n: int, cfg: TrainConfig) -> tuple[int, int]:
    """Batch size and steps per epoch over ``n`` images (a partial last batch is dropped)."""
    bs = min(cfg.batch_size, n)
    steps = n // bs
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return bs, steps


class EpochPass(NamedTuple):
    """One pass over the training images: its epoch (from 0), mean loss and speed."""

    epoch: int
    train_loss: float
    images_per_s: float


def train_epochs(
    images: ImageSource,
    batch_size: int,
    steps: int,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: Iterable[int],
    *,
    start_epoch: int,
    seed: int,
    part: distributed.BatchPart | None = None,
) -> Iterator[EpochPass]:
    """A shuffled pass of ``steps`` batches through ``step`` (uint8 images, counts -> the batch's loss on
    the device) for each item of ``epochs`` (``range(start_epoch, E)``, or a progress bar over it).

    The shuffles come from their own seeded generator, replayed up to ``start_epoch``: a resumed run sees
    the batches of an uninterrupted one. The loss is synced once per epoch, not per step. ``part``
    (distributed): every rank draws the same global batches and steps on its part of each; the losses
    are summed over the ranks, and the speed is the global batches'. A streamed ``images`` reads each
    batch (a rank: its part) ahead while the previous one trains.
    """
    device = images.device
    cuda = device.type == "cuda"
    n = len(images)
    perm_gen = torch.Generator().manual_seed(seed)
    for _ in range(start_epoch):  # same shuffles as an uninterrupted run
        torch.randperm(n, generator=perm_gen)
    for epoch in epochs:
        perm = torch.randperm(n, generator=perm_gen)
        batches = [perm[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
        if part is not None:  # this rank's rows: all it reads
            batches = [index[part.start : part.stop] for index in batches]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in images.batches(batches):
            loss_sum += step(x, y)
        if part is not None:
            distributed.all_reduce_sum(loss_sum)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        yield EpochPass(epoch, float(loss_sum.item() / steps), steps * batch_size / max(seconds, 1e-9))


@dataclass
class Selection:
    """Where a fit's epochs ended: the history, and the epoch validation chose with its weights (CPU)."""

    history: list[dict[str, float]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    stopped_early: bool


def fit_epochs(
    trainer: Trainer,
    train_images: ImageSource,
    val_images: ImageSource,
    val_counts: np.ndarray,
    *,
    ckpt: dict[str, Any] | None,
    fingerprint: dict[str, Any],
    ckpt_path: Path,
    on_epoch: OnEpoch | None = None,
) -> Selection:
    """Train ``trainer`` from ``ckpt`` (or its start) to ``--epochs``, early stop or ``stop_after``;
    validate and checkpoint after each epoch. ``on_epoch(epoch, metrics)`` may raise to stop (pruning).

    Distributed: each rank trains on its part of every batch, validates its share of the images; rank
    0's figures and decisions (best epoch, early stop) hold on every rank, and rank 0 alone checkpoints
    (the others wait for it). ``on_epoch`` runs on every rank with the same figures."""
    cfg = trainer.cfg
    n_train = len(train_images)
    bs, steps = batch_plan(n_train, cfg)
    part = distributed.batch_part(bs)
    history: list[dict[str, float]] = []
    start_epoch, best_key, best_epoch, best_state, stopped_early = 0, None, 0, None, False
    if ckpt is not None:
        trainer.model.load_state_dict(ckpt["model"])
        trainer.opt.load_state_dict(ckpt["optimizer"])
        trainer.sched.load_state_dict(ckpt["scheduler"])
        if trainer.ema is not None and ckpt.get("ema") is not None:
            trainer.ema.model.load_state_dict(ckpt["ema"])
        trainer.gen.set_state(ckpt["generator"].to(trainer.gen.get_state().device))
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        best_key, best_epoch, best_state = ckpt["best_key"], ckpt["best_epoch"], ckpt["best_state"]
        if best_state is None:  # the best epoch was the checkpointed one (not stored twice)
            best_state = trainer.eval_state()
        stopped_early = ckpt["stopped_early"]
        LOG.info("resuming %s from epoch %d", ckpt_path.parent, start_epoch)

    LOG.info(
        "training %s head on %d images (%d val) at %d px on %s, %d steps x %d epochs",
        cfg.head,
        n_train,
        len(val_images),
        cfg.image_size,
        trainer.device,
        steps,
        cfg.epochs,
    )
    from tqdm.auto import tqdm

    bar = tqdm(range(start_epoch, cfg.epochs), desc="epochs", disable=not cfg.progress or stopped_early)
    c0 = cfg.classes[0]
    passes = train_epochs(
        train_images,
        bs,
        steps,
        lambda x, y: trainer.train_step(x, y - c0, part),
        bar,
        start_epoch=start_epoch,
        seed=cfg.seed,
        part=part,
    )
    for epoch, train_loss, images_per_s in () if stopped_early else passes:
        pred = trainer.predict(val_images, shard=part is not None)
        vm = count_metrics(val_counts, pred["index"] + c0, cfg.classes, pred["expected"] + c0)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": pred["loss"],
            "val_accuracy": vm["accuracy"],
            "val_rmse": vm["rmse"],
            "val_mae": vm["mae"],
            "lr": trainer.opt.param_groups[0]["lr"],
            "train_images_per_s": images_per_s,
        }
        key = select_key(metrics, cfg.selection_metric)
        better = best_key is None or key > tuple(best_key)
        stop = bool(cfg.patience) and not better and epoch + 1 - best_epoch >= cfg.patience
        # a refit ends where its selection run was best; the schedule is the same
        stop = stop or bool(cfg.stop_after and epoch + 1 >= cfg.stop_after)
        # one decision for every rank: rank 0's figures (its timing too) and choice
        metrics, key, better, stop = distributed.broadcast_object((metrics, key, better, stop))
        history.append(metrics)
        if better:
            best_key, best_epoch = key, epoch + 1
            best_state = trainer.eval_state()
        stopped_early = stopped_early or stop
        bar.set_postfix(acc=f"{metrics['val_accuracy']:.3f}", rmse=f"{metrics['val_rmse']:.3f}")
        if not cfg.progress:  # no bar (pods, CI logs): one line per epoch instead
            LOG.info(
                "epoch %d/%d: train loss %.4f, val accuracy %.4f, val RMSE %.4f (%.0f images/s)",
                epoch + 1,
                cfg.epochs,
                metrics["train_loss"],
                metrics["val_accuracy"],
                metrics["val_rmse"],
                metrics["train_images_per_s"],
            )
        last = stopped_early or epoch + 1 == cfg.epochs
        if last or (epoch + 1) % cfg.checkpoint_every == 0 or on_epoch is not None:
            record = {
                "epoch": epoch + 1,
                **fingerprint,
                "best_key": best_key,
                "best_epoch": best_epoch,
                "best_state": None if best_epoch == epoch + 1 else best_state,
                "history": history,
                "stopped_early": stopped_early,
            }
            # rank 0 alone saves; the others wait for it
            distributed.on_main(lambda r=record: atomic_torch_save({**trainer.state(), **r}, ckpt_path))
        if on_epoch is not None:
            on_epoch(epoch + 1, dict(metrics))
        if stopped_early:
            if cfg.stop_after and epoch + 1 >= cfg.stop_after:
                LOG.info("stopping after epoch %d of %d, as asked (stop_after)", epoch + 1, cfg.epochs)
            else:
                LOG.info(
                    "early stop after epoch %d: best %s at epoch %d",
                    epoch + 1,
                    cfg.selection_metric,
                    best_epoch,
                )
            break
    assert best_state is not None
    return Selection(history, best_epoch, best_state, stopped_early)
