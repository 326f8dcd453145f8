"""Argument checks shared by the package (private).

Every public function of ntklab refuses bad input before doing any work, with a ``ValueError``
that names the argument and says what is expected (rather than an error from deep inside torch,
or a meaningless result). The checks that several modules need live here; each module keeps the
checks that are its own.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["number", "radius", "count", "images", "labels", "logits", "model_dtype", "floating_batch"]


def number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> float | None:
    """A finite real number, ``> 0`` if ``positive`` else ``>= 0`` (``None`` passes if allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def radius(name: str, value, *, positive: bool = False, allow_none: bool = False) -> float | None:
    """A radius or step in pixel scale: a finite number in [0, 1] (``> 0`` if ``positive``), since
    images live in [0, 1]. A value above 1 is almost always a radius meant in 0-255 units (8 for
    8/255): refused with that suggestion rather than turned into an attack that saturates every pixel."""
    value = number(name, value, positive=positive, allow_none=allow_none)
    if value is not None and value > 1:
        raise ValueError(f"{name} must be in [0, 1] (pixel scale: images are in [0, 1]), got {value:g}; "
                         f"if you meant {value:g}/255, pass {name}={value:g} / 255 = {value / 255:.4g}")
    return value


def count(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer (not a bool, not a float such as 2.0) ``>= minimum`` (``None`` passes if allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter or buffer (``None``: it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def floating_batch(name: str, x) -> torch.Tensor:
    """A floating-point tensor with a batch dimension and only finite values (any range)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = ": convert images with x.float() / 255" if x.dtype == torch.uint8 else ""
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}{hint}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def images(name: str, x, *, model: nn.Module | None = None) -> torch.Tensor:
    """A batch of images (N, C, H, W): floating point, finite, in [0, 1] (the normalisation lives
    inside the models), and of the model's dtype when ``model`` is given."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W) of images in [0, 1], got {shape}")
    floating_batch(name, x)
    if x.numel():
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise ValueError(f"{name} must lie in [0, 1] (the normalisation is inside the model), got values "
                             f"in [{low:.4g}, {high:.4g}]")
    if model is not None:
        dtype = model_dtype(model)
        if dtype is not None and x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but the model computes in {dtype}: convert one to "
                             f"the other (x.to({dtype}) or model.to({x.dtype}))")
    return x


def labels(name: str, y, n: int, *, num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels of shape (n,), in [0, num_classes) when that is given; returned as int64
    (labels of any integer dtype, e.g. int32 or uint8, are accepted and converted: the losses of
    torch take int64 class indices only)."""
    if not isinstance(y, torch.Tensor) or y.shape != (n,):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must have shape (N,) = ({n},), one label per input, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if num_classes is not None and y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
                             f"got labels in [{low}, {high}]")
    return y if y.dtype == torch.int64 else y.long()


def logits(out, y: torch.Tensor | None = None, *, where: str = "the model") -> int:
    """Check a model's output on a batch: logits (N, k), all finite, and labels ``y`` in [0, k).
    Returns k."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where} must return logits of shape (N, k), got {shape}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{where} returned logits that are not finite (NaN or inf): its weights or inputs "
                         f"are broken")
    if y is not None:
        labels("y", y, out.shape[0], num_classes=out.shape[1])
    return out.shape[1]
