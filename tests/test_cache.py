"""Tests of the result cache (ntklab/experiments/cache.py): storage, listing, and the key, a
digest of the code an experiment runs."""
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ntklab
from ntklab.experiments import EXPERIMENTS, cache

CONFIG = {"eps": 0.3, "epochs": 2, "milestones": (1,), "name": "x"}


class Counter:
    def __init__(self, value=None):
        self.calls = 0
        self.value = value if value is not None else {"acc": 0.5, "k": torch.arange(6.0).reshape(2, 3)}

    def __call__(self):
        self.calls += 1
        return self.value


# ---------------------------------------------------------------- cache
def test_cache_computes_once(tmp_path):
    compute = Counter()
    first = cache.cached("demo", CONFIG, compute, root=tmp_path)
    second = cache.cached("demo", dict(reversed(list(CONFIG.items()))), compute, root=tmp_path)  # key order
    assert compute.calls == 1
    assert second["acc"] == first["acc"] == 0.5 and torch.equal(second["k"], first["k"])
    path = cache.result_path("demo", CONFIG, root=tmp_path)
    assert path.exists() and path.parent == tmp_path / "demo"
    assert json.loads(path.with_suffix(".json").read_text())["config"]["eps"] == 0.3


def test_cache_different_config_or_name_is_another_entry(tmp_path):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    cache.cached("demo", {**CONFIG, "eps": 0.2}, compute, root=tmp_path)
    cache.cached("other", CONFIG, compute, root=tmp_path)
    assert compute.calls == 3
    assert len({cache.result_path(n, c, root=tmp_path) for n, c in
                [("demo", CONFIG), ("demo", {**CONFIG, "eps": 0.2}), ("other", CONFIG)]}) == 3


def test_cache_key_includes_the_code_of_the_module(tmp_path, monkeypatch):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    sidecar = json.loads(cache.result_path("demo", CONFIG, root=tmp_path).with_suffix(".json").read_text())
    assert sidecar["source"] == cache.code_digest(__name__) and sidecar["module"] == __name__
    monkeypatch.setattr(cache, "code_digest", lambda module, **kw: "0" * 16)   # as if a line had changed
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert compute.calls == 2 and len(list((tmp_path / "demo").glob("*.pt"))) == 2


