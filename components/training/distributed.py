"""Data-parallel training over several processes (torch.distributed), in torchrun's environment.

``torchrun --nproc_per_node G [--nnodes N ...] -m components.train ...`` starts one process (rank) per
device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. With ``WORLD_SIZE > 1``, :func:`init` joins the process group (nccl on CUDA, each rank on
``cuda:LOCAL_RANK``; gloo on CPU), and the training code asks this module, never torch.distributed:

* :func:`batch_part`: this rank's rows of every global batch (``--batch-size`` stays the global batch,
  drawn in the order one process would draw it); :func:`rows_of`: its share of an evaluation set;
* :func:`sync_batchnorm` (statistics over the global batch: torch's SyncBatchNorm on CUDA,
  :class:`GlobalBatchNorm2d` on CPU, where SyncBatchNorm refuses to run) and :func:`plain_batchnorm`
  (back to ``nn.BatchNorm2d`` for export); :func:`wrap` (DistributedDataParallel);
* :func:`on_main` (rank 0 does it, every rank gets its result or its error), :func:`main_first` (the
  node's first rank fills a shared cache, then the others read it), :func:`barrier`,
  :func:`broadcast_object`, :func:`gather_objects`, :func:`all_reduce_sum`.

Without torchrun (or with ``WORLD_SIZE=1``) no group is joined and every helper leaves things as they are:
one process trains exactly as before.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from components.common import ConfigError

LOG = logging.getLogger(__name__)
T = TypeVar("T")
#: how long ranks wait for rank 0 (or their node's first rank): decoding the image cache, the final
#: evaluation and export. Training collectives keep torch's default timeout.
WAIT_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class WorldInfo:
    """Where this process stands: its rank among ``world_size`` processes, and on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """torchrun's variables (absent: one process); a ConfigError names one that makes no sense."""
    env = os.environ if env is None else env

    def number(name: str, default: int | None) -> int | None:
        text = env.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not an integer (torchrun sets it)") from None

    world_size = number("WORLD_SIZE", 1) or 1
    rank = number("RANK", 0) or 0
    local_rank = number("LOCAL_RANK", rank) or 0
    local_world = number("LOCAL_WORLD_SIZE", world_size) or 1
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world:
        raise ConfigError(
            f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world_size}, "
            f"LOCAL_WORLD_SIZE={local_world}: launch with torchrun, which sets them"
        )
    addr, port = env.get("MASTER_ADDR") or None, number("MASTER_PORT", None)
    if world_size > 1 and (addr is None or port is None):
        raise ConfigError(f"WORLD_SIZE={world_size} but no MASTER_ADDR and MASTER_PORT: launch with torchrun")
    return WorldInfo(rank, world_size, local_rank, local_world, addr, port)


@dataclass
class _Group:
    info: WorldInfo
    backend: str
    #: a gloo group with a long timeout, for waiting on rank 0 and passing Python objects (CPU side)
    control: Any
    #: gloo: :class:`GlobalBatchNorm2d`'s own group, so its small all-reduces never queue behind DDP's
    #: gradient buckets on the training group
    batchnorm: Any = None


_GROUP: _Group | None = None


def world() -> WorldInfo:
    """The joined group's place, else one process (torchrun's variables alone join nothing)."""
    return _GROUP.info if _GROUP is not None else WorldInfo()


def is_distributed() -> bool:
    return _GROUP is not None


def is_main() -> bool:
    """Rank 0, the one that writes (always true in one process)."""
    return world().is_main


