"""The result cache of the experiments: on disk, keyed by the experiment, its config and the code.

``cached(name, config, compute)`` returns ``compute()``'s result, computing it only when no valid
entry exists. An entry is ``<root>/<name>/<key>.pt`` (with a readable ``<key>.json`` beside it
holding the config, and a ``<key>.checkpoints`` folder for runs that checkpoint), where ``key`` is
a SHA-256 of the JSON of ``{"name", "config", "version", "source"}`` with sorted keys: ``version``
is ``ntklab.__version__`` and ``source`` is :func:`source_digest`, a digest of every ``.py`` file
of the installed ``ntklab`` package. Any change of the config or of any line of the package gives
a new entry, so a result is never reused by code other than the code that made it (the package
version does not change with every commit). ``root`` is, in order: the ``root`` argument, the
folder set by :func:`using_root` (the command line's ``--out``), ``$NTKLAB_RESULTS``, or
``ntklab.data.cache_dir() / "results"``. :func:`entries` lists a cache and :func:`clear` empties
it (``python -m ntklab cache``).

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
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["cached", "result_path", "checkpoint_dir", "results_root", "using_root", "config_key", "track", "source_digest",
           "Entry", "entries", "clear"]

_FORMAT = 1
_SOURCE: str | None = None
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


def source_digest() -> str:
    """A 16-hex-digit SHA-256 of the package's source: the relative path and the bytes of every
    ``.py`` file under the ``ntklab`` package folder, in sorted order. Computed once per process,
    so it describes the code this process loaded."""
    global _SOURCE
    if _SOURCE is None:
        import ntklab

        package = Path(ntklab.__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(package).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
        _SOURCE = h.hexdigest()[:16]
    return _SOURCE


def config_key(name: str, config: dict) -> str:
    """The stable 16-hex-digit key of (name, config, ``ntklab.__version__``, :func:`source_digest`)."""
    import ntklab

    text = json.dumps({"name": name, "config": config, "version": ntklab.__version__,
                       "source": source_digest()}, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_path(name: str, config: dict, *, root: str | os.PathLike | None = None) -> Path:
    """Where the result of experiment ``name`` under ``config`` is (or would be) stored."""
    return results_root(root) / name / f"{config_key(name, config)}.pt"


def checkpoint_dir(name: str, config: dict, *, root: str | os.PathLike | None = None) -> Path:
    """The folder for the checkpoints of the run that computes this entry (beside the result), so
    that an interrupted run resumes. :func:`cached` deletes it once the result is stored."""
    return result_path(name, config, root=root).with_suffix(".checkpoints")


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
    and is recomputed. Once the result is stored, the entry's :func:`checkpoint_dir` (the
    checkpoints that let an interrupted computation resume) is deleted: a result needs none, and
    ``force=True`` then really recomputes. Returns the result as stored (tensors on the CPU).
    """
    import ntklab
    from ntklab.data import atomic_save, atomic_write_text, describe_load_error

    key = config_key(name, config)
    path = results_root(root) / name / f"{key}.pt"
    with _exclusive(path):
        if path.exists() and not force:
            try:
                result = _load(path, key)
                _note(path, "loaded")
                return result
            except Exception as err:  # truncated, garbage, or another format: recompute, never crash
                warnings.warn(f"cached result {path} is unreadable ({describe_load_error(err)}); recomputing it",
                              stacklevel=3)
        result = _storable(compute())
        atomic_save({"format": _FORMAT, "key": key, "name": name, "version": ntklab.__version__,
                     "source": source_digest(), "result": result}, path)
        sidecar = {"name": name, "version": ntklab.__version__, "source": source_digest(), "key": key,
                   "config": config}
        atomic_write_text(json.dumps(sidecar, sort_keys=True, indent=1, default=_json_default),
                          path.with_suffix(".json"))
        shutil.rmtree(path.with_suffix(".checkpoints"), ignore_errors=True)
        _note(path, "computed")
        return result


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the entry (a POSIX advisory lock on ``<key>.lock``): while one
    process computes an entry, another that asks for the same entry (a second notebook, a parallel
    test) waits and then loads it instead of computing it again. Different entries do not wait
    for each other. Where ``fcntl`` is missing (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _note(path: Path, how: str) -> None:
    for paths in _TRACKERS:
        paths.append((path, how))


# ------------------------------------------------------------------ listing and clearing
@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the cache: ``path`` (the ``.pt`` file), experiment ``name``, ``key``, total
    ``size`` in bytes (result, sidecar and checkpoints), ``modified`` (POSIX time of the result,
    or of the checkpoints of an unfinished run), the ``version``, ``source`` digest and ``profile``
    name recorded in the sidecar (``None`` if unreadable), ``finished`` (the result exists; False
    for a run that has only checkpoints so far) and ``current`` (made by this code: its source
    digest is :func:`source_digest`)."""

    path: Path
    name: str
    key: str
    size: int
    modified: float
    version: str | None
    source: str | None
    profile: str | None
    finished: bool

    @property
    def current(self) -> bool:
        return self.source == source_digest()

    def files(self) -> list[Path]:
        """The result, its sidecar, its checkpoint folder and its lock file, those that exist."""
        return [p for p in (self.path, self.path.with_suffix(".json"), self.path.with_suffix(".checkpoints"),
                            self.path.with_suffix(".lock")) if p.exists()]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def entries(root: str | os.PathLike | None = None) -> list[Entry]:
    """Every entry under the cache folder (see :func:`results_root`), sorted by name and time."""
    folder = results_root(root)
    found = []
    if not folder.is_dir():
        return found
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        keys = {p.name.split(".")[0] for p in sub.iterdir()
                if p.suffix in (".pt", ".json", ".checkpoints") and not p.name.startswith(".")}
        for key in sorted(keys):
            path = sub / f"{key}.pt"
            meta = {}
            try:
                meta = json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                pass
            profile = meta.get("config", {}).get("profile") if isinstance(meta.get("config"), dict) else None
            entry = Entry(path=path, name=sub.name, key=key, size=0, modified=0.0,
                          version=meta.get("version"), source=meta.get("source"),
                          profile=profile.get("name") if isinstance(profile, dict) else None,
                          finished=path.exists())
            files = entry.files()
            found.append(dataclasses.replace(entry, size=sum(_size(p) for p in files),
                                             modified=max(p.stat().st_mtime for p in files)))
    return sorted(found, key=lambda e: (e.name, e.modified))


def clear(root: str | os.PathLike | None = None, *, names=None, stale_only: bool = False) -> list[Entry]:
    """Delete entries (result, sidecar, checkpoints) and return them.

    names: experiment names to clear (``None``: all); stale_only: only entries made by other code
    than this (a source digest other than :func:`source_digest`, or none recorded).
    """
    removed = []
    for entry in entries(root):
        if (names is not None and entry.name not in names) or (stale_only and entry.current):
            continue
        for path in entry.files():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        removed.append(entry)
    for sub in {e.path.parent for e in removed}:
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return removed
