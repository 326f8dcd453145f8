"""Kernel metrics: how far a kernel moved, how fast, how concentrated its spectrum is, how class-specific it is.

Introduced in the book's chapter 4 (Threefold evolution), which follows Li et al. (arXiv 2312.02236)
in watching the empirical NTK of :func:`ntklab.ntk.empirical_ntk` change over training. Every
function takes a kernel in one of three forms, as a torch tensor or a numpy array:

* a full kernel (n, n, k, k), flattened to an (nk, nk) matrix with row index ``i * k + a``;
* an (n, n) matrix (a trace, logit or single-class kernel);
* an (nk, nk) matrix already flattened.

Results are numpy floats / arrays, computed in float64.

Centring. ``center=True`` replaces each kernel matrix K (m x m) by H K H with H = I - 11^T / m,
as in centred kernel alignment (Cortes, Mohri & Rostamizadeh 2012; Kornblith et al. 2019). The
kernel of a ReLU network has a large constant component (all its features are non-negative), and
that mean dominates the uncentred Frobenius inner products: on the book's pilot CNN the uncentred
trace kernel moved only 0.05 in kernel distance from its initialisation over training, the centred
one 0.25 (``shared/PILOT.md``). Centring removes what is common to all inputs, so that distances
and spectra measure how the kernel separates inputs. ``H (K + c 11^T) H = H K H``: a centred
metric ignores any constant added to the kernel.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["center_kernel", "kernel_distance", "kernel_angle", "angular_velocity", "kernel_norm", "top_eigenvalue",
           "kernel_velocity", "effective_rank", "top_concentration",
           "polar_dynamics", "alignment", "kernel_specialization", "lazy_onset", "split_phases", "PHASES"]


#: the largest asymmetry max|M - M^T| / max|M| that the eigenvalue metrics take for rounding
SYMMETRY_TOLERANCE = 1e-4


def _to_numpy(K, name="K"):
    if hasattr(K, "detach"):                                     # a torch tensor
        if K.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor ({K.dtype})")
        K = K.detach().cpu().double().numpy()
    if np.iscomplexobj(K):
        raise ValueError(f"{name} must be real, got a complex array")
    K = np.asarray(K, dtype=np.float64)
    if not np.all(np.isfinite(K)):
        raise ValueError(f"{name} has non-finite entries")
    return K


def _as_matrix(K, name="K"):
    """A kernel as an (m, m) float64 matrix: (n, n) stays, (n, n, k, k) becomes (nk, nk), index i*k + a."""
    K = _to_numpy(K, name)
    if K.ndim == 4:
        n, n2, k, k2 = K.shape
        if n != n2 or k != k2:
            raise ValueError(f"a full kernel {name} must have shape (n, n, k, k), got {K.shape}")
        return K.transpose(0, 2, 1, 3).reshape(n * k, n * k)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (m, m) matrix or a full kernel (n, n, k, k), "
                         f"got shape {K.shape}")
    return K


def _center(M):
    return M - M.mean(0, keepdims=True) - M.mean(1, keepdims=True) + M.mean()


def center_kernel(K):
    """The centred kernel H K H, H = I - 11^T / m (Cortes et al. 2012; Kornblith et al. 2019; chapter 4).

    Centring removes the component common to all inputs, which dominates the uncentred NTK of a
    ReLU network (see the module docstring), so that what remains is how the kernel tells inputs
    apart. K: (m, m) or a full kernel (n, n, k, k), centred as its (nk, nk) flattening. Returns the
    same shape, as numpy float64. Rows and columns of the result sum to zero; H (K + c 11^T) H = H K H.
    """
    M = _center(_as_matrix(K))
    K = _to_numpy(K)
    if K.ndim == 4:
        n, _, k, _ = K.shape
        return M.reshape(n, k, n, k).transpose(0, 2, 1, 3)
    return M


def _matrix(K, center, name="K"):
    M = _as_matrix(K, name)
    return _center(M) if center else M


def _cosine(M1, M2):
    n1, n2 = np.linalg.norm(M1), np.linalg.norm(M2)
    if n1 == 0 or n2 == 0:
        raise ValueError("kernel distance is undefined for a zero kernel "
                         "(after centring, a constant kernel is zero)")
    return float(np.sum(M1 * M2) / (n1 * n2))


def kernel_distance(K1, K2, *, center: bool = False) -> float:
    """Kernel distance KD = 1 - <K1, K2>_F / (||K1||_F ||K2||_F) (Fort et al. 2020; Tsilivis & Kempe 2022).

    In [0, 2] (in [0, 1] for PSD kernels): 0 for kernels that are positive multiples of each other,
    1 for orthogonal ones. K1, K2: kernels of the same shape ((m, m) or (n, n, k, k)). ``center``:
    compare H K1 H and H K2 H (see the module docstring). Used in chapter 4 (Threefold evolution)
    for the distance between snapshots and between training strategies, as in Li et al. (2312.02236).
    """
    K1, K2 = _to_numpy(K1, "K1"), _to_numpy(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"K1 and K2 must have the same shape, got {K1.shape} and {K2.shape}")
    return 1.0 - _cosine(_matrix(K1, center, "K1"), _matrix(K2, center, "K2"))


def kernel_velocity(kernels: Sequence, times: Sequence[float] | None = None, *, center: bool = False) -> np.ndarray:
    """Kernel velocity KD(K_t, K_{t+1}) / (time_{t+1} - time_t) between consecutive snapshots (chapter 4).

    The speed of kernel learning of Fort et al. (2020), the quantity whose three phases Li et al.
    (2312.02236) describe. kernels: a sequence of T >= 2 kernels of one shape; times: T strictly
    increasing times (epochs, steps, or learning-rate-weighted time), default 0, 1, ..., T-1.
    Returns an array of T - 1 velocities (>= 0 for PSD kernels).
    """
    mats = [_matrix(K, center, f"kernels[{t}]") for t, K in enumerate(kernels)]
    if len(mats) < 2:
        raise ValueError(f"kernel velocity needs at least 2 kernels, got {len(mats)}")
    if any(M.shape != mats[0].shape for M in mats):
        raise ValueError("all kernels must have the same shape")
    dt = _time_steps(times, len(mats))
    return np.array([(1.0 - _cosine(a, b)) / d for a, b, d in zip(mats[:-1], mats[1:], dt)])


def _time_steps(times, count: int) -> np.ndarray:
    """The ``count - 1`` steps between ``count`` snapshot times (default 0, 1, ...): finite, increasing."""
    t = np.arange(count, dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    if t.shape != (count,):
        raise ValueError(f"times must have one entry per kernel ({count}), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("times must be finite numbers")
    dt = np.diff(t)
    if np.any(dt <= 0):
        raise ValueError("times must be strictly increasing")
    return dt


def kernel_angle(K1, K2, *, center: bool = False) -> float:
    """The angle theta = arccos(1 - KD) between two kernels seen as vectors of entries, in radians
    (chapter 4): the kernel distance in units that add up along a path. For small angles
    KD = 1 - cos(theta) ~ theta^2 / 2, so KD is quadratic in the motion: a kernel turning at a constant
    speed covers half the angle in half the time but a quarter of the KD. In [0, pi] ([0, pi/2] for
    PSD kernels). K1, K2, center: as in :func:`kernel_distance`.
    """
    return math.acos(min(1.0, max(-1.0, 1.0 - kernel_distance(K1, K2, center=center))))


def angular_velocity(kernels: Sequence, times: Sequence[float] | None = None, *, center: bool = False) -> np.ndarray:
    """Angular velocity theta(K_t, K_{t+1}) / (time_{t+1} - time_t) between consecutive snapshots,
    theta = arccos(1 - KD) (:func:`kernel_angle`; chapter 4).

    With the epochs as times it is the angle turned per epoch; with the gradient-flow time
    tau = sum of the learning rates of the steps (per unit of the steps per epoch: the cumulative
    mean learning rate of the epochs) it is the angle per unit of learning-rate time, which is flat
    across a learning-rate decay for a kernel that keeps turning at the same speed along the path of
    the weights (KD per unit of tau is not: it falls with the rate, KD/tau ~ omega^2 eta / 2).
    kernels: T >= 2 kernels of one shape; times: T strictly increasing times, default 0, ..., T-1.
    Returns an array of T - 1 values >= 0.
    """
    kd = kernel_velocity(kernels, center=center)            # the checks, and KD per unit index
    dt = _time_steps(times, len(kd) + 1)
    return np.arccos(np.clip(1.0 - kd, -1.0, 1.0)) / dt


def kernel_norm(K, *, center: bool = False) -> float:
    """The Frobenius norm ||K||_F (centred: ||HKH||_F), the kernel's scale, which KD ignores
    (Tsilivis & Kempe 2022, figure 5; chapter 4)."""
    return float(np.linalg.norm(_matrix(K, center)))


def top_eigenvalue(K, *, center: bool = False) -> float:
    """The largest eigenvalue lambda_max of the symmetric part of K (centred: of HKH; chapter 4)."""
    return float(_eigvals(K, center).max())


def _eigvals(K, center):
    """Eigenvalues of a symmetric kernel; an asymmetry beyond rounding (:data:`SYMMETRY_TOLERANCE`,
    symmetrised away below it) means K is not a kernel Gram matrix: ``ValueError``."""
    M = _matrix(K, center)
    scale = float(np.abs(M).max()) if M.size else 0.0
    if scale > 0 and float(np.abs(M - M.T).max()) > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"K must be a symmetric kernel matrix; max|K - K^T| is "
                         f"{float(np.abs(M - M.T).max()) / scale:.2g} of max|K| (a kernel between two different "
                         f"input sets has no spectrum of this kind)")
    return np.linalg.eigvalsh((M + M.T) / 2)


def effective_rank(K, *, center: bool = False) -> float:
    """Effective rank exp(H(p)) (Roy & Vetterli 2007; chapter 4).

    p_i = lambda_i / sum_j lambda_j over the eigenvalues lambda_i >= 0 and H the Shannon entropy.
    In [1, m] for an (m, m) kernel: m for a multiple of the identity, 1 for rank one. Negative
    eigenvalues (rounding, or a kernel that is not PSD) are left out. Chapter 4 and chapter 6 use it
    to see the spectrum of the NTK concentrate (Li et al. 2312.02236; Tsilivis & Kempe 2022).
    """
    lam = _eigvals(K, center)
    lam = lam[lam > 0]
    if lam.size == 0 or lam.sum() == 0:
        raise ValueError("effective rank is undefined: the kernel has no positive eigenvalue")
    p = lam / lam.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def top_concentration(K, q: int, *, center: bool = False) -> float:
    """Share of the q largest squared eigenvalues: sum of the q largest lambda_i^2 / sum_i lambda_i^2.

    In (0, 1]: 1 for rank <= q. Tsilivis & Kempe (2022) measure how much of a kernel lives in its top
    eigenspaces this way; the book uses it in chapters 4 and 6 (Li et al. 2312.02236).
    q: an integer in [1, m] for an (m, m) kernel.
    """
    lam2 = np.sort(_eigvals(K, center) ** 2)[::-1]
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= lam2.size:
        raise ValueError(f"q must be an integer in [1, {lam2.size}], got {q!r}")
    if lam2.sum() == 0:
        raise ValueError("top concentration is undefined for a zero kernel")
    return float(lam2[:q].sum() / lam2.sum())


def polar_dynamics(kernels: Sequence, *, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Kernel trajectory in polar form (chapter 4).

    radius_t = ||K_t - K_0||_F / ||K_T - K_0||_F and angle_t = arccos(1 - KD(K_t, K_0)).

    The radius runs from 0 (at t = 0) to 1 (at the last snapshot T); the angle (radians, in [0, pi])
    is how far the kernel has turned from its initial direction, whatever its scale (after Fort et
    al. 2020 and Li et al. 2312.02236; chapter 4). kernels: T >= 2 kernels of one shape, the
    first and last different. Returns (radius, angle), two arrays of length T.
    """
    mats = [_matrix(K, center, f"kernels[{t}]") for t, K in enumerate(kernels)]
    if len(mats) < 2:
        raise ValueError(f"polar dynamics needs at least 2 kernels, got {len(mats)}")
    if any(M.shape != mats[0].shape for M in mats):
        raise ValueError("all kernels must have the same shape")
    total = np.linalg.norm(mats[-1] - mats[0])
    if total == 0:
        raise ValueError("polar dynamics is undefined when the last kernel equals the first")
    radius = np.array([np.linalg.norm(M - mats[0]) / total for M in mats])
    angle = np.array([math.acos(min(1.0, max(-1.0, _cosine(M, mats[0])))) for M in mats])
    return radius, angle


