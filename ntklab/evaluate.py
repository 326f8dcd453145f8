"""Clean and robust accuracy: PGD for monitoring, the worst case over attacks, AutoAttack for headlines.

* :func:`clean_accuracy` — fraction classified correctly;
* :func:`pgd_accuracy` — robust accuracy under L-inf PGD (Madry et al., ICLR 2018);
* :func:`worst_case_accuracy` — an example counts only if it survives every attack of a list
  (by default FGSM and PGD: on small MNIST models PGD with random start was at times weaker than
  zero-start FGSM, see the pilot runs);
* :func:`robust_flags` — per example, correct clean and after every attack of a list (the routine
  behind the three accuracies above, for chapters that need the examples or their own attacks);
* :func:`autoattack_accuracy` — AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of
  adversarial robustness with an ensemble of diverse parameter-free attacks") through the
  ``pyautoattack`` package.

``data`` is a :class:`torch.utils.data.TensorDataset` or a tuple ``(x, y)``: x (N, C, H, W)
float in [0, 1], y (N,) integer labels. Every function classifies with the model in eval mode
(BN running statistics, no dropout); a model handed over in train mode gets a ``UserWarning``
(once per call) and its mode back afterwards (:func:`ntklab.bn.eval_mode`). The model is moved to
``device`` if one is given (as :func:`ntklab.train.train` does), else the data go to the model's
device. An example counts
as robust only if it is classified correctly both clean and after the attack (as AutoAttack
counts), so robust accuracy never exceeds clean accuracy. Accuracies are Python floats in [0, 1].

Introduced in chapter 1 (Primer); chapter 3 uses ``bn_mode``, chapter 6 ``worst_case_accuracy``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ntklab import _checks, _progress
from ntklab import attacks as _attacks
from ntklab import bn as _bn
from ntklab.config import get_device
from ntklab.data import as_tensors

__all__ = ["clean_accuracy", "pgd_accuracy", "worst_case_accuracy", "autoattack_accuracy", "autoattack_flag",
           "robust_flags",
           "predict", "craft", "AUTOATTACK_VERSIONS", "AUTOATTACK_ATTACKS"]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "fast", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


# ------------------------------------------------------------------ helpers
def model_device(model: nn.Module, device=None) -> torch.device:
    """The device to evaluate ``model`` on: ``device`` if given (the model is moved there), else the
    device of its first parameter or buffer, else the CPU."""
    if device is not None:
        device = get_device(device)
        model.to(device)
        return device
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    starts = range(0, n, batch_size)
    starts = _progress.bar(progress, starts, desc=desc, leave=False)
    return ((s, min(s + batch_size, n)) for s in starts)


def _robust_flags(model, x, y, attacks: Sequence[Callable], *, batch_size, device, progress,
                  desc) -> torch.Tensor:
    """Per example (bool, on the CPU): correct on ``x`` and on the output of every attack, batch by
    batch (the attacks of a batch in order); the model is evaluated as it is (the caller sets the mode)."""
    flags = []
    for s, e in _batches(len(x), batch_size, progress, desc):
        xb, yb = x[s:e].to(device), y[s:e].to(device)
        ok = _correct(model, xb, yb)
        for attack in attacks:
            x_adv = attack(model, xb, yb)
            with torch.no_grad():
                ok &= model(x_adv).argmax(1) == yb
        flags.append(ok.cpu())
    return torch.cat(flags)


def _correct(model, xb, yb) -> torch.Tensor:
    """Per example, whether ``model`` classifies ``xb`` as ``yb``; the logits are checked first
    (shape (N, k), finite, labels in [0, k)), so a broken model or a label out of range is an error
    rather than a wrong accuracy."""
    with torch.no_grad():
        out = model(xb)
    _checks.logits(out, yb)
    return out.argmax(1) == yb


def _fraction(flags: torch.Tensor) -> float:
    """Exact fraction of True entries (count / total, not a float32 mean)."""
    return int(flags.sum()) / len(flags)


def _pgd(eps, alpha, steps, restarts, random_start, bn_mode) -> Callable:
    """The PGD of an evaluation, its arguments checked now (before any batch is attacked)."""
    eps = _checks.radius("eps", eps)
    alpha = _attacks.pgd_alpha(eps, alpha)                          # eps / 4 by default
    _checks.radius("alpha", alpha, positive=True, allow_none=True)
    _checks.count("steps", steps)
    _checks.count("restarts", restarts)
    return lambda m, xb, yb: _attacks.pgd(m, xb, yb, eps=eps, alpha=alpha, steps=steps,
                                          restarts=restarts, random_start=random_start,
                                          bn_mode=bn_mode)


# ------------------------------------------------------------------ accuracies
def clean_accuracy(model: nn.Module, data, *, batch_size: int = 500, device=None,
                   progress: bool = False) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly (eval mode).

    data: TensorDataset or (x, y); x (N, C, H, W) in [0, 1], y (N,) integers.
    batch_size: examples per forward pass. device: see the module docstring.
    progress: a tqdm bar over the batches. Returns a float in [0, 1]. Chapter 1 (Primer).
    """
    x, y = as_tensors(data, model=model)
    device = model_device(model, device)
    with _bn.eval_mode(model, warn="clean_accuracy"):
        flags = _robust_flags(model, x, y, (), batch_size=batch_size, device=device,
                              progress=progress, desc="clean")
    return _fraction(flags)


