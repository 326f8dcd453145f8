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

The result (cached by config and package version) is a dict of tensors, numbers and lists; see
:func:`run`. ``compute_seconds`` is the wall time of the computation.
"""
from __future__ import annotations

import math
import time

from ntklab import _progress
from ntklab.experiments import cached, data_from_profile, register

__all__ = ["run", "make_config", "settings", "pair_data", "NAME"]

NAME = "ntk_features"

_PER_PROFILE = {
    "smoke": dict(classes=[3, 5], widths=[16, 256], net_seeds=2, steps=20, eps=0.1, n_features=20,
                  ks=[1, 2, 5, 10, 20], kernel_widths=[16, 256, 4096], eps_grid=[0.0, 0.05, 0.1, 0.2],
                  pgd_steps=5),
    "quick": dict(classes=[3, 5], widths=[32, 256, 2048], net_seeds=3, steps=160, eps=0.1, n_features=100,
                  ks=[1, 2, 5, 10, 20, 50, 100], kernel_widths=[32, 256, 2048, 16384],
                  eps_grid=[0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2], pgd_steps=10),
}


def settings(profile) -> dict:
    """The chapter's settings under ``profile`` (see the module docstring for the ``paper`` mapping)."""
    if profile.name in _PER_PROFILE:
        return {**_PER_PROFILE[profile.name]}
    base = int(profile.model_kwargs.get("width", 64))
    eps = float(profile.eps)
    return dict(classes=[0, 1], widths=[4 * base, 32 * base, 256 * base], net_seeds=3,
                steps=50 * int(profile.epochs), eps=eps, n_features=100, ks=[1, 2, 5, 10, 20, 50, 100],
                kernel_widths=[4 * base, 32 * base, 256 * base, 1024 * base],
                eps_grid=[0.0, eps / 4, eps / 2, eps, 2 * eps], pgd_steps=int(profile.eval_pgd_steps))


