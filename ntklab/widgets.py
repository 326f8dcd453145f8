"""ipywidgets explorers of the book. A static page has no kernel behind it, so every chapter
shows a static figure of the same thing before an explorer.

Introduced in chapter 1 (Primer).
"""
from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import torch

__all__ = ["attack_explorer", "choice_explorer", "spectrum_explorer"]


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
        with torch.no_grad():
            was_training = model.training
            model.eval()
            p_clean = model(x).softmax(1)[0]
            p_adv = model(x_adv).softmax(1)[0]
            model.train(was_training)
        out.clear_output(wait=True)
        with out:
            fig, axes = plt.subplots(1, 3, figsize=(7, 2.6))
            delta = (x_adv - x)[0, 0].detach().cpu().numpy()
            axes[0].imshow(x[0].permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[0].set_title(f"clean: {int(p_clean.argmax())} ({float(p_clean.max()):.2f})")
            axes[1].imshow(x_adv[0].permute(1, 2, 0).squeeze(-1).detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[1].set_title(f"adversarial: {int(p_adv.argmax())} ({float(p_adv.max()):.2f})")
            lim = max(float(abs(delta).max()), 1e-8)
            axes[2].imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[2].set_title("perturbation")
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
