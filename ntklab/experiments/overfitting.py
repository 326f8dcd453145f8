"""Experiment ``overfitting``: catastrophic overfitting (CO) of single-step adversarial training,
the kernel around it, and noise against it (chapter 6).

Li et al. (arXiv 2312.02236) explain CO by "isotropic features" in the spectrum of the NTK and avoid
it with "anisotropic noise" added to the mini-batches; neither construction could be recovered, so
the book makes its own (see chapter 6). Under a profile this experiment trains, all with
:func:`ntklab.train.train` on the same data and schedule:

* ``methods`` (default :data:`METHODS`): FGSM from the clean point (Goodfellow et al. 2015),
  FGSM-RS (Wong et al. 2020), N-FGSM (de Jorge et al. 2022), FGSM after per-pixel log-uniform
  Gaussian noise (:func:`ntklab.attacks.fgsm_aniso`) and FGSM after Gaussian noise with the training
  images' covariance (:func:`ntklab.attacks.fgsm_pca`), each at the profile's eps with the attack's
  default step, for ``n_seeds`` seeds ``profile.seed + i`` (a seed fixes the initialisation and the
  data order);
* a PGD-AT reference (Madry et al. 2018), one seed: ``pgd_at_steps`` steps of eps / ``pgd_at_steps``
  (the profile's PGD steps and step size when ``pgd_at_steps`` is the profile's);
* the methods of ``grid_eps`` at its other radii, one seed: FGSM below the profile's eps (where it
  should not collapse), FGSM-RS and ``fgsm_aniso`` above it (where isotropic noise is known to fail
  on CIFAR-10, Andriushchenko & Flammarion 2020);
* for one seed, FGSM and ``fgsm_aniso`` with :class:`ntklab.callbacks.KernelSnapshots` every
  ``snapshot_every`` epochs: the trace C-NTK and AE-NTK of ``n_probe`` class-balanced training images.

Every run logs per epoch, on a fixed class-balanced subset of ``n_eval`` test images: PGD accuracy
(:class:`ntklab.callbacks.CatastrophicOverfittingDetector`, whose flags are kept), clean and FGSM
accuracy (``eval_clean_acc``, ``eval_fgsm_acc``); the history's ``train_acc`` is the accuracy on
the training attack's examples. After training: clean accuracy and worst-case robust accuracy
(FGSM and PGD, :func:`ntklab.evaluate.worst_case_accuracy`) on ``n_final`` test images, and for the
first seed AutoAttack "fast" on ``n_autoattack`` of them (0: none).

A run *collapses* (the book's rule, :func:`collapse_epoch`) at the first epoch at which its
held-out PGD accuracy is below ``co_floor`` (0.1: worse than guessing among ten classes) while its
training accuracy on its own single-step examples is above ``co_min_train_acc`` (0.5): it resists
the attack it trains on, and a multi-step attack breaks almost everything.

Per-profile settings (:data:`SETTINGS`): ``quick`` shrinks the model (SmallCNN width 16), the
schedule (6 epochs, SGD lr 0.02, batches of 64, no decay), the PGD-AT reference (3 steps of eps / 3)
and the evaluation sets (100 test images per epoch, PGD-5; 200 at the end, PGD-10; AutoAttack on 64)
and trains N-FGSM, which does not learn at eps 0.3 with its default noise of 2 eps, for one seed
only (``one_seed``), to fit a 2-core CPU; ``paper`` keeps the
profile's model, schedule and sizes (``n_probe``, ``n_eval``, ``eval_pgd_steps``) and takes a kernel
snapshot every ``epochs // 20`` epochs; ``smoke`` is for the unit tests.

The result (a dict, cached by config and package version):

* ``config``; ``methods``, ``seeds``, ``eps``;
* ``runs[method]``: one dict per seed (only the first seed for the methods of ``one_seed``) with ``history`` (:meth:`ntklab.train.History.to_dict`),
  ``clean_acc``, ``robust_acc`` (worst case), ``training_time`` (wall seconds of attack + update),
  ``collapse_epoch`` (int or None), ``detector_flags`` (0-based epochs) and, for the first seed,
  ``autoattack_acc``;
* ``pgd_at``: the same for the PGD-AT reference;
* ``grid[method]``: runs of the first seed sorted by ``eps``, the profile's eps taken from ``runs``;
* ``kernels[method]``: ``{"epochs", "clean": (T, n, n), "ae": (T, n, n), "probe_clean_acc",
  "probe_ae_acc"}`` for ``fgsm`` and ``fgsm_aniso``, seed ``profile.seed``; ``probe_y``: (n,) labels;
* ``step_seconds[method]``: seconds of training per batch (attack + update) of every method and of
  ``"pgd"``, measured in interleaved rounds after the runs, in CPU time on a CPU (``_step_costs``):
  the training times of whole runs are wall-clock sums and grow with whatever else runs on the
  machine, these much less;
* ``compute_seconds``: wall seconds of the whole computation.

Checkpoints go next to the cache entry, so an interrupted paper-scale run resumes.
"""
from __future__ import annotations

