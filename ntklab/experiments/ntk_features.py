"""Experiment ``ntk_features``: training-free NTK attacks and eigen-features (chapter 7).

After Tsilivis & Kempe, "What Can the Neural Tangent Kernel Tell Us About Adversarial Robustness?"
(NeurIPS 2022), on a binary task from the profile's data set. Everything is built on
:mod:`ntklab.kernels` (the infinite-width NTK of :class:`ntklab.models.TwoLayerNet`, kernel regression,
eigen-features) and :mod:`ntklab.linearize`.

1. **Kernels.** The closed-form NTK on the ``n_kernel`` training images of the two classes, and the
   empirical NTK at initialisation of TwoLayerNets of growing width on ``n_probe`` of them (relative
   Frobenius error to the closed form, per width its mean over ``kernel_inits`` initialisations,
   and its log-log slope against the width); the
   kernel predictor of the widest empirical kernel against the closed-form one.
2. **Transfer.** TwoLayerNets (NTK parameterisation, second layer frozen) of ``widths``, ``net_seeds``
   initialisations each, trained by full-batch gradient descent on the squared loss to one-hot
   targets with the rate ``lr = n / lambda_max`` of the closed-form Gram matrix, for ``steps`` steps
   (their appendix C). The nets train on the *centred* loss ``|net(X) - f0(X) - Y|^2``
   (:class:`ntklab.linearize.Centered`), so that they learn what the kernel predictor (started at 0)
   learns; Tsilivis & Kempe trained on ``f`` and subtracted ``f0`` only when measuring. At the
   ``times`` of ``steps``: the kernel predictor after the same number of steps
   (:func:`ntklab.kernels.regression_weights` with ``lr`` and ``steps``, so no manual alignment of
   time scales is needed), the mean cosine between the net's and the kernel's input gradients of the
   cross-entropy on the test images, the same for the net's linearisation around its initialisation
   (:class:`ntklab.linearize.Linearized`), the cosine of the linearisation's gradient with the
   *frozen-gate* kernel gradient (``two_layer_ntk(..., frozen_gates=True)``, its infinite-width
   limit, which lacks the arc-cosine derivative term of the kernel's own gradient), and the net's
   accuracy clean, under its own FGSM and under the kernel's FGSM (the "training-free" attack). At
   the end, with per-image hits on the held-out images (the test images, then the validation
   images, which train neither the nets nor the kernel): its own FGSM and PGD, the kernel's FGSM and
   PGD, the FGSM and PGD of the next net of the same width (another initialisation, the standard
   transfer surrogate) and a random +-eps step.
3. **Eigen-features** of the converged kernel predictor (ridge ``1e-3`` times the mean diagonal):
   usefulness (clean accuracy) and robustness (accuracy under FGSM on the feature itself) of the first
   ``n_features`` on a validation split; the input gradients of the first 8 features on one test
   image; kernels made of the k most robust or the k most useful features (ranked on validation),
   clean and robust on the test images (and, for the most robust, on the validation images, where
   the chapter picks k), also under the full kernel's FGSM; ``random_subsets`` draws of k random
   features as a baseline; the best constant predictor. The gain of the most robust features over
   the full kernel is cross-fitted: their number chosen on the validation images and the gain
   measured on the test images, and the other way round (:func:`analyse`).

Robustness is claimed only where the predictor is accurate (clean accuracy >= :data:`CLEAN_MIN`):
on the balanced pair a constant predictor scores 0.5 both clean and "robust" (FGSM cannot move
it), so robust accuracy is compared with that level (:func:`above_chance`) and with random-feature
and random-direction baselines.

How the ``paper`` profile maps Tsilivis & Kempe's setting: they use the MNIST 10-class task and
binary CIFAR-10 (car vs airplane, 5,000 images per class) with two-layer nets whose widths and
learning rate are not in our copy of the paper; the ``paper`` profile is CIFAR-10, so it runs their
binary CIFAR-10 task: classes 0 (airplane) and 1 (automobile), three quarters of the pair's
training images (7,500) for the kernel and the nets, a quarter for validation, the pair's test
images for testing, widths (4, 32, 256) times the profile's model width (256, 2,048, 16,384 at 64),
``50 * profile.epochs`` gradient steps (10,000), eps from the profile (8/255). The widths, the
number of steps and eps 8/255 are the book's guesses, not numbers from the paper. ``quick`` uses
the digits 3 and 5 of the embedded MNIST-5k (800 training images, 600 for the kernel, 200 test),
widths (32, 256, 2048) and 160 steps at eps 0.1: a pair the kernel separates well (about 98% clean)
but whose difference is a few strokes, so that eps 0.1 moves the predictor a lot; an easy pair such
as 0 vs 1 is hardly attackable at that eps. ``smoke`` uses the same pair on the smoke subset.

The settings per profile are :class:`Settings` (``Settings.for_profile(profile)``). The result
(cached by config and package version) is a dict of tensors, numbers and lists; see :func:`run`.
``compute_seconds`` is the wall time of the computation. :func:`analyse` turns it into the numbers
the chapter discusses and :func:`claims` into the chapter's claims (:mod:`ntklab.claims`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

from ntklab import _progress
from ntklab.claims import Claim, all_of, compare
from ntklab.experiments import RunContext, data_from_profile, experiment

__all__ = ["run", "make_config", "Settings", "pair_data", "analyse", "claims", "margins", "above_chance", "CLEAN_MIN",
           "NAME"]

NAME = "ntk_features"


@dataclass(frozen=True)
class Settings:
    """Every per-profile constant of chapter 7 (see the module docstring for the ``paper`` mapping):
    the pair of ``classes``; the ``widths`` of the trained nets and ``net_seeds`` initialisations
    each; gradient-descent ``steps``; ``eps``; the first ``n_features`` eigen-features and the
    numbers ``ks`` of them kept; the ``kernel_widths`` of the empirical NTKs compared with the
    closed form; the ``eps_grid`` of the kernel predictor's accuracy curves; ``pgd_steps``;
    ``random_subsets`` draws of k random eigen-features per k; ``kernel_inits`` initialisations per
    width of the empirical NTKs (their mean distance to the closed form, and its standard error).
    Under ``paper`` the widths, steps and
    eps (the profile's 8/255) are the book's guesses (see the module docstring)."""

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
    random_subsets: int = 3
    kernel_inits: int = 8

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

    Returns a dict with ``config``; ``lr``; ``kernel_widths``, ``kernel_rel_error`` (per width, the
    mean over initialisations) and ``kernel_rel_error_inits`` (per width, per initialisation);
    ``n_test`` and ``n_heldout`` (test and validation images, those of the final attacks);
    ``predictor``: ``{"clean_inf", "clean_emp", "agreement", "eps_grid", "fgsm", "pgd"}`` (the
    kernel predictor after ``steps`` steps, accuracies on the test images); ``kernel_times``:
    ``{"clean", "fgsm", "fgsm_hits", "cos_frozen"}`` per time; ``nets[str(width)]``: lists over
    seeds of dicts with per-time lists ``cos``, ``cos_lin``, ``cos_frozen``, ``flip_ratio`` (mean
    norm of the net's input gradient minus its linearisation's, over the mean norm of the latter),
    ``clean``, ``own_fgsm``, ``kernel_fgsm`` (on the test images), the final ``own_pgd``,
    ``kernel_pgd``, ``surrogate_fgsm``, ``surrogate_pgd``, ``random_sign`` and ``hits`` (per-image 0/1
    of every final attack, on the ``n_heldout`` held-out images); ``features``: ``{"eigenvalues",
    "usefulness", "robustness", "spearman", "grad_images", "grad_image_x", "ks", "robust_first",
    "useful_first", "random_k", "best_constant", "full"}`` (``robust_first`` with the validation
    images' per-image hits, ``random_k`` with each draw's robust accuracy, ``full`` with its FGSM
    hits on the test and on the validation images); ``compute_seconds``.
    """
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress)


