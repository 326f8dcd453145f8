"""Experiment ``ntk_features``: training-free NTK attacks and eigen-features (chapter 7).

After Tsilivis & Kempe, "What Can the Neural Tangent Kernel Tell Us About Adversarial Robustness?"
(NeurIPS 2022), on a binary task from the profile's data set. Everything is built on
:mod:`ntklab.kernels` (the infinite-width NTK of :class:`ntklab.models.TwoLayerNet`, kernel regression,
eigen-features) and :mod:`ntklab.linearize`.

1. **Kernels.** The closed-form NTK on the ``n_kernel`` training images of the two classes, and the
   empirical NTK at initialisation of TwoLayerNets of growing width on ``n_probe`` of them (relative
   Frobenius error to the closed form, per width); the kernel predictor of the widest empirical
   kernel against the closed-form one.
2. **Transfer.** TwoLayerNets (NTK parameterisation, second layer frozen) of ``widths``, ``net_seeds``
   initialisations each, trained by full-batch gradient descent on the squared loss to one-hot
   targets, their initial output subtracted (:class:`ntklab.linearize.Centered`), with the rate
   ``lr = n / lambda_max`` of the closed-form Gram matrix, for ``steps`` steps (their appendix C). At
   the ``times`` of ``steps``: the kernel predictor after the same number of steps
   (:func:`ntklab.kernels.regression_weights` with ``lr`` and ``steps``, so no manual alignment of
   time scales is needed), the mean cosine between the net's and the kernel's input gradients of the
   cross-entropy on the test images, the same for the net's linearisation around its initialisation
   (:class:`ntklab.linearize.Linearized`), and the net's accuracy clean, under its own FGSM and under
   the kernel's FGSM (the "training-free" attack). At the end also its own PGD and the kernel's PGD.
3. **Eigen-features** of the converged kernel predictor (ridge ``1e-3`` times the mean diagonal):
   usefulness (clean accuracy) and robustness (accuracy under FGSM on the feature itself) of the first
   ``n_features`` on a validation split; the input gradients of the first 8 features on one test
   image; kernels made of the k most robust or the k most useful features (ranked on validation),
   clean and robust on the test images, also under the full kernel's FGSM.

How the ``paper`` profile maps Tsilivis & Kempe's setting: they use the MNIST 10-class task and
binary CIFAR-10 (car vs airplane, 5,000 images per class) with two-layer nets whose widths and
learning rate are not in our copy of the paper; the ``paper`` profile is CIFAR-10, so it runs their
binary CIFAR-10 task: classes 0 (airplane) and 1 (automobile), three quarters of the pair's
training images (7,500) for the kernel and the nets, a quarter for validation, the pair's test
images for testing, widths (4, 32, 256) times the profile's model width (256, 2,048, 16,384 at 64),
``50 * profile.epochs`` gradient steps (10,000), eps from the profile (8/255). ``quick`` uses the
digits 3 and 5 of the embedded MNIST-5k (800 training images, 600 for the kernel, 200 test), widths
(32, 256, 2048) and 160 steps at eps 0.1: a pair the kernel separates well (about 98% clean) but
whose difference is a few strokes, so that eps 0.1 moves the predictor a lot; an easy pair such as
0 vs 1 is hardly attackable at that eps. ``smoke`` uses the same pair on the smoke subset.

The settings per profile are :class:`Settings` (``Settings.for_profile(profile)``). The result
(cached by config and package version) is a dict of tensors, numbers and lists; see :func:`run`.
``compute_seconds`` is the wall time of the computation. :func:`analyse` turns it into the numbers
the chapter discusses and :func:`claims` into the chapter's claims (:mod:`ntklab.claims`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from ntklab import _progress
from ntklab.claims import Claim, all_of, compare
from ntklab.experiments import RunContext, data_from_profile, experiment

__all__ = ["run", "make_config", "Settings", "pair_data", "analyse", "claims", "NAME"]

NAME = "ntk_features"


@dataclass(frozen=True)
class Settings:
    """Every per-profile constant of chapter 7 (see the module docstring for the ``paper`` mapping):
    the pair of ``classes``; the ``widths`` of the trained nets and ``net_seeds`` initialisations
    each; gradient-descent ``steps``; ``eps``; the first ``n_features`` eigen-features and the
    numbers ``ks`` of them kept; the ``kernel_widths`` of the empirical NTKs compared with the
    closed form; the ``eps_grid`` of the kernel predictor's accuracy curves; ``pgd_steps``."""

    classes: tuple[int, int]
    widths: tuple[int, ...]
    net_seeds: int
    steps: int
    eps: float
    n_features: int
    ks: tuple[int, ...]
    kernel_widths: tuple[int, ...]
    eps_grid: tuple[float, ...]
    pgd_steps: int
    kernel_fraction: float = 0.75
    ridge_rel: float = 1e-3
    n_gradient_features: int = 8

    @classmethod
    def for_profile(cls, profile) -> "Settings":
        if profile.name == "smoke":
            return cls(classes=(3, 5), widths=(16, 256), net_seeds=2, steps=20, eps=0.1, n_features=20,
                       ks=(1, 2, 5, 10, 20), kernel_widths=(16, 256, 4096), eps_grid=(0.0, 0.05, 0.1, 0.2),
                       pgd_steps=5)
        if profile.name == "quick":
            return cls(classes=(3, 5), widths=(32, 256, 2048), net_seeds=3, steps=160, eps=0.1, n_features=100,
                       ks=(1, 2, 5, 10, 20, 50, 100), kernel_widths=(32, 256, 2048, 16384),
                       eps_grid=(0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2), pgd_steps=10)
        base = int(profile.model_kwargs.get("width", 64))
        eps = float(profile.eps)
        return cls(classes=(0, 1), widths=(4 * base, 32 * base, 256 * base), net_seeds=3,
                   steps=50 * int(profile.epochs), eps=eps, n_features=100, ks=(1, 2, 5, 10, 20, 50, 100),
                   kernel_widths=(4 * base, 32 * base, 256 * base, 1024 * base),
                   eps_grid=(0.0, eps / 4, eps / 2, eps, 2 * eps), pgd_steps=int(profile.eval_pgd_steps))

    @property
    def times(self) -> list[int]:
        """The gradient-descent steps at which nets and kernel are compared: 1, 2, 5, 10, 20, 50,
        ... below ``steps``, and ``steps``."""
        out, k = [], 0
        while True:
            t = (1, 2, 5)[k % 3] * 10 ** (k // 3)
            if t >= self.steps:
                break
            out.append(t)
            k += 1
        return out + [self.steps]


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    s = Settings.for_profile(profile)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}
    return {"profile": profile.to_dict(), **fields, "times": s.times}