def test_two_processes_asking_for_one_entry_compute_it_once(tmp_path):
    """A second process that asks for an entry while the first computes it waits, then loads it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from ntklab.experiments import cache
        def compute():
            with open({str(tmp_path / "calls")!r}, "a") as f:
                f.write("x")
            time.sleep(2)
            return {{"value": 7}}
        with cache.track() as paths:
            result = cache.cached("demo", {{"a": 1}}, compute, root={str(tmp_path)!r})
        print(paths[0][1], result["value"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outputs == ["computed 7", "loaded 7"]
    assert (tmp_path / "calls").read_text() == "x"


def test_entries_and_clear(tmp_path, monkeypatch):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    cache.cached("other", CONFIG, compute, root=tmp_path)
    (tmp_path / "demo" / f"{cache.config_key('demo', {'unfinished': 1})}.checkpoints").mkdir()
    monkeypatch.setattr(cache, "code_digest", lambda module, **kw: "f" * 16)
    cache.cached("demo", CONFIG, compute, root=tmp_path)                # made by "other code"
    found = cache.entries(tmp_path)
    assert [e.name for e in found].count("demo") == 3 and len(found) == 4
    assert sum(e.current for e in found) == 1 and sum(not e.finished for e in found) == 1
    assert all(e.size > 0 or not e.finished for e in found)
    stale = cache.clear(tmp_path, stale_only=True)
    assert len(stale) == 3 and all(not e.current for e in stale)
    assert [(e.name, e.current) for e in cache.entries(tmp_path)] == [("demo", True)]
    assert cache.clear(tmp_path, names={"nothing"}) == []
    assert len(cache.clear(tmp_path)) == 1 and cache.entries(tmp_path) == [] and not (tmp_path / "demo").exists()
    assert cache.entries(tmp_path / "missing") == []


def test_entries_are_written_with_the_folders_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        cache.cached("demo", CONFIG, Counter(), root=tmp_path)
    finally:
        os.umask(old)
    path = cache.result_path("demo", CONFIG, root=tmp_path)
    for p in (path, path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_cache_key_includes_version(tmp_path, monkeypatch):
    before = cache.result_path("demo", CONFIG, root=tmp_path)
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    monkeypatch.setattr(ntklab, "__version__", "999.0")
    assert cache.result_path("demo", CONFIG, root=tmp_path) != before
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign", "objects"])
def test_cache_corrupt_entry_is_recomputed_with_warning(tmp_path, damage):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    path = cache.result_path("demo", CONFIG, root=tmp_path)
    blob = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":  # a readable file that is not an entry of this cache
        torch.save({"something": "else"}, path)
    else:  # a pickle of Python objects, which weights_only refuses (torch suggests weights_only=False)
        torch.save({"format": 1, "result": Counter()}, path)
    with pytest.warns(UserWarning, match="unreadable.*recomputing") as caught:
        result = cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert "weights_only" not in str(caught[0].message)      # never the advice to unpickle it
    assert compute.calls == 2 and result["acc"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.cached("demo", CONFIG, compute, root=tmp_path)  # repaired: no warning, no compute
    assert compute.calls == 2


def test_cache_force_recomputes(tmp_path):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    cache.cached("demo", CONFIG, compute, root=tmp_path, force=True)
    assert compute.calls == 2


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NTKLAB_RESULTS", str(tmp_path / "env"))
    assert cache.results_root() == tmp_path / "env"
    with cache.using_root(tmp_path / "ctx"):
        assert cache.result_path("d", CONFIG).parent == tmp_path / "ctx" / "d"
        assert cache.results_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("NTKLAB_RESULTS")
    monkeypatch.setenv("NTKLAB_CACHE", str(tmp_path / "user"))
    assert cache.results_root() == tmp_path / "user" / "results"


def test_cache_converts_numpy_and_rejects_objects(tmp_path):
    value = {"a": np.float64(0.25), "b": np.arange(3), "c": [1, "x", None, (2.0, True)],
             "t": torch.ones(2, requires_grad=True)}
    result = cache.cached("np", CONFIG, Counter(value), root=tmp_path)
    loaded = cache.cached("np", CONFIG, Counter(), root=tmp_path)
    for r in (result, loaded):
        assert type(r["a"]) is float and torch.equal(r["b"], torch.arange(3))
        assert r["c"] == [1, "x", None, (2.0, True)] and not r["t"].requires_grad
    with pytest.raises(TypeError, match=r"result\['o'\] is a object"):
        cache.cached("bad", CONFIG, Counter({"o": object()}), root=tmp_path)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        cache.result_path("bad", {"f": object()})
    assert [p.suffix for p in (tmp_path / "bad").iterdir()] == [".lock"]      # no result, no sidecar
    assert cache.entries(tmp_path) == cache.entries(tmp_path)[:1] and cache.entries(tmp_path)[0].name == "np"


# ---------------------------------------------------------------- the key: the code an experiment runs
MODULE = "ntklab.experiments.strategies"


@pytest.fixture
def package(tmp_path):
    """A copy of the ntklab package to edit."""
    copy = tmp_path / "pkg" / "ntklab"
    shutil.copytree(Path(ntklab.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, old
    path.write_text(text.replace(old, new, 1))


def test_harmless_edits_keep_the_digest(package):
    base = cache.code_digest(MODULE, package=package)
    assert len(base) == 16 and base == cache.code_digest(MODULE, package=package)
    edit(package / "experiments" / "strategies.py", '"""', '"""A docstring edited. ')   # the module docstring
    edit(package / "train.py", "    \"\"\"", "    \"\"\"Edited: ")          # a function's docstring
    edit(package / "experiments" / "strategies.py", "\nimport", "\n# a new comment\n\nimport")
    (package / "plots.py").write_text((package / "plots.py").read_text() + "\nSOMETHING = 1\n")
    (package / "experiments" / "new_chapter.py").write_text("x = 1\n")       # a module it does not import
    assert cache.code_digest(MODULE, package=package) == base
    assert "ntklab.plots" not in cache.code_modules(MODULE, package=package)


@pytest.mark.parametrize("where", ["experiments/strategies.py", "train.py", "experiments/__init__.py", "ntk.py"])
def test_a_code_edit_on_the_experiments_path_changes_the_digest(package, where):
    base = cache.code_digest(MODULE, package=package)
    (package / where).write_text((package / where).read_text() + "\n_EDITED = 2\n")
    assert cache.code_digest(MODULE, package=package) != base


def test_version_constant(package):
    path = package / "experiments" / "strategies.py"
    assert cache.code_version(MODULE, package=package) == 1                  # none: 1
    base = cache.code_digest(MODULE, package=package)
    path.write_text(path.read_text() + "\nVERSION = 2\n")
    assert cache.code_version(MODULE, package=package) == 2
    assert cache.code_digest(MODULE, package=package) != base


def test_code_modules_follows_every_kind_of_import(tmp_path):
    pkg = tmp_path / "ntklab"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import torch\nfrom . import b\n\ndef f():\n    from ntklab.sub import c\n    import ntklab\n"
                "    return ntklab.d.g()\n",
        "b.py": "from .sub.e import h\n",
        "d.py": "def g():\n    import ntklab.sub.f as ff\n",
        "sub/__init__.py": "", "sub/c.py": "", "sub/e.py": "", "sub/f.py": "", "unused.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert cache.code_modules("ntklab.a", package=pkg) == [
        "ntklab", "ntklab.a", "ntklab.b", "ntklab.d", "ntklab.sub", "ntklab.sub.c", "ntklab.sub.e", "ntklab.sub.f"]


def test_docstring_edit_keeps_the_entry_and_code_edit_recomputes(package, tmp_path, monkeypatch):
    """The cache, end to end, on a copy of the package: the source lookup points at the copy."""
    monkeypatch.setattr(cache, "_package_dir", lambda: package)
    calls = []

    def ask():
        monkeypatch.setattr(cache, "_DIGESTS", {})           # a new process: digests computed again
        with cache.track() as paths:
            cache.cached("demo", {"a": 1}, lambda: calls.append(1) or {"v": 1}, module=MODULE, root=tmp_path)
        return paths[0][1]

    assert ask() == "computed" and ask() == "loaded"
    edit(package / "experiments" / "strategies.py", '"""', '"""Typo fixed. ')
    edit(package / "models.py", "# ", "# a comment edited ")
    assert ask() == "loaded"
    edit(package / "experiments" / "strategies.py", "\ndef ", "\nEXTRA = 1\n\n\ndef ")
    assert ask() == "computed" and len(calls) == 2
    found = cache.entries(tmp_path)
    assert [e.current for e in found] == [False, True] and found[1].module == MODULE


def test_shared_entries_take_the_module_of_the_code_that_computes_them():
    """Entries not registered as an experiment (``models``, ``kernel_runs``) are keyed by the module
    that defines ``compute`` (for ``cached``) or that asks (for the paths): the same module."""
    config = {"a": 1}
    here = cache.config_key("shared-demo", config)
    assert here == cache.config_key("shared-demo", config, module=__name__)
    assert here != cache.config_key("shared-demo", config, module="ntklab.experiments")
    assert cache.result_path("shared-demo", config, module=ntklab.experiments).stem == \
        cache.config_key("shared-demo", config, module="ntklab.experiments")
    strategies = EXPERIMENTS["strategies"]
    assert cache.config_key("strategies", config) == cache.config_key("strategies", config, module=strategies.module)


def test_a_result_is_stored_with_its_module_and_version(tmp_path):
    result = cache.cached("demo", {"a": 1}, lambda: {"x": torch.ones(2)}, root=tmp_path)
    entry, = cache.entries(tmp_path)
    assert entry.module == __name__ and entry.current and torch.equal(result["x"], torch.ones(2))
    saved = torch.load(entry.path, weights_only=True)
    assert saved["module"] == __name__ and saved["experiment_version"] == 1


# ---------------------------------------------------------------- nothing lost, nothing silent
class Interrupted(BaseException):
    """Stands for a kill or Ctrl-C between two write steps."""


def _raise(*args, **kwargs):
    raise Interrupted


@pytest.mark.parametrize("step", ["sidecar", "compute", "result", "clean-up"])
def test_an_interruption_at_any_write_step_loses_nothing(tmp_path, monkeypatch, step):
    """Interrupt cached() at each step; then `clear --stale` keeps everything this code would read
    and the next call either loads the complete result or computes it (resuming from checkpoints)."""
    from ntklab import data

    path = cache.result_path("demo", CONFIG, root=tmp_path)
    checkpoints = path.with_suffix(".checkpoints")

    def compute():  # a run that checkpoints as it goes
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "last.pt").write_text("progress")
        if step == "compute":
            raise Interrupted
        return {"acc": 0.5}

    with monkeypatch.context() as patch:
        if step == "sidecar":
            patch.setattr(data, "atomic_write_text", _raise)
        elif step == "result":
            patch.setattr(data, "atomic_save", _raise)
        elif step == "clean-up":
            patch.setattr(cache.shutil, "rmtree", _raise)
        with pytest.raises(Interrupted):
            cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))                              # no partial file left
    if path.exists():                                                     # a result is always complete
        assert cache._load(path, path.stem) == {"acc": 0.5}
    listed = cache.entries(tmp_path)
    assert cache.clear(tmp_path, stale_only=True) == []                   # nothing of this code is stale
    if step in ("compute", "result"):                                     # the run's progress is kept
        assert (checkpoints / "last.pt").read_text() == "progress" and listed[0].current
    calls = Counter({"acc": 0.5})
    assert cache.cached("demo", CONFIG, calls, root=tmp_path) == {"acc": 0.5}
    assert calls.calls == (0 if step == "clean-up" else 1)
    assert not checkpoints.exists()                                       # a finished result needs none
    assert json.loads(path.with_suffix(".json").read_text())["config"]["eps"] == 0.3


def test_a_result_without_its_sidecar_is_current_and_gets_it_back(tmp_path):
    cache.cached("demo", CONFIG, Counter(), root=tmp_path)
    path = cache.result_path("demo", CONFIG, root=tmp_path)
    sidecar = path.with_suffix(".json")
    for damage in ("missing", "garbage"):
        if damage == "missing":
            sidecar.unlink()
        else:
            sidecar.write_text("{not json")
        (entry,) = cache.entries(tmp_path)
        assert entry.current and entry.finished and entry.module == "tests.test_cache" or entry.module
        assert cache.clear(tmp_path, stale_only=True) == [] and path.exists()
        compute = Counter()
        cache.cached("demo", CONFIG, compute, root=tmp_path)
        assert compute.calls == 0 and json.loads(sidecar.read_text())["config"]["eps"] == 0.3


def test_stale_means_not_read_by_this_code(tmp_path, monkeypatch):
    """Another package version or VERSION makes an entry stale, as another code digest does."""
    cache.cached("demo", CONFIG, Counter(), root=tmp_path)
    (entry,) = cache.entries(tmp_path)
    assert entry.current
    monkeypatch.setattr(ntklab, "__version__", "0.0.0-other")
    assert not cache.entries(tmp_path)[0].current
    monkeypatch.undo()
    monkeypatch.setattr(cache, "code_version", lambda module, **kw: 99)
    assert not cache.entries(tmp_path)[0].current


def test_a_result_with_a_non_finite_number_is_not_stored(tmp_path):
    for bad, where in (({"slope": float("nan")}, "['slope']"), ({"k": [1.0, torch.tensor([0.0, float("inf")])]},
                                                                   "['k'][1]")):
        with pytest.raises(ValueError, match=rf"non-finite number at result{re.escape(where)};"):
            cache.cached("demo", {"bad": where}, lambda: bad, root=tmp_path)
        assert not cache.result_path("demo", {"bad": where}, root=tmp_path).exists()
    assert cache.cached("demo", {"ok": 1}, lambda: {"n": None, "i": torch.arange(3)}, root=tmp_path)["n"] is None


def test_a_read_only_results_folder_is_readable(tmp_path, monkeypatch):
    """A finished entry loads without any write (no lock, no sidecar repair); a missing one is a
    one-line PermissionError naming the folder and what to do."""
    cache.cached("demo", CONFIG, Counter(), root=tmp_path)
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)          # as on a read-only mount
    monkeypatch.setattr(cache, "_exclusive", lambda *a, **k: pytest.fail("took a lock"))
    compute = Counter()
    assert cache.cached("demo", CONFIG, compute, root=tmp_path)["acc"] == 0.5 and compute.calls == 0
    with pytest.raises(PermissionError, match=r"not writable, and the entry 'demo' .* is not in it.*NTKLAB_RESULTS"):
        cache.cached("demo", {"other": 1}, compute, root=tmp_path)
    assert compute.calls == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_results_folder_is_readable_for_real(tmp_path):
    cache.cached("demo", CONFIG, Counter(), root=tmp_path)
    for p in [tmp_path, tmp_path / "demo"]:
        p.chmod(0o555)
    try:
        assert cache.cached("demo", CONFIG, Counter(), root=tmp_path)["acc"] == 0.5
        with pytest.raises(PermissionError, match="not writable"):
            cache.cached("demo", {"other": 1}, Counter(), root=tmp_path)
    finally:
        for p in [tmp_path, tmp_path / "demo"]:
            p.chmod(0o755)


def _holder_process(tmp_path, seconds):
    """A process that computes the entry ``demo {"a": 1}`` for ``seconds``; returns it once it holds the lock."""
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import time
        from ntklab.experiments import cache
        cache.cached("demo", {{"a": 1}}, lambda: time.sleep({seconds}) or {{"value": 7}}, root={str(tmp_path)!r},
                     module="ntklab.experiments.cache")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    lock = cache.result_path("demo", {"a": 1}, root=tmp_path, module="ntklab.experiments.cache").with_suffix(".lock")
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and '"pid"' in lock.read_text()):
        time.sleep(0.1)
    assert cache._holder(lock)[0] == proc.pid
    return proc


@pytest.mark.skipif(os.name != "posix", reason="POSIX locks")
def test_a_second_run_says_whom_it_waits_for_and_can_time_out(tmp_path, monkeypatch):
    proc = _holder_process(tmp_path, 4)
    try:
        monkeypatch.setenv("NTKLAB_LOCK_TIMEOUT", "0.5")
        with pytest.warns(UserWarning, match=rf"waiting for process {proc.pid} since .* computing the entry 'demo'"):
            with pytest.raises(TimeoutError, match=rf"gave up after 0.5 s .*process {proc.pid}"):
                cache.cached("demo", {"a": 1}, Counter(), root=tmp_path, module="ntklab.experiments.cache")
        monkeypatch.delenv("NTKLAB_LOCK_TIMEOUT")
        with pytest.warns(UserWarning, match="waiting for process"):
            assert cache.cached("demo", {"a": 1}, Counter(), root=tmp_path, module="ntklab.experiments.cache") == {"value": 7}
    finally:
        proc.wait(timeout=60)
    monkeypatch.setenv("NTKLAB_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NTKLAB_LOCK_TIMEOUT must be a number of seconds"):
        cache.cached("demo", {"b": 1}, Counter(), root=tmp_path)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see a stopped process")
def test_a_lock_held_by_a_stopped_process_is_reported_not_waited_on(tmp_path):
    import signal

    proc = _holder_process(tmp_path, 3)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match=rf"locked by process {proc.pid} .* stopped .*kill -CONT {proc.pid}"):
            cache.cached("demo", {"a": 1}, Counter(), root=tmp_path, module="ntklab.experiments.cache")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=60)
    assert cache.cached("demo", {"a": 1}, Counter(), root=tmp_path, module="ntklab.experiments.cache") == {"value": 7}
