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
from claim_controls import assert_negative_controls, set_at


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


def test_parameter_snapshots_at_0_with_data_bn_statistics(small):
    train_set, stats = small
    net = _net(stats)
    x = train_set.tensors[0]
    expected = ntklab.bn.refresh_bn_statistics(net, x, batch_size=32).state_dict()
    init = copy.deepcopy(net.state_dict())
    snaps = ParameterSnapshots([0, 1], bn_data=x, bn_batch_size=32)
    train(net, train_set, strategy="normal", epochs=1, batch_size=16, progress=False, callbacks=[snaps])
    state = snaps.state(0)
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert all(torch.equal(state[k], init[k]) for k, _ in _net(stats).named_parameters())       # weights untouched
    bn = [k for k in state if k.endswith("running_mean")]
    assert bn and all(not torch.equal(state[k], init[k]) for k in bn)                          # not the defaults
    assert all(float(init[k].abs().max()) == 0.0 for k in bn)


def _after_one_epoch(small, kw):
    train_set, stats = small
    net = _net(stats)
    train(net, train_set, **{**kw, "epochs": 1})
    return net.state_dict()


def test_settings_follow_the_profiles(paper_profile):
    quick = frozen_kernel.Settings.for_profile(ntklab.config.get_profile("quick"))
    assert quick.eps == 0.15 and quick.model_kwargs["width"] == 8 and quick.times == (0, 0.25, 1, 3)
    assert quick.epochs2 == 16 and quick.n_phase2 == 256 and quick.batch2 == 32
    with pytest.raises(AttributeError):
        quick.eps = 0.3                                  # frozen
    real = frozen_kernel.Settings.for_profile(ntklab.config.get_profile("paper"))
    assert real.eps == 4 / 255 and real.train_steps == 20 and real.eval_steps == 100
    assert abs(real.train_alpha - real.eps / 10) < 1e-12 and abs(real.eval_alpha - 2 * real.eps / 100) < 1e-12
    assert real.lr1 == 0.1 and real.lr2 == 0.01 and real.epochs1 == real.epochs2 == 100 and real.batch2 == 128
    assert real.times == (0, 0.125, 0.25, 0.5, 1, 2, 5, 20, 100)
    tiny = frozen_kernel.Settings.for_profile(paper_profile)
    assert tiny.epochs1 == 1 and tiny.train_steps == 4 and tiny.times == (0, 0.125, 1)   # 2 batches per epoch
    assert frozen_kernel.make_config(paper_profile)["times"] == [0, 0.125, 1]


def _check_result(res, config):
    T = len(config["times"])
    assert res["times"] == config["times"]
    for p1 in ("C", "A"):
        assert len(res["actual_times"][p1]) == T
        assert len(res["base"][p1]["robust"]) == len(res["kernels"][p1]) == T
    for row in (*res["cells"].values(), res["reference"]):
        assert len(row["clean"]) == len(row["robust"]) == len(row["loss"]) == T
        assert all(len(loss) == config["epochs2"] for loss in row["loss"])
        # robust <= clean: an example counts as robust only if it is also classified correctly clean
        assert all(r <= c for rf, cf in zip(row["robust_flags"], row["clean_flags"]) for r, c in zip(rf, cf))
        assert all(0 <= r <= c <= 1 for r, c in zip(row["robust"], row["clean"]))
    for m in frozen_kernel.HEADLINE:
        assert len(res["autoattack"]["apgd"][m]) == len(res["autoattack"]["worst"][m]) == T
    final = res["final"]
    assert 0 <= final["n"] <= config["n_final"]
    for m in (frozen_kernel.FINAL if final["n"] else ()):
        assert len(final[m]["robust_flags"]) == len(final[m]["clean_flags"]) == final["n"]
        assert all(r <= c for r, c in zip(final[m]["robust_flags"], final[m]["clean_flags"]))
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
    a = frozen_kernel.analyse(res)
    _check_analysis(res, a)
    assert res["final"]["n"] == 16 and a["n_final_eval"] == len(res["cells"]["AA"]["robust_flags"][-1]) + 16
    # the last freeze time's differences pair the evaluation images and the extra ones
    import numpy as np
    ac = np.array(res["cells"]["AC"]["robust_flags"][-1] + res["final"]["AC"]["robust_flags"], float)
    base = np.array(res["base"]["A"]["robust_flags"][-1] + res["final"]["base_A"]["robust_flags"], float)
    assert abs(a["ac_minus_base_a"]["diff"] - (ac - base).mean()) < 1e-12
    assert abs(a["ac_minus_base_a"]["se"] - (ac - base).std() / np.sqrt(len(ac))) < 1e-12
    # at t = 0 both phase-1 runs are the same initialisation (with the same data BN statistics): the
    # cells that differ only in phase 1 are the same model, exactly
    assert a["same_at_0"] is True
    for x, y in (("CC", "AC"), ("CA", "AA")):
        for key in ("robust_flags", "clean_flags", "loss"):
            assert res["cells"][x][key][0] == res["cells"][y][key][0]
    assert torch.equal(res["kernels"]["A"][0], res["kernels"]["C"][0])
    # the centred models start at 0: nothing of the phase-1 network's output is left at t = 0 of phase 2
    assert a["kernel"]["kd_a_vs_c"][0] == 0.0


