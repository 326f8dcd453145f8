"""Training runs with a kernel snapshot after every epoch (chapter 4), and the settings chapter 5 starts from.

Chapter 4 (experiment ``strategies``) trains normal training, FGSM-RS, PGD-AT and TRADES under one
multistep schedule and takes the trace C-NTK of a fixed probe set after every epoch. Chapter 5
(experiment ``schedule``) starts from the same per-profile settings (:class:`RunSettings`) but trains
its own runs (its switch grid shares a normal prefix, ``ntklab.experiments._schedule_runs``). Each
run here is one entry of the result cache (``"kernel_runs"``, see :func:`kernel_run`), so asking
again for a run loads it. No experiment is registered here.

Settings of the runs per profile (:class:`RunSettings`, applied by :func:`chapter_profile`;
everything else is the profile's own):

* ``smoke``: 4 epochs (decays after 2 and 3), a ``SmallCNN`` of width 8 (at the smoke profile's width
  4 the ReLUs of the FGSM-RS model died on the adversarial probe, leaving a constant AE-NTK),
  eps 0.15, PGD-2, a probe of 16;
* ``quick``: 20 epochs (decays after 10 and 15), a ``SmallCNN`` of width 8 instead of 32 (so that
  six runs with a kernel after every epoch fit in about four minutes of one CPU core), eps 0.15
  (full PGD-AT from scratch at eps 0.2 failed to get off the ground for one of three seeds at this
  width), training PGD-3 with step eps/4, a probe of 100 images, 1,000 test images;
* ``paper``: the profile as it is (200 epochs with decays at 100 and 150, PreAct ResNet-18, eps 8/255,
  PGD-10, a probe of ``n_probe``), kernels every ``epochs // 50`` epochs;
* ``paper_cpu`` (the paper-shaped dry run): the profile as it is, like ``paper``, with kernels every
  2 epochs (so that the snapshots-every-k-epochs path of ``paper`` runs).

    >>> from ntklab.experiments import runs
    >>> cp = runs.chapter_profile(ntklab.config.get_profile("quick"))
    >>> res = runs.kernel_run(cp, "pgd", ae=True)      # cached: loaded when it exists
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ntklab import _progress
from ntklab.experiments import cached, checkpoint_dir, data_from_profile, model_from_profile, train_kwargs

__all__ = ["RunSettings", "chapter_profile", "run_config", "kernel_run", "kernel_runs", "RUNS_ENTRY", "DECAYS"]

RUNS_ENTRY = "kernel_runs"
DECAYS = (0.5, 0.75)  # fractions of the epochs at which the learning rate is multiplied by gamma


@dataclass(frozen=True)
class RunSettings:
    """The per-profile settings of the runs of chapters 4 and 5 (see the module docstring).

    epochs, width (of the ``SmallCNN``), eps, pgd_steps, n_probe, n_eval: replace the profile's
    values where not ``None`` (the PGD step becomes eps/4 when eps is replaced); decays: fractions
    of the epochs at which the learning rate decays; snapshot_every: kernels after every this many
    epochs (``None``: ``epochs // 50``, at least 1).
    """

    epochs: int | None = None
    width: int | None = None
    eps: float | None = None
    pgd_steps: int | None = None
    n_probe: int | None = None
    n_eval: int | None = None
    decays: tuple[float, ...] = DECAYS
    snapshot_every: int | None = None

    @classmethod
    def for_profile(cls, profile) -> "RunSettings":
        """The settings for ``profile`` (by its name; unknown names keep their own values apart
        from the decays)."""
        small = dict(width=8, eps=0.15, snapshot_every=1)
        return {"smoke": cls(epochs=4, pgd_steps=2, n_probe=16, **small),
                "quick": cls(epochs=20, pgd_steps=3, n_probe=100, n_eval=1000, **small),
                "paper_cpu": cls(snapshot_every=2),
                }.get(profile.name, cls())

    def apply(self, profile):
        """``profile`` with these settings, and learning-rate decays at :attr:`decays` of its epochs."""
        changes = {k: getattr(self, k) for k in ("epochs", "eps", "pgd_steps", "n_probe", "n_eval")
                   if getattr(self, k) is not None}
        if self.width is not None:
            changes["model_kwargs"] = {"width": self.width}
        if self.eps is not None:
            changes["pgd_alpha"] = self.eps / 4
        cp = profile.replace(**changes)
        milestones = {round(f * cp.epochs) for f in self.decays}
        return cp.replace(lr_milestones=tuple(sorted(m for m in milestones if 0 < m < cp.epochs)))

    def snapshot_epochs(self, cp) -> list[int]:
        """The completed epochs after which the runs of the chapter profile ``cp`` take a kernel."""
        every = self.snapshot_every or max(1, cp.epochs // 50)
        return sorted(set(range(0, cp.epochs + 1, every)) | {cp.epochs})


def chapter_profile(profile):
    """The profile that chapters 4 and 5 run: ``profile`` with the :class:`RunSettings` of its name
    (see the module docstring), PGD step eps/4, and learning-rate decays at 50% and 75% of the
    epochs (epochs 100 and 150 of the paper's 200). Unknown profile names keep their own values
    apart from the decays."""
    return RunSettings.for_profile(profile).apply(profile)


def run_config(cp, strategy, schedule, ae, overrides=None) -> dict:
    """The config (cache key) of :func:`kernel_run` under the chapter profile ``cp`` for ``strategy``
    under ``schedule``, with the AE-NTK when ``ae``, and further ``train`` keywords ``overrides``."""
    base = train_kwargs(cp, strategy)      # keep_best: the profile's select_best; it needs an evaluation every epoch
    kw = {**base, "lr_schedule": schedule, "eval_every": 1 if base.get("keep_best") else 0, **(overrides or {})}
    snapshots = RunSettings.for_profile(cp).snapshot_epochs(cp)
    return {"profile": cp.to_dict(), "train": kw, "snapshot_epochs": snapshots, "ae": bool(ae),
            "timing": "wall and process CPU", "probe": {"n": cp.n_probe, "seed": cp.seed + 1, "kind": "trace"},
            "eval": {"n": cp.n_eval, "attacks": ["fgsm", "pgd"], "steps": cp.eval_pgd_steps}}


def kernel_run(profile, strategy: str, *, schedule: str = "multistep", ae: bool = False, device=None,
               force: bool = False, progress=True, **train_overrides) -> dict:
    """One training run of chapters 4 and 5 with a kernel snapshot after every epoch, cached.

    profile: a profile already passed through :func:`chapter_profile`. strategy: one of
    :data:`ntklab.train.STRATEGIES`; schedule: ``"multistep"``, ``"cosine"`` or ``"constant"``;
    ae: also the AE-NTK (PGD-``pgd_steps`` examples of the probe against the model of that epoch);
    train_overrides: further JSON-serialisable keywords of :func:`ntklab.train.train`, e.g.
    ``switch_epoch=5`` or ``switch_epoch="auto"`` (normal training first, chapter 5), or
    ``seed=...``: another initialisation and another shuffling (chapter 4's second normal run, the
    seed baseline), with the same probe and test subset.
    progress: ``True`` for a bar that ticks once per epoch, or a tqdm bar to tick (the experiments
    share one over all their runs), or ``False``. One tick per epoch rather than the training
    loop's bars per batch: a notebook cell that trains for minutes would otherwise send thousands
    of widget messages, more than a notebook test runner reliably reads after the cell.

    Returns a dict: ``history`` (:meth:`ntklab.train.History.to_dict`); ``kernels``: ``epochs``
    (completed epochs of the snapshots, 0 = initialisation), ``clean`` (T, n, n) and, with ``ae``,
    ``ae`` (T, n, n) float32 trace kernels; snapshot 0 is the kernel of the network SGD starts
    from (BN running statistics refreshed on the training images with the training batch size,
    :func:`ntklab.bn.refresh_bn_statistics`), ``clean_default_init`` (n, n) the same with PyTorch's
    default buffers (the wrong K_0, for comparison); ``refreshed`` (T, n, n): at every snapshot the
    C-NTK of a statistics-refreshed copy (same weights: the kernel's motion without learning);
    ``probe_clean_acc``, ``probe_ae_acc``; ``probe_y`` (n,)
    labels of the probe (sorted); ``lr_time``: the mean learning rate of every epoch (the length of
    the epoch in gradient-flow time, per unit of the base rate times steps); ``bn_refresh``: the
    last ``refreshed`` kernel (``None`` when the last epoch has no snapshot);
    ``clean_acc``, ``robust_acc`` in [0, 1] on the test subset; ``training_time`` (attack + update
    (+ switch measurement) wall seconds, from the history); ``cpu_training_time``: the same
    measured in process CPU seconds (``History.training_time_cpu``); ``cpu_epoch_seconds``: per
    epoch; ``state_dict``; ``compute_seconds``.
    When the profile selects the best checkpoint (its ``select_best``, Rice et al. 2020: the training
    config's ``keep_best``), the run is evaluated after every epoch (clean and PGD accuracy on the
    test subset, in ``history``) and the result gains ``best_epoch`` (0-based), ``best_clean_acc``
    and ``best_robust_acc`` (the weights of that epoch evaluated exactly as the last: the same test
    subset, attacks and seed) and ``best_state_dict``; ``clean_acc``, ``robust_acc`` and
    ``state_dict`` stay the last epoch's. The epoch is chosen on the same test subset, as the
    "best checkpoint" figures of Rice et al. are (their held-out validation set picks nearly the
    same epoch), so the best figures are optimistic by construction and the last ones are not.
    Same config, same entry: a chapter asking for a run another chapter made loads it.
    """
    from ntklab.config import get_device

    config = run_config(profile, strategy, schedule, ae, train_overrides)
    checkpoints = checkpoint_dir(RUNS_ENTRY, config)
    return cached(RUNS_ENTRY, config, lambda: _compute_run(profile, config, get_device(device), progress,
                                                           checkpoints), force=force)


def _compute_run(cp, config, device, progress, checkpoints) -> dict:
    from ntklab import data
    from ntklab.callbacks import BestCheckpoint, KernelSnapshots
    from ntklab.config import seed_everything
    from ntklab.train import make_schedule, train

    start = time.perf_counter()
    kw = config["train"]
    train_set, test_set = data_from_profile(cp)
    probe_x, probe_y = data.subset(train_set, config["probe"]["n"], seed=config["probe"]["seed"]).tensors
    order = probe_y.argsort(stable=True)
    probe_x, probe_y = probe_x[order], probe_y[order]
    seed_everything(kw.get("seed", cp.seed))  # the same initialisation for every run of one seed
    model = model_from_profile(cp)
    snaps = KernelSnapshots(probe_x, probe_y, config["snapshot_epochs"], kind=config["probe"]["kind"],
                            ae=config["ae"], eps=cp.eps, alpha=cp.pgd_alpha, steps=cp.pgd_steps,
                            statistics_x=train_set.tensors[0], statistics_batch_size=kw["batch_size"], floor=True)
    best = BestCheckpoint() if kw.get("keep_best") else None
    with _epoch_bar(progress, kw["epochs"], f"{kw['strategy']} ({kw['lr_schedule']})") as bar:
        history = train(model, train_set, **kw, callbacks=[snaps, _Tick(bar), *([best] if best else [])],
                        eval_set=test_set if best else None, device=device, checkpoint_dir=checkpoints,
                        progress=False)
    schedule = make_schedule(kw["lr_schedule"], lr=kw["lr"], epochs=kw["epochs"], milestones=kw["milestones"],
                             gamma=kw["gamma"])
    n_batches = -(-len(train_set) // kw["batch_size"])
    kernels = {"epochs": snaps.snapshot_epochs, "clean": snaps.kernels("clean"),
               "refreshed": snaps.kernels("refreshed"), "clean_default_init": snaps.default_kernel,
               "probe_clean_acc": snaps.probe_clean_acc, "probe_ae_acc": snaps.probe_ae_acc}
    if config["ae"]:
        kernels["ae"] = snaps.kernels("ae")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    refresh = kernels["refreshed"][-1] if snaps.snapshot_epochs[-1] == kw["epochs"] else None
    test = data.subset(test_set, config["eval"]["n"], seed=cp.seed)
    clean, robust = _test_accuracy(cp, config, model, test, device)
    out = {}
    if best is not None:
        best_clean, best_robust = _test_accuracy(cp, config, best.load_into(model_from_profile(cp)).to(device), test,
                                                 device)
        out = {"best_epoch": best.best_epoch, "best_clean_acc": best_clean, "best_robust_acc": best_robust,
               "best_state_dict": best.best_state}
    return {**out, "history": history.to_dict(), "kernels": kernels, "probe_y": probe_y,
            "lr_time": [schedule.epoch_mean(e, n_batches) for e in range(kw["epochs"])],
            "bn_refresh": refresh, "clean_acc": float(clean), "robust_acc": float(robust),
            "training_time": history.training_time, "cpu_training_time": history.training_time_cpu,
            "cpu_epoch_seconds": history.epoch_training_times(cpu=True), "state_dict": state,
            "compute_seconds": time.perf_counter() - start, "kernel_seconds": history.measurement_time}


def _test_accuracy(cp, config, model, test, device) -> tuple[float, float]:
    """(clean, worst-case robust) accuracy of ``model`` on the test subset, after seeding with the
    profile's seed: the last and the best checkpoint of a run are evaluated alike."""
    import torch

    from ntklab import evaluate

    model.eval()
    torch.manual_seed(cp.seed)
    clean = evaluate.clean_accuracy(model, test, device=device)
    robust = evaluate.worst_case_accuracy(model, test, eps=cp.eps, attacks=config["eval"]["attacks"],
                                          alpha=cp.pgd_alpha, steps=config["eval"]["steps"], device=device)
    return float(clean), float(robust)


class _Tick:
    """A callback that ticks a progress bar once per epoch trained."""

    def __init__(self, bar):
        self.bar = bar

    def on_epoch_end(self, epoch, model, history):
        self.bar.update(1)


def _epoch_bar(progress, total: int, desc: str):
    """A bar over ``total`` epochs (a context manager): ``progress`` itself when it is a bar (not
    closed here), a new tqdm.auto bar when it is true, a silent stand-in otherwise."""
    import contextlib

    if hasattr(progress, "update"):
        return contextlib.nullcontext(progress)
    return _progress.bar(progress, total=total, desc=desc)


def kernel_runs(profile, specs, *, device=None, force: bool = False, progress=True, desc: str = "") -> list[dict]:
    """:func:`kernel_run` for each dict of keyword arguments in ``specs``, with one progress bar
    over all their epochs (runs loaded from the cache count as done). Chapters 4 and 5.

    A sweep that shards (:mod:`ntklab.experiments._sweep`): under ``python -m ntklab run NAME
    --shard i/n`` this process trains only the specs at positions p with ``p % n == i - 1``, loads
    the others' runs that are already cached, and raises
    :class:`ntklab.experiments._sweep.ShardDone` when some are not."""
    from ntklab.experiments import result_path
    from ntklab.experiments._sweep import sweep

    with _progress.bar(progress, total=len(specs) * profile.epochs, desc=desc) as bar:
        done = [0]

        def one(item, force=force):
            result = kernel_run(profile, device=device, force=force, progress=bar, **item[1])
            done[0] += 1
            bar.update(max(0, done[0] * profile.epochs - bar.n))
            return result

        def exists(item):
            spec = dict(item[1])
            strategy, schedule, ae = spec.pop("strategy"), spec.pop("schedule", "multistep"), spec.pop("ae", False)
            return result_path(RUNS_ENTRY, run_config(profile, strategy, schedule, ae, spec)).exists()

        return sweep(list(enumerate(specs)), one, exists=exists, load=lambda item: one(item, force=False))