def pair_data(profile, classes=None, kernel_fraction: float = 0.75) -> dict:
    """The binary task: ``{"kernel": (X, y), "val": (X, y), "test": (X, y)}`` with labels 0 for
    ``classes[0]`` and 1 for ``classes[1]``; the pair's images among ``data_from_profile(profile)``,
    the training ones split class-balanced (seeded by ``profile.seed``) into the kernel's training
    set (``kernel_fraction``) and a validation set."""
    import torch
    from torch.utils.data import TensorDataset

    from ntklab import data

    classes = list(Settings.for_profile(profile).classes if classes is None else classes)
    out = {}
    for split, ds in zip(("train", "test"), data_from_profile(profile)):
        x, y = ds.tensors
        keep = (y == classes[0]) | (y == classes[1])
        if int((y[keep] == classes[0]).sum()) < 2 or int((y[keep] == classes[1]).sum()) < 2:
            raise ValueError(f"the {split} split has fewer than 2 images of one of the classes {classes}")
        out[split] = (x[keep], (y[keep] == classes[1]).long())
    x, y = out["train"]
    n_kernel = min(len(y) - 1, max(2, int(round(kernel_fraction * len(y)))))
    # data.subset's class-balanced draw, applied to the indices, so that the rest is the validation set
    first = data.subset(TensorDataset(torch.arange(len(y)), y), n_kernel, seed=profile.seed).tensors[0]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[first] = False
    return {"kernel": (x[first], y[first]), "val": (x[rest], y[rest]), "test": out["test"]}


