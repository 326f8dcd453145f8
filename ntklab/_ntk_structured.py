"""Structured per-layer NTK features (private; the public entry point is :func:`ntklab.ntk.empirical_ntk`).

The empirical NTK is a sum over parameters of inner products of per-sample gradients. For a linear
map ``y = x W^T + b`` the per-sample gradient of output ``a`` with respect to ``W`` is the outer
product ``g_a(x) x^T`` of the gradient with respect to the layer's output and the layer's input, so

    <dW_a(x_i), dW_b(x_j)> = (x_i . x_j) (g_a(x_i) . g_b(x_j)),

an elementwise product of two small Gram matrices. Nothing of the size of ``W`` per sample is
ever built. This is the idea of "structured derivatives" in Novak, Sohl-Dickstein & Schoenholz
(2022), "Fast Finite Width Neural Tangent Kernel", written here from scratch for PyTorch.

How the layers are found (``ntklab/_ntk_record.py``): a :class:`torch.overrides.TorchFunctionMode`
watches one forward pass and records every torch operation that touches a trainable parameter,
whatever module (or no module) issues it. Recognised operations become *uses*:

* ``linear`` / ``matmul`` with a parameter (or a transpose / reshape of one) as the weight, and
  ``conv2d`` (groups 1). Over P positions (1 for an (n, d) input; tokens; a conv's output pixels)
  the block is sum_pq (x_ip . x_jq)(g_aip . g_bjq) with x the unfolded patches for a conv. Each use
  is either *factored* (the two Gram matrices above) or *materialised* (per-sample gradients
  ``g (d, P) @ x (P, d_in)``, then their Gram matrix), whichever costs fewer multiply-adds per
  pair of inputs (:func:`_plan`): factored for linear layers and late, few-pixel conv layers;
  materialised for early convs with many pixels (small weights, many positions).
* ``batch_norm`` with running statistics (eval mode): a per-channel affine map with per-sample
  gradients ``sum(g * xhat)`` and ``sum(g)``, materialised. When it alone reads a conv's output,
  both come from the BN's output gradient (:func:`_fused_producers`).

Any other operation on a parameter, and any parameter used in more than one operation (weight
sharing), makes that parameter *generic*: its per-sample gradients come from torch.func (``vmap``
of ``jacrev`` with respect to those parameters only), which is always correct.

The gradients with respect to every use's output, for all (sample, output) pairs, come from one
backward pass per output with a one-hot cotangent: in eval mode the samples of a batch are
independent (checked by the caller), so summing over the batch loses nothing. If the model
changes a recorded output in place, the forward pass is redone on copies. Forward and backward
passes run on micro-batches, so activation memory does not grow with the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from ntklab._ntk_record import _pair, record

@dataclass
class Features:
    """Per-block features of n inputs and k outputs.

    factored: pairs (A (n, P, dA), G (k, n, P, d)) over P positions (1 for a plain linear layer,
        the output pixels of a conv), with kernel[i, j, a, b] = sum_{p, q} (A_ip . A_jq) (G_aip . G_bjq);
    mats: materialised per-sample gradients, each (k, n, s), whose kernel is their Gram matrix.
    self_gram: for features built to be contracted only with themselves (one block, kinds other than
        "full"), the per-output Gram matrices (k, n, n) of the large materialised gradients, which
        were then accumulated output by output instead of being stored.
    """
    n: int
    k: int
    factored: list
    mats: list
    opts: dict              # dtype and device
    self_gram: torch.Tensor | None = None


class _Streamed:
    """A (k, n, s) slot that keeps one output's rows at a time; its Gram is accumulated per output."""

    def __init__(self, n, s, opts):
        self.buf = torch.empty(n, s, **opts)

    def __getitem__(self, index):
        return self.buf[index[1]]

    def __setitem__(self, index, value):
        self.buf[index[1]] = value


