"""The ``schedule`` experiment (chapter 5): its runs on the smoke profile (sharing chapter 4's),
``analyse`` checked against an independent computation, and every claim against a negative control."""
import numpy as np
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import cache
from ntklab.experiments import schedule as ch5
from ntklab.experiments import strategies as ch4
from ntklab.experiments.runs import chapter_profile

from claim_controls import assert_negative_controls, set_at as _set


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory):
    """Chapter 4's full PGD-AT and normal runs (the two this chapter shares), then chapter 5, in one
    results folder: (chapter 4's result, chapter 5's, the cache's record of chapter 5's entries)."""
    out = tmp_path_factory.mktemp("schedule")
    with cache.using_root(out):
        shared = ch4.run(get_profile("smoke"), "cpu", strategies=("normal", "pgd"), controls=(), progress=False)
    with cache.track() as paths:
        result = experiments.run("schedule", "smoke", "cpu", out=out, progress=False)
    return shared, result, paths


def test_settings_per_profile(paper_profile):
    quick = ch5.Settings.for_profile(get_profile("quick"))
    assert quick.profile == chapter_profile(get_profile("quick"))
    assert quick.switch_epochs == [0, 5, 10]  # 0, half-way to and at the first decay (after epoch 10)
    assert (quick.autoattack_n, quick.auto_threshold, quick.auto_probe) == (200, 0.2, 32)
    assert ch5.Settings.for_profile(get_profile("smoke")).autoattack_n == 32
    assert (quick.cost_rounds, quick.cost_batches) == (7, 4)
    assert ch5.make_config(get_profile("quick"))["cost"] == {"rounds": 7, "batches": 4, "seed": 0}
    smoke = ch5.Settings.for_profile(get_profile("smoke"))
    assert (smoke.cost_rounds, smoke.cost_batches) == (3, 2)
    assert ch5.Settings.for_profile(paper_profile).autoattack_n == paper_profile.n_eval
    assert [spec[0] for spec in quick.run_specs()] == ["s=0", "s=5", "s=10", "auto", "normal"]
    auto = dict((label, kw) for label, _, kw, _ in quick.run_specs())["auto"]
    assert auto == {"switch_epoch": "auto", "switch_threshold": 0.2, "switch_probe": 32}
    no_decay = ch5.Settings(get_profile("quick").replace(epochs=8, lr_milestones=()), autoattack_n=1)
    assert no_decay.switch_epochs == [0, 2, 4]  # half the epochs stands in for the first decay


def test_schedule_shares_chapter_4_runs_and_switches_where_it_says(schedule_run):
    shared, result, paths = schedule_run
    cp = chapter_profile(get_profile("smoke"))
    assert result["labels"] == ["s=0", "s=1", "s=2", "auto", "normal"]  # 0, 1/2 and all of the first decay
    # full PGD-AT and normal training are chapter 4's runs, loaded; the others are computed
    how = [(p.parent.name, h) for p, h in paths]
    assert how.count(("kernel_runs", "loaded")) == 2 and how.count(("kernel_runs", "computed")) == 3
    assert how[-1] == ("schedule", "computed")
    assert torch.equal(result["runs"]["s=0"]["kernels"]["clean"],
                       shared["runs"]["multistep"]["pgd"]["kernels"]["clean"])
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
    # the per-batch step costs, measured after the runs by ntklab.clock.step_cost
    assert sorted(result["step_seconds"]) == ["normal", "pgd"]
    assert all(0 < t < float("inf") for t in result["step_seconds"].values())


def test_schedule_paper_code_path(paper_profile):
    result = experiments.run("schedule", paper_profile, "cpu", progress=False)
    assert result["labels"] == ["s=0", "s=1", "auto", "normal"]  # first decay after epoch 1
    assert result["switch_epochs"] == {"s=0": 0, "s=1": 1, "auto": 1, "normal": 2}
    assert all(0 <= r["autoattack_acc"] <= 1 for r in result["runs"].values())
    analysis = ch5.analyse(result)
    assert analysis["fixed"] == ["s=0", "s=1"] and analysis["last"] == "s=1" and analysis["cap"] == 1
    assert [c.key for c in ch5.claims(analysis, "paper")] == list(CONTROLS)


