"""The ``strategies`` experiment (chapter 4): its runs on the smoke profile, ``analyse`` checked
against an independent computation, and every claim against a negative control."""
import math

import numpy as np
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import strategies as ch4
from ntklab.experiments.runs import chapter_profile

from claim_controls import assert_negative_controls
from smoke_runs import rerun_from_cache, smoke_run


@pytest.fixture(scope="module")
def strategies_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "strategies")


def test_strategies_result(strategies_run):
    result, out, paths = strategies_run
    cp = chapter_profile(get_profile("smoke"))
    assert result["strategies"] == ["normal", "fgsm_rs", "pgd", "trades"]
    assert sorted(result["runs"]) == ["constant", "cosine", "multistep"]
    assert [(p.parent.name, how) for p, how in paths] == ([("kernel_runs", "computed")] * 6
                                                          + [("strategies", "computed")])
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
    analysis = ch4.analyse(result)  # two epochs, a decay after the first: every number is defined
    assert analysis["first_decay"] == 1 and len(analysis["runs"]["constant"]["normal"]["velocity"]) == 2
    assert [c.key for c in ch4.claims(analysis, "paper")] == [c.key for c in ch4.claims(good_analysis(), "quick")]




def test_settings_hold_the_chapter_profile_and_the_runs(paper_profile):
    st = ch4.Settings.for_profile(get_profile("quick"))
    assert st.profile == chapter_profile(get_profile("quick")) and st.profile.epochs == 20
    assert st.run_specs() == [("normal", "multistep", False), ("fgsm_rs", "multistep", True),
                              ("pgd", "multistep", True), ("trades", "multistep", True),
                              ("normal", "cosine", False), ("normal", "constant", False)]
    assert ch4.Settings.for_profile(paper_profile, strategies=("pgd",), controls=()).run_specs() == [
        ("pgd", "multistep", True)]
    with pytest.raises(Exception):
        st.profile = None  # frozen


# ---------------------------------------------------------------- analyse
def centred_velocity_by_hand(K):
    """1 - cosine of consecutive centred kernels, in float64 (the chapter's four lines)."""
    K = torch.as_tensor(K).double()
    n = K.shape[-1]
    H = torch.eye(n, dtype=K.dtype) - 1.0 / n
    Kc = H @ K @ H
    cos = (Kc[:-1] * Kc[1:]).sum((1, 2)) / (Kc[:-1].norm(dim=(1, 2)) * Kc[1:].norm(dim=(1, 2)))
    return (1 - cos).numpy()


def test_analyse_on_the_smoke_run(strategies_run):
    result, _, _ = strategies_run
    a = ch4.analyse(result)
    step = result["runs"]["multistep"]
    assert (a["epochs"], a["decays"], a["first_decay"], a["decay_index"]) == (4, [2, 3], 2, 2)
    assert a["snapshot_epochs"] == [0, 1, 2, 3, 4] and a["velocity_epochs"] == [1, 2, 3, 4]
    assert a["strategies"] == list(ch4.STRATEGIES) and a["adversarial"] == ["fgsm_rs", "pgd", "trades"]
    assert a["n_runs"] == 6 and 0 < a["kernel_share"] < 1
    for s in ch4.STRATEGIES:
        c, r = a["runs"]["multistep"][s], step[s]
        # the velocities against the computation by hand: per epoch, and divided by the epoch's mean rate
        v = centred_velocity_by_hand(r["kernels"]["clean"])
        assert np.allclose(c["velocity"], v, rtol=1e-10, atol=1e-14)
        assert np.allclose(c["velocity_per_lr"], v / np.asarray(r["lr_time"]), rtol=1e-10, atol=1e-12)
        # the burst and the slow-down, by hand from those curves (decay after epoch 2: entry 2; before: 0, 1)
        v_lr = v / np.asarray(r["lr_time"])
        assert a["burst"][s] == pytest.approx(v_lr[2] / np.median(v_lr[:2]), rel=1e-9)
        assert a["slower"][s] == pytest.approx(v[2:].max() / np.median(v[:2]), rel=1e-9)
        assert a["velocity_after_decay"][s] == pytest.approx(v[2], rel=1e-9)
        assert a["lazy_onset"][s] == ntklab.metrics.lazy_onset(v)
        assert len(a["pairwise"][s]) == 5 and a["pairwise"][s][0][0] == pytest.approx(0, abs=1e-12)
        assert a["effective_rank_end"][s] == c["effective_rank"][-1] > 0
        assert sum(stop - start for _, start, stop in c["phases_per_lr"]) == 4
    for s in a["adversarial"]:
        assert len(a["cross"][s]) == len(a["clean_vs_ae"][s]) == 5 and a["cross"][s][0] == pytest.approx(0, abs=1e-12)
        assert a["apart"][s] == pytest.approx(a["cross"][s][-1] / a["cross"][s][2])
    # the constant rate's rise over the second half (entries 2, 3) against the median before the decay
    constant = result["runs"]["constant"]["normal"]
    const = centred_velocity_by_hand(constant["kernels"]["clean"]) / constant["lr_time"][0]
    assert a["constant_rise"] == pytest.approx(const[2:].max() / np.median(const[:2]), rel=1e-9)
    assert a["n_relearn_per_lr"] == len(a["relearn_per_lr"]) <= 4
    claims = ch4.claims(a, "smoke")
    assert ntklab.claims.check(claims, "smoke") == []  # nothing is asserted under smoke


