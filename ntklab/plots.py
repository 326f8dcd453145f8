"""The book's figures. Each function draws on a matplotlib ``Axes`` (made if not given) and
returns it, so chapters can compose panels and set captions around them.

Introduced in chapter 1 (Primer).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["kernel_heatmap", "image_grid", "accuracy_curves", "loglog_curves", "eigenvalue_spectra", "kernel_curves",
           "distance_matrix"]


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
               fig=None, cmap: str = "gray", signed=False):
    """Show images (N, C, H, W) in [0, 1] in a grid of ``nrow`` rows. Returns the Figure.

    ``signed``: ``True`` shows perturbations (values centred on 0, red positive, blue negative, on
    a common symmetric scale); a sequence of N booleans chooses per image, e.g. to put a row of
    perturbations under rows of images.
    """
    images = _np(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (N, C, H, W), got shape {images.shape}")
    n = images.shape[0]
    flags = [bool(signed)] * n if isinstance(signed, (bool, np.bool_)) else [bool(s) for s in signed]
    if len(flags) != n:
        raise ValueError(f"signed needs one flag per image ({n}), got {len(flags)}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles needs one title per image ({n}), got {len(titles)}")
    nrow = nrow or 1
    ncol = int(np.ceil(n / nrow))
    fig = fig or plt.figure(figsize=(1.3 * ncol, 1.45 * nrow))
    signed_values = images[np.array(flags)] if any(flags) else np.zeros(1)
    signed_lim = max(float(np.abs(signed_values).max()), 1e-12)
    for i in range(n):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        img = images[i].transpose(1, 2, 0)
        signed, lim = flags[i], (signed_lim if flags[i] else 1.0)
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


def loglog_curves(x, curves: dict, *, ax=None, slopes: dict | None = None, mark: float | None = None,
                  mark_label: str | None = None, floor: float = 1e-17, xlabel: str = "eps",
                  ylabel: str = "relative change", title: str | None = None, styles: dict | None = None):
    """Plot several positive curves over a common x axis on log-log axes (chapter 2).

    x: (m,) positive values; curves: label -> m values (values below ``floor``, e.g. exact zeros,
    are drawn at ``floor``); slopes: label -> a fitted log-log slope, shown in the legend; mark:
    an x value marked by a vertical dashed line (``mark_label`` in the legend); styles: label ->
    extra keyword arguments of ``ax.plot``. Returns the Axes.
    """
    x = _np(x).astype(float)
    if x.ndim != 1 or np.any(x <= 0):
        raise ValueError("x must be a 1-D array of positive values")
    ax = ax or plt.gca()
    for label, values in curves.items():
        values = _np(values).astype(float)
        if values.shape != x.shape:
            raise ValueError(f"curve {label!r} has {values.shape} values, x has {x.shape}")
        name = label if not slopes or label not in slopes else f"{label} (slope {slopes[label]:.2f})"
        ax.plot(x, np.maximum(values, floor), marker="o", ms=3, label=name, **(styles or {}).get(label, {}))
    if mark is not None:
        ax.axvline(mark, color="gray", ls="--", lw=1, label=mark_label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return ax


def eigenvalue_spectra(spectra: dict, *, ax=None, title: str | None = None, top: int | None = None,
                       cmap: str = "viridis"):
    """Normalised eigenvalue spectra, one line each: the eigenvalues of a kernel sorted in
    decreasing order and divided by their sum, against their rank, both axes logarithmic.

    spectra: maps a label (e.g. "epoch 3") to the eigenvalues (any order; those <= 0 are left out)
    of one kernel, or to the (n, n) kernel itself (symmetrised, then ``eigvalsh``). Lines are
    coloured in the order given along ``cmap``. top: show only the largest ``top`` eigenvalues.
    A flat spectrum (isotropic: many directions of similar weight) is a line near ``1 / n``; a
    steep one puts the weight on a few directions. Chapter 6. Returns the Axes.
    """
    if not spectra:
        raise ValueError("spectra must hold at least one spectrum")
    ax = ax or plt.gca()
    colours = plt.get_cmap(cmap)(np.linspace(0, 0.9, len(spectra)))
    for colour, (label, values) in zip(colours, spectra.items()):
        values = _np(values).astype(np.float64)
        if values.ndim == 2:
            if values.shape[0] != values.shape[1]:
                raise ValueError(f"spectrum {label!r}: a kernel must be square, got shape {values.shape}")
            values = np.linalg.eigvalsh((values + values.T) / 2)
        elif values.ndim != 1:
            raise ValueError(f"spectrum {label!r}: give eigenvalues (m,) or a kernel (n, n), got shape {values.shape}")
        values = np.sort(values[values > 0])[::-1]
        if not values.size:
            raise ValueError(f"spectrum {label!r} has no positive eigenvalue")
        values = values / values.sum()
        if top is not None:
            values = values[:top]
        ax.loglog(np.arange(1, values.size + 1), values, color=colour, label=str(label))
    ax.set_xlabel("rank i")
    ax.set_ylabel("lambda_i / sum_j lambda_j")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def kernel_curves(x, curves: dict, *, ax=None, decays: Sequence[float] = (), logy: bool = False,
                  xlabel: str = "epoch", ylabel: str = "", title: str | None = None, styles: dict | None = None):
    """Curves of a kernel quantity over training (velocity, distance, effective rank, ...), with the
    learning-rate decays marked by dotted vertical lines (chapters 4 and 5).

    x: the common x values (or a dict label -> x values); curves: label -> values (``None`` entries
    are skipped); decays: x positions of the decays; styles: label -> keyword arguments of
    ``ax.plot`` (e.g. ``{"ls": "--"}``). Returns the Axes.
    """
    ax = ax or plt.gca()
    for label, values in curves.items():
        xs = _np(x[label] if isinstance(x, dict) else x).astype(float)
        ys = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        if xs.shape != ys.shape:
            raise ValueError(f"curve {label!r} has {ys.size} values for {xs.size} x values")
        ax.plot(xs, ys, marker=".", label=label, **(styles or {}).get(label, {}))
    for i, d in enumerate(decays):
        ax.axvline(d, color="gray", ls=":", lw=1, label="lr decay" if i == 0 else None)
    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def distance_matrix(D, ticks=None, *, ax=None, title: str | None = None, label: str = "kernel distance",
                    cmap: str = "magma"):
    """Show a (T, T) matrix of distances between snapshots (e.g. kernel distance between all pairs
    of epochs, chapter 4), with ``ticks`` (T,) naming the snapshots. Returns the Axes."""
    D = _np(D)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"distance_matrix expects a square (T, T) matrix, got shape {D.shape}")
    ax = ax or plt.gca()
    im = ax.imshow(D, cmap=cmap, interpolation="nearest", origin="lower")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    if ticks is not None:
        ticks = list(_np(ticks))
        if len(ticks) != D.shape[0]:
            raise ValueError(f"ticks needs one entry per row ({D.shape[0]}), got {len(ticks)}")
        step = max(1, len(ticks) // 10)
        ax.set_xticks(range(0, len(ticks), step), [str(t) for t in ticks[::step]])
        ax.set_yticks(range(0, len(ticks), step), [str(t) for t in ticks[::step]])
    if title:
        ax.set_title(title)
    return ax


# --- chapter 3 ---
__all__ += ["batch_size_robustness"]

_CRAFT_STYLE = {("self", "adversarial"): ("o", "-"), ("self", "half"): ("o", ":"),
                ("twin", "adversarial"): ("s", "-"), ("twin", "half"): ("s", ":")}


def batch_size_robustness(ax, result: dict, model: str, show: str = "all"):
    """Robust accuracy of one model of a ``batchnorm`` result against the test batch size, with
    batch statistics at test time: one line per crafting mode (circles "self", squares "twin";
    ``show`` keeps ``"all"``, ``"self"`` or ``"twin"``) and composition (solid all-adversarial,
    dotted half clean); a black line for running statistics (with-buffer models), a dashed red one
    for AutoAttack on the model as used at test time. Introduced in chapter 3. Returns the Axes."""
    if show not in ("all", "self", "twin"):
        raise ValueError(f"show must be 'all', 'self' or 'twin', got {show!r}")
    sizes = result["config"]["settings"]["test_batch_sizes"]
    rows = {(r["test_bn"], r["craft"], r["composition"], r["batch_size"]): r["robust"]
            for r in result["rows"] if r["model"] == model}
    if not rows:
        raise ValueError(f"no rows for model {model!r}; models: {result['models']}")
    for (craft, composition), (marker, ls) in _CRAFT_STYLE.items():
        if show in ("all", craft):
            ax.plot(sizes, [rows["batch", craft, composition, b] for b in sizes], marker=marker, ls=ls,
                    label=f"batch statistics, {craft}, {composition}")
    if ("running", "self", "adversarial", sizes[0]) in rows:
        ax.axhline(rows["running", "self", "adversarial", sizes[0]], color="black", lw=1,
                   label="running statistics (PGD, FGSM)")
    ax.axhline(result["autoattack"][model], color="crimson", ls="--", lw=1, label="AutoAttack, as used at test")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test batch size")
    ax.set_ylabel("robust accuracy")
    ax.set_title(model)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


# --- chapter 7 ---
__all__ += ["pgd_attack", "adversarial_grid"]


def pgd_attack(steps: int = 10):
    """The PGD the book shows in figures and explorers: ``attack(model, x, y, eps)`` running
    :func:`ntklab.attacks.pgd` with ``steps`` steps of eps/4 (its default step; at eps = 0, where an
    explorer's slider starts, the images come back unchanged). Pass it to :func:`ntklab.widgets.attack_explorer` as ``attack``.
    Introduced in chapter 1 (Primer); used from chapter 7 on."""
    from ntklab import attacks

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")

    def attack(model, x, y, eps):
        return attacks.pgd(model, x, y, eps=eps, steps=steps)

    return attack


def adversarial_grid(model, x, y, *, eps: float, steps: int = 10, names: dict | None = None,
                     model_name: str = "clean", fig=None):
    """Three rows for the images ``x`` (N, C, H, W) in [0, 1], on the model's device, with labels
    ``y``: the images with
    ``model``'s predictions (titled ``model_name``), their PGD examples (:func:`pgd_attack` at
    ``eps`` with ``steps`` steps) with its predictions, and the perturbations (red: brightened,
    blue: darkened, on one symmetric scale). ``names`` maps a predicted class to the text shown
    (default: the class number). The figure's title says how many predictions PGD changes. The
    model should be in eval mode. Returns the Figure. Introduced in chapter 1 (Primer); used in
    chapters 7 and 8."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(y, torch.Tensor) or y.shape != (len(x),):
        raise ValueError("x must be an (N, C, H, W) tensor and y an (N,) tensor of labels")
    y = y.to(x.device)
    x_adv = pgd_attack(steps)(model, x, y, eps)
    with torch.no_grad():
        pred, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
    name = (lambda c: str(names[int(c)])) if names is not None else (lambda c: str(int(c)))
    n = len(x)
    fig = fig or plt.figure(figsize=(1.25 * n, 4.2))
    image_grid(torch.cat([x, x_adv, x_adv - x]).detach().cpu(), nrow=3, fig=fig,
               signed=[False] * (2 * n) + [True] * n,
               titles=[f"{model_name}: {name(c)}" for c in pred] + [f"PGD: {name(c)}" for c in pred_adv]
               + ["perturbation"] * n)
    fig.suptitle(f"PGD-{steps} at eps {eps:g} changes {int((pred != pred_adv).sum())} of {n} predictions",
                 fontsize=9)
    return fig


