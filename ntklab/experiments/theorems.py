"""Experiment ``theorems``: the two theorems of Li et al. (arXiv 2312.02236) checked numerically (chapter 2).

**Theorem 1** (sign perturbations barely change the NTK). For networks at initialisation and after
normal training, the cross kernel Theta(X + Omega, X) of a probe set X is compared with Theta(X, X),
in float64 (the changes at small eps are far below float32 resolution), over a geometric grid of
eps, for six perturbations Omega:

* ``"random"``: independent signs, ``eps * s`` with s uniform in {-1, +1}^d (the theorem's
  assumption), not clipped to [0, 1];
* ``"antithetic"``: the average of the kernels at ``+eps s`` and ``-eps s`` (the first-order term
  cancels exactly);
* ``"fgsm"``: ``eps * sign(grad_x CE)`` at X, not clipped (the signs FGSM uses);
* ``"pgd"``: ``ntklab.attacks.pgd`` (step eps / 4, the profile's evaluation steps, inside [0, 1],
  as adversarial training uses it);
* ``"gaussian"``: Gaussian noise with the L2 norm of a sign vector, ``eps sqrt(d)`` per image;
* ``"antithetic_clipped"``: the antithetic average with both inputs clipped to [0, 1].

Four networks: a ReLU one (:func:`relu_profile`, chapter 3's model with BN buffers: under ``quick``
the book's ``SmallCNN`` at width 16 with ReLU and max pooling; under ``paper`` the PreAct ResNet-18)
and a smooth one (:func:`smooth_profile`, the same ``SmallCNN`` with GELU and average pooling: a C^2
function, as the theorem assumes), each at initialisation and after normal training
(:func:`ntklab.experiments.trained_model` without per-epoch evaluation, :data:`TRAIN_OVERRIDES`,
the same run as chapter 3's normal model with buffer).
Slopes of log(change) against log(eps) are fitted over the ``SLOPE_POINTS`` smallest eps.

**Theorem 2** (batch norm: mini-batch versus data-set statistics). On both trained networks: the
exact data-set statistics of every BN layer over the whole training set
(:func:`ntklab.models.bn_dataset_statistics`), the trace kernel of a probe set with them installed,
and for mini-batches of several sizes (clean training images, and PGD adversarial examples of
training images made against the network, the profile's training eps and steps) the kernel with
the batch's statistics installed (:func:`ntklab.models.bn_batch_statistics`,
:func:`ntklab.models.using_bn_statistics`): the relative kernel error against the statistics gap
(:func:`ntklab.models.bn_statistics_gap`). The statistics are constants in both kernels (the
kernel does not differentiate through them).

Per-profile sizes (:func:`settings`): ``quick``: 20 probe images (2 per class) for Theorem 1 and a
grid of 6 eps from 1e-6 to 0.3; 30 probe images and 6 batches per size (8 to 512) for Theorem 2,
adversarial batches drawn from the adversarial examples of 1,024 training images; ``smoke``
smaller; ``paper`` from the profile's ``n_probe`` and ``n_train`` (so that the code-path test stays
small), its training eps added to the grid, a width-16 smooth SmallCNN.

The result (a dict, cached by config and package version): ``config``; ``compute_seconds`` (wall
seconds of the computation, model training included); ``theorem1``: ``eps`` (list),
``perturbations`` (list), ``networks`` (list of names), ``n_probe``, and per network name
``rel_change[name]`` (perturbation -> list over eps of
||Theta(X + Omega, X) - Theta(X, X)||_F / ||Theta(X, X)||_F), ``slopes[name]`` (perturbation ->
fitted slope), ``kernel_norm[name]``, ``clean_acc[name]`` (test accuracy; None at initialisation);
``theorem2``: ``batch_sizes``, ``networks`` (the trained ones), ``n_probe``, and per network a dict
with, per source (``"clean"``, ``"adversarial"``), lists over batches (``size``, ``gap``,
``mean_gap``, ``var_gap``, ``error``), ``running`` (gap and error of PyTorch's running estimates),
``median_error`` and ``median_gap`` (source -> list over batch sizes), ``spearman`` (rank
correlation of gap and error: per source, and ``within_size``, the mean over sizes for clean
batches), ``size_slope`` (source -> log-log slope of the median error against the batch size),
``gap_slope`` (the same for the median clean gap), ``clean_acc``.
"""
from __future__ import annotations

