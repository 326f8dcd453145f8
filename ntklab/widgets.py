"""ipywidgets explorers of the book. A static page has no kernel behind it, so every chapter
shows a static figure of the same thing before an explorer.

Introduced in chapter 1 (Primer).
"""
from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import torch

from ntklab.bn import eval_mode

__all__ = ["attack_explorer", "choice_explorer", "spectrum_explorer", "kernel_explorer", "switch_explorer",
           "phase_explorer"]


def attack_explorer(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    attack: Callable, *, eps_max: float = 0.3, eps_step: float = 0.01):
    """An eps slider and an image picker: shows the clean image, the adversarial one made by
    ``attack(model, x, y, eps=eps)`` and the perturbation, with the model's predictions.

    images: (N, C, H, W) in [0, 1]; labels: (N,) int64. Returns the ipywidgets container.
    """
    import ipywidgets as widgets

    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError("images must be (N, C, H, W) and labels (N,)")
    out = widgets.Output()
    eps = widgets.FloatSlider(value=min(0.1, eps_max), min=0.0, max=eps_max, step=eps_step,
                              description="eps", readout_format=".2f", continuous_update=False)
    index = widgets.IntSlider(value=0, min=0, max=images.shape[0] - 1, description="image",
                              continuous_update=False)

    def draw(*_):
        x, y = images[index.value : index.value + 1], labels[index.value : index.value + 1]
        x_adv = attack(model, x, y, eps=eps.value)
        with eval_mode(model), torch.no_grad():
            p_clean = model(x).softmax(1)[0]
            p_adv = model(x_adv).softmax(1)[0]
        out.clear_output(wait=True)
        with out:
            fig, axes = plt.subplots(1, 3, figsize=(7, 2.6))
            # one channel as it is; several (colour): their mean, on the same signed scale
            delta = (x_adv - x)[0].detach().mean(0).cpu().numpy() if x.shape[1] > 1 else \
                (x_adv - x)[0, 0].detach().cpu().numpy()
            axes[0].imshow(x[0].permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[0].set_title(f"clean: {int(p_clean.argmax())} ({float(p_clean.max()):.2f})")
            axes[1].imshow(x_adv[0].permute(1, 2, 0).squeeze(-1).detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[1].set_title(f"adversarial: {int(p_adv.argmax())} ({float(p_adv.max()):.2f})")
            lim = max(float(abs(delta).max()), 1e-8)
            axes[2].imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[2].set_title("perturbation" if x.shape[1] == 1 else "perturbation (channel mean)")
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
            plt.show()

    eps.observe(draw, names="value")
    index.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([eps, index]), out])


def choice_explorer(draw: Callable, options: dict, *, figsize=(6.5, 4)):
    """One dropdown per entry of ``options`` (name -> list of values); every change redraws
    ``draw(ax, **choices)`` on a fresh figure. For browsing a cached result along its axes
    (chapters 2 and 3: networks and perturbations, models and crafting modes), after a static
    figure of the same thing. Returns the ipywidgets container.
    """
    import ipywidgets as widgets

    if not options or any(not list(v) for v in options.values()):
        raise ValueError("options must map each name to a non-empty list of values")
    out = widgets.Output()
    menus = {name: widgets.Dropdown(options=list(values), value=list(values)[0], description=name)
             for name, values in options.items()}

    def redraw(*_):
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=figsize)
            draw(ax, **{name: menu.value for name, menu in menus.items()})
            plt.show()

    for menu in menus.values():
        menu.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(menus.values())), out])