def _rank_device(device: torch.device, info: WorldInfo) -> torch.device:
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {device}: distributed training runs on cuda or cpu")
    if device.index is not None:
        raise ConfigError(
            f"--device {device} names one GPU, but torchrun started {info.world_size} processes: pass "
            "--device cuda (or auto), and each rank takes cuda:LOCAL_RANK"
        )
    if info.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {info.local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most "
            "as many processes per node as it has GPUs (--nproc_per_node)"
        )
    return torch.device("cuda", info.local_rank)


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group once (later calls return the same device); this rank's device.

    One process (no torchrun, or ``WORLD_SIZE=1``): nothing is joined and ``device`` is returned. Ranks
    other than 0 log warnings only."""
    global _GROUP
    if _GROUP is not None:
        return _rank_device(device, _GROUP.info)
    info = world_from_env()
    if not info.distributed:
        return device
    device = _rank_device(device, info)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
    control = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    batchnorm = dist.new_group(backend="gloo") if backend == "gloo" else None
    _GROUP = _Group(info, backend, control, batchnorm)
    atexit.register(cleanup)
    if not info.is_main:
        root = logging.getLogger()
        root.setLevel(max(root.level, logging.WARNING))
    LOG.info(
        "distributed: %d processes (%s, master %s:%s), rank 0 on %s",
        info.world_size,
        backend,
        info.master_addr,
        info.master_port,
        device,
    )
    return device


def cleanup() -> None:
    """Leave the process group (a no-op when none was joined)."""
    global _GROUP
    if _GROUP is None:
        return
    _GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if _GROUP is not None:
        dist.barrier(group=_GROUP.control)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (on its device); returned for convenience."""
    if _GROUP is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if _GROUP is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_GROUP.control)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if _GROUP is None:
        return [obj]
    out: list[Any] = [None] * _GROUP.info.world_size
    dist.all_gather_object(out, obj, group=_GROUP.control)
    return out


def cat_ranks(tensor: torch.Tensor | None) -> torch.Tensor:
    """Every rank's CPU ``tensor`` (None: an empty share) concatenated along dim 0, in rank order."""
    return torch.cat([t for t in gather_objects(tensor) if t is not None])


def _failure(e: BaseException) -> tuple[str, str]:
    return ("config" if isinstance(e, ConfigError) else "failed", str(e) or type(e).__name__)


def _raise_failure(kind: str, message: str, who: str) -> None:
    if kind == "config":
        raise ConfigError(message)
    raise RuntimeError(f"{who} failed: {message}")