import math
import time

from ntklab import _progress
from ntklab.experiments import cached, data_from_profile, model_from_profile, register, trained_model

__all__ = ["run", "make_config", "settings", "eps_grid", "smooth_profile", "relu_profile", "NAME",
           "PERTURBATIONS", "SMOOTH", "BATCH_SIZES", "TRAIN_OVERRIDES"]

NAME = "theorems"
PERTURBATIONS = ("random", "antithetic", "fgsm", "pgd", "gaussian", "antithetic_clipped")
SMOOTH = {"activation": "gelu", "pool": "avg"}
BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
EPS_RANGE = (1e-6, 0.3, 6)       # geometric grid: first, last, number of points
SLOPE_POINTS = 3                 # slopes are fitted over the smallest eps of the grid
# No evaluation during training, as for chapter 3's models (so the normal run is shared): the
# experiment measures what it needs itself, and the weights are the same either way (evaluation
# draws from a forked random state and leaves BN buffers alone), while the default per-epoch PGD
# evaluation costs more than normal training itself.
TRAIN_OVERRIDES = {"eval_every": 0}


def settings(profile) -> dict:
    """The experiment's sizes under ``profile`` (see the module docstring)."""
    table = {
        "smoke": {"n_probe1": 10, "n_probe2": 16, "batches_per_size": 2, "n_adv": 128},
        "quick": {"n_probe1": 20, "n_probe2": 30, "batches_per_size": 6, "n_adv": 1024},
    }
    if profile.name in table:
        return dict(table[profile.name])
    return {"n_probe1": min(profile.n_probe, 50), "smooth_width": 16, "n_probe2": min(profile.n_probe, 100),
            "batches_per_size": 5, "n_adv": 1024}


def eps_grid(profile) -> list[float]:
    """The geometric eps grid of Theorem 1, with the profile's training eps added if missing."""
    import numpy as np

    first, last, num = EPS_RANGE
    grid = [float(f"{e:.6g}") for e in np.geomspace(first, last, num)]
    if not any(math.isclose(e, profile.eps, rel_tol=1e-6) for e in grid):
        grid = sorted(grid + [float(profile.eps)])
    return grid


def relu_profile(profile):
    """The profile of the ReLU network: chapter 3's model with BN buffers (``quick``: the book's
    SmallCNN at width 16 with ReLU and max pooling; ``paper``: the profile's PreAct ResNet-18), so
    that both chapters share its normal training."""
    from ntklab.experiments.batchnorm import model_profile

    return model_profile(profile, "with buffer")


def smooth_profile(profile):
    """The profile of the smooth network: the book's SmallCNN with GELU and average pooling, at the
    width of the ReLU network when that is a SmallCNN (the two then differ only in the activation
    and the pooling), else at the width of :func:`settings`."""
    relu = relu_profile(profile)
    width = relu.model_kwargs.get("width", 32) if relu.model == "small_cnn" else settings(profile)["smooth_width"]
    return relu.replace(model="small_cnn", model_kwargs={"width": width, **SMOOTH})


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    n_train = profile.n_train
    sizes = [b for b in BATCH_SIZES if n_train is None or b <= n_train]
    return {"profile": profile.to_dict(), "settings": settings(profile), "eps": eps_grid(profile),
            "perturbations": list(PERTURBATIONS), "smooth": smooth_profile(profile).to_dict(),
            "relu": relu_profile(profile).to_dict(),
            "batch_sizes": sizes, "slope_points": SLOPE_POINTS, "kernel1": "full", "kernel2": "trace"}


@register(NAME, "Theorem 1 (NTK under sign perturbations) and Theorem 2 (BN statistics and the NTK) "
                "checked numerically (chapter 2)")
def run(profile, device=None, *, force: bool = False, progress: bool = True) -> dict:
    """Both checks under ``profile`` (see the module docstring for the result)."""
    from ntklab.config import get_device

    config = make_config(profile)
    return cached(NAME, config, lambda: _compute(profile, config, get_device(device), progress), force=force)


