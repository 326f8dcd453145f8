"""Noise with the training images' own covariance: data preprocessing for :func:`ntklab.attacks.fgsm_pca`.

* :func:`pca_noise_basis` — the principal directions of a set of images, each scaled by its
  standard deviation (fitted once, on the training images);
* :func:`pca_noise` — Gaussian draws ``z @ B`` from such a basis; :func:`check_basis` checks one.

The book's data-derived anisotropic noise against catastrophic overfitting (chapter 6). The names
are importable from :mod:`ntklab.attacks` too, where they were first defined.
"""
from __future__ import annotations

import torch

from ntklab import _checks

__all__ = ["pca_noise_basis", "pca_noise", "check_basis"]


def pca_noise_basis(X: torch.Tensor, *, rank: int | None = None) -> torch.Tensor:
    r"""The principal directions of images ``X``, each scaled by its standard deviation: the noise
    basis of :func:`ntklab.attacks.fgsm_pca`, the book's data-derived anisotropic noise (chapter 6).

    Flatten the N images to d = C*H*W pixels and write their covariance as
    ``Sigma = (X - mean)^T (X - mean) / (N - 1) = sum_k lambda_k u_k u_k^T`` (eigenvalues in
    decreasing order). The basis holds the rows ``b_k = c sqrt(lambda_k) u_k`` of the ``r`` largest
    positive eigenvalues, with the one constant ``c > 0`` chosen so that the largest per-pixel
    standard deviation of the noise ``z @ B`` (``z ~ N(0, I_r)``, :func:`pca_noise`) is 1, i.e.
    ``max_j sum_k b_kj^2 = 1``. That noise is Gaussian with covariance ``c^2 Sigma_r``, where
    ``Sigma_r`` is ``Sigma`` restricted to its top ``r`` eigenvectors (``Sigma`` itself with
    ``rank=None``): it is large where the images vary most and zero along directions in which every
    image is the same (the black border of MNIST digits) -- anisotropic, and shaped by the data rather
    than by chance as in :func:`ntklab.attacks.fgsm_logscale` (whose covariance is a multiple of the
    identity). This construction is the book's choice; Li et al.
    (arXiv 2312.02236) propose "anisotropic noise" against catastrophic overfitting without a
    construction we could recover.

    Arguments:
        X (torch.Tensor): (N, C, H, W) images in [0, 1], N >= 2, not all equal (e.g. the training
            images).
        rank (int, optional): number of principal directions kept, >= 1 (``None``: every direction of
            positive variance, at most ``min(N - 1, d)``).

    Returns (r, C, H, W), in X's dtype and on its device. Computed in float64: through the d x d
    covariance when N > d, else through the SVD of the centred data (cost O(N d min(N, d))).

    Example::

        >>> basis = ntklab.noise.pca_noise_basis(train_x)        # (784, 1, 28, 28) for MNIST
        >>> x_adv = ntklab.attacks.fgsm_pca(model, x, y, eps=0.3, basis=basis)
    """
    if not isinstance(X, torch.Tensor) or X.dim() != 4 or not X.is_floating_point():
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X must be a 4-D floating-point tensor (N, C, H, W) of images, got {shape}")
    if len(X) < 2:
        raise ValueError(f"X must hold at least 2 images to have a covariance, got {len(X)}")
    _checks.images("x", X)
    _checks.count("rank", rank, allow_none=True)
    n, d = len(X), X[0].numel()
    xc = X.detach().reshape(n, d).double()
    xc = xc - xc.mean(0)
    if n > d:
        lam, vecs = torch.linalg.eigh(xc.T @ xc / (n - 1))
        lam, vecs = lam.flip(0), vecs.flip(1)                          # decreasing
    else:
        _, sing, vh = torch.linalg.svd(xc, full_matrices=False)
        lam, vecs = sing ** 2 / (n - 1), vh.T
    if float(lam[0]) <= 0:
        raise ValueError("X has no variance (all images are equal): there are no principal directions")
    keep = int((lam > lam[0] * 1e-10).sum())
    keep = keep if rank is None else min(keep, rank)
    basis = vecs[:, :keep].T * lam[:keep].sqrt()[:, None]              # (r, d)
    basis = basis / basis.pow(2).sum(0).max().sqrt()
    return basis.to(X.dtype).reshape(keep, *X.shape[1:])


def pca_noise(basis: torch.Tensor, n: int, *, generator=None) -> torch.Tensor:
    r"""``n`` draws of the Gaussian noise ``z @ B`` of a basis from :func:`pca_noise_basis`
    (``z ~ N(0, I_r)``): covariance ``B^T B`` (proportional to the data's, largest per-pixel
    standard deviation 1), mean 0. Chapter 6.

    basis: (r, C, H, W); n: number of draws, >= 1; generator (torch.Generator, optional): on the
    basis' device. Returns (n, C, H, W) in the basis' dtype and on its device.
    """
    basis = check_basis(basis)
    n = _checks.count("n", n)
    z = torch.randn(n, len(basis), generator=generator, device=basis.device, dtype=basis.dtype)
    return (z @ basis.flatten(1)).reshape(n, *basis.shape[1:])


def check_basis(basis, x=None) -> torch.Tensor:
    """``basis`` checked: a finite floating-point tensor (r, C, H, W) with r >= 1; with images ``x``
    (N, C, H, W) also of x's image shape, and returned on x's device and in its dtype. Raises
    ``ValueError`` otherwise (``None``: the basis :func:`ntklab.attacks.fgsm_pca` needs is missing)."""
    if basis is None:
        raise ValueError("fgsm_pca needs basis=, the data's noise basis from "
                         "ntklab.noise.pca_noise_basis(train_x)")
    if not isinstance(basis, torch.Tensor) or basis.dim() < 2 or not basis.is_floating_point() or not len(basis):
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise ValueError(f"basis must be a floating-point tensor (r, C, H, W) with r >= 1, got {shape}")
    if x is not None:
        if basis.shape[1:] != x.shape[1:]:
            raise ValueError(f"basis must have shape (r, {', '.join(map(str, x.shape[1:]))}) to match x, "
                             f"got {tuple(basis.shape)}")
        basis = basis.to(device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(basis).all()):
        raise ValueError("basis has non-finite entries")
    return basis
