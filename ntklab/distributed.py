"""Several processes, one run: the helpers behind ``torchrun --nproc_per_node=N``.

``torchrun`` starts N copies of a program and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_from_env`
turns that into a ``torch.distributed`` process group (NCCL on CUDA, gloo on the CPU) and, on CUDA,
makes the rank's local GPU the current device. Everything else here asks the process group, and
without one (a notebook, ``python -m ntklab run`` without torchrun, the tests) behaves as rank 0 of
a world of 1: :func:`rank` is 0, :func:`barrier` does nothing, :func:`broadcast_object` returns its
argument, so the single-process book never notices this module.

How :func:`ntklab.train.train` uses it (distributed data parallel training, chapter 9): every rank
trains the same model on its share of every global batch (:func:`shard`: positions ``r::world`` of
the epoch's permutation, so N processes see per epoch exactly the examples one process sees), the
update goes through ``torch.nn.parallel.DistributedDataParallel``, and the BN layers can normalise
with the statistics of the whole global batch (:func:`global_batch_norm`, ``TrainConfig.sync_bn``).
Evaluation, callbacks and checkpoints run on rank 0 and what they decide is broadcast
(:func:`main_only`). The result cache (:mod:`ntklab.experiments.cache`) lets rank 0 alone decide,
write and lock. A shared file system is assumed between the ranks (always true on one machine): the
other ranks read the checkpoints and results rank 0 wrote.

Why :func:`global_batch_norm` and not ``torch.nn.SyncBatchNorm``: in this torch (2.x) SyncBatchNorm
refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU ..."), so it cannot be
tested on the CPU with gloo; the book's own version (two all-reduces of per-channel sums, with
autograd through them) runs on both, and the code that runs on the GPUs is the code the tests check.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["rank", "world_size", "local_rank", "is_main", "is_distributed", "launched", "barrier",
           "broadcast_object", "all_reduce_sum", "main_only", "init_from_env", "device", "shard",
           "shard_weight", "data_parallel", "global_batch_norm", "broadcast_buffers", "BACKENDS", "TIMEOUT_ENV"]

BACKENDS = ("nccl", "gloo")
#: Seconds the other ranks wait for rank 0 (its evaluation, kernel snapshots, AutoAttack) at a
#: collective before giving up; default 3 hours (torch's own default of 10-30 minutes is shorter than
#: a paper-scale kernel snapshot).
TIMEOUT_ENV = "NTKLAB_DIST_TIMEOUT"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------ where this process is
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (with any world size)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the process group; 1 without one."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``); 0 without a process group."""
    if not is_distributed():
        return 0
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main() -> bool:
    """Whether this process is rank 0 (the one that evaluates, runs callbacks, writes and prints)."""
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# ------------------------------------------------------------------ collectives (no-ops alone)
def barrier() -> None:
    """Wait until every rank gets here; nothing without a process group (or with one process)."""
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable object) on every rank; ``obj`` itself without a process
    group. Every rank must call it (the others' ``obj`` is ignored)."""
    if world_size() == 1:
        return obj
    holder = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (and returned); unchanged without a process group.
    Not differentiable (see :func:`global_batch_norm` for the differentiable sums)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def main_only(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; its return value on every rank, or the exception it
    raised raised on every rank (so that one rank's error never leaves the others waiting at the
    next collective). Also a barrier. Without a process group: just ``fn(*args, **kwargs)``."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome, error = None, None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 -- re-raised on every rank below
            error = err
            outcome = ("error", _picklable(err))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise error if error is not None else outcome[1]
    return outcome[1]


def _picklable(err: Exception) -> Exception:
    """``err`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__} on rank 0: {err}")


# ------------------------------------------------------------------ starting
def init_from_env(backend: str | None = None, *, timeout: float | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; returns whether this
    process is now part of one (``False``, doing nothing, when not started by torchrun; ``True``
    at once when a group is already initialised).

    backend: ``"nccl"`` or ``"gloo"``; ``None``: NCCL when CUDA is available, gloo otherwise. With
        NCCL the rank's local GPU (``LOCAL_RANK``) becomes the current CUDA device, so ``cuda``
        means that GPU (:func:`device`).
    timeout: seconds a rank waits at a collective; default ``$NTKLAB_DIST_TIMEOUT`` or 3 hours (rank 0
        evaluates and takes kernel snapshots while the others wait).

    Raises ``ValueError`` for an unknown backend, a missing torchrun variable (``MASTER_ADDR``,
    ``MASTER_PORT``, ...), NCCL without CUDA, or a ``LOCAL_RANK`` beyond the GPUs present.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    if is_distributed():
        return True
    if not launched():
        return False
    missing = [name for name in _TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise ValueError(f"the environment has RANK and WORLD_SIZE but not {', '.join(missing)}: start the "
                         f"program with torchrun (torchrun --nproc_per_node=N -m ntklab run ...)")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not os.environ[name].isdigit():
            raise ValueError(f"${name} must be a non-negative integer, got {os.environ[name]!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend='gloo'")
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()} "
                             f"(start at most that many processes per node)")
        torch.cuda.set_device(local)
    seconds = _timeout(timeout)
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    atexit.register(_destroy)  # a clean exit (torch warns about a group left alive)
    return True


def _destroy() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()


def _timeout(timeout) -> float:
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        if not text:
            return 3 * 3600.0
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}") from None
        name = f"${TIMEOUT_ENV}"
    else:
        name = "timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"{name} must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def device(device: str | torch.device | None = None) -> torch.device:
    """:func:`ntklab.config.get_device` of ``device``, where ``cuda`` (without an index) means this
    rank's local GPU (``cuda:LOCAL_RANK``) under a process group."""
    from ntklab.config import get_device

    dev = get_device(device)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return dev


# ------------------------------------------------------------------ data parallel training
def shard(indices: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's share of a global batch of example indices: positions ``rank::world`` (the layout
    of ``torch.utils.data.DistributedSampler``, per batch). Over the ranks the shares partition the
    batch; with one process it is the batch itself."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return indices if world == 1 else indices[rank_::world]


def shard_weight(local: int, batch: int, world: int | None = None) -> float:
    """The factor on this rank's mean loss that makes DistributedDataParallel's gradient (the mean
    over the ranks) the gradient of the global batch's mean loss: ``world * local / batch`` (1 when
    the batch splits evenly)."""
    world = world_size() if world is None else world
    return world * local / batch


class _AllReduce(torch.autograd.Function):
    """The sum over the ranks, differentiable: the gradient of each rank's input is the sum of every
    rank's output gradient (the rule of ``torch.distributed.nn.functional.all_reduce``, which torch
    2.14 deprecates)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad)
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward (a weight on the loss of the outputs)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _UpdateModule(nn.Module):
    """What DistributedDataParallel wraps: the model, with its BN layers on global statistics
    (``sync``) and its outputs' gradient scaled by ``scale`` (:func:`shard_weight`). Its parameters
    are the model's own; its state dict is never saved (the model's is). Under ``sync_bn`` the
    attacks use it too (without DistributedDataParallel)."""

    def __init__(self, model: nn.Module, sync: bool):
        super().__init__()
        self.module, self.sync, self.scale = model, sync, 1.0

    def forward(self, x):
        with global_batch_norm(self.module, enabled=self.sync):
            out = self.module(x)
        return out if self.scale == 1.0 else _GradScale.apply(out, self.scale)


def data_parallel(model: nn.Module, device: torch.device, *, sync_bn: bool = False):
    """``(update_model, attack_model)`` for training ``model`` on this rank: the model wrapped in
    ``DistributedDataParallel`` (rank 0's parameters and buffers broadcast to every rank now, the
    gradients averaged at every backward, rank 0's buffers broadcast at every forward), and the
    model the attacks use: itself, or under ``sync_bn`` the module DistributedDataParallel wraps,
    whose BN layers use the global batch's statistics where they use batch statistics (train-mode
    crafting, no running statistics) and whose outputs carry the same weight ``scale`` (an uneven
    last batch: the sum of the ranks' weighted losses is then the global batch's mean loss up to a
    constant, so every rank's input gradient points where one process's does). Needs a process
    group; ``update_model.module.scale`` weighs uneven shards (:func:`shard_weight`)."""
    from torch.nn.parallel import DistributedDataParallel

    if not is_distributed():
        raise ValueError("data_parallel needs an initialised process group (init_from_env under torchrun)")
    import inspect

    inner = _UpdateModule(model, sync_bn)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # rank 0's buffers at every forward: torch >= 2.12 names the option forward_sync_buffers
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(inner, device_ids=ids, **{sync: True}), (inner if sync_bn else model)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) into every rank's ``model``, in place; nothing alone.
    The training loop does it after every epoch, so that the model every rank goes on from is the one
    rank 0 evaluates and checkpoints (and a resumed run is the uninterrupted one)."""
    if world_size() > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)


