"""The result cache of the experiments: on disk, keyed by the experiment, its config and the code it runs.

``cached(name, config, compute)`` returns ``compute()``'s result, computing it only when no valid
entry exists. An entry is ``<root>/<name>/<key>.pt`` (with a readable ``<key>.json`` beside it
holding the config, and a ``<key>.checkpoints`` folder for runs that checkpoint), where ``key`` is
a SHA-256 of the JSON of ``{"name", "config", "version", "source", "experiment_version"}`` with
sorted keys: ``version`` is ``ntklab.__version__``, ``source`` is :func:`code_digest` of the module
that computes the entry, and ``experiment_version`` that module's ``VERSION`` constant (1 if it has
none). The code digest covers the module and every ``ntklab`` module it imports, transitively (at
the top or inside functions), each as its syntax tree without docstrings (comments are not part of
a syntax tree). So a change of the config or of a line of code the experiment runs gives a new
entry, while an edited docstring or comment, or an edit of a module the experiment does not import
(``plots.py``, another chapter), keeps it; bump ``VERSION`` to recompute for a reason the code does
not show (new data, a fixed dependency). The module is the ``module=`` argument if given, else
the one the experiment ``name`` was registered from (:func:`ntklab.experiments.register` tells
:func:`bind`), else the one that defines ``compute`` (for :func:`cached`) or that calls (for
:func:`result_path`, :func:`checkpoint_dir`, :func:`config_key`): for the entries that chapters
share, such as ``models`` and ``kernel_runs``, the module of the function that computes them.

``root`` is, in order: the ``root`` argument, the folder set by :func:`using_root` (the command
line's ``--out``), ``$NTKLAB_RESULTS``, or ``ntklab.data.cache_dir() / "results"``.
:func:`entries` lists a cache and :func:`clear` empties it (``python -m ntklab cache``).

Results may hold tensors (stored on the CPU, detached), dicts, lists, tuples, strings, numbers,
bools and None; NumPy arrays and scalars are converted to tensors and Python numbers; a result with
a non-finite float (NaN, inf) is refused before it is stored. Entries are written atomically and
read with ``torch.load(..., weights_only=True)``; an unreadable or partial entry is recomputed with
a warning.

Nothing is lost when a write is interrupted: the sidecar is written first and the result file
carries its own metadata (config included), so a result is never without what identifies it; a
sidecar that is missing or damaged is rebuilt from the result when it is next read, and the
listing falls back to the result's own metadata. An entry is ``current`` when this code would read
it (same package version, code digest and ``VERSION``); ``clear(stale_only=True)`` never deletes
one. A finished result's leftover checkpoints are removed when it is next read.

A results folder the user cannot write (a read-only mount, an archive) is readable: finished
entries load without a lock; only computing a missing entry needs write access, and then the error
says so. While another process computes an entry, a second one that asks for it waits and says so
(which process, since when); a lock held by a stopped process is reported instead of waited on,
and ``$NTKLAB_LOCK_TIMEOUT`` (seconds) bounds the wait. Introduced in chapter 1; every chapter loads
its runs this way.

Under ``torchrun`` with several processes (:mod:`ntklab.distributed`) every rank runs the same
experiment code (each must, to take part in the training), but rank 0 alone decides whether an
entry is loaded or computed (and every rank follows, so no rank computes while another loads), and
rank 0 alone takes the lock and writes the sidecar, the result and the checkpoints (the training
loop's); the others wait for the write and then read the stored result, so that every rank returns
rank 0's result and the experiment's next steps agree. A shared file system is assumed (one machine).
An error in ``compute`` must happen on every rank (the same code on the same data does); an error of
rank 0's writing or checking is raised on every rank. One process behaves as described above.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["cached", "result_path", "checkpoint_dir", "results_root", "check_folder", "using_root", "config_key", "track",
           "code_digest", "code_modules", "code_version", "bind", "Entry", "entries", "clear"]

_FORMAT = 1
_DIGESTS: dict[str, str] = {}          # module -> code digest, once per process (the code it loaded)
_BOUND: dict[str, str] = {}            # entry name -> module that computes it (filled by the registry)
_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ntklab_results_root", default=None)
_TRACKERS: list[list[tuple[Path, str]]] = []


def _folder(value, name: str) -> Path:
    """A folder argument as a path: an empty string is refused (it would mean the current folder),
    and a ``~user`` that cannot be expanded is a ``ValueError`` naming ``name``, not a RuntimeError."""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path, got {type(value).__name__}")
    text = os.fspath(value)
    if not str(text).strip():
        raise ValueError(f"{name} is empty: give a folder (an empty path would mean the current folder)")
    try:
        return Path(text).expanduser()
    except RuntimeError as err:  # "~nobody/..." with no such user, or no home directory
        raise ValueError(f"{name} {text!r} cannot be expanded ({err})") from None


def results_root(root: str | os.PathLike | None = None) -> Path:
    """The folder of the cache (see the module docstring for the order of precedence)."""
    if root is not None:
        return _folder(root, "out")
    if _ROOT.get() is not None:
        return _ROOT.get()
    env = os.environ.get("NTKLAB_RESULTS")
    if env is not None and env != "":
        return _folder(env, "$NTKLAB_RESULTS")
    from ntklab.data import cache_dir

    return cache_dir() / "results"


def check_folder(out: str | os.PathLike | None, *, name: str = "out") -> Path:
    """The results folder ``out`` (``None``: :func:`results_root`), checked before any work: not a
    file, and, when it must hold new entries, creatable and writable. A folder that exists but
    cannot be written is accepted (its finished entries load; computing a missing one says so).
    Raises ``ValueError`` naming ``name``. The command line's ``--out`` and
    :func:`ntklab.experiments.run`'s ``out`` go through it. Under several processes rank 0 checks
    (and creates) and every rank gets its answer."""
    from ntklab import distributed

    return distributed.main_only(_check_folder, out, name)


def _check_folder(out, name: str) -> Path:
    import tempfile

    folder = _folder(out, name) if out is not None else results_root()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name} {folder} is a file, not a folder")
    if folder.is_dir():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{name} {folder} cannot be created or written ({err.strerror or type(err).__name__})") from None
    return folder


@contextlib.contextmanager
def using_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Within the block, results go to ``root`` (``None``: no change)."""
    token = _ROOT.set(_folder(root, "out") if root is not None else _ROOT.get())
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