# --- chapter 6 ---
__all__ += ["seed_curves"]


def seed_curves(x, stacks: dict, *, ax=None, xlabel: str = "epoch", ylabel: str = "accuracy",
                title: str | None = None, ylim=(-0.02, 1.02)):
    """One curve per label over the seeds: ``stacks`` maps a label to an (S, T) array (S seeds, T
    values over ``x``), drawn as thin lines (one per seed) under a thick line with markers (their
    mean), one colour per label. Introduced in chapter 6 (held-out PGD accuracy per epoch of every
    training method). Returns the Axes."""
    ax = ax or plt.gca()
    colours = plt.get_cmap("tab10")(np.arange(len(stacks)) % 10)
    for colour, (label, stack) in zip(colours, stacks.items()):
        stack = np.atleast_2d(_np(stack).astype(float))
        if stack.shape[1] != len(_np(x)):
            raise ValueError(f"curves {label!r} have {stack.shape[1]} values for {len(_np(x))} x values")
        for line in stack:
            ax.plot(_np(x), line, color=colour, alpha=0.25, lw=1)
        ax.plot(_np(x), stack.mean(0), color=colour, lw=2.5, marker="o", label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    return ax


# --- chapter 4 ---
__all__ += ["polar_paths", "cost_robustness"]


def polar_paths(paths: dict, *, ax=None, title: str | None = None):
    """Kernel paths in polar form (chapter 4): for each label, ``(radius, angle)`` as returned by
    :func:`ntklab.metrics.polar_dynamics` (angle in radians from the initial kernel, radius the
    distance travelled), on a polar Axes (made if not given), the angular range cut a little above
    the largest angle (at most 180 degrees). Returns the Axes."""
    if ax is None:
        ax = plt.gcf().add_subplot(projection="polar")
    largest = 0.0
    for label, (radius, angle) in paths.items():
        radius, angle = _np(radius).astype(float), _np(angle).astype(float)
        if radius.shape != angle.shape:
            raise ValueError(f"path {label!r} has {radius.size} radii for {angle.size} angles")
        ax.plot(angle, radius, marker=".", label=label)
        largest = max(largest, float(np.degrees(angle.max())) if angle.size else 0.0)
    ax.set_thetamax(min(180, 10 * np.ceil(largest / 10) + 5))
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    return ax


# --- chapter 5 ---
def cost_robustness(cost: dict, robust: dict, strong: dict, *, band: tuple[float, float] | None = None,
                    names: dict | None = None, at_edge: Sequence[str] = (), ax=None,
                    xlabel: str = "training time", robust_label: str = "robust accuracy",
                    strong_label: str = "a stronger attack", band_label: str = "tolerance"):
    """Robust accuracy against the cost of training, one point per schedule (chapter 5).

    For each label of ``cost`` (x values, e.g. CPU seconds): a filled dot at ``robust[label]`` above
    an open dot at ``strong[label]`` (a stronger attack, e.g. on a smaller sample), joined by a line,
    annotated with ``names[label]`` (default: the label). ``band``: (low, high) of robust accuracy
    shaded (the tolerance around a reference); ``at_edge``: labels whose accuracies sit far below the
    others (normal training): drawn at the lower edge, 0.05 below the others' lowest value.
    Returns the Axes.
    """
    ax = ax or plt.gca()
    names = names or {}
    others = [l for l in cost if l not in at_edge] or list(cost)
    low = min(min(robust[l], strong[l]) for l in others) - 0.05
    for i, label in enumerate(cost):
        x, hi, lo = cost[label], max(robust[label], low), max(strong[label], low)
        ax.plot([x, x], [lo, hi], color="lightgray", zorder=1)
        ax.scatter(x, hi, s=60, zorder=2, clip_on=False)
        ax.scatter(x, lo, s=40, facecolors="none", edgecolors="k", zorder=2, clip_on=False)
        ax.annotate(names.get(label, label), (x, hi), textcoords="offset points", xytext=(-4, 8), fontsize=9,
                    ha="right" if i % 2 else "left")
    if band is not None:
        ax.axhspan(*band, color="tab:green", alpha=0.12, label=band_label)
    ax.scatter([], [], s=60, color="gray", label=robust_label)
    ax.scatter([], [], s=40, facecolors="none", edgecolors="k", label=strong_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(low, min(1.0, max(robust[l] for l in others) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ax


# --- chapter 1 ---
__all__ += ["raw_and_normalised_kernels"]


def raw_and_normalised_kernels(kernels: dict, labels=None, *, axes=None, titles: dict | None = None):
    """Each (n, n) kernel of ``kernels`` (name -> K) twice, in one column per kernel: raw on top,
    normalised K_ij / sqrt(K_ii K_jj) below on a common colour scale (the diagonal is 1), so that
    class blocks hidden by the diagonal and by the scale of the raw kernel show (chapter 1).
    ``labels`` (n,): class lines as in :func:`kernel_heatmap`; ``titles``: name -> title of the
    raw panel. Returns the (2, len(kernels)) array of Axes."""
    if not kernels:
        raise ValueError("raw_and_normalised_kernels needs at least one kernel")
    if axes is None:
        _, axes = plt.subplots(2, len(kernels), figsize=(4.6 * len(kernels), 8), squeeze=False)
    axes = np.asarray(axes).reshape(2, len(kernels))
    titles = titles or {}
    normalised = {}
    for name, K in kernels.items():
        K = _np(K).astype(np.float64)
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"kernel {name!r} must be a square (n, n) matrix, got shape {K.shape}")
        d = np.sqrt(np.diag(K))
        if not (d > 0).all():
            raise ValueError(f"kernel {name!r} needs a positive diagonal to be normalised")
        normalised[name] = K / d[:, None] / d[None, :]
    low = min(float(N.min()) for N in normalised.values())
    for c, (name, K) in enumerate(kernels.items()):
        kernel_heatmap(K, labels, ax=axes[0, c], title=titles.get(name, f"{name}, raw"))
        kernel_heatmap(normalised[name], labels, ax=axes[1, c], title=f"{name}, normalised")
        axes[1, c].images[-1].set_clim(low, 1.0)
    return axes


# --- chapter 3 ---
__all__ += ["centred_ks_against_robustness"]


def centred_ks_against_robustness(analysis: dict, *, axes=None):
    """Two panels (C-NTK, AE-NTK) of a ``batchnorm`` analysis (:func:`ntklab.experiments.batchnorm.analyse`):
    each distinct network's centred kernel specialization, with its bootstrap 95% interval as a
    horizontal bar, against its robust accuracy (the smallest over every evaluation as used at test
    time). Introduced in chapter 3. Returns the two Axes."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, which, title in zip(axes, ("clean", "ae"), ("C-NTK", "AE-NTK")):
        ks = analysis["ks"][which]
        for key, marker in zip(ks["centred"], "os^vD"):
            v, lo, hi = ks["centred"][key], ks["low"][key], ks["high"][key]
            # a percentile interval need not contain the estimate (tiny, degenerate samples: smoke):
            # the bar then stops at the point rather than pointing the wrong way
            ax.errorbar([v], [analysis["robust"][key]], xerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt=marker,
                        ms=8, capsize=4,
                        label=key)
        ax.set_xlabel(f"centred KS of the {title} (bootstrap 95% interval)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust accuracy (worst over every evaluation)")
    axes[1].legend(fontsize=8)
    return axes


# --- chapter 5 ---
__all__ += ["switch_grid", "auto_switch_curves"]


def switch_grid(analysis: dict, *, axes=None):
    """Two panels of a ``schedule`` analysis (:func:`ntklab.experiments.schedule.analyse`). Left:
    the robust accuracy each switch s of the grid loses against full PGD-AT (mean over seeds, 95%
    interval of the paired difference, one thin line per seed), the late-PGD-AT-only controls at
    their s (crosses) and FGSM-RS (a dashed level); the grid may run to s = E (the normal run). Right:
    each switch's saving counted in passes, predicted from the measured per-batch step costs, and
    measured in the runs' CPU seconds (mean and standard error over seeds), with 30% marked. Both
    panels mark the learning-rate decays (``analysis["decays"]``: after that many epochs) with dotted
    lines. With a third Axes in ``axes``, it draws each switch's worst-case robust accuracy itself
    (one line per seed, the mean as dots, full PGD-AT at s = 0), where the loss panel's intervals
    carry full PGD-AT's spread over seeds. Introduced in chapter 5. Returns the Axes."""
    import numpy as np

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4.3))
    grid = [0] + list(analysis["grid"])
    labels = [f"s={s}" for s in grid]
    loss = [analysis["loss"][l] for l in labels]
    ax = axes[0]
    per_seed = np.array([l["diffs"] for l in loss])
    for i in range(per_seed.shape[1]):
        ax.plot(grid, per_seed[:, i], color="tab:blue", lw=0.8, alpha=0.35)
    means = np.array([l["mean"] for l in loss])
    ax.errorbar(grid, means, yerr=[means - [l["low"] for l in loss], [l["high"] for l in loss] - means], fmt="o",
                color="tab:blue", capsize=3, label="switch after s epochs (mean, 95% CI)")
    for s in analysis["controls"]:
        late = analysis["loss"][f"late s={s}"]
        ax.errorbar([s], [late["mean"]], yerr=[[late["mean"] - late["low"]], [late["high"] - late["mean"]]], fmt="x",
                    color="tab:red", ms=9, capsize=3, label="PGD-AT for the last E - s epochs only" if s == analysis["controls"][0]
                    else None)
    ax.axhline(analysis["loss"]["fgsm_rs"]["mean"], color="tab:green", ls="--", lw=1, label="FGSM-RS, all epochs")
    ax.axhline(0, color="gray", lw=0.8)
    for ax_ in axes:
        for i, m in enumerate(analysis.get("decays", [])):
            ax_.axvline(m, color="gray", ls=":", lw=1, label="learning-rate decays" if i == 0 else None)
    ax.set_xticks(grid)
    ax.set_xlabel(f"s (normal epochs before PGD-AT; s = {analysis['epochs']}: normal training only)")
    ax.set_ylabel("robust accuracy lost vs full PGD-AT")
    ax.legend(fontsize=8)
    ax = axes[1]
    E, k = analysis["epochs"], analysis["pgd_steps"]
    xs = np.linspace(0, max(grid), 50)
    ax.plot(xs, xs / E * k / (k + 1), color="gray", label=f"counted in passes (PGD-{k} = {k + 1} passes)")
    ax.plot(grid, [analysis["predicted_saving"][s] for s in grid], "--", color="tab:purple",
            label=f"predicted from the measured step costs (ratio {analysis['step_ratio']:.2f})")
    cpu = [analysis["cpu_saving"][l] for l in labels]
    ax.errorbar(grid, [c["mean"] for c in cpu], yerr=[c["se"] if np.isfinite(c["se"]) else 0 for c in cpu], fmt="o",
                color="tab:orange", capsize=3, label="measured in the runs' CPU seconds (mean ± SE)")
    ax.axhline(0.3, color="tab:red", ls=":", lw=1, label="30%")
    ax.set_xticks(grid)
    ax.set_xlabel("s (normal epochs before PGD-AT)")
    ax.set_ylabel("saving vs full PGD-AT")
    ax.legend(fontsize=8)
    if len(axes) > 2:
        ax = axes[2]
        robust = np.array([analysis["robust"][l] for l in labels])
        for i in range(robust.shape[1]):
            ax.plot(grid, robust[:, i], color="tab:blue", lw=0.8, alpha=0.35)
        ax.plot(grid, robust.mean(axis=1), "o", color="tab:blue", label="mean over seeds (thin lines: each seed)")
        ax.set_xticks(grid)
        ax.set_ylim(0, 1)
        ax.set_xlabel("s (normal epochs before PGD-AT)")
        ax.set_ylabel("worst-case robust accuracy")
        ax.legend(fontsize=8)
    return axes


def auto_switch_curves(analysis: dict, *, ax=None):
    """The automatic switch of a ``schedule`` analysis: per seed, the velocity per unit of learning
    rate it measured on its own probe (divided by the first epoch's; dots at the 1-based epoch,
    the chosen switch circled), with the threshold, and chapter 4's angular velocity of the same
    normal trajectory on chapter 4's probe, squared and divided by the first epoch's (so that the
    same threshold applies; faint lines). Introduced in chapter 5. Returns the Axes."""
    import numpy as np

    ax = ax or plt.gca()
    for i, (v, w, s) in enumerate(zip(analysis["auto_velocity"], analysis["normal_velocity"], analysis["auto_switch"])):
        color = f"C{i}"
        v, w = np.asarray(v), np.asarray(w)
        ax.semilogy(np.arange(1, len(w) + 1), (w / w[0]) ** 2, color=color, lw=1, alpha=0.4)
        ax.semilogy(np.arange(1, len(v) + 1), v / v[0], "o-", color=color, label=f"seed {analysis['seeds'][i]}")
        ax.scatter([s], [v[s - 1] / v[0]], s=150, facecolors="none", edgecolors=color, lw=2)
    ax.axhline(analysis["threshold"], color="tab:red", ls="--", lw=1, label=f"threshold {analysis['threshold']:g}")
    ax.axvline(analysis["cap"] + 0.5, color="gray", ls=":", lw=1, label="first decay (the cap)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("velocity / first epoch's")
    ax.set_title("automatic switch (dots, chosen epoch circled); chapter 4's curve (faint)")
    ax.legend(fontsize=8)
    return ax


# --- the introduction: the chapters' dependency graph ---
__all__ += ["chapter_graph"]


def chapter_graph(prerequisites: dict, *, ax=None, width: int = 22):
    """The chapters as boxes and their prerequisites as arrows, from
    :func:`ntklab._book.chapter_prerequisites` (``{name: {"title", "number", "before"}}``). A
    chapter sits one row below its deepest prerequisite, so the graph reads top to bottom; an arrow
    is drawn only for a prerequisite not already implied through another one (the transitive
    reduction). Titles are the part before a colon, wrapped at ``width`` characters. Raises
    ``ValueError`` for a prerequisite that is not in ``prerequisites``, or a cycle. Shown in the
    book's introduction. Returns the Axes."""
    import textwrap

    for name, info in prerequisites.items():
        missing = [p for p in info["before"] if p not in prerequisites]
        if missing:
            raise ValueError(f"prerequisites: {name!r} needs {missing[0]!r}, which is not among the chapters")
    depth: dict[str, int] = {}
    ancestors: dict[str, set] = {}

    def visit(name, seen=()):
        if name in seen:
            raise ValueError(f"prerequisites: {name!r} is its own prerequisite (a cycle)")
        if name not in depth:
            before = prerequisites[name]["before"]
            depth[name] = 1 + max((visit(p, seen + (name,)) for p in before), default=-1)
            ancestors[name] = set(before).union(*(ancestors[p] for p in before))
        return depth[name]

    for name in prerequisites:
        visit(name)
    rows: dict[int, list[str]] = {}
    for name in sorted(prerequisites, key=lambda n: prerequisites[n]["number"]):
        rows.setdefault(depth[name], []).append(name)
    pos = {n: (i - (len(names) - 1) / 2, -d) for d, names in rows.items() for i, n in enumerate(names)}
    ax = ax or plt.gca()
    boxes = {}
    for name, (x, y) in pos.items():
        title = prerequisites[name]["title"].split(":")[0]
        label = textwrap.fill(f"{prerequisites[name]['number']}. {title}", width)
        boxes[name] = ax.text(x, y, label, ha="center", va="center", fontsize=9,
                              bbox=dict(boxstyle="round,pad=0.4", fc="#eef3fb", ec="#4a6fa5"))
    for name, info in prerequisites.items():
        for p in info["before"]:
            if any(p in ancestors[q] for q in info["before"] if q != p):
                continue                                    # implied through another prerequisite
            ax.annotate("", xy=(0.5, 1), xycoords=boxes[name], xytext=(0.5, 0), textcoords=boxes[p],
                        arrowprops=dict(arrowstyle="-|>", color="0.35", lw=1.2, shrinkA=4, shrinkB=4))
    half = max(len(v) for v in rows.values()) / 2
    ax.set_xlim(-half - 0.1, half + 0.1)
    ax.set_ylim(-max(rows) - 0.5, 0.5)
    ax.axis("off")
    return ax
