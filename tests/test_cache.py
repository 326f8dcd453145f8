"""Tests of the cache key (the code an experiment runs) and of the registry's ``experiment``
decorator (config -> cache -> checkpoint folder). The cache's storage is tested in
``test_experiments.py``."""
import shutil
from pathlib import Path

import pytest
import torch

import ntklab
from ntklab.config import get_profile
from ntklab.experiments import EXPERIMENTS, cache

import dummy_experiment

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


# ---------------------------------------------------------------- the registry's experiment decorator
def test_experiment_decorator_owns_config_cache_and_checkpoints(tmp_path):
    with dummy_experiment.registered() as run, cache.using_root(tmp_path):
        assert EXPERIMENTS[dummy_experiment.NAME] is run and run.module == "dummy_experiment"
        assert run.__doc__ == dummy_experiment.compute.__doc__ and run.compute is dummy_experiment.compute
        first = run("smoke", "cpu", steps=4)
        assert first["total"] == 6 and first["profile"] == "smoke" and first["device"] == "cpu"
        ctx = dummy_experiment.CALLS[0]
        assert ctx.config == dummy_experiment.make_config(get_profile("smoke"), steps=4) and not ctx.force
        # the checkpoints sit beside the entry, at the key of the registered module, whoever asks
        config = ctx.config
        path = cache.result_path(dummy_experiment.NAME, config)
        assert ctx.checkpoints == path.with_suffix(".checkpoints") == cache.checkpoint_dir(dummy_experiment.NAME, config)
        assert path.exists() and not ctx.checkpoints.exists()         # deleted once the result is stored
        assert ntklab.experiments.run(dummy_experiment.NAME, "smoke", "cpu", out=tmp_path)["total"] == 3
        assert run("smoke", "cpu", steps=4)["total"] == 6 and len(dummy_experiment.CALLS) == 2   # loaded
        run("smoke", "cpu", steps=4, force=True)
        assert len(dummy_experiment.CALLS) == 3 and dummy_experiment.CALLS[-1].force
    assert dummy_experiment.NAME not in EXPERIMENTS


def test_experiment_resumes_from_its_checkpoints(tmp_path):
    with dummy_experiment.registered() as run, cache.using_root(tmp_path):
        dummy_experiment.FAIL.update(at=2, **{"with": KeyboardInterrupt()})
        with pytest.raises(KeyboardInterrupt):
            run("smoke", "cpu", steps=5)
        assert list(dummy_experiment.CALLS[0].checkpoints.iterdir())
        dummy_experiment.FAIL.update(at=None)
        result = run("smoke", "cpu", steps=5)
        assert result["resumed_at"] == 2 and result["total"] == 10


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