# ------------------------------------------------------------------ analysis and claims
#: the clean accuracy a predictor needs before its robustness is claimed (a constant predictor of
#: the balanced pair scores 0.5 both clean and "robust")
CLEAN_MIN = 0.8


def _stats(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def above_chance(accuracy: float) -> float:
    """``2 * accuracy - 1``: 0 for a constant (or coin-flip) predictor of the balanced pair, 1 for
    a perfect one, negative when an attack pushes the predictor below chance."""
    return 2 * float(accuracy) - 1


def _log_slope(x, y) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _slope_se(x, y, se) -> float:
    """The standard error of :func:`_log_slope`'s slope from the standard errors ``se`` of the
    ``y`` (each log y's SE taken as ``se / y``); NaN with fewer than 2 points."""
    if len(x) < 2:
        return math.nan
    lx = [math.log(v) for v in x]
    mx = sum(lx) / len(lx)
    sxx = sum((a - mx) ** 2 for a in lx)
    return math.sqrt(sum(((a - mx) / sxx) ** 2 * (e / v) ** 2 for a, v, e in zip(lx, y, se)))


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def analyse(result: dict) -> dict:
    """The numbers chapter 7 discusses, from a result of :func:`run`.

    ``nets_end[str(width)][key]``: ``{"mean", "min", "max"}`` over seeds at the last step of
    ``cos``, ``cos_lin``, ``cos_frozen``, ``flip_ratio``, ``clean``, ``own_fgsm``, ``kernel_fgsm``
    and the final ``own_pgd``, ``kernel_pgd``, ``surrogate_fgsm``, ``surrogate_pgd``,
    ``random_sign``; ``widest`` lists per seed the widest nets' final numbers and ``transfer`` the
    paired differences (``diff``, ``se``) of the kernel's FGSM accuracy with the surrogate net's
    FGSM and PGD, the net's own FGSM and PGD and the random-sign step (``transfer_range``: their
    smallest and largest difference and largest SE over seeds), on the held-out images;
    ``kernel_error_slope``: the log-log slope of the empirical NTK's (mean) distance to the closed
    form against the width, ``kernel_rel_error_se`` the standard errors of the means over the
    initialisations and ``kernel_error_slope_se`` the slope's; ``full_alignment_gap``: the
    narrowest seeds' worst full-gradient alignment minus the widest seeds' best (positive: the
    widest align worse at every seed); ``kernel_machine``: the peak of the kernel predictor's FGSM
    accuracy along gradient descent among the steps with clean accuracy >= ``CLEAN_MIN``, where it
    ends, and the paired difference (``drop``, ``drop_se``, ``drop_z``); ``features``: Spearman
    correlations of robustness and usefulness with the eigen-index, the number of features robust
    above chance (by 2 binomial SE on the validation images), the full kernel, the best constant
    predictor; ``sweet_spot``: the number of most-robust-first features with the best validation
    robust accuracy among those with validation clean accuracy >= ``CLEAN_MIN``, its test numbers,
    the paired difference of its robust accuracy with the full kernel's (``gain_over_full``), the
    same with the number chosen on the test images and the gain measured on the validation images
    (``k_test``, ``gain_over_full_val``) and their mean (``gain_crossed``, SE ``gain_crossed_se``), the
    random-subset baseline at the same k (``random_robust``, SE over the draws ``random_robust_se``),
    and the last ``k`` (``last_minus_spot``: its robust accuracy minus the sweet spot's, paired).
    Everything :func:`margins` needs.
    """
    from ntklab.claims import binomial_se, paired_difference

    config, times = result["config"], result["times"]
    widths = [int(w) for w in config["widths"]]
    p, kt, fe = result["predictor"], result["kernel_times"], result["features"]
    n_test, n_val = int(result["n_test"]), int(result["n_val"])

    def last(width, key):
        return [rec[key][-1] if isinstance(rec[key], list) else rec[key] for rec in result["nets"][str(width)]]

    keys = ("cos", "cos_lin", "cos_frozen", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm", "own_pgd", "kernel_pgd",
            "surrogate_fgsm", "surrogate_pgd", "random_sign")
    nets_end = {str(w): {k: _stats(last(w, k)) for k in keys} for w in widths}
    cos_w, cos_n = last(widths[-1], "cos"), last(widths[0], "cos")
    full = "better" if min(cos_w) > max(cos_n) else "worse" if max(cos_w) < min(cos_n) else "overlapping"
    # the kernel machine along gradient descent: its FGSM peak among the steps where it is accurate
    ok = [i for i, c in enumerate(kt["clean"]) if c >= CLEAN_MIN] or [len(times) - 1]
    best = max(ok, key=lambda i: (kt["fgsm"][i], -i))     # the first peak, as np.argmax
    drop = paired_difference(kt["fgsm_hits"][best], kt["fgsm_hits"][-1])
    transfer = []
    for rec in result["nets"][str(widths[-1])]:
        h = rec["hits"]
        transfer.append({other: {k: paired_difference(h["kernel_fgsm"], h[other])[k] for k in ("diff", "se")}
                         for other in ("surrogate_fgsm", "surrogate_pgd", "own_fgsm", "own_pgd", "random_sign")})
    rob, use, ks = fe["robustness"], fe["usefulness"], fe["ks"]
    rf = fe["robust_first"]
    cand = [i for i, c in enumerate(rf["val_clean"]) if c >= CLEAN_MIN] or list(range(len(ks)))
    k_best = max(cand, key=lambda i: (rf["val_robust"][i], -i))
    vs_full = paired_difference(rf["robust_hits"][k_best], fe["full"]["robust_hits"])
    # the same choice the other way round: k chosen on the test images, the gain measured on the
    # validation images; the mean of both gains is measured on all the held-out images (cross-fitting)
    cand_t = [i for i, c in enumerate(rf["clean"]) if c >= CLEAN_MIN] or list(range(len(ks)))
    k_test = max(cand_t, key=lambda i: (rf["robust"][i], -i))
    if "val_robust_hits" in rf and "val_robust_hits" in fe["full"]:
        vs_full_val = paired_difference(rf["val_robust_hits"][k_test], fe["full"]["val_robust_hits"])
        crossed = {"diff": (vs_full["diff"] + vs_full_val["diff"]) / 2,
                   "se": math.hypot(vs_full["se"], vs_full_val["se"]) / 2}
    else:
        vs_full_val, crossed = {"diff": math.nan, "se": math.nan}, {"diff": math.nan, "se": math.nan}
    n_above = sum(1 for r in rob if r - 0.5 > 2 * binomial_se(r, n_val))
    returns = paired_difference(rf["robust_hits"][-1], rf["robust_hits"][k_best])
    draws = fe["random_k"].get("robust_draws")
    random_se = (statistics.stdev(draws[k_best]) / math.sqrt(len(draws[k_best]))
                 if draws is not None and len(draws[k_best]) > 1 else math.nan)
    inits = result.get("kernel_rel_error_inits", [[e] for e in result["kernel_rel_error"]])
    err_se = [statistics.stdev(e) / math.sqrt(len(e)) if len(e) > 1 else math.nan for e in inits]
    return {
        "lr": float(result["lr"]), "n_kernel": int(result["n_kernel"]), "n_val": n_val,
        "n_test": n_test, "n_heldout": int(result.get("n_heldout", n_test)), "steps": int(times[-1]),
        "eps": float(config["eps"]), "clean_min": CLEAN_MIN,
        "widest_width": widths[-1], "narrowest_width": widths[0], "n_probe": int(result["n_probe"]),
        "kernel_widths": [int(w) for w in result["kernel_widths"]],
        "kernel_rel_error": [float(e) for e in result["kernel_rel_error"]],
        "kernel_rel_error_widest": float(result["kernel_rel_error"][-1]),
        "kernel_error_largest_step": max((e2 - e1 for e1, e2 in zip(result["kernel_rel_error"],
                                                                    result["kernel_rel_error"][1:])), default=-math.inf),
        "kernel_error_slope": _log_slope(result["kernel_widths"], result["kernel_rel_error"])
        if len(result["kernel_widths"]) > 1 else math.nan,
        "kernel_inits": len(inits[0]), "kernel_rel_error_se": err_se,
        "kernel_error_slope_se": _slope_se(result["kernel_widths"], result["kernel_rel_error"], err_se),
        "predictor": {"clean_inf": float(p["clean_inf"]), "clean_emp": float(p["clean_emp"]),
                      "agreement": float(p["agreement"]),
                      "fgsm_at_eps": float(p["fgsm"][p["eps_grid"].index(config["eps"])])
                      if config["eps"] in p["eps_grid"] else math.nan,
                      "pgd_at_eps": float(p["pgd"][p["eps_grid"].index(config["eps"])])
                      if config["eps"] in p["eps_grid"] else math.nan},
        "nets_end": nets_end,
        "widest": {k: [float(v) for v in last(widths[-1], k)] for k in keys},
        "narrowest": {k: [float(v) for v in last(widths[0], k)] for k in ("cos", "cos_lin", "cos_frozen")},
        "transfer": transfer,
        "transfer_range": {other: {"diff_min": min(t[other]["diff"] for t in transfer),
                                   "diff_max": max(t[other]["diff"] for t in transfer),
                                   "se_max": max(t[other]["se"] for t in transfer)} for other in transfer[0]},
        "full_alignment": full, "full_alignment_gap": float(min(cos_n) - max(cos_w)),
        "frozen_gate_ceiling": float(kt["cos_frozen"][-1]),
        "switching_law_factor": (widths[-1] / widths[-2]) ** 0.25 if len(widths) > 1 else 1.0,
        "kernel_machine": {"peak_fgsm": float(kt["fgsm"][best]), "peak_step": int(times[best]),
                           "clean_at_peak": float(kt["clean"][best]), "end_fgsm": float(kt["fgsm"][-1]),
                           "end_clean": float(kt["clean"][-1]), "drop": drop["diff"], "drop_se": drop["se"],
                           "drop_z": drop["diff"] / drop["se"] if drop["se"] > 0 else 0.0},
        "features": {"n": len(rob), "spearman": float(fe["spearman"]),
                     "robustness": [float(r) for r in rob], "usefulness": [float(u) for u in use],
                     "usefulness_spearman": _spearman(range(len(use)), use),
                     "n_above_chance": n_above, "max_usefulness": max(float(u) for u in use),
                     "robustness_top10": sum(rob[:10]) / len(rob[:10]),
                     "robustness_51_100": sum(rob[50:]) / len(rob[50:]) if len(rob) > 50 else math.nan,
                     "first_usefulness": float(use[0]), "first_robustness": float(rob[0]),
                     "full_clean": float(fe["full"]["clean"]), "full_robust": float(fe["full"]["robust"]),
                     "full_robust_above_chance": above_chance(fe["full"]["robust"]),
                     "best_constant": float(fe["best_constant"])},
        "sweet_spot": {"k": int(ks[k_best]), "robust": float(rf["robust"][k_best]), "clean": float(rf["clean"][k_best]),
                       "robust_above_chance": above_chance(rf["robust"][k_best]),
                       "robust_se": binomial_se(float(rf["robust"][k_best]), n_test),
                       "val_clean": float(rf["val_clean"][k_best]), "val_robust": float(rf["val_robust"][k_best]),
                       "gain_over_full": vs_full["diff"], "gain_se": vs_full["se"],
                       "k_test": int(ks[k_test]), "gain_over_full_val": vs_full_val["diff"],
                       "gain_val_se": vs_full_val["se"], "gain_crossed": crossed["diff"],
                       "gain_crossed_se": crossed["se"],
                       "random_robust": float(fe["random_k"]["robust"][k_best]), "random_robust_se": random_se,
                       "random_clean": float(fe["random_k"]["clean"][k_best]),
                       "last_k": int(ks[-1]), "last_robust": float(rf["robust"][-1]),
                       "last_minus_spot": returns["diff"], "last_minus_spot_se": returns["se"],
                       "last_clean": float(rf["clean"][-1])},
    }


def claims(analysis: dict, profile) -> list[Claim]:
    """Chapter 7's claims about its run (thresholds written for ``quick``; asserted only there)."""
    wd, km, fe, ss = analysis["widest"], analysis["kernel_machine"], analysis["features"], analysis["sweet_spot"]
    lin_w, lin_n, cos_w = wd["cos_lin"], analysis["narrowest"]["cos_lin"], wd["cos"]
    tr, cmin = analysis["transfer"], analysis["clean_min"]
    return [
        compare("kernel_error_falls", "The distance of the empirical NTK at initialisation to the closed form "
                f"(mean over {analysis.get('kernel_inits', 1)} initialisations per width) falls with every increase of "
                "the width (largest change from one width to the next)",
                analysis["kernel_error_largest_step"], "<", 0),
        compare("kernel_error_slope", "It falls like m^(-1/2), the rate of an average of m independent units: "
                "|log-log slope + 1/2|", abs(analysis["kernel_error_slope"] + 0.5), "<", 0.15),
        compare("kernel_error_widest", "At the widest probe net the empirical NTK is within 5% of the closed form "
                "(relative Frobenius distance)", analysis["kernel_rel_error_widest"], "<", 0.05),
        compare("predictor_agreement", "The kernel predictors of the widest net's empirical NTK and of the closed "
                "form agree on the test images (fraction)", analysis["predictor"]["agreement"], ">=", 0.95),
        all_of("kernel_attack_transfers", f"Every widest net is accurate (clean >= {cmin}) and the kernel's FGSM, "
               "computed without any network, leaves it at least 5 points less accurate than its own FGSM, its own "
               "PGD, and the FGSM and PGD of a net of the same width from another seed (paired differences, "
               "kernel minus the other attack)",
               [compare(f"seed{i}_clean", "", c, ">=", cmin) for i, c in enumerate(wd["clean"])]
               + [compare(f"seed{i}_vs_{other}", "", t[other]["diff"], "<", -0.05) for i, t in enumerate(tr)
                  for other in ("own_fgsm", "own_pgd", "surrogate_fgsm", "surrogate_pgd")]),
        all_of("kernel_attack_beats_noise", "The kernel's FGSM costs every widest net more than 20 points beyond "
               "a random +-eps step of the same size (kernel minus random, paired)",
               [compare(f"seed{i}", "", t["random_sign"]["diff"], "<", -0.20) for i, t in enumerate(tr)]),
        compare("lazy_alignment_grows", "The linearisation's input gradient aligns better with the kernel's at the "
                "widest width than at the narrowest, for every seed (worst widest seed against the best narrowest)",
                min(lin_w), ">", max(lin_n)),
        compare("lazy_is_frozen_gate", "At the widest width the linearisation's input gradient is closer to the "
                "frozen-gate kernel gradient than to the kernel's own, for every seed (smallest difference of the "
                "two cosines)", min(f - c for f, c in zip(wd["cos_frozen"], lin_w)), ">", 0),
        compare("full_alignment_falls", "The full input gradients align worse with the kernel's at the widest width "
                "than at the narrowest, for every seed (worst narrowest seed minus best widest)",
                analysis["full_alignment_gap"], ">", 0.1),
        compare("strong_alignment_widest", "Tsilivis and Kempe's 'very strong alignment of loss gradients' at the "
                "widest width (mean cosine of the full gradients); an observation", sum(cos_w) / len(cos_w), ">=", 0.9,
                profiles=()),
        compare("robustness_peaks_early", f"Along gradient descent the kernel predictor's FGSM accuracy, at its peak "
                f"among the steps with clean accuracy >= {cmin}, is above its final one by more than 2 paired SE "
                "(z); an observation", km["drop_z"], ">", 2, profiles=()),
        compare("clean_keeps_rising", "The kernel predictor's clean accuracy at the end is above its clean accuracy at "
                "that peak (end minus peak); an observation", km["end_clean"] - km["clean_at_peak"], ">", 0,
                profiles=()),
        all_of("robustness_at_the_top", "The robustness of the eigen-features falls with the eigen-index (Spearman "
               "rank correlation below -0.5), faster than their usefulness (robustness's correlation minus "
               "usefulness's below -0.3)",
               [compare("spearman", "", fe["spearman"], "<", -0.5),
                compare("vs_usefulness", "", fe["spearman"] - fe["usefulness_spearman"], "<", -0.3)]),
        compare("no_feature_robust_alone", "No single eigen-feature is robust above chance (features whose FGSM "
                "accuracy is 2 binomial SE above 0.5, on the validation images); an observation",
                fe["n_above_chance"], "<", 1, profiles=()),
        all_of("sweet_spot_robust", f"The kernel of the most robust features (their number chosen on the validation "
               f"images among those with clean accuracy >= {cmin}) is accurate (test clean >= {cmin}), robust above "
               "the best constant predictor and above as many random eigen-features, and more than 10 points more "
               "robust than the full kernel (paired difference, cross-fitted on all the held-out images: the mean "
               "of the gain on the test images with the number chosen on the validation images and of the gain on "
               "the validation images with the number chosen on the test images)",
               [compare("clean", "", ss["clean"], ">=", cmin),
                compare("vs_constant", "", ss["robust"], ">", fe["best_constant"]),
                compare("vs_random", "", ss["robust"], ">", ss["random_robust"] + 0.10),
                compare("vs_full", "", ss["gain_crossed"], ">", 0.10)]),
        compare("sweet_spot_costs_accuracy", "At that number of features the robust features cost clean accuracy "
                "(full kernel minus sweet spot, clean); an observation", fe["full_clean"] - ss["clean"], ">", 0,
                profiles=()),
        compare("vulnerability_returns", "Adding the less robust features brings the vulnerability back: robust "
                "accuracy at the largest number of features more than 5 points below the sweet spot",
                ss["last_robust"], "<", ss["robust"] - 0.05),
    ]


def _z(distance: float, se: float) -> float:
    """``distance / se``, signed (positive where the claim holds); +-inf for a zero SE."""
    if se > 0 or se != se:            # (a NaN SE gives NaN)
        return distance / se
    return math.inf if distance > 0 else -math.inf if distance < 0 else math.nan


def _binomial_margin(value: float, threshold: float, n: int) -> float:
    """How many binomial SE an accuracy lies above a threshold (the larger of the SEs at the value
    and at the threshold: at an accuracy of 1 the SE at the value is 0)."""
    from ntklab.claims import binomial_se

    se = max(binomial_se(value, n), binomial_se(min(max(threshold, 0.0), 1.0), n))
    return _z(value - threshold, se)


def _seed_margin(distance: float, *groups) -> float:
    """A distance over the seed-to-seed spread: the standard deviations (ddof 1) of ``groups``
    (lists over seeds) added in quadrature."""
    return _z(distance, math.sqrt(sum(statistics.variance(g) for g in groups if len(g) > 1)))


def margins(analysis: dict) -> dict:
    """Each asserted claim's distance from its threshold in standard errors, positive where it
    holds (for a claim made of parts, the smallest over its parts):

    * the kernel's distance to the closed form: its spread over the ``kernel_inits``
      initialisations of each width (``kernel_rel_error_se``), carried into the log-log slope;
    * accuracies and agreement: binomial on the test images (the larger of the SEs at the value and
      at the threshold); paired differences on the same test images: their paired SE;
    * the alignments: the seed-to-seed spread of the cosines (three initialisations per width);
    * the Spearman correlations: a bootstrap over the eigen-features (200 resamples);
    * the random-feature baseline: its draw-to-draw spread and the binomial SE of the sweet spot.
    """
    import numpy as np

    from ntklab.claims import binomial_se, bootstrap

    a, n = analysis, analysis["n_test"]
    cmin, wd, nw, fe, ss = a["clean_min"], a["widest"], a["narrowest"], a["features"], a["sweet_spot"]
    errors, se = a["kernel_rel_error"], a["kernel_rel_error_se"]
    steps = [_z(e1 - e2, math.hypot(s1, s2)) for e1, e2, s1, s2 in zip(errors, errors[1:], se, se[1:])]
    out = {"kernel_error_falls": min(steps) if steps else math.nan,
           "kernel_error_slope": _z(0.15 - abs(a["kernel_error_slope"] + 0.5), a["kernel_error_slope_se"]),
           "kernel_error_widest": _z(0.05 - a["kernel_rel_error_widest"], se[-1]),
           "predictor_agreement": _binomial_margin(a["predictor"]["agreement"], 0.95, n)}
    out["kernel_attack_transfers"] = min(
        [_binomial_margin(c, cmin, n) for c in wd["clean"]]
        + [_z(-0.05 - t[o]["diff"], t[o]["se"]) for t in a["transfer"]
           for o in ("own_fgsm", "own_pgd", "surrogate_fgsm", "surrogate_pgd")])
    out["kernel_attack_beats_noise"] = min(_z(-0.20 - t["random_sign"]["diff"], t["random_sign"]["se"])
                                           for t in a["transfer"])
    out["lazy_alignment_grows"] = _seed_margin(min(wd["cos_lin"]) - max(nw["cos_lin"]), wd["cos_lin"], nw["cos_lin"])
    gaps = [f - c for f, c in zip(wd["cos_frozen"], wd["cos_lin"])]
    out["lazy_is_frozen_gate"] = _seed_margin(min(gaps), gaps)
    out["full_alignment_falls"] = _seed_margin(a["full_alignment_gap"] - 0.1, nw["cos"], wd["cos"])
    rob, use = np.asarray(fe["robustness"]), np.asarray(fe["usefulness"])

    def rhos(idx):
        r, u = _spearman(idx, rob[idx]), _spearman(idx, use[idx])
        return [r, r - u]

    boot = bootstrap(rhos, len(rob), draws=200, seed=0)["se"]
    out["robustness_at_the_top"] = min(_z(-0.5 - fe["spearman"], float(boot[0])),
                                       _z(-0.3 - (fe["spearman"] - fe["usefulness_spearman"]), float(boot[1])))
    se_spot = binomial_se(ss["robust"], n)
    out["sweet_spot_robust"] = min(
        _binomial_margin(ss["clean"], cmin, n),
        _binomial_margin(ss["robust"], fe["best_constant"], n),
        _z(ss["robust"] - ss["random_robust"] - 0.10, math.hypot(se_spot, ss["random_robust_se"])),
        _z(ss["gain_crossed"] - 0.10, ss["gain_crossed_se"]))
    out["vulnerability_returns"] = _z(-0.05 - ss["last_minus_spot"], ss["last_minus_spot_se"])
    return out


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


def _hits(model, x, y, x_adv=None) -> list[int]:
    """Per image, 1 where ``model`` is right on ``x`` and (if given) on ``x_adv`` too, else 0."""
    import torch

    with torch.no_grad():
        ok = model(x).argmax(1) == y
        if x_adv is not None:
            ok &= model(x_adv).argmax(1) == y
    return [int(v) for v in ok.tolist()]


def _random_sign(x, eps: float, seed: int):
    """``x`` moved by ``eps`` times a random sign per pixel (seeded), clipped to [0, 1]: the
    attack-free baseline of a signed step."""
    import torch

    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, x.shape, generator=g).to(x.device, x.dtype) * 2 - 1
    return (x + eps * signs).clamp(0, 1)


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
        # the held-out images of the final attacks on the nets: test and validation images (neither
        # trains the nets nor the kernel; the validation images choose only part 3's number of features)
        self.Xe, self.ye = torch.cat([self.Xt, self.Xv]), torch.cat([self.yt, self.yv])
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
    rel_error = []                       # per width, per initialisation (the first from the profile's seed)
    for width in config["kernel_widths"]:
        rel_error.append([])
        for j in range(config.get("kernel_inits", 1)):
            seed = task.seed if j == 0 else 10_000 * (task.seed + 1) + j
            K_emp = ntk.empirical_ntk(task.net(width, seed), X[:n_probe], kind="logit", logit=0).double()
            rel_error[-1].append(float((K_emp - K_probe).norm() / K_probe.norm()))
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