def test_cells_at_0_are_equal_in_float64(small):
    """CC(0) = AC(0) and CA(0) = AA(0) exactly: the t = 0 snapshots of benign and adversarial phase 1
    are one initialisation with the same BN statistics, and phase 2 from them is the same run."""
    train_set, stats = small
    x = train_set.tensors[0].double()
    data64 = torch.utils.data.TensorDataset(x, train_set.tensors[1])
    snaps = {}
    for p1, kw in (("C", dict(strategy="normal")), ("A", dict(strategy="fgsm_rs", eps=0.15, clean_update=True))):
        net = _net(stats).double()
        snaps[p1] = ParameterSnapshots([0, 1], bn_data=x, bn_batch_size=32)
        train(net, data64, epochs=1, batch_size=32, seed=0, progress=False, callbacks=[snaps[p1]], **kw)
    assert all(torch.equal(a, b) for a, b in zip(snaps["C"].state(0).values(), snaps["A"].state(0).values()))
    assert not all(torch.equal(a, b) for a, b in zip(snaps["C"].state(1).values(), snaps["A"].state(1).values()))
    for p2 in ({"strategy": "normal"}, {"strategy": "fgsm_rs", "eps": 0.15, "clean_update": True}):
        lins = []
        for p1 in ("C", "A"):
            net = _net(stats).double()
            net.load_state_dict(snaps[p1].state(0))
            lin = ntklab.linearize.Linearized(net.eval(), centered=True)
            torch.manual_seed(0)
            train(lin, data64, epochs=2, batch_size=16, lr=0.01, momentum=0.9, weight_decay=0.0, lr_schedule="constant",
                  seed=0, progress=False, **p2)
            lins.append(lin)
        assert lins[0].theta[0].dtype == torch.float64
        assert all(torch.equal(a, b) for a, b in zip(lins[0].theta, lins[1].theta))
        assert any(float(d.abs().max()) > 0 for d in lins[0].delta().values())
        with torch.no_grad():
            assert torch.equal(lins[0](x[:8]), lins[1](x[:8]))


def _check_analysis(res, a):
    """analyse against the result itself."""
    aa, ref = res["cells"]["AA"]["robust"], res["reference"]["robust"]
    assert a["robust"]["AA"] == aa and a["robust"]["reference"] == ref and a["times"] == res["times"]
    assert a["last"]["base_A_robust"] == res["base"]["A"]["robust"][-1]
    assert a["aa_worst_step"] == min(y - x for x, y in zip(aa, aa[1:]))
    assert len(frozen_kernel.claims(a, "smoke")) == 10


N = 200


def _flags(p, shift=0):
    """N 0/1 flags with round(p N) ones, rotated by ``shift`` (to pair them differently)."""
    k = round(p * N)
    f = [1] * k + [0] * (N - k)
    return f[shift:] + f[:shift]


