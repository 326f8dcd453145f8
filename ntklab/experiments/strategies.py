"""Experiment ``strategies``: normal training and adversarial training side by side (chapter 4).

Under a profile, one model per strategy (default normal, FGSM and PGD training; Goodfellow et al.
2015, Madry et al. 2018), all from the same initialisation and the same shuffling, trained with
:func:`ntklab.train.train`. During training, :class:`ntklab.callbacks.KernelSnapshots` records the
trace C-NTK and AE-NTK (Li et al., arXiv 2312.02236) of ``n_probe`` class-balanced training images
at a few epochs; afterwards each model is evaluated on the profile's test subset: clean accuracy
and robust accuracy, per example the worst of FGSM and PGD-``eval_pgd_steps``.

The result (a dict, cached by config and the package's source):

* ``strategies``: the names, in order; ``config``: what the run depended on;
* ``histories[s]``: :meth:`ntklab.train.History.to_dict` of each run;
* ``clean_acc[s]``, ``robust_acc[s]`` in [0, 1]; ``training_time[s]``: seconds of attack + update;
* ``kernels[s]``: ``{"epochs": [t...], "clean": (T, n, n), "ae": (T, n, n), "probe_clean_acc",
  "probe_ae_acc"}`` (float32 CPU tensors; epoch 0 is the initialisation);
* ``probe_y``: (n,) labels of the probe images.

Checkpoints go next to the cache entry while it is computed, so an interrupted paper-scale run resumes.
"""
from __future__ import annotations

from ntklab.experiments import (cached, checkpoint_dir, data_from_profile, model_from_profile, register,
                                train_kwargs)

__all__ = ["run", "make_config", "DEFAULT_STRATEGIES", "NAME"]

NAME = "strategies"
DEFAULT_STRATEGIES = ("normal", "fgsm", "pgd")


def snapshot_epochs(epochs: int) -> list[int]:
    """A few snapshot times: initialisation, after the first epoch, half-way and at the end."""
    return sorted({0, min(1, epochs), epochs // 2, epochs})


def make_config(profile, strategies=DEFAULT_STRATEGIES) -> dict:
    """Everything the result depends on (the cache key)."""
    return {"profile": profile.to_dict(), "strategies": list(strategies),
            "snapshot_epochs": snapshot_epochs(profile.epochs), "kernel": "trace", "ae": True}


@register(NAME, "normal, FGSM and PGD training side by side: histories, accuracies, "
                "training times and trace C-NTK/AE-NTK snapshots (chapter 4)")
def run(profile, device=None, *, force: bool = False, progress: bool = True,
        strategies=DEFAULT_STRATEGIES) -> dict:
    """Train one model per strategy under ``profile`` (see the module docstring for the result)."""
    from ntklab.config import get_device

    config = make_config(profile, strategies)
    checkpoints = checkpoint_dir(NAME, config)
    return cached(NAME, config, lambda: _compute(profile, config, get_device(device), progress, checkpoints),
                  force=force)


def _compute(profile, config, device, progress, checkpoints) -> dict:
    import torch

    from ntklab import data, evaluate
    from ntklab.callbacks import KernelSnapshots
    from ntklab.config import seed_everything
    from ntklab.train import train

    train_set, test_set = data_from_profile(profile)
    probe_x, probe_y = data.subset(train_set, profile.n_probe, seed=profile.seed + 1).tensors
    out = {"strategies": list(config["strategies"]), "config": config, "histories": {},
           "clean_acc": {}, "robust_acc": {}, "training_time": {}, "kernels": {}, "probe_y": probe_y}
    for strategy in config["strategies"]:
        seed_everything(profile.seed)  # the same initialisation for every strategy
        model = model_from_profile(profile)
        snaps = KernelSnapshots(probe_x, probe_y, config["snapshot_epochs"], kind=config["kernel"],
                                ae=config["ae"], eps=profile.eps, alpha=profile.pgd_alpha,
                                steps=profile.eval_pgd_steps)
        history = train(model, train_set, **train_kwargs(profile, strategy), callbacks=[snaps],
                        eval_set=test_set, device=device, checkpoint_dir=checkpoints / strategy,
                        progress=progress)
        torch.manual_seed(profile.seed)
        out["clean_acc"][strategy] = float(evaluate.clean_accuracy(model, test_set, device=device))
        out["robust_acc"][strategy] = float(evaluate.worst_case_accuracy(
            model, test_set, eps=profile.eps, alpha=profile.pgd_alpha, steps=profile.eval_pgd_steps,
            device=device))
        out["histories"][strategy] = history.to_dict()
        out["training_time"][strategy] = history.training_time
        out["kernels"][strategy] = {"epochs": snaps.snapshot_epochs, "clean": snaps.kernels("clean"),
                                    "ae": snaps.kernels("ae"), "probe_clean_acc": snaps.probe_clean_acc,
                                    "probe_ae_acc": snaps.probe_ae_acc}
    return out