def _times(steps: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``steps``, and ``steps``."""
    out, k = [], 0
    while True:
        t = (1, 2, 5)[k % 3] * 10 ** (k // 3)
        if t >= steps:
            break
        out.append(t)
        k += 1
    return out + [steps]


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    s = settings(profile)
    return {"profile": profile.to_dict(), **s, "times": _times(s["steps"]), "kernel_fraction": 0.75,
            "ridge_rel": 1e-3, "n_gradient_features": 8}


def pair_data(profile, classes=None, kernel_fraction: float = 0.75) -> dict:
    """The binary task: ``{"kernel": (X, y), "val": (X, y), "test": (X, y)}`` with labels 0 for
    ``classes[0]`` and 1 for ``classes[1]``; the pair's images among ``data_from_profile(profile)``,
    the training ones split class-balanced (seeded by ``profile.seed``) into the kernel's training
    set (``kernel_fraction``) and a validation set."""
    import torch
    from torch.utils.data import TensorDataset

    from ntklab import data

    classes = settings(profile)["classes"] if classes is None else list(classes)
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


@register(NAME, "closed-form NTK of two-layer nets, training-free kernel attacks transferred to nets "
                "of growing width, eigen-features by usefulness and robustness (chapter 7)")
def run(profile, device=None, *, force: bool = False, progress: bool = True) -> dict:
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
    from ntklab.config import get_device

    config = make_config(profile)
    return cached(NAME, config, lambda: _compute(profile, config, get_device(device), progress), force=force)


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


def _compute(profile, config, device, progress) -> dict:
    import functools

    import torch
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    from ntklab import attacks, kernels, metrics, ntk
    from ntklab.config import seed_everything
    from ntklab.data import info
    from ntklab.linearize import Centered, Linearized
    from ntklab.models import TwoLayerNet

    start = time.perf_counter()
    seed_everything(profile.seed)
    d = pair_data(profile, config["classes"], config["kernel_fraction"])
    X, y = (t.to(device) for t in d["kernel"])
    Xv, yv = (t.to(device) for t in d["val"])
    Xt, yt = (t.to(device) for t in d["test"])
    meta = info(profile.dataset)
    mean, std = meta["mean"], meta["std"]
    in_features = meta["channels"] * meta["image_size"] ** 2
    kernel_fn = functools.partial(kernels.two_layer_ntk, mean=mean, std=std)
    n, eps = len(y), config["eps"]
    Y = F.one_hot(y, 2).double()
    K = kernel_fn(X.double())
    lam_max = float(torch.linalg.eigvalsh(K)[-1])
    lr = n / lam_max
    steps, times = config["steps"], config["times"]

    def make_net(width, seed):
        torch.manual_seed(seed)
        return TwoLayerNet(in_features=in_features, width=width, num_classes=2, in_channels=meta["channels"],
                           mean=mean, std=std).to(device)

    # 1. closed form against empirical NTKs at initialisation
    n_probe = min(profile.n_probe, n)
    K_probe = K[:n_probe, :n_probe]
    rel_error = []
    for width in config["kernel_widths"]:
        K_emp = ntk.empirical_ntk(make_net(width, profile.seed), X[:n_probe], kind="logit", logit=0).double()
        rel_error.append(float((K_emp - K_probe).norm() / K_probe.norm()))
    widest = make_net(config["widths"][-1], profile.seed)
    K_emp = ntk.empirical_ntk(widest, X, kind="logit", logit=0).double()
    K_emp_test = ntk.empirical_ntk(widest, Xt, X, kind="logit", logit=0).double()
    alpha_emp = kernels.regression_weights(K_emp, Y, lr=lr, steps=steps)
    pred_emp = (K_emp_test @ alpha_emp).argmax(1)
    alpha_end = kernels.regression_weights(K, Y, lr=lr, steps=steps)
    predictor = kernels.KernelPredictor(kernel_fn, X, alpha_end)
    with torch.no_grad():
        pred_inf = predictor(Xt).argmax(1)
    pred = {"clean_inf": float((pred_inf == yt).double().mean()), "clean_emp": float((pred_emp == yt).double().mean()),
            "agreement": float((pred_emp == pred_inf).double().mean()), "eps_grid": list(config["eps_grid"]),
            "fgsm": [], "pgd": [], "kernel_distance": metrics.kernel_distance(K_emp, K)}
    for e in config["eps_grid"]:
        pred["fgsm"].append(_robust_acc(predictor, Xt, yt, e))
        x_pgd = attacks.pgd(predictor, Xt, yt, eps=e, alpha=max(e / 4, 1e-6), steps=config["pgd_steps"])
        pred["pgd"].append(_robust_acc(predictor, Xt, yt, e, x_pgd))

    # 2. the kernel along the gradient-descent path, and nets of growing width
    kern = {}
    for t in times:
        P = kernels.KernelPredictor(kernel_fn, X, kernels.regression_weights(K, Y, lr=lr, steps=t)).to(device)
        kern[t] = (P, attacks.fgsm(P, Xt, yt, eps=eps), _loss_grad(P, Xt, yt))
    x_kernel_pgd = attacks.pgd(kern[steps][0], Xt, yt, eps=eps, alpha=eps / 4, steps=config["pgd_steps"])
    kernel_times = {"clean": [_acc(kern[t][0], Xt, yt) for t in times],
                    "fgsm": [_robust_acc(kern[t][0], Xt, yt, eps, kern[t][1]) for t in times]}
    nets = {}
    runs = [(w, s) for w in config["widths"] for s in range(config["net_seeds"])]
    for width, s in _progress.bar(progress, runs, desc="two-layer nets"):
        net = make_net(width, 1000 * (profile.seed + 1) + s)
        model = Centered(net).eval()           # (no BN or dropout: the mode changes nothing)
        lin = Linearized(net, centered=True).eval()   # around the initialisation
        f0 = model.reference(X).detach()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        rec = {k: [] for k in ("cos", "cos_lin", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm")}
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = ((net(X) - f0 - Y.float()) ** 2).sum() / (2 * n)
            loss.backward()
            opt.step()
            if step in kern:
                P, x_k, g_k = kern[step]
                with torch.no_grad():
                    for th, p in zip(lin.theta, (p for p in net.parameters())):
                        th.copy_(p)
                g_net, g_lin = _loss_grad(model, Xt, yt), _loss_grad(lin, Xt, yt)
                rec["cos"].append(float(F.cosine_similarity(g_net, g_k, dim=1).mean()))
                rec["cos_lin"].append(float(F.cosine_similarity(g_lin, g_k, dim=1).mean()))
                rec["flip_ratio"].append(float((g_net - g_lin).norm(dim=1).mean() / g_lin.norm(dim=1).mean()))
                rec["clean"].append(_acc(model, Xt, yt))
                rec["own_fgsm"].append(_robust_acc(model, Xt, yt, eps))
                rec["kernel_fgsm"].append(_robust_acc(model, Xt, yt, eps, x_k))
        x_own_pgd = attacks.pgd(model, Xt, yt, eps=eps, alpha=eps / 4, steps=config["pgd_steps"])
        rec["own_pgd"] = _robust_acc(model, Xt, yt, eps, x_own_pgd)
        rec["kernel_pgd"] = _robust_acc(model, Xt, yt, eps, x_kernel_pgd)
        rec["final_loss"] = loss.item()
        nets.setdefault(str(width), []).append(rec)

    # 3. eigen-features of the converged predictor
    ridge = config["ridge_rel"] * float(K.diagonal().mean())
    q = min(config["n_features"], n)
    eigenvalues, alphas = kernels.eigen_features(K, Y, ridge=ridge, top=q)
    full = kernels.KernelPredictor(kernel_fn, X, kernels.regression_weights(K, Y, ridge=ridge)).to(device)
    usefulness, robustness = [], []
    for i in range(q):
        f_i = full.with_alpha(alphas[i])
        usefulness.append(_acc(f_i, Xv, yv))
        robustness.append(_robust_acc(f_i, Xv, yv, eps))
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
    features = {"eigenvalues": eigenvalues[:q].float(), "usefulness": usefulness, "robustness": robustness,
                "spearman": float(rho) if math.isfinite(rho) else 0.0, "grad_images": torch.stack(grads).cpu(),
                "grad_image_x": x_img[0].cpu(), "grad_image_y": int(yt[0]), "ks": ks, **seqs,
                "full": {"clean": _acc(full, Xt, yt), "robust": _robust_acc(full, Xt, yt, eps, x_full_fgsm)},
                "ridge": ridge}
    return {"config": config, "lr": lr, "lambda_max": lam_max, "n_kernel": n, "n_val": len(yv), "n_test": len(yt),
            "kernel_widths": list(config["kernel_widths"]), "kernel_rel_error": rel_error, "n_probe": n_probe,
            "predictor": pred, "times": list(times), "kernel_times": kernel_times, "nets": nets,
            "features": features, "compute_seconds": time.perf_counter() - start}
