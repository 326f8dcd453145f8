"""Data augmentation of training batches, vectorised on the batch's device.

:func:`augment_crop_flip` is the standard CIFAR augmentation of adversarial training: a random crop
with zero padding 4 and a random horizontal flip of every image, as the code of Rice, Wong & Kolter
2020 ("Overfitting in adversarially robust deep learning") and of Wong, Rice & Kolter 2020 ("Fast is
better than free") applies it with torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()``. Here it runs on a whole batch at once (one gather, no per-image loop),
so it costs next to nothing on a GPU. :func:`ntklab.train.train` applies it with
``augment="crop_flip"`` to every clean batch before the attack, drawing from the run's ``"augment"``
random stream (:func:`ntklab.train.stream_seed`). Used by the ``paper`` profiles (chapter 9).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ntklab import _checks

__all__ = ["AUGMENTATIONS", "augment_crop_flip", "crop_flip_parameters", "augment"]

#: The names :func:`augment` (and ``TrainConfig.augment``) accepts.
AUGMENTATIONS = ("crop_flip",)


def crop_flip_parameters(n: int, padding: int = 4, *, generator: torch.Generator | None = None,
                         device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of :func:`augment_crop_flip` for ``n`` images: ``(top, left, flip)``, each
    (n,) on ``device``. ``top`` and ``left`` are the crop's offsets in the padded image, uniform on
    {0, ..., 2 * padding} (torchvision's ``RandomCrop``); ``flip`` is a bool, true with probability
    1/2 (``RandomHorizontalFlip``). Drawn in this order from ``generator`` (``None``: torch's
    default generator of ``device``): top, left, flip."""
    device = torch.device("cpu") if device is None else torch.device(device)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return top, left, flip


def augment_crop_flip(x: torch.Tensor, *, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, of a batch.

    x: (N, C, H, W) images (any float dtype, any device). Each image is padded with ``padding``
    zeros on every side, cropped back to H x W at a random offset, and then flipped left-right with
    probability 1/2 (torchvision's ``RandomCrop((H, W), padding=padding)`` then
    ``RandomHorizontalFlip()``, as in Rice et al. 2020 and Wong et al. 2020 on CIFAR-10, where H = W
    = 32 and padding = 4). For other image sizes the padding stays 4 unless given (the book's
    choice: the papers define it for 32 x 32 only). generator: a ``torch.Generator`` on ``x``'s
    device (``None``: torch's default one); the draws are those of :func:`crop_flip_parameters`.

    Returns a new (N, C, H, W) tensor of ``x``'s dtype, device and memory format; ``x`` is not
    changed. ``padding=0`` only flips.
    """
    _checks.count("padding", padding, minimum=0)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, the images on {x.device}: use a generator of "
                         f"the images' device")
    n, c, h, w = x.shape
    top, left, flip = crop_flip_parameters(n, padding, generator=generator, device=x.device)
    padded = F.pad(x, (padding, padding, padding, padding))                       # zeros
    rows = top[:, None] + torch.arange(h, device=x.device)                         # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)          # (N, W), flipped crop
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def augment(name: str | None, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The augmentation ``name`` of :data:`AUGMENTATIONS` applied to the batch ``x`` (``None``: ``x``
    itself)."""
    if name is None:
        return x
    if name == "crop_flip":
        return augment_crop_flip(x, generator=generator)
    raise ValueError(f"unknown augment {name!r}; use None or one of {', '.join(map(repr, AUGMENTATIONS))}")
