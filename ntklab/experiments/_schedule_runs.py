"""The runs of chapter 5's experiment ``schedule`` (see :mod:`ntklab.experiments.schedule`, which
documents the experiment and its result and holds the analysis and the claims).

The computation lives in this module of its own so that the result cache, which keys an entry by
the code of the module that computes it and of every ``ntklab`` module that module imports, keys
the runs by the code that trains and evaluates them only: an edit of the analysis or of a claim in
:mod:`ntklab.experiments.schedule` reads the same runs rather than training them again.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ntklab.config import Profile
from ntklab.experiments import RunContext, cached, experiment, result_path
from ntklab.experiments.runs import RunSettings

__all__ = ["run", "make_config", "Settings", "continue_with_switch", "chapter_profile", "NAME"]

NAME = "schedule"
SEEDS_ENTRY = "schedule_seeds"   # the cache entries of the seeds' runs


def chapter_profile(profile: Profile) -> Profile:
    """The profile of chapter 5: chapter 4's settings (:class:`ntklab.experiments.runs.RunSettings`:
    a ``SmallCNN`` of width 8, eps 0.15, PGD-3 with step eps/4, decays at 50% and 75% of the epochs)
    shrunk under ``quick`` so that three seeds of the whole switch grid fit in about four minutes
    of one CPU core: 10 epochs (decays after 5 and 8), 1,000 training images in batches of 64, a
    probe of 100 and 500 test images. ``smoke``: chapter 4's smoke settings. Other profiles
    (``paper``): chapter 4's (:func:`ntklab.experiments.runs.chapter_profile`)."""
    from ntklab.experiments.runs import chapter_profile as chapter_4

    if profile.name == "quick":
        cp = RunSettings(epochs=10, width=8, eps=0.15, pgd_steps=3, n_probe=100, n_eval=500,
                         snapshot_every=1).apply(profile)
        return cp.replace(n_train=1000, batch_size=64)
    return chapter_4(profile)