def alignment(K, u) -> float:
    """Kernel-target alignment A(K, u) = u^T K u / (||K||_F ||u||^2) (Cristianini et al. 2002; chapter 4).

    K: an (m, m) kernel (a full kernel is flattened); u: m target values, e.g. a class indicator.
    In [-1, 1]; 1 when K is a positive multiple of u u^T. Li et al. (2312.02236) build kernel
    specialization (:func:`kernel_specialization`) from it.
    """
    M = _as_matrix(K)
    u = _to_numpy(u, "u")
    if u.shape != (M.shape[0],):
        raise ValueError(f"u must be a vector of length {M.shape[0]} (one entry per kernel row), "
                         f"got shape {u.shape}")
    nk, nu = np.linalg.norm(M), float(u @ u)
    if nk == 0 or nu == 0:
        raise ValueError("alignment is undefined for a zero kernel or a zero vector u")
    return float(u @ M @ u / (nk * nu))


def kernel_specialization(K_full, labels) -> tuple[float, np.ndarray]:
    """Kernel specialization of a full NTK (Li et al., arXiv 2312.02236; book chapters 3 and 4).

    For output c, K_c = K_full[:, :, c, c] (n, n); u_c is the indicator of the inputs of class c;
    S[c, c'] = A(K_c, u_{c'}) with A the alignment of :func:`alignment`; KS = mean_c S[c, c] divided by
    mean_{c != c'} S[c, c']. KS > 1 when each logit's kernel is aligned with its own class more than
    with the others. K_full: (n, n, k, k) with k >= 2; labels: n integers in [0, k), every class
    present. Returns (KS, S) with S a (k, k) array.
    """
    K = _to_numpy(K_full, "K_full")
    if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3]:
        raise ValueError(f"K_full must be a full kernel of shape (n, n, k, k), got shape {K.shape}")
    n, _, k, _ = K.shape
    if k < 2:
        raise ValueError("kernel specialization needs k >= 2 outputs")
    y = _to_numpy(labels, "labels")
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per input), got {y.shape}")
    if np.any(y != np.round(y)) or y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must be integers in [0, {k})")
    y = y.astype(int)
    missing = sorted(set(range(k)) - set(y.tolist()))
    if missing:
        raise ValueError(f"every class needs at least one input; classes {missing} have none")
    U = np.eye(k)[y]                                              # (n, k) indicators
    S = np.empty((k, k))
    for c in range(k):
        Kc = K[:, :, c, c]
        norm = np.linalg.norm(Kc)
        if norm == 0:
            raise ValueError(f"the kernel of output {c} is zero")
        S[c] = np.einsum("ic,ij,jc->c", U, Kc, U) / (norm * U.sum(0))
    off = ~np.eye(k, dtype=bool)
    denominator = S[off].mean()
    if denominator == 0:
        raise ValueError("kernel specialization is undefined: the off-diagonal alignments average to zero")
    return float(np.mean(np.diag(S)) / denominator), S


