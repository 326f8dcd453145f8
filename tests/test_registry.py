"""Tests of the experiment registry (ntklab/experiments/__init__.py): register, run, and the
experiment decorator that owns config -> cache -> checkpoint folder."""
import pytest

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import EXPERIMENTS, cache

import dummy_experiment


def test_registry_lists_strategies():
    listed = experiments.list_experiments()
    assert "strategies" in listed and "chapter 4" in listed["strategies"]
    assert all(isinstance(d, str) and "\n" not in d and d for d in listed.values())
    with pytest.raises(ValueError, match="unknown experiment 'nope'; available: .*strategies"):
        experiments.run("nope", "smoke", "cpu")
    with pytest.raises(ValueError, match="unknown profile"):
        experiments.run("strategies", "huge", "cpu")


def test_register_refuses_a_second_function_under_a_name():
    @experiments.register("_test_dummy", "a dummy\nsecond line dropped")
    def dummy(profile, device, *, force=False, progress=True):
        return {"profile": profile.name}

    try:
        assert experiments.list_experiments()["_test_dummy"] == "a dummy"
        assert experiments.run("_test_dummy", "smoke", "cpu") == {"profile": "smoke"}
        with pytest.raises(ValueError, match="registered twice"):
            experiments.register("_test_dummy", "other")(lambda *a, **k: None)
    finally:
        experiments.EXPERIMENTS.pop("_test_dummy")


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
