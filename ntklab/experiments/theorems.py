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

Per-profile sizes (:class:`Settings`): ``quick``: 20 probe images (2 per class) for Theorem 1 and a
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
``decade`` (the smooth network at initialisation, random signs at eps ``DECADE`` = 1e-3 and 1e-2:
``eps``, ``random``, ``antithetic``, the numbers the chapter also computes by hand); ``ties``
(trained ReLU network: per max-pooling layer, the fraction of pooling windows whose positive
maximum is attained more than once on the probe, :func:`tied_max_windows`); ``pool_swap`` (the
trained ReLU weights with max and with average pooling, random signs at the smallest eps:
pool -> ``{"random", "antithetic"}``, :func:`sign_changes`);
``theorem2``: ``batch_sizes``, ``networks`` (the trained ones), ``n_probe``, and per network a dict
with, per source (``"clean"``, ``"adversarial"``), lists over batches (``size``, ``gap``,
``mean_gap``, ``var_gap``, ``error``), ``running`` (gap and error of PyTorch's running estimates),
``median_error`` and ``median_gap`` (source -> list over batch sizes), ``spearman`` (rank
correlation of gap and error: per source, and ``within_size``, the mean over sizes for clean
batches), ``size_slope`` (source -> log-log slope of the median error against the batch size),
``gap_slope`` (the same for the median clean gap), ``clean_acc``.

:func:`analyse` turns the result into the numbers the chapter discusses and :func:`claims` into its
claims (asserted under ``quick``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ntklab import _progress, attacks, data, evaluate
from ntklab.claims import all_of, compare
from ntklab.config import seed_everything
from ntklab.experiments import RunContext, data_from_profile, experiment, model_from_profile, trained_model
from ntklab.models import bn_batch_statistics, bn_dataset_statistics, bn_layers, bn_statistics_gap, \
    using_bn_statistics
from ntklab.ntk import empirical_ntk

__all__ = ["run", "make_config", "Settings", "eps_grid", "smooth_profile", "relu_profile", "theorem1_inputs",
           "sign_changes", "tied_max_windows", "analyse", "claims", "NAME", "PERTURBATIONS", "SMOOTH",
           "BATCH_SIZES", "TRAIN_OVERRIDES", "DECADE"]

NAME = "theorems"
PERTURBATIONS = ("random", "antithetic", "fgsm", "pgd", "gaussian", "antithetic_clipped")
SMOOTH = {"activation": "gelu", "pool": "avg"}
BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
EPS_RANGE = (1e-6, 0.3, 6)       # geometric grid: first, last, number of points
SLOPE_POINTS = 3                 # slopes are fitted over the smallest eps of the grid
DECADE = (1e-3, 1e-2)            # the two eps of the by-hand check: ten times the eps
# No evaluation during training, as for chapter 3's models (so the normal run is shared): the
# experiment measures what it needs itself, and the weights are the same either way (evaluation
# draws from a forked random state and leaves BN buffers alone), while the default per-epoch PGD
# evaluation costs more than normal training itself.
TRAIN_OVERRIDES = {"eval_every": 0}


@dataclass(frozen=True)
class Settings:
    """The experiment's per-profile values (see the module docstring).

    n_probe1: probe images of Theorem 1; n_probe2: probe images of Theorem 2; batches_per_size:
    mini-batches drawn per batch size and source; n_adv: training images whose PGD examples the
    adversarial batches are drawn from; relu_width: width of the ReLU network, chapter 3's width
    (None: the profile's model as it is); smooth_width: width of the smooth SmallCNN when the ReLU
    network is not a SmallCNN.
    """

    n_probe1: int
    n_probe2: int
    batches_per_size: int
    n_adv: int
    relu_width: int | None = None
    smooth_width: int = 16

    @classmethod
    def for_profile(cls, profile) -> "Settings":
        if profile.name == "smoke":
            return cls(n_probe1=10, n_probe2=16, batches_per_size=2, n_adv=128)
        if profile.name == "quick":
            return cls(n_probe1=20, n_probe2=30, batches_per_size=6, n_adv=1024, relu_width=16)
        return cls(n_probe1=min(profile.n_probe, 50), n_probe2=min(profile.n_probe, 100), batches_per_size=5,
                   n_adv=1024)


def eps_grid(profile) -> list[float]:
    """The geometric eps grid of Theorem 1, with the profile's training eps added if missing."""
    first, last, num = EPS_RANGE
    grid = [float(f"{e:.6g}") for e in np.geomspace(first, last, num)]
    if not any(math.isclose(e, profile.eps, rel_tol=1e-6) for e in grid):
        grid = sorted(grid + [float(profile.eps)])
    return grid


def relu_profile(profile):
    """The profile of the ReLU network: chapter 3's model with BN buffers (``quick``: the book's
    SmallCNN at width 16 with ReLU and max pooling; ``paper``: the profile's PreAct ResNet-18), so
    that both chapters share its normal training (a unit test checks that the two profiles agree)."""
    kw = dict(profile.model_kwargs)
    width = Settings.for_profile(profile).relu_width
    if width is not None:
        kw["width"] = width
    kw["track_running_stats"] = True
    return profile.replace(model_kwargs=kw)


def smooth_profile(profile):
    """The profile of the smooth network: the book's SmallCNN with GELU and average pooling, at the
    width of the ReLU network when that is a SmallCNN (the two then differ only in the activation
    and the pooling), else at :attr:`Settings.smooth_width`."""
    relu = relu_profile(profile)
    width = relu.model_kwargs.get("width", 32) if relu.model == "small_cnn" else \
        Settings.for_profile(profile).smooth_width
    return relu.replace(model="small_cnn", model_kwargs={"width": width, **SMOOTH})


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    n_train = profile.n_train
    sizes = [b for b in BATCH_SIZES if n_train is None or b <= n_train]
    return {"profile": profile.to_dict(), "settings": asdict(Settings.for_profile(profile)),
            "eps": eps_grid(profile), "perturbations": list(PERTURBATIONS), "decade": list(DECADE),
            "smooth": smooth_profile(profile).to_dict(), "relu": relu_profile(profile).to_dict(),
            "batch_sizes": sizes, "slope_points": SLOPE_POINTS, "kernel1": "full", "kernel2": "trace"}


@experiment(NAME, "Theorem 1 (NTK under sign perturbations) and Theorem 2 (BN statistics and the NTK) "
                  "checked numerically (chapter 2)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Both checks under ``profile`` (see the module docstring for the result)."""
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress)


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
    _, test_set = data_from_profile(profile)
    nets = []
    for name, prof in (("smooth", smooth_profile(profile)), ("relu", relu_profile(profile))):
        seed_everything(profile.seed)
        nets.append((f"{name}, init", model_from_profile(prof).to(device).eval(), None))
        net, _ = trained_model(prof, "normal", device=device, progress=progress, **TRAIN_OVERRIDES)
        nets.append((f"{name}, trained", net, evaluate.clean_accuracy(net, test_set, device=device)))
    return nets


def theorem1_inputs(profile, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe of Theorem 1 in float64: ``(X, y, signs, gauss)``, ``Settings.n_probe1`` training
    images (class-balanced), a draw of random signs shaped like X and Gaussian noise with the L2
    norm ``sqrt(d)`` of a sign vector per image (multiplied by eps in the experiment)."""
    train_set, _ = data_from_profile(profile)
    probe_x, probe_y = data.subset(train_set, Settings.for_profile(profile).n_probe1, seed=profile.seed + 1).tensors
    X, y = probe_x.to(device, torch.float64), probe_y.to(device)
    d = X[0].numel()
    gen = torch.Generator().manual_seed(profile.seed + 2)
    signs = (torch.randint(0, 2, X.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
    z = torch.randn(X.shape, generator=gen, dtype=torch.float64)
    gauss = (z / z.flatten(1).norm(dim=1).view(-1, *[1] * (X.dim() - 1)) * math.sqrt(d)).to(device)
    return X, y, signs, gauss


def _rel_change(K, K0) -> float:
    return float((K - K0).norm() / K0.norm())


def sign_changes(net, X, signs, eps: float, kind: str = "full") -> dict:
    """Relative change of the NTK of ``net`` under one draw of signs, ``{"random": Delta(eps s),
    "antithetic": Delta of the average of the kernels at +eps s and -eps s}``, with
    ``Delta(Omega) = ||Theta(X + Omega, X) - Theta(X, X)||_F / ||Theta(X, X)||_F`` (compute in
    float64: the changes at small eps are far below float32 resolution)."""
    K0 = empirical_ntk(net, X, kind=kind)
    K_plus = empirical_ntk(net, X + eps * signs, X, kind=kind)
    K_minus = empirical_ntk(net, X - eps * signs, X, kind=kind)
    return {"random": _rel_change(K_plus, K0), "antithetic": _rel_change((K_plus + K_minus) / 2, K0)}


def tied_max_windows(net, x) -> list[float]:
    """For every max-pooling layer of ``net`` (in order), the fraction of its pooling windows (over
    images and channels) whose maximum is positive and attained more than once on the inputs ``x``:
    where a perturbation breaks a tie, max pooling switches position (an empty list when ``net``
    has no max pooling)."""
    seen = []
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    hooks = [m.register_forward_pre_hook(lambda module, args: seen.append((module, args[0].detach())))
             for m in pools]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for module, a in seen:
        windows = F.unfold(a.flatten(0, 1).unsqueeze(1), kernel_size=module.kernel_size, stride=module.stride)
        top = windows.max(1, keepdim=True).values
        tied = ((windows == top).sum(1) > 1) & (top.squeeze(1) > 0)
        out.append(float(tied.float().mean()))
    return out


def _ce_input_grad(net, x, y) -> torch.Tensor:
    """Gradient of the mean cross-entropy with respect to the input (the direction FGSM signs)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y), x)
    return grad


def _pool_swap(profile, net, X, signs, eps) -> dict:
    """The trained ReLU weights with max and with average pooling: :func:`sign_changes` at ``eps``."""
    relu = relu_profile(profile)
    out = {}
    for pool in ("max", "avg"):
        twin = model_from_profile(relu.replace(model_kwargs={**relu.model_kwargs, "pool": pool}))
        twin.load_state_dict(net.state_dict())
        out[pool] = sign_changes(twin.double().to(X.device).eval(), X, signs, eps)
    return out


def _theorem1(profile, config, device, nets) -> dict:
    X, y, signs, gauss = theorem1_inputs(profile, device)
    grid = config["eps"]
    res = {"eps": grid, "perturbations": list(PERTURBATIONS), "networks": [], "rel_change": {},
           "slopes": {}, "kernel_norm": {}, "clean_acc": {}, "n_probe": len(y)}
    for name, net, acc in nets:
        net64 = copy.deepcopy(net).double().eval()
        fgsm_signs = _ce_input_grad(net64, X, y).sign()
        inputs = []                                         # per eps: the 7 perturbed probe sets
        for eps in grid:
            torch.manual_seed(profile.seed)
            x_pgd = attacks.pgd(net64, X, y, eps=eps, steps=profile.eval_pgd_steps)
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
        if name == "smooth, init":                          # the by-hand check of the chapter
            by_eps = [sign_changes(net64, X, signs, eps, config["kernel1"]) for eps in config["decade"]]
            res["decade"] = {"eps": list(config["decade"]), **{k: [c[k] for c in by_eps] for k in by_eps[0]}}
        if name == "relu, trained":                         # why the ReLU network does not cancel
            res["ties"] = tied_max_windows(net, X.to(torch.float32))
            res["pool_swap"] = _pool_swap(profile, net, X, signs, grid[0]) if res["ties"] else {}
        del K, net64
    return res


# ------------------------------------------------------------------ Theorem 2
def _theorem2(profile, config, device, progress, nets) -> dict:
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
    from scipy.stats import spearmanr     # here: scipy.stats takes a second to import

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------ analysis and claims
def _key(network: str) -> str:
    """``"smooth, init"`` -> ``"smooth_init"`` (the analysis's keys, usable as glue names)."""
    return network.replace(", ", "_")


def _ratio(a, b) -> float:
    return float(a / b) if b else float("nan")


def analyse(result: dict) -> dict:
    """The numbers chapter 2 discusses, from a result of :func:`run`.

    Per network (``"smooth_init"``, ``"smooth_trained"``, ``"relu_init"``, ``"relu_trained"``):
    ``slopes`` (perturbation -> fitted log-log slope at small eps), ``cancel`` (antithetic / random
    change at the smallest eps: how much of a single draw's change the antithetic average keeps),
    ``pgd_at_train_eps`` and ``random_at_train_eps`` (relative NTK change at the training eps),
    ``pgd_1pct_eps`` (the first eps of the grid where PGD changes the NTK by 1% or more; NaN if
    none), ``clean_acc`` (trained networks). Trained networks also carry Theorem 2's numbers:
    ``spearman`` and ``spearman_within`` (rank correlation of gap and kernel error over all clean
    batches, and its mean within one size), ``error_first``/``error_last`` (median clean kernel
    error at the smallest and largest batch size) and ``error_factor`` (their ratio), ``size_slope``
    and ``gap_slope`` (log-log slopes of the median clean error and gap against the batch size),
    ``adv_size_slope`` (the same for the adversarial error), ``adv_gap_ratio`` (the smallest, over
    batch sizes, ratio of the median adversarial to the median clean gap), ``adv_error_margin``
    (the smallest median adversarial kernel error over the largest median clean one),
    ``adv_median_gap``, ``clean_median_gap``, ``adv_median_error`` (medians over all batches).

    Overall: ``eps_min``, ``train_eps`` (the grid's eps closest to the training eps),
    ``trained_pgd_min`` (the smaller ``pgd_at_train_eps`` of the two trained networks),
    ``decade_random`` and ``decade_antithetic`` (change at eps 1e-2 over change at 1e-3, smooth
    network at initialisation: about 10 and 100 for orders 1 and 2), ``ties_min`` (the smallest
    fraction of tied max-pooling windows over the trained ReLU network's pooling layers; NaN
    without max pooling), ``swap_max_cancel`` (antithetic / random with the trained ReLU weights
    and max pooling, at the smallest eps), ``swap_avg_antithetic`` (the antithetic change with the
    same weights and average pooling), ``batch_min``, ``batch_max``.
    """
    t1, t2 = result["theorem1"], result["theorem2"]
    grid = t1["eps"]
    train_eps = float(result["config"]["profile"]["eps"])
    i_train = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / train_eps)))
    out = {"eps_min": float(grid[0]), "train_eps": float(grid[i_train])}
    for name in t1["networks"]:
        rel = t1["rel_change"][name]
        crossing = [e for e, v in zip(grid, rel["pgd"]) if v >= 0.01]
        acc = t1["clean_acc"][name]
        out[_key(name)] = {
            "slopes": dict(t1["slopes"][name]),
            "cancel": _ratio(rel["antithetic"][0], rel["random"][0]),
            "pgd_at_train_eps": float(rel["pgd"][i_train]), "random_at_train_eps": float(rel["random"][i_train]),
            "pgd_1pct_eps": float(crossing[0]) if crossing else float("nan"),
            **({} if acc is None else {"clean_acc": float(acc)})}
    trained = [n for n in t1["networks"] if n.endswith("trained")]
    out["trained_pgd_min"] = min(out[_key(n)]["pgd_at_train_eps"] for n in trained) if trained else float("nan")
    decade = t1.get("decade", {"random": [math.nan] * 2, "antithetic": [math.nan] * 2})
    out["decade_random"] = _ratio(decade["random"][1], decade["random"][0])
    out["decade_antithetic"] = _ratio(decade["antithetic"][1], decade["antithetic"][0])
    out["ties_min"] = min(t1["ties"]) if t1.get("ties") else float("nan")
    swap = t1.get("pool_swap") or {"max": {"random": math.nan, "antithetic": math.nan}, "avg": {"antithetic": math.nan}}
    out["swap_max_cancel"] = _ratio(swap["max"]["antithetic"], swap["max"]["random"])
    out["swap_avg_antithetic"] = float(swap["avg"]["antithetic"])
    sizes = t2["batch_sizes"]
    out["batch_min"], out["batch_max"] = int(sizes[0]), int(sizes[-1])
    for name in t2["networks"]:
        r = t2[name]
        med_err, med_gap = r["median_error"], r["median_gap"]
        out[_key(name)].update({
            "spearman": float(r["spearman"]["clean"]), "spearman_within": float(r["spearman"]["within_size"]),
            "error_first": float(med_err["clean"][0]), "error_last": float(med_err["clean"][-1]),
            "error_factor": _ratio(med_err["clean"][0], med_err["clean"][-1]),
            "size_slope": float(r["size_slope"]["clean"]), "gap_slope": float(r["gap_slope"]),
            "adv_size_slope": float(r["size_slope"]["adversarial"]),
            "adv_gap_ratio": min(_ratio(a, c) for a, c in zip(med_gap["adversarial"], med_gap["clean"])),
            "adv_error_margin": _ratio(min(med_err["adversarial"]), max(med_err["clean"])),
            "adv_median_gap": float(np.median(r["adversarial"]["gap"])),
            "clean_median_gap": float(np.median(r["clean"]["gap"])),
            "adv_median_error": float(np.median(r["adversarial"]["error"]))})
    return out


