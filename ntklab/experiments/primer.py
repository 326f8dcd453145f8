"""Chapter 1 (Primer): the numbers the chapter discusses and its claims.

The Primer computes by hand on purpose: it writes the empirical NTK, a training loop and FGSM out
in a few lines of PyTorch next to the ``ntklab`` functions that do the same work, so it has no
registered experiment and no cached result. The notebook hands what it computed to
:func:`analyse`, and :func:`claims` turns the analysis into the chapter's claims:

    >>> analysis = primer.analyse({"K_init": K_init, "K_trained": K_trained, "labels": probe_y,
    ...                            "clean_acc": clean_acc, "eps": eps_grid,
    ...                            "acc_fgsm": acc_fgsm, "acc_pgd": acc_pgd})
    >>> ntklab.claims.check(primer.claims(analysis, profile), profile)

What the chapter also relies on but no run can make false (the NTK is a symmetric positive
semi-definite Gram matrix; adversarial examples stay within eps and in [0, 1]; the by-hand kernel
and FGSM agree with the package's) is checked by unit tests (``tests/test_primer.py``,
``tests/test_ntk.py``, ``tests/test_attacks.py``), not by claims.
"""
from __future__ import annotations

import math

import torch

from ntklab.claims import compare
from ntklab.config import PROFILES

__all__ = ["analyse", "claims", "within_over_between", "ATTACK_EPS", "ASSERTED_UNDER"]

ATTACK_EPS = 0.1                      # the budget of the chapter's FGSM claim
# The Primer's computation does not depend on the profile's sizes (width 4, 2 epochs, the profile's
# data set), and its notebook asserts its claims under every profile.
ASSERTED_UNDER = tuple(PROFILES)


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


def analyse(values: dict) -> dict:
    """The numbers the Primer discusses, from what its notebook computed.

    ``values``: ``K_init`` and ``K_trained`` ((n, n) trace kernels of the probe before and after
    training), ``labels`` (the probe's (n,) labels), ``clean_acc`` (test accuracy after training),
    ``eps`` (the budgets of the sweep, including :data:`ATTACK_EPS`), ``acc_fgsm`` and ``acc_pgd``
    (test accuracy under each attack, one per eps).

    Returns ``ratio_init`` and ``ratio_trained`` (:func:`within_over_between` of each kernel),
    ``ratio_gain`` (their difference), ``scale_growth`` (mean diagonal after training over before),
    ``clean_acc``, ``attack_eps``, ``fgsm_at_attack_eps`` and ``pgd_at_attack_eps`` (accuracies
    at :data:`ATTACK_EPS`), ``fgsm_cost`` (clean accuracy minus FGSM accuracy there),
    ``pgd_excess`` (the largest amount, over the eps, by which PGD's accuracy exceeds FGSM's;
    negative when PGD is stronger everywhere), ``fgsm_at_max_eps`` and ``pgd_at_max_eps`` (at the
    largest eps) and ``max_eps``. Raises ``ValueError`` for lists of different lengths or an
    ``eps`` without :data:`ATTACK_EPS`.
    """
    eps, acc_fgsm, acc_pgd = (list(map(float, values[k])) for k in ("eps", "acc_fgsm", "acc_pgd"))
    if not (len(eps) == len(acc_fgsm) == len(acc_pgd)) or not eps:
        raise ValueError(f"eps, acc_fgsm and acc_pgd must have one entry per eps; got lengths "
                         f"{len(eps)}, {len(acc_fgsm)}, {len(acc_pgd)}")
    at = [i for i, e in enumerate(eps) if math.isclose(e, ATTACK_EPS, rel_tol=1e-9)]
    if not at:
        raise ValueError(f"eps must include {ATTACK_EPS}; got {eps}")
    K_init, K_trained = torch.as_tensor(values["K_init"]), torch.as_tensor(values["K_trained"])
    ratio_init = within_over_between(K_init, values["labels"])
    ratio_trained = within_over_between(K_trained, values["labels"])
    clean_acc = float(values["clean_acc"])
    i, top = at[0], max(range(len(eps)), key=eps.__getitem__)
    return {"ratio_init": ratio_init, "ratio_trained": ratio_trained, "ratio_gain": ratio_trained - ratio_init,
            "scale_growth": float(K_trained.diag().mean() / K_init.diag().mean()),
            "clean_acc": clean_acc, "attack_eps": ATTACK_EPS,
            "fgsm_at_attack_eps": acc_fgsm[i], "pgd_at_attack_eps": acc_pgd[i],
            "fgsm_cost": clean_acc - acc_fgsm[i],
            "pgd_excess": max(p - f for f, p in zip(acc_fgsm, acc_pgd)),
            "max_eps": eps[top], "fgsm_at_max_eps": acc_fgsm[top], "pgd_at_max_eps": acc_pgd[top]}


def claims(analysis: dict, profile) -> list:
    """The Primer's claims about its run (asserted under every profile, as the chapter always did):
    training makes same-class pairs relatively closer in the kernel; the trained network reaches a
    clean accuracy above 0.8; FGSM at eps 0.1 costs it more than 20 points; PGD is at least as
    strong as FGSM (its accuracy at most 0.01 above FGSM's) at every eps of the sweep."""
    P = ASSERTED_UNDER
    return [
        compare("kernel_reshaped", "training raises the within-class / between-class ratio of the kernel "
                "(after minus before)", analysis["ratio_gain"], ">", 0, profiles=P),
        compare("clean_acc", "the normally trained network's clean test accuracy is above 0.8",
                analysis["clean_acc"], ">", 0.8, profiles=P),
        compare("fgsm_cost", f"FGSM at eps {ATTACK_EPS:g} costs it more than 20 points of accuracy",
                analysis["fgsm_cost"], ">", 0.2, profiles=P),
        compare("pgd_stronger", "PGD is at least as strong as FGSM at every eps (largest excess of PGD's "
                "accuracy over FGSM's at most 0.01)", analysis["pgd_excess"], "<=", 0.01, profiles=P),
    ]