# ------------------------------------------------------------------ BN on global batch statistics
def _sync_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``torch.nn.BatchNorm*d.forward`` with the batch statistics of every rank's inputs together:
    mean and biased variance over the global batch by two all-reduces (of per-channel sums and
    counts, then of squared deviations from the global mean: the same two-pass arithmetic as one
    process), differentiable through the sums (the backward all-reduces the gradients, so that each
    rank's inputs get the gradient of every rank's loss). Running statistics as torch keeps them
    (unbiased variance of the global batch). Without a process group, or in eval mode with running
    statistics, torch's own forward."""
    self._check_input_dim(x)
    training = self.training or self.running_mean is None
    if not training or world_size() == 1:
        return nn.modules.batchnorm._BatchNorm.forward(self, x)  # torch's own
    all_reduce = _AllReduce.apply
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xs = x.to(torch.promote_types(x.dtype, torch.float32))
    count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=xs.dtype, device=x.device)
    sums = all_reduce(torch.cat([xs.sum(dims), count]))
    n = sums[-1]
    mean = sums[:-1] / n
    centred = xs - mean.reshape(shape)
    var = all_reduce(centred.pow(2).sum(dims)) / n
    out = centred * torch.rsqrt(var + self.eps).reshape(shape)
    if self.affine:
        out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
    if self.training and self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            unbiased = var * (n / (n - 1)) if float(n) > 1 else var
            self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)
    return out.to(x.dtype)