def _kernel(seed, move=0.0, base=None):
    g = torch.Generator().manual_seed(seed)
    F_ = torch.randn(12, 30, generator=g, dtype=torch.float64)
    K = F_ @ F_.T
    return K if base is None else (1 - move) * base + move * K


def _result(aa=(0.10, 0.55, 0.62, 0.66), ref=(0.30, 0.60, 0.66, 0.64), ac=0.70, cc=0.40, ca=0.45, base_a=0.75,
            loss_tail=0.01, kernel_mid=0.1):
    """A synthetic result of ``run`` with 4 freeze times (only what ``analyse`` reads)."""
    T = len(aa)

    def row(robust, shift=0):
        loss = ([2.0 - 0.09 * e for e in range(20)] if loss_tail is None else   # a steady decrease
                [2.0 / (1 + e) + loss_tail * (e >= 15) for e in range(20)])
        return {"robust": list(robust), "clean": [0.98] * T, "robust_flags": [_flags(p, shift) for p in robust],
                "clean_flags": [_flags(0.98)] * T, "loss": [loss] * T}

    first = 0.05
    cells = {"CC": row([first] * (T - 1) + [cc]), "AC": row([first] * (T - 1) + [ac]),
             "CA": row([aa[0]] * (T - 1) + [ca]), "AA": row(aa)}
    cells["AC"]["robust_flags"][0] = cells["CC"]["robust_flags"][0]
    KA_T, KC_T, K0 = _kernel(1), _kernel(2), _kernel(3)
    KA = [K0, _kernel(4, 0.5, KA_T), _kernel(5, kernel_mid, KA_T), KA_T]
    KC = [K0, _kernel(6, 0.5, KC_T), _kernel(7, 0.5, KC_T), KC_T]
    return {"times": [0, 0.25, 1, 3][:T], "actual_times": {"A": [0.0, 0.25, 1.0, 3.0][:T]}, "cells": cells,
            "reference": row(ref, shift=1), "kernels": {"A": KA, "C": KC},
            "base": {p: {"clean": [0.99] * T, "robust": [0.0] * (T - 1) + [base_a],
                         "robust_flags": [_flags(0.0)] * (T - 1) + [_flags(base_a)]} for p in ("C", "A")},
            "autoattack": {"n": 50, "apgd": {m: [0.60] * T for m in frozen_kernel.HEADLINE},
                           "worst": {m: [0.62] * T for m in frozen_kernel.HEADLINE}}}


def test_analyse_against_independent_computations():
    import numpy as np

    res = _result()
    a = frozen_kernel.analyse(res)
    f = {m: np.array(res["cells"][m]["robust_flags"][-1], float) for m in frozen_kernel.CELLS}
    d = f["AC"] - f["CC"]
    assert abs(a["ac_minus_cc"]["diff"] - d.mean()) < 1e-12
    assert abs(a["ac_minus_cc"]["se"] - d.std() / np.sqrt(N)) < 1e-12
    assert abs(a["aa_gain"]["diff"] - 0.56) < 1e-12 and abs(a["aa_minus_ca"]["diff"] - 0.21) < 1e-12
    assert abs(a["robust_se"]["AA"][-1] - np.sqrt(0.66 * 0.34 / N)) < 1e-12
    # the tail share by hand: quarters of 5 epochs
    loss = np.array(res["cells"]["AA"]["loss"][0])
    by_hand = (loss[10:15].mean() - loss[15:].mean()) / (loss[0] - loss[15:].mean())
    assert abs(a["tail_share"]["AA"][0] - by_hand) < 1e-12
    assert a["tail_share_max"] == max(max(v) for v in a["tail_share"].values())
    # kernel angles by hand (centred kernels, arccos of the cosine)
    H = np.eye(12) - 1 / 12

    def angle(K1, K2):
        A, B = H @ K1.numpy() @ H, H @ K2.numpy() @ H
        return np.arccos(np.clip((A * B).sum() / np.linalg.norm(A) / np.linalg.norm(B), -1, 1))

    KA, KC = res["kernels"]["A"], res["kernels"]["C"]
    k = a["kernel"]
    assert k["t_mid"] == 1
    assert abs(k["a_remaining_at_mid"] - angle(KA[2], KA[3]) / angle(KA[0], KA[3])) < 1e-9
    assert abs(k["kd_a_vs_c_last"] - (1 - np.cos(angle(KA[3], KC[3])))) < 1e-9
    assert abs(k["separation"] - (1 - np.cos(angle(KA[3], KC[3]))) / (1 - np.cos(angle(KA[2], KA[3])))) < 1e-9
    assert 0 < k["a_remaining_se"] < 1 and k["separation_se"] > 0
    assert a["autoattack"]["apgd_drop"] == pytest.approx(0.02) and a["autoattack"]["apgd_drop_t"] == 0
    assert a["same_at_0"] is True
    res["cells"]["AA"]["robust_flags"][0] = _flags(0.10, shift=3)
    assert frozen_kernel.analyse(res)["same_at_0"] is False
    assert frozen_kernel.tail_share([1.0, 1.0]) != frozen_kernel.tail_share([1.0, 1.0])     # no decrease: NaN
    with pytest.raises(ValueError):
        frozen_kernel.tail_share([1.0])


