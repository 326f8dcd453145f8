"""Batch normalisation: its layers, their modes and their statistics, in one leaf module.

* :func:`bn_layers`, :func:`set_bn_running_stats` — the BN layers of a model, with or without
  running estimators;
* :func:`bn_mode` — a block in which every submodule is in eval mode except the BN layers, which
  are in a chosen mode (``"eval"``, ``"train"``, ``"keep"``), running buffers restored afterwards
  (the attacks craft in it; chapter 3 is about the choice); :func:`check_bn_mode` validates a mode;
* :func:`eval_mode` — the one eval-mode switch of the package (evaluation, kernels, callbacks,
  widgets), optionally warning when the model was handed over in train mode;
* :func:`refresh_bn_statistics` — the running statistics of a statistics-only pass with frozen
  weights: the eval-mode view of the network SGD actually starts from (its "initialisation kernel");
* :func:`bn_batch_statistics`, :func:`bn_dataset_statistics`, :func:`using_bn_statistics`,
  :func:`bn_statistics_gap` — the mini-batch and data-set statistics of Li et al.'s Theorem 2
  (arXiv 2312.02236), chapters 2 and 3.

This module imports no other ``ntklab`` module except ``_checks`` and ``_progress`` (a test checks
it), so that models, attacks, evaluation and training can all use it without import cycles.
Introduced in chapter 1 (Primer); BN is the subject of chapter 3.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from ntklab import _checks, _progress

__all__ = ["BN_MODES", "bn_layers", "set_bn_running_stats", "check_bn_mode", "bn_mode", "eval_mode",
           "refresh_bn_statistics", "bn_batch_statistics", "bn_dataset_statistics", "using_bn_statistics", "bn_statistics_gap"]

BN_MODES = ("eval", "train", "keep")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------ layers and modes
def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All batch-norm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_running_stats(model: nn.Module, track: bool) -> nn.Module:
    """Switch the running estimators of every BN layer on or off, in place; returns ``model``.

    Off: the running mean and variance are deleted and BN normalises with the statistics of the
    batch it sees, in train and in eval mode alike (``track_running_stats=False`` in PyTorch).
    On: fresh running buffers (mean 0, variance 1) are created if there were none; existing ones
    are kept.
    """
    for m in bn_layers(model):
        if track and m.running_mean is None:
            dev = m.weight.device if m.weight is not None else None
            m.register_buffer("running_mean", torch.zeros(m.num_features, device=dev))
            m.register_buffer("running_var", torch.ones(m.num_features, device=dev))
            m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=dev))
        elif not track:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
        m.track_running_stats = bool(track)
    return model


def check_bn_mode(mode, *, name: str = "bn_mode", allowed: Sequence[str] = BN_MODES) -> str:
    """``mode`` if it is one of ``allowed`` (a subset of :data:`BN_MODES`), else a ``ValueError``
    naming the argument ``name`` (e.g. ``"attack_bn_mode"``). The one BN-mode check of the package."""
    if mode not in allowed:
        quoted = [repr(m) for m in allowed]
        valid = (f"{quoted[0]} or {quoted[1]}" if len(quoted) == 2
                 else f"one of {', '.join(quoted)}")
        raise ValueError(f"{name} must be {valid}, got {mode!r}")
    return mode


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Within the block, every submodule of ``model`` is in eval mode except the BN layers, which
    are in ``mode``: ``"eval"`` (running statistics), ``"train"`` (statistics of the batch) or
    ``"keep"`` (each BN layer's current mode).

    PyTorch's train-mode BN also updates its running statistics at every forward pass; here every
    BN layer that is in train mode inside the block gets its running buffers (mean, variance,
    ``num_batches_tracked``) back on exit, so crafting an attack in ``"train"`` mode leaves the
    model's buffers unchanged. Every submodule's mode is restored on exit, exceptions included.
    BN layers built without running statistics (``track_running_stats=False``) use the batch
    statistics in either mode. Chapter 3 is about this choice. ``ntklab.attacks.attack_mode`` is
    the same function under its older name.

    Example::

        >>> with ntklab.bn.bn_mode(model, "train"):
        ...     logits = model(x)          # BN normalises with x's statistics; buffers kept
    """
    check_bn_mode(mode)
    flags = [(m, m.training) for m in model.modules()]
    bns = bn_layers(model)
    bn_flags = [m.training for m in bns]
    saved = []
    try:
        for m, _ in flags:
            m.training = False
        for m, was_training in zip(bns, bn_flags):
            m.training = mode == "train" or (mode == "keep" and was_training)
            if m.training:
                bufs = {k: getattr(m, k).detach().clone() for k in _BN_BUFFERS
                        if getattr(m, k, None) is not None}
                if bufs:
                    saved.append((m, bufs))
        yield model
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, value in bufs.items():
                    getattr(m, k).copy_(value)
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module, warn: str | None = None) -> Iterator[nn.Module]:
    """Within the block, every submodule of ``model`` is in eval mode (BN running statistics, no
    dropout); on exit every submodule's own mode is back, exceptions included (:func:`bn_mode`
    with ``"eval"``). The one eval-mode switch of the package.

    warn: if given (the caller's name, e.g. ``"clean_accuracy"``) and any submodule is in train
    mode, a ``UserWarning`` says so, pointing at the code that called the caller.

    Example::

        >>> with ntklab.bn.eval_mode(model), torch.no_grad():
        ...     predictions = model(x).argmax(1)
    """
    if warn is not None and any(m.training for m in model.modules()):
        warnings.warn(f"{warn}: the model is in train mode; it is evaluated in eval mode (BN running "
                      "statistics, no dropout) and its mode is restored afterwards. Call model.eval() "
                      "to silence this warning.", UserWarning, stacklevel=4)
    with bn_mode(model, "eval"):
        yield model


