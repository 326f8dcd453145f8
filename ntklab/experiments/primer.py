"""Chapter 1 (Primer): the numbers the chapter discusses and its claims.

The Primer computes by hand on purpose: it writes the empirical NTK, a training loop and FGSM out
in a few lines of PyTorch next to the ``ntklab`` functions that do the same work, so it has no
registered experiment and no cached result. The notebook hands what it computed to
:func:`analyse`, and :func:`claims` turns the analysis into the chapter's claims:

    >>> analysis = primer.analyse({"K_init": K_init, "K_default": K_default, "K_trained": K_trained,
    ...                            "probe_x": probe_x, "labels": probe_y, "clean_acc": clean_acc,
    ...                            "fgsm_delta": x_hand - x_test, "eps": eps_grid,
    ...                            "correct_fgsm": correct_fgsm, "correct_pgd": correct_pgd})
    >>> ntklab.claims.check(primer.claims(analysis, profile), profile)

What the chapter also relies on but no run can make false (the NTK is a symmetric positive
semi-definite Gram matrix; adversarial examples stay within eps and in [0, 1]; the by-hand kernel
and FGSM agree with the package's) is checked by unit tests (``tests/test_primer.py``,
``tests/test_ntk.py``, ``tests/test_attacks.py``), not by claims.
"""
from __future__ import annotations

import math

import torch

from ntklab.claims import binomial_se, compare, paired_difference
from ntklab.config import PROFILES
from ntklab.data import SYNTHETIC
from ntklab.metrics import kernel_distance

__all__ = ["analyse", "claims", "within_over_between", "normalise_kernel", "pixel_gram", "pair_correlation",
           "bootstrap_pair_correlations", "perturbation_fractions", "ATTACK_EPS", "ASSERTED_UNDER", "N_BOOT"]

ATTACK_EPS = 0.1                      # the budget of the chapter's FGSM claim
# The Primer's computation does not depend on the profile's sizes (width 4, 2 epochs, the profile's
# data set), and its notebook asserts its claims under every profile of real images: not under the
# dry run's (paper_cpu), whose generated data the claims say nothing about.
ASSERTED_UNDER = tuple(n for n, p in PROFILES.items() if p.dataset not in SYNTHETIC)
N_BOOT = 1000                         # bootstrap resamples of the probe images
PIXEL_CORR_MIN = 0.3                  # the pixel-similarity observation: r(K_init, pixel cosine) above this


def within_over_between(K, labels) -> float:
    """Mean kernel value over pairs of the same class (self-pairs left out) divided by the mean over
    pairs of different classes, for an (n, n) kernel ``K`` and (n,) integer ``labels``."""
    K, labels = torch.as_tensor(K), torch.as_tensor(labels)
    if K.dim() != 2 or K.shape[0] != K.shape[1] or labels.shape != (K.shape[0],):
        raise ValueError(f"K must be (n, n) and labels (n,); got {tuple(K.shape)} and {tuple(labels.shape)}")
    labels = labels.to(K.device)
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(labels), dtype=torch.bool, device=K.device)
    if not (same & off_diag).any() or same.all():
        raise ValueError("labels need two examples of one class and two different classes")
    return float(K[same & off_diag].mean() / K[~same].mean())


def normalise_kernel(K) -> torch.Tensor:
    """The cosine kernel K_ij / sqrt(K_ii K_jj) of an (n, n) kernel with a positive diagonal (its
    diagonal is 1): the angle between two inputs' gradients, with their lengths divided out."""
    K = torch.as_tensor(K)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be (n, n); got {tuple(K.shape)}")
    d = K.diagonal()
    if not bool((d > 0).all()):
        raise ValueError("normalise_kernel needs a positive diagonal")
    d = d.sqrt()
    return K / d[:, None] / d[None, :]


def pixel_gram(x) -> torch.Tensor:
    """The Gram matrix X X^T of the images ``x`` (n, ...) flattened to pixel vectors, in float64:
    normalised (:func:`normalise_kernel`), the cosine similarity of two images pixel by pixel."""
    X = torch.as_tensor(x).flatten(1).double()
    return X @ X.T


