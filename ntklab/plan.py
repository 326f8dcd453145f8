"""What an experiment will compute under a profile, before anything starts, and what it will cost.

:func:`plan` lists every training run, kernel and AutoAttack evaluation of every registered
experiment under a profile (``python -m ntklab plan --profile paper``); :func:`project` turns the
list into hours from three measured costs (``python bench/gpu.py --out costs.json`` writes them).
Nothing is computed, trained or downloaded: the list comes from the same settings objects the
experiments run with (each experiment module's ``Settings.for_profile``,
:class:`ntklab.experiments.runs.RunSettings`, the chapter profiles), through a function
``plan(profile) -> list[PlannedRun]`` at the end of each experiment module.

How the cost is counted (the book's model, an estimate, not a measurement):

* a training run makes ``epochs x n_train x passes`` image-passes, one image-pass being one
  forward and one backward pass of one image through the run's model. ``passes`` per example and
  epoch: normal training 1; the single-step attacks (``fgsm``, ``fgsm_rs``, ``n_fgsm``,
  ``fgsm_logscale``, ``fgsm_pca``) 2 (the attack's pass and the update's); PGD-k k + 1; TRADES-k
  k + 2 (k steps, the clean and the adversarial logits of the update); ``gradalign`` 5 (FGSM's two,
  the input gradient at a random point of the ball, and its double backward counted as two; chapter 6
  measured about 10 on the CPU, so the count is low for it); ``clean_update`` (chapter 8)
  adds 1; a run that switches after s normal epochs (chapter 5) averages its epochs. The noise,
  projection and optimiser work are left out;
* ``eval_passes`` are the other image-passes of a run, in total (not per example): attacks at test
  time (an attack of k steps: k passes per image), clean evaluations and the BN-statistics passes
  (a forward pass counted as :data:`FORWARD` of a pass);
* ``kernel_images``: one entry n per n x n trace NTK (a full NTK of k outputs counts as k trace
  kernels); its cost is ``kernel_500_seconds * (n / 500) ** 2``;
* ``autoattack_images``: images AutoAttack (or its APGD-CE alone) attacks, at
  ``autoattack_seconds_per_image``;
* ``settings["pass_cost"]`` (default 1): the cost of the run's model relative to the profile's
  model (multiply-accumulates of one forward pass, :func:`relative_cost`; a linearised model counts
  3, :func:`ntklab.experiments.frozen_kernel.paper_cost_estimate`); every part of the run (passes,
  kernels, AutoAttack) is scaled by it. The measured costs are those of the profile's model;
* a run several experiments share through the result cache (chapter 3's normal model is chapter
  2's, :func:`ntklab.experiments.trained_model`) is listed under each, counted once: the later ones
  carry ``settings["shared_with"]`` and :func:`project` and :func:`totals` leave them out. Such a
  run carries ``settings["cache"]`` (the entry it is stored as) and its training only; what each
  experiment computes with it is a run of its own with 0 epochs.

    >>> from ntklab import plan
    >>> runs = plan.plan("paper")
    >>> print(plan.table(runs))
    >>> plan.project(runs, {"seconds_per_pass": 2e-4, "kernel_500_seconds": 30, "autoattack_seconds_per_image": 0.5})

Introduced in chapter 9 (Reproducing at paper scale).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

__all__ = ["PlannedRun", "plan", "project", "totals", "table", "passes_per_example", "training_run",
           "train_size", "test_size", "models_key", "relative_cost", "COST_KEYS", "FORWARD", "TRAIN_SIZES"]

#: training-set sizes of the data sets (used when a profile's ``n_train`` is None: the whole split)
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "mnist5k": 4_000, "mnist": 60_000,
               "fashion_mnist": 60_000}
#: the cost of a forward pass (clean evaluation, BN statistics) in forward+backward passes
TEST_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "svhn": 26_032, "mnist5k": 1_000, "mnist": 10_000,
              "fashion_mnist": 10_000}
FORWARD = 1 / 3
#: the keys :func:`project` needs in ``costs`` (what ``bench/gpu.py`` writes)
COST_KEYS = ("seconds_per_pass", "kernel_500_seconds", "autoattack_seconds_per_image")
SINGLE_STEP = ("fgsm", "fgsm_rs", "n_fgsm", "fgsm_logscale", "fgsm_pca")


@dataclass(frozen=True)
class PlannedRun:
    """One run of an experiment, as :func:`plan` lists it (see the module docstring for the counts).

    experiment: the registered experiment's name; label: what the run is (e.g. ``"pgd (multistep)"``);
    epochs, n_train: epochs and training examples per epoch; passes: forward+backward passes per
    training example and epoch (normal 1, FGSM 2, PGD-k k + 1, TRADES-k k + 2, mean over the epochs
    of a switching run); eval_passes: the run's other image-passes, in total; kernel_images: the
    sizes n of the n x n trace kernels it computes, one entry per kernel; autoattack_images: images
    AutoAttack attacks; settings: strategy, eps, steps, model, data set, ... for the listing (and
    ``pass_cost``, ``shared_with``, ``cache``: see the module docstring)."""

    experiment: str
    label: str
    epochs: int
    n_train: int
    passes: float
    eval_passes: float = 0.0
    kernel_images: tuple = ()
    autoattack_images: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def image_passes(self) -> float:
        """Training and other image-passes of the run, in passes of the profile's model."""
        return (self.epochs * self.n_train * self.passes + self.eval_passes) * self.settings.get("pass_cost", 1.0)

    @property
    def shared(self) -> bool:
        """Whether another experiment's identical run (the same cache entry) is counted instead."""
        return bool(self.settings.get("shared_with"))