def spectrum_explorer(kernels: dict, epochs, *, center: bool = True, q: int = 10):
    """An epoch slider over kernel snapshots: the normalised eigenvalue spectra of every entry of
    ``kernels`` at the chosen epoch next to their spectra at the first snapshot
    (:func:`ntklab.plots.eigenvalue_spectra`), with the effective rank and the top-``q``
    concentration (:mod:`ntklab.metrics`) in the legend.

    kernels: maps a label (e.g. "FGSM, AE-NTK") to a (T, n, n) stack of snapshots; epochs: the T
    epochs of the snapshots; center: centre each kernel first (H K H). Chapter 6. Returns the
    ipywidgets container.
    """
    import ipywidgets as widgets

    from ntklab import metrics, plots

    epochs = [int(e) for e in epochs]
    if not kernels or any(len(K) != len(epochs) for K in kernels.values()):
        raise ValueError("kernels must map labels to stacks of one snapshot per epoch in epochs")
    out = widgets.Output()
    slider = widgets.SelectionSlider(options=epochs, value=epochs[-1], description="epoch",
                                     continuous_update=False)

    def prepare(K):
        return metrics.center_kernel(K) if center else K

    def draw(*_):
        t = epochs.index(slider.value)
        out.clear_output(wait=True)
        with out:
            fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 3.4), squeeze=False)
            for ax, (label, stack) in zip(axes[0], kernels.items()):
                shown = {}
                for s in sorted({0, t}):
                    K = prepare(stack[s])
                    shown[f"epoch {epochs[s]}: erank {metrics.effective_rank(K):.1f}, "
                          f"top-{q} {metrics.top_concentration(K, q):.2f}"] = K
                plots.eigenvalue_spectra(shown, ax=ax, title=label)
            plt.tight_layout()
            plt.show()

    slider.observe(draw, names="value")
    draw()
    return widgets.VBox([slider, out])


def kernel_explorer(kernels: dict, epochs, labels=None, *, center: bool = True):
    """Pick a run and an epoch: the kernel of that snapshot as a heatmap, centred or not, with its
    kernel distance to the previous snapshot and to the initial kernel (chapter 4).

    kernels: run name -> (T, n, n) kernels (e.g. ``KernelSnapshots.kernels("clean")``), all with
    the same T snapshots taken after ``epochs`` (T,) completed epochs; labels: (n,) class labels of
    the probe, sorted, for the class lines. Returns the ipywidgets container.
    """
    import ipywidgets as widgets

    from ntklab import metrics, plots

    epochs = [int(e) for e in epochs]
    if not kernels:
        raise ValueError("kernels must name at least one run")
    for name, K in kernels.items():
        if K.dim() != 3 or K.shape[0] != len(epochs) or K.shape[1] != K.shape[2]:
            raise ValueError(f"kernels[{name!r}] must have shape (T={len(epochs)}, n, n), got {tuple(K.shape)}")
    out = widgets.Output()
    run = widgets.Dropdown(options=list(kernels), description="run")
    index = widgets.IntSlider(value=len(epochs) - 1, min=0, max=len(epochs) - 1, description="snapshot",
                              continuous_update=False)
    centred = widgets.Checkbox(value=center, description="centred")

    def draw(*_):
        K, t = kernels[run.value], index.value
        shown = metrics.center_kernel(K[t]) if centred.value else K[t]
        previous = metrics.kernel_distance(K[t - 1], K[t], center=centred.value) if t else 0.0
        initial = metrics.kernel_distance(K[0], K[t], center=centred.value)
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(5, 4.2))
            plots.kernel_heatmap(shown, labels, ax=ax, title=f"{run.value}, epoch {epochs[t]}: "
                                 f"KD to previous {previous:.4f}, to initial {initial:.3f}")
            ax.title.set_fontsize(9)
            plt.show()

    for w in (run, index, centred):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([run, index, centred]), out])


def switch_explorer(velocity, *, cap: int, threshold: float = 0.2, outcomes: dict | None = None):
    """A threshold slider over a kernel-velocity curve: where the automatic switch of chapter 5
    (:class:`ntklab.callbacks.AutoSwitch`) would move from normal training to adversarial training,
    and what that switch cost in the measured runs.

    velocity: one value per epoch (> 0 for the first), per unit of learning rate as the switch
    measures it; entry t is epoch t + 1 (epochs are numbered from 1: a switch s trains epochs 1..s
    normally). cap: the latest switch. outcomes: ``{s: text}``, what the runs that switched after s
    epochs showed (e.g. their robust accuracy lost and time saved), printed below the plot for the
    chosen s. Returns the ipywidgets container; its ``summary`` (an ``HTML`` widget) holds the text.
    """
    import ipywidgets as widgets
    import numpy as np

    from ntklab.callbacks import AutoSwitch

    v = np.asarray(velocity, dtype=float)
    AutoSwitch.decide(list(v), threshold, cap)  # checks the curve and the arguments
    outcomes = {int(k): str(t) for k, t in (outcomes or {}).items()}
    out, summary = widgets.Output(), widgets.HTML()
    slider = widgets.FloatLogSlider(value=threshold, base=10, min=-2, max=-0.05, step=0.05,
                                    description="threshold", readout_format=".3f", continuous_update=False)

    def draw(*_):
        s = AutoSwitch.decide(list(v), slider.value, cap)
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.semilogy(np.arange(1, len(v) + 1), v / v[0], marker=".", label="velocity / first epoch's")
            ax.axhline(slider.value, color="tab:red", ls="--", label=f"threshold {slider.value:.3f}")
            ax.axvline(cap + 0.5, color="gray", ls=":", label=f"cap: AT from epoch {cap + 1} at the latest")
            if s is not None:  # None: the curve ends before the cap and never gets lazy
                ax.axvspan(s + 0.5, len(v) + 0.5, color="tab:orange", alpha=0.15, label=f"AT from epoch {s + 1}")
            ax.set_xlabel("epoch")
            ax.legend(fontsize=8)
            plt.show()
        if s is None:
            summary.value = "no switch within the curve"
        else:
            summary.value = f"switch after epoch {s}: " + outcomes.get(s, "no run switched there")

    slider.observe(draw, names="value")
    draw()
    box = widgets.VBox([slider, out, summary])
    box.summary = summary
    return box


