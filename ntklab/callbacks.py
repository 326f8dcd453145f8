"""Callbacks of the training loop: kernel snapshots, the catastrophic-overfitting check, the best checkpoint.

A callback is any object with some of the methods of :class:`Callback` (all optional):

* ``on_train_begin(model, history)``: before the first epoch, and again when a run resumes;
* ``on_epoch_end(epoch, model, history)``: after epoch ``epoch`` (0-based) was trained and evaluated;
  ``history`` already holds that epoch's row, so ``history.log(key, value)`` adds to it and
  ``history.request_stop(reason)`` ends training after this epoch;
* ``on_train_end(model, history)``: after the last epoch (not when a finished run is reloaded);
* ``on_batch_end(epoch, batch, num_batches, model, history)``: after every batch's update, with the
  model still in train mode (only for callbacks that define it; :class:`ParameterSnapshots`);
* ``state_dict()`` / ``load_state_dict(state)``: what must survive a checkpoint (tensors and plain
  containers only, since checkpoints are loaded with ``weights_only=True``); ``None`` for no state.

and one optional attribute, ``part_of_training``: ``True`` when the callback's time counts as
training time (``History.time_switch``), not as measurement (``History.time_callbacks``).

The loop (:func:`ntklab.train.train`) runs callbacks with the model on the training device; before
each hook it seeds torch's random state from the callback's own named stream
(:func:`ntklab.train.stream_seed`), and training seeds its own streams per batch, so that taking
measurements never changes the training trajectory. Introduced in chapter 4 (kernel snapshots) and
chapter 6 (the check); :class:`AutoSwitch` (chapter 5) is the measurement behind
``train(..., switch_epoch="auto")``, an ordinary callback that is part of training.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
from torch import nn

from ntklab import attacks, bn
from ntklab.bn import eval_mode
from ntklab.evaluate import model_device, clean_accuracy

__all__ = ["Callback", "KernelSnapshots", "CatastrophicOverfittingDetector", "ParameterSnapshots", "AutoSwitch",
           "BestCheckpoint", "evaluating"]

log = logging.getLogger("ntklab.train")


class Callback:
    """Base class with no-op hooks; subclass it or write any object with the same methods."""

    #: whether the callback's time is training time (``History.time_switch``) or measurement
    part_of_training = False

    def on_train_begin(self, model: nn.Module, history) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module, history) -> None:
        pass

    def on_train_end(self, model: nn.Module, history) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass


evaluating = eval_mode  # the older name of ntklab.bn.eval_mode, the one eval-mode switch


class KernelSnapshots(Callback):
    """Empirical NTK of a fixed probe set at chosen epochs: the C-NTK on the clean probe inputs and,
    with ``ae=True``, the AE-NTK on PGD adversarial examples of the same inputs, crafted against the
    model at that snapshot (the two kernels of Li et al., arXiv 2312.02236, section 4).

    probe_x: (n, C, H, W) in [0, 1]; probe_y: (n,) labels (needed for the AEs).
    epochs: numbers of completed epochs at which to take a snapshot, 0 meaning at initialisation
        (before any training); ``None``: at 0 and after every epoch.
    kind, implementation, chunk_size: passed to :func:`ntklab.ntk.empirical_ntk`; a snapshot has
        shape (n, n) for ``"trace"`` and ``"logit"``, (n, n, k) for ``"diagonal"``, (n, n, k, k) for
        ``"full"`` (k classes). Kernels are computed with the model in eval mode.
    eps, alpha, steps, attack_bn_mode: the L-inf PGD of the AEs (Madry et al. 2018), alpha defaults
        to eps / 4.
    dtype: storage type of the kernels, on the CPU (``torch.float16`` halves the memory).
    statistics_x, statistics_batch_size: inputs (e.g. the training images) and batch size (the
        training batch size) of a statistics-only pass (:func:`ntklab.bn.refresh_bn_statistics`,
        on a copy: training is untouched). With them, snapshot 0 is the kernel of the network SGD
        starts from: the fresh model with its BN running statistics refreshed on ``statistics_x``,
        not PyTorch's default buffers (mean 0, variance 1), which no trained network ever used; the
        default-buffer kernel is kept apart (``default_kernel``). ``None``: snapshot 0 of the model
        as it is (its default buffers).
    floor: with ``statistics_x``, also the C-NTK of a statistics-refreshed copy of the model at
        every snapshot (``kernels("refreshed")``; at snapshot 0 it is the snapshot itself): the
        kernel's twin with the same weights and settled statistics, whose angle to the snapshot is
        the motion batch-norm bookkeeping alone accounts for at that epoch (chapter 4's floor).

    After training: ``snapshot_epochs`` (list of ints), ``kernels("clean")`` / ``kernels("ae")``
    (/ ``kernels("refreshed")``) stacked to (T, n, n, ...) float32, ``kernel(epoch, which)``,
    ``default_kernel`` (the C-NTK at snapshot 0 with default buffers, or ``None``), and the probe
    accuracies ``probe_clean_acc`` / ``probe_ae_acc`` (one per snapshot). Introduced in chapter 4.
    """

    def __init__(self, probe_x: torch.Tensor, probe_y: torch.Tensor | None = None,
                 epochs: Iterable[int] | None = None, *, kind: str = "trace", ae: bool = True,
                 eps: float = 0.3, alpha: float | None = None, steps: int = 10,
                 implementation: str = "auto", chunk_size: int | None = None,
                 attack_bn_mode: str = "eval", dtype: torch.dtype = torch.float32,
                 statistics_x: torch.Tensor | None = None, statistics_batch_size: int = 128, floor: bool = False):
        from ntklab import _checks
        from ntklab.ntk import IMPLEMENTATIONS, KINDS

        if ae and probe_y is None:
            raise ValueError("KernelSnapshots with ae=True needs probe_y (the labels of the probe inputs)")
        _checks.images("probe_x", probe_x)
        if probe_y is not None:
            probe_y = _checks.labels("probe_y", probe_y, probe_x.shape[0])
        if kind not in KINDS or kind == "logit":
            raise ValueError(f"kind must be one of 'full', 'trace', 'diagonal', got {kind!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                             f"got {implementation!r}")
        _checks.count("chunk_size", chunk_size, allow_none=True)
        _checks.count("steps", steps)
        bn.check_bn_mode(attack_bn_mode, name="attack_bn_mode", allowed=("eval", "train"))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype (float16, float32, float64), got {dtype!r}")
        if statistics_x is not None:
            _checks.images("statistics_x", statistics_x)
        _checks.count("statistics_batch_size", statistics_batch_size)
        if epochs is not None:
            if isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__iter__"):
                raise ValueError(f"epochs must be a sequence of epoch numbers or None, got {epochs!r}")
            epochs = sorted({_checks.count("epochs", e, minimum=0) for e in epochs})
        self.probe_x, self.probe_y = probe_x, probe_y
        self.epochs = epochs
        self.kind, self.ae, self.implementation, self.chunk_size = kind, ae, implementation, chunk_size
        self.eps, self.alpha, self.steps = eps, attacks.pgd_alpha(eps, alpha), steps
        self.attack_bn_mode, self.dtype = attack_bn_mode, dtype
        if floor and statistics_x is None:
            raise ValueError("KernelSnapshots with floor=True needs statistics_x (the inputs of the statistics pass)")
        self.statistics_x, self.statistics_batch_size, self.floor = statistics_x, int(statistics_batch_size), floor
        self._state = {"epoch": [], "clean": [], "ae": [], "probe_clean_acc": [], "probe_ae_acc": [],
                       "refreshed": [], "default": []}

    # -- results ---------------------------------------------------------------------------
    @property
    def snapshot_epochs(self) -> list[int]:
        return list(self._state["epoch"])

    @property
    def probe_clean_acc(self) -> list[float]:
        return list(self._state["probe_clean_acc"])

    @property
    def probe_ae_acc(self) -> list[float]:
        return list(self._state["probe_ae_acc"])

    @property
    def default_kernel(self) -> torch.Tensor | None:
        """The C-NTK at snapshot 0 of the model with its default BN buffers (only with
        ``statistics_x``; ``None`` otherwise), float32."""
        return self._state["default"][0].float() if self._state["default"] else None

    def kernels(self, which: str = "clean") -> torch.Tensor:
        """All snapshots of the ``"clean"`` (C-NTK), ``"ae"`` (AE-NTK) or ``"refreshed"`` (C-NTK of
        the statistics-refreshed twin) kernel, (T, n, n, ...) float32."""
        if which not in ("clean", "ae", "refreshed"):
            raise ValueError(f"which must be 'clean', 'ae' or 'refreshed', got {which!r}")
        if which == "ae" and not self.ae:
            raise ValueError("this KernelSnapshots was made with ae=False")
        if which == "refreshed" and not self.floor:
            raise ValueError("this KernelSnapshots was made with floor=False")
        if not self._state[which]:
            raise ValueError("no snapshot was taken yet")
        return torch.stack([k.float() for k in self._state[which]])

    def kernel(self, epoch: int, which: str = "clean") -> torch.Tensor:
        """The snapshot after ``epoch`` completed epochs, float32."""
        if epoch not in self._state["epoch"]:
            raise KeyError(f"no snapshot at epoch {epoch}; snapshots: {self.snapshot_epochs}")
        return self._state[which][self._state["epoch"].index(epoch)].float()

    # -- hooks -----------------------------------------------------------------------------
    def _wanted(self, completed: int) -> bool:
        return (self.epochs is None or completed in self.epochs) and completed not in self._state["epoch"]

    def on_train_begin(self, model, history):
        if self._wanted(0) and len(history) == 0:
            self.snapshot(model, 0)

    def on_epoch_end(self, epoch, model, history):
        if self._wanted(epoch + 1):
            self.snapshot(model, epoch + 1)

    def snapshot(self, model: nn.Module, completed: int) -> None:
        """Compute and store the kernels of ``model`` now, filed under ``completed`` epochs."""
        from ntklab import ntk

        from ntklab.bn import refresh_bn_statistics

        dev = model_device(model, None)
        x = self.probe_x.to(dev)
        kw = dict(kind=self.kind, implementation=self.implementation, chunk_size=self.chunk_size)
        st = self._state
        twin = None
        if self.statistics_x is not None:
            twin = refresh_bn_statistics(model, self.statistics_x, batch_size=self.statistics_batch_size)
            if completed == 0:  # K_0: the network SGD starts from; the default-buffer kernel apart
                with eval_mode(model):
                    st["default"] = [ntk.empirical_ntk(model, x, **kw).detach().to("cpu", self.dtype)]
                model = twin
        with eval_mode(model):
            clean = ntk.empirical_ntk(model, x, **kw)
            st["clean"].append(clean.detach().to("cpu", self.dtype))
            if self.floor:
                if model is twin:
                    st["refreshed"].append(st["clean"][-1])
                else:
                    with eval_mode(twin):
                        st["refreshed"].append(ntk.empirical_ntk(twin, x, **kw).detach().to("cpu", self.dtype))
            if self.probe_y is not None:
                y = self.probe_y.to(dev)
                st["probe_clean_acc"].append(clean_accuracy(model, (x, y)))
            if self.ae:
                x_adv = attacks.pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                    bn_mode=self.attack_bn_mode)
                st["ae"].append(ntk.empirical_ntk(model, x_adv, **kw).detach().to("cpu", self.dtype))
                st["probe_ae_acc"].append(clean_accuracy(model, (x_adv, y)))
            st["epoch"].append(int(completed))

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self):
        return {k: list(v) for k, v in self._state.items()}

    def load_state_dict(self, state) -> None:
        self._state = {k: list(state.get(k, [])) for k in self._state}


class CatastrophicOverfittingDetector(Callback):
    """After each epoch, PGD robust accuracy on a fixed batch (the check of Wong et al. 2020,
    "Fast is better than free", and their fast_adversarial code); a fall of more than ``drop``
    below the best value so far is catastrophic overfitting (CO).

    x: (n, C, H, W) in [0, 1], y: (n,) — a fixed batch, e.g. the first training batch.
    eps, alpha, steps, restarts, bn_mode: the L-inf PGD (alpha defaults to eps / 4); the model is
        in eval mode for the check.
    drop: the fall in robust accuracy (in [0, 1]) that counts as CO.
    min_best: a fall counts only once the best robust accuracy so far is at least ``min_best``
        (default 0: any best). Catastrophic overfitting in the sense of Wong et al. is the loss of a
        robustness the run had; ``min_best`` above the accuracy of a model that never was robust
        keeps a run that never got off the ground from being flagged (chapter 6).
    stop: end training after the epoch at which CO is found (Wong et al. then keep the weights of
        the epoch before; here the history and checkpoints make that choice the caller's).

    Each epoch it logs ``co_robust_acc`` and ``co_flag`` into the history; a flag is also logged to
    the ``ntklab.train`` logger as a warning. ``flagged_epochs`` lists the 0-based epochs flagged.
    Introduced in chapter 6.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float | None = None,
                 steps: int = 10, drop: float = 0.2, *, stop: bool = False, restarts: int = 1,
                 bn_mode: str = "eval", min_best: float = 0.0):
        if not 0 < drop <= 1:
            raise ValueError(f"drop must be in (0, 1], got {drop}")
        if not 0 <= min_best <= 1:
            raise ValueError(f"min_best must be in [0, 1], got {min_best}")
        self.min_best = float(min_best)
        self.x, self.y, self.eps, self.steps, self.restarts = x, y, eps, steps, restarts
        self.alpha = attacks.pgd_alpha(eps, alpha)
        self.drop, self.stop, self.bn_mode = drop, stop, bn_mode
        self.best: float | None = None
        self.flagged_epochs: list[int] = []

    def robust_accuracy(self, model: nn.Module) -> float:
        """PGD accuracy of ``model`` on the fixed batch."""
        dev = model_device(model, None)
        x, y = self.x.to(dev), self.y.to(dev)
        with eval_mode(model):
            x_adv = attacks.pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                restarts=self.restarts, bn_mode=self.bn_mode)
            return clean_accuracy(model, (x_adv, y))

    def on_epoch_end(self, epoch, model, history):
        acc = self.robust_accuracy(model)
        flagged = self.best is not None and self.best >= self.min_best and acc < self.best - self.drop
        history.log("co_robust_acc", acc)
        history.log("co_flag", flagged)
        if flagged:
            self.flagged_epochs.append(int(epoch))
            msg = (f"catastrophic overfitting at epoch {epoch}: PGD accuracy on the check batch fell "
                   f"to {acc:.3f} from a best of {self.best:.3f}")
            log.warning(msg)
            if self.stop:
                history.request_stop(msg)
        self.best = acc if self.best is None else max(self.best, acc)

    def state_dict(self):
        return {"best": self.best, "flagged_epochs": list(self.flagged_epochs)}

    def load_state_dict(self, state) -> None:
        self.best = state["best"]
        self.flagged_epochs = list(state["flagged_epochs"])


