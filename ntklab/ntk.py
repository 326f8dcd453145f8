"""The empirical neural tangent kernel of a PyTorch model (book chapter 1, Primer).

For a network f(x; theta) with k outputs, the empirical NTK (Jacot, Gabriel & Hongler 2018) is

    Theta(x, x')[a, b] = < d f_a(x) / d theta , d f_b(x') / d theta >,

summed over every trainable parameter. It is the kernel of the model linearised around its current
parameters; Li et al. (arXiv 2312.02236), Tsilivis & Kempe (NeurIPS 2022) and Loo et al.
(NeurIPS 2022) all study how it changes under (adversarial) training.

One entry point, :func:`empirical_ntk`, with two implementations checked against each other and
against a plain loop over ``torch.autograd.grad`` in ``tests/test_ntk.py``:

* ``"jacobian"``: the reference, as in the torch.func NTK tutorial: per-sample Jacobians from
  ``vmap(jacrev(functional_call))`` contracted with ``einsum``. Simple, general, and slow and
  memory-hungry (it holds n x k x #params numbers per block).
* ``"structured"``: per-layer structure (Novak et al. 2022, "Fast Finite Width Neural Tangent
  Kernel"): a linear layer's block is the elementwise product of the Gram matrix of its inputs and
  the Gram matrix of the gradients with respect to its outputs; conv and batch-norm layers use small
  per-sample gradients; anything unrecognised falls back to torch.func for those parameters
  alone (see ``ntklab/_ntk_structured.py`` and ``ntklab/_ntk_record.py``).

``"auto"`` (the default) takes ``"structured"`` unless the samples of a batch are not independent
in eval mode (batch norm without running statistics) or no parametrised operation is recognised.
``bench/ntk.py`` measures both side by side.
"""
from __future__ import annotations

import math
import operator
import os

import torch
from torch import nn

from ntklab import _checks
from ntklab import _ntk_structured as _st
from ntklab.bn import eval_mode
from ntklab._ntk_record import record
from ntklab._ntk_structured import gram_add

__all__ = ["empirical_ntk", "KINDS", "IMPLEMENTATIONS"]

KINDS = ("full", "trace", "diagonal", "logit")
IMPLEMENTATIONS = ("auto", "jacobian", "structured")
BLOCK_BYTES = 1 << 29          # features of a block of inputs, when chunk_size is None
MICRO_BYTES = 1 << 29          # activations of a micro-batch inside a block ("structured")


