"""Experiment ``frozen_kernel``: adversarial training on a frozen kernel (chapter 8).

After Loo, Hasani, Amini & Rus, "Evolution of Neural Tangent Kernels under Benign and Adversarial
Training" (NeurIPS 2022), following their released code (see ``shared/papers`` digest):

* **Phase 1** forms the kernel: the profile's network trained from one initialisation either
  benignly (``C``) or adversarially (``A``), with its weights kept at the fractional epochs ``times``
  (:class:`ntklab.callbacks.ParameterSnapshots`).
* **Phase 2** freezes the kernel at epoch t: the centred linearised model ``J_t(x) (theta - theta_t)``
  (:class:`ntklab.linearize.Linearized`, BN frozen in eval mode) is trained from ``theta = theta_t``
  benignly (``C``) or adversarially (``A``, the attacks made against the linearised model itself)
  for a fixed budget, SGD with momentum 0.9, no weight decay, constant rate (their phase 2). The four
  cells CC, AC, CA, AA (phase 1, phase 2) are run at every t.
* **Reference**: the nonlinear phase-1 ``A`` network at t, trained on adversarially for the same
  phase-2 budget and optimiser (their ``--do_standard_second``).
* **Evaluation**: clean accuracy and robust accuracy, per example the worst of FGSM and PGD
  (:func:`ntklab.evaluate.worst_case_accuracy`), white-box against each model (the linearised ones
  attacked as linear models, as in their code), on ``n_eval`` class-balanced test images; APGD-CE,
  the first attack of AutoAttack (Croce & Hein 2020; one restart, 100 iterations), on a subset for
  the AA cell and the reference at the last t.

Adversarial training in both phases makes one clean and one adversarial update per batch, as Loo et
al.'s code does (``clean_update=True`` of :func:`ntklab.train.train`).

Settings per profile (:class:`Settings`, ``Settings.for_profile(profile)``):

* ``quick``: the SmallCNN at width 16 on MNIST-5k; eps 0.15 (half the usual MNIST radius of 0.3,
  as Loo et al.'s 4/255 is half the usual CIFAR-10 radius of 8/255); phase 1: 3 epochs, lr 0.05,
  no weight decay, FGSM with a uniform random start (step 1.25 eps; Wong et al. 2020) as the cheap
  training attack, snapshots at t = 0, 0.25, 1, 3 epochs; phase 2: one epoch on 2,000 class-balanced
  training images at lr 0.01; evaluation on 250 test images with FGSM and PGD-10 (step eps/4,
  random start); APGD-CE on 100 of them.
* ``paper`` (their code): CIFAR-10 without augmentation, the profile's PreAct ResNet-18 (theirs is
  a Haiku ResNet-18 v1 with a zero-initialised last layer), eps 4/255, training PGD with
  ``2 * profile.pgd_steps`` steps (20) of step 2 eps / steps (eps/10), evaluation PGD with
  ``5 * profile.eval_pgd_steps`` steps (100) of step 2 eps / steps; phase 1 at lr 0.1 without weight
  decay for ``profile.epochs // 2`` epochs (100) with snapshots at their grid 0, 0.125, 0.25, 0.5,
  1, 2, 5, 20, 100 (those within phase 1); phase 2 for ``profile.epochs // 2`` epochs (100) at lr 0.01
  on the whole training set; ``n_eval`` test images (1,000); APGD-CE on ``n_probe`` images (500).
  Snapshot times that fall on the same batch boundary are merged (only with a small ``n_train``). The
  tiny ``paper_profile`` test fixture scales all of these by its sizes.
* ``smoke``: the smoke model and data, 2 epochs, snapshots 0, 0.5, 2; phase 2 one epoch on 64 images.

:func:`analyse` turns a result into the numbers the chapter discusses and :func:`claims` into the
chapter's claims (:mod:`ntklab.claims`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ntklab.claims import Claim, compare
from ntklab.experiments import RunContext, data_from_profile, experiment, model_from_profile

__all__ = ["run", "make_config", "Settings", "analyse", "claims", "NAME", "CELLS"]

NAME = "frozen_kernel"
CELLS = ("CC", "AC", "CA", "AA")
_PAPER_TIMES = (0, 0.125, 0.25, 0.5, 1, 2, 5, 20, 100)
_NEAR_REFERENCE = 0.06      # "AA comes within 6 points of the nonlinear reference"


@dataclass(frozen=True)
class Settings:
    """Every per-profile constant of chapter 8 (see the module docstring): ``eps``; the model's
    ``model_kwargs``; phase 1 (``epochs1`` at ``lr1``, snapshots at the fractional epochs
    ``times``, training attack ``train_attack`` with step ``train_alpha`` and ``train_steps``);
    phase 2 (``epochs2`` on ``n_phase2`` training images at ``lr2``); evaluation on ``n_eval`` test
    images with PGD of ``eval_steps`` steps of ``eval_alpha``, APGD-CE on ``n_autoattack``."""

    eps: float
    model_kwargs: dict
    epochs1: int
    lr1: float
    times: tuple[float, ...]
    train_attack: str
    train_alpha: float
    train_steps: int | None
    n_phase2: int | None
    epochs2: int
    lr2: float
    n_eval: int
    eval_steps: int
    eval_alpha: float
    n_autoattack: int

    @classmethod
    def for_profile(cls, profile) -> "Settings":
        if profile.name in ("smoke", "quick"):
            eps, quick = 0.15, profile.name == "quick"
            model_kwargs = {**profile.model_kwargs, "width": 16} if quick else dict(profile.model_kwargs)
            return cls(eps=eps, model_kwargs=model_kwargs, epochs1=3 if quick else 2, lr1=0.05,
                       times=(0, 0.25, 1, 3) if quick else (0, 0.5, 2), train_attack="fgsm_rs",
                       train_alpha=1.25 * eps, train_steps=None, n_phase2=2000 if quick else 64, epochs2=1,
                       lr2=0.01, n_eval=250 if quick else 64, eval_steps=10 if quick else 3, eval_alpha=eps / 4,
                       n_autoattack=100 if quick else 16)
        eps = 4 / 255
        epochs = max(1, int(profile.epochs) // 2)
        train_steps, eval_steps = 2 * int(profile.pgd_steps), 5 * int(profile.eval_pgd_steps)
        times = [t for t in _PAPER_TIMES if t <= epochs]
        if profile.n_train is not None:   # merge the times that round up to the same batch boundary
            batches = -(-int(profile.n_train) // int(profile.batch_size))
            kept = {}
            for t in times:
                kept.setdefault(-(-t * batches // 1) / batches, t)
            times = sorted(kept.values())
        return cls(eps=eps, model_kwargs=dict(profile.model_kwargs), epochs1=epochs, lr1=0.1, times=tuple(times),
                   train_attack="pgd", train_alpha=2 * eps / train_steps, train_steps=train_steps,
                   n_phase2=profile.n_train, epochs2=epochs, lr2=0.01, n_eval=int(profile.n_eval),
                   eval_steps=eval_steps, eval_alpha=2 * eps / eval_steps, n_autoattack=int(profile.n_probe))


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    s = Settings.for_profile(profile)
    return {"profile": profile.to_dict(), **dataclasses.asdict(s), "times": list(s.times), "momentum": 0.9,
            "weight_decay": 0.0, "clean_update": True, "centered": True, "cells": list(CELLS)}


@experiment(NAME, "two-phase training: kernels frozen at fractional epochs of benign or adversarial "
                  "training, centred linearised models trained on them benignly or adversarially (chapter 8)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Run the chapter 8 experiment under ``profile`` (see the module docstring).

    Returns a dict: ``config``; ``times`` (requested) and ``actual_times[p1]`` (batch-rounded);
    ``phase1[p1]``: the :class:`ntklab.train.History` dict, and ``base[p1]``: ``{"clean", "robust"}``
    per t of the phase-1 network itself; ``cells[c]`` for c in CC, AC, CA, AA: ``{"clean",
    "robust", "train_time"}`` per t; ``reference``: the same for the nonlinear network; ``autoattack``:
    ``{"t", "n", "linear", "reference", "linear_pgd", "reference_pgd"}`` (APGD-CE accuracy, and the
    FGSM/PGD worst case on the same ``n`` images); ``aa_state``: the state dict of the AA linearised model at the
    last t (for the chapter's explorer); ``compute_seconds``.
    """
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress, ctx.checkpoints)


