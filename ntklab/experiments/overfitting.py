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

Per-profile settings (:class:`Settings`): ``quick`` shrinks the model (SmallCNN width 16), the
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
* ``noise``: the covariance of each noise's start, drawn through the attacks (:func:`noise_starts`,
  :func:`noise_statistics`: ``n_draws`` draws), and the training images' pixel statistics;
* ``step_seconds[method]``: seconds of training per batch (attack + update) of every method and of
  ``"pgd"``, measured in interleaved rounds after the runs, in CPU time on a CPU
  (:func:`ntklab.clock.step_cost`):
  the training times of whole runs are wall-clock sums and grow with whatever else runs on the
  machine, these much less;
* ``compute_seconds``: wall seconds of the whole computation.

Checkpoints go next to the cache entry, so an interrupted paper-scale run resumes.
:func:`analyse` turns a result into the numbers the chapter discusses, :func:`claims` into the
chapter's claims (:mod:`ntklab.claims`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ntklab.experiments import RunContext, data_from_profile, experiment, model_from_profile, train_kwargs

__all__ = ["run", "make_config", "collapse_epoch", "noise_starts", "noise_statistics", "analyse", "claims",
           "Settings", "METHODS", "KERNEL_METHODS", "NOISES", "LABELS", "NAME"]

NAME = "overfitting"
METHODS = ("fgsm", "fgsm_rs", "n_fgsm", "fgsm_aniso", "fgsm_pca")
KERNEL_METHODS = ("fgsm", "fgsm_aniso")
NOISES = ("fgsm_rs", "n_fgsm", "fgsm_aniso", "fgsm_pca")    # the methods whose step starts from noise
#: The chapter's names of the methods (and of the PGD-AT reference), for tables and figures.
LABELS = {"fgsm": "FGSM", "fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM", "fgsm_aniso": "fgsm_aniso",
          "fgsm_pca": "fgsm_pca", "pgd": "PGD-AT"}

#: The claims' thresholds (asserted under ``quick``; see :func:`claims`).
MIN_COLLAPSED = 2          # FGSM-AT and fgsm_pca collapse in at least 2 of the 3 seeds
MIN_GAP = 0.10             # fgsm_aniso's worst-case robust accuracy above FGSM-AT's, every seed
MAX_COST_RATIO = 1.2       # fgsm_aniso's cost per batch at most 1.2 times FGSM-AT's
ANISOTROPIC_BELOW = 0.2    # fgsm_pca's covariance: effective rank below 0.2 d
ISOTROPIC_ABOVE = 0.8      # uniform and log-uniform noise: effective rank above 0.8 d (a unit test)
LEARNED_ABOVE = 0.5        # a method "learned" when its mean clean accuracy is at least this
SEPARATES_BY = 0.10        # at the larger radius, one noise "separates" from the other by 10 points


