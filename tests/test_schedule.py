"""The ``schedule`` experiment (chapter 5): the shared normal prefix gives the very runs of
``train(..., switch_epoch=s)``, the smoke and paper code paths, ``analyse`` checked against an
independent computation, and every claim against a negative control."""
import numpy as np
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import schedule as ch5
from ntklab.experiments._schedule_runs import _CopyCheckpoints

from claim_controls import assert_negative_controls, set_at as _set


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule")
    return experiments.run("schedule", "smoke", "cpu", out=out, progress=False)


def test_settings_per_profile(paper_profile):
    quick = ch5.Settings.for_profile(get_profile("quick"))
    cp = quick.profile
    assert (cp.epochs, cp.lr_milestones, cp.n_train, cp.batch_size, cp.eps, cp.pgd_steps) == (10, (5, 8), 1000, 64, 0.15, 3)
    assert quick.cap == 5 and quick.switch_grid == list(range(1, 11)) and quick.control_switches == [2, 5]
    assert quick.seeds == [0, 1, 2] and quick.apgd_labels == ["s=0", "s=5", "fgsm_rs"]
    assert quick.labels() == ["s=0"] + [f"s={s}" for s in range(1, 11)] + ["late s=2", "late s=5", "fgsm_rs"]
    assert (quick.autoattack_n, quick.auto_threshold, quick.auto_probe) == (200, 0.2, 32)
    seeded = ch5.Settings.for_profile(get_profile("quick").replace(seed=7))
    assert seeded.seeds == [7, 8, 9]
    smoke = ch5.Settings.for_profile(get_profile("smoke"))
    assert smoke.n_seeds == 2 and smoke.switch_grid == [1, 2, 3, 4] and (smoke.cost_rounds, smoke.cost_batches) == (3, 2)
    # paper: every 20th epoch, the decays and the normal run's 200 (the book's coarser grid)
    paper = ch5.Settings.for_profile(get_profile("paper"))
    assert paper.cap == 100 and paper.control_switches == [50, 100]
    assert paper.switch_grid == [20, 40, 60, 80, 100, 120, 140, 150, 160, 180, 200]
    assert sum(200 - s for s in paper.switch_grid) == 950   # PGD-AT epochs of the grid per seed, as documented


def test_continued_run_is_the_switched_run(tmp_path):
    """The shared prefix: a run continued from a normal run's checkpoint after s epochs equals
    ``train(..., switch_epoch=s)`` bit for bit (weights, momentum, history apart from times)."""
    from ntklab.train import TrainConfig, train

    cp = ch5.chapter_profile(get_profile("smoke"))
    train_set, _ = experiments.data_from_profile(cp)

    def fresh():
        ntklab.config.seed_everything(3)
        return experiments.model_from_profile(cp)

    config = TrainConfig.from_profile(cp, "pgd", seed=3, eval_every=0)
    E = cp.epochs
    # the prefix: the normal run (switch at E), its checkpoint copied after 1 and E - 1 epochs (before the decay
    # and after it), each copy continued with its switch
    prefix = tmp_path / "prefix"
    train(fresh(), train_set, config.replace(switch_epoch=E), checkpoint_dir=prefix, progress=False,
          callbacks=[_CopyCheckpoints(prefix, [1, E - 1])])
    assert sorted(p.name for p in prefix.glob("after_*.pt")) == ["after_1.pt", f"after_{E - 1}.pt"]
    for s in (1, E - 1):
        direct = fresh()
        h_direct = train(direct, train_set, config.replace(switch_epoch=s), progress=False)
        ch5.continue_with_switch(prefix / f"after_{s}.pt", s, config.replace(switch_epoch=s), tmp_path / f"cont{s}")
        continued = fresh()
        h_cont = train(continued, train_set, config.replace(switch_epoch=s), checkpoint_dir=tmp_path / f"cont{s}",
                       progress=False)
        for k, v in direct.state_dict().items():
            assert torch.equal(v, continued.state_dict()[k]), (s, k)
        assert h_cont.strategy == h_direct.strategy == ["normal"] * s + ["pgd"] * (E - s)
        assert h_cont.loss == h_direct.loss and h_cont.switch_epoch == h_direct.switch_epoch == s
        assert h_cont.lr == h_direct.lr
    with pytest.raises(ValueError, match="switch_epoch must be 2"):
        ch5.continue_with_switch(prefix / "after_1.pt", 2, config.replace(switch_epoch=1), tmp_path / "x")
    with pytest.raises(ValueError, match="not 2 normal"):
        ch5.continue_with_switch(prefix / "after_1.pt", 2, config.replace(switch_epoch=2), tmp_path / "x")