# ---------------------------------------------------------------- claims
def good_analysis() -> dict:
    """A synthetic analysis of a quick run (20 epochs) on which every claim of chapter 4 holds."""
    names, adv = list(ch4.STRATEGIES), ["fgsm_rs", "pgd", "trades"]
    run = {"centring_ratio": 3.0, "n_phases_per_epoch": 2, "n_phases_per_lr": 2}
    return {"epochs": 20, "strategies": names, "adversarial": adv,
            "runs": {"multistep": {s: dict(run) for s in names}, "cosine": {"normal": dict(run)},
                     "constant": {"normal": dict(run)}},
            "lazy_onset": {s: 2 for s in names}, "slower": {s: 0.6 for s in names}, "burst": {s: 5.0 for s in names},
            "velocity_after_decay": {s: 0.01 for s in names}, "floor": {s: 0.001 for s in names},
            "constant_rise": 1.3, "apart": {s: 1.05 for s in adv},
            "after_decay": {s: 0.01 for s in names}, "lazy_path": {s: 0.1 for s in names},
            "effective_rank_end": {"normal": 36.0, "fgsm_rs": 27.0, "pgd": 26.0, "trades": 30.0},
            "clean_vs_ae": {s: [0.13, 0.05, 0.02] for s in adv}}


def _set(path, value):
    def spoil(a):
        *head, last = path
        for k in head:
            a = a[k]
        a[last] = value(a) if callable(value) else value
    return spoil


CONTROLS = {
    "lazy_early": _set(("lazy_onset", "pgd"), 5),                         # 20 // 4 = 5: not before it
    "slower_after_decay": _set(("slower", "trades"), 1.0),
    "burst_per_lr": _set(("burst", "normal"), 1.99),
    "no_burst_without_step": _set(("constant_rise",), 2.0),
    "no_drawing_apart": _set(("apart", "pgd"), 1.25),
    "centring_matters": _set(("runs", "constant", "normal", "centring_ratio"), 0.9),
    "adversarial_concentrates": _set(("effective_rank_end", "trades"), 36.0),
    "above_bn_floor": _set(("floor", "fgsm_rs"), 0.01 / 2.9),                 # the burst within 3x the floor
}


def test_every_claim_has_a_negative_control():
    assert_negative_controls(ch4.claims, good_analysis(), CONTROLS)


@pytest.mark.parametrize("key, spoil", [
    ("lazy_early", _set(("lazy_onset", "normal"), None)),                        # no lazy phase at all
    ("above_bn_floor", _set(("velocity_after_decay", "pgd"), 0.0)),
    ("no_burst_without_step", _set(("runs", "constant", "normal", "n_phases_per_lr"), 3)),
    ("no_burst_without_step", _set(("runs", "cosine", "normal", "n_phases_per_epoch"), 4)),
    ("no_drawing_apart", _set(("apart", "trades"), 0.75)),                        # drawing together counts too
    ("no_drawing_apart", _set(("after_decay", "normal"), 0.05)),                  # half the lazy path: not less
    ("centring_matters", _set(("runs", "multistep", "pgd", "centring_ratio"), math.nan)),
    ("adversarial_concentrates", _set(("clean_vs_ae", "fgsm_rs"), [0.13, 0.1, 0.07])),  # the AE-NTK stays apart
])
def test_every_part_of_a_claim_can_fail_it(key, spoil):
    a = good_analysis()
    spoil(a)
    assert [c.key for c in ch4.claims(a, "quick") if not c.holds] == [key]


def test_claims_are_asserted_under_quick_only():
    claims = ch4.claims(good_analysis(), "quick")
    # the two statements that did not hold on every seed are reported, never asserted
    assert {c.key for c in claims if c.profiles == ()} == {"slower_after_decay", "above_bn_floor"}
    assert all(c.profiles == ("quick",) for c in claims if c.key not in ("slower_after_decay", "above_bn_floor"))
    spoiled = good_analysis()
    CONTROLS["burst_per_lr"](spoiled)
    with pytest.raises(AssertionError, match="burst_per_lr"):
        ntklab.claims.check(ch4.claims(spoiled, "quick"), "quick")
    assert ntklab.claims.check(ch4.claims(spoiled, "smoke"), "smoke") == []


def test_polar_paths_figure(strategies_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = ch4.analyse(strategies_run[0])
    fig = plt.figure()
    ax = ntklab.plots.polar_paths({s: (p["radius"], p["angle"]) for s, p in a["polar"].items()}, title="polar")
    assert len(ax.lines) == 4 and ax.name == "polar"
    assert np.degrees(max(max(p["angle"]) for p in a["polar"].values())) <= ax.get_thetamax() <= 180
    with pytest.raises(ValueError, match="radii"):
        ntklab.plots.polar_paths({"x": ([0.0, 1.0], [0.0])}, ax=fig.add_subplot(projection="polar"))
    plt.close("all")
