"""Experiment ``strategies``: the NTK of four training strategies over a whole run (chapter 4).

Li et al. (arXiv 2312.02236) describe the empirical NTK under (adversarial) training in three
phases: kernel learning, lazy training until the first learning-rate decay, kernel learning again
after it. This experiment trains one model per strategy (normal training, FGSM-RS, PGD-AT and
TRADES; Wong et al. 2020, Madry et al. 2018, Zhang et al. 2019), all from the same initialisation
and the same shuffling, under one multistep schedule with decays at 50% and 75% of the epochs (the
fractions of the paper's 100 and 150 of 200), and, as a control the paper did not run, normal
training under a cosine and a constant learning rate. After every epoch
:class:`ntklab.callbacks.KernelSnapshots` takes the trace C-NTK of a fixed class-balanced probe set
(sorted by class) and, for the adversarial strategies, the AE-NTK (PGD examples against the model
at that epoch). Each run is evaluated at the end on the profile's test subset: clean accuracy and
robust accuracy, per example the worst of FGSM and PGD.

Each run is one entry of the result cache (:func:`ntklab.experiments.runs.kernel_run`), so chapter 5
(experiment ``schedule``) shares the full PGD-AT run with this chapter. The settings per profile are
those of :mod:`ntklab.experiments.runs` (:class:`Settings` holds them with the chapter's runs).

The result (a dict, cached by config and the package's source):

* ``strategies``, ``schedules``: the names; ``runs[schedule][strategy]``: the result of
  :func:`ntklab.experiments.runs.kernel_run` without the weights (the multistep schedule has every
  strategy, the controls ``CONTROL_STRATEGIES``); ``config``; ``probe_y`` (n,);
* ``compute_seconds``: wall seconds of the runs' computation (also when loaded from the run cache),
  ``kernel_seconds``: the part of it spent on kernel snapshots.

:func:`analyse` turns a result into the numbers chapter 4 discusses, :func:`claims` into its claims
(:mod:`ntklab.claims`), which the chapter shows as a table and asserts under ``quick``.

    >>> result = ntklab.experiments.run(NAME, "quick")
    >>> analysis = analyse(result)
    >>> ntklab.claims.check(claims(analysis, "quick"), "quick")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ntklab import metrics
from ntklab.claims import Claim, all_of, compare
from ntklab.config import Profile
from ntklab.experiments import RunContext, experiment
from ntklab.experiments.runs import chapter_profile, kernel_runs, run_config

__all__ = ["run", "make_config", "analyse", "claims", "Settings", "STRATEGIES", "SCHEDULES",
           "CONTROL_STRATEGIES", "NAME"]

NAME = "strategies"
STRATEGIES = ("normal", "fgsm_rs", "pgd", "trades")
SCHEDULES = ("multistep", "cosine", "constant")
CONTROL_STRATEGIES = ("normal",)


@dataclass(frozen=True)
class Settings:
    """Chapter 4 under one profile: ``profile``, the chapter profile of
    :func:`ntklab.experiments.runs.chapter_profile` (model, eps, PGD, epochs and decays per profile,
    see :class:`ntklab.experiments.runs.RunSettings`); ``strategies``, trained under the step
    schedule (the adversarial ones with the AE-NTK); ``controls``, the strategies also trained under
    the other ``schedules``."""

    profile: Profile
    strategies: tuple[str, ...] = STRATEGIES
    controls: tuple[str, ...] = CONTROL_STRATEGIES
    schedules: tuple[str, ...] = SCHEDULES

    @classmethod
    def for_profile(cls, profile: Profile, strategies=STRATEGIES, controls=CONTROL_STRATEGIES) -> "Settings":
        return cls(chapter_profile(profile), tuple(strategies), tuple(controls))

    def run_specs(self) -> list[tuple[str, str, bool]]:
        """``(strategy, schedule, ae)`` of every run, in order: each strategy under the step
        schedule, then the controls under the other schedules."""
        specs = [(s, self.schedules[0], s != "normal") for s in self.strategies]
        return specs + [(s, sched, False) for sched in self.schedules[1:] for s in self.controls]


def make_config(profile, strategies=STRATEGIES, controls=CONTROL_STRATEGIES) -> dict:
    """Everything the result depends on (the cache key): the chapter profile and the runs."""
    st = Settings.for_profile(profile, strategies, controls)
    return {"profile": st.profile.to_dict(), "strategies": list(st.strategies), "controls": list(st.controls),
            "runs": [run_config(st.profile, s, sched, ae) for s, sched, ae in st.run_specs()]}


@experiment(NAME, "normal, FGSM-RS, PGD and TRADES training under a step schedule, normal training "
                  "under cosine and constant rates: the trace C-NTK/AE-NTK after every epoch (chapter 4)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Train the runs of chapter 4 under ``profile`` (see the module docstring for the result);
    ``strategies`` and ``controls`` as in :func:`make_config`."""
    st = Settings.for_profile(ctx.profile, ctx.config["strategies"], ctx.config["controls"])
    return _compute(st, ctx.config, ctx.device, ctx.force, ctx.progress)