# ---------------------------------------------------------------- analyse
def test_analyse_on_the_smoke_run(schedule_run):
    _, result, _ = schedule_run
    a = ch5.analyse(result)
    runs, k = result["runs"], 2  # smoke: PGD-2, 4 epochs, decays after 2 and 3
    assert (a["epochs"], a["decays"], a["cap"], a["pgd_steps"], a["tolerance"]) == (4, [2, 3], 2, k, 0.03)
    assert a["fixed"] == ["s=0", "s=1", "s=2"] and (a["half"], a["last"]) == ("s=1", "s=2")
    # passes by hand from the histories, and the saving the chapter's formula predicts for a fixed switch
    for label in result["labels"]:
        h = runs[label]["history"]["strategy"]
        assert a["passes"][label] == h.count("normal") + (k + 1) * h.count("pgd")
        assert a["loss"][label] == runs["s=0"]["robust_acc"] - runs[label]["robust_acc"]
    assert a["passes"]["s=0"] == 4 * (k + 1) and a["passes"]["normal"] == 4
    for label in a["fixed"]:
        assert a["saving"][label] == pytest.approx(a["predicted_saving"][label], abs=1e-12)
    assert a["saving"]["s=2"] == pytest.approx(1 - (2 + 2 * 3) / 12)
    good = [l for l in a["fixed"] if a["loss"][l] <= 0.03]
    assert a["recommended"] == max(good, key=lambda l: a["switch_epoch"][l])
    assert a["recommended_saving"] == a["saving"][a["recommended"]]
    assert runs[a["best"]]["robust_acc"] == max(runs[l]["robust_acc"] for l in a["fixed"])
    # the automatic switch: its velocities from the history, its measurement share, normal training's curve
    auto = runs["auto"]["history"]
    assert a["auto_velocity"] == [v for v in auto["extra"]["switch_velocity"] if v is not None] and a["auto_velocity"]
    assert a["measure_share"] == pytest.approx(sum(auto["time_switch"]) / runs["auto"]["training_time"])
    K = runs["normal"]["kernels"]["clean"]
    by_hand = [ntklab.metrics.kernel_distance(K[t], K[t + 1], center=True) / runs["normal"]["lr_time"][t]
               for t in range(4)]
    assert np.allclose(a["normal_velocity_per_lr"], by_hand, rtol=1e-10)
    assert a["normal_lazy_onset"] == ntklab.metrics.lazy_onset(by_hand)
    assert a["to_full"]["s=0"] == pytest.approx(0, abs=1e-12) and a["to_full"]["normal"] > 0
    assert set(a["jump"]) == {"s=1", "s=2", "auto"} and len(a["velocity"]["s=1"]) == 4
    c = result["step_seconds"]
    assert a["step_seconds"] == c and a["step_ratio"] == pytest.approx(c["pgd"] / c["normal"])
    assert a["step_cost"]["s=0"] == pytest.approx(1) and a["step_saving"]["normal"] == pytest.approx(
        1 - c["normal"] / c["pgd"])
    assert ntklab.claims.check(ch5.claims(a, "smoke"), "smoke") == []  # nothing is asserted under smoke


def test_step_cost_analysis_by_hand(schedule_run):
    """The smoke run with synthetic per-batch costs: a PGD step 4 times a normal one."""
    _, result, _ = schedule_run
    result = {**result, "step_seconds": {"normal": 0.01, "pgd": 0.04}}
    a = ch5.analyse(result)
    assert a["step_ms"] == pytest.approx({"normal": 10.0, "pgd": 40.0}) and a["step_ratio"] == pytest.approx(4.0)
    # E = 4 epochs: (s * 0.01 + (4 - s) * 0.04) / (4 * 0.04)
    by_hand = {"s=0": 1.0, "s=1": 0.13 / 0.16, "s=2": 0.10 / 0.16, "auto": 0.10 / 0.16, "normal": 0.04 / 0.16}
    assert a["step_cost"] == pytest.approx(by_hand)
    assert a["step_saving"] == pytest.approx({l: 1 - v for l, v in by_hand.items()})
    assert a["half_step_saving"] == pytest.approx(0.1875) and a["last_step_saving"] == pytest.approx(0.375)
    assert a["auto_step_saving"] == pytest.approx(0.375)
    assert a["recommended_step_saving"] == pytest.approx(1 - by_hand[a["recommended"]])
    # with c_pgd = (k + 1) c_normal the predicted saving is the one counted in passes
    k = a["pgd_steps"]
    equal = ch5.analyse({**result, "step_seconds": {"normal": 1.0, "pgd": k + 1.0}})
    assert equal["step_saving"] == pytest.approx(equal["saving"])