def _kernel_path(task: _Task, config) -> tuple[dict, dict, dict]:
    """Part 2, the kernel side: the kernel predictor after each of the ``times``, with its FGSM
    examples, its input gradients on the test images and the input gradients of the same predictor
    with frozen gates (``{t: (predictor, x_fgsm, grad, grad_frozen)}``); per time its clean and FGSM
    accuracy, the per-image FGSM hits and the mean cosine of the frozen-gate gradient with the
    kernel's (``cos_frozen``); at the end its FGSM and PGD examples of the held-out images ``Xe``
    (``{"fgsm", "pgd"}``)."""
    import functools

    import torch.nn.functional as F

    from ntklab import attacks, kernels

    Xt, yt, eps = task.Xt, task.yt, config["eps"]
    frozen_fn = functools.partial(task.kernel_fn, frozen_gates=True)
    kern = {}
    for t in config["times"]:
        alpha = kernels.regression_weights(task.K, task.Y, lr=task.lr, steps=t)
        P = kernels.KernelPredictor(task.kernel_fn, task.X, alpha).to(task.device)
        P_frozen = kernels.KernelPredictor(frozen_fn, task.X, alpha).to(task.device)
        kern[t] = (P, attacks.fgsm(P, Xt, yt, eps=eps), _loss_grad(P, Xt, yt), _loss_grad(P_frozen, Xt, yt))
    P_end = kern[config["steps"]][0]
    x_kernel = {"fgsm": attacks.fgsm(P_end, task.Xe, task.ye, eps=eps),
                "pgd": attacks.pgd(P_end, task.Xe, task.ye, eps=eps, steps=config["pgd_steps"])}
    hits = [_hits(kern[t][0], Xt, yt, kern[t][1]) for t in config["times"]]
    kernel_times = {"clean": [_acc(kern[t][0], Xt, yt) for t in config["times"]],
                    "fgsm": [sum(h) / len(h) for h in hits], "fgsm_hits": hits,
                    "cos_frozen": [float(F.cosine_similarity(kern[t][3], kern[t][2], dim=1).mean())
                                   for t in config["times"]]}
    return kern, kernel_times, x_kernel