import time

from ntklab.experiments import (cached, data_from_profile, model_from_profile, register, result_path,
                                train_kwargs)

__all__ = ["run", "make_config", "collapse_epoch", "METHODS", "SETTINGS", "KERNEL_METHODS", "NAME"]

NAME = "overfitting"
METHODS = ("fgsm", "fgsm_rs", "n_fgsm", "fgsm_aniso", "fgsm_pca")
KERNEL_METHODS = ("fgsm", "fgsm_aniso")

#: Per-profile settings; ``None`` means "the profile's own value".
SETTINGS = {
    "smoke": dict(model_kwargs=None, epochs=2, lr=None, batch_size=None, milestones=None, n_seeds=2,
                  grid_eps={"fgsm": (0.1,)}, n_eval=None, eval_steps=2, n_final=None, final_steps=None,
                  n_autoattack=0, n_probe=None, snapshot_every=1, pgd_at_steps=None, co_floor=0.1,
                  co_min_train_acc=0.5, detector_drop=0.1, one_seed=(), cost_reps=2, cost_batches=2),
    "quick": dict(model_kwargs={"width": 16}, epochs=6, lr=0.02, batch_size=64, milestones=(), n_seeds=3,
                  grid_eps={"fgsm": (0.2,), "fgsm_rs": (0.4,), "fgsm_aniso": (0.4,)}, n_eval=100,
                  eval_steps=5, n_final=200, final_steps=None, n_autoattack=64, n_probe=None,
                  snapshot_every=1, pgd_at_steps=3, co_floor=0.1, co_min_train_acc=0.5, detector_drop=0.1,
                  one_seed=("n_fgsm",), cost_reps=5, cost_batches=4),
    "paper": dict(model_kwargs=None, epochs=None, lr=None, batch_size=None, milestones=None, n_seeds=3,
                  grid_eps={"fgsm": (4 / 255,), "fgsm_rs": (16 / 255,), "fgsm_aniso": (16 / 255,)},
                  n_eval=None, eval_steps=None, n_final=None, final_steps=None, n_autoattack=None,
                  n_probe=None, snapshot_every=None, pgd_at_steps=None, co_floor=0.1, co_min_train_acc=0.5,
                  detector_drop=0.1, one_seed=(), cost_reps=5, cost_batches=4),
}


def _setting(profile, key, default):
    value = SETTINGS.get(profile.name, SETTINGS["paper"])[key]
    return default if value is None else value