# ------------------------------------------------------------------ the code an entry depends on
def _package_dir() -> Path:
    import ntklab

    return Path(ntklab.__file__).resolve().parent


def _module_file(module: str, package: Path) -> Path | None:
    """The source file of ``ntklab`` module ``module`` in the package folder ``package``, or None."""
    parts = module.split(".")
    if parts[0] != "ntklab":
        return None
    base = package.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(tree: ast.Module, module: str, is_package: bool, package: Path) -> set[str]:
    """The ``ntklab`` modules that the code of ``tree`` (module ``module``) imports: ``import``
    and ``from ... import`` statements anywhere (top level, functions, classes), relative ones
    resolved, the parent packages of each (Python runs them first), and ``ntklab.x.y`` attribute
    chains on a name bound to an ``ntklab`` module (``import ntklab`` then ``ntklab.plots.f()``)."""
    found: set[str] = set()
    bound: dict[str, str] = {}             # local name -> ntklab module it is bound to

    def add(name: str) -> bool:
        if _module_file(name, package) is None:
            return False
        found.update(p for p in _parents(name) if _module_file(p, package) is not None)
        return True

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if add(alias.name):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "ntklab"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            if not add(base):
                continue
            for alias in node.names:
                if add(f"{base}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [], node
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                current = bound[value.id]
                for attr in reversed(chain):
                    if not add(f"{current}.{attr}"):
                        break
                    current = f"{current}.{attr}"
    return found


class _StripDocstrings(ast.NodeTransformer):
    """Drops every statement that is only a string (docstrings of modules, classes and functions,
    and strings used as comments): they do not change what the code computes."""

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)


def _tree(path: Path) -> ast.Module:
    return _StripDocstrings().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))


def code_modules(module: str, *, package: str | os.PathLike | None = None) -> list[str]:
    """The sorted names of the ``ntklab`` modules whose code ``module`` runs: itself (if it is an
    ``ntklab`` module) and every ``ntklab`` module it imports, transitively (see :func:`code_digest`).

    package: the folder of the ``ntklab`` package to read (default: the one imported). For a
    module outside ``ntklab`` (a test file, a script, a notebook's ``__main__``, whose imports
    cannot always be read) every module of the package counts, as a conservative choice."""
    package = Path(package) if package is not None else _package_dir()
    if _module_file(module, package) is None:
        return sorted(_all_modules(package))
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name, package)
        todo.extend(_imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py",
                             package) - seen)
    return sorted(seen)


