"""The book's experiments: one module per chapter, a registry, and shared helpers.

Each experiment is a function ``fn(profile, device, *, force=False, progress=True) -> dict`` that
computes its result under a :class:`ntklab.config.Profile` (or loads it from the result cache,
:mod:`ntklab.experiments.cache`) and registers itself with :func:`register`. The usual way to
write one is :func:`experiment`, which owns config -> cache -> checkpoint folder::

    @experiment(NAME, "one-line description (chapter N)", make_config)
    def run(ctx: RunContext) -> dict:      # ctx.profile, ctx.config, ctx.device, ctx.checkpoints, ...
        ...

Every module of this package (except ``cache`` and names starting with ``_``) is imported here, so
a chapter adds its experiment by adding a module, without editing this file.

    >>> import ntklab.experiments as ex
    >>> ex.list_experiments()              # {name: one-line description}
    >>> res = ex.run("strategies", profile="smoke", device="cpu")

Command line: ``python -m ntklab list`` and ``python -m ntklab run NAME --profile quick``.
Introduced in chapter 1; each chapter names the experiment it runs.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ntklab.config import Profile, get_device, get_profile
from ntklab.experiments import cache
from ntklab.experiments.cache import cached, checkpoint_dir, result_path, using_root

__all__ = ["EXPERIMENTS", "register", "experiment", "RunContext", "run", "list_experiments", "model_from_profile",
           "data_from_profile", "train_kwargs", "trained_model"]

EXPERIMENTS: dict[str, Callable] = {}


def register(name: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator: add ``fn`` to :data:`EXPERIMENTS` under ``name`` with a one-line ``description``.

    Records ``fn.module``, the module ``fn`` was defined in: the result cache keys the entries
    called ``name`` by the code of that module and of the ``ntklab`` modules it imports
    (:func:`ntklab.experiments.cache.code_digest`)."""

    def deco(fn: Callable) -> Callable:
        if name in EXPERIMENTS and EXPERIMENTS[name] is not fn:
            raise ValueError(f"experiment {name!r} is registered twice")
        fn.description = description.strip().splitlines()[0]
        fn.module = fn.__module__
        cache.bind(name, fn.module)
        EXPERIMENTS[name] = fn
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What an experiment's computation gets from :func:`experiment`: the experiment ``name``, the
    ``profile``, its ``config`` (the cache key's config, from the experiment's ``make_config``), the
    ``device``, ``force`` (recompute, also the shared entries the experiment asks for), ``progress``
    (show progress bars) and ``checkpoints``, the folder for the run's checkpoints beside its cache
    entry (an interrupted run resumes from it; deleted once the result is stored; not created)."""

    name: str
    profile: Profile
    config: dict
    device: torch.device
    force: bool
    progress: bool
    checkpoints: Path


def experiment(name: str, description: str, make_config: Callable[..., dict]) -> Callable[[Callable], Callable]:
    """Decorator: register ``compute(ctx: RunContext) -> dict`` as experiment ``name``, through
    the result cache.

    The registered function is ``run(profile, device=None, *, force=False, progress=True,
    **options)``: it takes a profile name or :class:`Profile`, builds ``config =
    make_config(profile, **options)`` (everything the result depends on), resolves the device,
    and returns ``cached(name, config, lambda: compute(ctx), force=force)`` with ``ctx`` a
    :class:`RunContext` whose ``checkpoints`` is the entry's :func:`checkpoint_dir`. The function
    keeps ``compute``'s name, docstring and module (the cache keys by that module's code) and
    offers ``run.compute`` and ``run.make_config``. Introduced in chapter 1.
    """

    def deco(compute: Callable[[RunContext], dict]) -> Callable:
        module = compute.__module__

        def run_experiment(profile, device=None, *, force: bool = False, progress: bool = True, **options) -> dict:
            profile = profile if isinstance(profile, Profile) else get_profile(profile)
            config = make_config(profile, **options)
            ctx = RunContext(name=name, profile=profile, config=config, device=get_device(device), force=force,
                             progress=progress, checkpoints=checkpoint_dir(name, config, module=module))
            return cached(name, config, lambda: compute(ctx), force=force, module=module)

        run_experiment.__module__, run_experiment.__name__ = module, compute.__name__
        run_experiment.__qualname__, run_experiment.__doc__ = compute.__qualname__, compute.__doc__
        run_experiment.compute, run_experiment.make_config = compute, make_config
        return register(name, description)(run_experiment)

    return deco


def list_experiments() -> dict[str, str]:
    """``{name: one-line description}`` of every registered experiment, sorted by name."""
    return {name: EXPERIMENTS[name].description for name in sorted(EXPERIMENTS)}


def run(name: str, profile: str | Profile | None = None, device=None, *, force: bool = False,
        out: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run (or load from the cache) experiment ``name`` under ``profile`` on ``device``.

    profile: a name (``smoke``, ``quick``, ``paper``), a :class:`Profile`, or ``None`` for
    ``$NTKLAB_PROFILE`` or ``quick``. device: see :func:`ntklab.config.get_device`.
    out: folder of the result cache for this run (default: see :mod:`ntklab.experiments.cache`).
    Raises ``ValueError`` for an unknown experiment, profile or device.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS)) or 'none'}")
    if not isinstance(profile, Profile):
        profile = get_profile(profile)
    device = get_device(device)
    if out is not None:
        cache.check_folder(out)
    with using_root(out):
        return EXPERIMENTS[name](profile, device, force=force, progress=progress)


def model_from_profile(profile: Profile) -> nn.Module:
    """The profile's model, built for its data set (channels, classes, image size, and the
    normalisation statistics inside the model). Seed before calling for a reproducible init."""
    from ntklab import data, models

    info = data.info(profile.dataset)
    kw = {"in_channels": info["channels"], "num_classes": info["num_classes"],
          "mean": info["mean"], "std": info["std"]}
    accepted = inspect.signature(models.MODELS[profile.model]).parameters if profile.model in models.MODELS else {}
    if "image_size" in accepted:
        kw["image_size"] = info["image_size"]
    if "in_features" in accepted:
        kw["in_features"] = info["channels"] * info["image_size"] ** 2
    kw.update(profile.model_kwargs)
    return models.build_model(profile.model, **kw)


def data_from_profile(profile: Profile):
    """``(train, test)`` TensorDatasets: class-balanced subsets of ``n_train`` and ``n_test``
    examples (``None``: all) of the profile's data set, drawn with the profile's seed."""
    from ntklab import data

    train = data.subset(data.load(profile.dataset, "train"), profile.n_train, seed=profile.seed)
    test = data.subset(data.load(profile.dataset, "test"), profile.n_test, seed=profile.seed)
    return train, test


def train_kwargs(profile: Profile, strategy: str) -> dict:
    """The fields of :meth:`ntklab.train.TrainConfig.from_profile` that are not ``None``, as keyword
    arguments of :func:`ntklab.train.train` (a thin wrapper kept for callers that build dicts)."""
    from ntklab.train import TrainConfig

    return {k: v for k, v in dataclasses.asdict(TrainConfig.from_profile(profile, strategy)).items()
            if v is not None}


MODELS_ENTRY = "models"


def trained_model(profile: Profile, strategy: str = "normal", *, device=None, force: bool = False,
                  progress: bool = True, which: str = "last", **overrides):
    """A model of ``profile``'s architecture trained with ``strategy``, through the result cache.

    The model is built with :func:`model_from_profile` after seeding with ``profile.seed`` and
    trained by :func:`ntklab.train.train` on ``data_from_profile(profile)`` with
    ``TrainConfig.from_profile(profile, strategy)`` updated by ``overrides`` (fields of
    :class:`ntklab.train.TrainConfig` whose value is JSON-serialisable: ``epochs=3``, ``eps=0.2``,
    ``switch_epoch=2``, ...; callbacks are not accepted, an experiment that needs them trains its
    own model). Its weights and history are
    cached under the name ``"models"``, keyed by the profile and the training config, so two
    chapters that ask for the same model share one run (and one checkpoint folder, so an
    interrupted run resumes).

    When the training config keeps the best checkpoint (``keep_best``: the profile's
    ``select_best``, Rice et al. 2020, unless ``overrides`` turn the per-epoch evaluation off), the
    run is evaluated after every epoch on the test subset of ``n_eval`` images, the entry also holds
    the best epoch's weights, and the history says which epoch won: ``history.best_epoch`` (0-based),
    ``history.best_pgd_acc`` (the best robust accuracy, the same PGD and subset as the last epoch's
    ``history.pgd_acc[-1]``) and ``history.best_clean_acc``. The entry's dict gains ``best_epoch``,
    ``best_robust_acc``, ``best_clean_acc`` and ``best_state_dict``.
    which: ``"last"`` (the default: the weights of the last epoch) or ``"best"`` (the best epoch's;
    ``ValueError`` when the run does not keep it).

    Returns ``(model, history)``: the model on ``device`` in eval mode, and its
    :class:`ntklab.train.History`. Raises ``ValueError`` for an unknown strategy or a keyword that
    is not a field of :class:`ntklab.train.TrainConfig`. Introduced in chapter 2.
    """
    from ntklab.callbacks import BestCheckpoint
    from ntklab.config import seed_everything
    from ntklab.train import History, TrainConfig, train

    train_config = TrainConfig.from_profile(profile, strategy, **overrides)
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    if which == "best" and not train_config.keep_best:
        raise ValueError("which='best' needs a run that keeps its best checkpoint (keep_best: the profile's "
                         "select_best, with an evaluation after every epoch)")
    config = {"profile": profile.to_dict(), "train": train_config.to_dict()}
    device = get_device(device)

    def compute():
        train_set, test_set = data_from_profile(profile)
        seed_everything(profile.seed)
        model = model_from_profile(profile)
        best = [BestCheckpoint()] if train_config.keep_best else []
        history = train(model, train_set, train_config, eval_set=test_set, device=device, callbacks=best,
                        checkpoint_dir=checkpoint_dir(MODELS_ENTRY, config), progress=progress)
        out = {"state_dict": model.state_dict(), "history": history.to_dict()}
        if best:
            out.update(best_epoch=history.best_epoch, best_robust_acc=history.best_pgd_acc,
                       best_clean_acc=history.best_clean_acc, best_state_dict=best[0].best_state)
        return out

    result = cached(MODELS_ENTRY, config, compute, force=force)
    model = model_from_profile(profile)
    model.load_state_dict(result["best_state_dict" if which == "best" else "state_dict"])
    return model.to(device).eval(), History.from_dict(result["history"])


def _import_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "cache" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