class _SyncBatchNorm1d(nn.BatchNorm1d):
    forward = _sync_bn_forward


class _SyncBatchNorm2d(nn.BatchNorm2d):
    forward = _sync_bn_forward


class _SyncBatchNorm3d(nn.BatchNorm3d):
    forward = _sync_bn_forward


_SYNC = {nn.BatchNorm1d: _SyncBatchNorm1d, nn.BatchNorm2d: _SyncBatchNorm2d, nn.BatchNorm3d: _SyncBatchNorm3d}


@contextlib.contextmanager
def global_batch_norm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, the ``BatchNorm1d/2d/3d`` layers of ``model`` normalise (in train mode, or
    always without running statistics) with the statistics of the global batch, every rank's inputs
    together, and update their running statistics with them; on exit they are torch's layers again.
    The layers themselves are kept (their class is swapped, their parameters and buffers and state-dict
    keys are unchanged), so the model the caller holds is the model trained. Every rank must make
    the same forward passes inside the block (each is two collectives per BN layer). Without a process
    group, or ``enabled=False``: no change.

    Which chapters need it (``TrainConfig.sync_bn``): the ones whose subject is the BN statistics of
    the training batch, chapter 3 (batch normalisation: train-mode attacks and kernels with batch
    statistics) and chapter 2's Theorem 2 (the statistics of the batch); and every chapter whose
    kernels are taken in eval mode (chapters 4-5, 8), because those kernels use the running statistics,
    which are then those of the global batch, as in one process, rather than those of rank 0's shard.
    Without it each rank normalises with its shard's statistics (DistributedDataParallel's default,
    an effective BN batch of ``batch_size / world``) and the running statistics are rank 0's.
    """
    if not enabled or world_size() == 1:
        yield model
        return
    swapped = []
    try:
        for m in model.modules():
            cls = _SYNC.get(type(m))
            if cls is not None:
                swapped.append((m, type(m)))
                m.__class__ = cls
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