def pgd_accuracy(model: nn.Module, data, *, eps: float, alpha: float | None = None, steps: int = 10,
                 restarts: int = 1, random_start: bool = True, bn_mode: str = "eval",
                 batch_size: int = 500, device=None, progress: bool = False) -> float:
    """Robust accuracy under L-inf PGD (Madry et al., ICLR 2018): the fraction of ``data``
    classified correctly both clean and after :func:`ntklab.attacks.pgd`.

    data: TensorDataset or (x, y); x (N, C, H, W) in [0, 1], y (N,) integers.
    eps: L-inf radius in pixel scale. alpha: step (default ``eps / 4``). steps, restarts,
    random_start: of the PGD. bn_mode: BN mode while crafting (``"eval"``, ``"train"``: batch
    statistics of each batch of ``batch_size``, chapter 3); the examples are always classified in
    eval mode. Random starts use torch's global generator: seed it for reproducible numbers.
    Returns a float in [0, 1]. Chapter 1 (Primer).
    """
    x, y = as_tensors(data, model=model)
    device = model_device(model, device)
    attack = _pgd(eps, alpha, steps, restarts, random_start, bn_mode)
    with _bn.eval_mode(model, warn="pgd_accuracy"):
        flags = _robust_flags(model, x, y, [attack], batch_size=batch_size, device=device,
                              progress=progress, desc=f"PGD-{steps}")
    return _fraction(flags)


def worst_case_accuracy(model: nn.Module, data, *, eps: float, attacks: Sequence[str] = ("fgsm", "pgd"),
                        steps: int = 20, alpha: float | None = None, restarts: int = 1,
                        random_start: bool = True, bn_mode: str = "eval", batch_size: int = 500,
                        device=None, progress: bool = False) -> float:
    """Robust accuracy against the worst of several attacks: an example counts only if it is
    classified correctly clean and after every attack in ``attacks``.

    On small MNIST models PGD with random start was at times weaker than zero-start FGSM (pilot
    runs), so the book reports this per-example minimum rather than PGD alone.

    data: TensorDataset or (x, y); x (N, C, H, W) in [0, 1], y (N,) integers.
    attacks: names from :data:`ntklab.attacks.ATTACKS` except ``"n_fgsm"`` (which leaves the
    eps-ball) and ``"fgsm_pca"`` (which needs a basis: use :func:`robust_flags`). steps, alpha (default ``eps / 4``), restarts, random_start: of ``"pgd"``; the
    single-step attacks use their own defaults. bn_mode: BN mode while crafting; classification
    is in eval mode. Returns a float in [0, 1]. Chapter 6.
    """
    x, y = as_tensors(data, model=model)
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    if not names:
        raise ValueError("attacks must name at least one attack")
    for name in names:
        if name == "n_fgsm":
            raise ValueError("'n_fgsm' leaves the eps-ball (up to noise + alpha): it does not "
                             "measure robustness at eps")
        if name == "fgsm_pca":
            raise ValueError("'fgsm_pca' needs a noise basis, which worst_case_accuracy cannot choose: pass "
                             "the attack to robust_flags instead, e.g. robust_flags(model, data, [lambda m, x, y: "
                             "ntklab.attacks.fgsm_pca(m, x, y, eps=eps, basis=basis)])")
        if name not in _attacks.ATTACKS:
            raise ValueError(f"unknown attack {name!r}; valid attacks are: "
                             f"{', '.join(a for a in _attacks.ATTACKS if a not in ('n_fgsm', 'fgsm_pca'))}")
    device = model_device(model, device)
    fns = []
    for name in names:
        if name == "pgd":
            fns.append(_pgd(eps, alpha, steps, restarts, random_start, bn_mode))
        else:
            fns.append(lambda m, xb, yb, name=name: _attacks.adversarial_examples(
                name, m, xb, yb, eps=eps, bn_mode=bn_mode))

    with _bn.eval_mode(model, warn="worst_case_accuracy"):
        flags = _robust_flags(model, x, y, fns, batch_size=batch_size, device=device,
                              progress=progress, desc="worst case")
    return _fraction(flags)