def _pairs(n: int):
    return torch.triu_indices(n, n, 1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension (a, b: (..., m))."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def pair_correlation(A, B) -> float:
    """Pearson correlation of two (n, n) symmetric matrices over their off-diagonal pairs (i < j):
    how alike two kernels are as similarity measures, whatever their scale and constant offset."""
    A, B = torch.as_tensor(A).double(), torch.as_tensor(B).double()
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape != B.shape or A.shape[0] < 3:
        raise ValueError(f"A and B must be (n, n) with n >= 3 and equal shapes; got {tuple(A.shape)}, {tuple(B.shape)}")
    i, j = _pairs(A.shape[0])
    return float(_pearson(A[i, j], B[i, j]))


def bootstrap_pair_correlations(pairs: dict, *, n_boot: int = N_BOOT, seed: int = 0) -> torch.Tensor:
    """Bootstrap over the probe images of several :func:`pair_correlation` values at once, so that
    differences between them are paired.

    pairs: name -> (A, B), every matrix (n, n) over the same n images. Each resample draws n images
    with replacement and correlates A and B over the pairs of its positions that hold two different
    images (a pair of an image with its own copy is a diagonal entry, not a pair). Returns an
    (n_boot, len(pairs)) float64 tensor, columns in the order of ``pairs``.
    """
    mats = [(torch.as_tensor(A).double(), torch.as_tensor(B).double()) for A, B in pairs.values()]
    n = mats[0][0].shape[0]
    if any(M.shape != (n, n) for AB in mats for M in AB) or n < 3:
        raise ValueError("every matrix must be (n, n) over the same n >= 3 images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    i, j = _pairs(n)
    a, b = idx[:, i], idx[:, j]                        # (n_boot, m): the images of each pair
    keep = (a != b).double()
    out = torch.empty(n_boot, len(mats), dtype=torch.float64)
    for c, (A, B) in enumerate(mats):
        u, v = A[a, b], B[a, b]
        w = keep / keep.sum(1, keepdim=True)           # weighted Pearson: weight 0 drops a pair
        u = u - (w * u).sum(1, keepdim=True)
        v = v - (w * v).sum(1, keepdim=True)
        out[:, c] = (w * u * v).sum(1) / ((w * u * u).sum(1) * (w * v * v).sum(1)).sqrt()
    return out


def perturbation_fractions(delta, eps: float, *, atol: float = 1e-6) -> dict:
    """Fractions of the entries of a perturbation ``delta`` (x_adv - x) equal to +eps, 0 and -eps
    (within ``atol``), and of the rest (``"other"``: cut short by the clipping to [0, 1])."""
    d = torch.as_tensor(delta).double().flatten()
    if d.numel() == 0 or eps <= 0:
        raise ValueError("delta must be non-empty and eps positive")
    plus, zero, minus = ((d - v).abs() <= atol for v in (eps, 0.0, -eps))
    return {"plus": float(plus.double().mean()), "zero": float(zero.double().mean()),
            "minus": float(minus.double().mean()), "other": float((~(plus | zero | minus)).double().mean())}


def analyse(values: dict, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The numbers the Primer discusses, from what its notebook computed.

    ``values``: ``K_init`` (the (n, n) trace kernel of the probe at initialisation, i.e. after a
    statistics-only pass over the training data: ``ntklab.bn.refresh_bn_statistics``),
    ``K_default`` (the same network with PyTorch's default BN buffers), ``K_trained`` (after
    training), ``probe_x`` (the probe images) and ``labels`` ((n,) labels), ``clean_acc`` (test
    accuracy after training), ``fgsm_delta`` (the FGSM perturbation of
    the test images at :data:`ATTACK_EPS`), ``eps`` (the budgets of the sweep, including
    :data:`ATTACK_EPS`), ``correct_fgsm`` and ``correct_pgd`` ((len(eps), n_test) booleans: test
    image j classified correctly under each attack at eps[i]).

    Returns floats:

    * kernels: ``ratio_init``, ``ratio_trained`` (:func:`within_over_between` of the raw kernels),
      ``scale_growth`` (mean diagonal after training over at initialisation); ``kd_default`` and
      ``kd_default_centred`` (kernel distance between the default-buffer and the initial kernel),
      ``default_scale`` (mean diagonal of the initial kernel over the default-buffer one);
    * class structure of the normalised kernels (:func:`normalise_kernel`): ``class_corr_init``,
      ``class_corr_trained`` (:func:`pair_correlation` with the same-class indicator, a centred
      and scale-free within/between contrast), ``class_corr_pixels`` (of the pixel cosine),
      ``class_corr_gain`` (trained minus init), its bootstrap standard error ``class_corr_gain_se``
      and ``class_corr_gain_low`` (gain minus two standard errors);
    * pixel similarity: ``pixel_corr_init``, ``pixel_corr_trained`` and ``pixel_corr_default``
      (:func:`pair_correlation` of each normalised kernel with the pixel cosine), ``pixel_corr_shuffled``
      (the control: init against the pixel cosine of the images in another order, mean over 20
      orders), ``pixel_corr_init_se`` (bootstrap) and ``pixel_corr_init_low`` (minus two SE),
      ``pixel_corr_change`` (trained minus init), its ``pixel_corr_change_se`` and
      ``pixel_corr_change_high`` (plus two SE);
    * FGSM's perturbation at :data:`ATTACK_EPS`: ``fgsm_plus``, ``fgsm_zero``, ``fgsm_minus``,
      ``fgsm_other`` (:func:`perturbation_fractions`);
    * accuracies: ``clean_acc`` and its binomial ``clean_acc_se``, ``attack_eps``, ``fgsm_at_attack_eps`` and ``pgd_at_attack_eps``,
      ``fgsm_cost`` (clean minus FGSM there) and ``fgsm_cost_se``, ``pgd_excess`` (the largest
      amount, over eps > 0, by which PGD's accuracy exceeds FGSM's; negative when PGD is stronger at
      every eps > 0) and ``pgd_excess_se`` at that eps, ``fgsm_at_max_eps``, ``pgd_at_max_eps``,
      ``max_eps``, ``n_test``. The SE of a difference of two accuracies on the same images is
      paired (:func:`ntklab.claims.paired_difference`); ``fgsm_cost_se`` pairs FGSM with the eps = 0 row when the sweep
      has one, else treats the two accuracies as independent binomials.

    Raises ``ValueError`` for lists of different lengths, an ``eps`` without :data:`ATTACK_EPS` or
    without a positive budget.
    """
    eps = list(map(float, values["eps"]))
    hit_fgsm, hit_pgd = (torch.as_tensor(values[k]).cpu().double() for k in ("correct_fgsm", "correct_pgd"))
    if (hit_fgsm.dim() != 2 or hit_fgsm.shape != hit_pgd.shape or hit_fgsm.shape[0] != len(eps) or not eps
            or hit_fgsm.shape[1] < 1):
        raise ValueError(f"correct_fgsm and correct_pgd must be (len(eps), n_test) with one row per eps; got "
                         f"{tuple(hit_fgsm.shape)}, {tuple(hit_pgd.shape)} for {len(eps)} eps")
    acc_fgsm, acc_pgd = hit_fgsm.mean(1).tolist(), hit_pgd.mean(1).tolist()
    at = [i for i, e in enumerate(eps) if math.isclose(e, ATTACK_EPS, rel_tol=1e-9)]
    if not at:
        raise ValueError(f"eps must include {ATTACK_EPS}; got {eps}")
    positive = [i for i, e in enumerate(eps) if e > 0]
    n_test = hit_fgsm.shape[1]
    K_init, K_default, K_trained = (torch.as_tensor(values[k]).double() for k in ("K_init", "K_default", "K_trained"))
    labels = torch.as_tensor(values["labels"]).cpu()
    G = pixel_gram(values["probe_x"]).cpu()
    N_init, N_default, N_trained, N_pixels = (normalise_kernel(K.cpu()) for K in (K_init, K_default, K_trained, G))
    same = (labels[:, None] == labels[None, :]).double()
    g = torch.Generator().manual_seed(seed)
    shuffled = [pair_correlation(N_init, N_pixels[p][:, p])
                for p in (torch.randperm(len(labels), generator=g) for _ in range(20))]
    boot = bootstrap_pair_correlations({"class_init": (N_init, same), "class_trained": (N_trained, same),
                                        "pixel_init": (N_init, N_pixels), "pixel_trained": (N_trained, N_pixels)},
                                       n_boot=n_boot, seed=seed)
    class_init, class_trained = pair_correlation(N_init, same), pair_correlation(N_trained, same)
    pixel_init, pixel_trained = pair_correlation(N_init, N_pixels), pair_correlation(N_trained, N_pixels)
    gain_se = float((boot[:, 1] - boot[:, 0]).std())
    pixel_se = float(boot[:, 2].std())
    fractions = perturbation_fractions(values["fgsm_delta"], ATTACK_EPS)

    clean_acc = float(values["clean_acc"])
    i, top = at[0], max(range(len(eps)), key=eps.__getitem__)
    excess_at = max(positive, key=lambda k: acc_pgd[k] - acc_fgsm[k]) if positive else i
    zero = [k for k, e in enumerate(eps) if e == 0]
    cost_se = (paired_difference(hit_fgsm[zero[0]], hit_fgsm[i])["se"] if zero else
               math.sqrt(binomial_se(clean_acc, n_test) ** 2 + binomial_se(acc_fgsm[i], n_test) ** 2))
    return {"ratio_init": within_over_between(K_init, labels), "ratio_trained": within_over_between(K_trained, labels),
            "scale_growth": float(K_trained.diag().mean() / K_init.diag().mean()),
            "kd_default": kernel_distance(K_default.cpu(), K_init.cpu()),
            "kd_default_centred": kernel_distance(K_default.cpu(), K_init.cpu(), center=True),
            "default_scale": float(K_init.diag().mean() / K_default.diag().mean()),
            "class_corr_init": class_init, "class_corr_trained": class_trained,
            "class_corr_pixels": pair_correlation(N_pixels, same),
            "class_corr_gain": class_trained - class_init, "class_corr_gain_se": gain_se,
            "class_corr_gain_low": class_trained - class_init - 2 * gain_se,
            "pixel_corr_init": pixel_init, "pixel_corr_trained": pixel_trained,
            "pixel_corr_default": pair_correlation(N_default, N_pixels),
            "pixel_corr_shuffled": sum(shuffled) / len(shuffled),
            "pixel_corr_init_se": pixel_se, "pixel_corr_init_low": pixel_init - 2 * pixel_se,
            "pixel_corr_change": pixel_trained - pixel_init,
            "pixel_corr_change_se": float((boot[:, 3] - boot[:, 2]).std()),
            "pixel_corr_change_high": pixel_trained - pixel_init + 2 * float((boot[:, 3] - boot[:, 2]).std()),
            **{f"fgsm_{k}": v for k, v in fractions.items()},
            "clean_acc": clean_acc, "clean_acc_se": binomial_se(clean_acc, n_test), "n_test": float(n_test),
            "attack_eps": ATTACK_EPS, "fgsm_at_attack_eps": acc_fgsm[i], "pgd_at_attack_eps": acc_pgd[i],
            "fgsm_cost": clean_acc - acc_fgsm[i], "fgsm_cost_se": cost_se,
            "pgd_excess": (acc_pgd[excess_at] - acc_fgsm[excess_at]) if positive else 0.0,
            "pgd_excess_se": paired_difference(hit_pgd[excess_at], hit_fgsm[excess_at])["se"],
            "max_eps": eps[top], "fgsm_at_max_eps": acc_fgsm[top], "pgd_at_max_eps": acc_pgd[top]}


def claims(analysis: dict, profile) -> list:
    """The Primer's claims about its run (asserted under every profile, as the chapter always did):
    training raises the class structure of the normalised kernel by more than two bootstrap
    standard errors; the trained network's clean test accuracy is above 0.8;
    FGSM at eps 0.1 costs it more than 20 points; PGD is at least as strong as FGSM (its accuracy
    at most 0.01 above FGSM's) at every eps of the sweep.

    Two observations, shown and not asserted: at initialisation the normalised kernel correlates
    with the pixel cosine (r above 0.3 by two standard errors: it held on seeds 0 and 1, not on
    seed 2, where r was 0.38 with a bootstrap SE of 0.06: the spread between initialisations, about
    0.1, is larger than the bootstrap SE over probe images); training does not lower that
    correlation (nothing in the physics says it must)."""
    P = ASSERTED_UNDER
    return [
        compare("kernel_reshaped", "training raises the class structure of the normalised kernel (correlation "
                "with 'same class', after minus before, minus two bootstrap SE)", analysis["class_corr_gain_low"],
                ">", 0, profiles=P),
        compare("pixel_similarity", f"at initialisation the normalised kernel correlates with the pixel cosine "
                f"(r minus two bootstrap SE above {PIXEL_CORR_MIN:g}; an observation)", analysis["pixel_corr_init_low"],
                ">", PIXEL_CORR_MIN, profiles=()),
        compare("pixel_kept", "training does not lower the kernel's correlation with the pixel cosine (change "
                "plus two bootstrap SE above 0; an observation)", analysis["pixel_corr_change_high"], ">", 0,
                profiles=()),
        compare("clean_acc", "the normally trained network's clean test accuracy is above 0.8",
                analysis["clean_acc"], ">", 0.8, profiles=P),
        compare("fgsm_cost", f"FGSM at eps {ATTACK_EPS:g} costs it more than 20 points of accuracy",
                analysis["fgsm_cost"], ">", 0.2, profiles=P),
        compare("pgd_stronger", "PGD is at least as strong as FGSM at every eps > 0 (largest excess of PGD's "
                "accuracy over FGSM's at most 0.01)", analysis["pgd_excess"], "<=", 0.01, profiles=P),
    ]