_BIG = 4096        # a materialised weight gradient at least this long gets a tensor of its own


def _geometry(u):
    """(positions P, input width per position dA, output width d) of a linear or conv2d use."""
    if u.rule == "linear":
        return u.x[0].numel() // u.x.shape[-1], u.x.shape[-1], u.out.shape[-1]
    ks = u.extra["kernel_size"]
    return u.out[0, 0].numel(), u.x.shape[1] * ks[0] * ks[1], u.out.shape[1]


def _plan(u, keep, kind, k):
    """("factored" or "materialised", weight length, bias length) for a use, by the cost per pair of inputs.

    A pair of inputs costs P^2 (dA + k' d) multiply-adds factored and k' (d dA + d) materialised, with
    k' = k^2 for the full kernel and k otherwise: factored wins for linear layers (P = 1) and for
    convolutions with few output pixels and many channels (late ResNet stages); materialised wins
    for early convolutions with many pixels.
    """
    wn, bn = (nm in keep for nm in u.names)
    if u.rule == "batch_norm":
        c = u.out.shape[1]
        return "materialised", (c if wn else 0), (c if bn else 0)
    P, dA, d = _geometry(u)
    ws, bs = (d * dA if wn else 0), (d if bn else 0)
    kk = k * k if kind == "full" else k
    factored = P * P * ((dA if wn else 0) + (1 if bn else 0) + kk * d)
    return ("factored" if factored <= kk * (ws + bs) else "materialised"), ws, bs