def analyse(result: dict) -> dict:
    """The numbers chapter 8 discusses, from a result of :func:`run`.

    Per freeze time (lists over ``times``): ``robust[c]`` and ``clean[c]`` for each cell c and
    ``"reference"``, ``base_robust[p1]``/``base_clean[p1]`` of the phase-1 networks. At the last
    time ``last``: ``ac_minus_cc`` (benign training on the adversarial kernel against the benign
    one), ``aa_minus_ca`` (adversarial training on the two kernels), ``ac_robust`` and
    ``base_a_robust`` (AC against the network its kernel was frozen from), ``aa_gain`` (AA's robust
    accuracy at the last time minus at the first), ``aa_worst_step`` (the smallest change of AA from
    one time to the next, negative when it falls), ``aa_minus_reference`` per time and
    ``aa_near_reference_from_t`` (the first freeze time from which on AA stays within 6 points of
    the reference, or ``"never"``); ``autoattack`` with ``apgd_drop`` (the
    most APGD-CE takes off the FGSM/PGD worst case on either model); ``train_time`` (mean phase-2
    wall seconds per model kind) and ``linear_over_reference``.
    """
    times, cells, ref = list(result["times"]), result["cells"], result["reference"]
    robust = {**{c: [float(v) for v in cells[c]["robust"]] for c in cells}, "reference": [float(v) for v in ref["robust"]]}
    clean = {**{c: [float(v) for v in cells[c]["clean"]] for c in cells}, "reference": [float(v) for v in ref["clean"]]}
    aa = robust["AA"]
    a = result["autoattack"]

    def mean(v):
        return sum(v) / len(v)

    train_time = {"AC": mean(cells["AC"]["train_time"]), "AA": mean(cells["AA"]["train_time"]),
                  "reference": mean(ref["train_time"])}
    return {
        "times": times, "t_first": times[0], "t_last": times[-1], "actual_times": list(result["actual_times"]["A"]),
        "robust": robust, "clean": clean,
        "base_robust": {p1: [float(v) for v in result["base"][p1]["robust"]] for p1 in result["base"]},
        "base_clean": {p1: [float(v) for v in result["base"][p1]["clean"]] for p1 in result["base"]},
        "last": {**{f"{c}_robust": robust[c][-1] for c in robust}, **{f"{c}_clean": clean[c][-1] for c in clean},
                 "base_A_robust": float(result["base"]["A"]["robust"][-1]),
                 "base_C_robust": float(result["base"]["C"]["robust"][-1])},
        "ac_minus_cc": robust["AC"][-1] - robust["CC"][-1],
        "aa_minus_ca": robust["AA"][-1] - robust["CA"][-1],
        "aa_gain": aa[-1] - aa[0],
        "aa_worst_step": min((a1 - a0 for a0, a1 in zip(aa, aa[1:])), default=0.0),
        "aa_minus_reference": [x - r for x, r in zip(aa, robust["reference"])],
        "aa_near_reference_from_t": _near_from(aa, robust["reference"], times),
        "autoattack": {"t": a["t"], "n": int(a["n"]), "linear": float(a["linear"]), "linear_pgd": float(a["linear_pgd"]),
                       "reference": float(a["reference"]), "reference_pgd": float(a["reference_pgd"]),
                       "apgd_drop": max(a["linear_pgd"] - a["linear"], a["reference_pgd"] - a["reference"])},
        "train_time": train_time, "linear_over_reference": train_time["AA"] / train_time["reference"],
    }


