"""Recording which torch operations use which parameters (private; used by ``ntklab._ntk_structured``).

A :class:`torch.overrides.TorchFunctionMode` watches one forward pass of the model and records
every torch operation that touches a trainable parameter, whatever module (or no module) issues
it: ``linear`` / ``matmul`` (with a parameter, or a transpose or reshape of one, as the weight),
``conv2d`` (groups 1) and eval-mode ``batch_norm`` become *uses* with their input and output; any
other operation on a parameter, and a parameter used twice (weight sharing), makes the parameter
*generic*. It also notes batch norm with batch statistics (the samples are then coupled) and, per
recorded output, how many differentiable operations read it (for the conv -> batch-norm fusion).

The forward pass has PyTorch's values, but a few operations get cheaper backward passes, because
the NTK takes one backward pass per output: eval-mode batch norm is an affine map (one multiply),
ReLU multiplies by a saved 0/1 mask, max pooling of a ReLU's output scatters straight back to the
ReLU's input, and these reuse their gradient buffers from one pass to the next.
Introduced with :func:`ntklab.ntk.empirical_ntk` in chapter 1 (Primer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_B = torch._C.TensorBase
_VIEW_FUNCS = {_B.t, torch.t, _B.transpose, torch.transpose, _B.permute, torch.permute, _B.view,
               _B.reshape, torch.reshape, _B.flatten, torch.flatten, _B.contiguous, _B.squeeze,
               torch.squeeze, _B.unsqueeze, torch.unsqueeze, _B.view_as, _B.reshape_as}
_VIEW_PROPERTIES = {"T", "mT"}
_LINEAR = {F.linear}
_MATMUL = {torch.matmul, _B.matmul, _B.__matmul__, torch.mm, _B.mm}
_CONV2D = {F.conv2d}
_BATCH_NORM = {F.batch_norm}
_RELU = {F.relu, torch.relu, _B.relu}
_MAX_POOL2D = {F.max_pool2d}


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _is_view(func) -> bool:
    if func in _VIEW_FUNCS:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") in _VIEW_PROPERTIES


@dataclass
class _Use:
    """One recorded operation on parameters: its rule, parameter names, saved inputs and output."""
    rule: str                       # "linear", "conv2d" or "batch_norm"
    names: tuple                    # (weight name or None, bias name or None)
    x: torch.Tensor                 # the operation's input (detached)
    out: torch.Tensor               # the operation's output (graph node for the backward passes)
    extra: dict = field(default_factory=dict)
    version: int = 0
    consumers: int = 0              # differentiable operations that took `out` as an input


class _Recorder(TorchFunctionMode):
    """Records the operations of one forward pass that touch trainable parameters."""

    def __init__(self, param_names: dict, n: int, clone: bool = False):
        super().__init__()
        self.param_names = param_names          # id(parameter) -> name
        self.n = n
        self.clone = clone
        self.derived = {}                       # id(view of a parameter) -> (view, name)
        self.uses: list[_Use] = []
        self.outputs = {}                       # id(use.out) -> use
        self.generic: set = set()
        self.coupled = False                    # an op mixes the samples of the batch
        self.relu_inputs = {}                   # id(ReLU output) -> (output, input)

    def _name(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        name = self.param_names.get(id(t))
        if name is None and id(t) in self.derived:
            name = self.derived[id(t)][1]
        return name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func in _BATCH_NORM:
            out = _affine_batch_norm(args, kwargs)
        elif func in _RELU or func in _MAX_POOL2D:
            out = self._fast_activation(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            return out                                      # .shape, .detach(), ...: no gradient
        for t in leaves:                                    # who consumes the recorded outputs
            use = self.outputs.get(id(t))
            if use is not None and use.out is t:
                use.consumers += 1
        names = [self._name(t) for t in leaves]
        if all(nm is None for nm in names):
            return out
        roots = {nm for nm in names if nm is not None}
        if _is_view(func) and len(roots) == 1 and None not in names and isinstance(out, torch.Tensor):
            self.derived[id(out)] = (out, names[0])         # an isometric view of one parameter
            return out
        use = self._classify(func, args, kwargs, out)
        if use is None:
            self.generic.update(roots)
            return out
        self.uses.append(use)
        self.outputs[id(use.out)] = use
        use.version = use.out._version
        # With clone=True the model continues with a copy, so that an in-place op downstream
        # cannot change `use.out` (see `record`).
        return use.out.clone() if self.clone else use.out

    def _fast_activation(self, func, args, kwargs):
        """ReLU, and max pooling of a ReLU's output, with cheaper backward passes; None: not handled.

        The values are PyTorch's. The NTK takes one backward pass per output, and on the CPU
        PyTorch's ReLU backward (threshold_backward) was 5x slower here than a multiply by a saved
        0/1 mask; max-pool(ReLU(z)) goes back to z in one scatter, with the mask on the pooled side.
        """
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
            return None
        if func in _RELU:
            if _arg(args, kwargs, 1, "inplace", False):
                return None
            out = _MaskedReLU.apply(x)
            self.relu_inputs[id(out)] = (out, x)
            return out
        if _arg(args, kwargs, 6, "return_indices", False) or x.dim() != 4:
            return None
        pair = self.relu_inputs.get(id(x))
        if pair is None or pair[0] is not x:
            return None
        kernel = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride") or kernel
        settings = tuple(_pair(v) for v in (kernel, stride, _arg(args, kwargs, 3, "padding", 0),
                                             _arg(args, kwargs, 4, "dilation", 1)))
        return _ReLUMaxPool2d.apply(pair[1], x.detach(), settings, bool(_arg(args, kwargs, 5, "ceil_mode", False)))

    def _activation(self, x):
        return (isinstance(x, torch.Tensor) and self._name(x) is None and x.dim() >= 2
                and x.shape[0] == self.n)

    def _param(self, t):
        """The name of a trainable parameter argument (or of a view of one), else None.

        A bias or affine vector that is not a trainable parameter (a frozen one, a buffer) has no
        gradient of its own to count; if it is computed from parameters, the operation that computed
        it has already made them generic.
        """
        return None if t is None else self._name(t)

    def _classify(self, func, args, kwargs, out):
        if not isinstance(out, torch.Tensor):
            return None
        x = args[0] if args else kwargs.get("input")
        if func in _LINEAR or func in _MATMUL:
            w = _arg(args, kwargs, 1, "weight" if func in _LINEAR else "other")
            b = _arg(args, kwargs, 2, "bias") if func in _LINEAR else None
            wn, bn = self._param(w), self._param(b)
            if not self._activation(x) or not wn or w.dim() != 2:
                return None
            return _Use("linear", (wn, bn), x.detach(), out)
        if func in _CONV2D:
            w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
            dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
            wn, bn = self._param(w), self._param(b)
            if padding == "valid":
                padding = 0
            if not self._activation(x) or x.dim() != 4 or not wn or groups != 1 or isinstance(padding, str):
                return None
            return _Use("conv2d", (wn, bn), x.detach(), out,
                        dict(kernel_size=tuple(w.shape[2:]), stride=stride, padding=padding, dilation=dilation,
                             weight=w.detach(), bias=None if b is None else b.detach()))
        if func in _BATCH_NORM:
            parts = _eval_batch_norm(args, kwargs)
            if parts is None:
                self.coupled = True                  # batch statistics: samples are not independent
                return None
            _, rm, w, b, inv, scale = parts
            wn, bn = self._param(w), self._param(b)
            if not self._activation(x):
                return None
            producer = self.outputs.get(id(x))
            return _Use("batch_norm", (wn, bn), x.detach(), out,
                        dict(mean=rm.detach(), inv=inv.detach(), scale=scale.detach(),
                             producer=producer if producer is not None and producer.out is x else None))
        return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _reused(ctx, like, key="buffer"):
    """A buffer shaped like ``like``, kept on ``ctx`` and reused by every later backward pass.

    The NTK runs one backward pass per output over the same graph, and fresh large gradients for
    every pass cost page faults (2.4 us per 4 KiB page on the benchmark machine); reusing buffers
    halved them for the SmallCNN on 256 images (about 70,000 to 35,000 per kernel). A gradient
    returned from such a buffer is valid until the next backward pass over the graph:
    ``ntklab._ntk_structured`` uses every gradient before asking for the next one, and nothing
    else differentiates a recorded graph.
    """
    buf = getattr(ctx, key, None)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        setattr(ctx, key, buf)
    return buf


class _MaskedReLU(torch.autograd.Function):
    """relu(x); backward: the output gradient times a saved 0/1 mask in x's dtype."""

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward((out > 0).to(x.dtype))
        return out

    @staticmethod
    def backward(ctx, g):
        mask, = ctx.saved_tensors
        return torch.mul(g, mask, out=_reused(ctx, mask))