# ------------------------------------------------------------------ BN statistics (chapter 2, Theorem 2)
class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def _check_statistics_inputs(model: nn.Module, x) -> list:
    bns = bn_layers(model)
    if not bns:
        raise ValueError("the model has no batch-norm layer: there are no BN statistics")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"X must be a floating-point batch (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] < 1:
        raise ValueError("X is empty: expected at least one input")
    _checks.floating_batch("X", x)
    return bns


def _channel_moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares (float64) of a BN input (N, C, ...), and the count."""
    h = h.detach().double().transpose(0, 1).reshape(h.shape[1], -1)
    return h.sum(1), (h * h).sum(1), h.shape[1]


def bn_batch_statistics(model: nn.Module, X: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mini-batch statistics of every BN layer: what a train-mode forward pass on the batch
    ``X`` normalises with (Ioffe & Szegedy 2015).

    X: a batch (B, C, H, W) (images in [0, 1] for the book's models), B >= 2. Every BN layer is in
    train mode for one forward pass (each layer normalised by this batch's statistics, the layers
    before it too) and the rest in eval mode; running buffers and modes are as before afterwards
    (:func:`bn_mode`). Returns one ``(mean, var)`` pair per BN layer, in the
    order of :func:`bn_layers`: float64 tensors of shape (C_l,) on X's device, ``var`` the biased
    variance over the batch and the spatial positions (the one BN divides by, before its ``eps``).
    Li et al. (arXiv 2312.02236, Theorem 2) write them Sigma~_i and Pi~_i. Chapter 2.
    """
    bns = _check_statistics_inputs(model, X)
    if X.shape[0] < 2:
        raise ValueError("X must hold at least 2 inputs for batch statistics")
    stats: dict[int, tuple] = {}

    def hook(module, args):
        s1, s2, n = _channel_moments(args[0])
        stats[id(module)] = (s1 / n, (s2 / n - (s1 / n) ** 2).clamp_min(0))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        with bn_mode(model, "train"), torch.no_grad():
            model(X)
    finally:
        for h in handles:
            h.remove()
    return [stats[id(m)] for m in bns]