def _near_from(aa, ref, times):
    """The first freeze time from which on AA stays within 6 points of the reference, or "never"."""
    near = [x >= r - _NEAR_REFERENCE for x, r in zip(aa, ref)]
    for i in range(len(near)):
        if all(near[i:]):
            return times[i]
    return "never"


def _far_since_first_close(aa, ref) -> int:
    """How many freeze times, from the first at which AA is within 6 points of the reference on,
    it is not (all of them if it never is): 0 exactly when it comes close at some t and stays."""
    close = [x >= r - _NEAR_REFERENCE for x, r in zip(aa, ref)]
    if not any(close):
        return len(close)
    return close[close.index(True):].count(False)


def claims(analysis: dict, profile) -> list[Claim]:
    """Chapter 8's claims about its run (thresholds written for ``quick``; asserted only there)."""
    rob, last = analysis["robust"], analysis["last"]
    return [
        compare("adversarial_kernel_carries_robustness", "At the last freeze time, benign training on the frozen "
                "adversarial kernel (AC) is at least 15 points more robust than on the frozen benign kernel (CC)",
                analysis["ac_minus_cc"], ">=", 0.15),
        compare("ac_near_its_network", "At the last freeze time AC is within 10 points of the robust accuracy of the "
                "adversarially trained network its kernel was frozen from (AC's robust accuracy)", last["AC_robust"], ">=",
                last["base_A_robust"] - 0.10),
        compare("aa_gains_with_t", "Adversarial training on the frozen adversarial kernel (AA) gains at least 30 "
                "points of robust accuracy from the first to the last freeze time", analysis["aa_gain"], ">=", 0.30),
        compare("aa_never_falls", "AA never loses more than 3 points of robust accuracy from one freeze time to the "
                "next (its smallest change from one time to the next)", analysis["aa_worst_step"], ">=", -0.03),
        compare("aa_reaches_reference", "From some freeze time on, AA stays within 6 points of the nonlinear network "
                "trained adversarially for the same budget (freeze times after it first comes close at which it "
                "is not)", _far_since_first_close(rob["AA"], rob["reference"]), "==", 0),
        compare("benign_kernel_limits", "At the last freeze time, adversarial training on the frozen benign kernel "
                "(CA) stays at least 5 points below adversarial training on the frozen adversarial kernel (AA)",
                analysis["aa_minus_ca"], ">=", 0.05),
    ]


