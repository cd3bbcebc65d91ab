"""Train the ResNet18 item counter and export it in the serving contract.

``python -m components.train --train train.csv --val val.csv --out MODEL_DIR [--weights none]
[--head ordinal] [--image-size 224] [--epochs E] [--batch-size B] [--lr LR] [--device auto] [--resume]``

Images are decoded once into a uint8 cache (:mod:`components.data`), augmented and normalized on the
training device, and trained with bf16 autocast + channels_last on CUDA. The model is selected on the
validation set only (the test set is never looked at here unless ``--test`` is given, and then only
reported). Each epoch ends with an atomic checkpoint, so ``--resume`` continues an interrupted run and a
finished one is not retrained; either is refused if the data or a setting that shapes training changed.
The output directory holds ``model.onnx``, ``model.pt``, ``model.json``, ``metrics.json``,
``confusion_matrix.png``, ``training_curves.png`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.common import (
    ConfigError,
    atomic_write_json,
    format_table,
    parse_int_list,
    read_json,
    setup_logging,
)
from components.data import DeviceImages, augment_batch, build_cache, data_hash, normalize_batch
from components.evaluate import count_metrics, paired_difference, range_text
from components.manifest import load_labelled, read_manifest, write_manifest
from components.model import build_model, decode_outputs, export_onnx, fit_decision_offsets
from components.modelspec import (
    DEFAULT_CLASSES,
    HEADS,
    ONNX_FILE,
    STATE_DICT_FILE,
    ModelSpec,
    load_model_spec,
    validate_classes,
)
from components.preprocess import PreprocessSpec

LOG = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
#: Written last, after the export: the run's settings, data hashes and results. Its presence means the
#: run is complete and need not be retrained, even after ``checkpoint.pt`` was deleted (tune, pipeline).
DONE_FILE = "checkpoint.json"
#: Settings that may differ on ``--resume``: where things are read from or written to, and how fast or
#: verbosely the run goes. The data behind the manifest paths is checked by content hash instead.
#: Everything else in :meth:`TrainConfig.to_params` must match the run being resumed.
RESUME_MAY_CHANGE = frozenset(
    {
        "train_csv",
        "val_csv",
        "test_csv",
        "out_dir",
        "data_root",
        "cache_dir",
        "device",
        "num_threads",
        "decode_workers",
        "compile",
        "eval_batch_size",
        "checkpoint_every",
        "progress",
        "resume",
        "pretrain_extra",
        "pretrain_data_root",
        "export",
        "model_name",
        "version",
    }
)
METRICS_FILE = "metrics.json"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
SELECTION_METRICS = ("val_accuracy", "val_rmse", "val_loss", "last")
#: what the pretraining stage learns: counts 0..cap (supervised) or SimCLR views (no labels)
PRETRAIN_OBJECTIVES = ("counts", "contrastive")
#: the count rule: the head's own (``plain``) or offsets fitted on validation (``fitted``)
DECISIONS = ("plain", "fitted")
OnEpoch = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    """Every training setting; saved in the checkpoint and in ``model.json`` (params)."""

    train_csv: Path
    val_csv: Path
    out_dir: Path
    data_root: Path | None = None
    test_csv: Path | None = None
    classes: tuple[int, ...] = DEFAULT_CLASSES
    head: str = "ordinal"
    weights: str = "none"
    image_size: int = 224
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    aug_strength: float = 1.0
    warmup_frac: float = 0.1
    ema: float = 0.0
    patience: int = 0
    selection_metric: str = "val_accuracy"
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    num_threads: int | None = None
    max_steps_per_epoch: int | None = None
    limit: int | None = None
    cache_dir: Path | None = None
    decode_workers: int | None = None
    compile: bool = False
    channels_last: bool = True
    amp: bool = True
    eval_batch_size: int = 256
    checkpoint_every: int = 1
    model_name: str = "inventory-counter"
    version: str = "0"
    progress: bool = True
    export: bool = True
    tta: bool = False
    decision: str = "plain"
    teacher: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    pretrain_extra: Path | None = None
    pretrain_data_root: Path | None = None
    pretrain_epochs: int = 0
    pretrain_count_cap: int = 10
    pretrain_objective: str = "counts"
    pretrain_temperature: float = 0.2
    refit: bool = False
    stop_after: int = 0

    def validate(self) -> None:
        """Fail early, with a message that says how to fix the setting."""
        self.classes = validate_classes(self.classes)
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {list(HEADS)}, got {self.head!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(f"--selection-metric must be one of {list(SELECTION_METRICS)}")
        if self.decision not in DECISIONS:
            raise ConfigError(f"--decision must be one of {list(DECISIONS)}, got {self.decision!r}")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.label_smoothing < 1,
                f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (0 <= self.aug_strength <= 3, f"--aug-strength must be in [0, 3], got {self.aug_strength}"),
            (0 <= self.warmup_frac < 1, f"--warmup-frac must be in [0, 1), got {self.warmup_frac}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.patience >= 0, f"--patience must be >= 0 (0 = off), got {self.patience}"),
            (16 <= self.image_size <= 1024, f"--image-size must be in [16, 1024], got {self.image_size}"),
            (self.num_threads is None or self.num_threads >= 1, "--num-threads must be >= 1"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "--max-steps-per-epoch >= 1"),
            (self.limit is None or self.limit >= 1, "--limit must be >= 1"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (
                0 <= self.stop_after <= self.epochs,
                f"stop_after must be in [0, --epochs {self.epochs}] (0 = off), got {self.stop_after}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.weights not in ("none", "imagenet") and not Path(self.weights).is_file():
            raise ConfigError(
                f"--weights must be imagenet, none or an existing state-dict path; got {self.weights!r}"
            )
        self.teacher = tuple(str(t) for t in self.teacher)
        if self.teacher:
            if not 0 < self.distill_weight <= 1:
                raise ConfigError(f"--distill-weight must be in (0, 1], got {self.distill_weight}")
            if self.distill_temperature <= 0:
                raise ConfigError(f"--distill-temperature must be > 0, got {self.distill_temperature}")
            for t in self.teacher:
                check_teacher(Path(t), self.head, self.classes)
        self._validate_pretrain()

    def _validate_pretrain(self) -> None:
        if self.pretrain_epochs < 0:
            raise ConfigError(f"--pretrain-epochs must be >= 0 (0 = off), got {self.pretrain_epochs}")
        if self.pretrain_objective not in PRETRAIN_OBJECTIVES:
            raise ConfigError(
                f"--pretrain-objective must be one of {list(PRETRAIN_OBJECTIVES)}, "
                f"got {self.pretrain_objective!r}"
            )
        if self.pretrain_temperature <= 0:
            raise ConfigError(f"--pretrain-temperature must be > 0, got {self.pretrain_temperature}")
        if self.pretrain_epochs == 0:
            if self.pretrain_extra is not None:
                raise ConfigError("--pretrain-extra is used only with --pretrain-epochs N (N >= 1)")
            return
        if self.pretrain_extra is None:
            if self.pretrain_objective == "contrastive":
                return  # the training images alone will do: no labels needed
            raise ConfigError(
                "--pretrain-epochs needs --pretrain-extra: a manifest of images with other counts "
                "(e.g. components.ingest --per-class N --classes 0,6,7,8,9,10)"
            )
        if not Path(self.pretrain_extra).is_file():
            raise ConfigError(f"--pretrain-extra {self.pretrain_extra} does not exist")
        if self.classes[0] < 0 or not self.classes[-1] <= self.pretrain_count_cap <= 100:
            raise ConfigError(
                f"--pretrain-count-cap must be in [{self.classes[-1]}, 100] (at least the largest class) "
                f"and the classes non-negative; got cap {self.pretrain_count_cap}, "
                f"classes {list(self.classes)}"
            )

    def to_params(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
        }


@dataclass
class TrainResult:
    """What a caller (tune, the pipeline) needs from a finished run."""

    model_dir: Path
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def val_accuracy(self) -> float:
        return float(self.metrics["val"]["accuracy"])

    @property
    def val_rmse(self) -> float:
        return float(self.metrics["val"]["rmse"])


# --------------------------------------------------------------------------------------- pieces


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable explicit device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a torch device (use auto, cpu, cuda, cuda:0)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Python, numpy and torch seeds (the augmentation has its own generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_fn(
    raw: torch.Tensor, target_index: torch.Tensor, head: str, num_classes: int, smoothing: float
) -> torch.Tensor:
    """Per head: CE with label smoothing; ordinal BCE over cumulative targets; smooth-L1 on the index."""
    raw = raw.float()
    if head == "classification":
        return nn.functional.cross_entropy(raw, target_index, label_smoothing=smoothing)
    if head == "ordinal":
        k = torch.arange(num_classes - 1, device=raw.device)
        target = (target_index[:, None] > k[None, :]).float()
        if smoothing:
            target = target * (1 - smoothing) + 0.5 * smoothing
        return nn.functional.binary_cross_entropy_with_logits(raw, target)
    return nn.functional.smooth_l1_loss(raw[:, 0], target_index.float())


def distill_loss(raw: torch.Tensor, teacher_raw: torch.Tensor, head: str, temperature: float) -> torch.Tensor:
    """How far the student's outputs are from the teacher's on the same augmented images.

    Classification: KL divergence of the softened class distributions; ordinal: BCE against the
    teacher's softened "more than k" probabilities; both scaled by T^2 so gradients keep their size.
    Regression: smooth-L1 to the teacher's predicted index.
    """
    raw, teacher_raw = raw.float(), teacher_raw.float()
    t = temperature
    if head == "classification":
        log_p = nn.functional.log_softmax(raw / t, dim=1)
        log_q = nn.functional.log_softmax(teacher_raw / t, dim=1)
        return nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
    if head == "ordinal":
        target = torch.sigmoid(teacher_raw / t)
        return nn.functional.binary_cross_entropy_with_logits(raw / t, target) * t * t
    return nn.functional.smooth_l1_loss(raw[:, 0], teacher_raw[:, 0])


def check_teacher(model_dir: Path, head: str, classes: tuple[int, ...]) -> None:
    """A teacher must be a trained model directory with the student's head and classes."""
    if not (model_dir / STATE_DICT_FILE).is_file():
        raise ConfigError(
            f"--teacher {model_dir}: no model.pt there; pass the directory a training run wrote"
        )
    spec = load_model_spec(model_dir)
    if spec.head != head or tuple(spec.classes) != tuple(classes):
        raise ConfigError(
            f"--teacher {model_dir} has head {spec.head} and classes {list(spec.classes)}; the student has "
            f"head {head} and classes {list(classes)}: train the student with the teacher's head and classes"
        )


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
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg, steps_total)
        self.ema = Ema(self.model, cfg.ema) if cfg.ema > 0 else None
        self.teacher = load_teacher(cfg.teacher, cfg.head, self.num_classes, device) if cfg.teacher else None
        if self.teacher is not None and self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if cfg.compile:
            self.forward = torch.compile(self.model)  # type: ignore[assignment]
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.seed)

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, x_uint8: torch.Tensor, y_index: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a uint8 NHWC batch; returns the (device) loss without syncing."""
        self.model.train()
        x = augment_batch(x_uint8, self.spec, self.cfg.aug_strength, self.gen, self.channels_last)
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
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    @torch.no_grad()
    def predict(self, images: DeviceImages, tta: bool = False) -> dict[str, np.ndarray]:
        """Loss, class index, expected index and raw output per image (flip-averaged with ``tta``)."""
        model: nn.Module = self.eval_model().eval()
        if tta:
            model = AverageModel([model], flips=True)
        losses, idx, exp, raws = [], [], [], []
        order = torch.arange(len(images))
        for start in range(0, len(images), self.cfg.eval_batch_size):
            x_u8, y = images.batch(order[start : start + self.cfg.eval_batch_size])
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
        return {
            "loss": float(torch.stack(losses).sum().item() / len(images)),
            "index": torch.cat(idx).cpu().numpy(),
            "expected": torch.cat(exp).cpu().numpy(),
            "raw": torch.cat(raws).cpu(),
        }


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _select_key(metrics: dict[str, float], name: str) -> tuple[float, float]:
    """Larger is better: accuracy (tie-break RMSE), negated RMSE / loss, or the latest epoch.

    ``last`` is for a pretraining stage whose val figures do not measure what the weights are for
    (a wider class range than the val split's): its final backbone is the one worth keeping.
    """
    if name == "last":
        return (float(metrics["epoch"]), 0.0)
    if name == "val_accuracy":
        return (metrics["val_accuracy"], -metrics["val_rmse"])
    return (-metrics[name], metrics["val_accuracy"])


def _limited(rows: list[Any], paths: list[Path], limit: int | None) -> tuple[list[Any], list[Path]]:
    if limit is None or limit >= len(rows):
        return rows, paths
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(rows))[:limit])
    return [rows[i] for i in keep], [paths[i] for i in keep]


def _load_split(csv: Path, cfg: TrainConfig, what: str) -> tuple[list[Any], list[Path]]:
    rows, paths = load_labelled(csv, cfg.data_root)
    outside = sorted({r.count for r in rows} - set(cfg.classes))
    if outside:
        raise ConfigError(
            f"{what} manifest {csv} has counts {outside} outside --classes {list(cfg.classes)}; "
            "filter it (components.ingest --classes) or widen --classes"
        )
    return _limited(rows, paths, cfg.limit)


def _resume_mismatches(old: dict[str, Any], fingerprint: dict[str, Any], source: Path) -> list[str]:
    """``name: old -> new`` for every setting or data hash that differs (allowed changes skipped)."""
    diffs = []
    old_params = old.get("params", old.get("args")) or {}
    new_params = fingerprint["params"]
    # a run saved before a setting existed trained as its default does
    defaults = {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in fields(TrainConfig)
        if f.default is not MISSING
    }
    for key in sorted(set(old_params) | set(new_params)):
        if key in RESUME_MAY_CHANGE:
            continue
        if key not in old_params and key in defaults and new_params.get(key) == defaults[key]:
            continue
        a, b = old_params.get(key, "<unset>"), new_params.get(key, "<unset>")
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    for key, what in (("train_data_sha256", "training data"), ("val_data_sha256", "validation data")):
        if key not in old:
            LOG.warning("--resume: %s records no hash of the %s; cannot check it is unchanged", source, what)
        elif old[key] != fingerprint[key]:
            diffs.append(f"{what} (manifest rows: ids, sha256, counts)")
    return diffs


def _check_resume(old: dict[str, Any], fingerprint: dict[str, Any], source: Path) -> None:
    """ConfigError naming every difference between the run in ``source`` and this one."""
    diffs = _resume_mismatches(old, fingerprint, source)
    if diffs:
        raise ConfigError(
            f"--resume: {source} was made with different settings or data ({'; '.join(diffs)}); "
            "use a new --out for the new settings, or drop --resume to retrain from scratch"
        )


def _finished_run(
    cfg: TrainConfig, out_dir: Path, fingerprint: dict[str, Any], t_start: float
) -> TrainResult | None:
    """The stored result when ``out_dir`` holds a finished run of the same settings and data, else None.

    Only the small ``checkpoint.json`` (and the exported model) are needed, not ``checkpoint.pt``.
    """
    done_path = out_dir / DONE_FILE
    if not done_path.is_file():
        return None
    try:
        done = read_json(done_path)
    except ConfigError:
        return None
    if (
        not isinstance(done, dict)
        or not done.get("finished")
        or "params" not in done
        or "metrics" not in done
    ):
        return None  # written by an older version: fall back to checkpoint.pt
    _check_resume(done, fingerprint, done_path)
    if cfg.export and (not done.get("exported") or not (out_dir / ONNX_FILE).is_file()):
        return None  # the exported model is missing: finish the run again from checkpoint.pt
    LOG.info("%s already holds a finished run; not retraining", out_dir)
    return TrainResult(
        out_dir,
        done["metrics"],
        int(done["best_epoch"]),
        int(done["epochs_run"]),
        bool(done["stopped_early"]),
        list(done.get("history", [])),
        time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------------------- train


def _stage_config(
    cfg: TrainConfig, stage_dir: Path, rows: list[Any], manifest_name: str, **fields: Any
) -> TrainConfig:
    """A stage's settings (pretraining, refit): the run's, trained on ``rows`` (written with absolute
    paths into ``stage_dir``, as their manifests may live under different data roots), without what
    belongs to the fit alone (test report, count rule, flips, its own stages), ``fields`` on top.

    The last epoch is kept (``selection_metric="last"``): neither stage is ranked on val.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(stage_dir / manifest_name, rows)
    stage: dict[str, Any] = {
        "train_csv": manifest,
        "out_dir": stage_dir,
        "test_csv": None,
        "selection_metric": "last",
        "patience": 0,
        "tta": False,
        "decision": "plain",
        "refit": False,
        "stop_after": 0,
        "export": True,  # the fit reads the stage's model.pt
        "pretrain_extra": None,
        "pretrain_data_root": None,
        "pretrain_epochs": 0,
    }
    return replace(cfg, **{**stage, **fields})


def _absolute(rows: list[Any], paths: list[Path]) -> list[Any]:
    return [replace(r, path=str(p.resolve())) for r, p in zip(rows, paths, strict=True)]


PRETRAIN_DIR = "pretrain"
#: next to a pretraining stage's model.pt: what the stage was, so a fit started from it can say so
BACKBONE_FILE = "backbone.json"


def pretrain_backbone(cfg: TrainConfig) -> TrainResult:
    """Stage 1 of ``--pretrain-epochs`` on the training split plus ``--pretrain-extra`` (the 0 and 6+
    images the 1-5 task leaves out). ``--pretrain-objective counts``: an ordinal head over counts
    0..cap, counts above the cap set to it; ``contrastive``: SimCLR, no labels
    (:mod:`components.contrastive`; the extra images are optional there).

    More images teach the backbone what bins and "more items" look like; the fit then starts from it
    (any head is dropped). Val images never enter the training side, and the weights kept are the last
    epoch's: val figures over a wider class range than the val split's say little about a backbone.
    Written under ``MODEL_DIR/pretrain``; resumes with the run (``--resume``).
    """
    contrastive = cfg.pretrain_objective == "contrastive"
    if cfg.pretrain_epochs < 1 or (cfg.pretrain_extra is None and not contrastive):
        raise ConfigError(
            "pretraining needs --pretrain-extra and --pretrain-epochs >= 1 (contrastive: the epochs alone)"
        )
    stage_dir = Path(cfg.out_dir) / PRETRAIN_DIR
    cap = cfg.pretrain_count_cap
    train_rows, train_paths = load_labelled(Path(cfg.train_csv), cfg.data_root)
    extra_rows, extra_paths = (
        load_labelled(Path(cfg.pretrain_extra), cfg.pretrain_data_root) if cfg.pretrain_extra else ([], [])
    )
    for csv in [Path(cfg.val_csv)] + ([Path(cfg.test_csv)] if cfg.test_csv else []):
        held_out = read_manifest(csv)
        ids, hashes = {h.id for h in held_out}, {h.sha256 for h in held_out}
        leaked = sorted(e.id for e in extra_rows if e.id in ids or e.sha256 in hashes)
        if leaked:
            raise ConfigError(
                f"{len(leaked)} images of --pretrain-extra are also in {csv} (first: {leaked[0]}): they "
                "would be trained on; ingest the extra images with counts outside --classes"
            )
    stage_rows = _absolute(train_rows + extra_rows, train_paths + extra_paths)
    if contrastive:
        stage = _stage_config(
            cfg,
            stage_dir,
            stage_rows,
            "pretrain.csv",
            epochs=cfg.pretrain_epochs,
            teacher=(),
            model_name=f"{cfg.model_name}-pretrain",
        )
        LOG.info("contrastive pretraining on %d images for %d epochs", len(stage_rows), stage.epochs)
        from components.contrastive import contrastive_pretrain  # imports this module

        result = contrastive_pretrain(stage)
        record = {
            "objective": "contrastive",
            "temperature": cfg.pretrain_temperature,
            "knn_val_accuracy_start": result.metrics["knn_val_accuracy_start"],
            "knn_val_accuracy": result.metrics["knn_val_accuracy"],
        }
    else:
        stage_rows = [replace(r, count=min(r.count, cap)) for r in stage_rows]
        result = train(_counts_stage(cfg, stage_dir, stage_rows))
        record = {"objective": "counts", "count_cap": cap}
    atomic_write_json(
        stage_dir / BACKBONE_FILE,
        {
            "images": result.metrics["n_train"],
            "epochs": result.epochs_run,
            **record,
            "batch_size": cfg.batch_size,  # the stage's own optimisation settings (the run's)
            "lr": cfg.lr,
            # a resumed, finished stage reports its first run's time, not the reload's
            "seconds": result.metrics.get("train_seconds", result.seconds),
        },
    )
    return result


def _counts_stage(cfg: TrainConfig, stage_dir: Path, stage_rows: list[Any]) -> TrainConfig:
    cap = cfg.pretrain_count_cap
    stage = _stage_config(
        cfg,
        stage_dir,
        stage_rows,
        "pretrain.csv",
        classes=tuple(range(cap + 1)),
        head="ordinal",
        epochs=cfg.pretrain_epochs,
        label_smoothing=0.0,
        teacher=(),  # the teachers count 1-5, the stage 0..cap
        model_name=f"{cfg.model_name}-pretrain",
    )
    LOG.info("pretraining on %d images (counts 0..%d) for %d epochs", len(stage_rows), cap, stage.epochs)
    return stage


def backbone_info(weights: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stage record of ``--weights PATH`` when PATH is a pretraining stage's ``model.pt``, else None.

    A fit started from a separately run stage (``--pretrain-only``, the pipeline's pretrain task) then
    reports the stage in its metrics and model card, as a fit with its own stage does.
    """
    if str(weights) in ("none", "imagenet"):
        return None
    record = Path(weights).parent / BACKBONE_FILE
    if not record.is_file():
        return None
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{record} is not a readable stage record: {e}") from e
    return {"dir": str(record.parent), **info}


def start_run(cfg: TrainConfig) -> tuple[Path, torch.device]:
    """What every run (a fit, a stage) does first: validate, make its directory, set threads, device
    and seeds."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    return out_dir, device


def run_fingerprint(cfg: TrainConfig, train_rows: Sequence[Any], val_rows: Sequence[Any]) -> dict[str, Any]:
    """Settings and data hashes a resumed run must share with the one it continues."""
    return {
        "params": cfg.to_params(),
        "train_data_sha256": data_hash(train_rows),
        "val_data_sha256": data_hash(val_rows),
    }


def resume_checkpoint(cfg: TrainConfig, out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``--resume``: the checkpoint to continue from (refused, by name, if made with other settings or
    data); None to start afresh. The finished-run marker goes either way: MODEL_DIR is about to change."""
    ckpt: dict[str, Any] | None = None
    ckpt_path = out_dir / CHECKPOINT_FILE
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resume(ckpt, fingerprint, ckpt_path)
    (out_dir / DONE_FILE).unlink(missing_ok=True)
    return ckpt


def train(cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> TrainResult:
    """Train, select on validation, export. ``on_epoch(epoch, metrics)`` may raise to stop (pruning)."""
    t_start = time.perf_counter()
    out_dir, device = start_run(cfg)
    ckpt_path = out_dir / CHECKPOINT_FILE
    train_rows, train_paths = _load_split(Path(cfg.train_csv), cfg, "train")
    val_rows, val_paths = _load_split(Path(cfg.val_csv), cfg, "val")
    fingerprint = run_fingerprint(cfg, train_rows, val_rows)
    if cfg.resume and (finished := _finished_run(cfg, out_dir, fingerprint, t_start)) is not None:
        return finished
    ckpt = resume_checkpoint(cfg, out_dir, fingerprint)

    init = cfg
    pretrained: dict[str, Any] | None = None
    if cfg.pretrain_epochs:
        stage = pretrain_backbone(cfg)
        init = replace(cfg, weights=str(stage.model_dir / STATE_DICT_FILE))
        # the stage's record (objective, images, epochs, its monitor), timed as this run saw it
        pretrained = {
            **(backbone_info(init.weights) or {}),
            "dir": str(stage.model_dir),
            "seconds": stage.seconds,
        }
        seed_everything(cfg.seed)  # the fit starts from the same RNG state whether stage 1 ran or resumed
    else:
        pretrained = backbone_info(cfg.weights)

    train_cache = build_cache(
        train_rows,
        train_paths,
        cfg.image_size,
        cfg.cache_dir,
        workers=cfg.decode_workers,
        progress=cfg.progress,
    )
    val_cache = build_cache(
        val_rows, val_paths, cfg.image_size, cfg.cache_dir, workers=cfg.decode_workers, progress=cfg.progress
    )
    train_images = DeviceImages(train_cache, device)
    val_images = DeviceImages(val_cache, device)

    n_train = len(train_images)
    bs = min(cfg.batch_size, n_train)
    steps = n_train // bs
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    trainer = Trainer(init, device, steps * cfg.epochs)
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
            best_state = {k: v.detach().cpu().clone() for k, v in trainer.eval_model().state_dict().items()}
        stopped_early = ckpt["stopped_early"]
        LOG.info("resuming %s from epoch %d", out_dir, start_epoch)

    LOG.info(
        "training %s head on %d images (%d val) at %d px on %s, %d steps x %d epochs",
        cfg.head,
        n_train,
        len(val_images),
        cfg.image_size,
        device,
        steps,
        cfg.epochs,
    )
    from tqdm.auto import tqdm

    perm_gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start_epoch):  # same shuffles as an uninterrupted run
        torch.randperm(n_train, generator=perm_gen)
    epoch = start_epoch
    bar = tqdm(range(start_epoch, cfg.epochs), desc="epochs", disable=not cfg.progress or stopped_early)
    for epoch in bar:
        if stopped_early:
            break
        perm = torch.randperm(n_train, generator=perm_gen)
        if trainer.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for s in range(steps):
            x, y = train_images.batch(perm[s * bs : (s + 1) * bs])
            loss_sum += trainer.train_step(x, y - cfg.classes[0])
        if trainer.cuda:
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t0
        pred = trainer.predict(val_images)
        vm = count_metrics(
            val_cache.counts, pred["index"] + cfg.classes[0], cfg.classes, pred["expected"] + cfg.classes[0]
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum.item() / steps),
            "val_loss": pred["loss"],
            "val_accuracy": vm["accuracy"],
            "val_rmse": vm["rmse"],
            "val_mae": vm["mae"],
            "lr": trainer.opt.param_groups[0]["lr"],
            "train_images_per_s": steps * bs / max(train_seconds, 1e-9),
        }
        history.append(metrics)
        key = _select_key(metrics, cfg.selection_metric)
        if best_key is None or key > tuple(best_key):
            best_key, best_epoch = key, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in trainer.eval_model().state_dict().items()}
        if cfg.patience and epoch + 1 - best_epoch >= cfg.patience:
            stopped_early = True
        if cfg.stop_after and epoch + 1 >= cfg.stop_after:
            stopped_early = True  # a refit ends where its selection run was best; the schedule is the same
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
            _atomic_torch_save(
                {
                    "model": trainer.model.state_dict(),
                    "ema": trainer.ema.model.state_dict() if trainer.ema is not None else None,
                    "optimizer": trainer.opt.state_dict(),
                    "scheduler": trainer.sched.state_dict(),
                    "generator": trainer.gen.get_state(),
                    "epoch": epoch + 1,
                    **fingerprint,
                    "best_key": best_key,
                    "best_epoch": best_epoch,
                    "best_state": None if best_epoch == epoch + 1 else best_state,
                    "history": history,
                    "stopped_early": stopped_early,
                },
                ckpt_path,
            )
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

    # Best weights -> final validation figures, export, reports.
    final = trainer.eval_model()
    assert best_state is not None
    final.load_state_dict(best_state)
    pred = trainer.predict(val_images, tta=cfg.tta)  # the exported graph's figures
    decision = _fit_decision(cfg, trainer, pred, val_cache.counts, device)
    val_metrics = count_metrics(
        val_cache.counts,
        pred["index"] + cfg.classes[0],
        cfg.classes,
        pred["expected"] + cfg.classes[0],
        intervals=True,
    )
    val_metrics["loss"] = pred["loss"]
    refit: dict[str, Any] | None = None
    exported_rows = train_rows
    if cfg.refit:
        refit = _refit(cfg, init.weights, best_epoch, trainer, decision.get("offsets"), device)
        exported_rows = train_rows + val_rows
        # from here on, the refit's weights are the model: exported, tested and served
        final.load_state_dict(
            torch.load(Path(refit["dir"]) / STATE_DICT_FILE, map_location="cpu", weights_only=True)
        )
    steady = [h["train_images_per_s"] for h in history[1:]] or [h["train_images_per_s"] for h in history]
    metrics: dict[str, Any] = {
        "val": val_metrics,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "selection_metric": cfg.selection_metric,
        "n_train": n_train,
        "n_val": len(val_images),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "train_images_per_s": float(np.median(steady)),
        "train_seconds": time.perf_counter() - t_start,
        "decision": decision,
    }
    if pretrained is not None:
        metrics["pretrain"] = pretrained
    if refit is not None:
        metrics["refit"] = refit
    if cfg.export:
        _export(cfg, final, exported_rows, metrics, history, out_dir, decision.get("offsets"))
    atomic_write_json(
        out_dir / DONE_FILE,
        {
            "finished": True,
            **fingerprint,
            "exported": cfg.export,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "stopped_early": stopped_early,
            "metrics": metrics,
            "history": history,
        },
    )
    return TrainResult(
        out_dir, metrics, best_epoch, len(history), stopped_early, history, time.perf_counter() - t_start
    )


def _fit_decision(
    cfg: TrainConfig, trainer: Trainer, pred: dict[str, Any], val_counts: np.ndarray, device: torch.device
) -> dict[str, Any]:
    """``--decision fitted``: fit the count rule's offsets on the validation outputs in ``pred``, and
    re-decide ``pred["index"]`` with them. Returns the record for metrics.json: the rule, the offsets,
    and the plain rule's validation figures (and test figures, with ``--test``) to compare against."""
    if cfg.decision == "plain":
        return {"rule": "plain"}
    keys = ("accuracy", "rmse", "mae")
    c0, num_classes = cfg.classes[0], len(cfg.classes)
    plain = count_metrics(val_counts, pred["index"] + c0, cfg.classes)
    # the rule serves the run's selection metric: RMSE when models are chosen on it, else accuracy
    objective = "rmse" if cfg.selection_metric == "val_rmse" else "accuracy"
    offsets = fit_decision_offsets(
        pred["raw"], torch.as_tensor(val_counts) - c0, cfg.head, num_classes, objective=objective
    )
    pred["index"] = decode_outputs(pred["raw"], cfg.head, num_classes, offsets)[1].numpy()
    record: dict[str, Any] = {
        "rule": "fitted",
        "objective": objective,
        "offsets": [round(float(o), 4) for o in offsets],
        "val_plain": {k: plain[k] for k in keys},
    }
    if cfg.test_csv is not None:
        # Reporting only (nothing is chosen on it): what the plain rule would have scored on test.
        test, counts = _test_prediction(cfg, trainer, device)
        test_plain = count_metrics(counts, test["index"] + c0, cfg.classes)
        record["test_plain"] = {k: test_plain[k] for k in keys}
        # both rules on the same test images: is the fitted rule's gain more than the split's draw?
        fitted_index = decode_outputs(test["raw"], cfg.head, num_classes, offsets)[1].numpy()
        record["test_paired"] = paired_difference(counts, test["index"] + c0, fitted_index + c0)
    LOG.info(
        "decision offsets %s: val accuracy %.4f -> %.4f",
        record["offsets"],
        plain["accuracy"],
        float((pred["index"] + c0 == np.asarray(val_counts)).mean()),
    )
    return record


def _test_prediction(
    cfg: TrainConfig, trainer: Trainer, device: torch.device
) -> tuple[dict[str, Any], np.ndarray]:
    """The trainer's current model on ``--test`` (for reports only) and the true counts.

    Every test image, as the exported model's evaluation takes them (``--limit`` trims training data).
    """
    assert cfg.test_csv is not None
    rows, paths = _load_split(Path(cfg.test_csv), replace(cfg, limit=None), "test")
    cache = build_cache(
        rows, paths, cfg.image_size, cfg.cache_dir, workers=cfg.decode_workers, progress=cfg.progress
    )
    return trainer.predict(DeviceImages(cache, device), tta=cfg.tta), np.asarray(cache.counts)


REFIT_DIR = "refit"


def refit_train_val(cfg: TrainConfig, weights: str, epochs: int) -> TrainResult:
    """``--refit``: the selected run's recipe trained again on train + val, stopped after ``epochs``.

    Why: with a few thousand images, the validation split is data the selected model never learnt
    from. Once val has chosen the epoch (and the count rule), the same start (``weights``: the
    pretrained backbone, if any), seed and schedule (it still spans ``--epochs``) on train + val give
    that epoch's counterpart with ~20 % more data. Val figures cannot score it (val is trained on):
    test only reports it. Written under ``MODEL_DIR/refit``; resumes with the run (``--resume``).
    """
    train_rows, train_paths = _load_split(Path(cfg.train_csv), cfg, "train")
    val_rows, val_paths = _load_split(Path(cfg.val_csv), cfg, "val")
    rows = _absolute(train_rows + val_rows, train_paths + val_paths)
    stage = _stage_config(
        cfg,
        Path(cfg.out_dir) / REFIT_DIR,
        rows,
        "train_val.csv",
        weights=weights,
        limit=None,  # the rows above are already limited
        stop_after=epochs,  # the schedule still spans cfg.epochs
        model_name=f"{cfg.model_name}-refit",
    )
    LOG.info(
        "refit on train + val (%d images) for %d of %d epochs; its val figures are of trained-on images",
        len(rows),
        epochs,
        cfg.epochs,
    )
    return train(stage)


def _refit(
    cfg: TrainConfig,
    weights: str,
    best_epoch: int,
    trainer: Trainer,
    offsets: list[float] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Run :func:`refit_train_val`; its record for metrics.json.

    With ``--test``, the record keeps the val-selected model's test figures (count rule included) to
    compare the refit against; they must be taken before the refit's weights replace it.
    """
    selected: dict[str, Any] | None = None
    if cfg.test_csv is not None:
        test, counts = _test_prediction(cfg, trainer, device)
        c0, num_classes = cfg.classes[0], len(cfg.classes)
        index = decode_outputs(
            test["raw"], cfg.head, num_classes, None if offsets is None else torch.tensor(offsets)
        )[1].numpy()
        m = count_metrics(counts, index + c0, cfg.classes)
        selected = {k: m[k] for k in ("accuracy", "rmse", "mae", "n")}
    stage = refit_train_val(cfg, weights, best_epoch)
    record: dict[str, Any] = {
        "dir": str(stage.model_dir),
        "images": stage.metrics["n_train"],
        "epochs": stage.epochs_run,
        # a resumed, finished stage reports its first run's time, not the reload's
        "seconds": stage.metrics.get("train_seconds", stage.seconds),
    }
    if selected is not None:
        record["test_selected"] = selected
    return record


def _export(
    cfg: TrainConfig,
    model: nn.Module,
    train_rows: list[Any],
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    out_dir: Path,
    offsets: list[float] | None = None,
) -> None:
    """ONNX + state dict + model.json, then test figures (through the ONNX model), plots and card."""
    from components.model_card import write_model_card
    from components.plots import save_confusion_matrix, save_training_curves

    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    graph = AverageModel([model], flips=True) if cfg.tta else model
    export_onnx(graph, cfg.head, cfg.classes, cfg.image_size, out_dir / ONNX_FILE, offsets=offsets)
    _atomic_torch_save(model.state_dict(), out_dir / STATE_DICT_FILE)
    spec = ModelSpec(
        classes=cfg.classes,
        head=cfg.head,
        preprocess=PreprocessSpec(image_size=cfg.image_size),
        name=cfg.model_name,
        version=cfg.version,
        training_data_sha256=data_hash(train_rows),
        metrics={"val": {k: metrics["val"][k] for k in ("accuracy", "rmse", "mae", "n")}},
        params=cfg.to_params(),
        decision_offsets=None if offsets is None else tuple(offsets),
    )
    spec.save(out_dir)
    if cfg.test_csv is not None:
        from components.evaluate import evaluate

        test = evaluate(
            out_dir,
            Path(cfg.test_csv),
            out_dir / "test_eval",
            data_root=cfg.data_root,
            progress=cfg.progress,
            num_threads=cfg.num_threads,
        )
        metrics["test"] = {
            k: test[k]
            for k in (
                "accuracy",
                "rmse",
                "mae",
                "rmse_expected",
                "n",
                "per_class_accuracy",
                "confusion_matrix",
                "intervals",
            )
        }
        spec.metrics["test"] = {k: test[k] for k in ("accuracy", "rmse", "mae", "n")}
        spec.save(out_dir)
    save_confusion_matrix(
        metrics["val"]["confusion_matrix"],
        list(cfg.classes),
        out_dir / CONFUSION_PNG,
        title=f"validation (epoch {metrics['best_epoch']}): accuracy {metrics['val']['accuracy']:.3f}",
    )
    save_training_curves(history, out_dir / CURVES_PNG)
    atomic_write_json(out_dir / METRICS_FILE, {**metrics, "history": history})
    write_model_card(out_dir, spec, metrics)


# --------------------------------------------------------------------------------------- benchmark


def benchmark_throughput(
    image_size: int = 224,
    batch_size: int = 256,
    steps: int = 50,
    warmup: int = 10,
    *,
    device: str = "auto",
    head: str = "ordinal",
    compile: bool = False,
    channels_last: bool = True,
    amp: bool = True,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Training images/s of the real train step (augmentation included) on synthetic uint8 batches."""
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    cfg = TrainConfig(
        Path("."),
        Path("."),
        Path("."),
        image_size=image_size,
        batch_size=batch_size,
        head=head,
        compile=compile,
        channels_last=channels_last,
        amp=amp,
        device=str(dev),
    )
    trainer = Trainer(cfg, dev, steps + warmup)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(
        0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, device=dev, generator=g
    )
    y = torch.randint(0, len(cfg.classes), (batch_size,), device=dev, generator=g)
    t_compile = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(x, y)
    if trainer.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(x, y)
    loss.item()
    if trainer.cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "images_per_s": steps * batch_size / dt,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_seconds": t0 - t_compile,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "bf16_autocast": trainer.amp,
        "channels_last": trainer.channels_last,
        "compile": compile,
        "head": head,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig(Path("."), Path("."), Path("."))
    p = argparse.ArgumentParser(prog="python -m components.train", description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, type=Path, help="training manifest CSV")
    p.add_argument("--val", required=True, type=Path, help="validation manifest CSV (model selection)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument(
        "--test", type=Path, default=None, help="optional test manifest: reported, never selected on"
    )
    p.add_argument("--data-root", type=Path, default=None, help="directory the manifest paths are under")
    p.add_argument(
        "--classes", default=",".join(map(str, d.classes)), help="consecutive counts, e.g. 1,2,3,4,5"
    )
    p.add_argument("--head", default=d.head, choices=HEADS)
    p.add_argument("--weights", default=d.weights, help="imagenet | none | PATH to a state dict")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", default=d.optimizer, choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup then cosine)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--aug-strength", type=float, default=d.aug_strength, help="0 = no augmentation")
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    p.add_argument("--ema", type=float, default=d.ema, help="weight EMA decay per step (0 = off)")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs (0 = off)")
    p.add_argument("--selection-metric", default=d.selection_metric, choices=SELECTION_METRICS)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue MODEL_DIR's run (same settings and data)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use at most N images per manifest (smoke runs)")
    p.add_argument("--cache-dir", type=Path, default=None, help="uint8 image cache (default ~/.cache/...)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    p.add_argument("--tta", action="store_true", help="average the 4 flips (validation and exported graph)")
    p.add_argument(
        "--decision",
        choices=DECISIONS,
        default=d.decision,
        help="count rule: the head's own, or offsets fitted on val for accuracy (baked into the graph)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after val chose the epoch (and rule), train again on train + val up to that epoch and export "
        "that model (under MODEL_DIR/refit; val figures stay the selected run's, test reports both)",
    )
    p.add_argument(
        "--teacher",
        nargs="+",
        default=[],
        metavar="MODEL_DIR",
        help="distil from these trained models (their mean output) on the same augmented images",
    )
    p.add_argument(
        "--distill-weight", type=float, default=d.distill_weight, help="share of the loss from the teacher"
    )
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument(
        "--pretrain-extra",
        type=Path,
        default=None,
        metavar="CSV",
        help="manifest of images with other counts (0, 6+) for a pretraining stage on every count",
    )
    p.add_argument(
        "--pretrain-data-root",
        type=Path,
        default=None,
        help="directory the --pretrain-extra paths are under (default: as for any manifest)",
    )
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=d.pretrain_epochs,
        help="first train on --train plus --pretrain-extra for N epochs, then fit from that backbone",
    )
    p.add_argument(
        "--pretrain-count-cap",
        type=int,
        default=d.pretrain_count_cap,
        help="counts above this are this in pretraining",
    )
    p.add_argument(
        "--pretrain-objective",
        choices=PRETRAIN_OBJECTIVES,
        default=d.pretrain_objective,
        help="what the stage learns: counts 0..cap (needs --pretrain-extra) or contrastive (SimCLR views, "
        "no labels; --pretrain-extra optional)",
    )
    p.add_argument(
        "--pretrain-temperature",
        type=float,
        default=d.pretrain_temperature,
        help="NT-Xent temperature of the contrastive stage",
    )
    p.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run only the pretraining stage (MODEL_DIR/pretrain) for other fits or a tune to start "
        "from with --weights MODEL_DIR/pretrain/model.pt",
    )
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints"
    )
    p.add_argument("--model-name", default=d.model_name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """argparse namespace -> validated TrainConfig."""
    cfg = TrainConfig(
        train_csv=args.train,
        val_csv=args.val,
        out_dir=args.out,
        test_csv=args.test,
        data_root=args.data_root,
        classes=tuple(parse_int_list(args.classes, name="--classes")),
        head=args.head,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        aug_strength=args.aug_strength,
        warmup_frac=args.warmup_frac,
        ema=args.ema,
        patience=args.patience,
        selection_metric=args.selection_metric,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        num_threads=args.num_threads,
        max_steps_per_epoch=args.max_steps_per_epoch,
        limit=args.limit,
        cache_dir=args.cache_dir,
        compile=args.compile,
        amp=args.amp,
        eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every,
        tta=args.tta,
        decision=args.decision,
        refit=args.refit,
        teacher=tuple(args.teacher),
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        pretrain_extra=args.pretrain_extra,
        pretrain_data_root=args.pretrain_data_root,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_count_cap=args.pretrain_count_cap,
        pretrain_objective=args.pretrain_objective,
        pretrain_temperature=args.pretrain_temperature,
        model_name=args.model_name,
        version=args.version,
        progress=args.progress,
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exits 2 with ``error: ...`` on configuration errors."""
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = config_from_args(args)
        if args.pretrain_only:
            stage = pretrain_backbone(cfg)
            print(f"backbone written to {stage.model_dir / STATE_DICT_FILE}")
            if stage.metrics.get("knn_val_accuracy") is not None:
                start, end = stage.metrics["knn_val_accuracy_start"], stage.metrics["knn_val_accuracy"]
                print(f"k-NN val accuracy on its features: {start:.4f} at the start, {end:.4f} at the end")
            return 0
        result = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [
        [f"{split}_{k}", m[k], range_text(m["intervals"][k]) if "intervals" in m else ""]
        for split in ("val", "test")
        if (m := result.metrics.get(split))
        for k in ("accuracy", "rmse", "mae")
    ]
    selected = result.metrics.get("refit", {}).get("test_selected")
    if selected:  # --refit: the exported model's test figures above, the val-selected run's here
        rows += [[f"test_{k} (val-selected run)", selected[k], ""] for k in ("accuracy", "rmse", "mae")]
    rows += [
        ["best_epoch", result.best_epoch, ""],
        ["epochs_run", result.epochs_run, ""],
        ["train_images_per_s", result.metrics.get("train_images_per_s", 0.0), ""],
    ]
    print(format_table(rows, ["metric", "value", "95% interval"]))
    print(f"model written to {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