# ---------------------------------------------------------------- claims
def good_analysis() -> dict:
    """A synthetic analysis of a quick run (switches at 0, 5, 10; decay after 10) on which every
    claim of chapter 5 holds."""
    labels = ["s=0", "s=5", "s=10", "auto", "normal"]
    return {"labels": labels, "fixed": labels[:3], "tolerance": 0.03, "cap": 10, "best": "s=0",
            "pgd_steps": 3, "step_ratio": 3.5,
            "robust_acc": {"s=0": 0.80, "s=5": 0.79, "s=10": 0.74, "auto": 0.785, "normal": 0.0},
            "cpu_training_time": {"s=0": 50.0, "s=5": 42.0, "s=10": 33.0, "auto": 45.0, "normal": 15.0},
            "saving": {"s=0": 0.0, "s=5": 0.1875, "s=10": 0.375, "auto": 0.15, "normal": 0.75},
            "half_loss": 0.01, "half_saving": 0.1875, "last_loss": 0.06, "last_saving": 0.375,
            "recommended_saving": 0.1875, "switch_epoch": {"s=0": 0, "s=5": 5, "s=10": 10, "auto": 4, "normal": 20},
            "measure_share": 0.01, "to_full": {"s=0": 0.0, "s=5": 0.02, "s=10": 0.03, "auto": 0.02, "normal": 0.08}}


CONTROLS = {
    "pgd_trains": _set("robust_acc", "s=0", 0.749),
    "half_keeps_robustness": _set("half_loss", 0.031),
    "decay_costs_robustness": _set("last_loss", 0.03),                 # exactly the tolerance: not more
    "saving_below_30": _set("recommended_saving", 0.30),
    "auto_switch": _set("switch_epoch", "auto", 1),
    "kernel_trace": _set("to_full", "s=10", 0.08),                     # as far as normal training's
    "cpu_normal_cheaper": _set("cpu_training_time", "normal", 50.0),
    "pgd_step_cost": _set("step_ratio", 2.0),                          # exactly twice: not more
}


def test_every_claim_has_a_negative_control():
    assert_negative_controls(ch5.claims, good_analysis(), CONTROLS)


@pytest.mark.parametrize("key, spoil", [
    ("half_keeps_robustness", _set("half_saving", 0.09)),       # within the tolerance, but saving too little
    ("decay_costs_robustness", _set("last_saving", 0.24)),      # the largest saving, but under 25%
    ("auto_switch", _set("switch_epoch", "auto", 11)),          # after the cap
    ("auto_switch", _set("robust_acc", "auto", 0.769)),         # more than the tolerance below the best fixed choice
    ("auto_switch", _set("measure_share", 0.02)),               # measuring costs too much
    ("auto_switch", _set("measure_share", 0.0)),                # no measurement at all
    ("kernel_trace", _set("to_full", "s=5", 0.0)),              # equal to full PGD-AT's kernel
])
def test_every_part_of_a_claim_can_fail_it(key, spoil):
    a = good_analysis()
    spoil(a)
    assert [c.key for c in ch5.claims(a, "quick") if not c.holds] == [key]


def test_claims_are_asserted_under_quick_only():
    spoiled = good_analysis()
    CONTROLS["pgd_trains"](spoiled)
    with pytest.raises(AssertionError, match="pgd_trains"):
        ntklab.claims.check(ch5.claims(spoiled, "quick"), "quick")
    assert ntklab.claims.check(ch5.claims(spoiled, "paper"), "paper") == []


def test_step_cost_claim_is_an_observation():
    spoiled = good_analysis()
    CONTROLS["pgd_step_cost"](spoiled)
    cl = ch5.claims(spoiled, "quick")
    assert [c.key for c in cl if not c.holds] == ["pgd_step_cost"]
    assert "pgd_step_cost" not in [c.key for c in ntklab.claims.check(cl, "quick")]  # reported, not asserted
    assert "observation" in str(ntklab.claims.table(cl, "quick")).splitlines()[-1]


def test_cost_robustness_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = good_analysis()
    strong = {l: v - 0.02 for l, v in a["robust_acc"].items()}
    fig, ax = plt.subplots()
    ntklab.plots.cost_robustness(a["cpu_training_time"], a["robust_acc"], strong, band=(0.77, 0.80),
                                 names={"normal": "normal (no AT)"}, at_edge=["normal"], ax=ax)
    low, high = ax.get_ylim()
    assert low == pytest.approx(0.74 - 0.02 - 0.05) and high == pytest.approx(0.85)
    assert len(ax.collections) >= 2 * 5 and "normal (no AT)" in [t.get_text() for t in ax.texts]
    plt.close("all")