def passes_per_example(strategy: str, steps: int | None = None, *, clean_update: bool = False) -> float:
    """Forward+backward passes per training example of one epoch of ``strategy`` (see the module
    docstring); ``steps``: of PGD and TRADES (``None``: :class:`ntklab.train.TrainConfig`'s 10)."""
    steps = 10 if steps is None else int(steps)
    if strategy == "normal":
        return 1.0
    if strategy in SINGLE_STEP:
        n = 2.0
    elif strategy == "pgd":
        n = steps + 1.0
    elif strategy == "trades":
        n = steps + 2.0
    elif strategy == "gradalign":
        n = 5.0
    else:
        raise ValueError(f"strategy {strategy!r} has no pass count; known: normal, {', '.join(SINGLE_STEP)}, "
                         "pgd, trades, gradalign")
    return n + (1.0 if clean_update else 0.0)


def _split_size(dataset: str, split: str, n: int | None) -> int:
    """``n`` examples of ``split`` (``None``: all of it), at most what the split holds: from
    :data:`TRAIN_SIZES` / :data:`TEST_SIZES`, else from the data set itself when it is on disk
    (embedded or generated); never downloaded."""
    total = (TRAIN_SIZES if split == "train" else TEST_SIZES).get(dataset)
    if total is None:
        from ntklab import data

        try:
            total = len(data.load(dataset, split))
        except Exception as err:  # not on disk: a plan downloads nothing
            if n is not None:
                return int(n)
            raise ValueError(f"the size of the {split} split of data set {dataset!r} is not known to ntklab.plan "
                             f"and the data are not on disk ({_first_line(err)}); add it to ntklab.plan."
                             f"{'TRAIN' if split == 'train' else 'TEST'}_SIZES") from None
    return int(total if n is None else min(int(n), total))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def train_size(profile, n: int | None = None) -> int:
    """Training examples per epoch of a run of ``profile`` on ``n`` examples (default
    ``profile.n_train``; ``None`` means the whole split, :data:`TRAIN_SIZES`), never more than the
    split holds. A data set not in the table is asked for its size only if it is on disk (embedded
    or generated), never downloaded."""
    return _split_size(profile.dataset, "train", profile.n_train if n is None else n)


def test_size(profile) -> int:
    """Test examples of ``profile`` (``n_test``; ``None``: the whole split, :data:`TEST_SIZES`)."""
    return _split_size(profile.dataset, "test", profile.n_test)


def _short(config) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def models_key(profile, strategy: str = "normal", **overrides) -> str:
    """The identity of :func:`ntklab.experiments.trained_model`'s run (its cache config, hashed):
    two experiments whose plans carry the same ``settings["cache"]`` share one run."""
    from ntklab.train import TrainConfig

    config = {"profile": profile.to_dict(),
              "train": TrainConfig.from_profile(profile, strategy).replace(**overrides).to_dict()}
    return "models:" + _short(config)


def cache_key(name: str, config: dict) -> str:
    """``settings["cache"]`` of a run stored as entry ``name`` with cache config ``config``."""
    return f"{name}:{_short(config)}"


