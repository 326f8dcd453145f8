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

def _panel(inputs, draw, *below, **attrs):
    """The explorers' common frame: every control in ``inputs`` redraws through ``draw`` when its
    value changes, ``draw`` runs once now, and the controls sit in a row above ``below``; ``attrs``
    become attributes of the returned ``VBox`` (e.g. ``summary``, for tests and chapters)."""
    import ipywidgets as widgets

    for w in inputs:
        w.observe(draw, names="value")
    draw()
    box = widgets.VBox([widgets.HBox(list(inputs)), *below])
    for name, value in attrs.items():
        setattr(box, name, value)
    return box



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
    chosen s; the outcomes of every s (the whole grid, also past the cap, where the rule never
    switches) are listed below it, the chosen one in bold. Returns the ipywidgets container; its
    ``summary`` (an ``HTML`` widget) holds the text, its ``grid`` (an ``HTML`` widget) the list.
    """
    import ipywidgets as widgets
    import numpy as np

    from ntklab.callbacks import AutoSwitch

    v = np.asarray(velocity, dtype=float)
    AutoSwitch.decide(list(v), threshold, cap)  # checks the curve and the arguments
    outcomes = {int(k): str(t) for k, t in (outcomes or {}).items()}
    out, summary, grid = widgets.Output(), widgets.HTML(), widgets.HTML()
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
        rows = []
        for e in sorted(outcomes):
            row = f"s = {e}: {outcomes[e]}" + (" (past the cap)" if e > cap else "")
            rows.append(f"<b>{row}</b>" if e == s else row)
        grid.value = "<br>".join(rows)

    slider.observe(draw, names="value")
    draw()
    box = widgets.VBox([slider, out, summary, grid])
    box.summary, box.grid = summary, grid
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

    return _panel((run, low, high), draw, summary, out, summary=summary)


# --- recomputing widgets (issue 21) ---
# Each widget below changes a parameter and recomputes something small from the chapter's own
# objects (a model it has in memory or loads from the result cache, a few of its images), through a
# plain function that can be called and tested without a display. The chapter shows the static
# figure of the same thing before the widget.

__all__ += ["sign_kernel_change", "kernel_change_explorer", "batch_statistics_errors",
            "batch_statistics_explorer", "noise_start_statistics", "noise_explorer"]


def _float64_copy(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` itself if it computes in float64, else an eval-mode float64 copy (BN buffers too)."""
    import copy

    from ntklab._checks import model_dtype

    if model_dtype(net) == torch.float64:
        return net.eval()
    return copy.deepcopy(net).double().eval()


def sign_kernel_change(net: torch.nn.Module, X: torch.Tensor, eps: float, *, seed: int = 0,
                       kind: str = "full") -> dict:
    """Theorem 1 of Li et al. (arXiv 2312.02236) on a few images, as chapter 2 checks it: draws one
    vector of independent uniform signs ``s`` shaped like ``X`` (``torch.Generator`` seeded with
    ``seed``) and returns the relative change of the empirical NTK of ``net`` (computed in float64)
    under it, ``{"random": ||Theta(X + eps s, X) - Theta(X, X)||_F / ||Theta(X, X)||_F,
    "antithetic": the same for the average of the kernels at +eps s and -eps s}``
    (:func:`ntklab.experiments.theorems.sign_changes`): of order eps and eps^2 on a smooth network.

    X: (n, C, H, W) images in [0, 1] (a few: the full kernel has (n k)^2 entries); eps > 0;
    kind: the kernel's kind (:func:`ntklab.ntk.empirical_ntk`; chapter 2 uses ``"full"``).
    """
    from ntklab import _checks
    from ntklab.experiments import theorems

    _checks.images("X", X)
    eps = _checks.number("eps", eps, positive=True)
    _checks.count("seed", seed, minimum=0)
    net64 = _float64_copy(net)
    X = X.to(next(net64.parameters()).device, torch.float64)
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, X.shape, generator=g, dtype=torch.float64) * 2 - 1).to(X.device)
    return theorems.sign_changes(net64, X, signs, eps, kind)


