"""Experiment ``schedule``: normal training first, PGD-AT from a switch epoch on (chapter 5).

Li et al. (arXiv 2312.02236) argue from the lazy phase of the NTK (chapter 4) that a model can be
trained normally first and adversarially later for much less time at equal robustness ("up to
50%"), with the switch epoch picked by hand. This experiment trains, under chapter 4's profile
(:func:`ntklab.experiments.runs.chapter_profile`: same model, eps, PGD and multistep schedule),
PGD-AT models that switch from normal training at several fixed epochs s (fractions
``Settings.switch_fractions`` of the first learning-rate decay: 0 is full PGD-AT, the last switches
at the decay), one whose switch is chosen during the run by ``switch_epoch="auto"``
(:class:`ntklab.callbacks.AutoSwitch`: the centred trace NTK of ``Settings.auto_probe`` training
images at initialisation, with the BN statistics of a statistics-only pass, and after every epoch; switch once the kernel velocity is at most ``Settings.auto_threshold`` of
the first epoch's, at the latest at the first decay), and the normally trained model for reference
(no AT).

Every run is a :func:`ntklab.experiments.runs.kernel_run` (a trace C-NTK of the chapter-4 probe
after every epoch), so full PGD-AT and normal training are the very runs of chapter 4, shared
through the cache. Each model gets, besides the run's clean and worst-case (FGSM and PGD) accuracy
on the test subset, the accuracy under AutoAttack's two untargeted attacks, APGD-CE and APGD-DLR
(``autoattack_accuracy(version="custom")``, 100 iterations each), on a class-balanced subset of
``Settings.autoattack_n`` test images (smoke 32, quick 200, paper ``n_eval``). On the quick full
PGD-AT model they gave the same accuracy on 200 images as the ``"fast"`` version (which adds the
targeted APGD-T) at a fifth of its cost.

The result (a dict, cached by config and package version):

* ``labels``: the runs in order (``"s=0"``, ..., ``"auto"``, ``"normal"``); ``switch_epochs``:
  the epoch each one switched at (``"auto"``: the chosen one; ``"normal"``: ``epochs``, never);
* ``runs[label]``: the run's result without the weights (see ``kernel_run``) plus
  ``autoattack_acc``; ``config``; ``compute_seconds`` (runs, AutoAttack and the step costs, wall
  seconds, also when the runs came from the cache);
* ``step_seconds``: ``{"normal": s, "pgd": s}``, the seconds per batch of a normal training step
  and of a PGD-k one (attack + update) on the chapter's model, measured after the runs by
  :func:`ntklab.clock.step_cost` (``Settings.cost_rounds`` interleaved rounds over
  ``Settings.cost_batches`` batches; process-CPU seconds on the CPU, which other work on a shared
  machine disturbs far less than the whole runs' seconds).

:func:`analyse` turns a result into the numbers chapter 5 discusses, :func:`claims` into its claims
(:mod:`ntklab.claims`), which the chapter shows as a table and asserts under ``quick``.

    >>> result = ntklab.experiments.run(NAME, "quick")
    >>> analysis = analyse(result)
    >>> ntklab.claims.check(claims(analysis, "quick"), "quick")
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ntklab import metrics
from ntklab.claims import Claim, all_of, compare
from ntklab.config import Profile
from ntklab.experiments import RunContext, experiment
from ntklab.experiments.runs import chapter_profile, kernel_runs, run_config

__all__ = ["run", "make_config", "analyse", "claims", "Settings", "TOLERANCE", "NAME"]

NAME = "schedule"
TOLERANCE = 0.03  # "as robust as full PGD-AT": at most 3 points of worst-case robust accuracy lost (fixed before the run)


@dataclass(frozen=True)
class Settings:
    """Chapter 5 under one profile.

    profile: chapter 4's profile (:func:`ntklab.experiments.runs.chapter_profile`);
    autoattack_n: test images for APGD-CE and APGD-DLR (smoke 32, quick 200, otherwise ``n_eval``);
    switch_fractions: the fixed switch epochs as fractions of the first decay (0: full PGD-AT);
    auto_threshold, auto_probe: the automatic switch's rule (velocity at most this fraction of the
    first epoch's, on a probe of this many training images; the cap is the first decay);
    autoattack_attacks: AutoAttack's attacks run on every model;
    cost_rounds, cost_batches: the per-batch step costs (:func:`ntklab.clock.step_cost`), this many
    interleaved rounds over this many training batches (smoke 3 and 2).
    """

    profile: Profile
    autoattack_n: int
    switch_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)
    auto_threshold: float = 0.2
    auto_probe: int = 32
    autoattack_attacks: tuple[str, ...] = ("apgd-ce", "apgd-dlr")
    cost_rounds: int = 7
    cost_batches: int = 4

    @classmethod
    def for_profile(cls, profile: Profile) -> "Settings":
        cp = chapter_profile(profile)
        cost = {"cost_rounds": 3, "cost_batches": 2} if profile.name == "smoke" else {}
        return cls(cp, autoattack_n={"smoke": 32, "quick": 200}.get(profile.name, cp.n_eval), **cost)

    @property
    def switch_epochs(self) -> list[int]:
        """The fixed switch epochs: ``switch_fractions`` of the first decay (of half the epochs
        without decays), rounded, without repeats."""
        cp = self.profile
        first = min(cp.lr_milestones) if cp.lr_milestones else cp.epochs // 2
        return sorted({round(f * first) for f in self.switch_fractions})

    def run_specs(self) -> list[tuple[str, str, dict, bool]]:
        """(label, strategy, train overrides, AE-NTK) of every run; full PGD-AT and normal training
        are configured exactly as in chapter 4 (AE-NTK for PGD, none for normal) to share its runs."""
        runs = [(f"s={s}", "pgd", {} if s == 0 else {"switch_epoch": s}, s == 0) for s in self.switch_epochs]
        auto = {"switch_epoch": "auto", "switch_threshold": self.auto_threshold, "switch_probe": self.auto_probe}
        return runs + [("auto", "pgd", auto, False), ("normal", "normal", {}, False)]


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    st = Settings.for_profile(profile)
    specs = st.run_specs()
    return {"profile": st.profile.to_dict(), "labels": [r[0] for r in specs],
            "runs": [run_config(st.profile, strategy, "multistep", ae, kw) for _, strategy, kw, ae in specs],
            "autoattack": {"attacks": list(st.autoattack_attacks), "n": st.autoattack_n, "seed": st.profile.seed},
            "cost": {"rounds": st.cost_rounds, "batches": st.cost_batches, "seed": st.profile.seed}}


@experiment(NAME, "normal training first, PGD-AT after a fixed or automatic switch epoch: time, clean, "
                  "worst-case and AutoAttack accuracy, final kernels (chapter 5)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Train the runs of chapter 5 under ``profile`` (see the module docstring for the result)."""
    return _compute(Settings.for_profile(ctx.profile), ctx.config, ctx.device, ctx.force, ctx.progress)