_MACS: dict = {}


def _macs(profile) -> float:
    """Multiply-accumulates of one forward pass of one image through ``profile``'s model (counted
    with hooks on the convolutions and linear layers of a model built on the CPU; no data)."""
    import torch
    from torch import nn

    from ntklab import data
    from ntklab.experiments import model_from_profile

    key = json.dumps([profile.model, profile.model_kwargs, profile.dataset], sort_keys=True, default=str)
    if key not in _MACS:
        info = data.info(profile.dataset)
        torch.manual_seed(0)
        model = model_from_profile(profile).eval()
        total = [0.0]

        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                total[0] += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                total[0] += output.numel() * module.in_features

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(torch.zeros(1, info["channels"], info["image_size"], info["image_size"]))
        for h in handles:
            h.remove()
        _MACS[key] = total[0]
    return _MACS[key]


def relative_cost(model_profile, profile, macs: float | None = None) -> float:
    """The cost of an image-pass of ``model_profile``'s model (or of a model of ``macs``
    multiply-accumulates per image) relative to one of ``profile``'s model: the ratio of their
    multiply-accumulates per forward pass (an estimate; 1 when they are the same model)."""
    if macs is None:
        if model_profile is None:
            raise ValueError("relative_cost needs a model_profile or macs")
        if (model_profile.model, model_profile.model_kwargs) == (profile.model, profile.model_kwargs):
            return 1.0
        macs = _macs(model_profile)
    return float(macs / _macs(profile))


def training_run(experiment: str, label: str, profile, strategy: str, *, epochs: int | None = None,
                 n_train: int | None = None, steps: int | None = None, switch_epoch: int | None = None,
                 clean_update: bool = False, eval_passes: float = 0.0, kernel_images=(), autoattack_images: int = 0,
                 **settings) -> PlannedRun:
    """A :class:`PlannedRun` of a training run under ``profile`` (a profile already with the
    experiment's changes): ``epochs`` (default the profile's), ``n_train`` examples (default
    :func:`train_size` of the profile), ``strategy`` with ``steps`` (PGD/TRADES, default the
    profile's ``pgd_steps``), normal before ``switch_epoch``; ``settings`` are added to the listing's
    (model, data set, eps and batch size are filled in from the profile)."""
    epochs = profile.epochs if epochs is None else int(epochs)
    n = train_size(profile, n_train)
    if strategy in ("pgd", "trades") and steps is None:
        steps = profile.pgd_steps
    adv = passes_per_example(strategy, steps, clean_update=clean_update)
    s = min(int(switch_epoch or 0), epochs)
    passes = (s + (epochs - s) * adv) / epochs if epochs else 0.0
    info = {"strategy": strategy, "model": profile.model, "width": profile.model_kwargs.get("width"),
            "dataset": profile.dataset, "eps": round(float(profile.eps), 6), "batch_size": profile.batch_size}
    if strategy in ("pgd", "trades"):
        info["steps"] = steps
    if switch_epoch:
        info["switch_epoch"] = s
    if clean_update:
        info["clean_update"] = True
    info = {k: v for k, v in info.items() if v is not None}
    info.update(settings)
    return PlannedRun(experiment, label, epochs, n, passes, float(eval_passes), tuple(int(k) for k in kernel_images),
                      int(autoattack_images), info)


def worst_case_passes(n: int, steps: int) -> float:
    """Image-passes of a clean evaluation plus FGSM and PGD-``steps`` on ``n`` images (the book's
    worst-case robust accuracy)."""
    return n * (FORWARD + 1 + steps)


def plan(profile) -> list[PlannedRun]:
    """Every run of every registered experiment under ``profile`` (a name or a
    :class:`ntklab.config.Profile`), in the order of the experiments' names; the runs shared
    through the result cache are counted once (the later ones carry ``settings["shared_with"]``).
    Each experiment module provides ``plan(profile) -> list[PlannedRun]``; a module without one is
    left out (say so: :func:`missing`)."""
    from ntklab import experiments
    from ntklab.config import Profile, get_profile

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    out, seen = [], {}
    for name in sorted(experiments.EXPERIMENTS):
        fn = _plan_function(name)
        if fn is None:
            continue
        for run in fn(profile):
            key = run.settings.get("cache")
            if key is not None and key in seen and seen[key] != run.experiment:
                run = PlannedRun(run.experiment, run.label, run.epochs, run.n_train, run.passes, run.eval_passes,
                                 run.kernel_images, run.autoattack_images, {**run.settings, "shared_with": seen[key]})
            elif key is not None:
                seen.setdefault(key, run.experiment)
            out.append(run)
    return out


