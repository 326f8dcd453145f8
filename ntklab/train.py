"""One training loop for every strategy of the book, with schedules, callbacks, timing and resume.

Strategies (``strategy=``), each a minimisation of the cross-entropy on the inputs named:

* ``"normal"``: clean inputs;
* ``"fgsm"``: FGSM examples from the clean point, step eps (Goodfellow et al. 2015);
* ``"fgsm_rs"``: FGSM after a uniform random start (Wong et al. 2020, "Fast is better than free");
* ``"n_fgsm"``: noise plus FGSM without projection (de Jorge et al. 2022);
* ``"fgsm_aniso"``: FGSM after anisotropic noise (Li et al., arXiv 2312.02236, section 5);
* ``"fgsm_pca"``: FGSM after Gaussian noise with the training images' covariance (the book's
  data-derived anisotropic noise, :func:`ntklab.attacks.fgsm_pca`; chapter 6);
* ``"pgd"``: PGD-k examples (Madry et al. 2018);
* ``"trades"``: the TRADES loss, clean cross-entropy plus beta times the KL term (Zhang et al. 2019).

``switch_epoch=s`` trains normally for epochs 0..s-1 and with ``strategy`` from epoch s on: the
cost-saving schedule that Li et al. derive from the "kernel learning, lazy training, kernel learning"
evolution of the NTK (chapter 5). ``switch_epoch="auto"`` picks s during the run from the kernel
velocity on a small probe set (:class:`ntklab.callbacks.AutoSwitch`), at the latest at a cap.
``clean_update=True`` gives every adversarial batch an update on its clean inputs before the
adversarial one, the rule of Loo et al.'s code (chapter 8). The optimiser is SGD with momentum and
weight decay; the learning rate follows a :class:`LRSchedule`. Inputs are images in [0, 1]; the
attacks come from :mod:`ntklab.attacks` and never touch parameter gradients.

:func:`train` returns a :class:`History`; with ``checkpoint_dir`` a run survives interruption and
resumes bit for bit (on the CPU). Callbacks live in :mod:`ntklab.callbacks`. Introduced in chapter 1;
the strategies are compared in chapter 4.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ntklab import _checks, _progress
from ntklab.callbacks import AutoSwitch, CatastrophicOverfittingDetector, Callback, KernelSnapshots, evaluating
from ntklab.config import get_device
from ntklab.data import as_tensors, describe_load_error, subset

__all__ = ["train", "History", "STRATEGIES", "SCHEDULES", "LRSchedule", "MultiStepLR", "CosineLR",
           "ConstantLR", "make_schedule", "Callback", "KernelSnapshots",
           "CatastrophicOverfittingDetector", "CHECKPOINT_NAME"]

STRATEGIES = ("normal", "fgsm", "fgsm_rs", "n_fgsm", "fgsm_aniso", "fgsm_pca", "pgd", "trades")
SCHEDULES = ("multistep", "cosine", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1
_TIME_KEYS = ("time_attack", "time_update", "time_eval", "time_callbacks", "time_switch")


# ------------------------------------------------------------------ learning-rate schedules
class LRSchedule:
    """The learning rate as a function of the 0-based epoch and the batch within it.

    Subclasses define ``__call__(epoch, batch=0, num_batches=1) -> float`` and ``describe()``
    (a dict of primitives that identifies the schedule in checkpoints). ``per_batch``: whether the
    rate changes within an epoch. Schedules are stateless, so resuming needs only the epoch.
    """

    per_batch = False

    def __call__(self, epoch: int, batch: int = 0, num_batches: int = 1) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"class": type(self).__name__, **{k: v for k, v in vars(self).items()}}

    def epoch_mean(self, epoch: int, num_batches: int = 1) -> float:
        """The mean rate over the ``num_batches`` batches of a 0-based epoch: the epoch's length in
        gradient-flow time per step (chapter 4 measures kernel velocity per unit of it)."""
        if not self.per_batch:
            return self(epoch)
        return sum(self(epoch, b, num_batches) for b in range(num_batches)) / num_batches


class MultiStepLR(LRSchedule):
    """``lr * gamma ** (number of milestones <= epoch)``, constant within an epoch: milestones
    (100, 150) of 200 epochs give lr for epochs 0-99, lr*gamma for 100-149, lr*gamma^2 after."""

    def __init__(self, lr: float, milestones: Sequence[int] = (), gamma: float = 0.1):
        if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise ValueError(f"milestones must be a sequence of epochs, got {milestones!r}")
        self.lr, self.gamma = _checks.number("lr", lr, positive=True), _checks.number("gamma", gamma, positive=True)
        self.milestones = sorted(_checks.count("milestones", m, minimum=0) for m in milestones)

    def __call__(self, epoch, batch=0, num_batches=1):
        return self.lr * self.gamma ** sum(m <= epoch for m in self.milestones)


class CosineLR(LRSchedule):
    """Cosine annealing from ``lr`` to ``min_lr`` over ``epochs``, updated every batch:
    ``min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2`` with t = epoch + batch / num_batches."""

    per_batch = True

    def __init__(self, lr: float, epochs: int, min_lr: float = 0.0):
        self.lr, self.epochs = _checks.number("lr", lr, positive=True), _checks.count("epochs", epochs, minimum=0)
        self.min_lr = _checks.number("min_lr", min_lr)

    def __call__(self, epoch, batch=0, num_batches=1):
        t = (epoch + batch / max(num_batches, 1)) / max(self.epochs, 1)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


class ConstantLR(LRSchedule):
    """The same ``lr`` throughout."""

    def __init__(self, lr: float):
        self.lr = _checks.number("lr", lr, positive=True)

    def __call__(self, epoch, batch=0, num_batches=1):
        return self.lr


def make_schedule(lr_schedule, *, lr: float, epochs: int, milestones=(), gamma: float = 0.1) -> LRSchedule:
    """An :class:`LRSchedule` from a name in :data:`SCHEDULES` (or an ``LRSchedule``, returned as is)."""
    if isinstance(lr_schedule, LRSchedule):
        return lr_schedule
    if lr_schedule == "multistep":
        return MultiStepLR(lr, milestones, gamma)
    if lr_schedule == "cosine":
        return CosineLR(lr, epochs)
    if lr_schedule == "constant":
        return ConstantLR(lr)
    raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use one of {', '.join(SCHEDULES)} "
                     f"or an LRSchedule object")


# ------------------------------------------------------------------ history
@dataclass
class History:
    """Per-epoch record of a run (lists of equal length, one entry per epoch trained).

    epoch: 0-based index; strategy: the one used that epoch ("normal" before ``switch_epoch``);
    lr: the learning rate at the epoch's first batch; loss: mean training loss; train_acc: accuracy
    on the inputs the update saw (the adversarial examples under AT; ``None`` for TRADES, whose
    loss hides its logits); clean_acc, pgd_acc: on the fixed evaluation subset (``None`` when not
    evaluated that epoch); time_attack, time_update, time_eval, time_callbacks: wall seconds
    (for TRADES the loss's own forward passes fall in time_attack, inside ``trades_loss``);
    time_switch: seconds the automatic switch (``switch_epoch="auto"``) spent measuring kernels,
    part of the training time since the schedule cannot do without it (0 otherwise).
    extra: per-epoch values logged by callbacks (``log``), padded with ``None``.
    switch_epoch: the 0-based epoch from which ``strategy`` was used when a switch was asked for
    (the one chosen, under ``"auto"``; ``None`` while undecided or without a switch).
    ``training_time`` = attack + update (+ switch) time, excluding measurement. JSON-ready via
    ``to_dict``.
    """

    epoch: list = field(default_factory=list)
    strategy: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    clean_acc: list = field(default_factory=list)
    pgd_acc: list = field(default_factory=list)
    time_attack: list = field(default_factory=list)
    time_update: list = field(default_factory=list)
    time_eval: list = field(default_factory=list)
    time_callbacks: list = field(default_factory=list)
    time_switch: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    time_begin: float = 0.0  # callbacks' on_train_begin (e.g. the kernel at initialisation)
    stop_reason: str | None = None
    finished: bool = False
    switch_epoch: int | None = None

    _ROW = ("epoch", "strategy", "lr", "loss", "train_acc", "clean_acc", "pgd_acc") + _TIME_KEYS

    def __len__(self) -> int:
        return len(self.epoch)

    def append(self, **row) -> None:
        """Add one epoch; missing fields are ``None`` (times: 0.0)."""
        unknown = set(row) - set(self._ROW)
        if unknown:
            raise ValueError(f"unknown history fields {sorted(unknown)}")
        for key in self._ROW:
            getattr(self, key).append(row.get(key, 0.0 if key in _TIME_KEYS else None))
        for values in self.extra.values():
            values.append(None)

    def log(self, key: str, value) -> None:
        """Set ``extra[key]`` for the latest epoch (a number, string, bool or None)."""
        if not len(self):
            raise ValueError("history.log needs at least one epoch")
        values = self.extra.setdefault(key, [None] * len(self))
        values[-1] = value

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current epoch."""
        self.stop_reason = reason

    @property
    def training_time(self) -> float:
        """Seconds spent crafting attacks, updating weights and, under ``switch_epoch="auto"``,
        measuring the kernel velocity that decides the switch (evaluation and callbacks excluded)."""
        return float(sum(self.time_attack) + sum(self.time_update) + sum(self.time_switch))

    @property
    def measurement_time(self) -> float:
        """Seconds spent in evaluation and callbacks."""
        return float(sum(self.time_eval) + sum(self.time_callbacks) + self.time_begin)

    def to_dict(self) -> dict:
        """Plain dict of lists and numbers (JSON-serialisable; also safe for ``weights_only``)."""
        d = dataclasses.asdict(self)
        d["extra"] = {k: list(v) for k, v in self.extra.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        names = {f.name for f in dataclasses.fields(cls)}
        history = cls(**{k: (dict(v) if k == "extra" else list(v) if isinstance(v, (list, tuple)) else v)
                         for k, v in d.items() if k in names})
        if not history.time_switch:  # written before time_switch existed
            history.time_switch = [0.0] * len(history)
        return history


# ------------------------------------------------------------------ helpers
class _Clock:
    """Sums named intervals: ``perf_counter`` on the CPU; CUDA events on the GPU, read once per
    epoch so that timing costs no host synchronisation per batch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._pending: list = []

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        if self.cuda:
            self._pending.append((name, start, end))
        else:
            self.totals[name] = self.totals.get(name, 0.0) + (end - start)

    def collect(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, s, e in self._pending:
                self.totals[name] = self.totals.get(name, 0.0) + s.elapsed_time(e) / 1000.0
        totals, self.totals, self._pending = self.totals, {}, []
        return totals


@contextlib.contextmanager
def _measurement_rng(device: torch.device, seed: int, epoch: int, salt: int):
    """Random numbers for evaluation and callbacks, seeded from (seed, epoch, salt), drawn from a
    fork so the training stream is untouched (measuring never changes the trajectory)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + epoch * 101 + salt) % 2**63)
        yield