def _compute(st: Settings, config, device, force, progress) -> dict:
    from ntklab import evaluate
    from ntklab.config import get_device
    from ntklab.experiments import data_from_profile, model_from_profile

    cp = st.profile
    device = get_device(device)
    train_set, test_set = data_from_profile(cp)
    aa = config["autoattack"]
    out = {"labels": list(config["labels"]), "switch_epochs": {}, "runs": {}, "config": config,
           "compute_seconds": 0.0}
    todo = st.run_specs()
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
    start = time.perf_counter()
    out["step_seconds"] = _step_costs(cp, config["cost"], train_set, device)
    out["compute_seconds"] += time.perf_counter() - start
    return out


def _step_costs(cp, cost, train_set, device) -> dict:
    """Seconds per batch of a normal and of a PGD-k training step (attack + update, as in
    :func:`ntklab.train.train` under the chapter profile ``cp``), by :func:`ntklab.clock.step_cost`:
    ``cost["rounds"]`` rounds, each giving both steps in turn the same ``cost["batches"]`` training
    batches, each on its own copy of one initialisation. Returns ``{"normal": s, "pgd": s}``."""
    import copy
    import itertools

    import torch

    from ntklab import attacks
    from ntklab.clock import step_cost
    from ntklab.config import seed_everything
    from ntklab.experiments import model_from_profile
    from ntklab.train import TrainConfig, attack_arguments, sgd_step

    x, y = train_set.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cost["seed"]))
    batches = [(x[i].to(device), y[i].to(device)) for i in perm[: cost["batches"] * cp.batch_size].split(cp.batch_size)]
    seed_everything(cp.seed)
    net0 = model_from_profile(cp).to(device)

    def step(strategy):
        tc = TrainConfig.from_profile(cp, strategy)
        net = copy.deepcopy(net0)
        opt = torch.optim.SGD(net.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        kw = attack_arguments(strategy, tc.eps, tc.alpha, tc.steps, tc.attack_bn_mode)
        cycle = itertools.cycle(batches)  # every round: each batch once

        def one():
            xb, yb = next(cycle)
            net.train()
            if strategy != "normal":
                xb = attacks.adversarial_examples(strategy, net, xb, yb, **kw)
            sgd_step(net, opt, xb, yb)
        return one

    return step_cost({s: step(s) for s in ("normal", "pgd")}, rounds=cost["rounds"], batches=len(batches),
                     device=device)


# ------------------------------------------------------------------ analysis
def _passes(history, k: int) -> int:
    """Forward-backward passes per training image: 1 for a normal epoch, k + 1 for a PGD-k one."""
    return sum(1 if s == "normal" else k + 1 for s in history["strategy"])


def analyse(result: dict, tolerance: float = TOLERANCE) -> dict:
    """The numbers chapter 5 discusses, from a result of :func:`run`.

    Returns a dict: ``labels``, ``fixed`` (the fixed switches, full PGD-AT first), ``epochs``,
    ``decays``, ``cap`` (the first decay), ``pgd_steps``, ``tolerance``; per label (dicts keyed by
    label): ``switch_epoch``, ``clean_acc``, ``robust_acc`` (worst case of FGSM and PGD),
    ``autoattack_acc``, ``cpu_training_time``, ``training_time`` (wall), ``passes`` (forward-backward
    passes per image), ``saving`` (1 - passes / full PGD-AT's), ``cpu_saving`` (the same in CPU
    seconds), ``loss`` (full PGD-AT's robust accuracy minus the schedule's), ``velocity`` (centred
    C-NTK velocity per epoch), ``to_full`` (centred KD of the final kernel to full PGD-AT's), ``jump``
    (velocity in the first adversarial epoch / in the last normal one, for switches inside the run),
    ``predicted_saving`` (the fixed switches' saving by the formula of the chapter);
    ``step_seconds`` and ``step_ms`` (``{"normal", "pgd"}``: the measured seconds and milliseconds
    per batch of a normal and of a PGD-k training step), ``step_ratio`` (PGD-k's / normal's),
    ``step_cost`` (per label: the schedule's cost relative to full PGD-AT's predicted from the
    per-batch costs, ``(s c_normal + (E - s) c_pgd) / (E c_pgd)``, without the automatic switch's
    kernels) and ``step_saving`` (1 - ``step_cost``); the choices:
    ``recommended`` (the latest fixed switch within the tolerance), ``best`` (the fixed switch with
    the highest robust accuracy), ``half`` (the middle fixed switch), ``last`` (the switch at the
    first decay), each with ``<choice>_saving``, ``_cpu_saving``, ``_step_saving``, ``_loss`` and
    ``_switch``; the automatic switch (also ``auto_saving``, ``auto_cpu_saving``, ``auto_step_saving``): ``auto_velocity`` (the velocities per unit of lr it measured),
    ``measure_share`` (its kernel measurements' share of its training time, both wall seconds),
    ``auto_minus_best`` (its robust accuracy minus the best fixed choice's); and
    ``normal_velocity_per_lr`` (normal training's centred C-NTK velocity per unit of lr on chapter 4's
    probe), ``normal_lazy_onset`` and ``lazy_rule_switch`` (the switch chapter 4's rule gives on it).
    """
    profile = result["config"]["profile"]
    epochs, decays, k = int(profile["epochs"]), [int(m) for m in profile["lr_milestones"]], int(profile["pgd_steps"])
    labels, runs, switch = list(result["labels"]), result["runs"], {l: int(e) for l, e in result["switch_epochs"].items()}
    fixed = [l for l in labels if l.startswith("s=")]
    full = runs[fixed[0]]
    cap = decays[0] if decays else epochs // 2
    a = {"labels": labels, "fixed": fixed, "epochs": epochs, "decays": decays, "cap": cap, "pgd_steps": k,
         "tolerance": tolerance, "switch_epoch": switch, "n_autoattack": int(result["config"]["autoattack"]["n"])}
    for key in ("clean_acc", "robust_acc", "autoattack_acc", "cpu_training_time", "training_time"):
        a[key] = {l: float(runs[l][key]) for l in labels}
    a["passes"] = {l: _passes(runs[l]["history"], k) for l in labels}
    a["saving"] = {l: 1 - a["passes"][l] / a["passes"][fixed[0]] for l in labels}
    a["cpu_saving"] = {l: 1 - runs[l]["cpu_training_time"] / full["cpu_training_time"] for l in labels}
    a["loss"] = {l: full["robust_acc"] - runs[l]["robust_acc"] for l in labels}
    a["predicted_saving"] = {l: 1 - (switch[l] + (epochs - switch[l]) * (k + 1)) / (epochs * (k + 1)) for l in fixed}
    a.update(_step_analysis(result["step_seconds"], switch, epochs))
    good = [l for l in fixed if a["loss"][l] <= tolerance]
    a["recommended"] = max(good, key=lambda l: switch[l]) if good else None
    a["best"] = max(fixed, key=lambda l: runs[l]["robust_acc"])
    a["half"], a["last"] = fixed[len(fixed) // 2], fixed[-1]
    for name in ("recommended", "half", "last", "best"):  # the numbers the chapter quotes for each choice
        l = a[name]
        a[f"{name}_saving"] = a["saving"][l] if l else math.nan
        a[f"{name}_cpu_saving"] = a["cpu_saving"][l] if l else math.nan
        a[f"{name}_step_saving"] = a["step_saving"][l] if l else math.nan
        a[f"{name}_loss"] = a["loss"][l] if l else math.nan
        a[f"{name}_switch"] = switch[l] if l else -1
    a.update(_auto(result, a, cap))
    a["velocity"] = {l: metrics.kernel_velocity(runs[l]["kernels"]["clean"], center=True).tolist() for l in labels}
    a["to_full"] = {l: metrics.kernel_distance(runs[l]["kernels"]["clean"][-1], full["kernels"]["clean"][-1], center=True)
                    for l in labels}
    a["jump"] = {l: a["velocity"][l][switch[l]] / a["velocity"][l][switch[l] - 1]
                 for l in labels if 0 < switch[l] < epochs}
    a["compute_seconds"] = float(result["compute_seconds"])
    return a


def _step_analysis(step_seconds, switch, epochs) -> dict:
    """The measured per-batch costs and each schedule's cost and saving predicted from them."""
    c = {m: float(step_seconds[m]) for m in ("normal", "pgd")}
    cost = {l: (s * c["normal"] + (epochs - s) * c["pgd"]) / (epochs * c["pgd"]) for l, s in switch.items()}
    return {"step_seconds": c, "step_ms": {m: 1000 * v for m, v in c.items()}, "step_ratio": c["pgd"] / c["normal"],
            "step_cost": cost, "step_saving": {l: 1 - v for l, v in cost.items()}}


def _auto(result, a, cap) -> dict:
    """The automatic switch: what it measured, what it cost, and where chapter 4's rule puts the
    switch on normal training's curve."""
    runs = result["runs"]
    if "auto" not in runs:
        return {}
    auto, normal = runs["auto"], runs["normal"]
    lr_clock = np.concatenate([[0.0], np.cumsum(normal["lr_time"])])[normal["kernels"]["epochs"]]
    normal_v = metrics.kernel_velocity(normal["kernels"]["clean"], times=lr_clock, center=True)
    onset = metrics.lazy_onset(normal_v)
    return {"auto_velocity": [float(v) for v in auto["history"]["extra"].get("switch_velocity", []) if v is not None],
            "auto_saving": a["saving"]["auto"], "auto_cpu_saving": a["cpu_saving"]["auto"],
            "auto_step_saving": a["step_saving"]["auto"],
            "auto_switch": a["switch_epoch"]["auto"],
            "auto_minus_best": auto["robust_acc"] - runs[a["best"]]["robust_acc"],
            "measure_seconds": float(sum(auto["history"]["time_switch"])),
            "measure_share": sum(auto["history"]["time_switch"]) / auto["training_time"],
            "normal_velocity_per_lr": normal_v.tolist(), "normal_lazy_onset": onset,
            "lazy_rule_switch": min(onset + 1, cap) if onset is not None else -1,
            "n_probe": int(normal["kernels"]["clean"].shape[-1])}


# ------------------------------------------------------------------ claims
def claims(analysis: dict, profile) -> list[Claim]:
    """The claims of chapter 5 on the output of :func:`analyse`, numbered as in the chapter; asserted
    under ``quick`` (the thresholds were written for its numbers), shown under every profile; the
    last, on the measured per-batch costs, is an observation that nothing asserts."""
    a, tol = analysis, analysis["tolerance"]
    fixed, robust, full, normal = a["fixed"], a["robust_acc"], a["fixed"][0], "normal"
    switched = [l for l in a["labels"] if l not in (full, normal)]
    auto = a["switch_epoch"].get("auto", math.nan)
    return [
        compare("pgd_trains", "Full PGD-AT trains at this radius: its worst-case robust accuracy is at least 0.75.",
                robust[full], ">=", 0.75),
        all_of("half_keeps_robustness", "Switching half-way to the first decay keeps the robustness: it loses at most "
               "the tolerance (loss: full PGD-AT's robust accuracy minus its own) and saves at least 10% of the "
               "passes.", [compare("loss", "", a["half_loss"], "<=", tol),
                           compare("saving", "", a["half_saving"], ">=", 0.10)]),
        all_of("decay_costs_robustness", "Switching at the first decay costs robustness: it saves the most passes of "
               "the fixed switches, at least 25%, but loses more than the tolerance.",
               [compare("saving", "", a["last_saving"], ">=", 0.25),
                compare("largest saving", "", a["last_saving"], "==", max(a["saving"][l] for l in fixed)),
                compare("loss", "", a["last_loss"], ">", tol)]),
        compare("saving_below_30", "The 30% saving does not show at this scale: the recommended schedule (the latest "
                "fixed switch within the tolerance) saves less than 30% of the passes.",
                a["recommended_saving"], "<", 0.30),
        all_of("auto_switch", "The automatic switch lands in the lazy phase and among the good choices: it switches "
               "between epoch 2 and the first decay, its worst-case robust accuracy is at least the best fixed "
               "choice's minus the tolerance, and its kernel measurements cost less than 2% of its training time.",
               [compare("epoch", "", auto, ">=", 2), compare("epoch", "", auto, "<=", a["cap"]),
                compare("robust", "", robust.get("auto", math.nan), ">=", robust[a["best"]] - tol),
                compare("measurement share", "", a.get("measure_share", math.nan), ">", 0),
                compare("measurement share", "", a.get("measure_share", math.nan), "<", 0.02)]),
        all_of("kernel_trace", "Normal epochs first leave a trace in the kernel: every switched schedule ends with a "
               "C-NTK closer to full PGD-AT's than normal training's is, but not equal to it (centred KD to full "
               "PGD-AT's final kernel).",
               [p for l in switched for p in (compare(l, "", a["to_full"][l], ">", 0),
                                              compare(l, "", a["to_full"][l], "<", a["to_full"][normal]))]),
        compare("cpu_normal_cheaper", "Of the CPU seconds, only the several-fold gap: normal training takes fewer CPU "
                "seconds than full PGD-AT (threshold: full PGD-AT's).",
                a["cpu_training_time"][normal], "<", a["cpu_training_time"][full]),
        compare("pgd_step_cost", f"A PGD-{a['pgd_steps']} training step costs more than twice a normal one: the "
                "per-batch cost ratio PGD / normal, measured interleaved (ntklab.clock.step_cost), is above 2 "
                "(an observation: a shared CPU can move it).", a["step_ratio"], ">", 2, profiles=()),
    ]