def test_smoke_run(schedule_run):
    result = schedule_run
    cp = ch5.chapter_profile(get_profile("smoke"))
    assert result["seeds"] == [0, 1] and result["grid"] == [1, 2, 3, 4] and result["controls"] == [1, 2]
    for seed in ("0", "1"):
        runs = result["runs"][seed]
        assert list(runs) == ["s=0", "s=1", "s=2", "s=3", "s=4", "late s=1", "late s=2", "fgsm_rs"]
        for s in (0, 1, 2, 3, 4):   # s = 4 = E: the normal run, the shared prefix
            assert runs[f"s={s}"]["history"]["strategy"] == ["normal"] * s + ["pgd"] * (cp.epochs - s)
        for s in (1, 2):  # the late controls: PGD-AT for the last E - s epochs, at the switched run's rates
            h = runs[f"late s={s}"]["history"]
            assert h["strategy"] == ["pgd"] * (cp.epochs - s) and h["lr"] == runs[f"s={s}"]["history"]["lr"][s:]
        assert runs["fgsm_rs"]["history"]["strategy"] == ["fgsm_rs"] * cp.epochs
        for r in runs.values():
            assert len(r["robust_flags"]) == cp.n_eval and r["robust_acc"] == np.mean(r["robust_flags"])
            assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
            assert len(r["cpu_epoch_seconds"]) == len(r["history"]["epoch"])
        assert [runs[l]["apgd_acc"] is None for l in runs] == [False, True, False, True, True, True, True, False]
        kern = result["kernels"][seed]
        assert kern["epochs"] == [0, 1, 2] and kern["normal"].shape == kern["pgd"].shape == (3, cp.n_probe, cp.n_probe)
        assert torch.equal(kern["normal"][0], kern["pgd"][0])  # one initialisation, one reference kernel
        auto = result["auto"][seed]
        assert 1 <= auto["switch_epoch"] <= 2 and auto["cpu_seconds"] > 0 and len(auto["velocities"]) == auto["switch_epoch"]
    assert not torch.equal(result["kernels"]["0"]["normal"][1], result["kernels"]["1"]["normal"][1])  # two seeds
    assert sorted(result["step_seconds"]) == ["fgsm_rs", "normal", "pgd"]
    assert all(len(v) == 3 and min(v) > 0 for v in result["step_seconds"].values())
    assert result["cpu_seconds"] > 0 and result["compute_seconds"] > 0


def test_schedule_paper_code_path(paper_profile):
    result = experiments.run("schedule", paper_profile, "cpu", progress=False)
    assert result["grid"] == [1, 2] and result["controls"] == [1] and len(result["seeds"]) == 3
    a = ch5.analyse(result)
    assert a["cap"] == 1 and a["auto_switch"] == [1, 1, 1]
    assert ntklab.claims.check(ch5.claims(a, "paper"), "paper") == []
    assert [c.key for c in ch5.claims(a, "paper")] == list(CONTROLS)