def kernel_change_explorer(nets: dict, X: torch.Tensor, *, eps: float = 1e-2, reference: dict | None = None,
                           kind: str = "full"):
    """Chapter 2, Theorem 1, live: pick a network, an eps and a draw of signs; the widget re-draws
    the sign perturbation of the few images ``X`` and recomputes the kernel change
    (:func:`sign_kernel_change`: one draw and the antithetic average). Every point computed is kept
    and drawn against eps on log-log axes, with lines of slope 1 and 2 through the latest point, so
    the reader builds the orders of the theorem point by point; ``reference`` (network name ->
    ``{"eps": [...], "random": [...], "antithetic": [...]}``, e.g. from the chapter's cached result)
    is drawn as thin lines behind them.

    nets: name -> model (converted to float64 copies once); X: (n, C, H, W). Returns the ipywidgets
    container; its ``summary`` (an ``HTML`` widget) holds the text and ``points`` (name -> list of
    ``(eps, seed, random, antithetic)``) every computed point.
    """
    import ipywidgets as widgets
    import numpy as np

    from ntklab import _checks

    if not nets:
        raise ValueError("nets must name at least one network")
    _checks.images("X", X)
    eps = _checks.number("eps", eps, positive=True)
    nets64 = {name: _float64_copy(net) for name, net in nets.items()}
    reference = reference or {}
    points = {name: [] for name in nets}
    out, summary = widgets.Output(), widgets.HTML()
    network = widgets.Dropdown(options=list(nets), description="network")
    eps_slider = widgets.FloatLogSlider(value=eps, base=10, min=-5, max=float(np.log10(0.3)), step=0.25,
                                        description="eps", readout_format=".1e", continuous_update=False)
    draw_slider = widgets.IntSlider(value=0, min=0, max=9, description="draw", continuous_update=False)

    def draw(*_):
        name, e, s = network.value, float(eps_slider.value), int(draw_slider.value)
        change = sign_kernel_change(nets64[name], X, e, seed=s, kind=kind)
        points[name].append((e, s, change["random"], change["antithetic"]))
        summary.value = (f"<b>{name}</b>, eps {e:.1e}, draw {s}: one draw changes the kernel by "
                         f"{change['random']:.2e}, the antithetic average by {change['antithetic']:.2e} "
                         f"(ratio {change['antithetic'] / max(change['random'], 1e-300):.2e})")
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            ref = reference.get(name)
            if ref:
                ax.loglog(ref["eps"], ref["random"], color="tab:blue", lw=1, alpha=0.5, label="cached: one draw")
                ax.loglog(ref["eps"], ref["antithetic"], color="tab:orange", lw=1, alpha=0.5,
                          label="cached: antithetic")
            pts = np.array([(p[0], p[2], p[3]) for p in points[name]])   # eps, random, antithetic
            ax.loglog(pts[:, 0], pts[:, 1], "o", color="tab:blue", label="live: one draw")
            ax.loglog(pts[:, 0], pts[:, 2], "s", color="tab:orange", label="live: antithetic")
            grid = np.geomspace(1e-5, 0.3, 20)
            for value, power, ls in ((change["random"], 1, "--"), (change["antithetic"], 2, ":")):
                if value > 0:
                    ax.loglog(grid, value * (grid / e) ** power, color="gray", ls=ls, lw=1,
                              label=f"slope {power} through the latest point")
            ax.set_xlabel("eps")
            ax.set_ylabel("relative kernel change")
            ax.set_title(name)
            ax.legend(fontsize=7)
            plt.show()

    return _panel((network, eps_slider, draw_slider), draw, summary, out, summary=summary, points=points)


