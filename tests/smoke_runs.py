"""Running a chapter's experiment under the smoke profile in tests, and running it again from the
cache: the two steps every experiment's test module repeats."""
import pytest

from ntklab import experiments
from ntklab.experiments import cache


def smoke_run(tmp_path_factory, name: str):
    """``experiments.run(name, "smoke", "cpu")`` into a fresh results folder: (result, folder, the
    ``cache.track()`` list of (path, "computed"/"loaded"))."""
    out = tmp_path_factory.mktemp(name)
    with cache.track() as paths:
        result = experiments.run(name, "smoke", "cpu", out=out, progress=False)
    return result, out, paths


def rerun_from_cache(name: str, out, monkeypatch, owner, attr: str):
    """Run ``name`` again in ``out`` with ``owner.attr`` (the function that computes) made to fail
    the test if called; asserts the one entry was loaded and returns the loaded result."""
    monkeypatch.setattr(owner, attr, lambda *a, **k: pytest.fail("recomputed"))
    with cache.track() as paths:
        again = experiments.run(name, "smoke", "cpu", out=out, progress=False)
    assert [how for _, how in paths] == ["loaded"]
    return again, paths