def _check_switch(cap, threshold) -> None:
    from ntklab import _checks

    _checks.count("cap", cap)
    if not 0 < _checks.number("threshold", threshold) < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")


class AutoSwitch(Callback):
    """The switch epoch of the cost-saving schedule, chosen from the kernel velocity (chapter 5).

    Li et al. (arXiv 2312.02236) train normally first and adversarially from a switch epoch on,
    picked by hand, arguing that in the lazy phase the kernel hardly moves whatever the strategy.
    This callback picks the epoch instead: it takes the centred trace NTK (see
    :func:`ntklab.metrics.center_kernel`) of a small fixed probe set at initialisation (with the
    batch-norm statistics of the network SGD starts from, see ``bn_x``) and after
    every epoch until it decides; the velocity over epoch t is KD(K_t, K_{t+1}) per unit of
    learning rate (divided by ``lr_of_epoch(t)``). The first epoch's velocity is the reference;
    training switches after the first epoch whose velocity is at most ``threshold`` times the
    reference (:func:`ntklab.metrics.lazy_onset`: lazy training has begun), and at the latest at
    epoch ``cap``, so a run with ``cap < epochs`` never ends without adversarial training. With a
    constant learning rate before ``cap`` (the multistep schedules of the book) per unit of learning
    rate and per epoch are the same.

    probe_x: (n, C, H, W) in [0, 1], e.g. 32 class-balanced training images (cost: one trace NTK of
        n images per epoch until the switch). cap: an epoch >= 1. threshold: in (0, 1).
    lr_of_epoch: the mean learning rate of a 0-based epoch (default: ``history.lr`` of that epoch).
    bn_x, bn_batch_size: training inputs (N, C, H, W) and the training batch size. The reference
        kernel at initialisation is then taken on :func:`ntklab.bn.refresh_bn_statistics` of the
        model (a copy with running statistics from a statistics-only pass over ``bn_x``): the
        network SGD starts from, not PyTorch's default buffers (mean 0, variance 1), against which
        the first epoch's motion is inflated by the buffers' own calibration. ``None``: the model
        as it is (for models without BN the two agree). :func:`ntklab.train.train` passes the
        training inputs.

    steer: ``True`` (the default) lets the decision steer the run: each measured epoch logs
        ``switch_velocity`` into the history and the decision sets ``history.switch_epoch``, from
        which the loop picks each epoch's strategy; its time is training time
        (``part_of_training``). ``False`` only watches: the same measurements and decision, kept
        on the callback, the history and the run untouched, its time counted as measurement
        (chapter 5 watches a normal run this way and continues PGD-AT from the chosen epoch's
        checkpoint, which gives the very run ``switch_epoch="auto"`` would).

    After the decision ``switch_epoch`` is the number of normal epochs, i.e. the chosen 0-based
    first adversarial epoch (``None`` before); ``velocities`` holds the measured values and
    ``cpu_seconds`` the process-CPU seconds of the measurements (the kernel at initialisation
    included). :func:`ntklab.train.train` puts one first among the callbacks for
    ``switch_epoch="auto"``; its state survives checkpoints like any callback's.
    """

    def __init__(self, probe_x: torch.Tensor, cap: int, *, threshold: float = 0.2,
                 lr_of_epoch=None, implementation: str = "auto", bn_x: torch.Tensor | None = None,
                 bn_batch_size: int = 128, steer: bool = True):
        _check_switch(cap, threshold)
        if steer not in (True, False):
            raise ValueError(f"steer must be True or False, got {steer!r}")
        self.steer = self.part_of_training = bool(steer)
        self.cpu_seconds = 0.0
        self.probe_x, self.cap, self.threshold = probe_x, cap, float(threshold)
        self.bn_x, self.bn_batch_size = bn_x, bn_batch_size
        self.lr_of_epoch, self.implementation = lr_of_epoch, implementation
        self._kernel: torch.Tensor | None = None
        self.velocities: list[float] = []
        self.switch_epoch: int | None = None

    @staticmethod
    def decide(velocities, threshold: float, cap: int) -> int | None:
        """The switch epoch after ``len(velocities)`` measured epochs, or ``None`` (not yet):
        one past the lazy onset of :func:`ntklab.metrics.lazy_onset`, at most ``cap``, and ``cap``
        once ``cap`` epochs are done."""
        from ntklab.metrics import lazy_onset

        _check_switch(cap, threshold)
        onset = lazy_onset(velocities, lazy_below=threshold) if velocities else None
        if onset is not None:
            return min(onset + 1, cap)
        return cap if len(velocities) >= cap else None

    def _measure(self, model) -> torch.Tensor:
        from ntklab import ntk

        x = self.probe_x.to(model_device(model, None))
        return ntk.empirical_ntk(model, x, kind="trace", implementation=self.implementation).detach().cpu()

    def on_train_begin(self, model, history):
        if self._kernel is None and len(history) == 0 and self.switch_epoch is None:
            start = time.process_time()
            if self.bn_x is not None:
                from ntklab.bn import refresh_bn_statistics

                model = refresh_bn_statistics(model, self.bn_x, batch_size=self.bn_batch_size)
            self._kernel = self._measure(model)
            self.cpu_seconds += time.process_time() - start

    def on_epoch_end(self, epoch, model, history):
        from ntklab.metrics import kernel_distance

        if self.switch_epoch is not None:
            return
        start = time.process_time()
        kernel = self._measure(model)
        lr = self.lr_of_epoch(epoch) if self.lr_of_epoch is not None else history.lr[-1]
        if not lr > 0:
            raise ValueError(f"AutoSwitch needs a positive learning rate; epoch {epoch} has {lr!r}")
        velocity = kernel_distance(self._kernel, kernel, center=True) / lr
        self._kernel = kernel
        self.velocities.append(velocity)
        self.switch_epoch = self.decide(self.velocities, self.threshold, self.cap)
        if self.steer:
            history.log("switch_velocity", velocity)
            history.switch_epoch = self.switch_epoch
        self.cpu_seconds += time.process_time() - start
        if self.switch_epoch is not None:
            self._kernel = None  # no more measurements, nothing more to keep

    def state_dict(self):
        return {"kernel": self._kernel, "velocities": list(self.velocities), "switch_epoch": self.switch_epoch,
                "cpu_seconds": self.cpu_seconds}

    def load_state_dict(self, state) -> None:
        self._kernel = state["kernel"]
        self.velocities = [float(v) for v in state["velocities"]]
        self.switch_epoch = state["switch_epoch"]
        self.cpu_seconds = float(state.get("cpu_seconds", 0.0))