def bn_dataset_statistics(model: nn.Module, X: torch.Tensor, *, batch_size: int = 500,
                          progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The data-set statistics of every BN layer: the exact mean and (biased) variance of each BN
    layer's input over all of ``X``, layer by layer, the layers before it normalised by their own
    data-set statistics.

    These are the "global" statistics Sigma and Pi of Li et al. (arXiv 2312.02236, Theorem 2),
    computed exactly in one cumulative pass per BN layer (sums in float64), not PyTorch's momentum
    running estimates. X: inputs (N, C, H, W), e.g. a whole training set; batch_size: inputs per
    forward pass (the result does not depend on it, up to rounding). The model's modes and buffers
    are unchanged afterwards. Returns one ``(mean, var)`` pair per BN layer (order of
    :func:`bn_layers`), float64 tensors (C_l,) on the model's device. Install them with
    :func:`using_bn_statistics`. Chapter 2 (Theorem 2) and chapter 3.
    """
    bns = _check_statistics_inputs(model, X)
    _checks.count("batch_size", batch_size)
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else X.device
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    layers = range(len(bns))
    layers = _progress.bar(progress, layers, desc="BN layers", leave=False)
    for layer in layers:
        target = bns[layer]
        acc = [0.0, 0.0, 0]

        def hook(module, args):
            s1, s2, n = _channel_moments(args[0])
            acc[0], acc[1], acc[2] = acc[0] + s1, acc[1] + s2, acc[2] + n
            raise _StopForward

        handle = target.register_forward_pre_hook(hook)
        try:
            with bn_mode(model, "eval"), using_bn_statistics(model, stats + [None] * (len(bns) - layer)), \
                    torch.no_grad():
                for s in range(0, X.shape[0], batch_size):
                    try:
                        model(X[s:s + batch_size].to(device=device, dtype=ref.dtype if ref is not None else X.dtype))
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        mean = acc[0] / acc[2]
        stats.append((mean, (acc[1] / acc[2] - mean * mean).clamp_min(0)))
    return stats


def refresh_bn_statistics(model: nn.Module, X: torch.Tensor, *, batch_size: int = 128, inplace: bool = False,
                          progress: bool = False) -> nn.Module:
    """The model with every BN layer's running mean and variance replaced by the average, over the
    mini-batches of ``X``, of the batch statistics a train-mode forward pass computes; the weights
    are not touched (a statistics-only pass, as ``torch.optim.swa_utils.update_bn`` does).

    Why: a freshly built network has PyTorch's default buffers (mean 0, variance 1), which no
    network SGD trains ever normalises with (train mode uses batch statistics, and the buffers move
    to data values within a few dozen batches). The eval-mode NTK of the refreshed model is the
    kernel of the network SGD starts from: the book's kernel "at initialisation" (chapters 1, 2, 4
    and 5's automatic switch). Applied to a trained model it measures how much the eval-mode kernel
    moves with the statistics alone (chapter 4's floor).

    X: inputs (N, C, H, W), e.g. the training images, in [0, 1]; batch_size: the training batch
    size (batch statistics depend on it); inplace: refresh ``model`` itself instead of a deep copy.
    Layers without running statistics (and models without BN) are left as they are. Returns the refreshed model, in the
    train/eval mode ``model`` was in. Introduced in chapter 1 (Primer).
    """
    import copy

    if bn_layers(model):
        _check_statistics_inputs(model, X)
    _checks.count("batch_size", batch_size)
    target = model if inplace else copy.deepcopy(model)
    tracked = [m for m in bn_layers(target) if m.track_running_stats and m.running_mean is not None]
    if not tracked:
        return target
    ref = next(iter(target.parameters()), None)
    device = ref.device if ref is not None else X.device
    dtype = ref.dtype if ref is not None else X.dtype
    saved = {m: m.momentum for m in tracked}
    try:
        for m in tracked:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        with bn_mode(target, "train"):  # BN on batch statistics, everything else in eval mode
            with torch.no_grad():
                for s in _progress.bar(progress, range(0, X.shape[0], batch_size), desc="BN statistics", leave=False):
                    target(X[s:s + batch_size].to(device=device, dtype=dtype))
            kept = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                    for m in tracked}
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
    for m, (mean, var, count) in kept.items():  # bn_mode restored the old buffers: install the new ones
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)
    return target



@contextlib.contextmanager
def using_bn_statistics(model: nn.Module, stats) -> Iterator[nn.Module]:
    """Within the block, BN layer l of ``model`` is in eval mode and normalises with ``stats[l]``:
    ``y = (x - mean) / sqrt(var + bn.eps) * weight + bias``, the statistics fixed numbers (so
    outputs and :func:`ntklab.ntk.empirical_ntk` see them as constants, not as functions of the
    parameters or of the batch).

    stats: one entry per BN layer (order of :func:`bn_layers`), each ``(mean, var)`` with tensors
    of shape (C_l,) and var >= 0, e.g. from :func:`bn_batch_statistics` or
    :func:`bn_dataset_statistics`; an entry ``None`` leaves that layer as it is. Works for layers
    with and without running statistics (``track_running_stats=False``). On exit (exceptions too)
    the layers' modes, buffers and flags are as before. Chapters 2 and 3.
    """
    bns = bn_layers(model)
    stats = list(stats)
    if len(stats) != len(bns):
        raise ValueError(f"stats needs one entry per BN layer ({len(bns)}), got {len(stats)}")
    for i, (m, entry) in enumerate(zip(bns, stats)):
        if entry is None:
            continue
        if len(entry) != 2:
            raise ValueError(f"stats[{i}] must be a pair (mean, var)")
        for name, t in zip(("mean", "var"), entry):
            if not isinstance(t, torch.Tensor) or t.shape != (m.num_features,):
                raise ValueError(f"stats[{i}] {name} must be a tensor of shape ({m.num_features},), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not torch.isfinite(t).all():
                raise ValueError(f"stats[{i}] {name} has non-finite values")
        if (entry[1] < 0).any():
            raise ValueError(f"stats[{i}] var must be >= 0")
    saved = [(m, m.training, m.track_running_stats, m.running_mean, m.running_var) for m in bns]
    try:
        for m, entry in zip(bns, stats):
            if entry is None:
                continue
            ref = m.weight if m.weight is not None else entry[0]
            m.running_mean = entry[0].detach().to(device=ref.device, dtype=ref.dtype).clone()
            m.running_var = entry[1].detach().to(device=ref.device, dtype=ref.dtype).clone()
            m.track_running_stats = True
            m.training = False
        yield model
    finally:
        for m, training, track, mean, var in saved:
            m.running_mean, m.running_var = mean, var
            m.track_running_stats, m.training = track, training


def bn_statistics_gap(stats, reference) -> dict[str, torch.Tensor]:
    """How far BN statistics ``stats`` are from ``reference`` (e.g. a mini-batch's from the data
    set's), per layer, in the scale-free units of the book's Theorem 2 (chapter 2):

    * ``mean``: RMS over channels of ``(mu_c - mu_ref_c) / sigma_ref_c``;
    * ``var``: RMS over channels of ``(sigma^2_c - sigma^2_ref_c) / (2 sigma^2_ref_c)``;
    * ``total``: the sum over layers of ``mean + var`` (a scalar).

    stats, reference: lists of ``(mean, var)`` pairs as returned by :func:`bn_batch_statistics`
    and :func:`bn_dataset_statistics`, layer for layer. ``sigma_ref`` includes no BN ``eps``;
    reference variances must be > 0. Returns float64 tensors: ``mean`` and ``var`` of shape
    (layers,), ``total`` of shape ().
    """
    stats, reference = list(stats), list(reference)
    if len(stats) != len(reference) or not stats:
        raise ValueError(f"stats and reference need the same number (>= 1) of layers, got "
                         f"{len(stats)} and {len(reference)}")
    mean_gap, var_gap = [], []
    for i, ((mu, var), (mu_ref, var_ref)) in enumerate(zip(stats, reference)):
        if mu.shape != mu_ref.shape or var.shape != var_ref.shape:
            raise ValueError(f"layer {i}: stats and reference have different shapes")
        if (var_ref <= 0).any():
            raise ValueError(f"layer {i}: reference variances must be > 0")
        mu, var, mu_ref, var_ref = (t.detach().double().cpu() for t in (mu, var, mu_ref, var_ref))
        mean_gap.append(((mu - mu_ref) ** 2 / var_ref).mean().sqrt())
        var_gap.append((((var - var_ref) / (2 * var_ref)) ** 2).mean().sqrt())
    mean_gap, var_gap = torch.stack(mean_gap), torch.stack(var_gap)
    return {"mean": mean_gap, "var": var_gap, "total": (mean_gap + var_gap).sum()}
