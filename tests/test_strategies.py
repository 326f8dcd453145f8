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
    assert [(p.parent.name, how) for p, how in paths] == ([("kernel_runs", "computed")] * 7
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
        assert r["bn_refresh"].shape == (cp.n_probe, cp.n_probe) and torch.equal(r["bn_refresh"], k["refreshed"][-1])
        assert 0 < ntklab.metrics.kernel_distance(r["bn_refresh"], k["clean"][-1]) < 0.5
        # K_0 on refreshed statistics, its twin itself; the default-buffer K_0 apart and different
        assert k["refreshed"].shape == k["clean"].shape and torch.equal(k["refreshed"][0], k["clean"][0])
        assert ntklab.metrics.kernel_distance(k["clean_default_init"], k["clean"][0], center=True) > 1e-4
        assert len(r["cpu_epoch_seconds"]) == cp.epochs and min(r["cpu_epoch_seconds"]) > 0
        assert r["cpu_training_time"] == pytest.approx(sum(r["cpu_epoch_seconds"]))
    step = result["runs"]["multistep"]
    assert step["pgd"]["cpu_training_time"] > step["normal"]["cpu_training_time"]  # PGD-2 epochs cost more
    base = result["baseline"]  # normal training from another seed: another K_0, the same probe
    assert base["history"]["strategy"] == ["normal"] * cp.epochs and "ae" in base["kernels"]
    assert not torch.equal(base["kernels"]["clean"][0], first) and torch.equal(base["probe_y"], result["probe_y"])
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
    assert len(list((out / "kernel_runs").glob("*.pt"))) == 7
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


def test_paper_structure_snapshots_every_few_epochs(paper_profile, monkeypatch):
    """Under ``paper`` the runs take a kernel every ``epochs // 50`` epochs: everything is indexed
    by snapshot epoch (a stride of 2 over 4 epochs here; the velocity curves have 2 entries while
    there are 4 epochs of learning rates)."""
    from ntklab.experiments import runs

    monkeypatch.setattr(runs.RunSettings, "for_profile", classmethod(lambda cls, p: cls(snapshot_every=2)))
    profile = paper_profile.replace(epochs=4)
    result = experiments.run("strategies", profile, "cpu", progress=False)
    for group in result["runs"].values():
        for r in group.values():
            assert r["kernels"]["epochs"] == [0, 2, 4] and len(r["lr_time"]) == 4
    a = ch4.analyse(result)
    assert a["snapshot_epochs"] == [0, 2, 4] and a["velocity_epochs"] == [2, 4] and a["decays"] == [2, 3]
    assert a["decay_index"] == 1 and a["before"] == [0] and a["first_decay"] == 2
    lr = np.asarray(result["runs"]["multistep"]["normal"]["lr_time"])
    tau = np.concatenate([[0.0], np.cumsum(lr)])[[0, 2, 4]] / profile.lr
    for s in ch4.STRATEGIES:
        c = a["runs"]["multistep"][s]
        K = result["runs"]["multistep"][s]["kernels"]["clean"]
        assert np.allclose(c["velocity"], centred_angles_by_hand(K, [0, 2, 4]), rtol=1e-9)
        assert np.allclose(c["velocity_per_tau"], centred_angles_by_hand(K, tau), rtol=1e-9)
        assert len(c["floor"]) == 3 and len(c["motion_over_floor"]) == 2
    assert len(a["cross"]["pgd"]) == 3 and len(a["seed_angle"]) == 3
    claims = ch4.claims(a, "paper")
    assert [c.key for c in claims] == [c.key for c in ch4.claims(good_analysis(), "quick")]
    assert ntklab.claims.check(claims, "paper") == []  # quick thresholds are not asserted under paper




def test_settings_hold_the_chapter_profile_and_the_runs(paper_profile):
    st = ch4.Settings.for_profile(get_profile("quick"))
    assert st.profile == chapter_profile(get_profile("quick")) and st.profile.epochs == 20
    assert st.run_specs() == [("normal", "multistep", False), ("fgsm_rs", "multistep", True),
                              ("pgd", "multistep", True), ("trades", "multistep", True),
                              ("normal", "cosine", False), ("normal", "constant", False)]
    assert ch4.Settings.for_profile(paper_profile, strategies=("pgd",), controls=()).run_specs() == [
        ("pgd", "multistep", True)]
    assert st.baseline_spec() == {"strategy": "normal", "schedule": "multistep", "ae": True,
                                  "seed": st.profile.seed + ch4.BASELINE_SEED_OFFSET}
    with pytest.raises(Exception):
        st.profile = None  # frozen


# ---------------------------------------------------------------- analyse
def centred_angles_by_hand(K, times):
    """arccos of the cosine of consecutive centred kernels over the time between them, in numpy."""
    K = np.asarray(torch.as_tensor(K).double())
    n = K.shape[-1]
    H = np.eye(n) - 1.0 / n
    Kc = [H @ k @ H for k in K]
    cos = [np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(Kc[:-1], Kc[1:])]
    return np.arccos(np.clip(cos, -1, 1)) / np.diff(np.asarray(times, dtype=float))


def angle_by_hand(K1, K2):
    n = K1.shape[-1]
    H = np.eye(n) - 1.0 / n
    a, b = (H @ np.asarray(torch.as_tensor(k).double()) @ H for k in (K1, K2))
    return float(np.arccos(np.clip(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def test_analyse_on_the_smoke_run(strategies_run):
    result, _, _ = strategies_run
    a = ch4.analyse(result)
    step = result["runs"]["multistep"]
    lr0 = result["config"]["profile"]["lr"]
    assert (a["epochs"], a["decays"], a["first_decay"], a["decay_index"], a["before"]) == (4, [2, 3], 2, 2, [0, 1])
    assert a["snapshot_epochs"] == [0, 1, 2, 3, 4] and a["velocity_epochs"] == [1, 2, 3, 4]
    assert a["strategies"] == list(ch4.STRATEGIES) and a["adversarial"] == ["fgsm_rs", "pgd", "trades"]
    assert a["n_runs"] == 7 and 0 < a["kernel_share"] < 1
    for s in ch4.STRATEGIES:
        c, r = a["runs"]["multistep"][s], step[s]
        K = r["kernels"]["clean"]
        # angles per epoch and per unit of tau (epochs at the initial rate), by hand
        w = centred_angles_by_hand(K, range(5))
        tau = np.concatenate([[0.0], np.cumsum(r["lr_time"])]) / lr0
        w_tau = centred_angles_by_hand(K, tau)
        assert np.allclose(c["velocity"], w, rtol=1e-9) and np.allclose(c["velocity_per_tau"], w_tau, rtol=1e-9)
        assert a["burst"][s] == pytest.approx(w_tau[2] / np.median(w_tau[:2]), rel=1e-9)
        # the floor at every snapshot: the angle to the statistics-refreshed twin
        R = r["kernels"]["refreshed"]
        assert c["floor"][0] == pytest.approx(0, abs=1e-6)
        assert c["floor"][3] == pytest.approx(angle_by_hand(K[3], R[3]), rel=1e-9)
        assert a["over_floor"][s] == pytest.approx(w[2] / angle_by_hand(K[3], R[3]), rel=1e-9)
        # the default-buffer K_0 and its inflation of the first velocity
        assert a["default_inflation"][s] == pytest.approx(angle_by_hand(r["kernels"]["clean_default_init"], K[1]) / w[0],
                                                          rel=1e-9)
        onset = ntklab.metrics.lazy_onset(w, lazy_below=ch4.LAZY_BELOW)
        assert c["lazy_onset"] == onset and a["lazy_onset_epoch"][s] == (None if onset is None else onset + 1)
        assert len(a["pairwise"][s]) == 5 and a["pairwise"][s][0][0] == pytest.approx(0, abs=1e-6)
        assert a["effective_rank_end"][s] == c["effective_rank"][-1] > 0
        assert c["norm"][2] == pytest.approx(np.linalg.norm(np.asarray(K[2], dtype=float)), rel=1e-6)
        assert sum(stop - start for _, start, stop in c["phases_per_tau"]) == 4
        p, q, n = c["robust_acc"], a["runs"]["multistep"]["normal"]["robust_acc"], a["n_eval"]
        assert a["robust_gap"][s] == pytest.approx(p - q)
        assert a["robust_gap_se"][s] == pytest.approx(np.sqrt(p * (1 - p) / n + q * (1 - q) / n))
    base = result["baseline"]["kernels"]["clean"]
    assert a["seed_angle"][2] == pytest.approx(angle_by_hand(step["normal"]["kernels"]["clean"][2], base[2]), rel=1e-9)
    for s in a["adversarial"]:
        assert len(a["cross"][s]) == len(a["clean_vs_ae"][s]) == 5 and a["cross"][s][0] == pytest.approx(0, abs=1e-6)
        assert a["apart"][s] == pytest.approx((a["cross"][s][-1] - a["cross"][s][2]) / a["seed_angle"][2])
        assert a["agree"][s] == pytest.approx(a["cross"][s][2] / a["seed_angle"][2])
    assert "normal_baseline" in a["ae_convergence"]
    # the constant rate's rise over the second half (entries 2, 3) against the median before the decay
    constant = result["runs"]["constant"]["normal"]
    const = centred_angles_by_hand(constant["kernels"]["clean"], range(5))
    assert a["constant_rise"] == pytest.approx(const[2:].max() / np.median(const[:2]), rel=1e-9)
    assert a["n_relearn_per_tau"] == len(a["relearn_per_tau"]) <= 4
    claims = ch4.claims(a, "smoke")
    assert ntklab.claims.check(claims, "smoke") == []  # nothing is asserted under smoke


# ---------------------------------------------------------------- claims
def good_analysis() -> dict:
    """A synthetic analysis of a quick run (20 epochs) on which every claim of chapter 4 holds."""
    names, adv = list(ch4.STRATEGIES), ["fgsm_rs", "pgd", "trades"]
    return {"epochs": 20, "strategies": names, "adversarial": adv,
            "robust_gap": {s: 0.5 for s in adv}, "lazy_onset_epoch": {s: 2 for s in names},
            "burst": {s: 5.0 for s in names}, "constant_rise": 1.3, "cosine_rise": 3.0,
            "over_floor": {s: 10.0 for s in names}, "stops": {s: 0.5 for s in names},
            "agree": {s: 0.9 for s in adv}, "apart": {s: 0.05 for s in adv},
            "rank_drop": {s: 8.0 for s in adv}, "erank_seed_gap": 1.0,
            "ae_convergence": {"fgsm_rs": 0.3, "pgd": 0.3, "trades": 0.3, "normal_baseline": 0.8},
            "n_at_lazy_earlier": 3, "expand": {s: 0.3 for s in adv}}


def _set(path, value):
    def spoil(a):
        *head, last = path
        for k in head:
            a = a[k]
        a[last] = value(a) if callable(value) else value
    return spoil


T = ch4.THRESHOLDS
CONTROLS = {
    "adversarial_runs_are_robust": _set(("robust_gap", "trades"), T["robust_gap"]),
    "lazy_early": _set(("lazy_onset_epoch", "pgd"), 6),                           # 20 // 4 = 5: not after it
    "burst_per_tau": _set(("burst", "normal"), T["burst"] * 0.99),
    "no_burst_without_step": _set(("constant_rise",), T["constant_rise"]),
    "cosine_rises_at_small_rates": _set(("cosine_rise",), T["cosine_rise"] * (0.99 if T["cosine_op"][0] == ">" else 1.01)),
    "above_floor": _set(("over_floor", "fgsm_rs"), T["over_floor"] * 0.99),
    "li_reading_a_kernel_keeps_moving": _set(("stops", "pgd"), T["stops"]),         # a kernel that stopped
    "li_reading_b_strategies_differ": _set(("agree", "pgd"), T["agree"]),            # as close as half the seeds
    "no_drawing_apart": _set(("apart", "pgd"), T["apart"] * 1.01),
    "adversarial_concentrates": _set(("rank_drop", "trades"), 2.0),                # twice the seed gap: not more
    "ae_ntk_converges_under_at_only": _set(("ae_convergence", "pgd"), T["ae_convergence"]),
    "tsilivis_kempe_at_lazy_earlier": _set(("n_at_lazy_earlier",), 2),
    "at_kernels_expand_less": _set(("expand", "fgsm_rs"), T["expand"]),
}


def test_every_claim_has_a_negative_control():
    assert_negative_controls(ch4.claims, good_analysis(), CONTROLS)


@pytest.mark.parametrize("key, spoil", [
    ("lazy_early", _set(("lazy_onset_epoch", "normal"), None)),                   # no lazy phase at all
    ("no_drawing_apart", _set(("apart", "trades"), -T["apart"] * 1.01)),          # drawing together counts too
    ("ae_ntk_converges_under_at_only", _set(("ae_convergence", "normal_baseline"), 0.3)),  # normal too
    ("adversarial_concentrates", _set(("erank_seed_gap",), 4.5)),                 # within the seed spread
    ("burst_per_tau", _set(("burst", "pgd"), math.nan)),
])
def test_every_part_of_a_claim_can_fail_it(key, spoil):
    a = good_analysis()
    spoil(a)
    assert [c.key for c in ch4.claims(a, "quick") if not c.holds] == [key]


def test_claims_are_asserted_under_quick_only():
    claims = ch4.claims(good_analysis(), "quick")
    observed = {c.key for c in claims if c.profiles == ()}
    assert observed == {"tsilivis_kempe_at_lazy_earlier", "above_floor", "adversarial_concentrates"}
    assert all(c.profiles == ("quick",) for c in claims if c.key not in observed)
    spoiled = good_analysis()
    CONTROLS["burst_per_tau"](spoiled)
    with pytest.raises(AssertionError, match="burst_per_tau"):
        ntklab.claims.check(ch4.claims(spoiled, "quick"), "quick")
    assert ntklab.claims.check(ch4.claims(spoiled, "smoke"), "smoke") == []
    assert ntklab.claims.check(ch4.claims(spoiled, "paper"), "paper") == []


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


def test_smoke_snapshots_every_two_epochs_with_an_uneven_last_stride(monkeypatch):
    """Kernels every 2 epochs against the per-epoch learning-rate vector ``lr_time`` (the ``paper``
    structure, issue 20): over 5 epochs the snapshots are 0, 2, 4, 5 (a last stride of one epoch),
    a decay (after 2) falls on a snapshot and one (after 4, rounded from 3.75) on the last stride.
    Every per-snapshot number has one entry per snapshot or stride, the per-tau clock sums the
    epochs' rates over each stride, and what chapter 4's notebook draws from them lines up."""
    from ntklab.experiments import runs

    monkeypatch.setattr(runs.RunSettings, "for_profile",
                        classmethod(lambda cls, p: cls(epochs=5, width=8, eps=0.15, pgd_steps=2, n_probe=12,
                                                       snapshot_every=2)))
    profile = get_profile("smoke").replace(n_train=128, n_test=64, n_eval=32)
    result = experiments.run("strategies", profile, "cpu", progress=False)
    ticks = [0, 2, 4, 5]
    for group in result["runs"].values():
        for r in group.values():
            assert r["kernels"]["epochs"] == ticks and len(r["lr_time"]) == 5
    a = ch4.analyse(result)
    assert a["snapshot_epochs"] == ticks and a["velocity_epochs"] == [2, 4, 5]
    assert a["decays"] == [2, 4] and a["first_decay"] == 2
    lr = np.asarray(result["runs"]["cosine"]["normal"]["lr_time"])
    tau = np.concatenate([[0.0], np.cumsum(lr)])[ticks] / profile.lr
    c = a["runs"]["cosine"]["normal"]
    assert np.allclose(c["tau"], tau) and len(c["velocity_per_tau"]) == 3
    K = result["runs"]["cosine"]["normal"]["kernels"]["clean"]
    assert np.allclose(c["velocity_per_tau"], centred_angles_by_hand(K, tau), rtol=1e-9)
    assert np.allclose(c["velocity"], centred_angles_by_hand(K, ticks), rtol=1e-9)
    assert a["cosine_late_epochs"] == [e + 1 for e in range(5) if lr[e] < 0.1 * profile.lr]
    for s in ch4.STRATEGIES:
        r = a["runs"]["multistep"][s]
        assert len(r["floor"]) == 4 and len(r["motion_over_floor"]) == 3 and len(r["velocity_refreshed"]) == 3
        # the notebook's motion per stride: the velocity times the stride's epochs
        assert len(np.asarray(r["velocity"]) * np.diff(a["snapshot_epochs"])) == len(a["velocity_epochs"])
    assert len(a["pairwise"]["pgd"]) == 4 and len(a["polar"]["pgd"]["radius"]) == 4
    claims = ch4.claims(a, "smoke")
    assert ntklab.claims.check(claims, "smoke") == []
    ntklab.claims.table(claims, "smoke")