class _ReLUMaxPool2d(torch.autograd.Function):
    """max_pool2d(relu(z)) as a function of z, given r = relu(z) (values only).

    With p, idx = max-pool of r, the gradient with respect to z is the pooled gradient times
    (p > 0), scattered to the positions idx: where the window's maximum is not positive, ReLU's
    derivative there is 0, so the mask moves to the pooled side.
    """

    @staticmethod
    def forward(ctx, z, r, settings, ceil_mode):
        out, idx = torch.ops.aten.max_pool2d_with_indices(r, *settings, ceil_mode)
        ctx.save_for_backward(idx, (out > 0).to(out.dtype))
        ctx.settings, ctx.ceil_mode, ctx.shape = settings, ceil_mode, z.shape
        return out

    @staticmethod
    def backward(ctx, g):
        idx, mask = ctx.saved_tensors
        like = g.new_empty(()).expand(ctx.shape)         # the input's shape; its values are not read
        grad = torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            torch.mul(g, mask, out=_reused(ctx, mask, "masked")), like, *ctx.settings, ctx.ceil_mode, idx,
            grad_input=_reused(ctx, like))
        return grad, None, None, None


class _Affine(torch.autograd.Function):
    """x * scale + shift with constant (detached) scale and shift; backward: the gradient times scale."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(scale)
        return torch.addcmul(shift, x, scale)

    @staticmethod
    def backward(ctx, g):
        scale, = ctx.saved_tensors
        return torch.mul(g, scale, out=_reused(ctx, g)), None, None


def _eval_batch_norm(args, kwargs):
    """(input, running mean, weight, bias, 1/sqrt(var + eps), weight/sqrt(var + eps)) of an
    F.batch_norm call with running statistics in eval mode; None when it uses batch statistics."""
    x, rm, rv = (_arg(args, kwargs, i, nm) for i, nm in enumerate(("input", "running_mean", "running_var")))
    w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    training, eps = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 7, "eps", 1e-5)
    if training or rm is None or rv is None:
        return None
    inv = torch.rsqrt(rv + eps)
    return x, rm, w, b, inv, (inv if w is None else w * inv)


def _affine_batch_norm(args, kwargs):
    """Eval-mode batch norm as the per-channel affine map it is, x * scale + shift; None otherwise.

    Same values as F.batch_norm, but its backward is one multiply (PyTorch's CPU batch-norm
    backward is several times slower, and the NTK needs one backward pass per output). The scale
    and shift are constants of the graph: the recorder's graph is only differentiated with respect
    to recorded outputs, and batch-norm parameters get their gradients from their own use.
    """
    parts = _eval_batch_norm(args, kwargs)
    if parts is None or not isinstance(parts[0], torch.Tensor) or parts[0].dim() < 2:
        return None
    x, rm, _, b, _, scale = parts
    shape = (1, -1) + (1,) * (x.dim() - 2)
    shift = -rm * scale if b is None else b - rm * scale
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    if not x.requires_grad:          # the output's gradient then flows only to the parameters
        return torch.addcmul(shift, x, scale)
    return _Affine.apply(x, scale.detach(), shift.detach())


def record(model, x, param_names):
    """Run ``model(x)`` under the recorder; returns (output, recorder, generic names).

    If the model changed a recorded output in place (``ReLU(inplace=True)`` after a conv, say),
    the gradients with respect to it would be wrong, so the forward pass is repeated with copies.
    """
    rec = _Recorder(param_names, x.shape[0])
    with rec:
        y = model(x)
    if any(u.out._version != u.version for u in rec.uses):
        rec = _Recorder(param_names, x.shape[0], clone=True)
        with rec:
            y = model(x)
    rec.relu_inputs.clear()                     # let activations the graph does not need go
    counts = {}
    for u in rec.uses:
        for nm in u.names:
            if nm is not None:
                counts[nm] = counts.get(nm, 0) + 1
    generic = set(rec.generic) | {nm for nm, c in counts.items() if c > 1}   # shared parameters
    return y, rec, generic