@dataclass(frozen=True)
class Settings:
    """Every per-profile constant of chapter 6, resolved for one profile by :meth:`for_profile`.

    The chapter's changes to the profile (``model_kwargs``, ``epochs``, ``lr``, ``batch_size``,
    ``lr_milestones``, ``n_eval``, ``eval_pgd_steps``, ``n_probe``: :meth:`profile` applies them) and
    its own sizes: ``n_seeds`` seeds; ``grid_eps`` (method -> extra radii, one seed); ``n_final``
    test images and ``final_steps`` PGD steps at the end; AutoAttack on ``n_autoattack`` of them (0:
    none); a kernel snapshot every ``snapshot_every`` epochs; ``pgd_at_steps`` steps for the PGD-AT
    reference; the collapse rule's ``co_floor`` and ``co_min_train_acc``; the detector's
    ``detector_drop``; the methods trained with one seed only (``one_seed``); ``cost_reps`` rounds of
    ``cost_batches`` batches for the cost per batch; ``n_draws`` draws of each noise for its
    covariance. ``quick`` shrinks everything to fit a 2-core CPU; ``paper`` (and any other name)
    keeps the profile's model, schedule and sizes; ``smoke`` is for the unit tests.
    """

    model_kwargs: dict
    epochs: int
    lr: float
    batch_size: int
    lr_milestones: tuple
    n_eval: int
    eval_pgd_steps: int
    n_probe: int
    n_seeds: int
    grid_eps: dict
    n_final: int
    final_steps: int
    n_autoattack: int
    snapshot_every: int
    pgd_at_steps: int
    co_floor: float = 0.1
    co_min_train_acc: float = 0.5
    detector_drop: float = 0.1
    one_seed: tuple = ()
    cost_reps: int = 5
    cost_batches: int = 4
    n_draws: int = 3000

    @classmethod
    def for_profile(cls, profile) -> "Settings":
        """The settings of ``profile`` (a :class:`ntklab.config.Profile`), by its name."""
        p = profile
        if p.name == "smoke":
            changes = dict(epochs=2, eval_pgd_steps=2)
            own = dict(n_seeds=2, grid_eps={"fgsm": (0.1,)}, n_autoattack=0, snapshot_every=1, cost_reps=2,
                       cost_batches=2, n_draws=500)
        elif p.name == "quick":
            changes = dict(model_kwargs={"width": 16}, epochs=6, lr=0.02, batch_size=64, lr_milestones=(),
                           n_eval=100, eval_pgd_steps=5)
            own = dict(n_seeds=3, grid_eps={"fgsm": (0.2,), "fgsm_rs": (0.4,), "fgsm_aniso": (0.4,)},
                       n_final=200, n_autoattack=64, snapshot_every=1, pgd_at_steps=3, one_seed=("n_fgsm",))
        else:
            changes = {}
            own = dict(n_seeds=3, grid_eps={"fgsm": (4 / 255,), "fgsm_rs": (16 / 255,), "fgsm_aniso": (16 / 255,)})
        base = dict(model_kwargs=p.model_kwargs, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                    lr_milestones=tuple(p.lr_milestones), n_eval=p.n_eval, eval_pgd_steps=p.eval_pgd_steps,
                    n_probe=p.n_probe)
        changed = {**base, **changes}
        derived = dict(n_final=changed["n_eval"], final_steps=p.eval_pgd_steps, n_autoattack=changed["n_eval"],
                       snapshot_every=max(1, changed["epochs"] // 20), pgd_at_steps=p.pgd_steps)
        return cls(**{**changed, **derived, **own})

    def profile(self, profile):
        """``profile`` with the chapter's changes applied (the profile every run trains under)."""
        return profile.replace(model_kwargs=self.model_kwargs, epochs=self.epochs, lr=self.lr,
                               batch_size=self.batch_size, lr_milestones=tuple(self.lr_milestones),
                               n_eval=self.n_eval, eval_pgd_steps=self.eval_pgd_steps, n_probe=self.n_probe)


def make_config(profile, methods=METHODS, *, n_seeds: int | None = None, grid_eps=None) -> dict:
    """Everything the result depends on (the cache key): the profile with the chapter's changes
    applied (``config["profile"]``) and the chapter's own settings (:class:`Settings`). ``n_seeds``
    and ``grid_eps`` replace the profile's settings when given (for tests and quick looks)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if n_seeds is not None and (isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1):
        raise ValueError(f"n_seeds must be an integer >= 1, got {n_seeds!r}")
    s = Settings.for_profile(profile)
    grid = s.grid_eps if grid_eps is None else grid_eps
    if not isinstance(grid, dict) or not set(grid) <= set(METHODS):
        raise ValueError(f"grid_eps must map methods of {METHODS} to radii, got {grid!r}")
    n_test = profile.n_test if profile.n_test is not None else 10**9
    return {
        "profile": s.profile(profile).to_dict(),
        "methods": list(methods),
        "seeds": [profile.seed + i for i in range(n_seeds or s.n_seeds)],
        "grid_eps": {m: sorted(float(e) for e in radii) for m, radii in grid.items()},
        "n_final": min(s.n_final, n_test),
        "final_steps": s.final_steps,
        "n_autoattack": min(s.n_autoattack, n_test),
        "snapshot_every": s.snapshot_every,
        "pgd_at_steps": s.pgd_at_steps,
        "kernel": "trace",
        "co_floor": s.co_floor,
        "co_min_train_acc": s.co_min_train_acc,
        "detector_drop": s.detector_drop,
        "channels_last": profile.model == "small_cnn",
        "one_seed": sorted(set(s.one_seed) & set(methods)),
        "cost_reps": s.cost_reps,
        "cost_batches": s.cost_batches,
        "n_draws": s.n_draws,
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


@experiment(NAME, "catastrophic overfitting of FGSM-AT, the NTK spectrum around it, and isotropic "
                  "against anisotropic noise (chapter 6)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Train and evaluate everything under ``profile`` (see the module docstring for the result);
    ``methods``, ``n_seeds`` and ``grid_eps`` as in :func:`make_config`."""
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress, ctx.checkpoints)


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


def noise_starts(model, X, eps: float, n: int, *, basis=None, seed: int = 0) -> dict:
    """The noisy starts of the four noisy single-step attacks, drawn through the attacks themselves:
    on ``n`` mid-grey images shaped like ``X`` (so that clipping to [0, 1] does not interfere while
    eps <= 0.5) and with a negligible step, an attack returns its start. ``basis``: for
    ``fgsm_pca`` (default: :func:`ntklab.attacks.pca_noise_basis` of ``X``). Returns
    ``{method: (n, C, H, W) start minus the grey image}`` for the methods of :data:`NOISES`."""
    import torch

    from ntklab import attacks

    device = next(model.parameters()).device
    basis = (attacks.pca_noise_basis(X) if basis is None else basis).to(device)
    grey = torch.full((min(n, 500),) + tuple(X.shape[1:]), 0.5, dtype=X.dtype, device=device)
    extra = {"fgsm_pca": {"basis": basis}}
    out = {}
    for i, m in enumerate(NOISES):
        g = torch.Generator(device).manual_seed(seed * 1000 + i)
        chunks = []
        for start in range(0, n, len(grey)):          # in chunks of 500: a large model's memory
            x = grey[: min(len(grey), n - start)]
            y = torch.zeros(len(x), dtype=torch.long, device=device)
            chunks.append(attacks.adversarial_examples(m, model, x, y, eps=eps, alpha=1e-6, generator=g,
                                                       **extra.get(m, {})) - x)
        out[m] = torch.cat(chunks).cpu()
    return out


def noise_statistics(starts: dict, eps: float) -> dict:
    """Per noise (``starts`` as from :func:`noise_starts`): ``rms`` (root mean square per pixel, in
    units of eps), ``erank`` (effective rank of the empirical covariance E[delta delta^T] over the
    draws, :func:`ntklab.metrics.effective_rank`; d for isotropic noise, a little less from finitely
    many draws) and ``top10`` (:func:`ntklab.metrics.top_concentration` with q = 10)."""
    from ntklab import metrics

    out = {}
    for m, delta in starts.items():
        delta = delta.flatten(1).double()
        cov = (delta.T @ delta / len(delta)).numpy()
        out[m] = {"rms": float(delta.pow(2).mean().sqrt()) / eps, "erank": metrics.effective_rank(cov),
                  "top10": metrics.top_concentration(cov, 10)}
    return out


def _noise(p, X, n_draws, device) -> dict:
    """The noises' statistics for the result: ``d`` pixels, ``basis_rank`` (directions of positive
    variance of the training images), ``share_top10`` (share of their variance in the top 10),
    ``constant_pixels`` (share of pixels constant over the training images), and per noise
    :func:`noise_statistics` of ``n_draws`` draws."""
    from ntklab import attacks
    from ntklab.config import seed_everything

    seed_everything(p.seed)
    basis = attacks.pca_noise_basis(X)
    variances = basis.flatten(1).double().pow(2).sum(1)     # proportional to the eigenvalues
    top = variances.sort(descending=True).values
    starts = noise_starts(model_from_profile(p).to(device).eval(), X, p.eps, n_draws, basis=basis, seed=p.seed)
    return {"d": X[0].numel(), "basis_rank": len(basis), "share_top10": float(top[:10].sum() / top.sum()),
            "constant_pixels": float((X.flatten(1).std(0) == 0).double().mean()),
            "stats": noise_statistics(starts, p.eps)}


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
           "eps": p.eps, "runs": {}, "grid": {}, "kernels": {}, "probe_y": probe_y,
           "noise": _noise(p, train_set.tensors[0], config["n_draws"], device)}
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
    and of the PGD-AT reference, by :func:`ntklab.clock.step_cost`: ``cost_reps`` rounds, each
    giving every method in turn the same ``cost_batches`` batches, from the same initialisation for
    every method; per method the median over the rounds, in process-CPU seconds on the CPU (wall
    seconds after synchronising on a GPU). Returns ``{method: seconds per batch}``."""
    import copy
    import itertools

    import torch

    from ntklab import attacks
    from ntklab.clock import step_cost
    from ntklab.config import seed_everything
    from ntklab.train import attack_arguments, extra_attack_arguments, sgd_step  # the loop's own pieces

    seed_everything(p.seed)
    net0 = model_from_profile(p).to(device)
    if config["channels_last"]:
        net0 = net0.to(memory_format=torch.channels_last)
    x_all, y_all = train_set.tensors
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(p.seed))
    idx = perm[: config["cost_batches"] * p.batch_size].split(p.batch_size)
    batches = [(x_all[i].to(device), y_all[i].to(device)) for i in idx]

    def step(m):
        net = copy.deepcopy(net0)
        opt = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        steps = config["pgd_at_steps"] if m == "pgd" else None
        alpha = (p.pgd_alpha if steps == p.pgd_steps else p.eps / steps) if m == "pgd" else None
        kw = attack_arguments(m, p.eps, alpha, steps, "eval")
        kw.update(extra_attack_arguments(m, None, x_all, device))   # fgsm_pca: the data's basis, once
        cycle = itertools.cycle(batches)                            # every round: each batch once

        def one():
            xb, yb = next(cycle)
            net.train()
            sgd_step(net, opt, attacks.adversarial_examples(m, net, xb, yb, **kw), yb)
        return one

    steps = {m: step(m) for m in list(config["methods"]) + ["pgd"]}
    return step_cost(steps, rounds=config["cost_reps"], batches=len(batches), device=device)


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


# ------------------------------------------------------------------ analysis and claims
def _nan_if_none(x) -> float:
    return math.nan if x is None else float(x)


def _summary(runs: list) -> dict:
    """Mean and spread over the seeds of one method's runs, its collapses and its first seed's
    AutoAttack accuracy (NaN when not measured)."""
    import numpy as np

    clean = np.array([r["clean_acc"] for r in runs])
    robust = np.array([r["robust_acc"] for r in runs])
    times = np.array([r["training_time"] for r in runs])
    return {"n_runs": len(runs), "clean": clean.tolist(), "robust": robust.tolist(),
            "clean_mean": float(clean.mean()), "clean_std": float(clean.std()),
            "robust_mean": float(robust.mean()), "robust_std": float(robust.std()),
            "time_mean": float(times.mean()), "time_std": float(times.std()), "time_total": float(times.sum()),
            "collapsed": sum(r["collapse_epoch"] is not None for r in runs),
            "collapse_epochs": [r["collapse_epoch"] for r in runs],
            "learned": bool(clean.mean() >= LEARNED_ABOVE),
            "autoattack": float(runs[0].get("autoattack_acc", math.nan))}


def _seed_run(run: dict) -> dict:
    """What the chapter prints about one FGSM-AT seed (epochs 1-based, as in the figures)."""
    h = run["history"]
    pgd = h["extra"]["co_robust_acc"]
    c = run["collapse_epoch"]
    return {"seed": run["seed"], "collapse_epoch": None if c is None else c + 1,
            "detector_flags": [e + 1 for e in run["detector_flags"]], "best_pgd": float(max(pgd)),
            "final_pgd": float(pgd[-1]), "final_train_acc": float(h["train_acc"][-1])}


def _spectra(kernels: dict) -> dict:
    """Effective rank and top-10 concentration of every centred kernel of one kernel run (NaN for a
    kernel that is zero)."""
    from ntklab import metrics

    def safe(stat, K, *args):     # NaN for a zero kernel (a dead network), where both are undefined
        try:
            return stat(K, *args)
        except ValueError:
            return math.nan

    out = {}
    for which in ("clean", "ae"):
        centred = [metrics.center_kernel(K) for K in kernels[which]]
        out[which] = {"erank": [safe(metrics.effective_rank, K) for K in centred],
                      "top10": [safe(metrics.top_concentration, K, min(10, len(K))) for K in centred]}
    return out


def _kernel_analysis(result: dict) -> dict:
    """The kernel around the collapse of the first seed's FGSM-AT run: the spectra of both kernel
    runs, the snapshots just before (``before``: epochs completed) and just after (``after``) the
    collapse epoch, and the change of each effective rank from ``before`` to the end (``change``)
    and to ``after`` (``change_at_once``); NaN where FGSM-AT did not collapse in that seed."""
    import numpy as np

    from ntklab import metrics

    kernels = result["kernels"]
    if "fgsm" not in kernels:
        return {}
    epochs = list(kernels["fgsm"]["epochs"])
    spectra = {m: _spectra(k) for m, k in kernels.items()}
    t_co = result["runs"]["fgsm"][0]["collapse_epoch"]
    i = j = None
    if t_co is not None:   # the last snapshot with at most t_co epochs done, the first with t_co + 1
        i = max(k for k, e in enumerate(epochs) if e <= t_co)
        j = min(k for k, e in enumerate(epochs) if e >= t_co + 1)

    def change(m, which, end):
        if i is None or m not in spectra:
            return math.nan
        erank = spectra[m][which]["erank"]
        return float(erank[end] - erank[i])

    out = {"seed": result["runs"]["fgsm"][0]["seed"], "epochs": epochs, "collapsed": t_co is not None,
           "collapse_epoch": _nan_if_none(t_co), "before": _nan_if_none(None if i is None else epochs[i]),
           "after": _nan_if_none(None if j is None else epochs[j]), "spectra": spectra,
           "change": {m: {w: change(m, w, -1) for w in ("ae", "clean")} for m in KERNEL_METHODS},
           "change_at_once": {m: {w: change(m, w, j) for w in ("ae", "clean")} for m in KERNEL_METHODS}}
    out["specificity"] = out["change"]["fgsm"]["ae"] - out["change"]["fgsm_aniso"]["ae"]
    shown = sorted({0, len(epochs) - 1} | ({i, j} if i is not None else set()))
    out["ae_eigenvalues"] = {epochs[k]: np.sort(np.linalg.eigvalsh(metrics.center_kernel(
        kernels["fgsm"]["ae"][k])))[::-1].tolist() for k in shown}
    return out


def _larger_radius(result: dict) -> dict:
    """FGSM-RS and fgsm_aniso at the larger radius of the grid (first seed): worst-case robust
    accuracy, whether each collapsed, and fgsm_aniso's lead; NaN without such runs."""
    big = {m: runs[-1] for m, runs in result["grid"].items() if m in ("fgsm_rs", "fgsm_aniso")
           and runs[-1]["eps"] > result["eps"]}
    out = {"eps": max((r["eps"] for r in big.values()), default=math.nan)}
    for m in ("fgsm_rs", "fgsm_aniso"):
        r = big.get(m)
        out[m] = {"robust": math.nan if r is None else r["robust_acc"],
                  "collapsed": math.nan if r is None else float(r["collapse_epoch"] is not None)}
    out["aniso_lead"] = out["fgsm_aniso"]["robust"] - out["fgsm_rs"]["robust"]
    return out