# ---------------------------------------------------------------- analyse
def test_paired_over_seeds_by_hand():
    p = ch5.paired_over_seeds([0.8, 0.7, 0.9], [0.7, 0.7, 0.6])
    d = np.array([0.1, 0.0, 0.3])
    assert p["mean"] == pytest.approx(d.mean()) and p["seed_se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
    assert p["high"] - p["mean"] == pytest.approx(4.303 * p["seed_se"]) and p["se"] == p["seed_se"]
    from scipy import stats

    assert 4.303 == pytest.approx(stats.t.ppf(0.975, 2), abs=1e-3)
    fa, fb = [[1, 1, 0, 1], [1, 0, 0, 1]], [[1, 0, 0, 1], [0, 0, 1, 1]]
    q = ch5.paired_over_seeds([0.75, 0.5], [0.5, 0.5], fa, fb)
    pooled = np.array([0, 1, 0, 0, 1, 0, -1, 0], dtype=float)
    assert q["example_se"] == pytest.approx(pooled.std() / np.sqrt(8)) and q["se"] == max(q["seed_se"], q["example_se"])


def test_paired_combination_by_hand():
    """The rate comparison of claim delay_faster: per seed and per pooled example, by hand."""
    values = {"a": [0.8, 0.7], "b": [0.6, 0.6], "c": [0.3, 0.5]}
    flags = {"a": [[1, 1, 0, 1], [1, 0, 1, 1]], "b": [[1, 0, 0, 1], [0, 1, 1, 0]], "c": [[0, 0, 0, 1], [0, 0, 1, 0]]}
    w = {"a": -1 / 2, "b": 1 / 2 + 1 / 3, "c": -1 / 3}
    p = ch5.paired_combination(w, values, flags)
    d = np.array([(0.6 - 0.3) / 3 - (0.8 - 0.6) / 2, (0.6 - 0.5) / 3 - (0.7 - 0.6) / 2])
    assert p["diffs"] == pytest.approx(d) and p["mean"] == pytest.approx(d.mean())
    assert p["seed_se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(2))
    fa, fb, fc = (np.array(sum(flags[k], []), dtype=float) for k in "abc")
    per = (fb - fc) / 3 - (fa - fb) / 2
    assert p["example_se"] == pytest.approx(per.std() / np.sqrt(8)) and p["se"] == max(p["seed_se"], p["example_se"])
    # two labels with weights 1, -1: the paired difference
    q = ch5.paired_combination({"a": 1, "b": -1}, values, flags)
    r = ch5.paired_over_seeds(values["a"], values["b"], flags["a"], flags["b"])
    assert q["mean"] == pytest.approx(r["mean"]) and q["se"] == pytest.approx(r["se"])
    assert np.isnan(ch5.paired_combination({}, values, flags)["mean"])


def test_step_ratio_se_by_hand():
    steps = {"normal": [1.0, 1.1, 0.9, 1.0], "pgd": [3.0, 3.3, 2.7, 3.1]}
    r = ch5.step_ratio_se(steps)
    assert r["value"] == pytest.approx(np.median(steps["pgd"]) / np.median(steps["normal"]))
    assert 0 < r["se"] < 1 and r["low"] <= r["value"] <= r["high"]


def test_analyse_on_the_smoke_run(schedule_run):
    result = schedule_run
    a = ch5.analyse(result)
    k, E, seeds = 2, 4, ["0", "1"]
    R = result["runs"]
    assert (a["epochs"], a["cap"], a["pgd_steps"], a["grid"], a["n_seeds"]) == (E, 2, k, [1, 2, 3, 4], 2)
    for label in a["labels"]:
        h = R["0"][label]["history"]["strategy"]
        assert a["passes"][label] == h.count("normal") + (k + 1) * h.count("pgd") + 2 * h.count("fgsm_rs")
        assert a["robust"][label] == [R[s][label]["robust_acc"] for s in seeds]
        costs = [sum(R[s][label]["cpu_epoch_seconds"]) for s in seeds]
        assert a["cost"][label] == pytest.approx(costs)
        saving = [1 - c / f for c, f in zip(costs, [sum(R[s]["s=0"]["cpu_epoch_seconds"]) for s in seeds])]
        assert a["cpu_saving"][label]["mean"] == pytest.approx(np.mean(saving))
        loss = [R[s]["s=0"]["robust_acc"] - R[s][label]["robust_acc"] for s in seeds]
        assert a["loss"][label]["diffs"] == pytest.approx(loss)
    for s in (1, 2, 3, 4):
        assert a["pass_saving"][f"s={s}"] == pytest.approx(s / E * k / (k + 1))
    for s in (1, 2):
        gain = [R[x][f"s={s}"]["robust_acc"] - R[x][f"late s={s}"]["robust_acc"] for x in seeds]
        assert a["prefix_gain"][s]["diffs"] == pytest.approx(gain)
    # the switches up to the first decay, and claim delay_faster by hand: the loss per epoch of delay from 2 to 3
    # (the last decay) minus the loss per epoch from 1 to 2 (the first decay), per seed
    assert a["before_decay"] == [1, 2] and a["after_decay"] == [3]
    assert a["grid_min_robust"] == min(R[x][f"s={s}"]["robust_acc"] for x in seeds for s in (1, 2))
    assert a["delay_span"] == {"before": [1, 2], "after": [2, 3]}
    rate = [(R[x]["s=2"]["robust_acc"] - R[x]["s=3"]["robust_acc"]) - (R[x]["s=1"]["robust_acc"] - R[x]["s=2"]["robust_acc"])
            for x in seeds]
    assert a["delay_faster"]["diffs"] == pytest.approx(rate)
    # the automatic schedule is the grid's run at its switch, its cost plus the measurements'
    for i, s in enumerate(seeds):
        e = result["auto"][s]["switch_epoch"]
        assert a["robust"]["auto"][i] == R[s][f"s={e}"]["robust_acc"]
        assert a["cost"]["auto"][i] == pytest.approx(sum(R[s][f"s={e}"]["cpu_epoch_seconds"]) + result["auto"][s]["cpu_seconds"])
        # chapter 4's rule on the normal prefix's kernels, by hand
        K = result["kernels"][s]["normal"]
        v = [ntklab.metrics.kernel_angle(K[t], K[t + 1], center=True) for t in range(len(K) - 1)]
        assert np.allclose(a["normal_velocity"][i], v, rtol=1e-10)
        onset = ntklab.metrics.lazy_onset(v, lazy_below=np.sqrt(0.2))
        assert a["lazy_switch"][i] == (min(onset + 1, 2) if onset is not None else 2)
        assert a["auto_gap"][i] == e - a["lazy_switch"][i]
        Kp = result["kernels"][s]["pgd"]
        assert a["switch_distance"][i] == pytest.approx(ntklab.metrics.kernel_distance(K[e], Kp[e], center=True))
    steps = result["step_seconds"]
    c = {m: np.median(v) for m, v in steps.items()}
    assert a["step_ratio"] == pytest.approx(c["pgd"] / c["normal"])
    assert a["predicted_saving"][2] == pytest.approx(2 / E * (1 - c["normal"] / c["pgd"]))
    assert a["pass30"] == 2  # 2/4 * 2/3 = 1/3
    assert a["to_full"]["s=0"] == pytest.approx(0, abs=1e-9)
    assert ntklab.claims.check(ch5.claims(a, "smoke"), "smoke") == []  # nothing is asserted under smoke


# ---------------------------------------------------------------- claims
def good_analysis() -> dict:
    """A synthetic analysis of a quick run (three seeds, grid 1..5, decay after 5) on which every
    claim of chapter 5 holds, the observations included."""
    def paired(mean, se=0.01):
        return {"mean": mean, "se": se, "seed_se": se, "low": mean - 4.3 * se, "high": mean + 4.3 * se, "diffs": [mean] * 3}

    labels = ["s=0"] + [f"s={s}" for s in range(1, 11)] + ["late s=2", "late s=5", "fgsm_rs"]
    a = {"labels": labels, "grid": list(range(1, 11)), "controls": [2, 5], "cap": 5, "epochs": 10, "pgd_steps": 3,
         "delay_span": {"before": [1, 5], "after": [5, 8]},
         "n_seeds": 3, "n_eval": 500, "step_ratio": 4.2, "step_ratio_se": 0.1, "pass30": 4, "measured30": 4,
         "robust": {"s=0": [0.72, 0.70, 0.71]}, "grid_min_robust": 0.6, "auto_gap": [0, 1, 0],
         "measure_share": [0.05, 0.06, 0.04], "switch_distance": [0.02, 0.02, 0.01], "seed_distance": [0.02, 0.02, 0.02]}
    a["loss"] = {"s=1": paired(0.0), "s=2": paired(0.005), "s=3": paired(0.01), "s=4": paired(0.02), "s=5": paired(0.08),
                 "late s=2": paired(0.05), "late s=5": paired(0.2), "fgsm_rs": paired(0.1), "auto": paired(0.01)}
    a["cpu_saving"] = {f"s={s}": paired(0.08 * s) for s in range(1, 6)}
    a["saving_ratio"] = paired(1.05, 0.03)
    a["later_cost"] = paired(0.15)
    a["delay_faster"] = paired(0.04)
    a["prefix_gain"] = {2: paired(0.25), 5: paired(0.4)}
    a["fgsm_vs_last"] = paired(-0.02)
    return a


def _paired(mean):
    return {"mean": mean, "se": 0.01, "seed_se": 0.01, "low": mean - 0.05, "high": mean + 0.05, "diffs": [mean] * 3}


CONTROLS = {
    "full_pgd_trains": _set("robust", "s=0", [0.72, 0.28, 0.71]),          # one seed did not take off
    "switches_train": _set("grid_min_robust", 0.49),
    "p30_keeps": _set("loss", "s=4", _paired(0.1)),                        # exactly the threshold: not less
    "later_costs": _set("later_cost", _paired(0.08)),
    "delay_faster": _set("delay_faster", _paired(0.01)),                   # no faster after the decay than the threshold
    "prefix_helps": _set("prefix_gain", 5, _paired(0.2)),
    "step_cost": _set("step_ratio", 2.9),                                   # cheaper than the passes say
    "saving_measured": _set("saving_ratio", _paired(1.3)),
    "thirty_where_counted": _set("measured30", -1),                         # no switch saves 30%
    "auto_lazy": _set("auto_gap", [0, 2, 0]),                               # two epochs after the onset on a seed
    "fgsm_rs_reliable": _set("fgsm_vs_last", {**_paired(-0.1), "diffs": [0.02, -0.5, 0.1]}),
    "kernels_at_switch": _set("switch_distance", [0.05, 0.06, 0.05]),       # farther apart than two seeds
}


@pytest.mark.parametrize("key, spoil", [
    ("auto_lazy", _set("auto_gap", [0, -2, 0])),                 # two epochs before the onset
    ("auto_lazy", _set("measure_share", [0.05, 0.1, 0.04])),     # measuring costs too much
    ("step_cost", _set("step_ratio", 5.6)),                      # dearer than the passes say
    ("saving_measured", _set("saving_ratio", _paired(0.74))),
    ("thirty_where_counted", _set("measured30", 2)),             # two epochs before the passes' 30% point
])
def test_every_part_of_a_claim_can_fail_it(key, spoil):
    a = good_analysis()
    spoil(a)
    assert [c.key for c in ch5.claims(a, "quick") if not c.holds] == [key]


def test_margins_in_standard_errors():
    a = good_analysis()
    m = ch5.margins(a)
    assert m["later_costs"] == pytest.approx((0.15 - ch5.THRESHOLDS["later_cost"]) / 0.01)
    assert m["delay_faster"] == pytest.approx((0.04 - ch5.THRESHOLDS["delay_faster"]) / 0.01)
    assert m["switches_train"] == pytest.approx((0.6 - ch5.THRESHOLDS["robust"]) / np.sqrt(0.6 * 0.4 / 500))
    assert m["thirty_where_counted"] == pytest.approx(min(abs(0.4 - 0.3), abs(0.16 - 0.3)) / 0.01)


def test_observations_are_never_asserted():
    spoiled = good_analysis()
    observations = ("full_pgd_trains", "p30_keeps", "fgsm_rs_reliable", "kernels_at_switch", "saving_measured",
                    "thirty_where_counted")
    for key in observations:
        CONTROLS[key](spoiled)
    cl = ch5.claims(spoiled, "quick")
    assert sorted(c.key for c in cl if not c.holds) == sorted(observations)
    assert not any(c.profiles for c in cl if c.key in observations)
    assert ntklab.claims.check(cl, "quick")  # nothing raised


def test_every_claim_has_a_negative_control():
    assert_negative_controls(ch5.claims, good_analysis(), CONTROLS)


def test_claims_are_asserted_under_quick_only():
    spoiled = good_analysis()
    CONTROLS["switches_train"](spoiled)
    with pytest.raises(AssertionError, match="switches_train"):
        ntklab.claims.check(ch5.claims(spoiled, "quick"), "quick")
    assert ntklab.claims.check(ch5.claims(spoiled, "paper"), "paper") == []


def test_figures_of_the_chapter(schedule_run):
    """plots.switch_grid and plots.auto_switch_curves draw from an analysis; plots.cost_robustness,
    the chapter's earlier figure, keeps working for callers of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = ch5.analyse(schedule_run)
    fig, axes = plt.subplots(1, 2)
    ntklab.plots.switch_grid(a, axes=axes)
    assert len(axes[0].get_lines()) >= a["n_seeds"] and list(axes[1].get_xticks()) == [0] + a["grid"]
    fig, axes = plt.subplots(1, 3)   # with the robust accuracy itself: one line per seed, and the decays
    ntklab.plots.switch_grid(a, axes=axes)
    assert len(axes[2].get_lines()) == a["n_seeds"] + 1 + len(a["decays"])
    assert [line.get_xdata()[0] for line in axes[2].get_lines()[:len(a["decays"])]] == a["decays"]
    fig, ax = plt.subplots()
    ntklab.plots.auto_switch_curves(a, ax=ax)
    assert len(ax.get_legend().get_texts()) == a["n_seeds"] + 2
    cost, robust = {"full": 50.0, "switch": 40.0, "normal": 15.0}, {"full": 0.8, "switch": 0.78, "normal": 0.0}
    fig, ax = plt.subplots()
    ntklab.plots.cost_robustness(cost, robust, {l: v - 0.02 for l, v in robust.items()}, band=(0.77, 0.80),
                                 names={"normal": "normal (no AT)"}, at_edge=["normal"], ax=ax)
    low, high = ax.get_ylim()
    assert low == pytest.approx(0.76 - 0.05) and high == pytest.approx(0.85)
    plt.close("all")