def batch_statistics_errors(net: torch.nn.Module, X: torch.Tensor, probe: torch.Tensor, batch_size: int, *,
                            n_batches: int = 4, seed: int = 0, reference=None, y: torch.Tensor | None = None,
                            attack: Callable | None = None) -> dict:
    """Theorem 2 of Li et al. (arXiv 2312.02236) on a few batches, as chapter 2 measures it: draws
    ``n_batches`` batches of ``batch_size`` images of ``X`` (each without repetition, from a
    ``torch.Generator`` seeded with ``seed``), optionally replaces each by ``attack(net, xb, yb)``
    (e.g. PGD examples of it; then ``y`` gives the labels), and for each returns the gap between
    its BN statistics and ``reference`` (:func:`ntklab.bn.bn_statistics_gap`, ``total``) and the
    relative Frobenius distance between the trace NTKs of ``probe`` with its statistics and with
    ``reference`` installed (:func:`ntklab.bn.using_bn_statistics`).

    X: (N, C, H, W) images in [0, 1]; probe: (m, C, H, W), a few images; reference: the data set's
    statistics (default :func:`ntklab.bn.bn_dataset_statistics` of ``X``: pass them in when calling
    repeatedly). Returns ``{"batch_size", "gap": [n_batches floats], "error": [n_batches floats],
    "layers": [per batch, the gap of each BN layer (its ``mean + var``; ``gap`` is their sum)]}``.
    """
    from ntklab import _checks
    from ntklab.bn import bn_batch_statistics, bn_dataset_statistics, bn_statistics_gap, using_bn_statistics
    from ntklab.ntk import empirical_ntk

    _checks.images("X", X, model=net)
    _checks.images("probe", probe, model=net)
    batch_size = _checks.count("batch_size", batch_size, minimum=2)
    if batch_size > len(X):
        raise ValueError(f"batch_size must be at most len(X) = {len(X)}, got {batch_size}")
    n_batches = _checks.count("n_batches", n_batches)
    _checks.count("seed", seed, minimum=0)
    if attack is not None:
        y = _checks.labels("y", y, len(X))
    device = next(net.parameters()).device
    net = net.eval()
    if reference is None:
        reference = bn_dataset_statistics(net, X)
    with using_bn_statistics(net, reference):
        K_ref = empirical_ntk(net, probe.to(device), kind="trace")
    g = torch.Generator().manual_seed(seed)
    out = {"batch_size": batch_size, "gap": [], "error": [], "layers": []}
    for _ in range(n_batches):
        idx = torch.randperm(len(X), generator=g)[:batch_size]
        xb = X[idx].to(device)
        if attack is not None:
            xb = attack(net, xb, y[idx].to(device)).detach()
        stats = bn_batch_statistics(net, xb)
        with using_bn_statistics(net, stats):
            K = empirical_ntk(net, probe.to(device), kind="trace")
        gap = bn_statistics_gap(stats, reference)
        out["gap"].append(float(gap["total"]))
        out["layers"].append([float(v) for v in gap["mean"] + gap["var"]])
        out["error"].append(float((K - K_ref).norm() / K_ref.norm()))
    return out


