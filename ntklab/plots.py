"""The book's figures. Each function draws on a matplotlib ``Axes`` (made if not given) and
returns it, so chapters can compose panels and set captions around them.

Introduced in chapter 1 (Primer).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["kernel_heatmap", "image_grid", "accuracy_curves"]


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def kernel_heatmap(K, labels=None, *, ax=None, title: str | None = None, cmap: str = "viridis"):
    """Show an (n, n) kernel matrix, with lines between classes when ``labels`` (n,) is given.

    The inputs should be sorted by label for the class blocks to show. Returns the Axes.
    """
    K = _np(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel_heatmap expects a square (n, n) matrix, got shape {K.shape}")
    ax = ax or plt.gca()
    im = ax.imshow(K, cmap=cmap, interpolation="nearest")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if labels is not None:
        labels = _np(labels)
        if labels.shape != (K.shape[0],):
            raise ValueError(f"labels must have shape ({K.shape[0]},), got {labels.shape}")
        cuts = np.flatnonzero(np.diff(labels)) + 0.5
        for c in cuts:
            ax.axhline(c, color="white", lw=0.6)
            ax.axvline(c, color="white", lw=0.6)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1])
        ends = np.concatenate([starts[1:], [len(labels)]])
        ax.set_xticks((starts + ends - 1) / 2, [str(labels[s]) for s in starts])
        ax.set_yticks((starts + ends - 1) / 2, [str(labels[s]) for s in starts])
        ax.set_xlabel("class")
    if title:
        ax.set_title(title)
    return ax


def image_grid(images, *, titles: Sequence[str] | None = None, nrow: int | None = None,
               fig=None, cmap: str = "gray", signed: bool = False):
    """Show images (N, C, H, W) in [0, 1] (or, with ``signed=True``, perturbations centred on 0)
    in a grid of ``nrow`` rows. Returns the Figure."""
    images = _np(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (N, C, H, W), got shape {images.shape}")
    n = images.shape[0]
    nrow = nrow or 1
    ncol = int(np.ceil(n / nrow))
    fig = fig or plt.figure(figsize=(1.3 * ncol, 1.45 * nrow))
    lim = np.abs(images).max() if signed else 1.0
    for i in range(n):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        img = images[i].transpose(1, 2, 0)
        if img.shape[2] == 1:
            ax.imshow(img[:, :, 0], cmap="RdBu_r" if signed else cmap,
                      vmin=-lim if signed else 0, vmax=lim)
        else:
            ax.imshow(np.clip(img / (2 * lim) + 0.5, 0, 1) if signed else np.clip(img, 0, 1))
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return fig


def accuracy_curves(x, curves: dict, *, ax=None, xlabel: str = "eps", ylabel: str = "accuracy",
                    title: str | None = None):
    """Plot several accuracy curves over a common x axis; ``curves`` maps a label to values."""
    ax = ax or plt.gca()
    for label, values in curves.items():
        ax.plot(_np(x), _np(values), marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax
