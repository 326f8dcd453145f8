"""Chapter 8: the clean-then-adversarial update of ntklab.train, ParameterSnapshots, and the
``frozen_kernel`` experiment (smoke and the paper code path)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ntklab
from ntklab.callbacks import ParameterSnapshots
from ntklab.experiments import frozen_kernel
from ntklab.models import SmallCNN
from ntklab.train import train
from test_ntk_features import run_twice
from claim_controls import assert_negative_controls


@pytest.fixture(scope="module")
def small():
    train_set = ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 64, seed=0)
    mean, std = ntklab.data.stats("mnist5k")
    return train_set, (mean, std)


def _net(stats):
    torch.manual_seed(0)
    return SmallCNN(width=4, mean=stats[0], std=stats[1])


def test_clean_update_is_a_clean_step_then_an_adversarial_step(small):
    train_set, stats = small
    net = _net(stats)
    ref = copy.deepcopy(net)
    train(net, train_set, strategy="fgsm", eps=0.1, epochs=1, batch_size=16, lr=0.05, momentum=0.9,
          weight_decay=5e-4, lr_schedule="constant", clean_update=True, seed=3, progress=False)
    # the same by hand: one SGD optimiser, two steps per batch, FGSM against the updated model
    x, y = train_set.tensors
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    ref.train()
    for idx in perm.split(16):
        for adversarial in (False, True):
            xb = ntklab.attacks.fgsm(ref, x[idx], y[idx], eps=0.1) if adversarial else x[idx]
            opt.zero_grad()
            F.cross_entropy(ref(xb), y[idx]).backward()
            opt.step()
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name


def test_clean_update_changes_training_and_is_checked(small):
    train_set, stats = small
    a, b = _net(stats), _net(stats)
    kw = dict(strategy="fgsm", eps=0.1, epochs=1, batch_size=32, progress=False)
    train(a, train_set, **kw)
    train(b, train_set, **kw, clean_update=True)
    assert not torch.allclose(a.features[0].weight, b.features[0].weight)
    with pytest.raises(ValueError, match="trades"):
        train(_net(stats), train_set, strategy="trades", epochs=1, clean_update=True, progress=False)
    with pytest.raises(ValueError, match="clean_update must be True or False"):
        train(_net(stats), train_set, strategy="fgsm", epochs=1, clean_update="yes", progress=False)
    # normal epochs (before switch_epoch, or strategy="normal") are unaffected
    c, d = _net(stats), _net(stats)
    train(c, train_set, strategy="normal", epochs=1, batch_size=32, progress=False)
    train(d, train_set, strategy="normal", epochs=1, batch_size=32, progress=False, clean_update=True)
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), d.state_dict().values()))


def test_parameter_snapshots_at_fractional_epochs(small, tmp_path):
    train_set, stats = small
    net = _net(stats)
    init = copy.deepcopy(net.state_dict())
    calls = []

    class Counter:
        def on_batch_end(self, epoch, batch, num_batches, model, history):
            calls.append((epoch, batch, num_batches))

    snaps = ParameterSnapshots([0, 0.5, 1, 1.3, 5])
    kw = dict(strategy="normal", epochs=2, batch_size=16, seed=1, progress=False)
    train(net, train_set, **kw, callbacks=[snaps, Counter()])
    assert calls == [(e, b, 4) for e in range(2) for b in range(4)]
    assert snaps.actual_times == [0.0, 0.5, 1.0, 1.5]           # 1.3 rounds up to a batch boundary; 5 never comes
    assert all(torch.equal(a, b) for a, b in zip(snaps.state(0).values(), init.values()))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(snaps.state(1).values(), _after_one_epoch(small, kw).values()))
    assert not all(torch.equal(a, b) for a, b in zip(snaps.state(1.3).values(), net.state_dict().values()))
    with pytest.raises(KeyError):
        snaps.state(5)
    with pytest.raises(ValueError, match="times"):
        ParameterSnapshots([-1])
    # the snapshots survive a checkpoint: a finished run reloads them
    again = ParameterSnapshots([0, 0.5, 1, 1.3, 5])
    first = ParameterSnapshots([0, 0.5, 1, 1.3, 5])
    train(_net(stats), train_set, **kw, callbacks=[first], checkpoint_dir=tmp_path)
    train(_net(stats), train_set, **kw, callbacks=[again], checkpoint_dir=tmp_path)
    assert again.actual_times == first.actual_times
    assert all(torch.equal(a, b) for a, b in zip(again.state(0.5).values(), first.state(0.5).values()))


def _after_one_epoch(small, kw):
    train_set, stats = small
    net = _net(stats)
    train(net, train_set, **{**kw, "epochs": 1})
    return net.state_dict()


def test_settings_follow_the_profiles(paper_profile):
    quick = frozen_kernel.Settings.for_profile(ntklab.config.get_profile("quick"))
    assert quick.eps == 0.15 and quick.model_kwargs["width"] == 16 and quick.times == (0, 0.25, 1, 3)
    with pytest.raises(AttributeError):
        quick.eps = 0.3                                  # frozen
    real = frozen_kernel.Settings.for_profile(ntklab.config.get_profile("paper"))
    assert real.eps == 4 / 255 and real.train_steps == 20 and real.eval_steps == 100
    assert abs(real.train_alpha - real.eps / 10) < 1e-12 and abs(real.eval_alpha - 2 * real.eps / 100) < 1e-12
    assert real.lr1 == 0.1 and real.lr2 == 0.01 and real.epochs1 == real.epochs2 == 100
    assert real.times == (0, 0.125, 0.25, 0.5, 1, 2, 5, 20, 100)
    tiny = frozen_kernel.Settings.for_profile(paper_profile)
    assert tiny.epochs1 == 1 and tiny.train_steps == 4 and tiny.times == (0, 0.125, 1)   # 2 batches per epoch
    assert frozen_kernel.make_config(paper_profile)["times"] == [0, 0.125, 1]


def _check_result(res, config):
    T = len(config["times"])
    assert res["times"] == config["times"]
    for p1 in ("C", "A"):
        assert len(res["actual_times"][p1]) == T
        assert len(res["base"][p1]["robust"]) == T
    for row in (*res["cells"].values(), res["reference"]):
        assert len(row["clean"]) == len(row["robust"]) == len(row["train_time"]) == T
        assert all(0 <= r <= c <= 1 for r, c in zip(row["robust"], row["clean"]))
    aa = res["autoattack"]
    assert 0 <= aa["linear"] <= 1 and 0 <= aa["reference"] <= 1
    assert res["compute_seconds"] > 0


def test_smoke_run_and_cache(tmp_path):
    profile, res, again = run_twice("frozen_kernel", tmp_path)
    _check_result(res, frozen_kernel.make_config(profile))
    assert again["cells"]["AA"]["robust"] == res["cells"]["AA"]["robust"]
    # the stored AA model loads into a linearised wrapper of the profile's network
    cfg = res["config"]
    lin = ntklab.linearize.Linearized(ntklab.experiments.model_from_profile(profile.replace(model_kwargs=cfg["model_kwargs"])),
                                      centered=True)
    lin.load_state_dict(res["aa_state"])
    _check_analysis(res, frozen_kernel.analyse(res))


def _check_analysis(res, a):
    """analyse against the result itself."""
    aa, ref = res["cells"]["AA"]["robust"], res["reference"]["robust"]
    assert a["robust"]["AA"] == aa and a["robust"]["reference"] == ref and a["times"] == res["times"]
    assert a["ac_minus_cc"] == res["cells"]["AC"]["robust"][-1] - res["cells"]["CC"]["robust"][-1]
    assert a["aa_gain"] == aa[-1] - aa[0] and a["aa_worst_step"] == min(y - x for x, y in zip(aa, aa[1:]))
    assert a["last"]["base_A_robust"] == res["base"]["A"]["robust"][-1]
    aut = res["autoattack"]
    assert a["autoattack"]["apgd_drop"] == max(aut["linear_pgd"] - aut["linear"], aut["reference_pgd"] - aut["reference"])
    ratio = sum(res["cells"]["AA"]["train_time"]) / sum(res["reference"]["train_time"])
    assert abs(a["linear_over_reference"] - ratio) < 1e-9 * ratio
    assert len(frozen_kernel.claims(a, "smoke")) == 6


def _result(aa, ref, ac=0.70, cc=0.40, ca=0.45, base_a=0.75):
    """A synthetic result of ``run`` with 4 freeze times (only what ``analyse`` reads)."""
    T = len(aa)
    row = lambda robust: {"robust": list(robust), "clean": [0.98] * T, "train_time": [1.0] * T}
    return {"times": [0, 0.25, 1, 3][:T], "actual_times": {"A": [0.0, 0.25, 1.0, 3.0][:T]},
            "cells": {"CC": row([0.0] * (T - 1) + [cc]), "AC": row([0.0] * (T - 1) + [ac]),
                      "CA": row([0.0] * (T - 1) + [ca]), "AA": row(aa)},
            "reference": row(ref), "base": {p: {"clean": [0.99] * T, "robust": [0.0] * (T - 1) + [base_a]}
                                            for p in ("C", "A")},
            "autoattack": {"t": 3, "n": 100, "linear": 0.60, "linear_pgd": 0.62, "reference": 0.70,
                           "reference_pgd": 0.71}}


GOOD_AA, GOOD_REF = [0.10, 0.55, 0.62, 0.66], [0.30, 0.60, 0.66, 0.70]


def test_analyse_on_a_synthetic_result():
    a = frozen_kernel.analyse(_result(GOOD_AA, GOOD_REF))
    assert a["aa_near_reference_from_t"] == 0.25 and abs(a["aa_gain"] - 0.56) < 1e-12
    assert abs(a["aa_minus_ca"] - 0.21) < 1e-12 and abs(a["autoattack"]["apgd_drop"] - 0.02) < 1e-12
    assert frozen_kernel.analyse(_result(GOOD_AA, [0.9] * 4))["aa_near_reference_from_t"] == "never"


def test_claims_have_negative_controls():
    good = frozen_kernel.analyse(_result(GOOD_AA, GOOD_REF))

    def set_(key, value):
        return lambda a: a.__setitem__(key, value)

    def set_last(key, value):
        return lambda a: a["last"].__setitem__(key, value)

    def spoil_near(a):                                   # close at t = 0.25, then 7 points below at t = 1
        a["robust"]["AA"] = [0.10, 0.58, 0.59, 0.66]

    assert_negative_controls(frozen_kernel.claims, good, {
        "adversarial_kernel_carries_robustness": set_("ac_minus_cc", 0.14),
        "ac_near_its_network": set_last("AC_robust", 0.64),
        "aa_gains_with_t": set_("aa_gain", 0.29),
        "aa_never_falls": set_("aa_worst_step", -0.04),
        "aa_reaches_reference": spoil_near,
        "benign_kernel_limits": set_("aa_minus_ca", 0.04),
    })
    # the reference claim fails as well when AA is never close, or not close at the last t
    for aa in ([0.10, 0.20, 0.30, 0.40], [0.10, 0.56, 0.62, 0.60]):
        verdict = {c.key: c.holds for c in frozen_kernel.claims(frozen_kernel.analyse(_result(aa, GOOD_REF)), "quick")}
        assert verdict["aa_reaches_reference"] is False, aa


def test_paper_code_path(paper_profile, tmp_path):
    res = ntklab.experiments.run("frozen_kernel", paper_profile, "cpu", out=tmp_path, progress=False)
    config = frozen_kernel.make_config(paper_profile)
    _check_result(res, config)
    assert res["config"]["train_attack"] == "pgd" and res["config"]["eps"] == 4 / 255