def _plain(obj):
    """Tuples to lists, recursively (configs compare the same before and after a checkpoint)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _check_config(saved: dict, now: dict, where: Path) -> None:
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        same = math.isclose(a, b, rel_tol=1e-6) if key == "data_sum" and None not in (a, b) else a == b
        if not same:
            diffs.append(f"{key}: checkpoint {a!r}, this call {b!r}")
    if diffs:
        raise ValueError(f"the checkpoint in {where} was written by a different run ("
                         + "; ".join(diffs) + "). Use another checkpoint_dir, or delete it to start over.")


def _attack_kwargs(strategy, eps, alpha, steps, bn_mode) -> dict:
    """The attack's arguments, checked before the first batch (not after a switch epoch)."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"attack_bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    eps = _checks.number("eps", eps)
    _checks.number("alpha", alpha, positive=True, allow_none=True)
    _checks.count("steps", steps, allow_none=True)
    if strategy in ("pgd", "trades"):
        alpha = eps / 4 if alpha is None and eps > 0 else alpha       # radius 0 needs no step
        steps = 10 if steps is None else steps
    elif steps not in (None, 1):
        raise ValueError(f"{strategy!r} makes no multi-step attack: steps must be None or 1, got {steps!r}")
    if strategy == "fgsm" and alpha is not None:
        raise ValueError("'fgsm' takes no alpha (its step is eps); use 'fgsm_rs' or 'n_fgsm' for another step")
    return {"eps": eps, "alpha": alpha, "steps": steps, "bn_mode": bn_mode}