def analyse(result: dict) -> dict:
    """Every number chapter 6 discusses or its claims check, from a result of :func:`run`:

    * ``eps``, ``seeds``, ``n_seeds``;
    * ``noise``: the result's noise statistics (``d``, ``basis_rank``, ``share_top10``,
      ``constant_pixels``, and per noise ``rms``, ``erank``, ``top10``; see :func:`noise_statistics`);
    * ``methods[m]`` for every method and ``"pgd"``: clean and worst-case robust accuracy per seed,
      their means and spreads, training time, ``collapsed`` (runs), ``learned`` (mean clean accuracy
      >= :data:`LEARNED_ABOVE`), ``autoattack`` (first seed) and ``step_ms`` (cost per batch);
    * ``fgsm_seeds``: per FGSM-AT seed, the collapse epoch and the detector's flags (1-based), the best
      and final held-out PGD accuracy and the final training accuracy;
    * ``aniso_gaps`` (per seed, fgsm_aniso's worst-case robust accuracy minus FGSM-AT's) and their
      minimum ``aniso_gap_min``; ``cost_ratio`` (fgsm_aniso's cost per batch over FGSM-AT's) and
      ``wall_ratio`` (the same for the runs' summed wall training times);
    * ``grid[m]``: per radius, clean and robust accuracy, final training accuracy, collapse epoch
      (1-based or None); ``larger``: FGSM-RS against fgsm_aniso at the larger radius;
    * ``kernel``: the kernel around the collapse (see ``_kernel_analysis``), empty without kernels.
    """
    runs = {**result["runs"], "pgd": [result["pgd_at"]]}
    methods = {m: {**_summary(r), "step_ms": 1000 * result["step_seconds"][m]} for m, r in runs.items()}
    out = {"eps": float(result["eps"]), "seeds": list(result["seeds"]), "n_seeds": len(result["seeds"]),
           "noise": {k: v for k, v in result["noise"].items() if k != "stats"} | result["noise"]["stats"],
           "methods": methods, "fgsm_seeds": [_seed_run(r) for r in result["runs"].get("fgsm", [])],
           "grid": {m: [{"eps": r["eps"], "clean": r["clean_acc"], "robust": r["robust_acc"],
                         "final_train_acc": r["history"]["train_acc"][-1],
                         "collapse_epoch": None if r["collapse_epoch"] is None else r["collapse_epoch"] + 1}
                        for r in rs] for m, rs in result["grid"].items()},
           "larger": _larger_radius(result), "kernel": _kernel_analysis(result)}
    if {"fgsm", "fgsm_aniso"} <= set(methods):
        fg, an = methods["fgsm"], methods["fgsm_aniso"]
        gaps = [a - f for a, f in zip(an["robust"], fg["robust"])]
        out.update(aniso_gaps=gaps, aniso_gap_min=min(gaps), cost_ratio=an["step_ms"] / fg["step_ms"],
                   wall_ratio=an["time_total"] / fg["time_total"])
    return out


