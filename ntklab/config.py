"""Profiles, device choice and seeding.

The profiles fix the scale of every experiment in the book (see ``shared/DESIGN.md``):

* ``smoke``: unit tests of the experiment code, seconds, a few hundred embedded images, a tiny CNN;
* ``quick`` (the default): building the book on a 2-core CPU, the embedded MNIST-5k and the small CNN;
* ``paper``: GPU runs at the scale of Li et al. (arXiv 2312.02236): CIFAR-10, a PreAct ResNet-18, SGD
  with lr 0.1, momentum 0.9 and weight decay 5e-4, batch 128, 200 epochs with step decays at 100 and
  150, eps 8/255, PGD-10 with step 2/255 for training and PGD-20 for evaluation, random crop (padding 4)
  and horizontal flip, and the best as well as the last checkpoint reported. Only eps 8/255 and the
  decays at epochs 100 and 150 are attested for Li et al. (by the public reviews of its ICLR 2024
  version); everything else is the literature's common setting (Madry et al. 2018, Rice et al. 2020,
  Wong et al. 2020), chosen by the book. :data:`SOURCES` says, field by field, where each value comes from;
* ``paper_cifar100`` and ``paper_svhn``: ``paper`` on CIFAR-100 and on SVHN (SVHN with the smaller
  lr 0.01 usual for it in the literature, and without augmentation);
* ``paper_cpu``: the paper-shaped dry run, the structure of ``paper`` (the same code paths: PreAct
  ResNet-18, two learning-rate decays, eps 8/255, PGD training, crop and flip, best and last
  checkpoints) at a tiny size on the generated, SYNTHETIC ``synthetic_cifar10`` (3 x 32 x 32, see
  :mod:`ntklab.data`), so that every chapter runs end to end on one CPU core in minutes. Its numbers
  say nothing about any paper; the chapters assert no claim under it.

The active profile is chosen by argument, else by the environment variable ``NTKLAB_PROFILE``,
else ``quick``; ``NTKLAB_SEED`` (a non-negative integer) replaces its seed, so that a chapter can be
re-run under another seed without editing it (``NTKLAB_SEED=1 jupyter-book build .``). Introduced in
the book's chapter 1 (Primer).
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

# Data augmentations a profile can ask for ("crop_flip": a random crop of the image padded by 4 zero
# pixels and a random horizontal flip, per batch; Rice et al. 2020, Wong et al. 2020's code).
from ntklab.augment import AUGMENTATIONS

__all__ = ["Profile", "PROFILES", "SOURCES", "AUGMENTATIONS", "get_profile", "get_device", "seed_everything",
           "DEFAULT_PROFILE"]

DEFAULT_PROFILE = "quick"
PROFILE_ENV = "NTKLAB_PROFILE"
DEVICE_ENV = "NTKLAB_DEVICE"
SEED_ENV = "NTKLAB_SEED"
MAX_SEED = 2**63 - 1
# Fields added after results were first cached: left out of to_dict at their defaults, so the cache
# keys of the profiles that do not use them (smoke, quick) stay what they were.
_NEW_FIELDS = {"augment": None, "select_best": False}


@dataclass(frozen=True)
class Profile:
    """The scale of an experiment: data, model, optimisation, attack and kernel-probe sizes.

    All epsilons are L-inf radii in pixel space, for images in [0, 1].
    ``n_train``/``n_test`` of ``None`` mean the whole split. ``lr_milestones`` are the epochs at
    which the learning rate is multiplied by ``lr_gamma`` (a multistep schedule, as in the
    200-epoch CIFAR-10 schedule with decays at 100 and 150 of Li et al.). ``augment``: ``None`` or
    ``"crop_flip"`` (see :data:`AUGMENTATIONS`); ``select_best``: evaluate held-out PGD accuracy after
    every epoch and report the best as well as the last checkpoint (Rice et al. 2020).
    """

    name: str
    dataset: str
    model: str
    model_kwargs: dict = field(default_factory=dict)
    n_train: int | None = None
    n_test: int | None = None
    batch_size: int = 128
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple = ()
    lr_gamma: float = 0.1
    eps: float = 0.3
    pgd_alpha: float = 0.075
    pgd_steps: int = 5
    eval_pgd_steps: int = 10
    n_eval: int = 500
    n_probe: int = 100
    seed: int = 0
    augment: str | None = None
    select_best: bool = False

    def __post_init__(self):
        """Every field checked when a profile is built or replaced (``ValueError`` naming the field)."""
        from ntklab import _checks
        from ntklab.data import DATASETS
        from ntklab.models import MODELS

        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid data sets are: {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid models are: {', '.join(MODELS)}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")
        for name in ("n_train", "n_test"):
            _checks.count(name, getattr(self, name), allow_none=True)
        for name in ("batch_size", "pgd_steps", "eval_pgd_steps", "n_eval", "n_probe"):
            _checks.count(name, getattr(self, name))
        _checks.count("epochs", self.epochs, minimum=0)
        _checks.number("lr", self.lr, positive=True)
        _checks.number("lr_gamma", self.lr_gamma, positive=True)
        for name in ("momentum", "weight_decay"):
            _checks.number(name, getattr(self, name))
        _checks.radius("eps", self.eps)
        _checks.radius("pgd_alpha", self.pgd_alpha, positive=True)
        if isinstance(self.lr_milestones, (str, bytes)) or not hasattr(self.lr_milestones, "__iter__"):
            raise ValueError(f"lr_milestones must be a sequence of epochs, got {self.lr_milestones!r}")
        for m in self.lr_milestones:
            _checks.count("lr_milestones", m, minimum=0)
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        if not 0 <= _checks.count("seed", self.seed, minimum=0) <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.augment is not None and (not isinstance(self.augment, str) or self.augment not in AUGMENTATIONS):
            raise ValueError(f"augment must be None or one of {', '.join(map(repr, AUGMENTATIONS))}, "
                             f"got {self.augment!r}")
        if self.select_best not in (True, False) or not isinstance(self.select_best, (bool, np.bool_)):
            raise ValueError(f"select_best must be True or False, got {self.select_best!r}")
        object.__setattr__(self, "select_best", bool(self.select_best))

    def replace(self, **changes) -> "Profile":
        """A copy with some fields changed, e.g. ``get_profile().replace(epochs=3)``; an unknown field
        or a bad value is a ``ValueError`` naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Profile has no field {unknown[0]!r}; its fields are: "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict form (for hashing configs and saving results). ``augment`` and ``select_best``
        are left out while at their defaults (``None``, ``False``), so that the cache keys of profiles
        that do not use them are those from before the fields existed; ``Profile(**d)`` rebuilds the
        profile either way."""
        d = dataclasses.asdict(self)
        for name, default in _NEW_FIELDS.items():
            if d[name] == default and type(d[name]) is type(default):
                del d[name]
        return d


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", dataset="mnist5k", model="small_cnn", model_kwargs={"width": 4},
        n_train=256, n_test=128, batch_size=64, epochs=2, lr=0.05, lr_milestones=(),
        eps=0.3, pgd_alpha=0.1, pgd_steps=2, eval_pgd_steps=3, n_eval=64, n_probe=16,
    ),
    "quick": Profile(
        name="quick", dataset="mnist5k", model="small_cnn", model_kwargs={"width": 32},
        n_train=None, n_test=None, batch_size=128, epochs=10, lr=0.05, lr_milestones=(8,),
        eps=0.3, pgd_alpha=0.075, pgd_steps=5, eval_pgd_steps=10, n_eval=500, n_probe=100,
    ),
    "paper": Profile(
        name="paper", dataset="cifar10", model="preact_resnet18", model_kwargs={},
        n_train=None, n_test=None, batch_size=128, epochs=200, lr=0.1, lr_milestones=(100, 150),
        eps=8 / 255, pgd_alpha=2 / 255, pgd_steps=10, eval_pgd_steps=20, n_eval=1000, n_probe=500,
        augment="crop_flip", select_best=True,
    ),
}
PROFILES["paper_cifar100"] = PROFILES["paper"].replace(name="paper_cifar100", dataset="cifar100")
PROFILES["paper_svhn"] = PROFILES["paper"].replace(name="paper_svhn", dataset="svhn", lr=0.01, augment=None)
PROFILES["paper_cpu"] = PROFILES["paper"].replace(
    name="paper_cpu", dataset="synthetic_cifar10", model_kwargs={"width": 4},
    n_train=200, n_test=100, batch_size=50, epochs=4, lr_milestones=(2, 3),
    pgd_alpha=4 / 255, pgd_steps=2, eval_pgd_steps=3, n_eval=40, n_probe=16,
)

_LIT = "the literature's common setting (Rice et al. 2020; Madry et al. 2018), the book's choice"
_PAPER_SOURCES = {
    "dataset": "CIFAR-10: the book's choice (Li et al.'s data sets are not recovered; reviewer 1 discusses "
               "8/255 on CIFAR-10)",
    "model": "PreAct ResNet-18 (He et al. 2016), as in Rice et al. 2020: the book's choice (Li et al.'s "
             "architecture is not recovered)",
    "model_kwargs": "standard PreAct ResNet-18 widths 64-128-256-512 (He et al. 2016)",
    "n_train": "the whole training split", "n_test": "the whole test split",
    "batch_size": f"128: {_LIT}",
    "epochs": "200: Rice et al. 2020; the book's inference from Li et al.'s decays at 100 and 150",
    "lr": f"0.1: {_LIT}",
    "momentum": f"0.9: {_LIT}",
    "weight_decay": f"5e-4: {_LIT}",
    "lr_milestones": "epochs 100 and 150: Li et al. 2023 (attested by the reviews of its ICLR 2024 version); "
                     "also Rice et al. 2020",
    "lr_gamma": f"0.1 (Li et al.'s factor is not recovered): {_LIT}",
    "eps": "8/255 (L-inf): Li et al. 2023 (reviews); Madry et al. 2018, Rice et al. 2020",
    "pgd_alpha": "2/255: Rice et al. 2020 (Li et al.'s training attack is not recovered), the book's choice",
    "pgd_steps": "PGD-10 for training: Rice et al. 2020 (Madry et al. 2018 used 7), the book's choice",
    "eval_pgd_steps": "PGD-20 for evaluation: Wong et al. 2020, the book's choice (AutoAttack, Croce & Hein "
                      "2020, where a chapter evaluates with it)",
    "n_eval": "1,000 test images for the attacks: the book's choice (budget)",
    "n_probe": "500 probe images for the kernels: the book's choice (as many as Loo et al. 2022's code uses; "
               "Li et al.'s probe is not recovered)",
    "seed": "0: the book's choice",
    "augment": "random crop (padding 4) and horizontal flip: Rice et al. 2020 and Wong et al. 2020's code, "
               "the book's choice",
    "select_best": "the best (by held-out PGD accuracy) and the last checkpoint: Rice et al. 2020",
}
# SOURCES[profile][field]: where each setting of the paper-scale profiles comes from.
SOURCES: dict[str, dict[str, str]] = {
    "paper": dict(_PAPER_SOURCES),
    "paper_cifar100": {**_PAPER_SOURCES,
                       "dataset": "CIFAR-100: the book's choice (the usual second benchmark, Rice et al. 2020)",
                       "model_kwargs": "standard PreAct ResNet-18 widths (He et al. 2016); 100 outputs, from "
                                       "the data set"},
    "paper_svhn": {**_PAPER_SOURCES,
                   "dataset": "SVHN (Netzer et al. 2011): the book's choice (Rice et al. 2020 also use it)",
                   "lr": "0.01: the smaller learning rate usual for SVHN in the literature (e.g. Rice et al. "
                         "2020); 0.1 often diverges there; the book's choice",
                   "augment": "none: the book's choice (a horizontal flip changes a digit; SVHN adversarial "
                              "training usually runs without augmentation)"},
    "paper_cpu": {**{k: "as paper (same code path)" for k in _PAPER_SOURCES},
                  "dataset": "synthetic_cifar10: SYNTHETIC CIFAR-shaped data, the book's choice (a dry run "
                             "offline on the CPU)",
                  "model_kwargs": "width 4 (4-8-16-32 channels): the book's choice (CPU cost)",
                  "n_train": "200: the book's choice (CPU cost)", "n_test": "100: the book's choice (CPU cost)",
                  "batch_size": "50: the book's choice (CPU cost)",
                  "epochs": "4: the book's choice (CPU cost)",
                  "lr_milestones": "epochs 2 and 3: two decays as in paper, the book's choice",
                  "pgd_alpha": "4/255 (eps/2, so that two steps reach the boundary): the book's choice",
                  "pgd_steps": "PGD-2: the book's choice (CPU cost)",
                  "eval_pgd_steps": "PGD-3: the book's choice (CPU cost)",
                  "n_eval": "40: the book's choice (CPU cost)", "n_probe": "16: the book's choice (CPU cost)"},
}


def get_profile(name: str | None = None) -> Profile:
    """Return the profile ``name``, else ``$NTKLAB_PROFILE``, else ``"quick"``; with its seed
    replaced by ``$NTKLAB_SEED`` when that is set.

    Raises ``ValueError`` naming the valid profiles when the name is unknown, and for a
    ``$NTKLAB_SEED`` that is not an integer in [0, 2**63).
    """
    if name is None:
        name = os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
        source = f" (from ${PROFILE_ENV})" if os.environ.get(PROFILE_ENV) else ""
    else:
        source = ""
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}{source}; valid profiles are: {', '.join(PROFILES)}"
        )
    seed = os.environ.get(SEED_ENV, "").strip()
    if seed:
        if not seed.isdigit() or int(seed) > MAX_SEED:
            raise ValueError(f"${SEED_ENV} must be an integer in [0, 2**63), got {seed!r}")
        return PROFILES[key].replace(seed=int(seed))
    return PROFILES[key]


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else ``$NTKLAB_DEVICE``, else ``cuda`` when
    available and ``cpu`` otherwise. ``"auto"`` means the automatic choice.

    The book runs on ``"cpu"`` and ``"cuda"`` / ``"cuda:N"`` only (other PyTorch devices such as
    ``mps`` or ``meta`` are not supported by its code and are refused). Raises ``ValueError`` for an
    unknown or unsupported name, for CUDA when it is not available, and for ``cuda:N`` beyond the
    devices present.
    """
    if device is None:
        device = os.environ.get(DEVICE_ENV) or "auto"
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: ntklab runs on 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but CUDA is not available here; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and all CUDA devices) random number generators."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))