def robust_flags(model: nn.Module, data, attacks: Sequence[Callable] = (), *, batch_size: int = 500,
                 device=None, progress: bool = False) -> torch.Tensor:
    """Per example of ``data``, whether ``model`` classifies it correctly clean and after every
    attack in ``attacks`` (eval mode, as every accuracy of this module): the routine behind
    :func:`clean_accuracy`, :func:`pgd_accuracy` and :func:`worst_case_accuracy`, for a chapter that
    needs the examples themselves or its own attacks.

    data: TensorDataset or (x, y); x (N, C, H, W) in [0, 1], y (N,) integers. attacks: callables
    ``attack(model, xb, yb) -> x_adv`` run on each batch of ``batch_size`` in order (e.g.
    ``lambda m, x, y: ntklab.attacks.pgd(m, x, y, eps=0.3, steps=10)``); none: clean accuracy.
    Returns (N,) bool on the CPU; its mean is the robust accuracy.

    Example::

        >>> ok = ntklab.evaluate.robust_flags(model, test_set, [fgsm_at_eps, pgd_at_eps])
        >>> float(ok.double().mean())
    """
    x, y = as_tensors(data, model=model)
    attacks = list(attacks)
    if not all(callable(a) for a in attacks):
        raise ValueError("attacks must be callables attack(model, x, y) -> x_adv")
    device = model_device(model, device)
    with _bn.eval_mode(model, warn="robust_flags"):
        return _robust_flags(model, x, y, attacks, batch_size=batch_size, device=device,
                             progress=progress, desc="robust")


#: the attacks of each AutoAttack version (pyautoattack 0.2.0)
_AUTOATTACK_RUNS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "fast": ("apgd-ce", "apgd-t"),
                    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"), "rand": ("apgd-ce", "apgd-dlr")}
#: the fewest classes each attack's loss needs: the DLR loss divides by the gap between the largest
#: and the third-largest logit, its targeted form by the largest minus the mean of the third and fourth
_AUTOATTACK_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


def _check_autoattack_classes(version: str, attacks, k: int) -> None:
    runs = list(attacks) if version == "custom" else list(_AUTOATTACK_RUNS[version])
    short = [a for a in runs if k < _AUTOATTACK_MIN_CLASSES.get(a, 2)]
    if short:
        usable = [a for a in runs if a not in short] or ["apgd-ce"]
        raise ValueError(f"AutoAttack version {version!r} runs {', '.join(short)}, whose DLR loss needs at least "
                         f"{max(_AUTOATTACK_MIN_CLASSES[a] for a in short)} classes; the model has {k}: use "
                         f"version='custom', attacks={usable}")