def _compute(st: Settings, config, device, force, progress) -> dict:
    out = {"strategies": list(st.strategies), "schedules": list(st.schedules), "config": config,
           "runs": {s: {} for s in st.schedules}, "compute_seconds": 0.0, "kernel_seconds": 0.0}
    todo = st.run_specs()
    results = kernel_runs(st.profile, [{"strategy": s, "schedule": sched, "ae": ae} for s, sched, ae in todo],
                          device=device, force=force, progress=progress, desc=f"{NAME}: epochs of {len(todo)} runs")
    for (strategy, schedule, ae), res in zip(todo, results):
        out["runs"][schedule][strategy] = {k: v for k, v in res.items() if k != "state_dict"}
        out["compute_seconds"] += res["compute_seconds"]
        out["kernel_seconds"] += res["kernel_seconds"]
        out["probe_y"] = res["probe_y"]
    return out


# ------------------------------------------------------------------ analysis
def _index(ticks, epoch) -> int:
    """The index of the first snapshot taken after ``epoch`` or later completed epochs."""
    return next(i for i, t in enumerate(ticks) if t >= epoch)


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else math.nan


def _run_curves(run, ticks) -> dict:
    """The per-run numbers of the chapter: velocities in both clocks (centred C-NTK), their phases,
    the batch-norm floor, distances from initialisation, effective rank, accuracies and costs."""
    K = run["kernels"]["clean"]
    lr_clock = np.concatenate([[0.0], np.cumsum(run["lr_time"])])[ticks]
    v = metrics.kernel_velocity(K, times=ticks, center=True)
    v_lr = metrics.kernel_velocity(K, times=lr_clock, center=True)
    from_init = [metrics.kernel_distance(K[0], k, center=True) for k in K]
    from_init_u = [metrics.kernel_distance(K[0], k) for k in K]
    phases = {"per_epoch": metrics.split_phases(v), "per_lr": metrics.split_phases(v_lr)}
    return {"velocity": v.tolist(), "velocity_per_lr": v_lr.tolist(),
            "phases_per_epoch": phases["per_epoch"], "phases_per_lr": phases["per_lr"],
            "n_phases_per_epoch": len(phases["per_epoch"]), "n_phases_per_lr": len(phases["per_lr"]),
            "floor": metrics.kernel_distance(K[-1], run["bn_refresh"], center=True),
            "from_init": from_init, "from_init_uncentred": from_init_u,
            "centring_ratio": _ratio(from_init[-1], from_init_u[-1]),
            "effective_rank": [metrics.effective_rank(k, center=True) for k in K],
            "lr_time": [float(x) for x in run["lr_time"]],
            **{k: float(run[k]) for k in ("clean_acc", "robust_acc", "cpu_training_time", "training_time",
                                          "kernel_seconds")}}