# ------------------------------------------------------------------ phases of a velocity curve
PHASES = ("kernel learning", "lazy training")
LAZY_BELOW = 0.2       # lazy once the velocity is at most a fifth of the first epoch's
RISE_ABOVE = 3.0       # learning again once it is more than 3x the recent lazy level
LAZY_WINDOW = 3        # the recent lazy level: median of the last 3 lazy values


def _velocity_curve(velocity, name="velocity"):
    v = np.asarray(velocity, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-d sequence, got shape {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must hold finite values >= 0")
    if v[0] <= 0:
        raise ValueError(f"{name}[0] (the first epoch's velocity, the reference) must be > 0")
    return v


def lazy_onset(velocity, *, lazy_below: float = LAZY_BELOW) -> int | None:
    """Index of the first value of a velocity curve at or below ``lazy_below`` times its first value
    (the start of lazy training); ``None`` if it never gets there. Chapters 4 and 5.

    velocity: T >= 1 values >= 0 (e.g. :func:`kernel_velocity` of the snapshots after every epoch:
    entry t is the velocity over epoch t), ``velocity[0] > 0``; lazy_below in (0, 1). The first
    value is the reference, so the answer is ``None`` or in [1, T). The rule behind
    :func:`split_phases` and the automatic switch epoch of :func:`ntklab.train.train` (chapter 5).
    """
    v = _velocity_curve(velocity)
    if not 0 < lazy_below < 1:
        raise ValueError(f"lazy_below must be in (0, 1), got {lazy_below!r}")
    below = np.flatnonzero(v[1:] <= lazy_below * v[0])
    return int(below[0]) + 1 if below.size else None


def split_phases(velocity, *, lazy_below: float = LAZY_BELOW, rise_above: float = RISE_ABOVE,
                 window: int = LAZY_WINDOW) -> list[tuple[str, int, int]]:
    """Split a kernel-velocity curve into phases of kernel learning and lazy training (chapter 4).

    Li et al. (arXiv 2312.02236) describe three phases of the NTK under (adversarial) training:
    kernel learning, lazy training (the kernel nearly static), and kernel learning again after the
    learning-rate decay. This function names the phases of one curve with thresholds fixed before
    any run:

    * kernel learning from the start until the first value at or below ``lazy_below`` times the
      first value (:func:`lazy_onset`; default 0.2, i.e. a fall by 5x);
    * from there on, a value is lazy training unless it exceeds ``rise_above`` (default 3) times the
      recent lazy level, the median of the last ``window`` (default 3) values labelled lazy before
      it; such a value is kernel learning again (and later values can be lazy again).

    velocity: T >= 1 values >= 0 with ``velocity[0] > 0``, one per epoch (per epoch or per unit of
    learning rate: the function does not care, the caller says which). Returns a list of
    ``(phase, start, stop)`` with ``phase`` in :data:`PHASES` and ``velocity[start:stop]`` the
    phase's values, consecutive and covering ``range(T)``. A curve that never falls below the
    threshold is one phase of kernel learning.

        >>> split_phases([1.0, 0.5, 0.1, 0.1, 0.1, 0.5, 0.1])
        [('kernel learning', 0, 2), ('lazy training', 2, 5), ('kernel learning', 5, 6), ('lazy training', 6, 7)]
    """
    v = _velocity_curve(velocity)
    if not rise_above > 1:
        raise ValueError(f"rise_above must be > 1, got {rise_above!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    onset = lazy_onset(v, lazy_below=lazy_below)
    learning, lazy = PHASES
    labels = [learning] * len(v)
    if onset is not None:
        recent = [v[onset]]
        labels[onset] = lazy
        for t in range(onset + 1, len(v)):
            if v[t] <= rise_above * float(np.median(recent[-window:])):
                labels[t] = lazy
                recent.append(v[t])
    phases, start = [], 0
    for t in range(1, len(v) + 1):
        if t == len(v) or labels[t] != labels[start]:
            phases.append((labels[start], start, t))
            start = t
    return phases