def _all_modules(package: Path) -> set[str]:
    names = set()
    for path in package.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(package).with_suffix("").parts
        names.add(".".join(("ntklab",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return names


def code_version(module: str, *, package: str | os.PathLike | None = None) -> int:
    """The module's ``VERSION`` (a top-level ``VERSION = <int>``), 1 if it has none: bump it to
    recompute an experiment's entries for a reason its code does not show."""
    package = Path(package) if package is not None else _package_dir()
    path = _module_file(module, package) or getattr(sys.modules.get(module), "__file__", None)
    if not path or not Path(path).is_file():
        return 1
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int):
            return node.value.value
    return 1


def code_digest(module: str, *, package: str | os.PathLike | None = None) -> str:
    """A 16-hex-digit SHA-256 of the code ``module`` runs: for each module of :func:`code_modules`
    (sorted), its name and ``ast.dump`` of its syntax tree with docstrings and other bare strings
    removed. Comments, blank lines, docstrings and line numbers do not count; every other edit of
    one of those modules does (as does a new Python version, whose syntax trees differ). For a
    module outside ``ntklab`` (see :func:`code_modules`) its own file, if it has one, counts too.

    With the default ``package`` (the imported one) the digest is computed once per process, so it
    describes the code this process loaded even if the files change on disk afterwards."""
    if package is None and module in _DIGESTS:
        return _DIGESTS[module]
    folder = Path(package) if package is not None else _package_dir()
    h = hashlib.sha256()
    for name in code_modules(module, package=folder):
        h.update(name.encode() + b"\0" + ast.dump(_tree(_module_file(name, folder))).encode() + b"\0")
    if _module_file(module, folder) is None:           # a module outside ntklab: its own file too
        file = getattr(sys.modules.get(module), "__file__", None)
        if file and Path(file).is_file():
            h.update(module.encode() + b"\0" + ast.dump(_tree(Path(file))).encode() + b"\0")
    digest = h.hexdigest()[:16]
    if package is None:
        _DIGESTS[module] = digest
    return digest


def bind(name: str, module: str) -> None:
    """Entries called ``name`` are computed by ``module``: their key takes its :func:`code_digest`
    (the experiment registry binds each experiment's name to the module it was registered from)."""
    _BOUND[name] = module


def _module_for(name: str, module, default: str) -> str:
    if module is not None:
        return module if isinstance(module, str) else module.__name__
    return _BOUND.get(name, default)


def _caller() -> str:
    """The module of the code that called the public function that calls this."""
    return sys._getframe(2).f_globals.get("__name__", "__main__")


def config_key(name: str, config: dict, *, module=None) -> str:
    """The stable 16-hex-digit key of (name, config, ``ntklab.__version__``, :func:`code_digest`
    and :func:`code_version` of the module that computes the entry; see the module docstring)."""
    return _key(name, config, _module_for(name, module, _caller()))


def _key(name: str, config: dict, module: str) -> str:
    import ntklab

    text = json.dumps({"name": name, "config": config, "version": ntklab.__version__,
                       "source": code_digest(module), "experiment_version": code_version(module)},
                      sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_path(name: str, config: dict, *, root: str | os.PathLike | None = None, module=None) -> Path:
    """Where the result of experiment ``name`` under ``config`` is (or would be) stored."""
    return results_root(root) / name / f"{_key(name, config, _module_for(name, module, _caller()))}.pt"


def checkpoint_dir(name: str, config: dict, *, root: str | os.PathLike | None = None, module=None) -> Path:
    """The folder for the checkpoints of the run that computes this entry (beside the result), so
    that an interrupted run resumes. :func:`cached` deletes it once the result is stored."""
    key = _key(name, config, _module_for(name, module, _caller()))
    return results_root(root) / name / f"{key}.checkpoints"


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


def _non_finite(obj, where: str = "result") -> str | None:
    """The path of the first non-finite float in a storable result (``None``: all finite)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else where
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{where}[{k!r}]")
        if found:
            return found
    return None


def _load_entry(path: Path, key: str | None = None) -> dict:
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(entry, dict) or entry.get("format") != _FORMAT or "result" not in entry \
            or (key is not None and entry.get("key") != key):
        raise ValueError("not a result entry of this cache")
    return entry


def _load(path: Path, key: str):
    return _load_entry(path, key)["result"]


def _sidecar_text(entry: dict) -> str:
    meta = {k: entry.get(k) for k in ("name", "version", "source", "module", "experiment_version", "key", "config")}
    return json.dumps(meta, sort_keys=True, indent=1, default=_json_default)


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (or in its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def _computed(name: str, compute: Callable[[], Any]):
    """``compute()``'s result in storable form, refused (``ValueError``) if any number in it is not
    finite."""
    result = _storable(compute())
    bad = _non_finite(result)
    if bad:
        raise ValueError(f"experiment {name!r} returned a non-finite number at {bad}; a result is stored "
                         f"only when every number in it is finite (store None with a reason instead)")
    return result


def cached(name: str, config: dict, compute: Callable[[], Any], *, force: bool = False,
           root: str | os.PathLike | None = None, module=None):
    """``compute()``'s result for experiment ``name`` under ``config``, from the cache if there.

    module: the module (or its name) whose code computes the entry; default: the module
    ``name`` is bound to (:func:`bind`), else the module that defines ``compute``.

    ``force=True`` recomputes and overwrites. A corrupt or partial entry gives a ``UserWarning``
    and is recomputed. Once the result is stored, the entry's :func:`checkpoint_dir` (the
    checkpoints that let an interrupted computation resume) is deleted: a result needs none, and
    ``force=True`` then really recomputes. Returns the result as stored (tensors on the CPU).
    """
    import ntklab
    from ntklab.data import atomic_save, atomic_write_text, describe_load_error

    module = _module_for(name, module, getattr(compute, "__module__", None) or "__main__")
    key = _key(name, config, module)
    path = results_root(root) / name / f"{key}.pt"
    if _world() > 1:
        return _cached_ranks(name, config, compute, force=force, path=path, key=key, module=module)
    if path.exists() and not force and not _writable(path.parent):  # a read-only folder: read, never lock
        result = _load(path, key)
        _note(path, "loaded")
        return result
    if not _writable(path.parent):
        raise PermissionError(f"the results folder {path.parent} is not writable, and the entry {name!r} "
                              f"({key}) is not in it: compute it elsewhere, or set NTKLAB_RESULTS (or --out) to a "
                              f"writable folder")
    with _exclusive(path, name):
        if path.exists() and not force:
            try:
                entry = _load_entry(path, key)
            except Exception as err:  # truncated, garbage, or another format: recompute, never crash
                warnings.warn(f"cached result {path} is unreadable ({describe_load_error(err)}); recomputing it",
                              stacklevel=3)
            else:
                _tidy(path, entry)
                _note(path, "loaded")
                return entry["result"]
        code = {"version": ntklab.__version__, "source": code_digest(module), "module": module,
                "experiment_version": code_version(module)}
        entry = {"format": _FORMAT, "key": key, "name": name, **code, "config": config}
        # the sidecar before the computation, the result (which carries the same metadata) after it:
        # an interrupted run leaves an unfinished entry that the listing knows as this code's (its
        # checkpoints are kept by clear(stale_only=True)), a finished one is complete in one file
        atomic_write_text(_sidecar_text(entry), path.with_suffix(".json"))
        try:
            result = _computed(name, compute)
        except Exception:  # a failed computation leaves nothing behind but its checkpoints (an interruption
            if not path.exists() and not path.with_suffix(".checkpoints").exists():  # keeps the sidecar)
                path.with_suffix(".json").unlink(missing_ok=True)
            raise
        atomic_save({**entry, "result": result}, path)
        shutil.rmtree(path.with_suffix(".checkpoints"), ignore_errors=True)
        _note(path, "computed")
        return result


def _world() -> int:
    from ntklab import distributed

    return distributed.world_size()


def _cached_ranks(name: str, config: dict, compute: Callable[[], Any], *, force: bool, path: Path, key: str,
                  module: str):
    """:func:`cached` under several processes: rank 0 decides, locks and writes; every rank computes
    (or loads) alike and returns the stored result (see the module docstring)."""
    import ntklab
    from ntklab import distributed
    from ntklab.data import atomic_save, atomic_write_text, describe_load_error

    with contextlib.ExitStack() as held:  # rank 0's lock on the entry, until every rank is done with it
        def decide() -> str:
            if path.exists() and not force and not _writable(path.parent):
                return "load"
            if not _writable(path.parent):
                raise PermissionError(f"the results folder {path.parent} is not writable, and the entry {name!r} "
                                      f"({key}) is not in it: compute it elsewhere, or set NTKLAB_RESULTS (or --out) "
                                      f"to a writable folder")
            held.enter_context(_exclusive(path, name))
            if path.exists() and not force:
                try:
                    entry = _load_entry(path, key)
                except Exception as err:  # recompute, as one process does
                    warnings.warn(f"cached result {path} is unreadable ({describe_load_error(err)}); recomputing it",
                                  stacklevel=5)
                else:
                    _tidy(path, entry)
                    return "load"
            atomic_write_text(_sidecar_text(entry_of()), path.with_suffix(".json"))
            return "compute"

        def entry_of() -> dict:
            code = {"version": ntklab.__version__, "source": code_digest(module), "module": module,
                    "experiment_version": code_version(module)}
            return {"format": _FORMAT, "key": key, "name": name, **code, "config": config}

        def store(result) -> None:
            atomic_save({**entry_of(), "result": result}, path)
            shutil.rmtree(path.with_suffix(".checkpoints"), ignore_errors=True)

        def forget() -> None:  # a failed computation leaves only its checkpoints, as in one process
            if not path.exists() and not path.with_suffix(".checkpoints").exists():
                path.with_suffix(".json").unlink(missing_ok=True)

        if distributed.main_only(decide) == "compute":
            try:
                result = _computed(name, compute)
            except Exception:
                if distributed.is_main():
                    forget()
                raise
            distributed.main_only(store, result)
            how = "computed"
        else:
            how = "loaded"
        if not distributed.is_main() or how == "loaded":
            result = _load(path, key)
        distributed.barrier()  # every rank has read the entry before rank 0 lets the lock go
    _note(path, how)
    return result


def _tidy(path: Path, entry: dict) -> None:
    """After loading a finished entry: remove checkpoints an interrupted clean-up left, and rebuild
    a missing or damaged sidecar from the result's own metadata (entries written before results
    carried their config get none: their sidecar cannot be rebuilt)."""
    from ntklab.data import atomic_write_text

    shutil.rmtree(path.with_suffix(".checkpoints"), ignore_errors=True)
    sidecar = path.with_suffix(".json")
    try:
        json.loads(sidecar.read_text())
    except (OSError, ValueError):
        if "config" in entry:
            atomic_write_text(_sidecar_text(entry), sidecar)


def _holder(lock: Path) -> tuple[int | None, float | None]:
    """The process id and start time (POSIX) written into a lock file by its holder, if readable."""
    try:
        info = json.loads(lock.read_text() or "{}")
        return int(info["pid"]), float(info["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _stopped(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is stopped (state T: Ctrl-Z, SIGSTOP), where /proc tells."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1] in ("T", "t")
    except (OSError, IndexError):
        pass
    return False


@contextlib.contextmanager
def _exclusive(path: Path, name: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the entry (a POSIX advisory lock on ``<key>.lock``, which records
    the holder's process id and start time): while one process computes an entry, another that asks
    for the same entry (a second notebook, a parallel test) waits and then loads it instead of
    computing it again. Different entries do not wait for each other. The lock dies with its
    process, so a crashed run never blocks the next one.

    A waiting process says so once (a ``UserWarning`` naming the holder and since when). A holder
    that is stopped (Ctrl-Z, SIGSTOP) would keep the lock forever: that is a ``RuntimeError`` with
    advice, not a wait. ``$NTKLAB_LOCK_TIMEOUT`` (seconds, default: no limit, since computing an
    entry can take hours) ends the wait with a ``TimeoutError``. Where ``fcntl`` is missing
    (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    timeout = _lock_timeout()
    with open(lock, "a+") as handle:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid, since = _holder(lock)
                who = f"process {pid}" if pid is not None else "another process"
                when = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                        if since is not None else "")
                if _stopped(pid):
                    raise RuntimeError(f"the entry {name!r} at {path} is locked by {who}{when}, which is stopped "
                                       f"(Ctrl-Z or SIGSTOP): resume it (fg, or kill -CONT {pid}) or end it "
                                       f"(kill {pid}), then run again") from None
                if not told:
                    warnings.warn(f"waiting for {who}{when}, which is computing the entry {name!r} ({path.name}); "
                                  f"this run loads it when that one is done", stacklevel=4)
                    told = True
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(f"gave up after {timeout:g} s (NTKLAB_LOCK_TIMEOUT) waiting for {who}{when}, "
                                       f"which is computing the entry {name!r} at {path}") from None
                time.sleep(0.2 if timeout is not None and timeout < 5 else 1.0)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
            handle.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_timeout() -> float | None:
    text = os.environ.get("NTKLAB_LOCK_TIMEOUT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"NTKLAB_LOCK_TIMEOUT must be a number of seconds >= 0, got {text!r}")
    return value


def _note(path: Path, how: str) -> None:
    for paths in _TRACKERS:
        paths.append((path, how))


# ------------------------------------------------------------------ listing and clearing
@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the cache: ``path`` (the ``.pt`` file), experiment ``name``, ``key``, total
    ``size`` in bytes (result, sidecar and checkpoints), ``modified`` (POSIX time of the result,
    or of the checkpoints of an unfinished run), the ``version``, ``source`` digest, ``profile``
    name and ``module`` (that computed it) recorded in the sidecar (``None`` if unreadable),
    ``finished`` (the result exists; False for a run that has only checkpoints so far) and
    ``current`` (made by this code: its source digest is :func:`code_digest` of its module)."""

    path: Path
    name: str
    key: str
    size: int
    modified: float
    version: str | None
    source: str | None
    profile: str | None
    finished: bool
    module: str | None = None

    experiment_version: int | None = None

    @property
    def current(self) -> bool:
        """Whether this code would read the entry: the package version, the code digest and the
        ``VERSION`` of its module are this code's (an entry whose metadata is unreadable is not)."""
        import ntklab

        if self.module is None or self.source is None:
            return False
        try:
            return (self.source == code_digest(self.module) and self.version == ntklab.__version__
                    and (self.experiment_version is None or self.experiment_version == code_version(self.module)))
        except (OSError, SyntaxError):  # the module's file is gone: no code of today reads it
            return False

    def files(self) -> list[Path]:
        """The result, its sidecar, its checkpoint folder and its lock file, those that exist."""
        return [p for p in (self.path, self.path.with_suffix(".json"), self.path.with_suffix(".checkpoints"),
                            self.path.with_suffix(".lock")) if p.exists() or p.is_symlink()]


def _size(path: Path) -> int:
    """Bytes under ``path``; a broken symlink or a file that vanished counts 0."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # a broken symlink: its own time
        return path.lstat().st_mtime if path.is_symlink() else 0.0


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
            if not isinstance(meta, dict) or (not meta.get("source") and path.exists()):
                try:  # no usable sidecar: the result carries its own metadata
                    meta = {k: v for k, v in _load_entry(path).items() if k != "result"}
                except Exception:
                    meta = {}
            profile = meta.get("config", {}).get("profile") if isinstance(meta.get("config"), dict) else None
            entry = Entry(path=path, name=sub.name, key=key, size=0, modified=0.0,
                          version=meta.get("version"), source=meta.get("source"),
                          profile=profile.get("name") if isinstance(profile, dict) else None,
                          finished=path.exists(), module=meta.get("module"),
                          experiment_version=meta.get("experiment_version"))
            files = entry.files() or [path]
            found.append(dataclasses.replace(entry, size=sum(_size(p) for p in files),
                                             modified=max(_mtime(p) for p in files)))
    return sorted(found, key=lambda e: (e.name, e.modified))


def clear(root: str | os.PathLike | None = None, *, names=None, stale_only: bool = False) -> list[Entry]:
    """Delete entries (result, sidecar, checkpoints) and return them. A folder that cannot be
    written raises ``PermissionError`` naming it, before anything is deleted.

    names: experiment names to clear (``None``: all); stale_only: only entries made by other code
    than this (see :attr:`Entry.current`).
    """
    removed = []
    folder = results_root(root)
    if folder.is_dir() and not all(_writable(p) for p in [folder, *(q for q in folder.iterdir() if q.is_dir())]):
        raise PermissionError(f"the results folder {folder} (or a folder in it) is not writable: nothing was cleared")
    for entry in entries(root):
        if (names is not None and entry.name not in names) or (stale_only and entry.current):
            continue
        for path in entry.files():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        removed.append(entry)
    for sub in {e.path.parent for e in removed}:
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return removed