class ParameterSnapshots(Callback):
    """Copies of the model's weights (its ``state_dict``: parameters and BN buffers) at chosen
    fractional epochs, e.g. ``(0, 0.25, 0.5, 1, 2)``: the freeze points of Loo et al. (NeurIPS
    2022), whose code saves checkpoints at 0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5 and every whole
    epoch.

    times: epochs >= 0 (floats). Time 0 is the initialisation (taken in ``on_train_begin``); time t
        > 0 is taken after the first batch at which ``epoch + (batch + 1) / num_batches >= t``, so
        a fractional t is rounded up to a batch boundary (its actual time is recorded).

    bn_data: inputs (N, C, H, W) or ``None``. Given, the snapshot at time 0 holds BN running
        statistics of the data (:func:`ntklab.bn.refresh_bn_statistics` over ``bn_data`` in
        batches of ``bn_batch_size``) instead of PyTorch's default buffers (mean 0, variance 1),
        which no trained network normalises with: the book's network "at initialisation". The
        model being trained is not touched. Later snapshots keep the running statistics training
        gave them.

    After training: ``times`` (the requested times, sorted), ``actual_times`` and ``state(t)``, a
    state dict on the CPU; ``state_dict()`` holds them all, so a resumed run keeps them. Snapshots
    at times beyond the last epoch are never taken. Introduced in chapter 8.
    """

    def __init__(self, times, *, bn_data=None, bn_batch_size: int = 128):
        times = sorted({float(t) for t in times})
        if not times or times[0] < 0:
            raise ValueError(f"times must be a non-empty list of epochs >= 0, got {times}")
        self.times = times
        self.bn_data = bn_data
        self.bn_batch_size = bn_batch_size
        self._state = {"time": [], "actual": [], "weights": []}

    @property
    def actual_times(self) -> list[float]:
        return list(self._state["actual"])

    def state(self, t: float) -> dict:
        """The state dict saved for requested time ``t`` (CPU tensors)."""
        if float(t) not in self._state["time"]:
            raise KeyError(f"no snapshot at {t}; taken: {self._state['time']}")
        return self._state["weights"][self._state["time"].index(float(t))]

    def _take(self, model: nn.Module, t: float, actual: float) -> None:
        self._state["time"].append(t)
        self._state["actual"].append(actual)
        self._state["weights"].append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    def on_train_begin(self, model, history):
        if self.times[0] == 0 and 0.0 not in self._state["time"] and len(history) == 0:
            if self.bn_data is not None:
                from ntklab.bn import refresh_bn_statistics

                model = refresh_bn_statistics(model, self.bn_data, batch_size=self.bn_batch_size)
            self._take(model, 0.0, 0.0)

    def on_batch_end(self, epoch, batch, num_batches, model, history):
        now = epoch + (batch + 1) / num_batches
        for t in self.times:
            if t not in self._state["time"] and now >= t - 1e-9:
                self._take(model, t, now)

    def state_dict(self):
        return {"time": list(self._state["time"]), "actual": list(self._state["actual"]),
                "weights": list(self._state["weights"])}

    def load_state_dict(self, state) -> None:
        self._state = {k: list(state.get(k, [])) for k in ("time", "actual", "weights")}