def autoattack_accuracy(model: nn.Module, data, *, eps: float, version: str = "standard",
                        attacks: Sequence[str] | None = None, n: int | None = None, seed: int = 0,
                        batch_size: int = 250, device=None, return_flags: bool = False):
    """Robust accuracy under L-inf AutoAttack (Croce & Hein, ICML 2020), through ``pyautoattack``.

    data: TensorDataset or (x, y); x (N, C, H, W) in [0, 1], y (N,) integers.
    eps: L-inf radius in pixel scale.
    version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square: the number to report), ``"plus"``
        or ``"rand"`` (pyautoattack's versions); ``"fast"``: APGD-CE and APGD-T only, one
        restart each, 100 iterations, 9 target classes, the gradient
        half of the standard version and a cheap check; ``"custom"``: the attacks listed in
        ``attacks``, from :data:`AUTOATTACK_ATTACKS`, one restart each.
    n: evaluate on a class-balanced subset of ``n`` examples drawn with ``seed``
        (:func:`ntklab.data.subset`); ``None``: all of ``data``.
    seed: AutoAttack's seed. torch's global random state is saved and restored around the run
        (pyautoattack reseeds it).
    batch_size: examples per attack batch. device: see the module docstring.
    Targeted attacks use at most k - 1 target classes for a model of k classes, in every version;
    a version whose DLR loss needs more classes than the model has (APGD-T: 4, APGD-DLR: 3) is
    refused with the attacks that would run. Resuming an interrupted run (pyautoattack's
    ``state_path``) is not offered: in pyautoattack
    0.2.0 a reloaded state does not match its own attack list and returns no labels.

    The parameters' ``requires_grad`` flags are switched off during the run (so no parameter
    gradient is computed or accumulated) and restored after. pyautoattack's own checks ("there are
    N points with zero gradient! ... See flags_doc.md", "it seems to be a randomized defense", ...),
    which it logs to the ``auto-attack`` logger or raises as warnings, and its printed progress are
    captured rather than printed: with ``return_flags`` they are returned (:func:`autoattack_flag`
    reads one), else dropped. Returns a float in [0, 1], or with ``return_flags`` the pair
    ``(accuracy, flags)``, flags a list of message strings in the order raised.
    Chapter 1 (Primer) introduces it; the headline numbers of chapters 3-6 use it.
    """
    from pyautoattack import AutoAttack

    from ntklab import data as ntkdata

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; valid versions are: "
                         f"{', '.join(AUTOATTACK_VERSIONS)}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("give attacks=[...] exactly when version='custom'")
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"unknown or no AutoAttack attacks {unknown}; valid attacks are: "
                             f"{', '.join(AUTOATTACK_ATTACKS)}")
    eps = _checks.radius("eps", eps)
    _checks.count("n", n, allow_none=True)
    _checks.count("seed", seed, minimum=0)
    _checks.count("batch_size", batch_size)
    x, y = as_tensors(data, model=model)
    if n is not None:
        x, y = ntkdata.subset(TensorDataset(x, y), n, seed=seed).tensors
    device = model_device(model, device)
    with _bn.eval_mode(model), torch.no_grad():          # the labels fit the model's outputs
        k = _checks.logits(model(x[:1].to(device)))
    y = _checks.labels("y", y, len(x), num_classes=k)
    _check_autoattack_classes(version, attacks, k)
    if eps == 0:
        return clean_accuracy(model, (x, y), batch_size=batch_size, device=device)

    params = [(p, p.requires_grad) for p in model.parameters()]
    rng_devices = [device] if device.type == "cuda" else []
    with _bn.eval_mode(model, warn="autoattack_accuracy"), torch.random.fork_rng(devices=rng_devices):
        try:
            for p, _ in params:
                p.requires_grad_(False)
            if version in ("fast", "custom"):
                aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, device=device, version="custom",
                                attacks=["apgd-ce", "apgd-t"] if version == "fast" else attacks)
                aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = aa.fab.n_restarts = 1
            else:
                aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, device=device, version=version)
            for attack in (aa.apgd_targeted, aa.fab):  # at most k - 1 target classes, in every version
                attack.n_target_classes = min(attack.n_target_classes, k - 1)
            with _captured_autoattack_flags() as flags:
                _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        finally:
            for p, flag in params:
                p.requires_grad_(flag)
    acc = _fraction(y_adv.cpu() == y.cpu())
    return (acc, list(flags)) if return_flags else acc


AUTOATTACK_LOGGER = "auto-attack"


@contextlib.contextmanager
def _captured_autoattack_flags():
    """Collect pyautoattack's flags (warnings to its logger, ``warnings.warn`` calls) in a list, and
    swallow its prints, for the duration of the block; the logger's state is restored after."""
    flags: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                flags.append(record.getMessage())

    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield flags
        flags.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def autoattack_flag(flags: Sequence[str]) -> dict:
    """What pyautoattack's flags (from ``autoattack_accuracy(..., return_flags=True)``) say, in the
    book's words: ``{"zero_gradient_points": the largest N of its "there are N points with zero
    gradient" checks (0 if none), "other": [every other message]}``. A point with zero input
    gradient gives the gradient attacks nothing to follow, so their accuracy there is an upper bound
    only (gradient masking, or a saturated softmax)."""
    counts, other = [], []
    for msg in flags:
        m = re.search(r"there are (\d+) points with zero gradient", msg)
        (counts.append(int(m.group(1))) if m else other.append(msg))
    return {"zero_gradient_points": max(counts, default=0), "other": other}