def batch_statistics_explorer(net: torch.nn.Module, X: torch.Tensor, probe: torch.Tensor, *,
                              sizes=(8, 16, 32, 64, 128, 256, 512), n_batches: int = 4,
                              y: torch.Tensor | None = None, attack: Callable | None = None):
    """Chapters 2 and 3, Theorem 2 live: a batch-size slider (and, with ``attack``, a switch to
    adversarial batches) re-draws ``n_batches`` batches and recomputes, for each, the gap between
    its BN statistics and the data set's and the error of the trace NTK of ``probe`` it induces
    (:func:`batch_statistics_errors`; the data set's statistics are computed once). Every batch
    drawn stays on the log-log plot of error against gap, coloured by size, so the reader sees the
    clean batches' band move down as the batch grows (about 1/sqrt(|B|)) and the adversarial batches
    stay far out. A "draw" slider re-draws batches of the same size.

    X: (N, C, H, W) images in [0, 1], the pool the batches come from (e.g. the training set);
    probe: a few images; y: labels of X (needed with ``attack(net, xb, yb)``). Returns the ipywidgets
    container; its ``summary`` holds the text and ``batches`` (list of dicts: ``size``, ``source``,
    ``gap``, ``error``) every batch drawn.
    """
    import ipywidgets as widgets
    import numpy as np

    from ntklab import _checks
    from ntklab.bn import bn_dataset_statistics

    sizes = [int(b) for b in sizes]
    if not sizes or any(b < 2 or b > len(X) for b in sizes):
        raise ValueError(f"sizes must be batch sizes between 2 and len(X) = {len(X)}, got {sizes}")
    _checks.images("X", X, model=net)
    if attack is not None:
        _checks.labels("y", y, len(X))
    reference = bn_dataset_statistics(net.eval(), X)
    batches = []
    out, summary = widgets.Output(), widgets.HTML()
    size = widgets.SelectionSlider(options=sizes, value=sizes[len(sizes) // 2], description="batch size",
                                   continuous_update=False)
    draw_slider = widgets.IntSlider(value=0, min=0, max=9, description="draw", continuous_update=False)
    controls = [size, draw_slider]
    adversarial = widgets.Checkbox(value=False, description="adversarial batches")
    if attack is not None:
        controls.append(adversarial)

    def draw(*_):
        b, s, adv = int(size.value), int(draw_slider.value), bool(adversarial.value)
        r = batch_statistics_errors(net, X, probe, b, n_batches=n_batches, seed=1000 * b + s, reference=reference,
                                    y=y, attack=attack if adv else None)
        source = "adversarial" if adv else "clean"
        batches.extend({"size": b, "source": source, "gap": g, "error": e} for g, e in zip(r["gap"], r["error"]))
        summary.value = (f"{n_batches} {source} batches of {b}: median statistics gap {np.median(r['gap']):.3f}, "
                         f"median kernel error {np.median(r['error']):.3f}")
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            clean = [p for p in batches if p["source"] == "clean"]
            if clean:
                sc = ax.scatter([p["gap"] for p in clean], [p["error"] for p in clean],
                                c=np.log2([p["size"] for p in clean]), cmap="viridis", vmin=np.log2(min(sizes)),
                                vmax=np.log2(max(sizes)), s=22, label="clean batches")
                fig.colorbar(sc, ax=ax, label="log2 batch size")
            adv_pts = [p for p in batches if p["source"] == "adversarial"]
            if adv_pts:
                ax.scatter([p["gap"] for p in adv_pts], [p["error"] for p in adv_pts], marker="x",
                           color="crimson", label="adversarial batches")
            ax.scatter(r["gap"], r["error"], s=90, facecolors="none", edgecolors="black", label="just drawn")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("BN statistics gap to the whole pool's")
            ax.set_ylabel("relative trace-NTK error")
            ax.legend(fontsize=7)
            plt.show()

    return _panel(controls, draw, summary, out, summary=summary, batches=batches)


def noise_start_statistics(model: torch.nn.Module, X: torch.Tensor, eps: float, *, basis: torch.Tensor,
                           scale: float = 1.0, floor: float = 0.0, n: int = 1000, seed: int = 0) -> dict:
    """The start noise of ``fgsm_pca`` (chapter 6, :func:`ntklab.attacks.fgsm_pca`) at a given
    ``scale`` (largest per-pixel standard deviation of the data-shaped Gaussian, in eps) and
    ``floor`` (standard deviation of the added isotropic Gaussian, in eps), drawn through the attack
    itself as :func:`ntklab.experiments.overfitting.noise_starts` does (mid-grey images, a negligible
    step; the start is clipped to the eps-ball), ``n`` draws from a generator seeded with ``seed``.

    X: (N, C, H, W) images (their shape; ``basis`` comes from them, e.g.
    :func:`ntklab.attacks.pca_noise_basis`). Returns ``{"delta": (n, C, H, W) starts minus the grey
    image, "d": pixels, "rms": root mean square per pixel in units of eps, "erank": effective rank of
    the empirical covariance E[delta delta^T] (:func:`ntklab.metrics.effective_rank`), "top10":
    its top-10 concentration, "clipped": share of entries at the eps bound, "eigenvalues": the
    covariance's eigenvalues, descending}``. The book's question (chapter 6): how isotropic does the
    floor, or the clipping of a large scale, make the data-shaped noise?
    """
    import numpy as np

    from ntklab import _checks, attacks, metrics

    _checks.images("X", X)
    eps = _checks.radius("eps", eps, positive=True)
    if eps > 0.5:
        raise ValueError(f"eps must be at most 0.5 (the starts are drawn around mid-grey images), got {eps}")
    scale, floor = _checks.number("scale", scale), _checks.number("floor", floor)
    n = _checks.count("n", n, minimum=2)
    _checks.count("seed", seed, minimum=0)
    device = next(model.parameters()).device
    grey = torch.full((n,) + tuple(X.shape[1:]), 0.5, dtype=X.dtype, device=device)
    g = torch.Generator(device).manual_seed(seed)
    delta = (attacks.fgsm_pca(model, grey, torch.zeros(n, dtype=torch.long, device=device), eps=eps,
                              basis=basis.to(device), alpha=1e-6, scale=scale, floor=floor, generator=g)
             - grey).detach().cpu()
    flat = delta.flatten(1).double()
    cov = (flat.T @ flat / n).numpy()
    lam = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    return {"delta": delta, "d": flat.shape[1], "rms": float(flat.pow(2).mean().sqrt()) / eps,
            "erank": metrics.effective_rank(cov), "top10": metrics.top_concentration(cov, 10),
            "clipped": float((flat.abs() >= eps * (1 - 1e-4)).double().mean()), "eigenvalues": lam}


def noise_explorer(model: torch.nn.Module, X: torch.Tensor, eps: float, *, basis: torch.Tensor, n: int = 1000,
                   marks: dict | None = None):
    """Chapter 6 live: sliders for the ``scale`` and the ``floor`` of ``fgsm_pca``'s start noise;
    every change re-draws ``n`` starts and recomputes the effective rank and top-10 concentration
    of their covariance (:func:`noise_start_statistics`), drawn as the normalised eigenvalue
    spectrum, and prints where the chapter's trained settings sit. ``marks``: ``{label: (scale,
    floor, text)}``, e.g. ``{"fgsm_pca": (1.0, 0.0, "collapsed in 1 of 1 runs")}``: the text is shown
    when the sliders are on that setting. Returns the ipywidgets container; its ``summary`` holds the
    text.
    """
    import ipywidgets as widgets
    import numpy as np

    marks = marks or {}
    first = noise_start_statistics(model, X, eps, basis=basis, n=n)   # checks the arguments
    out, summary = widgets.Output(), widgets.HTML()
    scale = widgets.FloatSlider(value=1.0, min=0.0, max=4.0, step=0.05, description="scale",
                                readout_format=".2f", continuous_update=False)
    floor = widgets.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.05, description="floor",
                                readout_format=".2f", continuous_update=False)
    seen = {}

    def draw(*_):
        s, f = round(float(scale.value), 4), round(float(floor.value), 4)
        if s == 0 and f == 0:
            summary.value = "scale 0 and floor 0: no noise (FGSM from the clean image)"
            out.clear_output()
            return
        r = first if (s, f) == (1.0, 0.0) and not seen else noise_start_statistics(model, X, eps, basis=basis,
                                                                                   scale=s, floor=f, n=n)
        seen[(s, f)] = r
        here = [f"{label}: {text}" for label, (ms, mf, text) in marks.items()
                if abs(ms - s) < 1e-9 and abs(mf - f) < 1e-9]
        summary.value = (f"scale {s:.2f}, floor {f:.2f}: effective rank {r['erank']:.0f} of {r['d']}, "
                         f"top-10 concentration {r['top10']:.3f}, rms {r['rms']:.2f} eps, "
                         f"{r['clipped']:.1%} of the pixels at the eps bound"
                         + "".join(f"<br>{t}" for t in here))
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6.5, 3.4))
            for (ps, pf), pr in seen.items():
                lam = pr["eigenvalues"]
                current = (ps, pf) == (s, f)
                ax.semilogy(np.arange(1, len(lam) + 1), lam / lam.sum(), lw=2 if current else 0.8,
                            alpha=1 if current else 0.35,
                            label=f"scale {ps:.2f}, floor {pf:.2f}: erank {pr['erank']:.0f}" if current else None)
            ax.set_xlabel("eigenvalue index")
            ax.set_ylabel("eigenvalue / trace")
            ax.set_ylim(bottom=1e-7)
            ax.legend(fontsize=8)
            plt.show()

    return _panel((scale, floor), draw, summary, out, summary=summary)