def test_claims_have_negative_controls():
    good = frozen_kernel.analyse(_result())

    def set_diff(key, value):
        return lambda a: a[key].__setitem__("diff", value)

    def set_kernel(key, value):
        return lambda a: a["kernel"].__setitem__(key, value)

    assert_negative_controls(frozen_kernel.claims, good, {
        "phase2_converged": set_at("tail_share_max", frozen_kernel.TAIL_SHARE),
        "adversarial_kernel_carries_robustness": set_diff("ac_minus_cc", frozen_kernel.AC_OVER_CC - 0.01),
        "ac_near_its_network": set_diff("ac_minus_base_a", -frozen_kernel.AC_BELOW_BASE - 0.01),
        "aa_gains_with_t": set_diff("aa_gain", frozen_kernel.AA_GAIN - 0.01),
        "aa_rises_with_t": set_at("aa_worst_step", frozen_kernel.AA_STEP),
        "aa_near_reference": set_diff("aa_minus_reference", -frozen_kernel.AA_BELOW_REFERENCE - 0.01),
        "benign_kernel_limits": set_diff("aa_minus_ca", frozen_kernel.AA_OVER_CA - 0.01),
        "kernel_converges_fast": set_kernel("a_remaining_at_mid", frozen_kernel.KERNEL_REMAINING + 0.01),
        "kernel_differs": set_kernel("separation", 0.99 * frozen_kernel.KERNEL_SEPARATION),
        "apgd_agrees": lambda a: a["autoattack"].__setitem__("apgd_drop", frozen_kernel.APGD_DROP + 0.01),
    })
    # from the synthetic result itself: a loss still falling at the end, a kernel that moves late
    spoiled = {c.key: c.holds for c in frozen_kernel.claims(frozen_kernel.analyse(_result(loss_tail=None)), "quick")}
    assert spoiled["phase2_converged"] is False
    spoiled = {c.key: c.holds for c in frozen_kernel.claims(frozen_kernel.analyse(_result(kernel_mid=0.9)), "quick")}
    assert spoiled["kernel_converges_fast"] is False
    # asserted only under quick
    assert not any(c.asserted_under("paper") or c.asserted_under("smoke") for c in frozen_kernel.claims(good, "paper"))


def test_tail_share_se_by_hand():
    import numpy as np

    rng = np.random.default_rng(0)
    loss = list(2.0 / (1 + np.arange(20)) + 0.01 * rng.standard_normal(20))
    tail = np.array(loss[-10:])
    sigma2 = (np.diff(tail) ** 2).sum() / (2 * 9)
    by_hand = np.sqrt(sigma2 * 2 / 5) / (loss[0] - np.mean(loss[-5:]))
    assert frozen_kernel.tail_share_se(loss) == pytest.approx(by_hand)
    assert frozen_kernel.tail_share_se([1.0, 1.0, 1.0, 1.0]) != frozen_kernel.tail_share_se([1.0, 1.0, 1.0, 1.0])
    # a noisier loss has a larger SE
    noisy = list(2.0 / (1 + np.arange(20)) + 0.05 * rng.standard_normal(20))
    assert frozen_kernel.tail_share_se(noisy) > frozen_kernel.tail_share_se(loss)