def gram_add(acc, m1, m2, same):
    """acc += m1 @ m2.T. When m1 is m2, row strips multiply only the upper triangle and mirror it
    (with 8 strips, 9/16 of the work)."""
    n = m1.shape[0]
    if not same or n < 256:
        return acc.addmm_(m1, m2.T)
    strips = min(8, n // 128)
    edges = [n * s // strips for s in range(strips + 1)]
    for a in range(strips):
        lo, hi = edges[a], edges[a + 1]
        block = m1[lo:hi] @ m1[lo:].T                        # (hi - lo, n - lo)
        acc[lo:hi, lo:] += block
        acc[hi:, lo:hi] += block[:, hi - lo:].T
    return acc


def func_jacobians(model, x, names, logit=None):
    """Per-sample Jacobians {name: (n, k, *shape)} with respect to ``names`` by torch.func.

    ``vmap`` over samples of ``jacrev`` of ``functional_call`` (the torch.func NTK tutorial);
    every other parameter and buffer is held constant. ``logit`` keeps one output (k = 1).
    """
    params = dict(model.named_parameters())
    diff = {nm: params[nm].detach() for nm in names}
    const = {nm: p.detach() for nm, p in params.items() if nm not in diff}
    const.update({nm: b for nm, b in model.named_buffers()})

    def f(p, xi):
        y = functional_call(model, (p, const), (xi.unsqueeze(0),)).squeeze(0)
        return y if logit is None else y[logit:logit + 1]

    return vmap(jacrev(f), (None, 0))(diff, x)


def _bmm_into(dst, a, b):
    """dst (n, p*q) <- bmm(a (n, p, m), b (n, m, q)), without a temporary when dst is contiguous."""
    if dst.is_contiguous():
        torch.bmm(a, b, out=dst.view(a.shape[0], a.shape[1], b.shape[2]))
    else:
        dst.copy_(torch.bmm(a, b).reshape(dst.shape))


def _rowdot(a, b):
    """sum over the last axis of a * b, for a and b (n, c, P) -> (n, c), without an (n, c, P) temporary."""
    n, c, P = a.shape
    return torch.bmm(a.reshape(n * c, 1, P), b.reshape(n * c, P, 1)).view(n, c)


def _patches(u):
    """The input of a use per position, (n, P, dA): for linear the input itself, for conv2d its patches.

    Conv patches are ordered (kh, kw, C) along dA, not like the weight's (C, kh, kw): the features
    are only multiplied with each other (and, in :func:`_fused_fill`, with the weight permuted the
    same way). They are gathered through a strided view of the padded input in channels-last order:
    contiguous runs of C, and patches (n, P, dA) that make the per-sample gradient g (O, P) @ patches
    a plain matrix product, measured here 1.6x faster than with (n, dA, P) patches.
    """
    n = u.x.shape[0]
    if u.rule == "linear":
        return u.x.reshape(n, -1, u.x.shape[-1])
    e = u.extra
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(e[key]) for key in ("kernel_size", "stride", "padding",
                                                                       "dilation"))
    xp = F.pad(u.x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()          # (n, hp, wp, C)
    _, hp, wp, c = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((n, ho, wo, kh, kw, c), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3))
    return view.reshape(n, ho * wo, kh * kw * c)


def _weight_matrix(u):
    """A conv use's weight as (O, kh kw C), in the order of :func:`_patches`."""
    w = u.extra["weight"]
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _conv_grads(dst, g3, patches):
    """Per-sample conv weight gradients g (n, O, P) @ patches (n, P, dA) -> (n, O, dA), written into
    dst (n, O dA) when it is contiguous; returns the product."""
    if dst.is_contiguous():
        return torch.bmm(g3, patches, out=dst.view(g3.shape[0], g3.shape[1], patches.shape[2]))
    return torch.bmm(g3, patches)


def structured_features(model, x, param_names, generic, k, kind, logit=None, micro=None,
                        self_only=False) -> Features:
    """Features of one block of inputs x (n, ...) for the structured contraction.

    The forward and backward passes run on micro-batches of ``micro`` inputs (default: all), so
    that activations take memory for a micro-batch only; the features are written into the block's
    tensors. ``self_only``: the features will only be contracted with themselves (x2 = x1 in one
    block) for a kind other than "full"; with a single micro-batch the large per-sample gradients
    are then not stored but reduced to their Gram matrix output by output (``Features.self_gram``).
    """
    params = dict(model.named_parameters())
    n, opts = x.shape[0], dict(dtype=next(iter(params.values())).dtype, device=x.device)
    micro = n if micro is None else micro
    kk = 1 if logit is not None else k
    keep = set(param_names.values()) - generic
    gen_names = sorted(generic & set(param_names.values()))
    plans, factored, mats = None, [], []
    stream = self_only and kind != "full" and micro >= n
    self_gram = torch.zeros(kk, n, n, **opts) if stream else None
    for m0 in range(0, n, micro):
        rows = slice(m0, min(m0 + micro, n))
        y, rec, chunk_generic = record(model, x[rows], param_names)
        if not chunk_generic <= generic:
            raise RuntimeError("the model used its parameters differently on this block than on the probe "
                               f"(new generic parameters {sorted(chunk_generic - generic)}); "
                               "use implementation='jacobian'")
        uses = [u for u in rec.uses if any(nm in keep for nm in u.names)]
        if plans is None:
            plans, factored, mats, shared = _allocate(uses, keep, kind, kk, n, opts,
                                                      sum(params[nm].numel() for nm in gen_names), stream)
        if len(uses) != len(plans):
            raise RuntimeError("the model used its parameters differently on this block; "
                               "use implementation='jacobian'")
        _fill(uses, plans, y, rows, kk, logit, self_gram)
        del y, rec
        if gen_names:
            off = shared.shape[2]
            for j in func_jacobians(model, x[rows], gen_names, logit).values():
                size = j[0, 0].numel()
                shared[:, rows, off - size:off] = j.reshape(j.shape[0], kk, -1).transpose(0, 1)
                off -= size
    return Features(n, kk, factored, mats, opts, self_gram)


def _allocate(uses, keep, kind, kk, n, opts, generic_size, stream=False):
    """Block tensors for every use: (how, weight slot, bias slot) with slots (k, n, ...) or A for factored.

    With ``stream`` a large weight slot is a :class:`_Streamed` buffer instead of a stored tensor.
    """
    factored, mats, plans, small = [], [], [], 0
    for u in uses:
        how, ws, bs = _plan(u, keep, kind, kk)
        if how == "factored":
            P, dA, d = _geometry(u)
            A = torch.ones(n, P, (dA if ws else 0) + (1 if bs else 0), **opts)    # [patches, 1]
            G = torch.empty(kk, n, P, d, **opts)
            factored.append((A, G))
            plans.append((how, G, A, bool(ws)))
            continue
        if ws >= _BIG and stream:
            wslot = _Streamed(n, ws, opts)
        elif ws >= _BIG:
            mats.append(torch.empty(kk, n, ws, **opts))
            wslot = mats[-1]
        else:
            wslot, small = ((small, ws) if ws else None), small + ws
        bslot, small = ((small, bs) if bs else None), small + bs
        plans.append((how, wslot, bslot, None))
    shared = None
    if small + generic_size:                   # small slots first, generic Jacobians at the end
        shared = torch.empty(kk, n, small + generic_size, **opts)
        mats.append(shared)
        view = lambda s: shared[:, :, s[0]:s[0] + s[1]] if isinstance(s, tuple) else s   # noqa: E731
        plans = [(how, view(w), view(b) if how != "factored" else b, f) for how, w, b, f in plans]
    return plans, factored, mats, shared


def _fused_producers(uses, plans):
    """{index of a conv use: index of the BN use it feeds}, for convs whose output only that BN reads.

    Then the conv's output gradient is the BN's times the BN scale, so one backward request serves
    both, and the BN weight gradient sum_p g_bn xhat = inv sum_p g_bn (conv_out - mean) needs no
    xhat: it is inv (W . M + (b_conv - mean) sum_p g_bn) with M = g_bn @ patches, the conv's
    per-sample gradient before scaling, when the patches are shorter than the P positions.
    """
    index = {id(u): i for i, u in enumerate(uses)}
    fused = {}
    for b, u in enumerate(uses):
        prod = u.extra.get("producer") if u.rule == "batch_norm" else None
        i = index.get(id(prod))
        if (i is not None and prod.rule == "conv2d" and prod.consumers == 1 and plans[i][0] == "materialised"
                and plans[i][1] is not None):
            fused[i] = b
    return fused


def _fill(uses, plans, y, rows, kk, logit, self_gram=None):
    """One backward pass per output for a micro-batch; per-use features written into rows ``rows``.

    Streamed slots (see :class:`_Streamed`) add their Gram matrix to ``self_gram[a]`` after output a.
    """
    n = rows.stop - rows.start
    fused = _fused_producers(uses, plans)
    preps = []                                 # what the per-output loop needs besides g
    for i, (u, (how, wslot, third, has_weight)) in enumerate(zip(uses, plans)):
        if how == "factored":
            if has_weight:
                third[rows, :, :_geometry(u)[1]] = _patches(u)
            preps.append(None)
        elif u.rule == "batch_norm":
            shape = (1, -1, 1)
            x = u.x.reshape(n, u.x.shape[1], -1)
            preps.append(None if i in fused.values() else
                         (x - u.extra["mean"].reshape(shape)) * u.extra["inv"].reshape(shape))       # xhat
        else:
            preps.append(None if wslot is None else _patches(u))
    asked = [i for i in range(len(uses)) if i not in fused]
    producer_of = {b: i for i, b in fused.items()}
    for a in range(kk if asked else 0):
        idx = logit if logit is not None else a
        grads = torch.autograd.grad(y[:, idx].sum(), [uses[i].out for i in asked], retain_graph=a < kk - 1,
                                    allow_unused=True)
        for i, g in zip(asked, grads):
            u, (how, wslot, bslot, _), p = uses[i], plans[i], preps[i]
            if g is None:
                g = torch.zeros_like(u.out)
            if u.rule == "linear":
                g3 = g.reshape(n, -1, g.shape[-1])                     # (n, P, d)
                if how == "factored":
                    wslot[a, rows] = g3
                    continue
                if wslot is not None:
                    _bmm_into(wslot[a, rows], g3.transpose(1, 2), p)   # summed over positions
                if bslot is not None:
                    bslot[a, rows] = g3.sum(1)
            elif u.rule == "conv2d":
                g3 = g.reshape(n, g.shape[1], -1)                      # (n, O, P)
                if how == "factored":
                    wslot[a, rows] = g3.transpose(1, 2)
                    continue
                if wslot is not None:
                    dst = wslot[a, rows]
                    m = _conv_grads(dst, g3, p)
                    if not dst.is_contiguous():
                        dst.copy_(m.reshape(dst.shape))
                if bslot is not None:
                    bslot[a, rows] = g3.sum(2)
            elif i in producer_of:                                     # conv -> batch_norm, fused
                _fused_fill(u, uses[producer_of[i]], plans[producer_of[i]], preps[producer_of[i]],
                            g.reshape(n, g.shape[1], -1), wslot, bslot, a, rows)
            else:                                                      # batch_norm in eval mode
                g3 = g.reshape(n, g.shape[1], -1)
                if wslot is not None:
                    wslot[a, rows] = _rowdot(g3, p)
                if bslot is not None:
                    bslot[a, rows] = g3.sum(2)
        for how, wslot, _, _ in plans:
            if isinstance(wslot, _Streamed):
                gram_add(self_gram[a], wslot.buf, wslot.buf, True)


def _fused_fill(bn_use, conv, plan, patches, g3, wslot, bslot, a, rows):
    """Features of a conv and the BN reading its output, from the BN output gradient g3 (n, O, P)."""
    n, out_ch = g3.shape[:2]
    e = bn_use.extra
    _, cw, cb, _ = plan
    dst = cw[a, rows]
    M = _conv_grads(dst if dst.is_contiguous() else torch.empty_like(dst), g3, patches)    # (n, O, dA)
    gsum = g3.sum(2)                                                   # (n, O)
    if wslot is not None and g3.shape[2] <= M.shape[2]:             # sum_p g (conv_out - mean), P terms
        x3 = bn_use.x.reshape(n, out_ch, -1)
        wslot[a, rows] = e["inv"] * (_rowdot(g3, x3) - e["mean"] * gsum)
    elif wslot is not None:                                            # the same through W . M, dA terms
        shift = -e["mean"] if conv.extra["bias"] is None else conv.extra["bias"] - e["mean"]
        wslot[a, rows] = e["inv"] * (torch.linalg.vecdot(M, _weight_matrix(conv)) + shift * gsum)
    if bslot is not None:
        bslot[a, rows] = gsum
    M.mul_(e["scale"][None, :, None])                                  # the conv's own gradient
    if not dst.is_contiguous():
        dst.copy_(M.reshape(n, -1))
    if cb is not None:
        cb[a, rows] = gsum * e["scale"]


def bytes_per_sample(rec, generic, param_numel, k, kind, itemsize):
    """Rough memory per input: (features kept for a block, transient activations of a micro-batch)."""
    keep = set(param_numel) - generic
    kept = k * sum(param_numel[nm] for nm in generic)
    transient = 2 * kept
    for u in rec.uses:
        transient += 4 * u.out[0].numel() + u.x[0].numel()
        if u.rule == "batch_norm":
            kept += k * sum(_plan(u, keep, kind, k)[1:])
            continue
        how, ws, bs = _plan(u, keep, kind, k)
        P, dA, d = _geometry(u)
        if how == "factored":
            kept += P * (dA + 1) + k * P * d
        else:
            kept += k * (ws + bs)
            transient += P * dA
    return kept * itemsize, transient * itemsize
