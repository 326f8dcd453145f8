"""Numerical tolerances of the tests, from the dtype and the size of the sums (CONTRIBUTING.md,
"Numerical tolerances").

A float32 result that sums n products is exact only up to rounding, and the rounding depends on the
order of the additions, which depends on the CPU (vector width, blocking of the matrix kernels) and
on how the work is split (chunks, micro-batches). Independent rounding errors grow like sqrt(n)
units of the last place; :func:`sum_rtol` allows a factor 16 above that. Where exactness is the
point (two implementations of the same formula), tests compare in float64, where the same rule
gives tolerances of about 1e-13.
"""
import math

import torch


def sum_rtol(dtype: torch.dtype, terms: int) -> float:
    """Relative tolerance, against the largest magnitude of the compared results, for results in
    ``dtype`` that each sum ``terms`` products: ``16 * eps(dtype) * sqrt(terms)``."""
    return 16 * torch.finfo(dtype).eps * math.sqrt(max(int(terms), 1))


def rel_err(K: torch.Tensor, R: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``R``,
    computed in float64."""
    K, R = K.double(), R.double()
    return ((K - R).abs().max() / R.abs().max()).item()


def n_params(model: torch.nn.Module) -> int:
    """Trainable parameters: the number of products an NTK entry sums."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