# --- chapter 9: the projected cost, recomputed ---
__all__ += ["cost_projection", "cost_explorer"]


def cost_projection(runs, costs: dict, *, speedup: float = 1.0, gpus: int = 1, efficiency: float = 0.8) -> dict:
    """Projected wall hours per experiment of the planned ``runs`` (:func:`ntklab.plan.plan`) on a
    device ``speedup`` times as fast as the one that measured ``costs`` (the three costs of
    ``bench/gpu.py``, every one divided by ``speedup``), on ``gpus`` GPUs under
    DistributedDataParallel at parallel ``efficiency`` (a run's time divided by ``gpus *
    efficiency``; 1 GPU: no division). Recomputes :func:`ntklab.plan.project` on the scaled costs.
    Chapter 9. Raises ``ValueError`` for a speedup or efficiency outside (0, inf) and (0, 1], or
    fewer than one GPU."""
    from ntklab import _checks, plan

    speedup = _checks.number("speedup", speedup, positive=True)
    efficiency = _checks.number("efficiency", efficiency, positive=True)
    if efficiency > 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    gpus = _checks.count("gpus", gpus)
    scaled = {k: v / speedup for k, v in costs.items() if k in plan.COST_KEYS}
    parallel = 1.0 if gpus == 1 else gpus * efficiency
    return {name: hours / parallel for name, hours in plan.project(runs, scaled).items()}