def _plan_function(name: str):
    """The ``plan`` function of experiment ``name``: in the module it was registered from, else in
    ``ntklab.experiments.<name>`` (chapter 5 computes in ``_schedule_runs`` and documents in
    ``schedule``); ``None`` if neither has one."""
    import importlib
    import importlib.util

    from ntklab import experiments

    for module in (experiments.EXPERIMENTS[name].module, f"ntklab.experiments.{name}"):
        if importlib.util.find_spec(module) is not None:
            fn = getattr(importlib.import_module(module), "plan", None)
            if callable(fn):
                return fn
    return None


def missing() -> list[str]:
    """The registered experiments that have no ``plan`` function (left out of :func:`plan`)."""
    from ntklab import experiments

    return [n for n in sorted(experiments.EXPERIMENTS) if _plan_function(n) is None]


def _check_costs(costs) -> dict:
    if not isinstance(costs, dict):
        raise ValueError(f"costs must be a dict with {', '.join(COST_KEYS)}, got {type(costs).__name__}")
    out = {}
    for key in COST_KEYS:
        if key not in costs:
            raise ValueError(f"costs has no {key!r}; it needs {', '.join(COST_KEYS)} (python bench/gpu.py --out "
                             "costs.json writes them)")
        value = costs[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"costs[{key!r}] must be a finite number >= 0 (seconds), got {value!r}")
        out[key] = float(value)
    return out


def run_seconds(run: PlannedRun, costs: dict) -> float:
    """Projected seconds of one run (0 for a shared run; see the module docstring)."""
    c = _check_costs(costs)
    if run.shared:
        return 0.0
    return (run.image_passes * c["seconds_per_pass"]
            + run.settings.get("pass_cost", 1.0) * (sum((n / 500) ** 2 for n in run.kernel_images) * c["kernel_500_seconds"]
                                                    + run.autoattack_images * c["autoattack_seconds_per_image"]))


def project(runs, costs: dict) -> dict[str, float]:
    """Projected hours per experiment: ``{experiment: hours}`` over ``runs`` (from :func:`plan`),
    with ``costs`` = ``{"seconds_per_pass": seconds of one forward+backward pass of one image,
    "kernel_500_seconds": seconds of a 500-image trace kernel, "autoattack_seconds_per_image": ...}``
    (what ``bench/gpu.py`` writes; other keys are ignored). Shared runs count once. Raises
    ``ValueError`` naming a missing or bad cost."""
    _check_costs(costs)
    out: dict[str, float] = {}
    for run in runs:
        out[run.experiment] = out.get(run.experiment, 0.0) + run_seconds(run, costs) / 3600
    return out


def totals(runs) -> dict[str, dict]:
    """Per experiment and ``"total"``: ``runs`` (listed), ``training_runs`` (with epochs, not
    shared), ``image_passes``, ``kernels``, ``kernel_500_equivalents`` (sum of (n/500)^2),
    ``autoattack_images``; shared runs are listed but not counted."""
    out: dict[str, dict] = {}
    for run in runs:
        for key in (run.experiment, "total"):
            t = out.setdefault(key, {"runs": 0, "training_runs": 0, "image_passes": 0.0, "kernels": 0,
                                     "kernel_500_equivalents": 0.0, "autoattack_images": 0})
            t["runs"] += 1
            if run.shared:
                continue
            t["training_runs"] += int(run.epochs > 0)
            t["image_passes"] += run.image_passes
            t["kernels"] += len(run.kernel_images)
            t["kernel_500_equivalents"] += run.settings.get("pass_cost", 1.0) * sum((n / 500) ** 2 for n in run.kernel_images)
            t["autoattack_images"] += run.autoattack_images
    if "total" in out:
        out["total"] = out.pop("total")
    return out


