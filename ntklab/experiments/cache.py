"""The result cache of the experiments: on disk, keyed by the experiment, its config and the version.

``cached(name, config, compute)`` returns ``compute()``'s result, computing it only when no valid
entry exists. An entry is ``<root>/<name>/<key>.pt`` (with a readable ``<key>.json`` beside it
holding the config), where ``key`` is a SHA-256 of the JSON of ``{"name", "config", "version"}``
with sorted keys, ``version`` being ``ntklab.__version__``: a new package version or any change of
the config gives a new entry. ``root`` is, in order: the ``root`` argument, the folder set by
:func:`using_root` (the command line's ``--out``), ``$NTKLAB_RESULTS``, or
``ntklab.data.cache_dir() / "results"``.

Results may hold tensors (stored on the CPU, detached), dicts, lists, tuples, strings, numbers,
bools and None; NumPy arrays and scalars are converted to tensors and Python numbers. Entries are
written atomically and read with ``torch.load(..., weights_only=True)``; an unreadable or partial
entry is recomputed with a warning. Introduced in chapter 1; every chapter loads its runs this way.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["cached", "result_path", "results_root", "using_root", "config_key", "track"]

_FORMAT = 1
_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ntklab_results_root", default=None)
_TRACKERS: list[list[tuple[Path, str]]] = []


def results_root(root: str | os.PathLike | None = None) -> Path:
    """The folder of the cache (see the module docstring for the order of precedence)."""
    if root is not None:
        return Path(root).expanduser()
    if _ROOT.get() is not None:
        return _ROOT.get()
    env = os.environ.get("NTKLAB_RESULTS")
    if env:
        return Path(env).expanduser()
    from ntklab.data import cache_dir

    return cache_dir() / "results"


@contextlib.contextmanager
def using_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Within the block, results go to ``root`` (``None``: no change)."""
    token = _ROOT.set(Path(root).expanduser() if root is not None else _ROOT.get())
    try:
        yield results_root()
    finally:
        _ROOT.reset(token)


@contextlib.contextmanager
def track() -> Iterator[list[tuple[Path, str]]]:
    """Collect ``(path, "loaded" or "computed")`` for every entry ``cached`` reads or writes within
    the block."""
    paths: list[tuple[Path, str]] = []
    _TRACKERS.append(paths)
    try:
        yield paths
    finally:
        _TRACKERS.remove(paths)


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # NumPy or 0-d tensor scalar
        return obj.item()
    raise TypeError(f"config values must be JSON-serialisable (numbers, strings, lists, dicts); "
                    f"got {type(obj).__name__}: {obj!r}")


def config_key(name: str, config: dict) -> str:
    """The stable 16-hex-digit key of (name, config, ``ntklab.__version__``)."""
    import ntklab

    text = json.dumps({"name": name, "config": config, "version": ntklab.__version__},
                      sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_path(name: str, config: dict, *, root: str | os.PathLike | None = None) -> Path:
    """Where the result of experiment ``name`` under ``config`` is (or would be) stored."""
    return results_root(root) / name / f"{config_key(name, config)}.pt"


def _storable(obj, where: str = "result"):
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` can read back."""
    if type(obj).__module__ == "numpy":  # before the numbers: np.float64 is a float
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(obj)) if isinstance(obj, np.ndarray) else obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _storable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_storable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__name__}; cached results may hold only tensors, dicts, "
                    f"lists, tuples, strings, numbers, bools and None")


def _load(path: Path, key: str):
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(entry, dict) or entry.get("format") != _FORMAT or entry.get("key") != key \
            or "result" not in entry:
        raise ValueError("not a result entry of this cache")
    return entry["result"]


def cached(name: str, config: dict, compute: Callable[[], Any], *, force: bool = False,
           root: str | os.PathLike | None = None):
    """``compute()``'s result for experiment ``name`` under ``config``, from the cache if there.

    ``force=True`` recomputes and overwrites. A corrupt or partial entry gives a ``UserWarning``
    and is recomputed. Returns the result as stored (tensors on the CPU).
    """
    import ntklab
    from ntklab.data import atomic_save

    key = config_key(name, config)
    path = results_root(root) / name / f"{key}.pt"
    if path.exists() and not force:
        try:
            result = _load(path, key)
            _note(path, "loaded")
            return result
        except Exception as err:  # truncated, garbage, or another format: recompute, never crash
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"cached result {path} is unreadable ({type(err).__name__}: {reason}); "
                          f"recomputing it", stacklevel=2)
    result = _storable(compute())
    atomic_save({"format": _FORMAT, "key": key, "name": name, "version": ntklab.__version__,
                  "result": result}, path)
    sidecar = {"name": name, "version": ntklab.__version__, "key": key, "config": config}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar, sort_keys=True, indent=1, default=_json_default))
    os.replace(tmp, path.with_suffix(".json"))
    _note(path, "computed")
    return result


def _note(path: Path, how: str) -> None:
    for paths in _TRACKERS:
        paths.append((path, how))