def _compute(profile, config, device, progress, checkpoints) -> dict:
    import torch

    from ntklab import data, evaluate
    from ntklab.callbacks import ParameterSnapshots
    from ntklab.config import seed_everything
    from ntklab.linearize import Linearized
    from ntklab.train import train

    start = time.perf_counter()
    eps = config["eps"]
    model_profile = profile.replace(model_kwargs=config["model_kwargs"])
    train_set, test_set = data_from_profile(profile)
    phase2_set = data.subset(train_set, config["n_phase2"], seed=profile.seed)
    eval_set = data.subset(test_set, config["n_eval"], seed=profile.seed)
    attack_kw = {"eps": eps, "alpha": config["train_alpha"], "steps": config["train_steps"]}
    if config["train_attack"] == "fgsm":
        attack_kw.pop("alpha")

    def fit(model, data_set, phase, strategy, where):
        seed_everything(profile.seed)
        kw = dict(epochs=config["epochs1"], lr=config["lr1"]) if phase == 1 else \
            dict(epochs=config["epochs2"], lr=config["lr2"])
        adversarial = strategy != "normal"
        return train(model, data_set, strategy=strategy, **kw, lr_schedule="constant", momentum=config["momentum"],
                     weight_decay=config["weight_decay"], batch_size=profile.batch_size, seed=profile.seed,
                     clean_update=adversarial and config["clean_update"], **(attack_kw if adversarial else {}),
                     callbacks=where[1], checkpoint_dir=checkpoints / where[0], device=device, progress=progress)

    def measure(model):
        torch.manual_seed(profile.seed)
        clean = evaluate.clean_accuracy(model, eval_set, device=device)
        robust = evaluate.worst_case_accuracy(model, eval_set, eps=eps, steps=config["eval_steps"],
                                              alpha=config["eval_alpha"], device=device)
        return float(clean), float(robust)

    def build(state):
        net = model_from_profile(model_profile)
        net.load_state_dict(state)
        return net.to(device).eval()

    strategy = {"C": "normal", "A": config["train_attack"]}
    snaps, out = {}, {"config": config, "times": list(config["times"]), "actual_times": {}, "phase1": {},
                      "base": {}, "cells": {c: {"clean": [], "robust": [], "train_time": []} for c in CELLS},
                      "reference": {"clean": [], "robust": [], "train_time": []}}
    for p1 in ("C", "A"):
        seed_everything(profile.seed)           # one initialisation for both
        net = model_from_profile(model_profile)
        snaps[p1] = ParameterSnapshots(config["times"])
        history = fit(net, train_set, 1, strategy[p1], (f"phase1_{p1}", [snaps[p1]]))
        out["phase1"][p1] = history.to_dict()
        out["actual_times"][p1] = snaps[p1].actual_times
        base = [measure(build(snaps[p1].state(t))) for t in config["times"]]
        out["base"][p1] = {"clean": [b[0] for b in base], "robust": [b[1] for b in base]}
    for t in config["times"]:
        for p1 in ("C", "A"):
            for p2 in ("C", "A"):
                lin = Linearized(build(snaps[p1].state(t)), centered=config["centered"])
                history = fit(lin, phase2_set, 2, strategy[p2], (f"phase2_{p1}{p2}_t{t}", []))
                clean, robust = measure(lin)
                cell = out["cells"][p1 + p2]
                cell["clean"].append(clean)
                cell["robust"].append(robust)
                cell["train_time"].append(history.training_time)
        ref = build(snaps["A"].state(t))
        history = fit(ref, phase2_set, 2, strategy["A"], (f"reference_t{t}", []))
        for key, value in zip(("clean", "robust", "train_time"), (*measure(ref), history.training_time)):
            out["reference"][key].append(value)
    # AutoAttack on the best linearised cell at the last t, and on the reference there
    t_last = config["times"][-1]
    lin = Linearized(build(snaps["A"].state(t_last)), centered=config["centered"])
    fit(lin, phase2_set, 2, strategy["A"], (f"phase2_AA_t{t_last}", []))   # finished: reloaded, not retrained
    ref = build(snaps["A"].state(t_last))
    fit(ref, phase2_set, 2, strategy["A"], (f"reference_t{t_last}", []))
    kw = dict(eps=eps, n=config["n_autoattack"], seed=profile.seed, device=device, version="custom",
              attacks=["apgd-ce"])
    aa_set = data.subset(test_set, config["n_autoattack"], seed=profile.seed)   # the images APGD-CE attacks
    out["autoattack"] = {"t": t_last, "n": config["n_autoattack"], "attacks": "apgd-ce"}
    for key, model in (("linear", lin.eval()), ("reference", ref.eval())):
        out["autoattack"][key] = evaluate.autoattack_accuracy(model, test_set, **kw)
        torch.manual_seed(profile.seed)
        out["autoattack"][f"{key}_pgd"] = float(evaluate.worst_case_accuracy(
            model, aa_set, eps=eps, steps=config["eval_steps"], alpha=config["eval_alpha"], device=device))
    out["aa_state"] = lin.state_dict()
    out["compute_seconds"] = time.perf_counter() - start
    return out
