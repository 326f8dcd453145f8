"""L-inf adversarial attacks on images in [0, 1] (the normalisation lives inside the model).

* :func:`fgsm` — Goodfellow et al. 2015, one signed step of ``eps`` from ``x``;
* :func:`fgsm_rs` — Wong et al. 2020 ("Fast is better than free"): uniform start, step ``1.25 eps``;
* :func:`n_fgsm` — de Jorge et al. 2022 (N-FGSM): larger uniform noise, no projection;
* :func:`fgsm_logscale` — FGSM after Gaussian noise with a log-uniform random scale per pixel (the
  book's construction, chapter 6; isotropic in covariance); :func:`fgsm_aniso` is its deprecated name;
* :func:`fgsm_pca` — FGSM after Gaussian noise whose covariance is the training images' own, plus an
  optional isotropic floor (:func:`ntklab.noise.pca_noise_basis`, :func:`ntklab.noise.pca_noise`,
  importable from here too): the book's data-derived anisotropic noise;
* :func:`pgd` — Madry et al. 2018, PGD-k with random start and restarts;
* :func:`trades_loss` — Zhang et al. 2019, the TRADES training loss and its adversarial examples;
* :func:`gradalign_loss` — Andriushchenko & Flammarion 2020, FGSM-AT's loss plus GradAlign's
  gradient-alignment regulariser (chapter 6);
* :func:`adversarial_examples` — any of :data:`ATTACKS` by name (the training loop uses it).

Every attack takes ``model`` (logits out), ``x`` of shape (N, C, H, W) with values in [0, 1] and
``y`` of shape (N,) with integer labels, and returns a detached tensor of the shape, dtype and device
of ``x``, inside [0, 1] and within ``eps`` of ``x`` in L-inf (up to float rounding; :func:`n_fgsm`
is the documented exception). Gradients are taken with respect to the input only
(``torch.autograd.grad``): no parameter gradient is computed or accumulated, so a PGD step costs
about one forward and one backward pass. The single-step attacks share one skeleton
(:func:`_single_step`), so all of them check the same things (images of the model's dtype, labels
in range) and differ only in their start point, step and projection. ``alpha=None`` for PGD and
TRADES means ``eps / 4`` (:func:`pgd_alpha`, the one place that says so).

The BN mode while crafting is explicit (``bn_mode``), see :func:`ntklab.bn.bn_mode` (here also
under its older name :func:`attack_mode`): ``"eval"`` (the default) uses the running statistics,
``"train"`` the statistics of the attacked batch itself, ``"keep"`` leaves the BN layers as they
are. Other layers (dropout) are in eval mode while crafting.
Afterwards every submodule's mode, the parameters, the buffers (BN running statistics included)
and the parameters' ``.grad`` are as before.

Introduced in chapter 1 (Primer: :func:`fgsm`, :func:`pgd`); chapter 3 is about ``bn_mode``;
chapter 4 uses :func:`trades_loss`; chapter 6 compares the single-step variants.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ntklab import _checks
from ntklab import bn as _bn
from ntklab.bn import BN_MODES
from ntklab.noise import check_basis, pca_noise, pca_noise_basis

_number, _count = _checks.number, _checks.count

__all__ = ["fgsm", "fgsm_rs", "n_fgsm", "fgsm_logscale", "fgsm_aniso", "fgsm_pca", "pca_noise_basis", "pca_noise", "pgd",
           "pgd_alpha", "trades_loss", "gradalign_loss", "adversarial_examples", "attack_mode", "ATTACKS", "DEPRECATED", "BN_MODES"]

ATTACKS = ("fgsm", "fgsm_rs", "n_fgsm", "fgsm_logscale", "fgsm_pca", "pgd")
#: Old attack names that :func:`adversarial_examples` still accepts, with a ``DeprecationWarning``,
#: and the attack each now means.
DEPRECATED = {"fgsm_aniso": "fgsm_logscale"}


# ------------------------------------------------------------------ shared machinery
attack_mode = _bn.bn_mode            # the older name of ntklab.bn.bn_mode, kept for existing code


def pgd_alpha(eps: float, alpha: float | None = None) -> float | None:
    """PGD's step size: ``alpha`` if given, else ``eps / 4`` (the book's default for every PGD and
    TRADES attack, in training, callbacks and evaluation alike); ``None`` for ``eps = 0`` without
    ``alpha`` (radius 0 needs no step). ``eps`` is checked (a finite number >= 0), ``alpha`` is not."""
    eps = _checks.radius("eps", eps)
    return eps / 4 if alpha is None and eps > 0 else alpha


def _check_inputs(x, y, *, eps, alpha=None, steps=None, restarts=None, noise=None,
                  bn_mode="eval", model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments shared by the attacks; return ``(x, y)`` detached, ``y`` on x's device.

    x: images (N, C, H, W), floating point, finite, in [0, 1], of the model's dtype when ``model``
    is given; y: (N,) integer labels (their range is checked against the model's outputs at the
    first forward pass, see :func:`_input_grad`). Raises ``ValueError`` naming the argument at fault.
    """
    _checks.images("x", x, model=model)
    y = _checks.labels("y", y, x.shape[0])
    _checks.radius("eps", eps)
    _checks.radius("alpha", alpha, positive=True, allow_none=True)
    _checks.radius("noise", noise, allow_none=True)
    _count("steps", steps, allow_none=True)
    _count("restarts", restarts, allow_none=True)
    _bn.check_bn_mode(bn_mode)
    return x.detach(), y.detach().to(x.device)


