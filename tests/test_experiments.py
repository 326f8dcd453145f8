"""Tests of the experiments' helpers (model_from_profile, data_from_profile, train_kwargs, trained_model)
and of the ``strategies`` experiment. The cache is tested in test_cache.py, the registry in test_registry.py."""
import math

import numpy as np
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import cache

from smoke_runs import rerun_from_cache, smoke_run


# ---------------------------------------------------------------- helpers of the experiments
# (the cache's tests are in test_cache.py, the registry's in test_registry.py)
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


# ---------------------------------------------------------------- the strategies experiment (chapter 4)
@pytest.fixture(scope="module")
def strategies_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "strategies")


def test_chapter_profile_decays_at_half_and_three_quarters(paper_profile):
    from ntklab.experiments.strategies import chapter_profile

    smoke, quick, paper = (chapter_profile(get_profile(n)) for n in ("smoke", "quick", "paper"))
    assert (smoke.epochs, smoke.lr_milestones) == (4, (2, 3))
    assert (quick.epochs, quick.lr_milestones, quick.model_kwargs) == (20, (10, 15), {"width": 8})
    assert (quick.eps, quick.pgd_alpha, quick.pgd_steps, quick.n_probe) == (0.15, 0.0375, 3, 100)
    assert paper == get_profile("paper")  # the paper profile as it is: 200 epochs, decays at 100 and 150
    assert chapter_profile(paper_profile).lr_milestones == (1,)  # 2 epochs: the decay at 50% only