# ------------------------------------------------------------------ batch-dependent models (chapter 3)
def predict(model: nn.Module, X: torch.Tensor, *, batch_size: int = 500, bn_mode: str = "eval",
            mix: torch.Tensor | None = None, device=None, progress: bool = False) -> torch.Tensor:
    """Predicted labels of ``model`` on ``X``, classified in batches of ``batch_size`` with batch
    norm in ``bn_mode``: ``"eval"`` (running statistics: each prediction depends on its input
    alone) or ``"train"`` (each batch normalised with its own statistics, the setting of Li et al.'s
    "without buffer" models, arXiv 2312.02236; running buffers restored afterwards). Other layers
    are in eval mode (:func:`ntklab.bn.bn_mode`); a model without running statistics
    uses the batch statistics in either mode.

    X: (N, C, H, W) in [0, 1]. mix: optional inputs of the same shape: every batch is then half
    ``X`` and half ``mix`` (a batch of indices I, h = len(I) // 2, is classified as
    ``X[I[:h]] + mix[I[h:]]`` and then as ``mix[I[:h]] + X[I[h:]]``), so each example of X is
    classified once next to examples of ``mix`` (e.g. clean images next to adversarial ones).
    Only the predictions for X are returned. A batch of one is classified alone (no mix).
    Returns (N,) int64 on the CPU. Chapter 3.
    """
    _checks.images("X", X, model=model)
    if mix is not None and (not isinstance(mix, torch.Tensor) or mix.shape != X.shape):
        raise ValueError(f"mix must have the shape of X {tuple(X.shape)}, got "
                         f"{tuple(mix.shape) if isinstance(mix, torch.Tensor) else type(mix).__name__}")
    if mix is not None:
        _checks.images("mix", mix, model=model)
    _bn.check_bn_mode(bn_mode, allowed=("eval", "train"))
    device = model_device(model, device)
    out = torch.empty(len(X), dtype=torch.long)
    with _bn.bn_mode(model, bn_mode), torch.no_grad():
        for s, e in _batches(len(X), batch_size, progress, "predict"):
            h = (e - s) // 2
            if mix is None or h == 0:
                out[s:e] = model(X[s:e].to(device)).argmax(1).cpu()
                continue
            first = model(torch.cat([X[s:s + h], mix[s + h:e]]).to(device)).argmax(1).cpu()
            second = model(torch.cat([mix[s:s + h], X[s + h:e]]).to(device)).argmax(1).cpu()
            out[s:s + h], out[s + h:e] = first[:h], second[h:]
    return out


def craft(model: nn.Module, data, *, attack: str = "pgd", eps: float, batch_size: int = 500,
          bn_mode: str = "eval", device=None, progress: bool = False, **attack_kwargs) -> torch.Tensor:
    """Adversarial examples of all of ``data``, crafted in batches of ``batch_size`` by
    :func:`ntklab.attacks.adversarial_examples` (``attack`` by name: ``"fgsm"``, ``"pgd"``, ...).

    With ``bn_mode="train"`` each attacked batch is normalised with its own statistics while it is
    crafted, so the batch size is part of the attack (chapter 3: this masks gradients);
    ``"eval"`` uses the running statistics. data: TensorDataset or (x, y), x in [0, 1].
    attack_kwargs: passed on (``alpha``, ``steps``, ...). Random starts use torch's global
    generator. Returns (N, C, H, W) on the CPU, within ``eps`` of x and in [0, 1]. Chapter 3.
    """
    x, y = as_tensors(data)
    device = model_device(model, device)
    parts = [_attacks.adversarial_examples(attack, model, x[s:e].to(device), y[s:e].to(device), eps=eps,
                                           bn_mode=bn_mode, **attack_kwargs).cpu()
             for s, e in _batches(len(x), batch_size, progress, attack)]
    return torch.cat(parts)