class BestCheckpoint(Callback):
    """The weights of the epoch with the best held-out PGD accuracy: early stopping on robust
    accuracy (Rice, Wong & Kolter 2020, "Overfitting in adversarially robust deep learning": after
    the first learning-rate decay, the robust test accuracy of PGD-AT falls while its training
    accuracy rises, so the best checkpoint beats the last).

    It reads the evaluation the loop already made (``history.pgd_acc`` and ``history.clean_acc`` of
    the epoch, on the fixed subset of ``eval_set``) and draws no random numbers; epochs without an
    evaluation are skipped. An epoch replaces the best only when its PGD accuracy is strictly higher
    (ties keep the earlier epoch, as Rice et al.'s code does). :func:`ntklab.train.train` with
    ``keep_best=True`` (which evaluates after every epoch) adds one after the other callbacks unless
    one is passed; pass your own to keep the best weights at hand.

    After each evaluated epoch it sets ``history.best_epoch`` (0-based), ``history.best_pgd_acc``
    and ``history.best_clean_acc``. Attributes: ``best_epoch``, ``best_pgd_acc``,
    ``best_clean_acc`` (``None`` before the first evaluation) and ``best_state``, a state dict of
    CPU tensors (parameters and BN buffers, copied when the epoch won); :meth:`load_into` puts it
    into a model. ``state_dict()`` holds all of it, so the checkpoint of a run keeps the best
    weights and a resumed run goes on comparing with them. Used by the ``paper`` profiles (chapter 9).
    """

    def __init__(self):
        self._state = {"epoch": None, "pgd_acc": None, "clean_acc": None, "weights": None}

    @property
    def best_epoch(self) -> int | None:
        return self._state["epoch"]

    @property
    def best_pgd_acc(self) -> float | None:
        return self._state["pgd_acc"]

    @property
    def best_clean_acc(self) -> float | None:
        return self._state["clean_acc"]

    @property
    def best_state(self) -> dict | None:
        """The best epoch's ``state_dict`` (CPU tensors), or ``None`` before the first evaluation."""
        return self._state["weights"]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the best weights into ``model`` (of the trained architecture); returns it."""
        if self.best_state is None:
            raise ValueError("BestCheckpoint has no weights yet: no epoch was evaluated (keep_best needs an "
                             "eval_set and eval_every=1)")
        model.load_state_dict(self.best_state)
        return model

    def on_epoch_end(self, epoch, model, history):
        acc = history.pgd_acc[-1]
        if acc is None:
            return
        if self.best_pgd_acc is None or acc > self.best_pgd_acc:
            self._state = {"epoch": int(epoch), "pgd_acc": float(acc), "clean_acc": history.clean_acc[-1],
                           "weights": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        history.best_epoch, history.best_pgd_acc = self.best_epoch, self.best_pgd_acc
        history.best_clean_acc = self.best_clean_acc

    def state_dict(self):
        return dict(self._state)

    def load_state_dict(self, state) -> None:
        self._state = {k: state.get(k) for k in ("epoch", "pgd_acc", "clean_acc", "weights")}