def empirical_ntk(model: nn.Module, x1, x2=None, *, kind: str = "full", logit: int | None = None,
                  implementation: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """The empirical NTK of ``model`` between the inputs ``x1`` and ``x2`` (introduced in chapter 1, Primer).

    Entry ``[i, j, a, b]`` of the full kernel is ``<d f_a(x1[i])/d theta, d f_b(x2[j])/d theta>``,
    with theta every parameter of ``model`` that has ``requires_grad`` (Jacot et al. 2018; the
    kernel whose evolution Li et al., arXiv 2312.02236, follow under adversarial training).

    Args:
        model: a module mapping a batch (n, ...) to logits (n, k). It is evaluated in eval mode
            (batch norm uses its running statistics); its modes, parameters and buffers are as
            before afterwards, also after an exception.
        x1: inputs (n1, ...), e.g. images (n1, C, H, W) in [0, 1].
        x2: inputs (n2, ...) with the feature shape of x1; ``None`` means x1 (only half of the
            symmetric kernel is computed).
        kind: ``"full"`` -> (n1, n2, k, k); ``"trace"`` -> (n1, n2), the sum over a of [i, j, a, a];
            ``"diagonal"`` -> (n1, n2, k), the [i, j, a, a]; ``"logit"`` -> (n1, n2), [i, j, a, a]
            for the single output ``a = logit``.
        logit: the output index in [0, k) for ``kind="logit"`` (only then).
        implementation: ``"auto"``, ``"structured"`` (structured derivatives, Novak et al. 2022) or
            ``"jacobian"`` (the torch.func reference).
        chunk_size: inputs per block; at most two blocks of per-sample features exist at a time,
            so memory is bounded. The result does not depend on it (up to rounding). ``None``: blocks
            whose features take about 512 MiB. ``"structured"`` also runs the forward and backward
            passes of a block in micro-batches whose activations take about 512 MiB.

    Returns:
        A tensor on the model's device, in the dtype of the model's parameters (float32 usually).

    Raises:
        ValueError: inputs without a batch dimension or of different feature shapes, inputs that
            are not floating point (convert uint8 images with ``x.float() / 255``) or hold NaN or
            infinite values, an unknown ``kind`` or ``implementation``, ``logit`` missing, out of
            range or given for another kind, a model without trainable parameters, ``chunk_size <
            1``, an output that is not (n, k), or ``"structured"`` on a model whose samples are not
            independent in eval mode.

    Example:
        >>> model = ntklab.models.SmallCNN(width=4)
        >>> K = empirical_ntk(model, x[:8], kind="trace")        # (8, 8)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; "
                         f"expected one of {', '.join(map(repr, IMPLEMENTATIONS))}")
    if kind == "logit":
        if logit is None:
            raise ValueError("kind='logit' needs logit=<output index>")
        try:
            logit = operator.index(logit)
        except TypeError:
            raise ValueError(f"logit must be an integer output index, got {logit!r}") from None
    elif logit is not None:
        raise ValueError(f"logit is only used with kind='logit', got kind={kind!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    params = {nm: p for nm, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): its NTK is zero")
    ref = next(iter(params.values()))
    x1 = _as_batch(x1, "x1", ref)
    if x2 is not None:
        x2 = _as_batch(x2, "x2", ref)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 and x2 must have the same feature shape, got {tuple(x1.shape[1:])} "
                             f"and {tuple(x2.shape[1:])}")
    with eval_mode(model), torch.enable_grad():
        return _compute(model, params, x1, x2, kind, logit, implementation, chunk_size)


def _as_batch(x, name, ref):
    """Inputs as a floating batch on the parameters' device and in their dtype. Integer inputs are
    refused (uint8 images in 0-255 would give a kernel 255^2 times too large), and so are NaN or
    infinite values anywhere in the batch."""
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch of shape (n, ...) with at least 2 dimensions, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one input, got shape {tuple(x.shape)}")
    _checks.floating_batch(name, x)
    return x.detach().to(device=ref.device, dtype=ref.dtype)


def _distinct_probe(x1, x2) -> torch.Tensor:
    """Two inputs to test the model with: the first of x1 and the last of x2 (or x1), the second
    moved when they coincide, so that a model mixing the samples of a batch (batch statistics)
    shows it: two equal inputs have the same outputs whether the model mixes them or not."""
    a, b = x1[:1], (x1 if x2 is None else x2)[-1:]
    if torch.equal(a, b):
        b = 0.5 * b + 0.25 + 0.1 * torch.linspace(-1, 1, b.numel(), dtype=b.dtype, device=b.device).reshape(b.shape)
    return torch.cat([a, b])


def _check_output_fits(shape, dtype, device) -> None:
    """Refuse a kernel larger than the memory available on ``device`` before allocating it."""
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    free = _free_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"the kernel of shape {tuple(shape)} needs {need / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB free on {device}: use kind='trace' (n1 x n2), fewer inputs, or "
                         f"compute it in row blocks (x1 in slices against x2)")


def _free_bytes(device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: the driver's count; CPU: available physical pages), or None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu" and hasattr(os, "sysconf"):
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError):
        return None
    return None


def _compute(model, params, x1, x2, kind, logit, implementation, chunk_size):
    names = {id(p): nm for nm, p in params.items()}
    probe = _distinct_probe(x1, x2)
    with torch.no_grad():  # the output's type first: tuples and dicts are not logits
        out = model(probe)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor of logits (n, k), got a {type(out).__name__}: wrap it so "
                         f"that forward returns the logits alone")
    y, rec, generic = record(model, probe, names)
    if y.dim() != 2 or y.shape[0] != 2:
        raise ValueError(f"the model must map (n, ...) inputs to logits (n, k), got output shape "
                         f"{tuple(y.shape)} for 2 inputs")
    k = y.shape[1]
    if kind == "logit" and not 0 <= logit < k:
        raise ValueError(f"logit must be in [0, {k}) for a model with {k} outputs, got {logit}")
    with torch.no_grad():
        alone = model(probe[:1])
    scale = y.detach().abs().max().item() + 1e-12
    coupled = rec.coupled or not torch.allclose(y.detach()[:1], alone, rtol=1e-3, atol=1e-4 * scale)
    all_generic = generic >= set(params)
    if implementation == "structured" and coupled:
        raise ValueError("implementation='structured' needs the samples of a batch to be independent in "
                         "eval mode, but this model mixes them (e.g. batch norm without running "
                         "statistics); use implementation='jacobian', which treats each input alone")
    if implementation == "auto":
        implementation = "jacobian" if coupled or all_generic else "structured"
    kk = 1 if kind == "logit" else k
    itemsize = next(iter(params.values())).element_size()
    numel = {nm: p.numel() for nm, p in params.items()}
    if implementation == "jacobian":
        kept = 2 * kk * sum(numel.values()) * itemsize
        block = chunk_size or max(1, int(BLOCK_BYTES // kept))
        feats = lambda x, self_only=False: _st.func_jacobians(model, x, list(params), logit)   # noqa: E731
        contract = _contract_jacobian
    else:
        kept, transient = _st.bytes_per_sample(rec, generic, numel, kk, kind, itemsize)
        block = chunk_size or max(1, int(BLOCK_BYTES // max(kept, 1)))
        micro = max(1, min(block, int(MICRO_BYTES // max(transient, 1))))
        feats = lambda x, self_only=False: _st.structured_features(   # noqa: E731
            model, x, names, generic, k, kind, logit, micro, self_only)
        contract = _contract_structured
    del y, rec
    return _blocked(feats, contract, x1, x2, block, kind, kk, next(iter(params.values())).dtype)


def _blocked(feats, contract, x1, x2, chunk, kind, k, dtype):
    """Fill the kernel block by block; at most two blocks of features are alive at a time.

    Without x2 only blocks (i, j >= i) are computed, j descending, so that the features of block
    i + 1 computed for (i, i + 1) are the row features of the next row: B blocks cost
    B (B + 1) / 2 - (B - 1) feature computations.
    """
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    shape = {"full": (n1, n2, k, k), "diagonal": (n1, n2, k)}.get(kind, (n1, n2))
    _check_output_fits(shape, dtype, x1.device)
    out = torch.empty(shape, dtype=dtype, device=x1.device)
    rows = [slice(s, min(s + chunk, n1)) for s in range(0, n1, chunk)]
    cols = rows if x2 is None else [slice(s, min(s + chunk, n2)) for s in range(0, n2, chunk)]
    cached = following = None
    for i, r in enumerate(rows):
        # A single symmetric block is contracted only with itself, which lets "structured" skip
        # storing its largest per-sample gradients (trace, diagonal and logit kinds).
        fa = following if following is not None else feats(x1[r], self_only=x2 is None and len(rows) == 1)
        following = None
        order = range(len(cols) - 1, i - 1, -1) if x2 is None else range(len(cols))
        for j in order:
            c = cols[j]
            if x2 is None:
                fb = fa if j == i else feats(x1[c])
                if j == i + 1:
                    following = fb
            elif len(cols) == 1:
                cached = feats(x2[c]) if cached is None else cached
                fb = cached
            else:
                fb = feats(x2[c])
            block = contract(fa, fb, kind)
            out[r, c] = block
            if x2 is None and j != i:
                out[c, r] = block.transpose(0, 1).transpose(2, 3) if kind == "full" else block.transpose(0, 1)
            del fb, block
    return out


_EINSUM = {"full": "iaf,jbf->ijab", "trace": "iaf,jaf->ij", "diagonal": "iaf,jaf->ija", "logit": "iaf,jaf->ij"}


def _contract_jacobian(ja, jb, kind):
    """The tutorial's contraction: one einsum per parameter, summed."""
    eq = _EINSUM[kind]
    return sum(torch.einsum(eq, ja[nm].flatten(2), jb[nm].flatten(2)) for nm in ja)


def _contract_structured(fa: _st.Features, fb: _st.Features, kind):
    """Sum of the materialised Gram terms and the factored sum_pq (A A^T) * (G G^T) terms of two blocks.

    Features are laid out (k, n, ...), so the rows of a full Gram are ordered (a, i).
    """
    same, na, nb, k, opts = fa is fb, fa.n, fb.n, fa.k, fa.opts
    if (fa.self_gram is not None or fb.self_gram is not None) and not same:
        raise RuntimeError("features reduced to their own Gram matrix cannot be contracted with others")
    if kind == "full":
        acc = torch.zeros(k * na, k * nb, **opts)
        for m1, m2 in zip(fa.mats, fb.mats):
            gram_add(acc, m1.reshape(k * na, -1), m2.reshape(k * nb, -1), same)
        acc4 = acc.view(k, na, k, nb)
    else:
        acc4 = torch.zeros(k, na, nb, **opts) if fa.self_gram is None else fa.self_gram.clone()
        for m1, m2 in zip(fa.mats, fb.mats):                       # diagonal; trace and logit sum it
            acc4.baddbmm_(m1, m2.transpose(1, 2))
    for (a1, g1), (a2, g2) in zip(fa.factored, fb.factored):
        P = a1.shape[1]
        sa = gram_add(torch.zeros(na * P, nb * P, **opts), a1.reshape(na * P, -1), a2.reshape(nb * P, -1), same)
        if P == 1 and kind == "full":
            gg = gram_add(torch.zeros(k * na, k * nb, **opts), g1.reshape(k * na, -1),
                           g2.reshape(k * nb, -1), same)
            acc4.addcmul_(sa[None, :, None, :], gg.view(k, na, k, nb))
        elif P == 1:
            acc4.addcmul_(sa[None], torch.bmm(g1.squeeze(2), g2.squeeze(2).transpose(1, 2)))
        else:
            sa = sa.view(na, P, nb, P)
            pairs = [(a, b) for a in range(k) for b in range(k)] if kind == "full" else [(a, a) for a in range(k)]
            for a, b in pairs:
                gg = (g1[a].reshape(na * P, -1) @ g2[b].reshape(nb * P, -1).T).view(na, P, nb, P)
                (acc4[a, :, b] if kind == "full" else acc4[a]).add_((sa * gg).sum((1, 3)))
    if kind == "full":
        return acc4.permute(1, 3, 0, 2)
    if kind == "diagonal":
        return acc4.permute(1, 2, 0)
    return acc4.sum(0)