def _strictly_between(key, statement, value, low, high, profiles):
    return all_of(key, statement, [compare("slope", "", value, ">", low), compare("slope", "", value, "<", high)],
                  profiles=profiles)


def claims(analysis: dict, profile) -> list:
    """The claims of chapter 2 about a run (from :func:`analyse`), asserted under ``quick``.

    1. Theorem 1 on each smooth network: slopes within 0.1 of 1 (random signs, FGSM signs, PGD,
       Gaussian) and within 0.2 of 2 (antithetic); the antithetic average keeps less than a
       thousandth of a single draw's change at the smallest eps; ten times the eps (1e-3 to 1e-2)
       gives between 5 and 20 times the change of one draw and more than 50 times the antithetic one.
    2. The ReLU / max-pool networks: the antithetic average keeps more than a tenth of one draw's
       change; more than 10% of the pooling windows are tied in every max-pooling layer; the same
       trained weights with average pooling cancel below 1e-10, with max pooling keep more than a
       tenth.
    3. At the training eps PGD changes the NTK of both trained networks by more than 20%.
    4. Theorem 2, per trained network: rank correlation of gap and error above 0.7; the median
       clean error falls by more than a factor 3 from the smallest to the largest batch; its slope
       and the gap's in (-0.8, -0.3).
    5. Per trained network: median adversarial gap more than twice the clean one at every size;
       adversarial error slope within 0.2 of 0; every median adversarial error above every median
       clean one.
    """
    P = ("quick",)
    out = []
    smooth = [k for k in ("smooth_init", "smooth_trained") if k in analysis]
    relu = [k for k in ("relu_init", "relu_trained") if k in analysis]
    trained = [k for k in ("smooth_trained", "relu_trained") if k in analysis and "spearman" in analysis[k]]
    for k in smooth:
        s = analysis[k]["slopes"]
        parts = [compare(p, "", s[p], "between", (0.9, 1.1)) for p in ("random", "fgsm", "pgd", "gaussian")]
        parts.insert(1, compare("antithetic", "", s["antithetic"], "between", (1.8, 2.2)))
        out.append(all_of(f"{k}_orders", f"{k}: one draw of signs, FGSM, PGD and Gaussian noise change the NTK in "
                          f"proportion to eps (slope within 0.1 of 1), the antithetic average in proportion to eps^2 "
                          f"(slope within 0.2 of 2)", parts, profiles=P))
        out.append(compare(f"{k}_cancel", f"{k}: at the smallest eps the antithetic average keeps less than a "
                           f"thousandth of one draw's change", analysis[k]["cancel"], "<", 1e-3, profiles=P))
    out.append(all_of("decade", "smooth_init: ten times the eps gives 5 to 20 times the change of one draw and more "
                      "than 50 times that of the antithetic average",
                      [compare("one draw", "", analysis["decade_random"], ">", 5),
                       compare("one draw", "", analysis["decade_random"], "<", 20),
                       compare("antithetic", "", analysis["decade_antithetic"], ">", 50)], profiles=P))
    for k in relu:
        out.append(compare(f"{k}_no_cancel", f"{k} (max pooling): the antithetic average keeps more than a tenth of "
                           f"one draw's change at the smallest eps", analysis[k]["cancel"], ">", 0.1, profiles=P))
    out.append(compare("ties", "relu_trained: in every max-pooling layer more than 10% of the windows have a positive "
                       "maximum attained more than once", analysis["ties_min"], ">", 0.1, profiles=P))
    out.append(all_of("pool_swap", "relu_trained weights: with average pooling the antithetic average cancels "
                      "(below 1e-10), with max pooling it keeps more than a tenth of one draw's change",
                      [compare("avg", "", analysis["swap_avg_antithetic"], "<", 1e-10),
                       compare("max", "", analysis["swap_max_cancel"], ">", 0.1)], profiles=P))
    out.append(compare("pgd_at_train_eps", "at the training eps PGD changes the NTK of both trained networks by more "
                       "than 20%", analysis["trained_pgd_min"], ">", 0.2, profiles=P))
    for k in trained:
        a = analysis[k]
        out.append(compare(f"{k}_spearman", f"{k}: over clean batches the statistics gap and the kernel error have "
                           f"a rank correlation above 0.7", a["spearman"], ">", 0.7, profiles=P))
        out.append(compare(f"{k}_error_factor", f"{k}: the median clean kernel error falls by more than a factor 3 "
                           f"from the smallest to the largest batch", a["error_factor"], ">", 3, profiles=P))
        out.append(_strictly_between(f"{k}_size_slope", f"{k}: the median clean kernel error falls about like "
                                     f"1/sqrt(batch size) (log-log slope in (-0.8, -0.3))", a["size_slope"],
                                     -0.8, -0.3, P))
        out.append(_strictly_between(f"{k}_gap_slope", f"{k}: the median clean statistics gap falls about like "
                                     f"1/sqrt(batch size) (log-log slope in (-0.8, -0.3))", a["gap_slope"],
                                     -0.8, -0.3, P))
        out.append(compare(f"{k}_adv_gap", f"{k}: at every batch size the median gap of adversarial batches is more "
                           f"than twice that of clean ones", a["adv_gap_ratio"], ">", 2, profiles=P))
        out.append(_strictly_between(f"{k}_adv_flat", f"{k}: the kernel error of adversarial batches does not shrink "
                                     f"with the batch size (log-log slope within 0.2 of 0)", a["adv_size_slope"],
                                     -0.2, 0.2, P))
        out.append(compare(f"{k}_adv_error", f"{k}: every median kernel error of adversarial batches is above every "
                           f"median error of clean ones", a["adv_error_margin"], ">", 1, profiles=P))
    return out