def _num(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def _kernels(sizes) -> str:
    if not sizes:
        return "-"
    counts: dict[int, int] = {}
    for n in sizes:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{c}x{n}" for n, c in sorted(counts.items()))


_LISTED = ("method", "strategy", "steps", "switch_epoch", "clean_update", "schedule", "seed", "eps", "model", "width",
           "dataset", "batch_size", "lr", "buffer", "pass_cost", "note")


def table(runs, costs: dict | None = None) -> str:
    """The listing of ``python -m ntklab plan``: one line per run (experiment, label, epochs,
    examples, passes, image-passes, kernels, AutoAttack images, settings), then per experiment and in
    total the image-passes, kernels and AutoAttack images, and with ``costs`` the projected hours."""
    runs = list(runs)
    head = ("EXPERIMENT", "RUN", "EPOCHS", "EXAMPLES", "PASSES", "IMAGE-PASSES", "KERNELS", "AA", "SETTINGS")
    rows = []
    for r in runs:
        s = r.settings
        shown = []
        for k in _LISTED:
            if k in s and not (k == "pass_cost" and s[k] == 1):
                v = s[k]
                shown.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        if r.shared:
            shown.append(f"shared with {s['shared_with']} (counted there)")
        rows.append((r.experiment, r.label, str(r.epochs), str(r.n_train), f"{r.passes:.3g}",
                     _num(r.image_passes), _kernels(r.kernel_images), str(r.autoattack_images), " ".join(shown)))
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    hours = project(runs, costs) if costs is not None else None
    lines.append("")
    sums = totals(runs)
    head2 = ("EXPERIMENT", "TRAINED/LISTED", "IMAGE-PASSES", "KERNELS (500-EQUIV.)", "AA IMAGES") + (("HOURS",) if hours else ())
    rows2 = []
    for name, t in sums.items():
        h = sum(hours.values()) if (hours and name == "total") else (hours or {}).get(name)
        rows2.append((name, f"{t['training_runs']}/{t['runs']}", _num(t["image_passes"]),
                      f"{t['kernels']} ({t['kernel_500_equivalents']:.3g})", str(t["autoattack_images"]))
                     + ((f"{h:.3g}",) if hours else ()))
    w2 = [max([len(h)] + [len(row[i]) for row in rows2]) for i, h in enumerate(head2)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(head2, w2)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, w2)).rstrip() for row in rows2]
    return "\n".join(lines)


def kernel_run_plan(experiment: str, cp, strategy: str, *, schedule: str = "multistep", ae: bool = False,
                    label: str | None = None, **overrides) -> PlannedRun:
    """The :class:`PlannedRun` of :func:`ntklab.experiments.runs.kernel_run` under the chapter
    profile ``cp`` (chapters 4 and 5): the training run, per snapshot the C-NTK and the
    statistics-refreshed C-NTK of the probe (and the AE-NTK with ``ae``, its PGD examples counted as
    passes), the default-buffer K_0, the BN-statistics passes over the training images, and the final
    clean, FGSM and PGD evaluation on ``n_eval`` test images; when the run keeps its best checkpoint
    (the profile's ``select_best``), the clean and PGD evaluation after every epoch and the best
    weights' final evaluation too."""
    from ntklab.experiments.runs import RunSettings, run_config

    config = run_config(cp, strategy, schedule, ae, overrides)
    kw = config["train"]
    snapshots = len(RunSettings.for_profile(cp).snapshot_epochs(cp))
    n = train_size(cp)
    kernels = [cp.n_probe] * (snapshots * (3 if ae else 2) + 1)
    eval_passes = (snapshots + 1) * n * FORWARD + worst_case_passes(config["eval"]["n"], config["eval"]["steps"])
    if ae:
        eval_passes += snapshots * cp.n_probe * cp.pgd_steps
    if kw.get("keep_best"):  # the held-out evaluation after every epoch, and the best weights evaluated again
        eval_passes += kw["epochs"] * kw["eval_size"] * (FORWARD + kw["eval_steps"])
        eval_passes += worst_case_passes(config["eval"]["n"], config["eval"]["steps"])
    extra = {k: v for k, v in overrides.items() if k in ("seed", "switch_epoch")}
    return training_run(experiment, label or f"{strategy} ({schedule}){' + AE-NTK' if ae else ''}", cp, strategy,
                        epochs=kw["epochs"], steps=kw.get("steps"), eval_passes=eval_passes, kernel_images=kernels,
                        schedule=schedule, snapshots=snapshots, cache=cache_key("kernel_runs", config), **extra)