def test_strategies_result(strategies_run):
    result, out, paths = strategies_run
    from ntklab.experiments.strategies import chapter_profile

    cp = chapter_profile(get_profile("smoke"))
    assert result["strategies"] == ["normal", "fgsm_rs", "pgd", "trades"]
    assert sorted(result["runs"]) == ["constant", "cosine", "multistep"]
    assert [(p.parent.name, how) for p, how in paths] == [("kernel_runs", "computed")] * 6 + [("strategies", "computed")]
    assert paths[-1][0].parent == out / "strategies"
    runs = [(sched, s, r) for sched, group in result["runs"].items() for s, r in group.items()]
    assert sorted((sched, s) for sched, s, _ in runs) == sorted(
        [("multistep", s) for s in result["strategies"]] + [("cosine", "normal"), ("constant", "normal")])
    first = result["runs"]["multistep"]["normal"]["kernels"]["clean"][0]
    n_batches = -(-cp.n_train // cp.batch_size)
    for sched, s, r in runs:
        h = r["history"]
        assert len(h["epoch"]) == cp.epochs and set(h["strategy"]) == {s} and "state_dict" not in r
        assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
        assert r["training_time"] == pytest.approx(sum(h["time_attack"]) + sum(h["time_update"]))
        k = r["kernels"]
        assert k["epochs"] == list(range(cp.epochs + 1))
        assert k["clean"].shape == (cp.epochs + 1, cp.n_probe, cp.n_probe) and ("ae" in k) == (s != "normal")
        if s != "normal":
            assert k["ae"].shape == k["clean"].shape and not torch.equal(k["ae"][-1], k["clean"][-1])
        assert torch.equal(k["clean"][0], first)  # one initialisation for every run
        # the mean learning rate of each epoch, by hand
        if sched == "multistep":
            expected = [cp.lr * cp.lr_gamma ** sum(m <= e for m in cp.lr_milestones) for e in range(cp.epochs)]
        elif sched == "constant":
            expected = [cp.lr] * cp.epochs
        else:
            expected = [np.mean([cp.lr * 0.5 * (1 + math.cos(math.pi * (e + b / n_batches) / cp.epochs))
                                 for b in range(n_batches)]) for e in range(cp.epochs)]
        assert r["lr_time"] == pytest.approx(expected, rel=1e-12)
        assert r["bn_refresh"].shape == (cp.n_probe, cp.n_probe)
        assert 0 < ntklab.metrics.kernel_distance(r["bn_refresh"], k["clean"][-1]) < 0.5
        assert len(r["cpu_epoch_seconds"]) == cp.epochs and min(r["cpu_epoch_seconds"]) > 0
        assert r["cpu_training_time"] == pytest.approx(sum(r["cpu_epoch_seconds"]))
    step = result["runs"]["multistep"]
    assert step["pgd"]["cpu_training_time"] > step["normal"]["cpu_training_time"]  # PGD-2 epochs cost more
    assert torch.equal(result["probe_y"], result["probe_y"].sort().values)
    assert set(result["probe_y"].tolist()) == set(range(10))
    assert result["compute_seconds"] > result["kernel_seconds"] > 0


def test_strategies_second_run_loads_the_cache(strategies_run, monkeypatch):
    result, out, _ = strategies_run
    import ntklab.train

    again, _ = rerun_from_cache("strategies", out, monkeypatch, ntklab.train, "train")
    assert again["runs"]["multistep"]["pgd"]["clean_acc"] == result["runs"]["multistep"]["pgd"]["clean_acc"]
    assert torch.equal(again["runs"]["multistep"]["fgsm_rs"]["kernels"]["ae"],
                       result["runs"]["multistep"]["fgsm_rs"]["kernels"]["ae"])
    # the result, its sidecar and its lock file; each run's checkpoints are gone once it is stored
    assert sorted(p.suffix for p in (out / "strategies").iterdir()) == [".json", ".lock", ".pt"]
    assert len(list((out / "kernel_runs").glob("*.pt"))) == 6
    assert not list((out / "kernel_runs").glob("*.checkpoints"))


def test_strategies_paper_code_path(paper_profile):
    result = experiments.run("strategies", paper_profile, "cpu", progress=False)
    assert result["config"]["profile"]["dataset"] == "cifar10"
    assert result["config"]["profile"]["model"] == "preact_resnet18"
    for group in result["runs"].values():
        for r in group.values():
            assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
            assert r["kernels"]["clean"].shape == (3, 10, 10) and r["kernels"]["epochs"] == [0, 1, 2]
    assert result["runs"]["multistep"]["pgd"]["lr_time"] == pytest.approx([paper_profile.lr, paper_profile.lr / 10])


def test_cpu_clock_counts_training_epochs_and_survives_a_checkpoint(tmp_path):
    import time

    from ntklab.callbacks import Callback
    from ntklab.experiments.strategies import CPUClock
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


# ---------------------------------------------------------------- the schedule experiment (chapter 5)
def test_schedule_shares_chapter_4_runs_and_switches_where_it_says(strategies_run):
    ch4, out, _ = strategies_run
    from ntklab.experiments.strategies import chapter_profile

    cp = chapter_profile(get_profile("smoke"))
    with cache.track() as paths:
        result = experiments.run("schedule", "smoke", "cpu", out=out, progress=False)
    assert result["labels"] == ["s=0", "s=1", "s=2", "auto", "normal"]  # 0, 1/2 and all of the first decay
    # full PGD-AT and normal training are chapter 4's runs, loaded; the others are computed
    how = [(p.parent.name, h) for p, h in paths]
    assert how.count(("kernel_runs", "loaded")) == 2 and how.count(("kernel_runs", "computed")) == 3
    assert how[-1] == ("schedule", "computed")
    assert torch.equal(result["runs"]["s=0"]["kernels"]["clean"], ch4["runs"]["multistep"]["pgd"]["kernels"]["clean"])
    for label in result["labels"]:
        r, s = result["runs"][label], result["switch_epochs"][label]
        strategies = r["history"]["strategy"]
        expected = ["normal"] * cp.epochs if label == "normal" else ["normal"] * s + ["pgd"] * (cp.epochs - s)
        assert strategies == expected, label
        assert 0 <= r["autoattack_acc"] <= r["clean_acc"] <= 1 and 0 <= r["robust_acc"] <= r["clean_acc"]
    auto = result["runs"]["auto"]["history"]
    assert auto["switch_epoch"] == result["switch_epochs"]["auto"] == cp.lr_milestones[0]  # 4 epochs: the cap
    assert sum(auto["time_switch"]) > 0 and result["runs"]["auto"]["training_time"] == pytest.approx(
        sum(auto["time_attack"]) + sum(auto["time_update"]) + sum(auto["time_switch"]))
    assert result["compute_seconds"] > 0


def test_schedule_paper_code_path(paper_profile):
    result = experiments.run("schedule", paper_profile, "cpu", progress=False)
    assert result["labels"] == ["s=0", "s=1", "auto", "normal"]  # first decay after epoch 1
    assert result["switch_epochs"] == {"s=0": 0, "s=1": 1, "auto": 1, "normal": 2}
    assert all(0 <= r["autoattack_acc"] <= 1 for r in result["runs"].values())


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