def cost_explorer(runs, costs: dict, *, speedup: float = 1.0, gpus: int = 1, efficiency: float = 0.8):
    """Sliders for the device's speed over the one that measured ``costs``, the number of GPUs and
    the parallel efficiency; each move recomputes :func:`cost_projection` and redraws the projected
    wall hours per experiment (chapter 9). Returns the ipywidgets container; its ``summary`` (an
    ``HTML`` widget) holds the total."""
    import ipywidgets as widgets

    cost_projection(runs, costs, speedup=speedup, gpus=gpus, efficiency=efficiency)   # checks the arguments
    out, summary = widgets.Output(), widgets.HTML()
    speed = widgets.FloatLogSlider(value=speedup, base=10, min=0, max=4, step=0.1, description="speed-up",
                                   readout_format=".3g", continuous_update=False)
    n_gpus = widgets.IntSlider(value=gpus, min=1, max=64, description="GPUs", continuous_update=False)
    eff = widgets.FloatSlider(value=efficiency, min=0.3, max=1.0, step=0.05, description="DDP efficiency",
                              continuous_update=False)

    def draw(*_):
        hours = cost_projection(runs, costs, speedup=speed.value, gpus=n_gpus.value, efficiency=eff.value)
        names = sorted(hours, key=hours.get)
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
            ax.barh(names, [hours[n] for n in names], color="tab:green")
            ax.set_xscale("log")
            ax.set_xlabel("projected wall hours")
            for h, text in ((24, "a day"), (24 * 7, "a week")):
                ax.axvline(h, color="k", lw=0.6, ls=":")
                ax.text(h, -0.6, text, fontsize=8)
            plt.show()
        total = sum(hours.values())
        summary.value = (f"total {total:.3g} wall hours ({total / 24:.3g} days) at {speed.value:.3g}x the measured "
                         f"device, {n_gpus.value} GPU(s)")

    return _panel((speed, n_gpus, eff), draw, out, summary, summary=summary, controls=(speed, n_gpus, eff))