def analyse(result: dict) -> dict:
    """The numbers chapter 4 discusses, from a result of :func:`run`.

    Velocities are of the centred trace C-NTK between consecutive snapshots, per epoch and per unit
    of learning rate (:func:`ntklab.metrics.kernel_velocity` with the epochs, or the cumulative mean
    learning rate, as times); velocity entry ``i`` covers snapshot ``i`` to ``i + 1`` (with a
    snapshot after every epoch: epoch ``i``, 0-based). ``decay_index`` is the entry of the first
    epoch after the first decay, ``before`` the (up to) three entries before it.

    Returns a dict: ``epochs``, ``decays`` (epochs after which the rate decays), ``snapshot_epochs``,
    ``strategies``, ``adversarial``; ``runs[schedule][strategy]`` (see ``_run_curves``: velocity
    curves, phases, ``floor``, distances from initialisation, ``effective_rank``, accuracies, costs);
    per strategy under the step schedule: ``lazy_onset`` (entry at which lazy training starts, or
    ``None``), ``lazy_fall`` (first velocity / velocity there), ``slower`` (largest velocity per epoch
    after the first decay / median before), ``burst`` (velocity per unit of lr in the first epoch after
    the decay / median before), ``velocity_after_decay`` and ``floor`` (the per-epoch velocity there
    and the batch-norm floor), ``lazy_path`` (KD from epoch 1 to the first decay), ``after_decay``
    (KD from the first decay to the end), ``effective_rank_init``/``_decay``/``_end``, ``pairwise``
    (KD between every pair of snapshots), ``polar`` (radius, angle); per adversarial strategy:
    ``cross``/``cross_uncentred`` (KD to normal training's kernel at every snapshot), ``apart`` (that
    distance at the end / at the first decay), ``clean_vs_ae`` (KD between its C-NTK and AE-NTK);
    ``relearn_per_epoch``/``relearn_per_lr`` (strategies with kernel learning again after the first
    decay) and their counts; the controls: ``constant_rise``, ``cosine_late_epochs``,
    ``step_velocity_after_second_decay``; costs: ``compute_seconds``, ``kernel_share``, ``n_runs``.
    """
    profile = result["config"]["profile"]
    epochs, decays = int(profile["epochs"]), [int(m) for m in profile["lr_milestones"]]
    names = list(result["strategies"])
    adversarial = [s for s in names if s != "normal"]
    step = result["runs"]["multistep"]
    ticks = [int(t) for t in step[names[0]]["kernels"]["epochs"]]
    d = _index(ticks, decays[0] if decays else epochs // 2)
    before = slice(max(0, d - 3), d)
    runs = {sched: {s: _run_curves(r, ticks) for s, r in group.items()} for sched, group in result["runs"].items()}
    a = {"epochs": epochs, "decays": decays, "first_decay": ticks[d], "decay_index": d,
         "snapshot_epochs": ticks, "velocity_epochs": ticks[1:], "strategies": names, "adversarial": adversarial,
         "runs": runs}
    for key in ("lazy_onset", "lazy_fall", "slower", "burst", "velocity_after_decay", "floor", "lazy_path",
                "after_decay", "effective_rank_init", "effective_rank_decay", "effective_rank_end", "pairwise", "polar",
                "cross", "cross_uncentred", "clean_vs_ae", "apart"):
        a[key] = {}
    for s in names:
        c, K = runs["multistep"][s], step[s]["kernels"]["clean"]
        v, v_lr = np.asarray(c["velocity"]), np.asarray(c["velocity_per_lr"])
        onset = metrics.lazy_onset(v)
        a["lazy_onset"][s] = onset
        a["lazy_fall"][s] = _ratio(v[0], v[onset]) if onset is not None else math.nan
        a["slower"][s] = float(v[d:].max() / np.median(v[before]))
        a["burst"][s] = float(v_lr[d] / np.median(v_lr[before]))
        a["velocity_after_decay"][s] = float(v[d])
        a["floor"][s] = c["floor"]
        a["lazy_path"][s] = metrics.kernel_distance(K[1], K[d], center=True)
        a["after_decay"][s] = metrics.kernel_distance(K[d], K[-1], center=True)
        er = c["effective_rank"]
        a["effective_rank_init"][s], a["effective_rank_decay"][s], a["effective_rank_end"][s] = er[0], er[d], er[-1]
        a["pairwise"][s] = [[metrics.kernel_distance(x, y, center=True) for y in K] for x in K]
        radius, angle = metrics.polar_dynamics(K, center=True)
        a["polar"][s] = {"radius": np.asarray(radius).tolist(), "angle": np.asarray(angle).tolist()}
    for s in adversarial:
        pairs = list(zip(step["normal"]["kernels"]["clean"], step[s]["kernels"]["clean"]))
        a["cross"][s] = [metrics.kernel_distance(x, y, center=True) for x, y in pairs]
        a["cross_uncentred"][s] = [metrics.kernel_distance(x, y) for x, y in pairs]
        a["clean_vs_ae"][s] = [metrics.kernel_distance(x, y, center=True)
                               for x, y in zip(step[s]["kernels"]["clean"], step[s]["kernels"]["ae"])]
        a["apart"][s] = _ratio(a["cross"][s][-1], a["cross"][s][d])
    for clock in ("epoch", "lr"):
        relearn = [s for s in names if any(p == metrics.PHASES[0] and start >= d
                                           for p, start, _ in runs["multistep"][s][f"phases_per_{clock}"])]
        a[f"relearn_per_{clock}"], a[f"n_relearn_per_{clock}"] = relearn, len(relearn)
    a.update(_controls(result, runs, ticks, d, before, float(profile["lr"])))
    n_runs = sum(len(g) for g in result["runs"].values())
    a.update(compute_seconds=float(result["compute_seconds"]), kernel_seconds=float(result["kernel_seconds"]),
             kernel_share=_ratio(result["kernel_seconds"], result["compute_seconds"]), n_runs=n_runs,
             n_snapshots=len(ticks))
    return a


def _controls(result, runs, ticks, d, before, lr) -> dict:
    """The numbers of the schedules without a step decay (NaN where a control was not run)."""
    out = {"constant_rise": math.nan, "cosine_late_epochs": [], "step_velocity_after_second_decay": math.nan}
    if "normal" in runs.get("constant", {}):
        v_lr = np.asarray(runs["constant"]["normal"]["velocity_per_lr"])
        out["constant_rise"] = float(v_lr[_index(ticks, ticks[-1] // 2):].max() / np.median(v_lr[before]))
    if "normal" in runs.get("cosine", {}):
        lr_time = result["runs"]["cosine"]["normal"]["lr_time"]
        out["cosine_late_epochs"] = [t + 1 for t, x in enumerate(lr_time) if x < 0.02 * lr]
    if "normal" in runs["multistep"]:
        decays = result["config"]["profile"]["lr_milestones"]
        v = np.asarray(runs["multistep"]["normal"]["velocity"])
        out["step_velocity_after_second_decay"] = float(v[_index(ticks, decays[-1]):].mean()) if decays else math.nan
    return out


# ------------------------------------------------------------------ claims
def claims(analysis: dict, profile) -> list[Claim]:
    """The claims of chapter 4 on the output of :func:`analyse`, numbered as in the chapter; asserted
    under ``quick`` (the thresholds were written for its numbers), shown under every profile. Each
    combines one comparison per strategy (or run) with :func:`ntklab.claims.all_of`."""
    a, names, adversarial = analysis, analysis["strategies"], analysis["adversarial"]

    def per(label, values, op, threshold, parts_of):
        thresholds = threshold if isinstance(threshold, dict) else {s: threshold for s in parts_of}
        return [compare(f"{s}{label}", "", math.nan if values[s] is None else values[s], op, thresholds[s])
                for s in parts_of]

    const = a["runs"].get("constant", {}).get("normal", {})
    cosine = a["runs"].get("cosine", {}).get("normal", {})
    centring = {f"{sched}/{s}": r["centring_ratio"] for sched, group in a["runs"].items() for s, r in group.items()}
    return [
        all_of("lazy_early", "Kernel learning, then lazy training: each strategy's centred velocity falls 5x below "
               "its first epoch's within the first quarter of the epochs (the epoch index, 0-based, at which it does).",
               per("", a["lazy_onset"], "<", a["epochs"] // 4, names)),
        all_of("slower_after_decay", "Per epoch, the decays start no third phase: after the first decay every "
               "strategy's kernel moves more slowly than in the three epochs before it (largest velocity after / "
               "median before). Reported, not asserted: it did not hold on every seed.",
               per("", a["slower"], "<", 1, names), profiles=()),
        all_of("burst_per_lr", "Per unit of learning rate, the first decay is a burst: every strategy's velocity in "
               "the first epoch after it is at least twice its median over the three epochs before.",
               per(" burst", a["burst"], ">=", 2, names)),
        all_of("no_burst_without_step", "Without a step decay there is no burst: under a constant rate normal "
               "training's velocity per unit of learning rate in the second half stays below twice its median over "
               "the three epochs before the first decay (rise), with two phases; under the cosine schedule it has "
               "two phases per epoch, kernel learning then lazy training.",
               [compare("constant rise", "", a["constant_rise"], "<", 2),
                compare("constant phases", "", const.get("n_phases_per_lr", math.nan), "==", 2),
                compare("cosine phases", "", cosine.get("n_phases_per_epoch", math.nan), "==", 2)]),
        all_of("no_drawing_apart", "The strategies' kernels do not draw apart after the decay: the centred distance "
               "between normal training's kernel and each adversarial strategy's changes by less than 25% between the "
               "first decay and the end (apart: end / decay), and each strategy's kernel moves less from the decay to "
               "the end than half of what it moved from epoch 1 to the decay (KD after the decay).",
               [p for s in adversarial for p in (compare(f"{s} apart", "", a["apart"][s], ">", 0.75),
                                                 compare(f"{s} apart", "", a["apart"][s], "<", 1.25))]
               + per(" after", a["after_decay"], "<", {s: 0.5 * a["lazy_path"][s] for s in names}, names)),
        all_of("centring_matters", "Centring matters: in every run the centred kernel moves farther from its "
               "initialisation than the uncentred one (centred / uncentred distance at the end).",
               per("", centring, ">", 1, list(centring))),
        all_of("adversarial_concentrates", "Adversarial training concentrates the kernel: at the end each "
               "adversarial strategy's centred C-NTK has a smaller effective rank than normal training's (rank); and "
               "the AE-NTK converges to the C-NTK: their centred distance is less than half of what it was at "
               "initialisation (KD).",
               per(" rank", a["effective_rank_end"], "<", a["effective_rank_end"].get("normal", math.nan), adversarial)
               + per(" KD", {s: a["clean_vs_ae"][s][-1] for s in adversarial}, "<",
                     {s: 0.5 * a["clean_vs_ae"][s][0] for s in adversarial}, adversarial)),
        all_of("above_bn_floor", "The burst is more than batch-norm bookkeeping: every strategy's per-epoch velocity "
               "in the first epoch after the decay is at least 3x the motion that refreshing the batch-norm "
               "statistics alone causes (velocity; floor). Reported, not asserted: it did not hold on every seed.",
               per(" velocity", a["velocity_after_decay"], ">=", {s: 3 * a["floor"][s] for s in names}, names),
               profiles=()),
    ]
