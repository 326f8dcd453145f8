"""One training loop for every strategy of the book, with schedules, callbacks, timing and resume.

Strategies (``TrainConfig.strategy``), each a minimisation of the cross-entropy on the inputs named:

* ``"normal"``: clean inputs;
* ``"fgsm"``: FGSM examples from the clean point, step eps (Goodfellow et al. 2015);
* ``"fgsm_rs"``: FGSM after a uniform random start (Wong et al. 2020, "Fast is better than free");
* ``"n_fgsm"``: noise plus FGSM without projection (de Jorge et al. 2022);
* ``"fgsm_logscale"``: FGSM after Gaussian noise with log-uniform per-pixel scales (the book's
  construction, isotropic in covariance, :func:`ntklab.attacks.fgsm_logscale`; chapter 6);
  ``"fgsm_aniso"`` is its deprecated name (accepted, with a ``DeprecationWarning``);
* ``"fgsm_pca"``: FGSM after Gaussian noise with the training images' covariance, optionally plus an
  isotropic floor (the book's data-derived anisotropic noise, :func:`ntklab.attacks.fgsm_pca`; chapter 6);
* ``"pgd"``: PGD-k examples (Madry et al. 2018);
* ``"trades"``: the TRADES loss, clean cross-entropy plus beta times the KL term (Zhang et al. 2019);
* ``"gradalign"``: FGSM-AT's loss plus ``gradalign_lambda`` times GradAlign's gradient-alignment
  regulariser (Andriushchenko & Flammarion 2020, :func:`ntklab.attacks.gradalign_loss`; chapter 6).

``switch_epoch=s`` trains normally for epochs 0..s-1 and with ``strategy`` from epoch s on: the
cost-saving schedule that Li et al. derive from the "kernel learning, lazy training, kernel learning"
evolution of the NTK (chapter 5). ``switch_epoch="auto"`` picks s during the run from the kernel
velocity on a small probe set (:class:`ntklab.callbacks.AutoSwitch`, an ordinary callback that the
loop adds), at the latest at a cap. ``clean_update=True`` gives every adversarial batch an update on
its clean inputs before the adversarial one, the rule of Loo et al.'s code (chapter 8). The
optimiser is SGD with momentum and weight decay; the learning rate follows a :class:`LRSchedule`.
Inputs are images in [0, 1]; the attacks come from :mod:`ntklab.attacks` and never touch parameter
gradients.

Every option of a run is a field of the frozen :class:`TrainConfig`; :func:`train` takes one (or its
fields as keywords) and returns a :class:`History`. Random numbers come from named streams
(:func:`stream_seed`): the order of the batches, the attack's random start of each batch, the
evaluation of each epoch and each callback draw from their own seeds, so no consumer shares
another's numbers and measuring never changes the trajectory. With ``checkpoint_dir`` a run survives
interruption and resumes bit for bit (on the CPU). Callbacks live in :mod:`ntklab.callbacks`; time is kept by
:class:`ntklab.clock.Clock`. Introduced in chapter 1; the strategies are compared in chapter 4.

For runs at paper scale (chapter 9), all off by default: ``augment="crop_flip"`` (random crop and
flip of every clean batch before the attack, :mod:`ntklab.augment`), ``keep_best`` (the weights of
the epoch with the best held-out PGD accuracy, :class:`ntklab.callbacks.BestCheckpoint`, Rice et al.
2020), and two speed options for GPUs, ``amp="bf16"`` (bfloat16 autocast of the update only) and
``channels_last``.

Several processes (``torchrun --nproc_per_node=N``, :mod:`ntklab.distributed`, chapter 9): the same
:func:`train`, which keeps the GLOBAL batch: every rank draws the same permutation per epoch and takes
positions ``rank::N`` of each batch of ``batch_size`` (which N must divide; an uneven last batch is
weighted), so the N processes see exactly the examples one process sees. The update goes through
``DistributedDataParallel``; each rank crafts its attacks on its share against the model itself
(float32, eval-mode BN by default), with random starts from its own stream (``"attack"`` with
``index=rank``: rank 0's are one process's), so a run with random attacks is an equally likely, not
the same, trajectory; with deterministic attacks (``"normal"``, ``"fgsm"``) and ``sync_bn`` it is
one process's update up to the order of float sums. Evaluation, callbacks and checkpoints run on
rank 0; their outcome (the history: ``request_stop``, the automatic switch epoch, the evaluation)
is broadcast after each epoch, rank 0's buffers (BN running statistics) after each epoch too, and
the callbacks' states after training, so every rank returns the same history and can read the
same callbacks. A resumed run loads on every rank the checkpoint rank 0 wrote.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ntklab import _checks, _progress, attacks, bn, distributed, evaluate
from ntklab.augment import AUGMENTATIONS, augment as apply_augment
from ntklab.bn import eval_mode
from ntklab.callbacks import AutoSwitch, BestCheckpoint, CatastrophicOverfittingDetector, Callback, KernelSnapshots
from ntklab.clock import Clock, step_cost
from ntklab.config import get_device
from ntklab.data import as_tensors, atomic_save, describe_load_error, subset

__all__ = ["train", "training_step_costs", "loss_step", "TrainConfig", "History", "STRATEGIES", "SCHEDULES", "STREAMS", "LRSchedule", "MultiStepLR",
           "CosineLR", "ConstantLR", "make_schedule", "stream_seed", "attack_arguments", "extra_attack_arguments",
           "sgd_step", "Callback", "KernelSnapshots", "CatastrophicOverfittingDetector", "CHECKPOINT_NAME",
           "CHECKPOINT_FORMAT", "BestCheckpoint", "AMP_MODES"]

STRATEGIES = ("normal", "fgsm", "fgsm_rs", "n_fgsm", "fgsm_logscale", "fgsm_pca", "pgd", "trades",
              "fgsm_aniso", "gradalign")   # the last: the deprecated name of "fgsm_logscale"
SCHEDULES = ("multistep", "cosine", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
#: The layout of ``checkpoint.pt``. A checkpoint of another format is refused (``ValueError`` saying
#: to delete the folder) rather than read through compatibility branches: checkpoint folders are
#: keyed by the code that wrote them, so one of another format is a leftover, never a run to resume.
CHECKPOINT_FORMAT = 2
#: The named random streams (see :func:`stream_seed`).
STREAMS = ("attack", "eval", "callback", "augment")  # append only: a stream's seed depends on its place
#: The values of ``TrainConfig.amp``.
AMP_MODES = (None, "bf16")
_CLOCKS = ("attack", "update", "eval", "callbacks", "switch")
_TIME_KEYS = tuple(f"time_{name}" for name in _CLOCKS) + tuple(f"time_{name}_cpu" for name in _CLOCKS)


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


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, checked when the config is made (``ValueError`` naming the
    field). Change fields with :meth:`replace` (``dataclasses.replace`` with a ``ValueError`` for an
    unknown name); :meth:`to_dict` is the plain form written into checkpoints and cache keys.

    strategy: one of :data:`STRATEGIES` (see the module docstring).
    epochs: number of passes; each reshuffles with its own stream (:func:`stream_seed`). The last
        batch may be smaller. Seed the model's initialisation yourself, before building it.
    lr_schedule, lr, milestones, gamma: ``"multistep"`` (``lr`` times ``gamma`` at each of
        ``milestones``, per epoch), ``"cosine"`` (per batch, to 0 at the end), ``"constant"``, or
        an :class:`LRSchedule` (then ``lr``, ``milestones`` and ``gamma`` are not used).
    momentum, weight_decay, batch_size: of the SGD optimiser.
    eps, alpha, steps, beta, attack_bn_mode: the attack's L-inf radius (pixel scale), step size
        (``None``: the attack's default; eps / 4 for PGD and TRADES), steps (``None``: 10 for PGD
        and TRADES), the TRADES weight, and the BN mode during the attack ("eval" or "train").
    gradalign_lambda: the weight of GradAlign's regulariser (``"gradalign"`` only; its FGSM step is
        eps, so ``alpha`` must be ``None``, and it takes no ``attack_kwargs`` and no ``amp``).
    attack_kwargs: further keyword arguments of the attack, passed at every batch to
        :func:`ntklab.attacks.adversarial_examples` (not for ``"normal"`` and ``"trades"``), e.g.
        ``{"low": 0.1}`` for ``"fgsm_logscale"``, ``{"noise": 0.3}`` for ``"n_fgsm"``, ``{"basis": B,
        "scale": 0.5, "floor": 0.3}`` for ``"fgsm_pca"``; tensors are moved to the device. ``"fgsm_pca"`` without
        a ``"basis"`` uses :func:`ntklab.attacks.pca_noise_basis` of the training images, computed
        once before the first epoch (chapter 6).
    clean_update: in adversarial epochs, give every batch two updates: first on its clean inputs,
        then on adversarial examples crafted against the updated model (the rule of Loo et al.'s
        code, NeurIPS 2022: twice the updates of standard AT on a 50/50 clean/adversarial mix;
        chapter 8). The loss and train accuracy recorded are those of the adversarial update.
        Not with ``"trades"``, whose loss already has a clean term.
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
    eval_every, eval_size, eval_eps, eval_alpha, eval_steps: with an ``eval_set``, every
        ``eval_every`` epochs (and after the last) clean and PGD-``eval_steps`` accuracy (radius
        ``eval_eps``, default ``eps``) on a fixed class-balanced subset of ``eval_size`` examples.
    seed: of every random stream of the run (the shuffles, the attacks' random starts, the
        evaluation, the callbacks, the augmentation) and of the probe and evaluation subsets; in [0, 2**63).
    augment: ``None`` or ``"crop_flip"``: every clean training batch, before the attack, gets a
        random crop with zero padding 4 and a random horizontal flip per image
        (:func:`ntklab.augment.augment_crop_flip`; torchvision's ``RandomCrop(32, padding=4)`` and
        ``RandomHorizontalFlip()`` in the code of Rice et al. 2020 and Wong et al. 2020 on CIFAR-10;
        the padding stays 4 for other image sizes, the book's choice), drawn from the batch's own
        ``"augment"`` stream (:func:`stream_seed`), so resuming stays exact and a run without it is
        unchanged.
    amp: ``None`` (float32 throughout) or ``"bf16"``: the forward pass and loss of every update run
        under ``torch.autocast`` with bfloat16 (mixed precision; the backward pass and the weights
        stay float32). Attacks, evaluation, callbacks and kernels stay float32. Not with
        ``"trades"``, whose loss runs its attack inside.
    channels_last: the model and the training batches in ``torch.channels_last`` memory format
        (faster convolutions on GPUs with tensor cores; the same numbers up to float rounding).
        The inputs of :func:`train` are always 4-D (N, C, H, W); the model stays channels_last
        after training (its 4-D weights: convolutions).
    keep_best: track the epoch with the best held-out PGD accuracy (early stopping on robust
        accuracy, Rice et al. 2020, "Overfitting in adversarially robust deep learning"): needs an
        ``eval_set`` and ``eval_every=1`` (a ``ValueError`` otherwise, rather than a silent change of
        the evaluation's cost). The loop adds a :class:`ntklab.callbacks.BestCheckpoint` after the
        other callbacks unless one is passed (pass your own to keep the best weights at hand: its
        ``best_state``); its state (the best weights) is in the checkpoint, so a resumed run keeps
        it; ``History.best_epoch``, ``best_pgd_acc`` and ``best_clean_acc`` say which epoch won.
        The model is left with the LAST epoch's weights.
    sync_bn: under ``torchrun`` with several processes (:mod:`ntklab.distributed`), BN layers
        normalise the training step's forward passes with the statistics of the whole global batch
        (all ranks' shares; :func:`ntklab.distributed.global_batch_norm`), and their running
        statistics are the global batch's, as in one process. Needed where a chapter's subject is
        the batch statistics (chapter 3, batch normalisation) and wherever kernels are taken in eval
        mode with running statistics (chapters 4-5 and 8: with ``sync_bn`` those are the global
        batch's); without it each rank normalises with its own share (``batch_size / world``
        examples) and the running statistics are rank 0's. No effect in one process.
    """

    strategy: str
    epochs: int
    lr_schedule: str | LRSchedule = "multistep"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    batch_size: int = 128
    eps: float = 0.3
    alpha: float | None = None
    steps: int | None = None
    beta: float = 6.0
    gradalign_lambda: float = 0.2
    attack_bn_mode: str = "eval"
    attack_kwargs: dict | None = None
    clean_update: bool = False
    switch_epoch: int | str | None = None
    switch_threshold: float = 0.2
    switch_probe: int = 32
    switch_cap: int | None = None
    eval_every: int = 1
    eval_size: int | None = 500
    eval_eps: float | None = None
    eval_alpha: float | None = None
    eval_steps: int = 10
    seed: int = 0
    augment: str | None = None
    amp: str | None = None
    channels_last: bool = False
    keep_best: bool = False
    sync_bn: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid strategies are: {', '.join(STRATEGIES)}")
        _checks.count("epochs", self.epochs, minimum=0)
        _checks.count("batch_size", self.batch_size)
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ValueError(f"milestones must be a sequence of epochs, got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        schedule = self.schedule()                                 # checks lr, gamma, milestones
        for name in ("momentum", "weight_decay", "beta", "gradalign_lambda"):
            _checks.number(name, getattr(self, name))
        _checks.count("eval_every", self.eval_every, minimum=0)
        _checks.count("eval_size", self.eval_size, allow_none=True)
        _checks.radius("eval_eps", self.eval_eps, allow_none=True)
        _checks.radius("eval_alpha", self.eval_alpha, positive=True, allow_none=True)
        _checks.count("eval_steps", self.eval_steps)
        if not 0 <= _checks.count("seed", self.seed, minimum=0) < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.clean_update not in (True, False):
            raise ValueError(f"clean_update must be True or False, got {self.clean_update!r}")
        if self.sync_bn not in (True, False):
            raise ValueError(f"sync_bn must be True or False, got {self.sync_bn!r}")
        if self.clean_update and self.strategy == "trades":
            raise ValueError("clean_update does not apply to 'trades' (its loss already has a clean term)")
        self._check_switch(schedule)
        attack_arguments(self.strategy, self.eps, self.alpha, self.steps, self.attack_bn_mode)
        _check_extra(self.strategy, self.attack_kwargs)
        self._check_speed_and_selection()

    def _check_speed_and_selection(self) -> None:
        """augment, amp, channels_last, keep_best."""
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be None or one of {', '.join(map(repr, AUGMENTATIONS))}, got {self.augment!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.amp is not None and self.strategy in ("trades", "gradalign"):
            raise ValueError(f"amp does not apply to {self.strategy!r} (its loss runs the attack inside; attacks "
                             "stay float32)")
        for name in ("channels_last", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.keep_best and self.eval_every != 1:
            raise ValueError(f"keep_best needs the held-out evaluation after every epoch (eval_every=1), got "
                             f"eval_every={self.eval_every}")

    def _check_switch(self, schedule) -> None:
        if self.auto_switch:
            if not 0 < _checks.number("switch_threshold", self.switch_threshold) < 1:
                raise ValueError(f"switch_threshold must be in (0, 1), got {self.switch_threshold!r}")
            _checks.count("switch_probe", self.switch_probe, minimum=2)
            _switch_cap(self.switch_cap, self.epochs, getattr(schedule, "milestones", ()))
        elif isinstance(self.switch_epoch, (str, bool)):
            raise ValueError(f"switch_epoch must be 'auto', None or an integer in [0, epochs={self.epochs}], "
                             f"got {self.switch_epoch!r}")
        elif self.switch_epoch is not None and not 0 <= _checks.count(
                "switch_epoch", self.switch_epoch, minimum=0) <= self.epochs:
            raise ValueError(f"switch_epoch must be in [0, epochs={self.epochs}], got {self.switch_epoch}")

    @classmethod
    def from_profile(cls, profile, strategy: str, **overrides) -> "TrainConfig":
        """The config of ``strategy`` under a :class:`ntklab.config.Profile`: optimisation, schedule
        (multistep at ``lr_milestones``), eps, the evaluation PGD and, for PGD and TRADES, the
        profile's step size and steps (FGSM variants keep their own default step); the profile's
        ``augment`` and ``select_best`` (as ``keep_best``, unless ``overrides`` turn the per-epoch
        evaluation off with an ``eval_every`` other than 1: a run not evaluated every epoch cannot
        pick its best one); ``sync_bn=True``, so that under several processes every experiment of
        the book normalises with the global batch's statistics as one process does (no effect in one
        process); then ``overrides`` (fields of this class)."""
        select = bool(getattr(profile, "select_best", False)) and overrides.get("eval_every", 1) == 1
        config = cls(strategy=strategy, epochs=profile.epochs, lr_schedule="multistep", lr=profile.lr,
                     momentum=profile.momentum, weight_decay=profile.weight_decay,
                     milestones=tuple(profile.lr_milestones), gamma=profile.lr_gamma,
                     batch_size=profile.batch_size, eps=profile.eps, eval_size=profile.n_eval,
                     eval_steps=profile.eval_pgd_steps, eval_alpha=profile.pgd_alpha, seed=profile.seed,
                     augment=getattr(profile, "augment", None), keep_best=select, sync_bn=True,
                     **({"alpha": profile.pgd_alpha, "steps": profile.pgd_steps}
                        if strategy in ("pgd", "trades") else {}))
        return config.replace(**overrides)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (checked again); an unknown field raises ``ValueError``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(map(repr, unknown))}; "
                             f"the options are the fields of ntklab.train.TrainConfig")
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        """``dataclasses.asdict`` in plain form: tuples as lists, an :class:`LRSchedule` as its
        ``describe()``, a tensor in ``attack_kwargs`` as its shape and sum (checkpoints, cache keys)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.lr_schedule, LRSchedule):
            d["lr_schedule"] = self.lr_schedule.describe()
        if self.attack_kwargs is not None:
            d["attack_kwargs"] = {k: {"tensor_shape": list(v.shape), "tensor_sum": float(v.detach().double().sum())}
                                  if isinstance(v, torch.Tensor) else v for k, v in sorted(self.attack_kwargs.items())}
        return _plain(d)

    @property
    def auto_switch(self) -> bool:
        return isinstance(self.switch_epoch, str) and self.switch_epoch == "auto"

    def schedule(self) -> LRSchedule:
        """The learning rate of every epoch and batch (:func:`make_schedule`)."""
        return make_schedule(self.lr_schedule, lr=self.lr, epochs=self.epochs, milestones=self.milestones,
                             gamma=self.gamma)

    def strategy_of(self, epoch: int, switch_epoch: int | None) -> str:
        """The strategy of a 0-based epoch: ``"normal"`` before the switch (while undecided under
        ``"auto"``, ``switch_epoch`` is ``None``), ``strategy`` otherwise."""
        if self.switch_epoch is None or (switch_epoch is not None and epoch >= switch_epoch):
            return self.strategy
        return "normal"


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


def _plain(obj):
    """Tuples to lists, recursively (configs compare the same before and after a checkpoint)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ random streams
def stream_seed(seed: int, stream: str, *, index: int = 0, epoch: int = 0, batch: int = 0) -> int:
    """The seed of one named random stream of a run: a 64-bit hash (BLAKE2b) of the fixed-length key
    ``(seed, stream, index, epoch, batch)``, so that the streams of different consumers, epochs or
    batches cannot collide (unlike seeds made by adding offsets, which did).

    stream: one of :data:`STREAMS`: ``"attack"`` (everything random in a batch's training step:
    the attacks' random starts, dropout; ``index`` is the process's rank under torchrun, 0 in one
    process), ``"eval"`` (the evaluation after an epoch), ``"callback"`` (callback number ``index`` in the
    list the loop runs; its ``on_batch_end`` after batch b uses ``batch=b + 1``, its other hooks
    ``batch=0``), ``"augment"`` (the random crops and flips of a batch, ``TrainConfig.augment``;
    appended last, so that the other streams kept their seeds). epoch: 0-based; -1 before the first
    epoch (``on_train_begin``) and ``epochs`` after the last (``on_train_end``). batch: >= 0.

    The order of the batches has a stream of its own: a ``torch.Generator`` seeded with ``seed``
    itself (not a hash, which no other stream's seed equals but with chance 2**-64), one permutation
    per epoch, as before the streams were named, so that a run without random attacks (``"normal"``,
    ``"fgsm"``) trains exactly as it did.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; the streams are {', '.join(STREAMS)}")
    if min(index, epoch + 1, batch) < 0:
        raise ValueError(f"index, epoch + 1 and batch must be >= 0, got {index}, {epoch + 1}, {batch}")
    key = struct.pack("<Q4q", int(seed), STREAMS.index(stream), int(index), int(epoch) + 1, int(batch))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"ntklab.stream").digest(), "little")


def _seed(run: "_Run", stream: str, **key) -> None:
    """Seed torch's random state on the CPU and on the run's GPU with one stream (the generators of
    the device only: ``torch.manual_seed`` would visit every backend, about 1 ms a call)."""
    seed = stream_seed(run.config.seed, stream, **key)
    torch.default_generator.manual_seed(seed)
    if run.device.type == "cuda":
        index = run.device.index if run.device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


# ------------------------------------------------------------------ attacks and steps
def attack_arguments(strategy: str, eps, alpha=None, steps=None, bn_mode: str = "eval") -> dict:
    """The keyword arguments of the attack of ``strategy`` (checked; PGD and TRADES: step
    ``eps / 4`` and 10 steps by default): ``{"eps", "alpha", "steps", "bn_mode"}``, for
    :func:`ntklab.attacks.adversarial_examples` and :func:`ntklab.attacks.trades_loss`."""
    bn.check_bn_mode(bn_mode, name="attack_bn_mode", allowed=("eval", "train"))
    eps = _checks.radius("eps", eps)
    _checks.radius("alpha", alpha, positive=True, allow_none=True)
    _checks.count("steps", steps, allow_none=True)
    if strategy in ("pgd", "trades"):
        alpha = attacks.pgd_alpha(eps, alpha)                         # eps / 4 by default
        steps = 10 if steps is None else steps
    elif steps not in (None, 1):
        raise ValueError(f"{strategy!r} makes no multi-step attack: steps must be None or 1, got {steps!r}")
    if strategy in ("fgsm", "gradalign") and alpha is not None:
        raise ValueError(f"{strategy!r} takes no alpha (its step is eps); use 'fgsm_rs' or 'n_fgsm' for another step")
    return {"eps": eps, "alpha": alpha, "steps": steps, "bn_mode": bn_mode}


def _check_extra(strategy: str, attack_kwargs) -> None:
    if attack_kwargs is not None and not isinstance(attack_kwargs, dict):
        raise ValueError(f"attack_kwargs must be a dict or None, got {attack_kwargs!r}")
    if attack_kwargs and strategy in ("normal", "trades", "gradalign"):
        raise ValueError(f"attack_kwargs is for the attacks of the single-step strategies and 'pgd', "
                         f"not for {strategy!r}")
    taken = sorted(set(attack_kwargs or {}) & {"eps", "alpha", "steps", "bn_mode", "beta"})
    if taken:
        raise ValueError(f"attack_kwargs must not hold {taken}: they are arguments of train itself")


def extra_attack_arguments(strategy: str, attack_kwargs, x: torch.Tensor, device) -> dict:
    """``attack_kwargs`` checked, its tensors on ``device``; for ``"fgsm_pca"`` without a basis, the
    basis of the training images ``x`` (:func:`ntklab.attacks.pca_noise_basis`)."""
    _check_extra(strategy, attack_kwargs)
    extra = dict(attack_kwargs or {})
    if strategy == "fgsm_pca" and extra.get("basis") is None:
        extra["basis"] = attacks.pca_noise_basis(x)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, *,
             amp: str | None = None):
    """One update on the cross-entropy of ``model`` on (xb, yb); returns (loss, logits), detached.
    amp: ``"bf16"`` runs the forward pass and the loss under ``torch.autocast`` (bfloat16, on
    ``xb``'s device type; the backward pass and the step outside it), ``None`` in float32."""
    with _autocast(amp, xb.device):
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
    loss_step(opt, loss)
    return loss.detach(), logits.detach()


def loss_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on a scalar ``loss`` attached to the parameters (gradients zeroed, the loss
    backpropagated, ``opt.step()``): the update of :func:`sgd_step` and of the strategies whose loss
    is not a plain cross-entropy (TRADES, GradAlign)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _autocast(amp: str | None, device: torch.device):
    """The context of :attr:`TrainConfig.amp`: ``torch.autocast`` with bfloat16, or nothing."""
    import contextlib

    if amp is None:
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------ history
@dataclass
class History:
    """Per-epoch record of a run (lists of equal length, one entry per epoch trained).

    epoch: 0-based index; strategy: the one used that epoch ("normal" before ``switch_epoch``);
    lr: the learning rate at the epoch's first batch; loss: mean training loss; train_acc: accuracy
    on the inputs the update saw (the adversarial examples under AT; ``None`` for TRADES, whose
    loss hides its logits); clean_acc, pgd_acc: on the fixed evaluation subset (``None`` when not
    evaluated that epoch).
    time_attack, time_update, time_eval, time_callbacks: wall seconds (for TRADES the loss's own
    forward passes fall in time_attack, inside ``trades_loss``); time_switch: seconds of the
    callbacks that are part of training (``part_of_training``: the kernel measurements of
    ``switch_epoch="auto"``, which the schedule cannot do without; 0 otherwise). Each has a
    ``_cpu`` twin in process-CPU seconds (:class:`ntklab.clock.Clock`), e.g. ``time_attack_cpu``.
    extra: per-epoch values logged by callbacks (``log``), padded with ``None``.
    switch_epoch: the 0-based epoch from which ``strategy`` was used when a switch was asked for
    (the one chosen, under ``"auto"``; ``None`` while undecided or without a switch).
    best_epoch, best_pgd_acc, best_clean_acc: with ``keep_best`` (or a
    :class:`ntklab.callbacks.BestCheckpoint`), the 0-based epoch of the best held-out PGD accuracy
    so far (the earliest of ties), that accuracy and the clean accuracy of the same epoch (Rice et
    al. 2020); ``None`` otherwise.
    ``training_time`` = attack + update (+ switch) time, excluding measurement (``training_time_cpu``
    in CPU seconds). JSON-ready via ``to_dict``.
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
    time_attack_cpu: list = field(default_factory=list)
    time_update_cpu: list = field(default_factory=list)
    time_eval_cpu: list = field(default_factory=list)
    time_callbacks_cpu: list = field(default_factory=list)
    time_switch_cpu: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    time_begin: float = 0.0  # callbacks' on_train_begin (e.g. the kernel at initialisation)
    time_begin_cpu: float = 0.0
    stop_reason: str | None = None
    finished: bool = False
    switch_epoch: int | None = None
    best_epoch: int | None = None
    best_pgd_acc: float | None = None
    best_clean_acc: float | None = None

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

    def epoch_training_times(self, cpu: bool = False) -> list[float]:
        """Training seconds of every epoch: attack + update + switch (wall, or CPU with ``cpu``)."""
        suffix = "_cpu" if cpu else ""
        parts = [getattr(self, f"time_{name}{suffix}") for name in ("attack", "update", "switch")]
        return [float(sum(values)) for values in zip(*parts)]

    @property
    def training_time(self) -> float:
        """Wall seconds spent crafting attacks, updating weights and, under ``switch_epoch="auto"``,
        measuring the kernel velocity that decides the switch (evaluation and callbacks excluded)."""
        return float(sum(self.epoch_training_times()))

    @property
    def training_time_cpu(self) -> float:
        """:attr:`training_time` in process-CPU seconds."""
        return float(sum(self.epoch_training_times(cpu=True)))

    @property
    def measurement_time(self) -> float:
        """Wall seconds spent in evaluation and callbacks."""
        return float(sum(self.time_eval) + sum(self.time_callbacks) + self.time_begin)

    @property
    def measurement_time_cpu(self) -> float:
        """:attr:`measurement_time` in process-CPU seconds."""
        return float(sum(self.time_eval_cpu) + sum(self.time_callbacks_cpu) + self.time_begin_cpu)

    def to_dict(self) -> dict:
        """Plain dict of lists and numbers (JSON-serialisable; also safe for ``weights_only``)."""
        d = dataclasses.asdict(self)
        d["extra"] = {k: list(v) for k, v in self.extra.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """The history of a :meth:`to_dict` of this version of the class (unknown keys raise
        ``ValueError``: a dict of another layout belongs to results computed by other code)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"not a History dict of this version of ntklab: unknown keys {unknown}")
        return cls(**{k: (dict(v) if k == "extra" else list(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in d.items()})


# ------------------------------------------------------------------ the loop
def train(model: nn.Module, train_set, config: TrainConfig | None = None, *, eval_set=None, callbacks=(),
          device=None, checkpoint_dir=None, progress: bool = True, **overrides) -> History:
    """Train ``model`` in place as ``config`` says (a :class:`TrainConfig`); return its :class:`History`.

    config: the run's options; ``overrides`` are fields of :class:`TrainConfig` that replace its
        values (``train(model, data, strategy="pgd", epochs=3)`` needs no config at all). An
        unknown keyword raises ``ValueError`` naming it; every option is checked before any work.
    train_set, eval_set: ``TensorDataset`` or ``(x, y)``; x (N, C, H, W) in [0, 1], y (N,) int64.
        The evaluation (``eval_every``, ``eval_size``, ...) needs an ``eval_set``, and so does
        ``keep_best`` (``ValueError`` without one).
    callbacks: objects with the hooks of :class:`ntklab.callbacks.Callback` (``on_train_begin``,
        ``on_epoch_end``, ``on_batch_end``, ``on_train_end``, ``state_dict``); under
        ``switch_epoch="auto"`` the loop puts an :class:`ntklab.callbacks.AutoSwitch` first. Each
        callback draws random numbers from its own stream (:func:`stream_seed`); the time of those
        with ``part_of_training = True`` counts as training (``History.time_switch``), the others'
        as measurement.
    device: see :func:`ntklab.config.get_device`; the model and the batches are moved there.
    checkpoint_dir: after every epoch, write the config, model, optimiser, history and callback
        states atomically to ``checkpoint_dir/checkpoint.pt`` (format :data:`CHECKPOINT_FORMAT`);
        calling ``train`` again with the same config resumes there (a finished run returns at once,
        its weights and callback states loaded); another config raises ``ValueError``.
    progress: tqdm bars for epochs and batches.

    Returns the history; the model is left in eval mode. Introduced in chapter 1.
    """
    config = _config(config, overrides)
    checkpoint = distributed.main_only(_checkpoint_file, checkpoint_dir)
    device = get_device(device)
    model.to(device)
    run = _setup(model, train_set, eval_set, config, _check_callbacks(callbacks), device)
    history = History(switch_epoch=None if config.auto_switch else config.switch_epoch)
    if checkpoint is not None and distributed.main_only(checkpoint.exists):  # every rank loads rank 0's
        history = _resume(checkpoint, run)
        if history.finished:
            model.eval()
            return history
    _train_begin(run, history)
    with _bar(progress, total=config.epochs, initial=len(history), desc=f"{config.strategy} epochs") as epoch_bar:
        for epoch in range(len(history), config.epochs):
            strategy = config.strategy_of(epoch, history.switch_epoch)
            with _bar(progress, total=run.n_batches, leave=False, desc=f"epoch {epoch}") as batch_bar:
                loss, acc = _train_epoch(run, strategy, epoch, history, batch_bar)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch}: the mean {strategy} training loss is {loss} (lr "
                    f"{run.schedule(epoch):g}). Nothing of this epoch was kept"
                    + (f"; the checkpoint in {checkpoint.parent} holds the last finite epoch" if checkpoint else "")
                    + ". Try a smaller learning rate.")
            row = dict(epoch=epoch, strategy=strategy, lr=run.schedule(epoch), loss=loss, train_acc=acc)
            if run.eval_xy is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
                row.update(_evaluate(run, epoch))
            history.append(**row, **_times(run.clock.collect("attack", "update", "eval")))
            _epoch_end(run, epoch, history)
            history.finished = bool(history.stop_reason) or epoch + 1 == config.epochs
            if checkpoint is not None:
                _save(checkpoint, run, history)
            epoch_bar.update(1)
            epoch_bar.set_postfix(_postfix(history))
            if history.finished:
                break
    history.finished = True

    def train_end():
        for i, cb in enumerate(run.callbacks):
            _seed(run, "callback", index=i, epoch=config.epochs)
            _call(cb, "on_train_end", model, history)
    _on_main(train_end, history)
    _share_callbacks(run)
    model.eval()
    return history


#: A debug hook of the tests: when set, called as ``_index_hook(epoch, batch, indices)`` with the
#: indices of the training examples this process takes in every batch (its share under torchrun).
_index_hook = None


@dataclass
class _Run:
    """What the loop's pieces share: the config and everything built from it before the first epoch."""

    config: TrainConfig
    model: nn.Module
    opt: torch.optim.Optimizer
    schedule: LRSchedule
    x: torch.Tensor
    y: torch.Tensor
    eval_xy: tuple | None
    attack_kw: dict
    callbacks: list
    clock: Clock
    device: torch.device
    shuffle: torch.Generator  # the order of the batches: one permutation per epoch
    record: dict  # what a checkpoint must match: the config and the data's fingerprint
    augment_generator: torch.Generator | None = None  # on the device, reseeded per batch ("augment" stream)
    update_model: nn.Module | None = None  # several processes: the DistributedDataParallel of the update
    attack_model: nn.Module | None = None  # several processes: the model the attacks craft against

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.y) / self.config.batch_size)