@experiment(NAME, "closed-form NTK of two-layer nets, training-free kernel attacks transferred to nets "
                  "of growing width, eigen-features by usefulness and robustness (chapter 7)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Run the chapter 7 experiment under ``profile`` (see the module docstring).

    Returns a dict with ``config``; ``lr``; ``kernel_widths`` and ``kernel_rel_error`` (per width);
    ``predictor``: ``{"clean_inf", "clean_emp", "agreement", "eps_grid", "fgsm", "pgd"}`` (the
    kernel predictor after ``steps`` steps, accuracies on the test images); ``kernel_times``:
    ``{"clean", "fgsm"}`` per time; ``nets[str(width)]``: lists over seeds of dicts with per-time
    lists ``cos``, ``cos_lin``, ``flip_ratio`` (mean norm of the net's input gradient minus its
    linearisation's, over the mean norm of the latter), ``clean``, ``own_fgsm``, ``kernel_fgsm`` and
    final ``own_pgd``,
    ``kernel_pgd``; ``features``: ``{"eigenvalues", "usefulness", "robustness", "spearman",
    "grad_images", "grad_image_x", "ks", "robust_first", "useful_first", "full"}``;
    ``compute_seconds``.
    """
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress)


# ------------------------------------------------------------------ analysis and claims
def _stats(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def analyse(result: dict) -> dict:
    """The numbers chapter 7 discusses, from a result of :func:`run`.

    ``nets_end[str(width)][key]``: ``{"mean", "min", "max"}`` over seeds at the last step of
    ``cos``, ``cos_lin``, ``flip_ratio``, ``clean``, ``own_fgsm``, ``kernel_fgsm`` and the final
    ``own_pgd``, ``kernel_pgd``; ``widest`` lists per seed the widest nets' ``own_fgsm``,
    ``kernel_fgsm`` and ``cos`` at the last step (and ``narrowest`` the same for the narrowest);
    ``full_alignment`` says whether the widest nets' full input gradients align ``"better"`` or
    ``"worse"`` than the narrowest's at every seed, or ``"overlapping"``; ``kernel_machine``: the
    peak of the kernel predictor's FGSM accuracy along gradient descent and where it ends;
    ``features``: the eigen-features' Spearman correlation, mean robustness of the first 10 and of
    51-100, feature 1, and ``sweet_spot``: the best robust accuracy of the most-robust-first
    kernels, at which ``k``, with its clean accuracy, against the full kernel and the last ``k``.
    """
    config, times = result["config"], result["times"]
    widths = [int(w) for w in config["widths"]]
    p, kt, fe = result["predictor"], result["kernel_times"], result["features"]

    def last(width, key):
        return [rec[key][-1] if isinstance(rec[key], list) else rec[key] for rec in result["nets"][str(width)]]

    nets_end = {str(w): {k: _stats(last(w, k)) for k in ("cos", "cos_lin", "flip_ratio", "clean", "own_fgsm",
                                                          "kernel_fgsm", "own_pgd", "kernel_pgd")} for w in widths}
    cos_w, cos_n = last(widths[-1], "cos"), last(widths[0], "cos")
    full = "better" if min(cos_w) > max(cos_n) else "worse" if max(cos_w) < min(cos_n) else "overlapping"
    best = max(range(len(kt["fgsm"])), key=lambda i: (kt["fgsm"][i], -i))     # the first peak, as np.argmax
    rob, rf, ks = fe["robustness"], fe["robust_first"], fe["ks"]
    k_best = max(range(len(ks)), key=lambda i: (rf["robust"][i], -i))
    return {
        "lr": float(result["lr"]), "n_kernel": int(result["n_kernel"]), "n_val": int(result["n_val"]),
        "n_test": int(result["n_test"]), "steps": int(times[-1]), "eps": float(config["eps"]),
        "widest_width": widths[-1], "narrowest_width": widths[0], "n_probe": int(result["n_probe"]),
        "kernel_widths": [int(w) for w in result["kernel_widths"]],
        "kernel_rel_error": [float(e) for e in result["kernel_rel_error"]],
        "kernel_rel_error_widest": float(result["kernel_rel_error"][-1]),
        "kernel_error_largest_step": max((e2 - e1 for e1, e2 in zip(result["kernel_rel_error"],
                                                                    result["kernel_rel_error"][1:])), default=-math.inf),
        "predictor": {"clean_inf": float(p["clean_inf"]), "clean_emp": float(p["clean_emp"]),
                      "agreement": float(p["agreement"]),
                      "fgsm_at_eps": float(p["fgsm"][p["eps_grid"].index(config["eps"])])
                      if config["eps"] in p["eps_grid"] else math.nan,
                      "pgd_at_eps": float(p["pgd"][p["eps_grid"].index(config["eps"])])
                      if config["eps"] in p["eps_grid"] else math.nan},
        "nets_end": nets_end,
        "widest": {"own_fgsm": [float(v) for v in last(widths[-1], "own_fgsm")],
                   "kernel_fgsm": [float(v) for v in last(widths[-1], "kernel_fgsm")],
                   "cos": [float(v) for v in cos_w], "cos_lin": [float(v) for v in last(widths[-1], "cos_lin")]},
        "narrowest": {"cos": [float(v) for v in cos_n], "cos_lin": [float(v) for v in last(widths[0], "cos_lin")]},
        "full_alignment": full,
        "switching_law_factor": (widths[-1] / widths[-2]) ** 0.25 if len(widths) > 1 else 1.0,
        "kernel_machine": {"peak_fgsm": float(kt["fgsm"][best]), "peak_step": int(times[best]),
                           "clean_at_peak": float(kt["clean"][best]), "end_fgsm": float(kt["fgsm"][-1]),
                           "end_clean": float(kt["clean"][-1])},
        "features": {"n": len(rob), "spearman": float(fe["spearman"]),
                     "robustness_top10": sum(rob[:10]) / len(rob[:10]),
                     "robustness_51_100": sum(rob[50:]) / len(rob[50:]) if len(rob) > 50 else math.nan,
                     "first_usefulness": float(fe["usefulness"][0]), "first_robustness": float(rob[0]),
                     "full_clean": float(fe["full"]["clean"]), "full_robust": float(fe["full"]["robust"])},
        "sweet_spot": {"k": int(ks[k_best]), "robust": float(rf["robust"][k_best]), "clean": float(rf["clean"][k_best]),
                       "last_k": int(ks[-1]), "last_robust": float(rf["robust"][-1]),
                       "last_clean": float(rf["clean"][-1])},
    }


def claims(analysis: dict, profile) -> list[Claim]:
    """Chapter 7's claims about its run (thresholds written for ``quick``; asserted only there)."""
    wd, km, fe, ss = analysis["widest"], analysis["kernel_machine"], analysis["features"], analysis["sweet_spot"]
    lin_w, lin_n, cos_w, cos_n = wd["cos_lin"], analysis["narrowest"]["cos_lin"], wd["cos"], analysis["narrowest"]["cos"]
    return [
        compare("kernel_error_falls", "The distance of the empirical NTK at initialisation to the closed form "
                "falls with every increase of the width (largest change from one width to the next)",
                analysis["kernel_error_largest_step"], "<", 0),
        compare("kernel_error_widest", "At the widest probe net the empirical NTK is within 5% of the closed form "
                "(relative Frobenius distance)", analysis["kernel_rel_error_widest"], "<", 0.05),
        compare("predictor_agreement", "The kernel predictors of the widest net's empirical NTK and of the closed "
                "form agree on the test images (fraction)", analysis["predictor"]["agreement"], ">=", 0.95),
        all_of("kernel_fgsm_transfers", "The kernel's FGSM, computed without the network, brings every one of the "
               "widest nets to its own white-box FGSM accuracy or below (up to 0.05): kernel-FGSM accuracy per seed",
               [compare(f"seed{i}", "", k, "<=", o + 0.05) for i, (k, o) in
                enumerate(zip(wd["kernel_fgsm"], wd["own_fgsm"]))]),
        compare("lazy_alignment_grows", "The linearisation's input gradient aligns better with the kernel's at the "
                "widest width than at the narrowest, for every seed (worst widest seed against the best narrowest)",
                min(lin_w), ">", max(lin_n)),
        compare("full_alignment_ordered", "The full input gradients of the widest and the narrowest nets are ordered "
                "(either way) at every seed: gap between the two groups of seeds' alignments",
                max(min(cos_w) - max(cos_n), min(cos_n) - max(cos_w)), ">", 0),
        compare("robustness_peaks_early", "Along gradient descent the kernel predictor's FGSM accuracy peaks and then "
                "falls by at least 3 points (peak accuracy)", km["peak_fgsm"], ">=", km["end_fgsm"] + 0.03),
        compare("clean_keeps_rising", "The kernel predictor's clean accuracy at the end is above its clean accuracy at "
                "the FGSM peak (end minus peak)", km["end_clean"] - km["clean_at_peak"], ">", 0),
        compare("robustness_at_the_top", "The robustness of the eigen-features falls with the eigen-index (Spearman "
                "rank correlation)", fe["spearman"], "<", -0.5),
        compare("sweet_spot_robust", "Keeping the most robust features buys robust accuracy: more than 10 points "
                "above the full kernel at the best number of features (robust accuracy there)", ss["robust"], ">", fe["full_robust"] + 0.10),
        compare("sweet_spot_costs_accuracy", "At that number of features the robust features cost clean accuracy: more "
                "than 3 points below the full kernel (clean accuracy there)", ss["clean"], "<", fe["full_clean"] - 0.03),
        compare("vulnerability_returns", "Adding the less robust features brings the vulnerability back: robust "
                "accuracy at the largest number of features more than 5 points below the sweet spot",
                ss["last_robust"], "<", ss["robust"] - 0.05),
    ]


# ------------------------------------------------------------------ the computation
def _acc(model, x, y):
    from ntklab import evaluate

    return float(evaluate.clean_accuracy(model, (x, y)))


def _robust_acc(model, x, y, eps, x_adv=None):
    """Accuracy of ``model`` on ``x_adv`` (default: its own FGSM), counted only where it is right
    on ``x`` too."""
    import torch

    from ntklab import attacks

    if x_adv is None:
        x_adv = attacks.fgsm(model, x, y, eps=eps)
    with torch.no_grad():
        ok = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    return int(ok.sum()) / len(y)


def _loss_grad(model, x, y):
    """Input gradient of the summed cross-entropy, flattened (N, d)."""
    import torch
    import torch.nn.functional as F

    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g.flatten(1)


class _Task:
    """The binary task on ``device`` and what every step of the computation shares: the kernel's
    training images ``X, y`` (one-hot ``Y``), the validation and test images, the closed-form kernel
    function and Gram matrix ``K``, and the gradient-descent rate ``lr = n / lambda_max``."""

    def __init__(self, profile, config, device):
        import functools

        import torch
        import torch.nn.functional as F

        from ntklab import kernels
        from ntklab.data import info

        d = pair_data(profile, config["classes"], config["kernel_fraction"])
        self.X, self.y = (t.to(device) for t in d["kernel"])
        self.Xv, self.yv = (t.to(device) for t in d["val"])
        self.Xt, self.yt = (t.to(device) for t in d["test"])
        self.meta, self.device, self.seed = info(profile.dataset), device, profile.seed
        self.kernel_fn = functools.partial(kernels.two_layer_ntk, mean=self.meta["mean"], std=self.meta["std"])
        self.n = len(self.y)
        self.Y = F.one_hot(self.y, 2).double()
        self.K = self.kernel_fn(self.X.double())
        self.lam_max = float(torch.linalg.eigvalsh(self.K)[-1])
        self.lr = self.n / self.lam_max

    def net(self, width: int, seed: int):
        """A TwoLayerNet of ``width`` for the task, initialised from ``seed``."""
        import torch

        from ntklab.models import TwoLayerNet

        m = self.meta
        torch.manual_seed(seed)
        return TwoLayerNet(in_features=m["channels"] * m["image_size"] ** 2, width=width, num_classes=2,
                           in_channels=m["channels"], mean=m["mean"], std=m["std"]).to(self.device)


def _kernel_limit(task: _Task, config, n_probe: int) -> tuple[list, dict]:
    """Part 1: the relative distance of empirical NTKs at initialisation to the closed form, per
    kernel width, on ``n_probe`` images; the kernel predictors of the widest net's empirical NTK
    and of the closed form after ``steps`` steps, clean and attacked on the test images."""
    import torch

    from ntklab import attacks, kernels, metrics, ntk

    X, Y, K, Xt, yt, steps = task.X, task.Y, task.K, task.Xt, task.yt, config["steps"]
    K_probe = K[:n_probe, :n_probe]
    rel_error = []
    for width in config["kernel_widths"]:
        K_emp = ntk.empirical_ntk(task.net(width, task.seed), X[:n_probe], kind="logit", logit=0).double()
        rel_error.append(float((K_emp - K_probe).norm() / K_probe.norm()))
    widest = task.net(config["widths"][-1], task.seed)
    K_emp = ntk.empirical_ntk(widest, X, kind="logit", logit=0).double()
    K_emp_test = ntk.empirical_ntk(widest, Xt, X, kind="logit", logit=0).double()
    pred_emp = (K_emp_test @ kernels.regression_weights(K_emp, Y, lr=task.lr, steps=steps)).argmax(1)
    predictor = kernels.KernelPredictor(task.kernel_fn, X, kernels.regression_weights(K, Y, lr=task.lr, steps=steps))
    with torch.no_grad():
        pred_inf = predictor(Xt).argmax(1)
    pred = {"clean_inf": float((pred_inf == yt).double().mean()), "clean_emp": float((pred_emp == yt).double().mean()),
            "agreement": float((pred_emp == pred_inf).double().mean()), "eps_grid": list(config["eps_grid"]),
            "fgsm": [], "pgd": [], "kernel_distance": metrics.kernel_distance(K_emp, K)}
    for e in config["eps_grid"]:
        pred["fgsm"].append(_robust_acc(predictor, Xt, yt, e))
        x_pgd = attacks.pgd(predictor, Xt, yt, eps=e, alpha=max(e / 4, 1e-6), steps=config["pgd_steps"])
        pred["pgd"].append(_robust_acc(predictor, Xt, yt, e, x_pgd))
    return rel_error, pred


def _kernel_path(task: _Task, config) -> tuple[dict, dict, object]:
    """Part 2, the kernel side: the kernel predictor after each of the ``times``, with its FGSM
    examples and its input gradients on the test images (``{t: (predictor, x_fgsm, grad)}``), its
    clean and FGSM accuracy per time, and its PGD examples at the end."""
    from ntklab import attacks, kernels

    Xt, yt, eps = task.Xt, task.yt, config["eps"]
    kern = {}
    for t in config["times"]:
        P = kernels.KernelPredictor(task.kernel_fn, task.X,
                                    kernels.regression_weights(task.K, task.Y, lr=task.lr, steps=t)).to(task.device)
        kern[t] = (P, attacks.fgsm(P, Xt, yt, eps=eps), _loss_grad(P, Xt, yt))
    x_kernel_pgd = attacks.pgd(kern[config["steps"]][0], Xt, yt, eps=eps, steps=config["pgd_steps"])
    kernel_times = {"clean": [_acc(kern[t][0], Xt, yt) for t in config["times"]],
                    "fgsm": [_robust_acc(kern[t][0], Xt, yt, eps, kern[t][1]) for t in config["times"]]}
    return kern, kernel_times, x_kernel_pgd


def _train_net(task: _Task, config, net, kern: dict, x_kernel_pgd) -> dict:
    """Part 2, one net: full-batch gradient descent on the centred squared loss at the kernel's
    rate; at each of the kernel's times the input-gradient alignments and accuracies (see
    :func:`run`), at the end PGD, its own and the kernel's."""
    import torch
    import torch.nn.functional as F

    from ntklab import attacks
    from ntklab.linearize import Centered, Linearized

    X, Y, Xt, yt, n, eps = task.X, task.Y, task.Xt, task.yt, task.n, config["eps"]
    model = Centered(net).eval()           # (no BN or dropout: the mode changes nothing)
    lin = Linearized(net, centered=True).eval()   # around the initialisation
    f0 = model.reference(X).detach()
    opt = torch.optim.SGD(net.parameters(), lr=task.lr)
    rec = {k: [] for k in ("cos", "cos_lin", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm")}
    for step in range(1, config["steps"] + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((net(X) - f0 - Y.float()) ** 2).sum() / (2 * n)
        loss.backward()
        opt.step()
        if step in kern:
            P, x_k, g_k = kern[step]
            with torch.no_grad():
                for th, p in zip(lin.theta, net.parameters()):
                    th.copy_(p)
            g_net, g_lin = _loss_grad(model, Xt, yt), _loss_grad(lin, Xt, yt)
            rec["cos"].append(float(F.cosine_similarity(g_net, g_k, dim=1).mean()))
            rec["cos_lin"].append(float(F.cosine_similarity(g_lin, g_k, dim=1).mean()))
            rec["flip_ratio"].append(float((g_net - g_lin).norm(dim=1).mean() / g_lin.norm(dim=1).mean()))
            rec["clean"].append(_acc(model, Xt, yt))
            rec["own_fgsm"].append(_robust_acc(model, Xt, yt, eps))
            rec["kernel_fgsm"].append(_robust_acc(model, Xt, yt, eps, x_k))
    x_own_pgd = attacks.pgd(model, Xt, yt, eps=eps, steps=config["pgd_steps"])
    rec["own_pgd"] = _robust_acc(model, Xt, yt, eps, x_own_pgd)
    rec["kernel_pgd"] = _robust_acc(model, Xt, yt, eps, x_kernel_pgd)
    rec["final_loss"] = loss.item()
    return rec


def _eigen_features(task: _Task, config) -> dict:
    """Part 3: usefulness and robustness of the converged predictor's first eigen-features on the
    validation images, the input gradients of the first features on one test image, and kernels of
    the k most robust or most useful features on the test images."""
    import torch
    from scipy.stats import spearmanr

    from ntklab import attacks, kernels

    Xt, yt, eps = task.Xt, task.yt, config["eps"]
    ridge = config["ridge_rel"] * float(task.K.diagonal().mean())
    q = min(config["n_features"], task.n)
    eigenvalues, alphas = kernels.eigen_features(task.K, task.Y, ridge=ridge, top=q)
    full = kernels.KernelPredictor(task.kernel_fn, task.X,
                                   kernels.regression_weights(task.K, task.Y, ridge=ridge)).to(task.device)
    usefulness = [_acc(full.with_alpha(alphas[i]), task.Xv, task.yv) for i in range(q)]
    robustness = [_robust_acc(full.with_alpha(alphas[i]), task.Xv, task.yv, eps) for i in range(q)]
    rho = spearmanr(list(range(q)), robustness).statistic
    x_img = Xt[:1]
    grads = []
    for i in range(min(config["n_gradient_features"], q)):
        xg = x_img.clone().requires_grad_(True)
        out = full.with_alpha(alphas[i])(xg)
        (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xg)
        grads.append(g[0])
    x_full_fgsm = attacks.fgsm(full, Xt, yt, eps=eps)
    order_r = sorted(range(q), key=lambda i: (-robustness[i], i))
    order_u = sorted(range(q), key=lambda i: (-usefulness[i], i))
    ks = [k for k in config["ks"] if k <= q]
    seqs = {}
    for name, order in (("robust_first", order_r), ("useful_first", order_u)):
        rows = {"clean": [], "robust": [], "transfer": []}
        for k in ks:
            P = full.with_alpha(alphas[order[:k]].sum(0))
            rows["clean"].append(_acc(P, Xt, yt))
            rows["robust"].append(_robust_acc(P, Xt, yt, eps))
            rows["transfer"].append(_robust_acc(P, Xt, yt, eps, x_full_fgsm))
        seqs[name] = rows
    return {"eigenvalues": eigenvalues[:q].float(), "usefulness": usefulness, "robustness": robustness,
            "spearman": float(rho) if math.isfinite(rho) else 0.0, "grad_images": torch.stack(grads).cpu(),
            "grad_image_x": x_img[0].cpu(), "grad_image_y": int(yt[0]), "ks": ks, **seqs,
            "full": {"clean": _acc(full, Xt, yt), "robust": _robust_acc(full, Xt, yt, eps, x_full_fgsm)},
            "ridge": ridge}


def _compute(profile, config, device, progress) -> dict:
    from ntklab.config import seed_everything

    start = time.perf_counter()
    seed_everything(profile.seed)
    task = _Task(profile, config, device)
    n_probe = min(profile.n_probe, task.n)
    rel_error, pred = _kernel_limit(task, config, n_probe)
    kern, kernel_times, x_kernel_pgd = _kernel_path(task, config)
    nets = {}
    runs = [(w, s) for w in config["widths"] for s in range(config["net_seeds"])]
    for width, s in _progress.bar(progress, runs, desc="two-layer nets"):
        net = task.net(width, 1000 * (profile.seed + 1) + s)
        nets.setdefault(str(width), []).append(_train_net(task, config, net, kern, x_kernel_pgd))
    features = _eigen_features(task, config)
    return {"config": config, "lr": task.lr, "lambda_max": task.lam_max, "n_kernel": task.n, "n_val": len(task.yv),
            "n_test": len(task.yt), "kernel_widths": list(config["kernel_widths"]), "kernel_rel_error": rel_error,
            "n_probe": n_probe, "predictor": pred, "times": list(config["times"]), "kernel_times": kernel_times,
            "nets": nets, "features": features, "compute_seconds": time.perf_counter() - start}
