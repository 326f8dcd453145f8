"""Experiment ``schedule``: normal training first, PGD-AT from a switch epoch on (chapter 5).

Li et al. (arXiv 2312.02236) argue from the lazy phase of the NTK (chapter 4) that a model can be
trained normally first and adversarially later for much less time at equal robustness ("up to
50%"), with the switch epoch picked by hand. This experiment trains, under chapter 4's profile
(:func:`ntklab.experiments.strategies.chapter_profile`: same model, eps, PGD and multistep
schedule), PGD-AT models that switch from normal training at several fixed epochs s (fractions
``SWITCH_FRACTIONS`` of the first learning-rate decay: 0 is full PGD-AT, the last switches at the
decay), one whose switch is chosen during the run by ``switch_epoch="auto"``
(:class:`ntklab.callbacks.AutoSwitch`: the centred trace NTK of ``AUTO["probe"]`` training images
after every epoch; switch once the kernel velocity is at most ``AUTO["threshold"]`` of the first
epoch's, at the latest at the first decay), and the normally trained model for reference (no AT).

Every run is a :func:`ntklab.experiments.strategies.kernel_run` (a trace C-NTK of the chapter-4
probe after every epoch), so full PGD-AT and normal training are the very runs of chapter 4, shared
through the cache. Each model gets, besides the run's clean and worst-case (FGSM and PGD) accuracy
on the test subset, the accuracy under AutoAttack's two untargeted attacks, APGD-CE and APGD-DLR
(``autoattack_accuracy(version="custom")``, 100 iterations each), on a class-balanced subset of
``AUTOATTACK_N[profile]`` test images (smoke 32, quick 200, paper ``n_eval``). On the quick full
PGD-AT model they gave the same accuracy on 200 images as the ``"fast"`` version (which adds the
targeted APGD-T) at a fifth of its cost.

The result (a dict, cached by config and package version):

* ``labels``: the runs in order (``"s=0"``, ..., ``"auto"``, ``"normal"``); ``switch_epochs``:
  the epoch each one switched at (``"auto"``: the chosen one; ``"normal"``: ``epochs``, never);
* ``runs[label]``: the run's result without the weights (see ``kernel_run``) plus
  ``autoattack_acc``; ``config``; ``compute_seconds`` (runs and AutoAttack, wall seconds, also
  when the runs came from the cache).
"""
from __future__ import annotations

import time

from ntklab.experiments import cached, register
from ntklab.experiments.strategies import chapter_profile, kernel_runs, run_config

__all__ = ["run", "make_config", "switch_epochs", "SWITCH_FRACTIONS", "AUTO", "AUTOATTACK_N", "NAME"]

NAME = "schedule"
SWITCH_FRACTIONS = (0.0, 0.5, 1.0)       # of the first learning-rate decay
AUTO = {"threshold": 0.2, "probe": 32}  # the automatic switch's rule (cap: the first decay)
AUTOATTACK_N = {"smoke": 32, "quick": 200}
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr")


def switch_epochs(cp) -> list[int]:
    """The fixed switch epochs: ``SWITCH_FRACTIONS`` of the first decay of the chapter profile
    ``cp`` (of half the epochs without decays), rounded, without repeats."""
    first = min(cp.lr_milestones) if cp.lr_milestones else cp.epochs // 2
    return sorted({round(f * first) for f in SWITCH_FRACTIONS})


def _runs(cp) -> list[tuple[str, str, dict, bool]]:
    """(label, strategy, train overrides, AE-NTK) of every run; full PGD-AT and normal training
    are configured exactly as in chapter 4 (AE-NTK for PGD, none for normal) to share its runs."""
    runs = [(f"s={s}", "pgd", {} if s == 0 else {"switch_epoch": s}, s == 0) for s in switch_epochs(cp)]
    auto = {"switch_epoch": "auto", "switch_threshold": AUTO["threshold"], "switch_probe": AUTO["probe"]}
    return runs + [("auto", "pgd", auto, False), ("normal", "normal", {}, False)]


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    cp = chapter_profile(profile)
    return {"profile": cp.to_dict(), "labels": [r[0] for r in _runs(cp)],
            "runs": [run_config(cp, strategy, "multistep", ae, kw) for _, strategy, kw, ae in _runs(cp)],
            "autoattack": {"attacks": list(AUTOATTACK_ATTACKS), "n": AUTOATTACK_N.get(profile.name, cp.n_eval),
                           "seed": cp.seed}}


@register(NAME, "normal training first, PGD-AT after a fixed or automatic switch epoch: time, clean, "
                "worst-case and AutoAttack accuracy, final kernels (chapter 5)")
def run(profile, device=None, *, force: bool = False, progress: bool = True) -> dict:
    """Train the runs of chapter 5 under ``profile`` (see the module docstring for the result)."""
    config = make_config(profile)
    return cached(NAME, config, lambda: _compute(profile, config, device, force, progress), force=force)


def _compute(profile, config, device, force, progress) -> dict:
    from ntklab import evaluate
    from ntklab.config import get_device
    from ntklab.experiments import data_from_profile, model_from_profile

    cp = chapter_profile(profile)
    device = get_device(device)
    _, test_set = data_from_profile(cp)
    aa = config["autoattack"]
    out = {"labels": list(config["labels"]), "switch_epochs": {}, "runs": {}, "config": config,
           "compute_seconds": 0.0}
    todo = _runs(cp)
    results = kernel_runs(cp, [{"strategy": strategy, "ae": ae, **kw} for _, strategy, kw, ae in todo],
                          device=device, force=force, progress=progress, desc=f"{NAME}: epochs of {len(todo)} runs")
    for (label, strategy, kw, ae), res in zip(todo, results):
        start = time.perf_counter()
        model = model_from_profile(cp)
        model.load_state_dict(res["state_dict"])
        model.eval()
        res = {k: v for k, v in res.items() if k != "state_dict"}
        res["autoattack_acc"] = evaluate.autoattack_accuracy(model.to(device), test_set, eps=cp.eps, version="custom",
                                                             attacks=aa["attacks"], n=aa["n"], seed=aa["seed"])
        switched = res["history"]["switch_epoch"]
        out["switch_epochs"][label] = (cp.epochs if strategy == "normal" else 0 if switched is None
                                       else int(switched))
        out["runs"][label] = res
        out["compute_seconds"] += res["compute_seconds"] + time.perf_counter() - start
    return out