def make_config(profile, methods=METHODS, *, n_seeds: int | None = None, grid_eps=None) -> dict:
    """Everything the result depends on (the cache key): the profile with the chapter's changes
    applied (``config["profile"]``) and the chapter's own settings. ``n_seeds`` and ``grid_eps``
    replace the profile's settings when given (for tests and quick looks)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if n_seeds is not None and (isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1):
        raise ValueError(f"n_seeds must be an integer >= 1, got {n_seeds!r}")
    grid = _setting(profile, "grid_eps", {}) if grid_eps is None else grid_eps
    if not isinstance(grid, dict) or not set(grid) <= set(METHODS):
        raise ValueError(f"grid_eps must map methods of {METHODS} to radii, got {grid!r}")
    changed = profile.replace(
        model_kwargs=_setting(profile, "model_kwargs", profile.model_kwargs),
        epochs=_setting(profile, "epochs", profile.epochs), lr=_setting(profile, "lr", profile.lr),
        batch_size=_setting(profile, "batch_size", profile.batch_size),
        lr_milestones=tuple(_setting(profile, "milestones", profile.lr_milestones)),
        n_eval=_setting(profile, "n_eval", profile.n_eval),
        eval_pgd_steps=_setting(profile, "eval_steps", profile.eval_pgd_steps),
        n_probe=_setting(profile, "n_probe", profile.n_probe))
    n_test = profile.n_test if profile.n_test is not None else 10**9
    return {
        "profile": changed.to_dict(),
        "methods": list(methods),
        "seeds": [profile.seed + i for i in range(n_seeds or _setting(profile, "n_seeds", 3))],
        "grid_eps": {m: sorted(float(e) for e in radii) for m, radii in grid.items()},
        "n_final": min(_setting(profile, "n_final", changed.n_eval), n_test),
        "final_steps": _setting(profile, "final_steps", profile.eval_pgd_steps),
        "n_autoattack": min(_setting(profile, "n_autoattack", changed.n_eval), n_test),
        "snapshot_every": _setting(profile, "snapshot_every", max(1, changed.epochs // 20)),
        "pgd_at_steps": _setting(profile, "pgd_at_steps", profile.pgd_steps),
        "kernel": "trace",
        "co_floor": _setting(profile, "co_floor", 0.1),
        "co_min_train_acc": _setting(profile, "co_min_train_acc", 0.5),
        "detector_drop": _setting(profile, "detector_drop", 0.1),
        "channels_last": profile.model == "small_cnn",
        "one_seed": sorted(set(_setting(profile, "one_seed", ())) & set(methods)),
        "cost_reps": _setting(profile, "cost_reps", 5),
        "cost_batches": _setting(profile, "cost_batches", 4),
    }


def collapse_epoch(history: dict, *, floor: float = 0.1, min_train_acc: float = 0.5,
                   key: str = "co_robust_acc") -> int | None:
    """The first 0-based epoch at which a run has catastrophically overfitted, by the book's rule
    (chapter 6): held-out PGD accuracy (``history["extra"][key]``, logged by
    :class:`ntklab.callbacks.CatastrophicOverfittingDetector`) below ``floor`` while the accuracy on
    the run's own training examples (``history["train_acc"]``) is above ``min_train_acc``.
    ``None`` if that never happens. history: :meth:`ntklab.train.History.to_dict`."""
    robust = history["extra"].get(key)
    if robust is None:
        raise ValueError(f"the history has no per-epoch {key!r}; train with a "
                         "CatastrophicOverfittingDetector")
    for epoch, (pgd, acc) in enumerate(zip(robust, history["train_acc"])):
        if pgd is not None and acc is not None and pgd < floor and acc > min_train_acc:
            return epoch
    return None


@register(NAME, "catastrophic overfitting of FGSM-AT, the NTK spectrum around it, and isotropic "
                "against anisotropic noise (chapter 6)")
def run(profile, device=None, *, force: bool = False, progress: bool = True, methods=METHODS,
        n_seeds: int | None = None, grid_eps=None) -> dict:
    """Train and evaluate everything under ``profile`` (see the module docstring for the result);
    ``methods``, ``n_seeds`` and ``grid_eps`` as in :func:`make_config`."""
    from ntklab.config import get_device

    config = make_config(profile, methods, n_seeds=n_seeds, grid_eps=grid_eps)
    checkpoints = result_path(NAME, config).with_suffix(".checkpoints")
    return cached(NAME, config, lambda: _compute(profile, config, get_device(device), progress, checkpoints),
                  force=force)


class _HeldOutAccuracy:
    """Callback: clean and FGSM accuracy (correct both clean and after FGSM) on a fixed held-out
    batch after every epoch, logged as ``eval_clean_acc`` and ``eval_fgsm_acc``."""

    def __init__(self, x, y, eps):
        self.x, self.y, self.eps = x, y, eps

    def on_epoch_end(self, epoch, model, history):
        from ntklab import attacks, evaluate

        with attacks.attack_mode(model, "eval"):
            history.log("eval_clean_acc", evaluate.clean_accuracy(model, (self.x, self.y)))
            history.log("eval_fgsm_acc", evaluate.worst_case_accuracy(model, (self.x, self.y), eps=self.eps,
                                                                      attacks=("fgsm",)))


def _compute(profile, config, device, progress, checkpoints) -> dict:
    from ntklab import data
    from ntklab.config import Profile

    start = time.perf_counter()
    p = Profile(**{**config["profile"], "lr_milestones": tuple(config["profile"]["lr_milestones"])})
    train_set, test_set = data_from_profile(p)
    eval_x, eval_y = data.subset(test_set, p.n_eval, seed=p.seed).tensors
    final_set = data.subset(test_set, config["n_final"], seed=p.seed + 1)
    probe_x, probe_y = data.subset(train_set, p.n_probe, seed=p.seed + 1).tensors

    def one(strategy, seed, eps, *, kernels=False, autoattack=False):
        return _train_one(p, config, strategy, seed, eps, train_set, (eval_x, eval_y), final_set,
                          (probe_x, probe_y) if kernels else None, autoattack, device, progress,
                          checkpoints / f"{strategy}-eps{eps:.4f}-seed{seed}")

    out = {"config": config, "methods": list(config["methods"]), "seeds": list(config["seeds"]),
           "eps": p.eps, "runs": {}, "grid": {}, "kernels": {}, "probe_y": probe_y}
    first = config["seeds"][0]
    for method in config["methods"]:
        out["runs"][method] = []
        for seed in config["seeds"][:1] if method in config["one_seed"] else config["seeds"]:
            result = one(method, seed, p.eps, kernels=seed == first and method in KERNEL_METHODS,
                         autoattack=seed == first)
            if "kernels" in result:
                out["kernels"][method] = result.pop("kernels")
            out["runs"][method].append(result)
    out["pgd_at"] = one("pgd", first, p.eps, autoattack=True)
    for method, radii in config["grid_eps"].items():
        runs = {p.eps: out["runs"][method][0]} if method in out["runs"] else {}
        for eps in radii:
            runs[eps] = one(method, first, eps)
        out["grid"][method] = [runs[e] for e in sorted(runs)]
    out["step_seconds"] = _step_costs(p, config, train_set, device)
    out["compute_seconds"] = time.perf_counter() - start
    return out


def _step_costs(p, config, train_set, device) -> dict:
    """Training cost per batch (attack + update, as in :func:`ntklab.train.train`) of every method
    and of the PGD-AT reference, measured so that other work on the machine disturbs it little:
    ``cost_reps`` rounds, each giving every method in turn ``cost_batches`` batches, from the same
    initialisation for every method; per method the median over the rounds. On the CPU the clock is
    the process's CPU time (another process sharing the cores changes it far less than the wall
    clock), on a GPU the wall clock after synchronising. Returns ``{method: seconds per batch}``."""
    import copy
    import statistics

    import torch

    from ntklab import attacks
    from ntklab.config import seed_everything
    from ntklab.train import attack_arguments, extra_attack_arguments, sgd_step  # the loop's own pieces

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()

    seed_everything(p.seed)
    net0 = model_from_profile(p).to(device)
    if config["channels_last"]:
        net0 = net0.to(memory_format=torch.channels_last)
    x_all, y_all = train_set.tensors
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(p.seed))
    idx = perm[: config["cost_batches"] * p.batch_size].split(p.batch_size)
    batches = [(x_all[i].to(device), y_all[i].to(device)) for i in idx]
    methods = list(config["methods"]) + ["pgd"]
    setup, times = {}, {m: [] for m in methods}
    for m in methods:
        net = copy.deepcopy(net0)
        opt = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        steps = config["pgd_at_steps"] if m == "pgd" else None
        alpha = (p.pgd_alpha if steps == p.pgd_steps else p.eps / steps) if m == "pgd" else None
        kw = attack_arguments(m, p.eps, alpha, steps, "eval")
        kw.update(extra_attack_arguments(m, None, x_all, device))   # fgsm_pca: the data's basis, once
        setup[m] = net, opt, kw
    for _ in range(config["cost_reps"]):
        for m in methods:
            net, opt, kw = setup[m]
            net.train()
            start = clock()
            for xb, yb in batches:
                sgd_step(net, opt, attacks.adversarial_examples(m, net, xb, yb, **kw), yb)
            times[m].append((clock() - start) / len(batches))
    return {m: statistics.median(t) for m, t in times.items()}


def _train_one(p, config, strategy, seed, eps, train_set, eval_xy, final_set, probe, autoattack,
               device, progress, checkpoint_dir) -> dict:
    import torch

    from ntklab import evaluate
    from ntklab.callbacks import CatastrophicOverfittingDetector, KernelSnapshots
    from ntklab.config import seed_everything
    from ntklab.train import train

    ps = p.replace(seed=seed, eps=eps)
    seed_everything(seed)
    model = model_from_profile(ps)
    if config["channels_last"]:  # oneDNN's CPU convolutions run about 1.7x faster; same numbers
        model = model.to(memory_format=torch.channels_last)
    detector = CatastrophicOverfittingDetector(*eval_xy, eps=eps, alpha=p.pgd_alpha * eps / p.eps,
                                               steps=p.eval_pgd_steps, drop=config["detector_drop"])
    callbacks = [detector, _HeldOutAccuracy(*eval_xy, eps)]
    snaps = None
    if probe is not None:
        every = config["snapshot_every"]
        snaps = KernelSnapshots(*probe, sorted(set(range(0, p.epochs + 1, every)) | {p.epochs}),
                                kind=config["kernel"], eps=eps, alpha=p.pgd_alpha * eps / p.eps,
                                steps=p.eval_pgd_steps)
        callbacks.append(snaps)
    kw = train_kwargs(ps, strategy)
    if strategy == "pgd":  # the reference: pgd_at_steps steps of eps / pgd_at_steps (the profile's own
        steps = config["pgd_at_steps"]  # steps and step size when those are its settings)
        kw.update(steps=steps, alpha=ps.pgd_alpha * eps / p.eps if steps == p.pgd_steps else eps / steps)
    history = train(model, train_set, **kw, callbacks=callbacks, device=device,
                    checkpoint_dir=checkpoint_dir, progress=progress)
    h = history.to_dict()
    torch.manual_seed(seed)
    result = {
        "strategy": strategy, "seed": seed, "eps": eps, "history": h,
        "clean_acc": float(evaluate.clean_accuracy(model, final_set, device=device)),
        "robust_acc": float(evaluate.worst_case_accuracy(model, final_set, eps=eps, steps=config["final_steps"],
                                                         alpha=p.pgd_alpha * eps / p.eps, device=device)),
        "training_time": history.training_time,
        "collapse_epoch": collapse_epoch(h, floor=config["co_floor"], min_train_acc=config["co_min_train_acc"]),
        "detector_flags": [e for e, flag in enumerate(h["extra"]["co_flag"]) if flag],
    }
    if autoattack and config["n_autoattack"]:
        result["autoattack_acc"] = float(evaluate.autoattack_accuracy(
            model, final_set, eps=eps, version="fast", n=config["n_autoattack"], seed=seed, device=device))
    if snaps is not None:
        result["kernels"] = {"epochs": snaps.snapshot_epochs, "clean": snaps.kernels("clean"),
                             "ae": snaps.kernels("ae"), "probe_clean_acc": snaps.probe_clean_acc,
                             "probe_ae_acc": snaps.probe_ae_acc}
    return result