def _compute(profile, config, device, progress) -> dict:
    start = time.perf_counter()
    nets = _networks(profile, device, progress)
    out = {"config": config,
           "theorem1": _theorem1(profile, config, device, nets),
           "theorem2": _theorem2(profile, config, device, progress, nets)}
    out["compute_seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------ Theorem 1
def _networks(profile, device, progress):
    """(name, model, test accuracy or None) for the four networks of Theorem 1."""
    from ntklab import evaluate
    from ntklab.config import seed_everything

    _, test_set = data_from_profile(profile)
    nets = []
    for name, prof in (("smooth", smooth_profile(profile)), ("relu", relu_profile(profile))):
        seed_everything(profile.seed)
        nets.append((f"{name}, init", model_from_profile(prof).to(device).eval(), None))
        net, _ = trained_model(prof, "normal", device=device, progress=progress, **TRAIN_OVERRIDES)
        nets.append((f"{name}, trained", net, evaluate.clean_accuracy(net, test_set, device=device)))
    return nets


def _theorem1(profile, config, device, nets) -> dict:
    import copy

    import numpy as np
    import torch

    from ntklab import attacks, data
    from ntklab.ntk import empirical_ntk

    sizes = config["settings"]
    train_set, _ = data_from_profile(profile)
    probe_x, probe_y = data.subset(train_set, sizes["n_probe1"], seed=profile.seed + 1).tensors
    X, y = probe_x.to(device, torch.float64), probe_y.to(device)
    d = X[0].numel()
    grid = config["eps"]
    gen = torch.Generator().manual_seed(profile.seed + 2)
    signs = (torch.randint(0, 2, X.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
    z = torch.randn(X.shape, generator=gen, dtype=torch.float64)
    gauss = (z / z.flatten(1).norm(dim=1).view(-1, *[1] * (X.dim() - 1)) * math.sqrt(d)).to(device)
    res = {"eps": grid, "perturbations": list(PERTURBATIONS), "networks": [], "rel_change": {},
           "slopes": {}, "kernel_norm": {}, "clean_acc": {}, "n_probe": len(y)}
    for name, net, acc in nets:
        net64 = copy.deepcopy(net).double().eval()
        fgsm_signs = attacks._input_grad(net64, X, y).sign()
        inputs = []                                         # per eps: the 7 perturbed probe sets
        for eps in grid:
            torch.manual_seed(profile.seed)
            x_pgd = attacks.pgd(net64, X, y, eps=eps, alpha=eps / 4, steps=profile.eval_pgd_steps)
            inputs += [X + eps * signs, X - eps * signs, X + eps * fgsm_signs, x_pgd, X + eps * gauss,
                       (X + eps * signs).clamp(0, 1), (X - eps * signs).clamp(0, 1)]
        K0 = empirical_ntk(net64, X, kind=config["kernel1"])
        K = empirical_ntk(net64, torch.cat(inputs), X, kind=config["kernel1"])
        K = K.view(len(grid), 7, *K0.shape)
        norm = K0.norm()
        rel = {p: [] for p in PERTURBATIONS}
        for i in range(len(grid)):
            Ks = K[i]
            changes = {"random": Ks[0], "antithetic": (Ks[0] + Ks[1]) / 2, "fgsm": Ks[2], "pgd": Ks[3],
                       "gaussian": Ks[4], "antithetic_clipped": (Ks[5] + Ks[6]) / 2}
            for p, Kp in changes.items():
                rel[p].append(float((Kp - K0).norm() / norm))
        log_eps = np.log(grid[:config["slope_points"]])
        res["networks"].append(name)
        res["rel_change"][name] = rel
        res["slopes"][name] = {p: float(np.polyfit(log_eps, np.log(np.maximum(v[:len(log_eps)], 1e-300)), 1)[0])
                               for p, v in rel.items()}
        res["kernel_norm"][name] = float(norm)
        res["clean_acc"][name] = acc
        del K, net64
    return res


# ------------------------------------------------------------------ Theorem 2
def _theorem2(profile, config, device, progress, nets) -> dict:
    import torch

    from ntklab import attacks, data

    sizes = config["settings"]
    train_set, _ = data_from_profile(profile)
    X, y = train_set.tensors
    probe_x = data.subset(train_set, sizes["n_probe2"], seed=profile.seed + 1).tensors[0].to(device)
    gen = torch.Generator().manual_seed(profile.seed + 3)
    pool = torch.randperm(len(y), generator=gen)[:sizes["n_adv"]]
    draws = [(source, b, torch.randperm(len(X) if source == "clean" else len(pool), generator=gen)[:b])
             for source in ("clean", "adversarial") for b in config["batch_sizes"]
             for _ in range(sizes["batches_per_size"])]
    res = {"batch_sizes": config["batch_sizes"], "networks": [], "n_probe": len(probe_x)}
    for name, net, acc in nets:
        if acc is None:                                    # only the trained networks
            continue
        torch.manual_seed(profile.seed)
        x_adv = torch.cat([attacks.pgd(net, X[idx].to(device), y[idx].to(device), eps=profile.eps,
                                       alpha=profile.pgd_alpha, steps=profile.pgd_steps).cpu()
                           for idx in pool.split(256)])
        res["networks"].append(name)
        res[name] = _batch_kernels(net, X, x_adv, probe_x, draws, config, device, progress)
        res[name]["clean_acc"] = acc
    return res


def _batch_kernels(net, X, x_adv, probe_x, draws, config, device, progress) -> dict:
    """Kernel error against statistics gap for every drawn batch (Theorem 2), on one network."""
    import numpy as np

    from ntklab.models import bn_batch_statistics, bn_dataset_statistics, bn_layers, bn_statistics_gap, \
        using_bn_statistics
    from ntklab.ntk import empirical_ntk

    reference = bn_dataset_statistics(net, X, batch_size=500)

    def kernel(stats):
        with using_bn_statistics(net, stats):
            return empirical_ntk(net, probe_x, kind=config["kernel2"])

    K_ref = kernel(reference)

    def measure(stats):
        gap = bn_statistics_gap(stats, reference)
        err = float((kernel(stats) - K_ref).norm() / K_ref.norm())
        return {"gap": float(gap["total"]), "mean_gap": float(gap["mean"].sum()),
                "var_gap": float(gap["var"].sum()), "error": err}

    running = [(m.running_mean.double(), m.running_var.double()) for m in bn_layers(net)]
    res = {"running": measure(running)}
    sources = {"clean": X, "adversarial": x_adv}
    draws = _progress.bar(progress, draws, desc="Theorem 2 batches", leave=False)
    for source, b, idx in draws:
        row = measure(bn_batch_statistics(net, sources[source][idx].to(device)))
        entry = res.setdefault(source, {"size": [], "gap": [], "mean_gap": [], "var_gap": [], "error": []})
        entry["size"].append(b)
        for key, value in row.items():
            entry[key].append(value)

    def per_size(source, key):
        e = res[source]
        return [[v for v, s in zip(e[key], e["size"]) if s == b] for b in config["batch_sizes"]]

    res["median_error"] = {s: [float(np.median(v)) for v in per_size(s, "error")] for s in sources}
    res["median_gap"] = {s: [float(np.median(v)) for v in per_size(s, "gap")] for s in sources}
    res["spearman"] = {s: _spearman(res[s]["gap"], res[s]["error"]) for s in sources}
    within = [_spearman(g, e) for g, e in zip(per_size("clean", "gap"), per_size("clean", "error"))]
    res["spearman"]["within_size"] = float(np.nanmean(within)) if not np.all(np.isnan(within)) else float("nan")
    res["size_slope"] = {s: float(np.polyfit(np.log(config["batch_sizes"]), np.log(res["median_error"][s]), 1)[0])
                         for s in sources}
    res["gap_slope"] = float(np.polyfit(np.log(config["batch_sizes"]), np.log(res["median_gap"]["clean"]), 1)[0])
    return res


def _spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (NaN when undefined)."""
    import warnings

    import numpy as np
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)