def _train_net(task: _Task, config, net, kern: dict, x_kernel: dict, seed: int) -> tuple[dict, dict]:
    """Part 2, one net: full-batch gradient descent on the centred squared loss at the kernel's
    rate; at each of the kernel's times the input-gradient alignments and accuracies (see
    :func:`run`); at the end PGD (its own and the kernel's), a random-sign step (seeded by
    ``seed``) and the per-image hits of every attack. Returns the record and, for the surrogate
    comparison, ``{"model", "fgsm", "pgd"}`` (the centred net and its own final attacks)."""
    import torch
    import torch.nn.functional as F

    from ntklab import attacks
    from ntklab.linearize import Centered, Linearized

    X, Y, Xt, yt, n, eps = task.X, task.Y, task.Xt, task.yt, task.n, config["eps"]
    model = Centered(net).eval()           # (no BN or dropout: the mode changes nothing)
    lin = Linearized(net, centered=True).eval()   # around the initialisation
    f0 = model.reference(X).detach()
    opt = torch.optim.SGD(net.parameters(), lr=task.lr)
    rec = {k: [] for k in ("cos", "cos_lin", "cos_frozen", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm")}
    for step in range(1, config["steps"] + 1):
        opt.zero_grad(set_to_none=True)
        # the centred loss: the net learns f - f0, as the kernel predictor (started at 0) does
        loss = ((net(X) - f0 - Y.float()) ** 2).sum() / (2 * n)
        loss.backward()
        opt.step()
        if step in kern:
            P, x_k, g_k, g_frozen = kern[step]
            with torch.no_grad():
                for th, p in zip(lin.theta, net.parameters()):
                    th.copy_(p)
            g_net, g_lin = _loss_grad(model, Xt, yt), _loss_grad(lin, Xt, yt)
            rec["cos"].append(float(F.cosine_similarity(g_net, g_k, dim=1).mean()))
            rec["cos_lin"].append(float(F.cosine_similarity(g_lin, g_k, dim=1).mean()))
            rec["cos_frozen"].append(float(F.cosine_similarity(g_lin, g_frozen, dim=1).mean()))
            rec["flip_ratio"].append(float((g_net - g_lin).norm(dim=1).mean() / g_lin.norm(dim=1).mean()))
            rec["clean"].append(_acc(model, Xt, yt))
            rec["own_fgsm"].append(_robust_acc(model, Xt, yt, eps))
            rec["kernel_fgsm"].append(_robust_acc(model, Xt, yt, eps, x_k))
    Xe, ye = task.Xe, task.ye             # the final attacks: on the held-out images
    x_own_fgsm = attacks.fgsm(model, Xe, ye, eps=eps)
    x_own_pgd = attacks.pgd(model, Xe, ye, eps=eps, steps=config["pgd_steps"])
    hits = {"clean": _hits(model, Xe, ye), "own_fgsm": _hits(model, Xe, ye, x_own_fgsm),
            "own_pgd": _hits(model, Xe, ye, x_own_pgd), "kernel_fgsm": _hits(model, Xe, ye, x_kernel["fgsm"]),
            "kernel_pgd": _hits(model, Xe, ye, x_kernel["pgd"]),
            "random_sign": _hits(model, Xe, ye, _random_sign(Xe, eps, seed))}
    rec["hits"] = hits
    for key in ("own_pgd", "kernel_pgd", "random_sign"):
        rec[key] = sum(hits[key]) / len(ye)
    rec["final_loss"] = loss.item()
    return rec, {"model": model, "fgsm": x_own_fgsm, "pgd": x_own_pgd}


def _surrogates(task: _Task, recs: list, nets: list) -> None:
    """Each net attacked by the FGSM and PGD examples of the next net of the same width (another
    initialisation, trained the same way): ``surrogate_fgsm``, ``surrogate_pgd`` and their hits,
    added to ``recs`` in place."""
    Xt, yt = task.Xe, task.ye                 # the held-out images of the final attacks
    for i, (rec, own) in enumerate(zip(recs, nets)):
        other = nets[(i + 1) % len(nets)]
        for key in ("fgsm", "pgd"):
            h = _hits(own["model"], Xt, yt, other[key])
            rec["hits"][f"surrogate_{key}"] = h
            rec[f"surrogate_{key}"] = sum(h) / len(yt)


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
    Xv, yv = task.Xv, task.yv
    with torch.no_grad():          # the kernel of the validation images, once for every feature's clean prediction
        Kv = full.kernel_fn(Xv.to(full.X.dtype), full.X)
    usefulness, robustness = [], []
    for i in range(q):
        P = full.with_alpha(alphas[i])
        x_adv = attacks.fgsm(P, Xv, yv, eps=eps)
        with torch.no_grad():
            right = (Kv @ P.alpha).argmax(1) == yv
            right_adv = right & (P(x_adv).argmax(1) == yv)
        usefulness.append(int(right.sum()) / len(yv))
        robustness.append(int(right_adv.sum()) / len(yv))
    rho = spearmanr(list(range(q)), robustness).statistic
    x_img = Xt[:1]
    grads = []
    for i in range(min(config["n_gradient_features"], q)):
        xg = x_img.clone().requires_grad_(True)
        out = full.with_alpha(alphas[i])(xg)
        (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xg)
        grads.append(g[0])
    import numpy as np

    x_full_fgsm = attacks.fgsm(full, Xt, yt, eps=eps)
    order_r = sorted(range(q), key=lambda i: (-robustness[i], i))
    order_u = sorted(range(q), key=lambda i: (-usefulness[i], i))
    ks = [k for k in config["ks"] if k <= q]
    seqs = {}
    for name, order in (("robust_first", order_r), ("useful_first", order_u)):
        rows = {"clean": [], "robust": [], "transfer": [], "robust_hits": [], "val_clean": [], "val_robust": [],
                "val_robust_hits": []}
        for k in ks:
            P = full.with_alpha(alphas[order[:k]].sum(0))
            rows["clean"].append(_acc(P, Xt, yt))
            rows["robust_hits"].append(_hits(P, Xt, yt, attacks.fgsm(P, Xt, yt, eps=eps)))
            rows["robust"].append(sum(rows["robust_hits"][-1]) / len(yt))
            rows["transfer"].append(_robust_acc(P, Xt, yt, eps, x_full_fgsm))
            if name == "robust_first":     # the number of features is chosen on the validation images
                rows["val_clean"].append(_acc(P, task.Xv, task.yv))
                rows["val_robust_hits"].append(_hits(P, Xv, yv, attacks.fgsm(P, Xv, yv, eps=eps)))
                rows["val_robust"].append(sum(rows["val_robust_hits"][-1]) / len(yv))
        seqs[name] = rows
    # the baseline of k eigen-features drawn at random among the first q
    rng = np.random.default_rng(task.seed)
    draws = config["random_subsets"]
    rand = {"clean": [], "robust": [], "robust_draws": []}
    for k in ks:
        c, r = 0.0, []
        for _ in range(draws):
            P = full.with_alpha(alphas[torch.as_tensor(rng.choice(q, size=k, replace=False))].sum(0))
            c += _acc(P, Xt, yt) / draws
            r.append(_robust_acc(P, Xt, yt, eps))
        rand["clean"].append(c)
        rand["robust"].append(sum(r) / draws)
        rand["robust_draws"].append(r)
    full_hits = _hits(full, Xt, yt, x_full_fgsm)
    full_val_hits = _hits(full, Xv, yv, attacks.fgsm(full, Xv, yv, eps=eps))
    return {"eigenvalues": eigenvalues[:q].float(), "usefulness": usefulness, "robustness": robustness,
            "spearman": float(rho) if math.isfinite(rho) else 0.0, "grad_images": torch.stack(grads).cpu(),
            "grad_image_x": x_img[0].cpu(), "grad_image_y": int(yt[0]), "ks": ks, **seqs,
            "random_k": rand, "best_constant": max(float((yt == c).double().mean()) for c in (0, 1)),
            "full": {"clean": _acc(full, Xt, yt), "robust": sum(full_hits) / len(yt), "robust_hits": full_hits,
                     "val_robust_hits": full_val_hits},
            "ridge": ridge}


def _compute(profile, config, device, progress) -> dict:
    from ntklab.config import seed_everything

    start = time.perf_counter()
    seed_everything(profile.seed)
    task = _Task(profile, config, device)
    n_probe = min(profile.n_probe, task.n)
    rel_error, pred = _kernel_limit(task, config, n_probe)
    kern, kernel_times, x_kernel = _kernel_path(task, config)
    nets = {}
    runs = [(w, s) for w in config["widths"] for s in range(config["net_seeds"])]
    trained = {}
    for width, s in _progress.bar(progress, runs, desc="two-layer nets"):
        seed = 1000 * (profile.seed + 1) + s
        rec, own = _train_net(task, config, task.net(width, seed), kern, x_kernel, seed)
        nets.setdefault(str(width), []).append(rec)
        trained.setdefault(str(width), []).append(own)
    for width in nets:
        _surrogates(task, nets[width], trained[width])
    features = _eigen_features(task, config)
    return {"config": config, "lr": task.lr, "lambda_max": task.lam_max, "n_kernel": task.n, "n_val": len(task.yv),
            "n_test": len(task.yt), "n_heldout": len(task.ye), "kernel_widths": list(config["kernel_widths"]),
            "kernel_rel_error": [sum(e) / len(e) for e in rel_error], "kernel_rel_error_inits": rel_error,
            "n_probe": n_probe, "predictor": pred, "times": list(config["times"]), "kernel_times": kernel_times,
            "nets": nets, "features": features, "compute_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ plan
def plan(profile) -> list:
    """The runs of :func:`run` under ``profile`` (:func:`ntklab.plan.plan`), from :class:`Settings`:
    ``net_seeds`` TwoLayerNets of each of ``widths``, trained by full-batch gradient descent for
    ``steps`` steps on the pair's kernel images (an epoch per step; a pass of a two-layer net costs
    its multiply-accumulates relative to the profile's model), with the comparisons at ``times``
    (gradients of the net, its linearisation and the kernel on the test images, an estimate) and the
    final attacks (on the test and validation images); and the kernels: the empirical NTK of
    ``kernel_inits`` nets of each of ``kernel_widths`` on ``n_probe`` images, and of the widest net on
    the kernel images and against the test images. The closed-form
    NTK and the eigen-features are linear algebra, left out."""
    import importlib

    P = importlib.import_module("ntklab.plan")   # not an import statement: see strategies.plan
    from ntklab import data

    s = Settings.for_profile(profile)
    info = data.info(profile.dataset)
    d, classes = info["channels"] * info["image_size"] ** 2, info["num_classes"]
    n_pair = round(P.train_size(profile) * 2 / classes)            # class-balanced data sets: an estimate
    n = min(n_pair - 1, max(2, round(s.kernel_fraction * n_pair)))
    n_test = round(P.test_size(profile) * 2 / classes)
    n_probe = min(profile.n_probe, n)

    def cost(width):
        return P.relative_cost(None, profile, macs=d * width + 2 * width)

    runs = []
    for width in s.widths:
        for seed in range(s.net_seeds):
            evaluation = len(s.times) * n_test * 6 + (n_test + n_pair - n) * (4 + 2 * s.pgd_steps)
            runs.append(P.training_run(NAME, f"two-layer net, width {width}, init {seed}", profile, "normal",
                                       epochs=s.steps, n_train=n, eval_passes=evaluation, pass_cost=cost(width),
                                       model="two_layer_net", width=width, batch_size=n, eps=s.eps,
                                       note="full-batch gradient descent, one epoch per step"))
    widest = max(s.widths)
    runs.append(P.training_run(NAME, "empirical NTKs at initialisation", profile, "normal", epochs=0, n_train=n,
                               kernel_images=[n_probe] * (len(s.kernel_widths) * s.kernel_inits), model="two_layer_net",
                               pass_cost=cost(max(s.kernel_widths)), width=max(s.kernel_widths)))
    runs.append(P.training_run(NAME, "empirical NTK of the widest net (kernel and test images)", profile, "normal",
                               epochs=0, n_train=n, kernel_images=[n, round((n * n_test) ** 0.5)],
                               model="two_layer_net", pass_cost=cost(widest), width=widest))
    return runs