def test_margins_in_standard_errors():
    a = frozen_kernel.analyse(_result())
    m = frozen_kernel.margins(a)
    assert set(m) == {c.key for c in frozen_kernel.claims(a, "quick") if c.asserted_under("quick")}
    d = a["ac_minus_base_a"]
    assert m["ac_near_its_network"] == pytest.approx((d["diff"] + frozen_kernel.AC_BELOW_BASE) / d["se"])
    d = a["aa_minus_ca"]
    assert m["benign_kernel_limits"] == pytest.approx((d["diff"] - frozen_kernel.AA_OVER_CA) / d["se"])
    assert m["aa_rises_with_t"] == pytest.approx(min(s["diff"] / s["se"] for s in a["aa_steps"]))
    converged = [(frozen_kernel.TAIL_SHARE - s) / se for c in a["tail_share"]
                 for s, se in zip(a["tail_share"][c], a["tail_share_se"][c])]
    assert m["phase2_converged"] == pytest.approx(min(converged))
    # a value nearer its threshold has a smaller margin; one beyond it a negative margin
    a["ac_minus_base_a"]["diff"] = -frozen_kernel.AC_BELOW_BASE - 0.01
    assert frozen_kernel.margins(a)["ac_near_its_network"] < 0


def test_the_last_freeze_time_uses_the_extra_images():
    """With ``final`` in the result, the last freeze time's differences pair the evaluation images
    and the extra ones; the other differences stay on the evaluation images."""
    res = _result()
    extra = {m: {"clean_flags": [1] * 100, "robust_flags": [1] * 50 + [0] * 50} for m in frozen_kernel.FINAL}
    extra["AC"]["robust_flags"] = [1] * 100
    res["final"] = {"n": 100, **extra}
    a, before = frozen_kernel.analyse(res), frozen_kernel.analyse(_result())
    assert a["n_final_eval"] == N + 100 and before["n_final_eval"] == N
    d = (before["ac_minus_base_a"]["diff"] * N + 50) / (N + 100)
    assert a["ac_minus_base_a"]["diff"] == pytest.approx(d)
    assert a["ac_minus_cc"]["diff"] == pytest.approx((before["ac_minus_cc"]["diff"] * N + 50) / (N + 100))
    assert a["aa_gain"] == before["aa_gain"] and a["aa_steps"] == before["aa_steps"]


def test_paper_cost_estimate_arithmetic():
    e = frozen_kernel.paper_cost_estimate()
    h = 15 / 3600
    assert e["phase1"] == pytest.approx(100 * h * 23)
    assert e["linear_adversarial"] == pytest.approx(2 * 9 * 100 * h * 22 * 3)
    assert e["total"] == pytest.approx(e["phase1"] + e["linear_benign"] + e["linear_adversarial"] + e["reference"])
    assert 200 < e["total"] < 1000       # hundreds of GPU hours under the stated assumptions


def test_paper_code_path(paper_profile, tmp_path):
    res = ntklab.experiments.run("frozen_kernel", paper_profile, "cpu", out=tmp_path, progress=False)
    config = frozen_kernel.make_config(paper_profile)
    _check_result(res, config)
    assert res["config"]["train_attack"] == "pgd" and res["config"]["eps"] == 4 / 255
    a = frozen_kernel.analyse(res)                    # one phase-2 epoch: no tail share
    assert a["epochs2"] == 1 and a["tail_share_max"] != a["tail_share_max"]
    assert not any(c.asserted_under(paper_profile) for c in frozen_kernel.claims(a, paper_profile))
    assert {c.key: c.holds for c in frozen_kernel.claims(a, paper_profile)}["phase2_converged"] is False
