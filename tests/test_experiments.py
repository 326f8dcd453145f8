"""Tests of the result cache and the experiment registry (the experiments have test files of their own)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import cache


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


def test_cache_key_includes_the_source_of_the_package(tmp_path, monkeypatch):
    compute = Counter()
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert json.loads(cache.result_path("demo", CONFIG, root=tmp_path).with_suffix(".json").read_text())[
        "source"] == cache.source_digest()
    monkeypatch.setattr(cache, "_SOURCE", "0" * 16)             # as if another line of ntklab had changed
    cache.cached("demo", CONFIG, compute, root=tmp_path)
    assert compute.calls == 2 and len(list((tmp_path / "demo").glob("*.pt"))) == 2


def test_source_digest_follows_every_file_of_the_package(tmp_path, monkeypatch):
    """The digest covers each .py file's path and bytes: computed on a copy of the package, one
    changed character anywhere gives another digest."""
    import shutil

    copy = tmp_path / "ntklab"
    shutil.copytree(os.path.dirname(ntklab.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))

    def digest():
        monkeypatch.setattr(cache, "_SOURCE", None)
        monkeypatch.setattr(ntklab, "__file__", str(copy / "__init__.py"))
        return cache.source_digest()

    base = digest()
    assert base == digest() and len(base) == 16
    for name in ("plots.py", "experiments/strategies.py"):
        path = copy / name
        text = path.read_text()
        path.write_text(text + "\n")                       # one more (empty) line
        assert digest() != base, name
        path.write_text(text)
        assert digest() == base
    (copy / "new_module.py").write_text("x = 1\n")
    assert digest() != base


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
    monkeypatch.setattr(cache, "_SOURCE", "f" * 16)
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


# ---------------------------------------------------------------- registry and helpers
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


@pytest.mark.parametrize("dataset, size", [("mnist5k", 28), ("digits", 8)])
def test_model_from_profile(dataset, size):
    profile = get_profile("smoke").replace(dataset=dataset)
    model = experiments.model_from_profile(profile)
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(ntklab.data.stats(dataset)[0])
    assert model.features[0].out_channels == 4  # model_kwargs width 4


def test_data_and_train_kwargs_from_profile():
    profile = get_profile("smoke")
    train_set, test_set = experiments.data_from_profile(profile)
    assert len(train_set) == profile.n_train and len(test_set) == profile.n_test
    assert experiments.train_kwargs(profile, "pgd")["steps"] == profile.pgd_steps
    kw = experiments.train_kwargs(profile, "fgsm")
    assert "alpha" not in kw and kw["eps"] == profile.eps and kw["epochs"] == profile.epochs


# ---------------------------------------------------------------- the runs' CPU clock (chapters 4 and 5)
def test_cpu_clock_counts_training_epochs_and_survives_a_checkpoint(tmp_path):
    import time

    from ntklab.callbacks import Callback
    from ntklab.experiments.runs import CPUClock
    from test_train import Interrupt

    class Busy(Callback):  # a measurement that burns CPU: it must not count as training
        def on_epoch_end(self, epoch, model, history):
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass

    profile = get_profile("smoke")
    train_set, _ = experiments.data_from_profile(profile)
    kw = dict(strategy="normal", epochs=3, batch_size=64, device="cpu", progress=False, checkpoint_dir=tmp_path)
    clock = CPUClock()
    with pytest.raises(KeyboardInterrupt):
        ntklab.train.train(experiments.model_from_profile(profile), train_set,
                           callbacks=[clock.first, Busy(), Interrupt(at=1), clock.last], **kw)
    assert len(clock.seconds) == 2  # epoch 1 was measured before the interruption, then lost with it
    resumed = CPUClock()
    ntklab.train.train(experiments.model_from_profile(profile), train_set,
                       callbacks=[resumed.first, Busy(), resumed.last], **kw)
    assert len(resumed.seconds) == 3 and resumed.seconds[0] == clock.seconds[0]
    assert all(0 < t < 0.3 for t in resumed.seconds)  # the busy measurement is not in it


# ---------------------------------------------------------------- shared trained models
def test_trained_model_is_trained_once_and_shared():
    profile = get_profile("smoke")
    with cache.track() as paths:
        m1, h1 = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1)
        m2, h2 = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1)
    assert [how for _, how in paths] == ["computed", "loaded"]
    assert paths[0][0].parent.name == "models"
    state1, state2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert len(h1) == len(h2) == 1 and h2.strategy == ["fgsm"] and not m2.training
    # the weights are those of a run of train() with the same arguments
    ntklab.config.seed_everything(profile.seed)
    ref = experiments.model_from_profile(profile)
    train_set, test_set = experiments.data_from_profile(profile)
    ntklab.train.train(ref, train_set, **{**experiments.train_kwargs(profile, "fgsm"), "epochs": 1},
                       eval_set=test_set, device="cpu", progress=False)
    assert all(torch.equal(ref.state_dict()[k], state1[k]) for k in state1)
    # another argument is another model
    m3, _ = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1, eps=0.2)
    assert not torch.equal(m3.state_dict()["features.0.weight"], state1["features.0.weight"])


def test_trained_model_refuses_what_it_cannot_key():
    profile = get_profile("smoke")
    with pytest.raises(ValueError, match="callbacks"):
        experiments.trained_model(profile, "pgd", callbacks=[])
    with pytest.raises(ValueError, match="unknown strategy 'adam'"):
        experiments.trained_model(profile, "adam")