@dataclass(frozen=True)
class Settings:
    """Chapter 5 under one profile.

    profile: :func:`chapter_profile`; n_seeds: training seeds (the profile's seed and the next
    ones); switch_grid: the switch epochs s (number of normal epochs) of the grid, from every
    ``max(1, E // 10)``-th epoch (``quick`` and ``smoke``: every epoch), the learning-rate decays and
    E itself (the normal run, no PGD epoch: the shared prefix, the grid's endpoint), so ``quick``
    runs s = 1..10 and ``paper`` (E = 200) s = 20, 40, ..., 180, the decays 100 and 150, and 200 (a
    choice of the book: every epoch would be 199 runs of up to 200 epochs; this grid trains 950
    PGD-AT epochs per seed, under five full PGD-AT runs); control_switches: the s of the "PGD-AT for
    the last E - s epochs only" controls (half-way to the first decay and at it); auto_threshold,
    auto_probe: the automatic switch's rule (velocity per unit of lr at most this fraction of the first
    epoch's, on a probe of this many training images, at the latest at the first decay);
    autoattack_n: test images for APGD-CE (smoke 32, quick 200, otherwise ``n_eval``; ``paper_cpu``, the
    dry run, takes ``paper``'s path with smoke's two seeds and short cost rounds), run on the
    models ``apgd_labels`` (full PGD-AT, the switch at the first decay, FGSM-RS); cost_rounds,
    cost_batches: the interleaved per-batch step costs.
    """

    profile: Profile
    autoattack_n: int
    n_seeds: int = 3
    auto_threshold: float = 0.2
    auto_probe: int = 32
    cost_rounds: int = 9
    cost_batches: int = 4

    @classmethod
    def for_profile(cls, profile: Profile) -> "Settings":
        cp = chapter_profile(profile)
        smoke = profile.name in ("smoke", "paper_cpu")   # the dry run: two seeds and short cost rounds
        return cls(cp, autoattack_n={"smoke": 32, "quick": 200}.get(profile.name, cp.n_eval),
                   n_seeds=2 if smoke else 3, **({"cost_rounds": 3, "cost_batches": 2} if smoke else {}))

    @property
    def cap(self) -> int:
        """The first learning-rate decay (half the epochs without decays): the latest switch."""
        cp = self.profile
        return min(cp.lr_milestones) if cp.lr_milestones else max(1, cp.epochs // 2)

    @property
    def seeds(self) -> list[int]:
        return [self.profile.seed + i for i in range(self.n_seeds)]

    @property
    def switch_grid(self) -> list[int]:
        E = self.profile.epochs
        step = max(1, E // 10)
        return sorted(set(range(step, E, step)) | {m for m in self.profile.lr_milestones if 0 < m < E} | {self.cap, E})

    @property
    def control_switches(self) -> list[int]:
        return sorted({max(1, self.cap // 2), self.cap})

    @property
    def apgd_labels(self) -> list[str]:
        return ["s=0", f"s={self.cap}", "fgsm_rs"]

    def labels(self) -> list[str]:
        return (["s=0"] + [f"s={s}" for s in self.switch_grid] + [f"late s={s}" for s in self.control_switches]
                + ["fgsm_rs"])


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    st = Settings.for_profile(profile)
    cp = st.profile
    return {"profile": cp.to_dict(), "seeds": st.seeds, "grid": st.switch_grid, "controls": st.control_switches,
            "labels": st.labels(), "auto": {"threshold": st.auto_threshold, "probe": st.auto_probe, "cap": st.cap},
            "probe": {"n": cp.n_probe, "seed": cp.seed + 1, "kind": "trace"},
            "eval": {"n": cp.n_eval, "attacks": ["fgsm", "pgd"], "steps": cp.eval_pgd_steps,
                     "apgd": {"attacks": ["apgd-ce"], "n": st.autoattack_n, "labels": st.apgd_labels}},
            "cost": {"rounds": st.cost_rounds, "batches": st.cost_batches, "methods": ["normal", "pgd", "fgsm_rs"]},
            "timing": "process CPU, per epoch"}


@experiment(NAME, "normal training first, PGD-AT after a switch epoch: a grid of switches, controls and an "
                  "automatic switch over several seeds, robustness and measured cost (chapter 5)", make_config)
def run(ctx: RunContext) -> dict:
    """Train the runs of chapter 5 under ``profile`` (see the module docstring for the result)."""
    return _compute(Settings.for_profile(ctx.profile), ctx.config, ctx.device, ctx.progress, ctx.force)


# ------------------------------------------------------------------ the shared prefix
def continue_with_switch(prefix_checkpoint, switch_epoch: int, config, checkpoint_dir) -> None:
    """Prepare ``checkpoint_dir`` so that ``train(model, data, config, checkpoint_dir=checkpoint_dir)``
    continues a run from ``prefix_checkpoint`` (a ``checkpoint.pt`` of :func:`ntklab.train.train`
    written after ``switch_epoch`` epochs of normal training) with ``config.strategy`` from epoch
    ``switch_epoch`` on: the run ``train(..., switch_epoch=switch_epoch)`` makes.

    The copy keeps the weights, the optimiser's state (SGD momentum) and the history of the first
    ``switch_epoch`` epochs; its recorded config becomes ``config`` (which must have
    ``switch_epoch=switch_epoch``; the data's fingerprint is kept), its history's switch epoch
    ``switch_epoch`` and the callback states are dropped (pass no stateful callbacks to the
    continuation). The learning rate of every epoch is the schedule's, as in one run.
    """
    import torch

    from ntklab.data import atomic_save
    from ntklab.train import CHECKPOINT_FORMAT, CHECKPOINT_NAME

    if config.switch_epoch != switch_epoch:
        raise ValueError(f"config.switch_epoch must be {switch_epoch}, got {config.switch_epoch!r}")
    state = torch.load(prefix_checkpoint, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{prefix_checkpoint} is not a checkpoint of format {CHECKPOINT_FORMAT}")
    history = dict(state["history"])
    if len(history["epoch"]) != switch_epoch or set(history["strategy"]) - {"normal"}:
        raise ValueError(f"{prefix_checkpoint} holds {len(history['epoch'])} epochs of {sorted(set(history['strategy']))}, "
                         f"not {switch_epoch} normal ones")
    history.update(switch_epoch=switch_epoch, finished=False, stop_reason=None,
                   extra={k: [] if not v else list(v) for k, v in history.get("extra", {}).items()})
    record = {**state["config"], **config.to_dict()}
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    atomic_save({**state, "config": record, "history": history, "callbacks": []},
                Path(checkpoint_dir) / CHECKPOINT_NAME)


class _CopyCheckpoints:
    """After every epoch the run's ``checkpoint.pt`` holds the state after the previous epochs:
    copy it to ``after_<epochs>.pt`` after the epochs in ``epochs`` (an int ``last``: epochs
    1..``last``; or a collection of epoch numbers), while the run is still normal."""

    def __init__(self, folder: Path, epochs):
        self.folder = Path(folder)
        self.epochs = set(range(1, epochs + 1)) if isinstance(epochs, int) else {int(e) for e in epochs}

    def on_epoch_end(self, epoch, model, history):
        from ntklab.train import CHECKPOINT_NAME

        if epoch in self.epochs:
            shutil.copyfile(self.folder / CHECKPOINT_NAME, self.folder / f"after_{epoch}.pt")


# ------------------------------------------------------------------ computation
def _compute(st: Settings, config, device, progress, force: bool = False) -> dict:
    """The runs of every seed, each seed one cache entry (``"schedule_seeds"``, keyed by the
    experiment's config and the seed): a sweep that shards (``python -m ntklab run schedule --shard
    i/n``, :mod:`ntklab.experiments._sweep`), and an interrupted computation keeps its finished seeds."""
    from ntklab import _progress, data
    from ntklab.config import get_device
    from ntklab.experiments._sweep import sweep

    cp = st.profile
    device = get_device(device)
    train_set, test_set = _data(cp)
    probe_x = data.subset(train_set, config["probe"]["n"], seed=config["probe"]["seed"]).tensors[0]
    test = data.subset(test_set, cp.n_eval, seed=cp.seed)
    out = {"config": config, "seeds": st.seeds, "grid": st.switch_grid, "controls": st.control_switches,
           "runs": {}, "kernels": {}, "auto": {}}
    seconds = {"wall": 0.0, "cpu": 0.0}
    with _progress.bar(progress, total=len(st.seeds) * len(st.labels()), desc=f"{NAME}: runs") as bar:
        def one_seed(seed, force=force):
            def compute():
                wall, cpu = time.perf_counter(), time.process_time()
                with tempfile.TemporaryDirectory(prefix="ntklab-schedule-") as work:
                    runs, kernels, auto = _seed_runs(st, seed, train_set, probe_x, Path(work) / f"seed{seed}", device,
                                                     bar)
                for label, (model, history) in runs.items():
                    runs[label] = _evaluate(st, config, label, model, history, test, probe_x, device)
                return {"runs": runs, "kernels": kernels, "auto": auto,
                        "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}

            result = cached(SEEDS_ENTRY, {**config, "seed": seed}, compute, force=force)
            bar.update(max(0, (st.seeds.index(seed) + 1) * len(st.labels()) - bar.n))
            return seed, result

        def exists(seed):
            return result_path(SEEDS_ENTRY, {**config, "seed": seed}).exists()

        for seed, res in sweep(st.seeds, one_seed, exists=exists, load=lambda seed: one_seed(seed, force=False)):
            out["runs"][str(seed)], out["kernels"][str(seed)], out["auto"][str(seed)] = \
                res["runs"], res["kernels"], res["auto"]
            seconds["wall"] += res["wall_seconds"]
            seconds["cpu"] += res["cpu_seconds"]
    out["lr_time"] = _lr_time(cp, len(train_set))
    wall, cpu = time.perf_counter(), time.process_time()
    out["step_seconds"] = _step_costs(st, train_set, device)
    # the seeds' own seconds (also when loaded from their entries), and the rest of this computation
    out["compute_seconds"] = seconds["wall"] + time.perf_counter() - wall
    out["cpu_seconds"] = seconds["cpu"] + time.process_time() - cpu
    return out


def _data(cp):
    from ntklab.experiments import data_from_profile

    return data_from_profile(cp)


def _lr_time(cp, n_train: int) -> list[float]:
    from ntklab.train import make_schedule

    schedule = make_schedule("multistep", lr=cp.lr, epochs=cp.epochs, milestones=cp.lr_milestones, gamma=cp.lr_gamma)
    n_batches = -(-n_train // cp.batch_size)
    return [schedule.epoch_mean(e, n_batches) for e in range(cp.epochs)]


def _config(cp, strategy: str, seed: int, **overrides):
    from ntklab.train import TrainConfig

    return TrainConfig.from_profile(cp, strategy, seed=seed, eval_every=0, **overrides)


def _fresh_model(cp, seed: int):
    from ntklab.config import seed_everything
    from ntklab.experiments import model_from_profile

    seed_everything(seed)  # the same initialisation for every run of one seed
    return model_from_profile(cp)


def _seed_runs(st: Settings, seed: int, train_set, probe_x, work: Path, device, bar):
    """The runs of one seed: ``({label: (model, history)}, kernels, auto)``."""
    from ntklab.callbacks import AutoSwitch, KernelSnapshots
    from ntklab.train import make_schedule, train

    cp, cap, grid = st.profile, st.cap, st.switch_grid
    x = train_set.tensors[0]
    snap_epochs = list(range(cap + 1))
    runs = {}

    def snapshots():
        return KernelSnapshots(probe_x, None, snap_epochs, kind="trace", ae=False, statistics_x=x,
                               statistics_batch_size=cp.batch_size)

    # the shared normal prefix: the normal run (s = E, the grid's endpoint), its checkpoint copied after every s of the
    # grid; each other switch continues from its copy
    last = grid[-1]
    prefix_dir = work / f"s={last}"
    schedule = make_schedule("multistep", lr=cp.lr, epochs=cp.epochs, milestones=cp.lr_milestones, gamma=cp.lr_gamma)
    n_batches = -(-len(x) // cp.batch_size)
    from ntklab import data

    auto_probe = data.subset(train_set, st.auto_probe, seed=seed).tensors[0]  # as train(switch_epoch="auto") draws it
    auto = AutoSwitch(auto_probe, cap, threshold=st.auto_threshold, lr_of_epoch=lambda e: schedule.epoch_mean(e, n_batches),
                      bn_x=x, bn_batch_size=cp.batch_size, steer=False)
    normal_snaps = snapshots()
    model = _fresh_model(cp, seed)
    history = train(model, train_set, _config(cp, "pgd", seed, switch_epoch=last), device=device,
                    callbacks=[normal_snaps, auto, _CopyCheckpoints(prefix_dir, grid[:-1])],
                    checkpoint_dir=prefix_dir, progress=False)
    runs[f"s={last}"] = (model, history)
    bar.update(1)
    for s in grid[:-1]:
        config = _config(cp, "pgd", seed, switch_epoch=s)
        folder = work / f"s={s}"
        continue_with_switch(prefix_dir / f"after_{s}.pt", s, config, folder)
        (prefix_dir / f"after_{s}.pt").unlink()   # one copy per switch (a paper-scale model's copies add up)
        model = _fresh_model(cp, seed)
        runs[f"s={s}"] = (model, train(model, train_set, config, device=device, checkpoint_dir=folder, progress=False))
        bar.update(1)
    # full PGD-AT, with the kernels up to the first decay
    pgd_snaps = snapshots()
    model = _fresh_model(cp, seed)
    runs["s=0"] = (model, train(model, train_set, _config(cp, "pgd", seed), device=device, callbacks=[pgd_snaps],
                                progress=False))
    bar.update(1)
    # controls: PGD-AT for the last E - s epochs only, from the same initialisation and with the same rates
    for s in st.control_switches:
        milestones = tuple(m - s for m in cp.lr_milestones if m > s)
        gamma_power = sum(m <= s for m in cp.lr_milestones)
        config = _config(cp, "pgd", seed, epochs=cp.epochs - s, milestones=milestones,
                         lr=cp.lr * cp.lr_gamma ** gamma_power)
        model = _fresh_model(cp, seed)
        runs[f"late s={s}"] = (model, train(model, train_set, config, device=device, progress=False))
        bar.update(1)
    model = _fresh_model(cp, seed)
    runs["fgsm_rs"] = (model, train(model, train_set, _config(cp, "fgsm_rs", seed), device=device, progress=False))
    bar.update(1)
    kernels = {"epochs": normal_snaps.snapshot_epochs, "normal": normal_snaps.kernels("clean"),
               "pgd": pgd_snaps.kernels("clean")}
    auto_out = {"switch_epoch": auto.switch_epoch, "velocities": list(auto.velocities), "cpu_seconds": auto.cpu_seconds}
    return {l: runs[l] for l in st.labels()}, kernels, auto_out


def _evaluate(st, config, label, model, history, test, probe_x, device) -> dict:
    import torch

    from ntklab import attacks, evaluate, ntk

    cp, ev = st.profile, config["eval"]
    model.eval()
    torch.manual_seed(cp.seed)
    clean = evaluate.clean_accuracy(model, test, device=device)
    fns = [lambda m, xb, yb: attacks.adversarial_examples("fgsm", m, xb, yb, eps=cp.eps, bn_mode="eval"),
           lambda m, xb, yb: attacks.adversarial_examples("pgd", m, xb, yb, eps=cp.eps, alpha=cp.pgd_alpha,
                                                          steps=ev["steps"], bn_mode="eval")]
    flags = evaluate.robust_flags(model, test, fns, device=device)
    apgd = None
    if label in ev["apgd"]["labels"]:
        apgd = evaluate.autoattack_accuracy(model, test, eps=cp.eps, version="custom", attacks=ev["apgd"]["attacks"],
                                            n=ev["apgd"]["n"], seed=cp.seed, device=device)
    h = history.to_dict()
    kernel = ntk.empirical_ntk(model, probe_x.to(next(model.parameters()).device), kind="trace").detach().cpu()
    return {"history": h, "clean_acc": float(clean), "robust_flags": flags.to(torch.uint8).tolist(),
            "robust_acc": float(flags.double().mean()), "apgd_acc": apgd,
            "cpu_epoch_seconds": history.epoch_training_times(cpu=True), "final_kernel": kernel.float()}


def _step_costs(st, train_set, device) -> dict:
    """Seconds per batch of a normal, a PGD-k and an FGSM-RS training step in every round
    (:func:`ntklab.train.training_step_costs`, on copies of one initialisation)."""
    import torch

    from ntklab.train import training_step_costs

    cp = st.profile
    x, y = train_set.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cp.seed))
    batches = [(x[i], y[i]) for i in perm[: st.cost_batches * cp.batch_size].split(cp.batch_size)]
    model = _fresh_model(cp, cp.seed)
    configs = {m: _config(cp, m, cp.seed) for m in ("normal", "pgd", "fgsm_rs")}
    return training_step_costs(model, batches, configs, rounds=st.cost_rounds, device=device, per_round=True)