def on_main(fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn``; every rank returns its result (picklable) or raises its error (a ConfigError
    as itself, anything else as a RuntimeError). The others wait meanwhile, so it is a barrier too."""
    if _GROUP is None:
        return fn()
    if _GROUP.info.is_main:
        try:
            value = fn()
        except BaseException as e:
            broadcast_object(_failure(e))
            raise
        broadcast_object(("ok", value))
        return value
    kind, value = broadcast_object(None)  # type: ignore[misc]
    if kind != "ok":
        _raise_failure(kind, value, "rank 0")
    return value  # type: ignore[no-any-return]


@contextmanager
def main_first(local: bool = True) -> Iterator[None]:
    """The first rank of each node (``local``) or rank 0 runs the block, then the others do: e.g. the
    image cache, decoded once per node and read by the node's other ranks. A failure of the first rank
    is raised on every rank."""
    if _GROUP is None:
        yield
        return
    info = _GROUP.info
    leader = info.is_local_main if local else info.is_main
    if leader:
        try:
            yield
        except BaseException as e:
            gather_objects(_failure(e))
            raise
        gather_objects(None)
        return
    for status in gather_objects(None):
        if status is not None:
            _raise_failure(*status, "the first rank")
    yield


class BatchPart(NamedTuple):
    """This rank's rows ``[start, stop)`` of every global batch of ``size`` images."""

    start: int
    stop: int
    size: int
    world_size: int

    @property
    def share(self) -> float:
        """This rank's share of the global batch: its mean loss times this, summed over ranks, is the
        global batch's mean loss."""
        return (self.stop - self.start) / self.size


def batch_part(batch_size: int) -> BatchPart | None:
    """This rank's contiguous part of each global batch (None in one process: the whole batch)."""
    if _GROUP is None:
        return None
    rank, size = _GROUP.info.rank, _GROUP.info.world_size
    if batch_size < size:
        raise ConfigError(
            f"the batch ({batch_size} images: --batch-size, or the training set if smaller) is the global "
            f"batch, split across the {size} processes: it needs at least one image per process"
        )
    return BatchPart(rank * batch_size // size, (rank + 1) * batch_size // size, batch_size, size)


def rows_of(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` rows (all of them in one process)."""
    if _GROUP is None:
        return 0, n
    rank, size = _GROUP.info.rank, _GROUP.info.world_size
    return rank * n // size, (rank + 1) * n // size


# ------------------------------------------------------------------------------------ the model side


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch normalisation over every rank's rows (SyncBatchNorm's algorithm, with CPU kernels).

    Forward: each rank's per-channel mean, sum of squared deviations and count go through one all-reduce
    (float64) and combine as in Chan et al.'s parallel variance; the rows are normalised with the global
    statistics by the fused eval-mode kernel. Backward: the local sums of ``dy`` and ``dy * x_hat`` (the
    eval-mode backward kernel's bias and weight gradients) go through one all-reduce, and complete the
    input's gradient with the global batch's mean and variance terms; the weight and bias gradients stay
    local (DDP sums them)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bn: GlobalBatchNorm2d
    ) -> torch.Tensor:
        assert _GROUP is not None
        rank, size = _GROUP.info.rank, _GROUP.info.world_size
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dims, correction=0)
        n = x.numel() // c
        table = torch.zeros(size, 2 * c + 1, dtype=torch.float64)
        table[rank] = torch.cat([mean.double().cpu(), var.double().cpu() * n, torch.tensor([float(n)])])
        dist.all_reduce(table, group=_GROUP.batchnorm)  # gloo, CPU: CUDA runs use torch's SyncBatchNorm
        means, m2s, counts = table[:, :c], table[:, c : 2 * c], table[:, 2 * c :]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean).square()).sum(0)
        if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)
            m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(g_mean.to(bn.running_mean), m)
            bn.running_var.lerp_((g_m2 / (total - 1).clamp_min(1)).to(bn.running_var), m)
        mean_f, var_f = g_mean.to(x), (g_m2 / total).to(x)
        ctx.save_for_backward(x, weight, mean_f, var_f)
        ctx.eps, ctx.total = bn.eps, float(total)
        return nn.functional.batch_norm(x, mean_f, var_f, weight, bias, False, 0.0, bn.eps)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        c, shape = x.shape[1], (1, x.shape[1]) + (1,) * (x.dim() - 2)
        gi, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, weight, mean, var, None, None, False, ctx.eps, [True, True, True]
        )
        sums = torch.cat([gb, gw]).double()  # this rank's sums of dy and dy * x_hat
        assert _GROUP is not None
        dist.all_reduce(sums, group=_GROUP.batchnorm)
        invstd = torch.rsqrt(var.double() + ctx.eps)
        scale = invstd * weight.double() / ctx.total
        # dx = invstd * w * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the global batch
        slope, offset = (-scale * invstd * sums[c:]).to(x), (-scale * sums[:c]).to(x)
        gi = gi.addcmul_(x - mean.view(shape), slope.view(shape)).add_(offset.view(shape))
        return gi, gw, gb, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's, on CPU with gloo, where torch's
    SyncBatchNorm refuses to run (:class:`_GlobalBatchNormFn`). In eval mode, or in one process, it is
    ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _GROUP is None:
            return super().forward(x)
        if not self.affine:
            raise ValueError("GlobalBatchNorm2d needs affine=True (as the ResNet's BatchNorm layers are)")
        return _GlobalBatchNormFn.apply(x, self.weight, self.bias, self)  # type: ignore[no-any-return]


def _swap_batchnorm(module: nn.Module, wanted: Callable[[nn.Module], bool], cls: type) -> nn.Module:
    """``module`` with each BatchNorm ``wanted`` picks replaced by ``cls`` sharing its parameters and
    buffers (as torch's ``convert_sync_batchnorm`` does)."""
    out = module
    if wanted(module):
        bn: Any = module
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            out.weight, out.bias = bn.weight, bn.bias
        out.running_mean, out.running_var = bn.running_mean, bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
        out.train(bn.training)
    for name, child in module.named_children():
        out.add_module(name, _swap_batchnorm(child, wanted, cls))
    return out


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm over the global batch when distributed (torch's SyncBatchNorm with nccl,
    :class:`GlobalBatchNorm2d` with gloo); ``model`` unchanged in one process."""
    if _GROUP is None:
        return model
    if _GROUP.backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_batchnorm(model, lambda m: type(m) is nn.BatchNorm2d, GlobalBatchNorm2d)


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with :func:`sync_batchnorm`'s layers back to ``nn.BatchNorm2d`` (the exported graph is
    the one a single process exports); the same modules shared, so copy first to keep the original."""
    return _swap_batchnorm(
        model, lambda m: isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm2d)), nn.BatchNorm2d
    )


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``model`` (rank 0's weights copied to every rank, gradients averaged
    over the ranks); ``model`` itself in one process. Buffers are not re-broadcast each step: the global
    BatchNorm statistics keep them equal on every rank."""
    if _GROUP is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