def claims(analysis: dict, profile) -> list:
    """The claims of chapter 6 about its run (an :func:`analyse` dict), asserted under ``quick``
    (the thresholds are this module's constants); the last four are reported, never asserted: they
    say which way the run went where the chapter does not predict it."""
    from ntklab.claims import all_of, compare

    a, k, noise = analysis, analysis["kernel"], analysis["noise"]
    big = a["larger"]

    def m(method, key):        # NaN (a claim that fails) for a method the run did not train
        return analysis["methods"].get(method, {}).get(key, math.nan)
    return [
        compare("fgsm_collapses", f"plain FGSM-AT catastrophically overfits in at least {MIN_COLLAPSED} "
                f"of the {a['n_seeds']} seeds", m("fgsm", "collapsed"), ">=", MIN_COLLAPSED),
        compare("aniso_no_collapse", "fgsm_aniso overfits in no seed", m("fgsm_aniso", "collapsed"), "==", 0),
        compare("aniso_gap", "fgsm_aniso ends at least 10 points above FGSM-AT in worst-case robust accuracy "
                "in every seed (the smallest gap)", a.get("aniso_gap_min", math.nan), ">=", MIN_GAP),
        compare("aniso_cost", "fgsm_aniso's training costs at most 1.2 times FGSM-AT's (per batch, "
                "interleaved rounds). Reported, not asserted: CPU time on a shared machine did not keep it "
                "below 1.2 in every run", a.get("cost_ratio", math.nan), "<=", MAX_COST_RATIO, profiles=()),
        compare("pca_anisotropic", "fgsm_pca's noise is strongly anisotropic: the effective rank of its "
                "covariance is below a fifth of the pixels", noise.get("fgsm_pca", {}).get("erank", math.nan), "<",
                ANISOTROPIC_BELOW * noise["d"]),
        compare("pca_collapses", f"fgsm_pca overfits in at least {MIN_COLLAPSED} seeds. Reported, not asserted: "
                "it did not hold on every seed.", m("fgsm_pca", "collapsed"), ">=", MIN_COLLAPSED, profiles=()),
        compare("rs_no_collapse", "FGSM-RS (isotropic uniform noise) overfits in no seed",
                m("fgsm_rs", "collapsed"), "==", 0),
        all_of("ae_erank_rises", "FGSM-AT collapses in the kernel runs' seed, and the effective rank of its "
               "centred AE-NTK is higher at the end than just before the collapse epoch",
               [compare("collapsed", "", float(k.get("collapsed", False)), "==", 1),
                compare("change", "", k.get("change", {}).get("fgsm", {}).get("ae", math.nan), ">", 0)]),
        compare("ae_rise_at_once", "reported: that effective rank also rises over the collapse epoch alone",
                k.get("change_at_once", {}).get("fgsm", {}).get("ae", math.nan), ">", 0, profiles=()),
        compare("ae_rise_specific", "reported: it rises more than the fgsm_aniso run's over the same epochs "
                "(the change goes with the collapse, not with training)", k.get("specificity", math.nan),
                ">", 0, profiles=()),
        all_of("aniso_separates", "reported: at the larger radius fgsm_aniso does not overfit and keeps at "
               "least 10 points more worst-case robust accuracy than FGSM-RS",
               [compare("aniso_collapsed", "", big["fgsm_aniso"]["collapsed"], "==", 0),
                compare("lead", "", big["aniso_lead"], ">=", SEPARATES_BY)], profiles=()),
        compare("nfgsm_learns", "reported: N-FGSM learns at this radius (mean clean accuracy)",
                m("n_fgsm", "clean_mean"), ">=", LEARNED_ABOVE, profiles=()),
    ]