def _extra_attack_kwargs(strategy, attack_kwargs, x, device) -> dict:
    """``attack_kwargs`` checked, its tensors on ``device``; for ``"fgsm_pca"`` without a basis, the
    basis of the training images ``x`` (:func:`ntklab.attacks.pca_noise_basis`)."""
    from ntklab import attacks

    extra = dict(attack_kwargs or {})
    if extra and strategy in ("normal", "trades"):
        raise ValueError(f"attack_kwargs is for the attacks of the single-step strategies and 'pgd', "
                         f"not for {strategy!r}")
    taken = sorted(set(extra) & {"eps", "alpha", "steps", "bn_mode", "beta"})
    if taken:
        raise ValueError(f"attack_kwargs must not hold {taken}: they are arguments of train itself")
    if strategy == "fgsm_pca" and extra.get("basis") is None:
        extra["basis"] = attacks.pca_noise_basis(x)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}


def _describe(kwargs) -> dict:
    """A plain form of keyword arguments for checkpoint configs: a tensor as its shape and sum."""
    return {k: {"tensor_shape": list(v.shape), "tensor_sum": float(v.detach().double().sum())}
            if isinstance(v, torch.Tensor) else v for k, v in sorted((kwargs or {}).items())}


# ------------------------------------------------------------------ one epoch
def _sgd_step(model, opt, xb, yb) -> None:
    """One update on the cross-entropy of ``model`` on (xb, yb)."""
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _train_epoch(model, opt, x, y, perm, strategy, schedule, epoch, batch_size, attack_kw, beta,
                 device, clock, bar, clean_update=False, batch_end=None):
    """One pass over ``perm``; returns (mean loss, train accuracy or None). No host sync per batch.

    clean_update: before the attack, one update on the clean batch (Loo et al.'s rule).
    batch_end: ``batch_end(b, num_batches)`` after every batch's update (per-batch callbacks)."""
    from ntklab import attacks

    model.train()
    batches = perm.split(batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for b, idx in enumerate(batches):
        if schedule.per_batch:
            for group in opt.param_groups:
                group["lr"] = schedule(epoch, b, len(batches))
        xb = x[idx].to(device, non_blocking=True)
        yb = y[idx].to(device, non_blocking=True)
        if clean_update and strategy not in ("normal", "trades"):
            t_clean = clock.now()
            _sgd_step(model, opt, xb, yb)
            clock.add("update", t_clean, clock.now())
        t0 = clock.now()
        logits = None
        if strategy == "trades":  # the inner maximisation lives inside the loss: timed as attack
            loss, _ = attacks.trades_loss(model, xb, yb, beta=beta, **attack_kw)
        elif strategy != "normal":
            xb = attacks.adversarial_examples(strategy, model, xb, yb, **attack_kw)
        t1 = clock.now()
        if strategy != "normal":
            clock.add("attack", t0, t1)
        if strategy != "trades":
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.add("update", t1, clock.now())
        loss_sum += loss.detach() * len(idx)
        if logits is not None:
            correct += (logits.detach().argmax(1) == yb).sum()
        if batch_end is not None:
            batch_end(b, len(batches))
        bar.update(1)
    n = len(perm)
    return (loss_sum / n).item(), (None if strategy == "trades" else correct.item() / n)


# ------------------------------------------------------------------ the loop
def train(model: nn.Module, train_set, *, strategy: str, epochs: int,
          lr_schedule="multistep", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
          milestones: Sequence[int] = (), gamma: float = 0.1, batch_size: int = 128,
          eps: float = 0.3, alpha: float | None = None, steps: int | None = None, beta: float = 6.0,
          attack_bn_mode: str = "eval", attack_kwargs: dict | None = None,
          switch_epoch: int | str | None = None, switch_threshold: float = 0.2, switch_probe: int = 32,
          switch_cap: int | None = None, callbacks=(),
          eval_set=None, eval_every: int = 1, eval_size: int | None = 500, eval_eps: float | None = None,
          eval_alpha: float | None = None, eval_steps: int = 10, device=None, seed: int = 0,
          checkpoint_dir=None, progress: bool = True, clean_update: bool = False) -> History:
    """Train ``model`` in place with one of :data:`STRATEGIES`; return its :class:`History`.

    train_set, eval_set: ``TensorDataset`` or ``(x, y)``; x (N, C, H, W) in [0, 1], y (N,) int64.
    strategy: see the module docstring; unknown names raise ``ValueError``.
    epochs: number of passes; each reshuffles with a ``torch.Generator`` seeded from ``seed``
        (seed the model's initialisation yourself, before building it). The last batch may be smaller.
    lr_schedule: ``"multistep"`` (``lr`` times ``gamma`` at each of ``milestones``, per epoch),
        ``"cosine"`` (per batch, to 0 at the end), ``"constant"``, or an :class:`LRSchedule`.
    eps, alpha, steps, beta, attack_bn_mode: the attack's L-inf radius (pixel scale), step size
        (``None``: the attack's default; eps / 4 for PGD and TRADES), steps (``None``: 10 for PGD
        and TRADES), the TRADES weight, and the BN mode during the attack ("eval" or "train").
    attack_kwargs: further keyword arguments of the attack, passed at every batch to
        :func:`ntklab.attacks.adversarial_examples` (not for ``"normal"`` and ``"trades"``), e.g.
        ``{"low": 0.1}`` for ``"fgsm_aniso"``, ``{"noise": 0.3}`` for ``"n_fgsm"``, ``{"basis": B,
        "scale": 0.5}`` for ``"fgsm_pca"``; tensors are moved to ``device``. ``"fgsm_pca"`` without a
        ``"basis"`` uses :func:`ntklab.attacks.pca_noise_basis` of the training images, computed once
        before the first epoch (chapter 6).
    switch_epoch: train normally before this 0-based epoch and with ``strategy`` from it on;
        ``"auto"``: switch once lazy training has begun (chapter 5, :class:`ntklab.callbacks.AutoSwitch`):
        after each epoch the centred trace NTK of ``switch_probe`` class-balanced training images
        (drawn with ``seed``) is taken, and training switches after the first epoch whose kernel
        velocity per unit of learning rate is at most ``switch_threshold`` times the first epoch's,
        at the latest at epoch ``switch_cap`` (default: the first milestone of a multistep
        schedule, else ``epochs // 2``; at most ``epochs - 1``, so AT always gets an epoch). The
        measurement's time counts as training time (``History.time_switch``); the chosen epoch is
        ``History.switch_epoch``. ``switch_threshold``, ``switch_probe``, ``switch_cap`` are used
        only with ``"auto"``.
    callbacks: objects with the hooks of :class:`ntklab.callbacks.Callback`.
    eval_set, eval_every, eval_size, eval_eps, eval_alpha, eval_steps: every ``eval_every``
        epochs (and after the last), clean and PGD-``eval_steps`` accuracy (radius ``eval_eps``,
        default ``eps``) on a fixed class-balanced subset of ``eval_size`` examples of ``eval_set``.
    device: see :func:`ntklab.config.get_device`; the model and the batches are moved there.
    checkpoint_dir: after every epoch, write model, optimiser, schedule, random states, history and
        callback states atomically to ``checkpoint_dir/checkpoint.pt``; calling ``train`` again with
        the same arguments resumes there (a finished run returns at once, its weights and callback
        states loaded); different arguments raise ``ValueError``.
    progress: tqdm bars for epochs and batches.
    clean_update: in adversarial epochs, give every batch two updates: first on its clean inputs,
        then on adversarial examples crafted against the updated model (the rule of Loo et al.'s
        code, NeurIPS 2022: twice the updates of standard AT on a 50/50 clean/adversarial mix;
        chapter 8). The loss and train accuracy recorded are those of the adversarial update.
        Not with ``"trades"``, whose loss already has a clean term.

    Callbacks with an ``on_batch_end(epoch, batch, num_batches, model, history)`` method are also
    called after every batch's update (e.g. :class:`ntklab.callbacks.ParameterSnapshots`, which
    keeps the weights at fractional epochs).

    Returns the history; the model is left in eval mode. Introduced in chapter 1.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies are: {', '.join(STRATEGIES)}")
    epochs = _checks.count("epochs", epochs, minimum=0)
    batch_size = _checks.count("batch_size", batch_size)
    auto = isinstance(switch_epoch, str) and switch_epoch == "auto"
    if auto:
        if not 0 < _checks.number("switch_threshold", switch_threshold) < 1:
            raise ValueError(f"switch_threshold must be in (0, 1), got {switch_threshold!r}")
        switch_probe = _checks.count("switch_probe", switch_probe, minimum=2)
    elif isinstance(switch_epoch, (str, bool)):
        raise ValueError(f"switch_epoch must be 'auto', None or an integer in [0, epochs={epochs}], "
                         f"got {switch_epoch!r}")
    elif switch_epoch is not None and not 0 <= _checks.count("switch_epoch", switch_epoch, minimum=0) <= epochs:
        raise ValueError(f"switch_epoch must be in [0, epochs={epochs}], got {switch_epoch}")
    if clean_update not in (True, False):
        raise ValueError(f"clean_update must be True or False, got {clean_update!r}")
    if clean_update and strategy == "trades":
        raise ValueError("clean_update does not apply to 'trades' (its loss already has a clean term)")
    schedule = make_schedule(lr_schedule, lr=lr, epochs=epochs, milestones=milestones, gamma=gamma)
    if auto:
        switch_cap = _switch_cap(switch_cap, epochs, getattr(schedule, "milestones", ()))
    _checks.number("momentum", momentum)
    _checks.number("weight_decay", weight_decay)
    _checks.number("beta", beta)
    _checks.count("eval_every", eval_every, minimum=0)
    _checks.count("eval_size", eval_size, allow_none=True)
    _checks.number("eval_eps", eval_eps, allow_none=True)
    _checks.number("eval_alpha", eval_alpha, positive=True, allow_none=True)
    _checks.count("eval_steps", eval_steps)
    if not 0 <= _checks.count("seed", seed, minimum=0) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    attack_kw = _attack_kwargs(strategy, eps, alpha, steps, attack_bn_mode)
    alpha, steps = attack_kw["alpha"], attack_kw["steps"]
    ckpt = _checkpoint_file(checkpoint_dir)
    device = get_device(device)
    model.to(device)
    x, y = as_tensors(train_set, model=model)          # images in [0, 1] of the model's dtype: once, not per batch
    k = _num_outputs(model, x[:2].to(device))
    _checks.labels("the labels of train_set", y, len(y), num_classes=k)
    data_sum, label_sum = float(x.sum(dtype=torch.float64)), int(y.sum())
    if device.type == "cuda" and x.nbytes <= 2**30:  # small sets live on the GPU, big ones move per batch
        x, y = x.to(device), y.to(device)
    attack_kw.update(_extra_attack_kwargs(strategy, attack_kwargs, x, device))

    eval_xy = None
    if eval_set is not None and eval_every:
        ex, ey = as_tensors(eval_set, model=model)
        _checks.labels("the labels of eval_set", ey, len(ey), num_classes=k)
        sub = subset(TensorDataset(ex, ey), eval_size, seed=seed)
        eval_xy = (sub.tensors[0].to(device), sub.tensors[1].to(device))
    eval_eps = eps if eval_eps is None else eval_eps

    opt = torch.optim.SGD(model.parameters(), lr=schedule(0), momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    callbacks = list(callbacks)
    n_batches = math.ceil(len(y) / batch_size)
    switcher = None
    if auto:
        probe = subset(TensorDataset(x.cpu(), y.cpu()), switch_probe, seed=seed).tensors[0]
        switcher = AutoSwitch(probe, switch_cap, threshold=switch_threshold,
                              lr_of_epoch=lambda e: schedule.epoch_mean(e, n_batches))
    config = _plain({
        "strategy": strategy, "epochs": int(epochs), "schedule": schedule.describe(),
        "momentum": momentum, "weight_decay": weight_decay, "batch_size": int(batch_size),
        "eps": eps, "alpha": alpha, "steps": steps, "beta": beta, "attack_bn_mode": attack_bn_mode,
        "switch_epoch": switch_epoch, "eval_every": eval_every, "eval_size": eval_size,
        "eval_eps": eval_eps, "eval_alpha": eval_alpha, "eval_steps": eval_steps, "seed": seed,
        "n_train": len(y), "data_sum": data_sum, "label_sum": label_sum,
        "model": type(model).__name__,
        **({"switch_threshold": switch_threshold, "switch_probe": switch_probe, "switch_cap": switch_cap}
           if auto else {}),
    })
    if attack_kwargs:  # only when given, so that older checkpoints still resume
        config["attack_kwargs"] = _plain(_describe(attack_kwargs))
    if clean_update:  # only when set, so that checkpoints written before the option still resume
        config["clean_update"] = True
    history = History()
    saved = callbacks + ([switcher] if switcher is not None else [])  # states kept in checkpoints
    if ckpt is not None and ckpt.exists():
        history = _resume(ckpt, config, model, opt, gen, saved, device)
        if history.finished:
            model.eval()
            return history

    begin = time.perf_counter()
    with _measurement_rng(device, seed, -1, 0):
        for cb in callbacks:
            _call(cb, "on_train_begin", model, history)
    history.time_begin += time.perf_counter() - begin
    switch_begin = 0.0  # the kernel at initialisation, counted in the first epoch's switch time
    if switcher is not None and len(history) == 0:
        start = time.perf_counter()
        with _measurement_rng(device, seed, -1, 3):
            switcher.on_train_begin(model, history)
        switch_begin = time.perf_counter() - start
    if switch_epoch is not None and not auto:
        history.switch_epoch = int(switch_epoch)
    clock = _Clock(device)
    batch_cbs = [cb for cb in callbacks if callable(getattr(cb, "on_batch_end", None))]
    with _bar(progress, total=epochs, initial=len(history), desc=f"{strategy} epochs") as epoch_bar:
        for epoch in range(len(history), epochs):
            if switcher is not None:
                current = strategy if switcher.switch_epoch is not None and epoch >= switcher.switch_epoch \
                    else "normal"
            else:
                current = "normal" if switch_epoch is not None and epoch < switch_epoch else strategy
            for group in opt.param_groups:
                group["lr"] = schedule(epoch)
            perm = torch.randperm(len(y), generator=gen).to(x.device)
            batch_end, batch_cb_time = None, [0.0]
            if batch_cbs:
                def batch_end(b, num_batches, epoch=epoch):
                    start = time.perf_counter()
                    with _measurement_rng(device, seed, epoch, 3 + b):
                        for cb in batch_cbs:
                            cb.on_batch_end(epoch, b, num_batches, model, history)
                    batch_cb_time[0] += time.perf_counter() - start
            with _bar(progress, total=n_batches, leave=False, desc=f"epoch {epoch}") as batch_bar:
                loss, acc = _train_epoch(model, opt, x, y, perm, current, schedule, epoch, batch_size,
                                         attack_kw, beta, device, clock, batch_bar, clean_update, batch_end)
            times = clock.collect()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch}: the mean {current} training loss is {loss} (lr "
                    f"{schedule(epoch):g}). Nothing of this epoch was kept"
                    + (f"; the checkpoint in {ckpt.parent} holds the last finite epoch" if ckpt else "")
                    + ". Try a smaller learning rate.")
            row = dict(epoch=epoch, strategy=current, lr=schedule(epoch), loss=loss, train_acc=acc,
                       time_attack=times.get("attack", 0.0), time_update=times.get("update", 0.0))
            if eval_xy is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
                row.update(_evaluate(model, eval_xy, eval_eps, eval_alpha, eval_steps, device, seed, epoch))
            history.append(**row)
            if switcher is not None and switcher.switch_epoch is None:
                start = time.perf_counter()
                with _measurement_rng(device, seed, epoch, 3):
                    switcher.on_epoch_end(epoch, model, history)
                history.time_switch[-1] = time.perf_counter() - start + (switch_begin if epoch == 0 else 0.0)
                history.switch_epoch = switcher.switch_epoch
            start = time.perf_counter()
            with _measurement_rng(device, seed, epoch, 1):
                for cb in callbacks:
                    _call(cb, "on_epoch_end", epoch, model, history)
            history.time_callbacks[-1] = time.perf_counter() - start + batch_cb_time[0]
            history.finished = bool(history.stop_reason) or epoch + 1 == epochs
            if ckpt is not None:
                _save(ckpt, config, model, opt, gen, saved, history)
            epoch_bar.update(1)
            epoch_bar.set_postfix(_postfix(history))
            if history.finished:
                break
    history.finished = True
    for cb in callbacks:
        _call(cb, "on_train_end", model, history)
    model.eval()
    return history


def _switch_cap(cap, epochs: int, milestones) -> int:
    """The latest switch epoch of ``switch_epoch="auto"``: ``cap``, else the first milestone, else
    half the epochs; checked to lie in [1, epochs - 1]."""
    if cap is None:
        cap = min(int(m) for m in milestones) if milestones else int(epochs) // 2
        cap = min(max(cap, 1), int(epochs) - 1)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= int(epochs) - 1:
        raise ValueError(f"switch_cap must be an integer in [1, epochs - 1 = {int(epochs) - 1}] "
                         f"(switch_epoch='auto' needs epochs >= 2), got {cap!r}")
    return cap


def _checkpoint_file(checkpoint_dir) -> Path | None:
    """``checkpoint_dir/checkpoint.pt``, the folder created now: a folder that is a file or cannot be
    created is refused before any epoch is trained, not after the first."""
    if checkpoint_dir is None:
        return None
    folder = Path(checkpoint_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"checkpoint_dir {folder} cannot be created ({err.strerror or err})") from err
    return folder / CHECKPOINT_NAME


def _num_outputs(model: nn.Module, xb: torch.Tensor) -> int:
    """The number of outputs k of ``model`` (one forward pass in eval mode, without gradients, which
    changes no state and draws no random numbers); its logits must be (n, k) and finite."""
    with evaluating(model), torch.no_grad():
        return _checks.logits(model(xb), where="the model")


def _call(cb, hook, *args):
    fn = getattr(cb, hook, None)
    if fn is not None:
        fn(*args)


def _bar(progress: bool, **kw):
    """A tqdm.auto bar (a context manager), silent when ``progress`` is off (:mod:`ntklab._progress`)."""
    return _progress.bar(progress, **kw)


def _postfix(history: History) -> dict:
    out = {"loss": f"{history.loss[-1]:.3f}"}
    for key in ("train_acc", "clean_acc", "pgd_acc"):
        value = getattr(history, key)[-1]
        if value is not None:
            out[key] = f"{value:.3f}"
    return out


def _evaluate(model, eval_xy, eps, alpha, steps, device, seed, epoch) -> dict:
    from ntklab import evaluate

    start = time.perf_counter()
    with _measurement_rng(device, seed, epoch, 2), evaluating(model):
        clean = evaluate.clean_accuracy(model, eval_xy, device=device)
        robust = evaluate.pgd_accuracy(model, eval_xy, eps=eps, alpha=alpha, steps=steps)
    return {"clean_acc": float(clean), "pgd_acc": float(robust), "time_eval": time.perf_counter() - start}


# ------------------------------------------------------------------ checkpoints
def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _callback_states(callbacks) -> list:
    states = []
    for cb in callbacks:
        fn = getattr(cb, "state_dict", None)
        state = fn() if fn is not None else None
        if state is not None:
            states.append({"name": type(cb).__name__, "state": state})
    return states


def _save(path: Path, config, model, opt, gen, callbacks, history) -> None:
    from ntklab.data import atomic_save

    atomic_save({"format": _FORMAT, "config": config, "model": model.state_dict(),
                  "optimizer": opt.state_dict(), "schedule": config["schedule"], "rng": _rng_state(gen),
                  "history": history.to_dict(), "callbacks": _callback_states(callbacks)}, path)


def _resume(path: Path, config, model, opt, gen, callbacks, device) -> History:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the checkpoint {path} ({describe_load_error(err)}); "
                         f"delete it to start over") from err
    if state.get("format") != _FORMAT:
        raise ValueError(f"the checkpoint {path} has format {state.get('format')}, expected {_FORMAT}")
    _check_config(state["config"], config, path.parent)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint in {path.parent} holds another model's weights: {err}") from err
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    gen.set_state(rng["generator"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    stateful = [cb for cb in callbacks if getattr(cb, "state_dict", None) and cb.state_dict() is not None]
    saved = state["callbacks"]
    if [type(cb).__name__ for cb in stateful] != [s["name"] for s in saved]:
        raise ValueError(f"the checkpoint in {path.parent} has states of callbacks "
                         f"{[s['name'] for s in saved]}, this call passes {[type(cb).__name__ for cb in stateful]}")
    for cb, s in zip(stateful, saved):
        cb.load_state_dict(s["state"])
    return History.from_dict(state["history"])