def _input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, check: bool = False) -> torch.Tensor:
    """Gradient of the mean cross-entropy with respect to the input ``x_adv`` only. With ``check``
    (the first forward pass of an attack) the logits must be (N, k) and finite and y in [0, k):
    torch would ignore a label of -100 and fail deep inside on others, and non-finite logits
    would give a meaningless "attack"."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x_adv)
        if check:
            _checks.logits(out, y)
        loss = F.cross_entropy(out, y)
        (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def _project(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Back to the eps-ball around ``x`` (L-inf) and to [0, 1]."""
    delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1).detach()


def _uniform(x: torch.Tensor, radius: float, generator) -> torch.Tensor:
    """Noise uniform in [-radius, radius]^d, shaped like ``x``."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * u - 1) * radius


# ------------------------------------------------------------------ single-step attacks
def _single_step(model: nn.Module, x, y, *, eps, alpha=None, bn_mode="eval",
                 setup: Callable[[torch.Tensor], Callable | None] | None = None, alpha_scale: float = 1.0,
                 in_ball: bool = True, noise=None) -> torch.Tensor:
    """The one skeleton of the single-step attacks, so that every one runs the same checks and steps:

    1. the shared checks (:func:`_check_inputs`: images of the model's dtype, labels, ``eps``,
       ``alpha``, ``noise``, ``bn_mode``), then the attack's own: ``setup(x)`` checks the attack's
       further arguments and returns how to draw the start point, ``start(x) -> x0`` (``None`` or no
       ``setup``: start at ``x``);
    2. ``eps = 0`` returns ``x`` (nothing to search; no random number is drawn);
    3. one input gradient at the start point with BN in ``bn_mode`` (logits and label range checked);
    4. one signed step of ``alpha`` (default ``alpha_scale * eps``), then the projection onto the
       eps-ball and [0, 1] (``in_ball``) or onto [0, 1] only.
    """
    x, y = _check_inputs(x, y, eps=eps, alpha=alpha, noise=noise, bn_mode=bn_mode, model=model)
    start = setup(x) if setup is not None else None
    if eps == 0:
        return x.clone()
    alpha = eps * alpha_scale if alpha is None else alpha
    x_adv = x if start is None else start(x)
    with _bn.bn_mode(model, bn_mode):
        grad = _input_grad(model, x_adv, y, check=True)
    if in_ball:
        return _project(x, x_adv + alpha * grad.sign(), eps)
    return torch.clamp(x_adv + alpha * grad.sign(), min=0, max=1).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
         bn_mode: str = "eval") -> torch.Tensor:
    r"""FGSM, the fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015).

    Distance: L-inf. ``x' = clip_[0,1](x + eps * sign(grad_x CE(f(x), y)))``: zero start, one step
    of ``eps``.

    Arguments:
        model: maps (N, C, H, W) in [0, 1] to logits (N, K).
        x: (N, C, H, W) images in [0, 1]. y: (N,) integer labels.
        eps (float): L-inf radius, >= 0 (0 returns ``x``).
        bn_mode (str): BN mode while crafting, ``"eval"`` (default), ``"train"`` or ``"keep"``
            (see :func:`ntklab.bn.bn_mode`).

    Returns (N, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``. Chapter 1 (Primer).

    Example::

        >>> x_adv = ntklab.attacks.fgsm(model, x, y, eps=0.3)
    """
    return _single_step(model, x, y, eps=eps, bn_mode=bn_mode, in_ball=False)


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
            alpha: float | None = None, bn_mode: str = "eval", generator=None) -> torch.Tensor:
    r"""FGSM with a random start, "FGSM-RS" (Wong, Rice & Kolter, ICLR 2020, "Fast is better
    than free: revisiting adversarial training").

    Distance: L-inf. Start at ``x + u`` with ``u`` uniform in ``[-eps, eps]^d`` (isotropic noise),
    clipped to [0, 1]; one signed step of ``alpha`` from there; projected back to the eps-ball and
    to [0, 1].

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm`.
        eps (float): L-inf radius, >= 0.
        alpha (float): step size, > 0 (default ``1.25 * eps``, the paper's choice).
        generator (torch.Generator, optional): for the noise (on x's device).

    Returns (N, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``. Chapter 6.

    Example::

        >>> x_adv = ntklab.attacks.fgsm_rs(model, x, y, eps=0.3)
    """
    def setup(x):
        return lambda x: torch.clamp(x + _uniform(x, eps, generator), min=0, max=1)

    return _single_step(model, x, y, eps=eps, alpha=alpha, bn_mode=bn_mode, setup=setup, alpha_scale=1.25)


def n_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
           alpha: float | None = None, noise: float | None = None, bn_mode: str = "eval",
           generator=None) -> torch.Tensor:
    r"""N-FGSM (de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, NeurIPS 2022, "Make some
    noise: reliable and efficient single-step adversarial training").

    Distance: L-inf, but **not** confined to the eps-ball. Start at ``x + u`` with ``u`` uniform
    in ``[-noise, noise]^d``, clipped to [0, 1]; one signed step of ``alpha``; clipped to [0, 1]
    only. There is no projection back to the eps-ball (the paper's point: the stronger noise and
    the unprojected step avoid catastrophic overfitting), so the invariant is
    ``||x' - x||_inf <= noise + alpha`` (``3 eps`` with the defaults), not ``eps``.

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm`.
        eps (float): the nominal radius, >= 0; sets the defaults below (0 returns ``x``).
        alpha (float): step size, > 0 (default ``eps``).
        noise (float): half-width of the uniform noise, >= 0 (default ``2 * eps``).
        generator (torch.Generator, optional): for the noise (on x's device).

    Returns (N, C, H, W) in [0, 1]. Chapter 6.

    Example::

        >>> x_adv = ntklab.attacks.n_fgsm(model, x, y, eps=0.3)   # up to 0.9 away from x
    """
    def setup(x):
        radius = 2 * eps if noise is None else noise
        return lambda x: torch.clamp(x + _uniform(x, radius, generator), min=0, max=1)

    return _single_step(model, x, y, eps=eps, alpha=alpha, noise=noise, bn_mode=bn_mode, setup=setup,
                        in_ball=False)


def fgsm_logscale(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  alpha: float | None = None, low: float = math.exp(-3), high: float = 1.0,
                  bn_mode: str = "eval", generator=None) -> torch.Tensor:
    r"""FGSM after Gaussian noise with a log-uniform random scale per pixel: the book's own
    construction (chapter 6), formerly called ``fgsm_aniso``.

    Distance: L-inf. For every example and every pixel independently, and afresh at every call
    (every mini-batch), draw a standard deviation ``sigma = s * eps`` with ``log s`` uniform in
    ``[log low, log high]``; start at ``x + sigma * z``, ``z ~ N(0, 1)``, clipped to the eps-ball and
    to [0, 1]; take one signed step of ``alpha``; project back to the eps-ball and to [0, 1].

    What it is not: anisotropic. Each draw has very unequal per-pixel magnitudes (with the defaults
    the scales span a factor e^3, about 20), but the scales are independent of the pixel and drawn
    afresh, so the noise's covariance is ``eps^2 E[s^2] I`` before clipping (chapter 6, exercise 1):
    a multiple of the identity, like FGSM-RS's uniform noise (:func:`fgsm_rs`). What differs from
    FGSM-RS is the law of each coordinate (heavy-tailed, mostly small) and the step (``eps``, not
    ``1.25 eps``). Li et al. (arXiv 2312.02236) propose "anisotropic noise" against catastrophic
    overfitting, but their construction could not be recovered: this one is not theirs. The
    log-uniform scale law, the Gaussian, the per-pixel-per-example draw and the clipping are the
    book's choices (the one measured in the pilot runs).

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm`.
        eps (float): L-inf radius, >= 0.
        alpha (float): step size, > 0 (default ``eps``).
        low, high (float): range of the per-pixel scale ``s``, ``0 < low <= high``
            (default ``e^-3`` and 1; ``low == high == s`` gives isotropic Gaussian noise of standard
            deviation ``s * eps``, clipped).
        generator (torch.Generator, optional): for the noise (on x's device).

    Returns (N, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``. Chapter 6.

    Example::

        >>> x_adv = ntklab.attacks.fgsm_logscale(model, x, y, eps=0.3)
    """
    def setup(x):
        lo, hi = _number("low", low, positive=True), _number("high", high, positive=True)
        if lo > hi:
            raise ValueError(f"need low <= high, got low={lo}, high={hi}")

        def start(x):
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sigma = eps * torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return _project(x, x + sigma * z, eps)
        return start

    return _single_step(model, x, y, eps=eps, alpha=alpha, bn_mode=bn_mode, setup=setup)


def _deprecated(old: str) -> None:
    warnings.warn(f"the attack {old!r} is deprecated: it is {DEPRECATED[old]!r} (log-uniform per-pixel "
                  "scales, isotropic in covariance); use that name", DeprecationWarning, stacklevel=3)


def fgsm_aniso(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """Deprecated name of :func:`fgsm_logscale` (the same attack, same arguments): emits a
    ``DeprecationWarning``. The old name promised anisotropic noise, which this is not."""
    _deprecated("fgsm_aniso")
    return fgsm_logscale(model, x, y, **kw)


def fgsm_pca(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
             basis: torch.Tensor | None = None, alpha: float | None = None, scale: float = 1.0,
             floor: float = 0.0, bn_mode: str = "eval", generator=None) -> torch.Tensor:
    r"""FGSM after Gaussian noise with the data's covariance: the book's data-derived anisotropic
    noise against catastrophic overfitting (chapter 6); Li et al. (arXiv 2312.02236) propose
    "anisotropic noise" without a construction that could be recovered, so this one is the book's.

    Distance: L-inf. Draw, afresh at every call (every mini-batch), ``delta = scale * eps * z @ B``
    with ``B = basis`` from :func:`pca_noise_basis` (:func:`pca_noise`): a Gaussian whose
    covariance is proportional to the training images' own, with largest per-pixel standard
    deviation ``scale * eps``. Start at ``x + delta`` clipped to the eps-ball and to [0, 1]; take one
    signed step of ``alpha``; project back to the eps-ball and to [0, 1].

    Why anisotropic, and why from the data: the noise concentrates on the few directions along which
    the images vary (on MNIST the top 10 principal directions hold about half the pixel variance) and
    vanishes on the pixels that are constant across the data, whereas FGSM-RS (:func:`fgsm_rs`) draws
    the same law along every direction and :func:`fgsm_logscale` draws per-pixel scales at random
    (both isotropic in covariance). ``floor > 0`` adds independent isotropic Gaussian noise of
    standard deviation ``floor * eps`` per pixel (covariance ``Sigma + tau I`` up to the common factor,
    ``tau = floor^2``): noise on every pixel, still anisotropic, the control that separates the
    noise's shape from its support. The
    Gaussian, the scaling by the largest per-pixel deviation and the clipping are our choices.

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm`.
        eps (float): L-inf radius, >= 0.
        basis (torch.Tensor): required; (r, C, H, W) with (C, H, W) the shape of an image of ``x``, e.g.
            ``pca_noise_basis(train_x)`` (moved to x's device and dtype).
        alpha (float): step size, > 0 (default ``eps``).
        scale (float): the noise's largest per-pixel standard deviation in units of eps, >= 0
            (default 1; 0 with ``floor=0`` gives FGSM with step ``alpha``).
        floor (float): standard deviation of the added isotropic Gaussian noise in units of eps, >= 0
            (default 0: none, and no random number is drawn for it).
        generator (torch.Generator, optional): for the noise (on x's device).

    Returns (N, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``. Chapter 6.

    Example::

        >>> basis = ntklab.attacks.pca_noise_basis(train_x)
        >>> x_adv = ntklab.attacks.fgsm_pca(model, x, y, eps=0.3, basis=basis)
    """
    def setup(x):
        s, f, b = _number("scale", scale), _number("floor", floor), check_basis(basis, x)

        def start(x):
            delta = s * eps * pca_noise(b, len(x), generator=generator)
            if f > 0:
                delta = delta + f * eps * torch.randn(x.shape, generator=generator, device=x.device,
                                                      dtype=x.dtype)
            return _project(x, x + delta, eps)
        return start

    return _single_step(model, x, y, eps=eps, alpha=alpha, bn_mode=bn_mode, setup=setup)


# ------------------------------------------------------------------ multi-step attacks
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, alpha: float | None = None,
        random_start: bool = True, restarts: int = 1, bn_mode: str = "eval",
        generator=None) -> torch.Tensor:
    r"""PGD, projected gradient descent on the cross-entropy (Madry, Makelov, Schmidt, Tsipras &
    Vladu, ICLR 2018, "Towards deep learning models resistant to adversarial attacks").

    Distance: L-inf. Start at ``x`` plus noise uniform in ``[-eps, eps]^d`` (or at ``x`` with
    ``random_start=False``), clipped to [0, 1]; ``steps`` times: a signed step of ``alpha``, then
    projection onto the eps-ball and [0, 1]. The last iterate is returned. With ``restarts > 1``
    the attack runs from several random starts and keeps, per example, a perturbation that
    misclassifies if one does, else the one with the highest loss.

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm`.
        eps (float): L-inf radius, >= 0 (0 returns ``x``).
        alpha (float): step size, > 0 (default ``None``: ``eps / 4``, :func:`pgd_alpha`).
        steps (int): number of steps, >= 1.
        random_start (bool): uniform start in the eps-ball (default True).
        restarts (int): number of runs, >= 1 (> 1 needs ``random_start``).
        generator (torch.Generator, optional): for the random starts (on x's device).

    Returns (N, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``. Cost: ``restarts * steps`` forward
    and backward passes (plus one forward per restart when ``restarts > 1``). Chapter 1 (Primer).

    Example::

        >>> x_adv = ntklab.attacks.pgd(model, x, y, eps=0.3, steps=10)      # alpha = eps / 4 = 0.075
    """
    x, y = _check_inputs(x, y, eps=eps, alpha=alpha, steps=steps, restarts=restarts, bn_mode=bn_mode, model=model)
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 needs random_start=True (every run would be the same)")
    if eps == 0:                      # nothing to search: the step size does not matter
        return x.clone()
    alpha = pgd_alpha(eps, alpha)
    best, best_loss, best_wrong = None, None, None
    with _bn.bn_mode(model, bn_mode):
        for restart in range(restarts):
            x_adv = x.clone()
            if random_start:
                x_adv = torch.clamp(x_adv + _uniform(x, eps, generator), min=0, max=1)
            for step in range(steps):
                grad = _input_grad(model, x_adv, y, check=restart == step == 0)
                x_adv = _project(x, x_adv + alpha * grad.sign(), eps)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                loss = F.cross_entropy(logits, y, reduction="none")
                wrong = logits.argmax(1) != y
            if best is None:
                best, best_loss, best_wrong = x_adv, loss, wrong
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
            best_loss = torch.where(better, loss, best_loss)
            best_wrong = best_wrong | wrong
    return best


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                alpha: float | None = None, beta: float = 6.0, bn_mode: str = "eval",
                generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The TRADES loss and its adversarial examples (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan,
    ICML 2019, "Theoretically principled trade-off between robustness and accuracy").

    Distance: L-inf. Crafting (BN in ``bn_mode``, other layers in eval mode): start at ``x`` plus
    Gaussian noise of std 0.001, then ``steps`` signed steps of ``alpha`` that increase
    ``KL(f(x) || f(x'))`` (softmax outputs; ``f(x)`` computed once, fixed), each projected onto the
    eps-ball and [0, 1]. Then, in the model's own mode (usually train mode, inside a training loop),

        ``loss = CE(f(x), y) + beta * KL(f(x) || f(x'))``,

    the KL averaged over the batch (``batchmean``), with gradients flowing through both ``f(x)``
    and ``f(x')`` as in the authors' code. The loss is ready for ``loss.backward()``. Two forward
    passes are made for it (``x`` and ``x'``; in train mode each updates the BN running statistics,
    the reference code makes a third on ``x``).

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm` (``bn_mode`` applies to the crafting only).
        eps (float): L-inf radius, >= 0 (0: ``x' = x``). alpha (float): step size, > 0 (default
            ``None``: ``eps / 4``, :func:`pgd_alpha`).
        steps (int): number of steps, >= 1. beta (float): weight of the KL term, >= 0 (default 6).
        generator (torch.Generator, optional): for the start noise (on x's device).

    Returns ``(loss, x_adv)``: a scalar tensor attached to the parameters, and the detached
    (N, C, H, W) adversarial examples in [0, 1] within eps of ``x``. Chapter 4.

    Example::

        >>> loss, x_adv = ntklab.attacks.trades_loss(model, x, y, eps=0.3, alpha=0.075, steps=10)
        >>> loss.backward()
    """
    x, y = _check_inputs(x, y, eps=eps, alpha=alpha, steps=steps, bn_mode=bn_mode, model=model)
    alpha = pgd_alpha(eps, alpha)
    beta = _number("beta", beta)
    x_adv = x.clone()
    if eps > 0:
        with _bn.bn_mode(model, bn_mode):
            with torch.no_grad():
                out = model(x)
                _checks.logits(out, y)
                log_p_nat = F.log_softmax(out, dim=1)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = _project(x, x + 0.001 * z, eps)
            for _ in range(steps):
                xa = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    kl = F.kl_div(F.log_softmax(model(xa), dim=1), log_p_nat, reduction="sum",
                                  log_target=True)
                    (grad,) = torch.autograd.grad(kl, xa)
                x_adv = _project(x, x_adv + alpha * grad.sign(), eps)
    logits = model(x)
    if eps == 0:
        _checks.logits(logits, y)
    loss_robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.log_softmax(logits, dim=1),
                           reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, y) + beta * loss_robust, x_adv


def gradalign_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, lam: float = 0.2,
                   bn_mode: str = "eval", generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The GradAlign training loss: FGSM-AT plus a gradient-alignment regulariser (Andriushchenko &
    Flammarion, NeurIPS 2020, "Understanding and improving fast adversarial training").

    Distance: L-inf. Crafting: FGSM from ``x`` with step ``eps`` (:func:`fgsm`, BN in ``bn_mode``).
    Then, in the model's own mode (train mode inside a training loop),

        ``loss = CE(f(x'), y) + lam * (1 - mean_i cos(g_i(x_i), g_i(x_i + eta_i)))``,

    where ``g_i(z) = grad_z CE(f(z), y)`` is the input gradient of the batch's mean cross-entropy at
    the clean image and at a uniformly random point of the eps-ball (``eta ~ U[-eps, eps]^d``; the
    point is clipped to [0, 1], the book's image domain, where the authors' code does not clip), the
    cosine taken per example over all pixels. As in the authors' code, the gradient at ``x`` is a
    constant (detached) and the one at the random point is differentiated through (double
    backpropagation, ``create_graph=True``), and examples with a zero gradient at either point are
    left out of the mean (none left: the regulariser is 0). ``lam = 0`` is FGSM-AT's loss.

    Cost: FGSM's forward and backward pass, one more at ``x`` and one at the random point (the latter
    kept in the graph), the forward pass on ``x'``, and a backward pass through the double-backward
    graph: five passes by the count against FGSM-AT's two, and about five times FGSM-AT's per batch as
    chapter 6 measured it on the CPU (a backward pass through a backward pass costs more than a plain
    one; :func:`ntklab.plan.passes_per_example` keeps the count). In train mode each of the
    three forward passes in the model's mode (``x'``, ``x``, the random point) updates the BN running
    statistics, as in the authors' code.

    ``lam``: the authors tune it per radius on CIFAR-10 (0.2 at eps = 8/255, their scripts
    interpolating log-linearly in eps) and give none for MNIST; the default 0.2 is that CIFAR-10
    value, and chapter 6's value for MNIST is the book's choice.

    Arguments:
        model, x, y, bn_mode: as in :func:`fgsm` (``bn_mode`` applies to the FGSM step only).
        eps (float): L-inf radius, >= 0 (0: ``x' = x`` and the random point is ``x``).
        lam (float): weight of the regulariser, a finite number >= 0.
        generator (torch.Generator, optional): for the random point (on x's device).

    Returns ``(loss, logits, x_adv)``: a scalar tensor attached to the parameters (ready for
    ``loss.backward()``), the detached logits of ``x'`` (N, K) and the detached adversarial examples
    ``x'`` (N, C, H, W) in [0, 1] within eps of ``x``. Chapter 6.

    Example::

        >>> loss, logits, x_adv = ntklab.attacks.gradalign_loss(model, x, y, eps=0.3, lam=1.0)
        >>> loss.backward()
    """
    x, y = _check_inputs(x, y, eps=eps, bn_mode=bn_mode, model=model)
    lam = _number("lam", lam)
    x_adv = fgsm(model, x, y, eps=eps, bn_mode=bn_mode)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y)
    if lam > 0:
        with torch.enable_grad():
            x1 = x.clone().requires_grad_(True)
            (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1)
            x2 = torch.clamp(x + _uniform(x, eps, generator), 0, 1).requires_grad_(True)
            (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
        g1, g2 = g1.detach().flatten(1), g2.flatten(1)
        n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
        keep = (n1 > 0) & (n2 > 0)
        if keep.any():
            cos = (g1[keep] * g2[keep]).sum(1) / (n1[keep] * n2[keep])
            loss = loss + lam * (1 - cos.mean())
    return loss, logits.detach(), x_adv


# ------------------------------------------------------------------ by name
def adversarial_examples(strategy: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         eps: float, alpha: float | None = None, steps: int | None = None,
                         bn_mode: str = "eval", **kw) -> torch.Tensor:
    """Adversarial examples by the attack's name, one of :data:`ATTACKS`:
    ``"fgsm"``, ``"fgsm_rs"``, ``"n_fgsm"``, ``"fgsm_logscale"``, ``"fgsm_pca"``, ``"pgd"``; a name of
    :data:`DEPRECATED` (``"fgsm_aniso"``) means its new attack and emits a ``DeprecationWarning``.

    eps, alpha, bn_mode: passed on (``alpha=None``: the attack's default; ``eps / 4`` for PGD,
    :func:`pgd_alpha`).
    steps: required for ``"pgd"``; the single-step attacks accept only ``None`` or 1.
    kw: further keyword arguments of the attack (``noise``, ``low``, ``high``, ``basis``, ``floor`` and
    ``scale`` (``"fgsm_pca"`` needs ``basis``), ``random_start``, ``restarts``, ``generator``). ``"fgsm"`` takes no ``alpha`` (its step is ``eps``): giving one
    raises ``ValueError`` rather than being silently ignored.

    Example::

        >>> x_adv = ntklab.attacks.adversarial_examples("pgd", model, x, y, eps=0.3, steps=10)
    """
    if strategy in DEPRECATED:
        _deprecated(strategy)
        strategy = DEPRECATED[strategy]
    if strategy not in ATTACKS:
        raise ValueError(f"unknown attack {strategy!r}; valid attacks are: {', '.join(ATTACKS)}")
    if strategy == "pgd":
        if steps is None:
            raise ValueError("steps is required for the 'pgd' attack")
        return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, bn_mode=bn_mode, **kw)
    if steps not in (None, 1):
        raise ValueError(f"{strategy!r} is a single-step attack; steps must be None or 1, got {steps!r}")
    if strategy == "fgsm":
        if alpha is not None:
            raise ValueError("'fgsm' takes no alpha (its step is eps); use 'fgsm_rs' or 'n_fgsm' "
                             "for another step size")
        return fgsm(model, x, y, eps=eps, bn_mode=bn_mode, **kw)
    fn = {"fgsm_rs": fgsm_rs, "n_fgsm": n_fgsm, "fgsm_logscale": fgsm_logscale, "fgsm_pca": fgsm_pca}[strategy]
    return fn(model, x, y, eps=eps, alpha=alpha, bn_mode=bn_mode, **kw)
