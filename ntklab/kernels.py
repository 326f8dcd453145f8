"""Infinite-width kernels, kernel regression and the kernel's eigen-features (book chapter 7).

* :func:`two_layer_ntk` — the closed-form NTK of :class:`ntklab.models.TwoLayerNet` as its width
  goes to infinity (the arc-cosine kernels of Cho & Saul 2009; Jacot et al. 2018; Arora et al.
  2019; the kernel of Tsilivis & Kempe 2022, appendix C);
* :func:`regression_weights` — the weights ``alpha`` of kernel regression, ``f(x) = K(x, X) alpha``,
  either converged (with a ridge) or after ``steps`` of full-batch gradient descent on the squared
  loss (the kernel-regime solution of a wide net, Lee et al. 2019; Tsilivis & Kempe, eq. 7);
* :func:`eigen_features` — the split of that predictor along the eigenvectors of the training Gram
  matrix, feature i being ``K(x, X) v_i g(lambda_i) v_i^T Y`` (Tsilivis & Kempe, section 4, eq. 9);
  the features sum to the predictor;
* :class:`KernelPredictor` — ``x -> K(x, X) alpha`` as an ``nn.Module`` mapping images in [0, 1]
  to logits, so that :mod:`ntklab.attacks` attacks it through autograd ("training-free" attacks,
  Tsilivis & Kempe, section 3).

Shapes: images ``x`` (N, C, H, W) in [0, 1]; ``X`` the (n, C, H, W) training images; targets ``Y``
(n, k) (one-hot rows for classification, as in the squared-loss training of Tsilivis & Kempe's
appendix C); a Gram matrix ``K`` (n, n); ``alpha`` (n, k).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ntklab._checks import number as _number

__all__ = ["two_layer_ntk", "regression_weights", "eigen_features", "KernelPredictor", "gd_filter"]

_COS_CLAMP = 1 - 1e-7   # the gradient through arccos is cut beyond this |cos| (x = x', antipodal x)


def _flat_normalised(x: torch.Tensor, mean, std, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (n, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if x.dim() == 4:   # images: the per-channel normalisation of ntklab.models.Normalize
        c = x.shape[1]
        mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1)
        std = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1)
        if mean.numel() == 1:
            mean, std = mean.expand(c), std.expand(c)
        if mean.numel() != c or std.numel() != c:
            raise ValueError(f"mean and std need one value per channel ({c}), got {mean.numel()} and {std.numel()}")
        x = (x - mean.reshape(1, c, 1, 1)) / std.reshape(1, c, 1, 1)
    return x.flatten(1)


def two_layer_ntk(x1: torch.Tensor, x2: torch.Tensor | None = None, *, net: nn.Module | None = None,
                  mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                  freeze_second: bool = True, frozen_gates: bool = False) -> torch.Tensor:
    r"""The infinite-width NTK of the two-layer ReLU net :class:`ntklab.models.TwoLayerNet`.

    That net is ``f(x) = a relu(W h) / sqrt(m)`` with ``h`` the normalised, flattened input,
    ``W_ij ~ N(0, 1)`` and ``a_cj`` uniform in {-1, +1}. As the width ``m`` grows, its empirical NTK
    converges to ``Theta(x, x') I_k`` (the same scalar kernel for every output, none across
    outputs), with, for ``theta`` the angle between ``h`` and ``h'``,

        Theta(x, x') = h.h' (pi - theta) / (2 pi)                                  (W trained)
                     + |h| |h'| (sin theta + (pi - theta) cos theta) / (2 pi)      (a trained too)

    the first and second arc-cosine kernels (Cho & Saul 2009) from E[1{w.h>0} 1{w.h'>0}] and
    E[relu(w.h) relu(w.h')]. The second term is present only with ``freeze_second=False``
    (Tsilivis & Kempe's appendix C, after Arora et al. 2019, freeze ``a``: the default).

    Args:
        x1: (n1, C, H, W) images in [0, 1] (normalised with ``mean``/``std`` per channel, as
            the net's ``Normalize`` layer does), or (n1, d) already-normalised features.
        x2: like x1, or ``None`` for x1.
        net: a :class:`~ntklab.models.TwoLayerNet` whose normalisation and ``freeze_second`` to
            use (then ``mean``, ``std`` and ``freeze_second`` are ignored).
        mean, std: per-channel statistics (``ntklab.data.stats(name)``).
        frozen_gates: the same values, but the gradient treats the angle ``theta`` as a constant:
            in ``x1`` it is then ``(pi - theta) h' / (2 pi)`` (W trained), the infinite-width input
            gradient of a net's linearisation around its initialisation, whose gates
            ``1[w_j . h > 0]`` do not move with the input. The full gradient adds the derivative of
            the arc-cosine factor, ``(h . h') / (2 pi) (-d theta / d h)``. Chapter 7.

    Returns (n1, n2) in x1's dtype, differentiable in x1 and x2. The derivative of the angle is
    singular at x = x' (and at antipodal inputs): the gradient flows through the angle only where
    |cos theta| < 1 - 1e-7, so it stays finite; the values are exact. Chapter 7.
    """
    if net is not None:
        mean, std = net.normalize.mean.flatten().tolist(), net.normalize.std.flatten().tolist()
        freeze_second = not isinstance(getattr(net, "second", None), nn.Parameter)
    if x2 is not None and isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor) and x1.dim() != x2.dim():
        raise ValueError(f"x1 and x2 must have the same layout (both images (n, C, H, W) or both features (n, d)), "
                         f"got shapes {tuple(x1.shape)} and {tuple(x2.shape)}: images are normalised, features not")
    h1 = _flat_normalised(x1, mean, std, "x1")
    h2 = h1 if x2 is None else _flat_normalised(x2, mean, std, "x2")
    if h2.shape[1] != h1.shape[1]:
        raise ValueError(f"x1 and x2 must have the same number of features, got {h1.shape[1]} and {h2.shape[1]}")
    if h2.dtype != h1.dtype:
        h2 = h2.to(h1.dtype)
    dot = h1 @ h2.T
    norms = h1.norm(dim=1)[:, None] * h2.norm(dim=1)[None, :]
    cos = (dot / norms.clamp_min(torch.finfo(h1.dtype).tiny)).clamp(-1, 1)
    # the exact angle forward; backward through a clamped cosine, so the gradient at x = x' is finite
    safe = cos.clamp(-_COS_CLAMP, _COS_CLAMP)
    theta = torch.arccos(safe) + (torch.arccos(cos) - torch.arccos(safe)).detach()
    if frozen_gates:
        theta = theta.detach()
    K = dot * (math.pi - theta) / (2 * math.pi)
    if not freeze_second:
        K = K + norms * (torch.sqrt(1 - cos ** 2) + (math.pi - theta) * cos) / (2 * math.pi)
    return K


#: the largest asymmetry max|K - K^T| / max|K| taken for rounding (and symmetrised away)
SYMMETRY_TOLERANCE = 1e-4


def _check_gram(K: torch.Tensor, Y: torch.Tensor) -> None:
    """K a real, finite, square and symmetric (up to rounding: :data:`SYMMETRY_TOLERANCE`) Gram
    matrix, Y real finite (n, k) targets."""
    if not isinstance(K, torch.Tensor) or K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square (n, n) Gram matrix, got "
                         f"{tuple(K.shape) if isinstance(K, torch.Tensor) else type(K).__name__}")
    if not isinstance(Y, torch.Tensor) or Y.dim() != 2 or Y.shape[0] != K.shape[0]:
        raise ValueError(f"Y must be (n, k) = ({K.shape[0]}, k) targets, got "
                         f"{tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__}")
    for name, t in (("K", K), ("Y", Y)):
        if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
            raise ValueError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(K).all()) or not bool(torch.isfinite(Y).all()):
        raise ValueError("K and Y must be finite")
    Kd = K.detach().double()
    scale = float(Kd.abs().max()) if K.numel() else 0.0
    asym = float((Kd - Kd.T).abs().max()) if K.numel() else 0.0
    if scale > 0 and asym > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"K must be a symmetric Gram matrix; max|K - K^T| is {asym / scale:.2g} of max|K| (rounding "
                         f"is at most {SYMMETRY_TOLERANCE:g}, and is symmetrised away): a kernel of two different "
                         f"input sets is not a Gram matrix")


def gd_filter(eigenvalues: torch.Tensor, n: int, *, ridge: float = 0.0, lr: float | None = None,
              steps: int | None = None) -> torch.Tensor:
    r"""The spectral filter ``g(lambda)`` with ``alpha = V diag(g(lambda)) V^T Y``.

    Converged (``steps=None``): ``g = 1 / (lambda + ridge)``; with ``ridge = 0`` every eigenvalue must
    be positive (a singular or indefinite matrix has no inverse: ``ValueError`` naming the smallest
    eigenvalue and the condition number; pass a ``ridge > 0``). After ``steps`` of gradient descent
    with rate ``lr`` on ``L = sum_i |f(x_i) - y_i|^2 / (2n)`` from f = 0: ``g = (1 - (1 - lr lambda /
    n)^steps) / lambda`` (and ``steps lr / n`` where lambda = 0), the exact path of the linearised
    model (Lee et al. 2019), oscillating where ``lr lambda / n > 1``; a rate with ``lr lambda_max / n
    >= 2`` diverges and is refused (``lr`` must be below ``2 n / lambda_max``). Chapter 7.
    """
    if steps is None:
        ridge = _number("ridge", ridge)
        if ridge == 0 and eigenvalues.numel() and float(eigenvalues.min()) <= 0:
            top, low = float(eigenvalues.max()), float(eigenvalues.min())
            raise ValueError(f"the Gram matrix is singular or indefinite (smallest eigenvalue {low:.3g}, largest "
                             f"{top:.3g}): the converged regression needs ridge > 0 (e.g. 1e-3 x the mean diagonal)")
        return 1.0 / (eigenvalues + ridge)
    if lr is None:
        raise ValueError("steps needs lr (the gradient-descent learning rate)")
    _number("lr", lr, positive=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    lam = eigenvalues.clamp_min(0)
    rate = lr * lam / n
    if lam.numel() and float(rate.max()) >= 2:
        raise ValueError(f"gradient descent with lr={lr:g} diverges on this kernel (lr lambda_max / n = "
                         f"{float(rate.max()):.3g} >= 2): lr must be below 2 n / lambda_max = "
                         f"{2 * n / float(lam.max()):.4g}")
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    # (1 - r)^steps: through log1p for r < 1 (accurate for small rates), as a power for 1 <= r < 2
    below = -torch.expm1(steps * torch.log1p(-rate.clamp(max=0.5)))
    above = 1 - torch.pow(1 - rate, steps)
    path = torch.where(rate <= 0.5, below, above)
    return torch.where(lam > 0, path / safe, torch.full_like(lam, steps * lr / n))


def regression_weights(K: torch.Tensor, Y: torch.Tensor, *, ridge: float = 0.0, lr: float | None = None,
                       steps: int | None = None) -> torch.Tensor:
    r"""Kernel-regression weights ``alpha`` (n, k), so that ``f(x) = K(x, X) alpha``.

    Converged: ``alpha = (K + ridge I)^-1 Y`` (Tsilivis & Kempe, eq. 7 at t -> infinity, with a
    ridge). With ``lr`` and ``steps``: the predictor after that many steps of full-batch gradient
    descent on the squared loss, started at f = 0 (eq. 7 at finite t, in discrete time): the
    kernel-regime prediction of a wide net trained that long, with its initial output subtracted.
    Computed in float64 through the eigendecomposition of K (:func:`gd_filter`).

    K: (n, n) symmetric PSD Gram matrix of the training inputs; Y: (n, k) targets.
    Returns (n, k) float64. Chapter 7.
    """
    _, V, coef = _spectral(K, Y, ridge, lr, steps)
    return V @ coef


def _spectral(K, Y, ridge, lr, steps):
    """Eigenvalues (decreasing), eigenvectors (columns) and ``g(lambda_i) v_i^T Y`` (n, k), float64."""
    _check_gram(K, Y)
    Kd, Yd = K.detach().double(), Y.detach().double().to(K.device)
    eigenvalues, V = torch.linalg.eigh((Kd + Kd.T) / 2)
    eigenvalues, V = eigenvalues.flip(0), V.flip(1)
    g = gd_filter(eigenvalues, K.shape[0], ridge=ridge, lr=lr, steps=steps)
    return eigenvalues, V, (V.T @ Yd) * g[:, None]


def eigen_features(K: torch.Tensor, Y: torch.Tensor, *, ridge: float = 0.0, lr: float | None = None,
                   steps: int | None = None, top: int | None = None):
    r"""The kernel's eigen-features (Tsilivis & Kempe 2022, section 4, eq. 9).

    With ``K = sum_i lambda_i v_i v_i^T`` (eigenvalues in decreasing order), feature i is the
    predictor ``f_i(x) = K(x, X) alpha_i`` with ``alpha_i = v_i g(lambda_i) v_i^T Y`` and ``g`` the
    filter of :func:`gd_filter` (``1 / lambda_i`` for the converged, ridge-less predictor, as in the
    paper). The n features sum to the kernel predictor of :func:`regression_weights`.

    K: (n, n) Gram matrix; Y: (n, k) targets; ridge, lr, steps: see :func:`gd_filter`;
    top: keep the first ``top`` features (``None``: all n).

    Returns ``(eigenvalues, alphas)``: (n,) float64 in decreasing order, and (top, n, k) float64
    weights, one predictor per feature (wrap one in :class:`KernelPredictor`). Chapter 7.
    """
    _check_gram(K, Y)
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= K.shape[0]):
        raise ValueError(f"top must be an integer in [1, {K.shape[0]}] or None, got {top!r}")
    eigenvalues, V, coef = _spectral(K, Y, ridge, lr, steps)
    q = K.shape[0] if top is None else top
    return eigenvalues, V[:, :q].T[:, :, None] * coef[:q, None, :]


class KernelPredictor(nn.Module):
    r"""A kernel machine ``x -> K(x, X) alpha`` as a module mapping images to logits.

    kernel_fn: ``(x1, x2) -> (n1, n2)``, differentiable in x1 (e.g. :func:`two_layer_ntk` with the
        net's normalisation bound by ``functools.partial``).
    X: (n, C, H, W) training inputs in [0, 1]; alpha: (n, k) weights (:func:`regression_weights`,
        or one feature's or a sum of features' from :func:`eigen_features`).

    ``forward(x)`` returns (N, k) in the dtype of ``alpha``'s buffer (float32 by default, so that the
    attacks of :mod:`ntklab.attacks` work unchanged; ``dtype=torch.float64`` for exact checks). With
    one-hot targets the k outputs are logits: ``argmax`` classifies, and the cross-entropy of
    ``softmax`` of them is the loss Tsilivis & Kempe (appendix B) differentiate for their attacks.
    ``with_alpha(alpha)`` returns a predictor with the same kernel and inputs and other weights.
    Chapter 7.
    """

    def __init__(self, kernel_fn: Callable, X: torch.Tensor, alpha: torch.Tensor, *, dtype=torch.float32):
        super().__init__()
        if not isinstance(X, torch.Tensor) or X.dim() < 2:
            raise ValueError("X must be a tensor of training inputs (n, ...)")
        if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or alpha.shape[0] != X.shape[0]:
            raise ValueError(f"alpha must have shape (n, k) = ({X.shape[0]}, k), got "
                             f"{tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__}")
        self.kernel_fn = kernel_fn
        self.register_buffer("X", X.detach().to(dtype))
        self.register_buffer("alpha", alpha.detach().to(dtype))
        self.eval()   # no layer depends on the mode; eval mode keeps ntklab.evaluate from warning

    def with_alpha(self, alpha: torch.Tensor) -> "KernelPredictor":
        """The same kernel and inputs, other weights (n, k)."""
        return KernelPredictor(self.kernel_fn, self.X, alpha.to(self.X.device), dtype=self.X.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel_fn(x.to(self.X.dtype), self.X) @ self.alpha