def _config(config, overrides) -> TrainConfig:
    if config is None:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(map(repr, unknown))}; "
                             f"the options are the fields of ntklab.train.TrainConfig")
        missing = [name for name in ("strategy", "epochs") if name not in overrides]
        if missing:
            raise TypeError(f"train() needs {' and '.join(missing)} (as keywords or in a TrainConfig)")
        return TrainConfig(**overrides)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    return config.replace(**overrides)


_HOOKS = ("on_train_begin", "on_epoch_end", "on_train_end", "on_batch_end")


def _check_callbacks(callbacks) -> list:
    """``callbacks`` as a list, each an object with at least one hook: a class (not an instance), a
    plain function or an object without hooks would otherwise be ignored or fail mid-run."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise ValueError(f"callbacks must be a list of callback objects, got {type(callbacks).__name__}")
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type):
            raise ValueError(f"callbacks[{i}] is the class {cb.__name__}, not an instance of it: pass "
                             f"{cb.__name__}(...)")
        if not any(callable(getattr(cb, hook, None)) for hook in _HOOKS):
            kind = "a function" if callable(cb) else f"a {type(cb).__name__}"
            raise ValueError(f"callbacks[{i}] is {kind} with none of the hooks {', '.join(_HOOKS)}: it would never "
                             f"be called (write a class with an on_epoch_end(epoch, model, history) method)")
    return callbacks


def _check_model_and_batches(model: nn.Module, n: int, batch_size: int) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (none requires grad): there is nothing to train")
    if n % batch_size == 1 and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise ValueError(f"the last batch of every epoch would hold one example ({n} examples, batch_size "
                         f"{batch_size}), and a BatchNorm1d layer cannot normalise one value per channel in "
                         f"train mode: choose another batch_size or drop one example")


def _check_attack_kwargs(config: "TrainConfig", model: nn.Module, x, y, attack_kw: dict, extra: dict) -> None:
    """The attack's extra arguments, checked before the first epoch even when the attack starts after
    a switch epoch: unknown names against the attack's signature, values by one attack on two
    training images (eval mode, torch's random state untouched, the model unchanged)."""
    import inspect

    if not config.attack_kwargs:
        return
    fn = getattr(attacks, config.strategy)
    parameters = inspect.signature(fn).parameters
    known = [p for p in parameters if p not in ("model", "x", "y")]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # a wrapper
    unknown = [] if takes_any else sorted(set(config.attack_kwargs) - set(known))
    if unknown:
        raise ValueError(f"attack_kwargs has arguments {unknown} that {config.strategy!r} does not take; it takes: "
                         f"{', '.join(k for k in known if k not in ('eps', 'alpha', 'steps', 'bn_mode'))}")
    device = next(iter(model.parameters())).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        attacks.adversarial_examples(config.strategy, model, x[:2].to(device), y[:2].to(device), **attack_kw,
                                     **extra)


def _setup(model, train_set, eval_set, config: TrainConfig, callbacks: list, device) -> _Run:
    """The data (checked, on ``device`` when small), the evaluation subset, the optimiser, the
    attack's arguments and the callbacks, with an :class:`AutoSwitch` first under ``"auto"``."""
    x, y = as_tensors(train_set, model=model)          # images in [0, 1] of the model's dtype: once, not per batch
    if config.channels_last:                           # x is 4-D (N, C, H, W): as_tensors checked it
        model.to(memory_format=torch.channels_last)
    if config.keep_best and eval_set is None:
        raise ValueError("keep_best needs an eval_set: the best epoch is the one of the best held-out PGD accuracy")
    k = _num_outputs(model, x[:2].to(device))
    y = _checks.labels("the labels of train_set", y, len(y), num_classes=k)
    record = {**config.to_dict(), "n_train": len(y), "data_sum": float(x.sum(dtype=torch.float64)),
              "label_sum": int(y.sum()), "model": type(model).__name__}
    if device.type == "cuda" and x.nbytes <= 2**30:  # small sets live on the GPU, big ones move per batch
        x, y = x.to(device), y.to(device)
    eval_xy = None
    if eval_set is not None and config.eval_every:
        ex, ey = as_tensors(eval_set, model=model)
        ey = _checks.labels("the labels of eval_set", ey, len(ey), num_classes=k)
        sub = subset(TensorDataset(ex, ey), config.eval_size, seed=config.seed)
        eval_xy = (sub.tensors[0].to(device), sub.tensors[1].to(device))
    attack_kw = attack_arguments(config.strategy, config.eps, config.alpha, config.steps, config.attack_bn_mode)
    extra = extra_attack_arguments(config.strategy, config.attack_kwargs, x, device)
    _check_model_and_batches(model, len(y), config.batch_size)
    _check_attack_kwargs(config, model, x, y, attack_kw, extra)
    attack_kw.update(extra)
    schedule = config.schedule()
    opt = torch.optim.SGD(model.parameters(), lr=schedule(0), momentum=config.momentum,
                          weight_decay=config.weight_decay)
    if config.auto_switch:
        n_batches = math.ceil(len(y) / config.batch_size)
        probe = subset(TensorDataset(x.cpu(), y.cpu()), config.switch_probe, seed=config.seed).tensors[0]
        cap = _switch_cap(config.switch_cap, config.epochs, getattr(schedule, "milestones", ()))
        callbacks = [AutoSwitch(probe, cap, threshold=config.switch_threshold,
                                lr_of_epoch=lambda e: schedule.epoch_mean(e, n_batches),
                                bn_x=x, bn_batch_size=config.batch_size), *callbacks]
    if config.keep_best and not any(isinstance(cb, BestCheckpoint) for cb in callbacks):
        callbacks = [*callbacks, BestCheckpoint()]    # last: the other callbacks keep their streams
    run = _Run(config, model, opt, schedule, x, y, eval_xy, attack_kw, callbacks, Clock(device), device,
               torch.Generator().manual_seed(config.seed), record,
               torch.Generator(device=device) if config.augment is not None else None)
    run.update_model, run.attack_model = _data_parallel(model, config, len(y), device)
    return run


def _data_parallel(model: nn.Module, config: TrainConfig, n: int, device) -> tuple:
    """Under several processes (:mod:`ntklab.distributed`): the split of the global batches checked,
    then the models of the update (DistributedDataParallel) and of the attacks; ``(None, None)`` in
    one process. Each rank takes positions ``rank::world`` of every global batch, so ``batch_size``
    must be divisible by the number of processes; the last batch of an epoch may split unevenly
    (e.g. SVHN's 73,257 examples), and then each rank's loss is weighted by its share
    (:func:`ntklab.distributed.shard_weight`) so that the update is the global batch's."""
    world = distributed.world_size()
    if world == 1:
        return None, None
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes ({world}): "
                         f"each process takes batch_size / {world} examples of every global batch")
    last = n % config.batch_size
    if 0 < last < world:
        raise ValueError(f"the last batch of every epoch would hold {last} examples ({n} examples, batch_size "
                         f"{config.batch_size}), fewer than the {world} processes: choose another batch_size "
                         f"or drop {last} examples")
    smallest = min(config.batch_size // world, last // world if last else n)
    if smallest == 1 and not config.sync_bn and any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        raise ValueError(f"with batch_size {config.batch_size} over {world} processes a process would normalise "
                         f"one example per channel in a BatchNorm1d layer: choose a larger batch_size or sync_bn=True")
    return distributed.data_parallel(model, device, sync_bn=config.sync_bn)


def _train_epoch(run: _Run, strategy: str, epoch: int, history: History, bar):
    """One pass over the epoch's permutation; returns (mean loss, train accuracy or None). No host
    sync per batch. Every batch draws its random numbers from its own ``"attack"`` stream."""
    cfg, model, opt = run.config, run.model, run.opt
    batches = torch.randperm(len(run.y), generator=run.shuffle).to(run.x.device).split(cfg.batch_size)
    for group in opt.param_groups:
        group["lr"] = run.schedule(epoch)
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    for b, idx in enumerate(batches):
        if run.schedule.per_batch:
            for group in opt.param_groups:
                group["lr"] = run.schedule(epoch, b, len(batches))
        full = idx
        if run.update_model is not None:  # several processes: this rank's share of the global batch
            size, idx = len(idx), distributed.shard(idx)
            run.update_model.module.scale = distributed.shard_weight(len(idx), size)
        if _index_hook is not None:
            _index_hook(epoch, b, idx)
        if cfg.augment is not None and full is not idx:  # augment the global batch, as one process does
            xb = distributed.shard(_batch(run, run.x[full].to(run.device, non_blocking=True), epoch, b))
        else:
            xb = _batch(run, run.x[idx].to(run.device, non_blocking=True), epoch, b)
        yb = run.y[idx].to(run.device, non_blocking=True)
        _seed(run, "attack", index=distributed.rank(), epoch=epoch, batch=b)
        loss, logits = _train_step(run, strategy, xb, yb)
        loss_sum += loss * len(idx)
        if logits is not None:
            correct += (logits.argmax(1) == yb).sum()
        _batch_end(run, epoch, b, len(batches), history)
        bar.update(1)
    n = len(run.y)
    distributed.all_reduce_sum(loss_sum)       # the sums over every rank's share: the global batch's
    distributed.all_reduce_sum(correct)
    distributed.broadcast_buffers(model)       # rank 0's running statistics: what it evaluates and saves
    return (loss_sum / n).item(), (None if strategy == "trades" else correct.item() / n)


def _batch(run: _Run, xb: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
    """The clean training batch as the step sees it: augmented (``TrainConfig.augment``, from the
    batch's own ``"augment"`` stream) and in channels_last format when asked."""
    cfg = run.config
    if cfg.augment is not None:
        run.augment_generator.manual_seed(stream_seed(cfg.seed, "augment", epoch=epoch, batch=batch))
        xb = apply_augment(cfg.augment, xb, generator=run.augment_generator)
    if cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


def _train_step(run: _Run, strategy: str, xb, yb):
    """The update(s) of one batch, timed as attack and update; returns (loss, logits or None), detached.
    With ``clean_update`` an adversarial batch first gets an update on its clean inputs. Under
    several processes the update goes through DistributedDataParallel and the attack is crafted on
    this rank's share with the model itself (with global BN statistics under ``sync_bn``)."""
    clock, opt = run.clock, run.opt
    model = run.update_model if run.update_model is not None else run.model
    target = run.attack_model if run.attack_model is not None else run.model
    if run.config.clean_update and strategy not in ("normal", "trades"):
        start = clock.now()
        sgd_step(model, opt, xb, yb, amp=run.config.amp)
        clock.add("update", start)
    start = clock.now()
    if strategy in ("trades", "gradalign"):   # the inner maximisation (TRADES), FGSM and the regulariser's
        kw = run.attack_kw                     # input gradients (GradAlign) live inside the loss: timed as attack
        if strategy == "trades":
            loss, logits = attacks.trades_loss(model, xb, yb, beta=run.config.beta, **kw)[0], None
        else:
            loss, logits, _ = attacks.gradalign_loss(model, xb, yb, eps=kw["eps"], lam=run.config.gradalign_lambda,
                                                     bn_mode=kw["bn_mode"])
        crafted = clock.now()
        clock.add("attack", start, crafted)
        loss_step(opt, loss)
        clock.add("update", crafted)
        return loss.detach(), logits
    if strategy != "normal":
        xb = attacks.adversarial_examples(strategy, target, xb, yb, **run.attack_kw)
        crafted = clock.now()
        clock.add("attack", start, crafted)
        start = crafted
    loss, logits = sgd_step(model, opt, xb, yb, amp=run.config.amp)
    clock.add("update", start)
    return loss, logits


def _clock_name(callback) -> str:
    return "switch" if getattr(callback, "part_of_training", False) else "callbacks"


def _train_begin(run: _Run, history: History) -> None:
    """Every callback's ``on_train_begin``; the time of those that are part of training falls in the
    first epoch's ``time_switch`` (their kernel at initialisation), the others' in ``time_begin``."""
    def hooks():
        for i, cb in enumerate(run.callbacks):
            _seed(run, "callback", index=i, epoch=-1)
            with run.clock.interval("switch" if _clock_name(cb) == "switch" else "begin"):
                _call(cb, "on_train_begin", run.model, history)
        wall, cpu = run.clock.collect("begin").get("begin", (0.0, 0.0))
        history.time_begin += wall
        history.time_begin_cpu += cpu
    _on_main(hooks, history)


def _batch_end(run: _Run, epoch: int, batch: int, num_batches: int, history: History) -> None:
    def hooks():
        for i, cb in enumerate(run.callbacks):
            if callable(getattr(cb, "on_batch_end", None)):
                _seed(run, "callback", index=i, epoch=epoch, batch=batch + 1)
                with run.clock.interval(_clock_name(cb)):
                    _call(cb, "on_batch_end", epoch, batch, num_batches, run.model, history)
    if any(callable(getattr(cb, "on_batch_end", None)) for cb in run.callbacks):
        distributed.main_only(hooks)


def _epoch_end(run: _Run, epoch: int, history: History) -> None:
    """Every callback's ``on_epoch_end`` (the epoch's row is in ``history``); then the times of the
    callbacks (per batch and per epoch) into that row."""
    def hooks():
        for i, cb in enumerate(run.callbacks):
            _seed(run, "callback", index=i, epoch=epoch)
            with run.clock.interval(_clock_name(cb)):
                _call(cb, "on_epoch_end", epoch, run.model, history)
        for key, value in _times(run.clock.collect("callbacks", "switch")).items():
            getattr(history, key)[-1] = value
    _on_main(hooks, history)


def _on_main(hooks, history: History) -> None:
    """``hooks()`` (callbacks) on rank 0 only; then every rank's ``history`` is rank 0's, so that what
    the callbacks decide (``request_stop``, the :class:`AutoSwitch`'s switch epoch, logged values)
    steers every rank alike. One process: just ``hooks()``."""
    if distributed.world_size() == 1:
        hooks()
        return
    state = distributed.main_only(lambda: (hooks(), history.to_dict())[1])
    if not distributed.is_main():
        vars(history).update(vars(History.from_dict(state)))


def _share_callbacks(run: _Run) -> None:
    """Several processes, after training: rank 0's callback states (``state_dict``) loaded into the
    other ranks' callbacks, so that every rank can read the kernels and decisions rank 0 took."""
    if distributed.world_size() == 1:
        return
    states = distributed.broadcast_object(
        [_to_cpu(cb.state_dict()) if callable(getattr(cb, "state_dict", None)) else None for cb in run.callbacks]
        if distributed.is_main() else None)
    if not distributed.is_main():
        for cb, state in zip(run.callbacks, states):
            if state is not None:
                cb.load_state_dict(_to_device(state, run.device))


def _to_cpu(obj):
    return _map_tensors(obj, lambda t: t.detach().cpu())


def _to_device(obj, device):
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _times(totals: dict) -> dict:
    """``{"time_x": wall, "time_x_cpu": cpu}`` of :meth:`Clock.collect`'s ``{x: (wall, cpu)}``."""
    out = {}
    for name, (wall, cpu) in totals.items():
        out[f"time_{name}"], out[f"time_{name}_cpu"] = wall, cpu
    return out


def _evaluate(run: _Run, epoch: int) -> dict:
    """Clean and PGD accuracy on the evaluation subset, from the epoch's ``"eval"`` stream (on rank 0,
    its numbers on every rank)."""
    return distributed.main_only(_evaluate_here, run, epoch)


def _evaluate_here(run: _Run, epoch: int) -> dict:
    cfg = run.config
    _seed(run, "eval", epoch=epoch)
    with run.clock.interval("eval"), eval_mode(run.model):
        clean = evaluate.clean_accuracy(run.model, run.eval_xy, device=run.device)
        robust = evaluate.pgd_accuracy(run.model, run.eval_xy, eps=cfg.eps if cfg.eval_eps is None else cfg.eval_eps,
                                       alpha=cfg.eval_alpha, steps=cfg.eval_steps)
    return {"clean_acc": float(clean), "pgd_acc": float(robust)}


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
    with eval_mode(model), torch.no_grad():
        return _checks.logits(model(xb), where="the model")


def _call(cb, hook, *args):
    """``cb.hook(*args)``; an exception it raises ends training, with a note naming the callback and hook."""
    fn = getattr(cb, hook, None)
    if fn is not None:
        try:
            fn(*args)
        except Exception as err:
            where = f" after epoch {args[0]}" if hook in ("on_epoch_end", "on_batch_end") else ""
            err.add_note(f"raised by the callback {type(cb).__name__} in {hook}{where}; training stopped")
            raise


def _bar(progress: bool, **kw):
    """A tqdm.auto bar (a context manager), silent when ``progress`` is off (:mod:`ntklab._progress`)
    and on every rank but 0 under torchrun."""
    return _progress.bar(progress and distributed.is_main(), **kw)


def _postfix(history: History) -> dict:
    out = {"loss": f"{history.loss[-1]:.3f}"}
    for key in ("train_acc", "clean_acc", "pgd_acc"):
        value = getattr(history, key)[-1]
        if value is not None:
            out[key] = f"{value:.3f}"
    return out


# ------------------------------------------------------------------ checkpoints
def _callback_states(callbacks) -> list:
    states = []
    for cb in callbacks:
        fn = getattr(cb, "state_dict", None)
        state = fn() if fn is not None else None
        if state is not None:
            states.append({"name": type(cb).__name__, "state": state})
    return states


def _save(path: Path, run: _Run, history: History) -> None:
    """The checkpoint, written by rank 0 only; every rank waits until it is written."""
    distributed.main_only(_write_checkpoint, path, run, history)


def _write_checkpoint(path: Path, run: _Run, history: History) -> None:
    atomic_save({"format": CHECKPOINT_FORMAT, "config": run.record, "model": run.model.state_dict(),
                 "optimizer": run.opt.state_dict(), "history": history.to_dict(),
                 "callbacks": _callback_states(run.callbacks)}, path)


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


def _resume(path: Path, run: _Run) -> History:
    """Load a checkpoint of this run into the model, optimiser and callbacks; its history. No random
    state is saved: every batch seeds its own streams, and the shuffle stream is drawn again."""
    try:
        state = torch.load(path, map_location=run.device, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the checkpoint {path} ({describe_load_error(err)}); "
                         f"delete it to start over") from err
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"the checkpoint {path} has format {state.get('format')!r}, but this version of "
                         f"ntklab reads format {CHECKPOINT_FORMAT} only; delete {path.parent} to start the run over")
    _check_config(state["config"], run.record, path.parent)
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint in {path.parent} holds another model's weights: {err}") from err
    run.opt.load_state_dict(state["optimizer"])
    stateful = [cb for cb in run.callbacks if getattr(cb, "state_dict", None) and cb.state_dict() is not None]
    saved = state["callbacks"]
    if [type(cb).__name__ for cb in stateful] != [s["name"] for s in saved]:
        raise ValueError(f"the checkpoint in {path.parent} has states of callbacks "
                         f"{[s['name'] for s in saved]}, this call passes {[type(cb).__name__ for cb in stateful]}")
    for cb, s in zip(stateful, saved):
        cb.load_state_dict(s["state"])
    history = History.from_dict(state["history"])
    for _ in range(len(history)):  # the shuffle stream, past the epochs done
        torch.randperm(len(run.y), generator=run.shuffle)
    return history


def training_step_costs(model: torch.nn.Module, batches, configs: Mapping[str, object], *, rounds: int = 3,
                        device=None, per_round: bool = False) -> dict:
    """Seconds per batch of one training step of each config, as :func:`ntklab.train.train` takes
    it (train mode; the strategy's attack, then the SGD update), measured interleaved by
    :func:`ntklab.clock.step_cost`.

    model: the initial network (each config trains its own copy of it, with its own SGD optimiser).
    batches: a list of ``(x, y)`` training batches; every round gives each config all of them once.
    configs: ``{name: TrainConfig}`` (e.g. ``TrainConfig.from_profile(profile, "pgd")``): the
        strategy, its attack (eps, alpha, steps, BN mode) and the optimiser's settings are used.
    rounds, device, per_round: as in :func:`ntklab.clock.step_cost`.

    Returns ``{name: seconds per batch}`` (or per round, with ``per_round``). Chapter 5 (normal
    against PGD-k) and chapter 6 can share it.
    """
    import copy
    import itertools

    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one (x, y) batch")
    device = torch.device(device if device is not None else "cpu")
    batches = [(x.to(device), y.to(device)) for x, y in batches]

    def step(tc):
        net = copy.deepcopy(model).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        kw = attack_arguments(tc.strategy, tc.eps, tc.alpha, tc.steps, tc.attack_bn_mode)
        cycle = itertools.cycle(batches)

        def one():
            xb, yb = next(cycle)
            net.train()
            if tc.strategy != "normal":
                xb = attacks.adversarial_examples(tc.strategy, net, xb, yb, **kw)
            sgd_step(net, opt, xb, yb)
        return one

    return step_cost({name: step(tc) for name, tc in configs.items()}, rounds=rounds, batches=len(batches),
                     device=device, per_round=per_round)
