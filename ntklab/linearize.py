"""Models linearised in their parameters around a checkpoint, and models centred at one (chapter 8).

* :class:`Linearized` — ``f_lin(x; theta) = f(x; theta_t) + J_t(x) (theta - theta_t)``, the
  first-order Taylor expansion of a network in its parameters around ``theta_t`` (Lee et al. 2019),
  computed with one ``torch.func.jvp`` per forward pass; with ``centered=True`` only the
  ``J_t(x) (theta - theta_t)`` term, which outputs 0 at ``theta = theta_t`` and whose kernel is the
  empirical NTK at ``theta_t`` exactly (the "centered linearised dynamics" of Loo et al. 2022). It is
  an ``nn.Module`` whose only parameters are ``theta``: :func:`ntklab.train.train` trains it and
  :mod:`ntklab.attacks` attacks it (the attacks then target the linearised model itself, as in Loo et
  al.'s code).
* :class:`Centered` — ``f(x; theta) - f(x; theta_0)``: a network minus its own output at a fixed
  reference (its initialisation), the quantity NTK theory predicts (Tsilivis & Kempe 2022,
  appendix C; Chizat et al. 2019). Chapter 7 compares it with kernel predictors.

Batch normalisation inside a linearised model is frozen: the wrapped network always runs in eval
mode (running statistics of ``theta_t``'s checkpoint, never updated), whatever the wrapper's own
mode, as in Loo et al.'s phase 2 ("frozen batch norm", their default). Every trainable parameter of
the network is linearised (BN scales and shifts and the last layer included); buffers and
parameters with ``requires_grad=False`` stay at their values.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp

from ntklab.bn import bn_layers, eval_mode

__all__ = ["Linearized", "Centered"]


class Linearized(nn.Module):
    r"""The network ``model`` linearised in its parameters around their current values ``theta_t``.

    ``forward(x) = f(x; theta_t) + J_t(x) (theta - theta_t)``, or ``J_t(x) (theta - theta_t)`` with
    ``centered=True``, where ``J_t(x)`` is the (k, p) Jacobian of the logits with respect to the
    trainable parameters at ``theta_t`` and ``theta`` (the module's only parameters, a copy of
    ``theta_t`` at construction) is what training changes. One ``torch.func.jvp`` per call gives both
    terms; autograd differentiates through it in ``theta`` (training) and in ``x`` (attacks).

    Args:
        model: any ``nn.Module`` mapping (N, ...) to logits (N, k), e.g. a
            :class:`~ntklab.models.SmallCNN`; it is deep-copied (later changes to ``model`` do not
            affect the wrapper), and the copy always runs in eval mode (BN frozen).
        centered: drop the zeroth-order term ``f(x; theta_t)`` (Loo et al.'s ``--centering``).

    Attributes: ``base`` (the frozen copy holding ``theta_t`` and the BN statistics), ``theta``
    (an ``nn.ParameterList`` in the order of ``names``), ``names`` (the linearised parameters'
    names in ``model``). ``delta()`` returns ``{name: theta - theta_t}``.

    Example::

        >>> lin = Linearized(net, centered=True)       # outputs 0 everywhere at first
        >>> ntklab.train.train(lin, train_set, strategy="pgd", epochs=1, lr=0.01, weight_decay=0,
        ...                    lr_schedule="constant")  # PGD made against lin itself

    Cost: a forward pass costs about two of the network's, a training step about three to four
    (the backward pass goes through the forward-mode derivative). Chapter 8 (Loo et al. 2022).
    """

    def __init__(self, model: nn.Module, *, centered: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        base = copy.deepcopy(model)
        self.names = [name for name, p in base.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("model has no trainable parameters (requires_grad=True) to linearise")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base.eval()
        self.centered = bool(centered)
        params = dict(base.named_parameters())
        self.theta = nn.ParameterList([nn.Parameter(params[name].detach().clone()) for name in self.names])

    def delta(self) -> dict:
        """``{name: theta - theta_t}`` (detached), the displacement from the checkpoint."""
        params = dict(self.base.named_parameters())
        return {name: (th - params[name]).detach() for name, th in zip(self.names, self.theta)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        with eval_mode(base):            # frozen BN (running statistics), no dropout
            fixed = {**dict(base.named_parameters()), **dict(base.named_buffers())}
            primals = {name: fixed.pop(name) for name in self.names}
            tangents = {name: th - primals[name] for name, th in zip(self.names, self.theta)}

            def f(params):
                return functional_call(base, {**params, **fixed}, (x,))

            out, d_out = jvp(f, (primals,), (tangents,))
        return d_out if self.centered else out + d_out

    def extra_repr(self) -> str:
        return f"centered={self.centered}, linearised tensors={len(self.names)}"


class Centered(nn.Module):
    r"""``f(x; theta) - f(x; theta_0)``: ``model`` minus a frozen copy of itself as it is now.

    ``model`` stays the trainable submodule ``net`` (train it as usual); ``reference`` is the frozen
    copy taken at construction (e.g. at initialisation), always evaluated in eval mode; its
    parameters have ``requires_grad=False``, so optimisers and :func:`ntklab.ntk.empirical_ntk` skip them. At the start
    the output is exactly 0. NTK theory predicts this difference, not ``f`` itself, by kernel
    regression (Tsilivis & Kempe 2022, appendix C: "we subtract the initial prediction"). Input
    (N, ...) as ``model`` takes it; output (N, k). Chapter 7.

    ``frozen_bn=True`` keeps the batch-norm layers of ``net`` in eval mode whatever the wrapper's
    mode (running statistics of the start, never updated), as Loo et al.'s phase 2 does for its
    nonlinear centred control (``--do_standard_second --centering``, frozen BN by default): the
    network then differs from :class:`Linearized` around the same start only by its nonlinearity
    in the parameters. Chapter 8.
    """

    def __init__(self, model: nn.Module, *, frozen_bn: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if frozen_bn not in (True, False):
            raise ValueError(f"frozen_bn must be True or False, got {frozen_bn!r}")
        self.net = model
        self.frozen_bn = frozen_bn
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        if frozen_bn:
            for m in bn_layers(self.net):
                m.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        if self.frozen_bn:
            for m in bn_layers(self.net):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) - self.reference(x)