def phase_explorer(curves: dict, epochs, *, lazy_below: float, rise_above: float, decays=(),
                   ylabel: str = "angular velocity"):
    """Sliders for the two thresholds of the phase rule (:func:`ntklab.metrics.split_phases`) over
    cached velocity curves (chapter 4): pick a run and move the thresholds; the curve is redrawn
    with its lazy-training epochs shaded, and the text below lists the phases and how many runs
    get a third phase (kernel learning again after the first decay) under these thresholds.

    curves: run name -> velocities (one per snapshot interval, first > 0); epochs: the epoch at the
    end of each entry (the same for every curve); lazy_below, rise_above: the starting thresholds
    (in the curves' units: for angles, sqrt of the KD rule's 0.2 and 3); decays: epochs after which
    the rate decays. The returned container's ``summary`` (an ``HTML`` widget) holds the text.
    """
    import ipywidgets as widgets
    import numpy as np

    from ntklab import metrics

    epochs = [int(e) for e in epochs]
    if not curves or any(len(v) != len(epochs) for v in curves.values()):
        raise ValueError("curves must map run names to one value per entry of epochs")
    for v in curves.values():
        metrics.split_phases(v, lazy_below=lazy_below, rise_above=rise_above)   # checks curve and thresholds
    out, summary = widgets.Output(), widgets.HTML()
    run = widgets.Dropdown(options=list(curves), description="run")
    low = widgets.FloatSlider(value=lazy_below, min=0.05, max=0.95, step=0.01, description="lazy below",
                              readout_format=".2f", continuous_update=False)
    high = widgets.FloatSlider(value=rise_above, min=1.05, max=10.0, step=0.05, description="rise above",
                               readout_format=".2f", continuous_update=False)
    first_decay = min(decays) if decays else None

    def third(phases):
        return first_decay is not None and any(p == metrics.PHASES[0] and epochs[a] > first_decay
                                               for p, a, _ in phases)

    def draw(*_):
        phases = {k: metrics.split_phases(v, lazy_below=low.value, rise_above=high.value) for k, v in curves.items()}
        mine = phases[run.value]
        n3 = sum(third(p) for p in phases.values())
        summary.value = (f"<b>{run.value}</b>: " + "; ".join(f"{p} epochs {epochs[a]}-{epochs[b - 1]}"
                                                             for p, a, b in mine)
                         + f"<br>runs with kernel learning again after the first decay: {n3} of {len(curves)}")
        out.clear_output(wait=True)
        with out:
            v = np.asarray(curves[run.value], dtype=float)
            fig, ax = plt.subplots(figsize=(6.5, 3.2))
            ax.semilogy(epochs, v, marker=".", label=run.value)
            for p, a, b in mine:
                if p == metrics.PHASES[1]:
                    ax.axvspan(epochs[a] - 0.5, epochs[b - 1] + 0.5, color="tab:green", alpha=0.15)
            for d in decays:
                ax.axvline(d + 0.5, color="gray", ls=":")
            ax.axhline(low.value * v[0], color="tab:red", ls="--", lw=1, label="lazy below x first value")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
            plt.show()

    for w in (run, low, high):
        w.observe(draw, names="value")
    draw()
    box = widgets.VBox([widgets.HBox([run, low, high]), summary, out])
    box.summary = summary
    return box
