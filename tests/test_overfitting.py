"""The ``overfitting`` experiment (chapter 6): result shapes and invariants under ``smoke``, the
cache, the book's collapse rule, and the ``paper`` profile's code path on a tiny CPU subset."""
import copy
import dataclasses
import os

import pytest
import torch

from ntklab import claims as C
from ntklab.config import get_profile
from ntklab.experiments import cache
from ntklab.experiments import overfitting as co

from smoke_runs import rerun_from_cache, smoke_run
from claim_controls import assert_negative_controls, set_at as _set


@pytest.fixture(scope="module")
def overfitting_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "overfitting")


def check_run(run, epochs, eps):
    h = run["history"]
    assert len(h["epoch"]) == epochs and h["finished"]
    assert 0 <= run["robust_acc"] <= run["clean_acc"] <= 1
    assert run["eps"] == eps
    assert run["training_time"] == pytest.approx(sum(h["time_attack"]) + sum(h["time_update"]))
    for key in ("co_robust_acc", "eval_clean_acc", "eval_fgsm_acc"):
        assert len(h["extra"][key]) == epochs and all(0 <= a <= 1 for a in h["extra"][key]), key
    # FGSM-robust (correct clean and after FGSM) <= clean on the same held-out batch, every epoch
    assert all(f <= c for f, c in zip(h["extra"]["eval_fgsm_acc"], h["extra"]["eval_clean_acc"]))
    assert run["detector_flags"] == [e for e, f in enumerate(h["extra"]["co_flag"]) if f]
    assert run["collapse_epoch"] is None or 0 <= run["collapse_epoch"] < epochs


def test_smoke_result(overfitting_run):
    result, out, paths = overfitting_run
    profile = get_profile("smoke")
    cfg = result["config"]
    epochs = cfg["profile"]["epochs"]
    assert [(p.parent, how) for p, how in paths] == [(out / "overfitting", "computed")]
    assert result["methods"] == list(co.METHODS) and result["seeds"] == [profile.seed, profile.seed + 1]
    assert cfg["profile"]["model_kwargs"] == profile.model_kwargs  # smoke keeps its tiny model
    for method in co.METHODS:
        runs = result["runs"][method]
        assert [r["seed"] for r in runs] == result["seeds"] and [r["strategy"] for r in runs] == [method] * 2
        for r in runs:
            check_run(r, epochs, profile.eps)
        assert "autoattack_acc" not in runs[0]  # smoke skips AutoAttack (the paper test runs it)
    check_run(result["pgd_at"], epochs, profile.eps)
    assert list(result["grid"]) == ["fgsm"] and cfg["grid_eps"] == {"fgsm": [0.1]}
    assert [r["eps"] for r in result["grid"]["fgsm"]] == [0.1, profile.eps]
    check_run(result["grid"]["fgsm"][0], epochs, 0.1)
    n = profile.n_probe
    for method in co.KERNEL_METHODS:
        k = result["kernels"][method]
        assert k["epochs"] == list(range(epochs + 1))
        assert k["clean"].shape == k["ae"].shape == (epochs + 1, n, n)
        assert torch.allclose(k["clean"], k["clean"].transpose(1, 2), rtol=1e-4, atol=1e-5 * float(k["clean"].abs().max()))
    # the same initialisation for the kernel runs: identical kernels before training
    assert torch.equal(result["kernels"]["fgsm"]["clean"][0], result["kernels"]["fgsm_aniso"]["clean"][0])
    assert result["probe_y"].shape == (n,)
    assert result["compute_seconds"] > 0
    assert cfg["one_seed"] == [] and cfg["cost_reps"] == 2
    assert sorted(result["step_seconds"]) == sorted(co.METHODS + ("pgd",))
    assert all(0 < t < float("inf") for t in result["step_seconds"].values())


def test_seeds_change_the_run_and_the_same_seed_repeats_it(overfitting_run):
    result = overfitting_run[0]
    a, b = result["runs"]["fgsm"]
    assert a["history"]["loss"] != b["history"]["loss"]
    # the grid's run at the profile's eps is the main run of the first seed, not a new one
    assert result["grid"]["fgsm"][1]["history"]["loss"] == a["history"]["loss"]
    assert result["grid"]["fgsm"][0]["history"]["loss"] != a["history"]["loss"]


def test_smoke_second_run_loads_the_cache(overfitting_run, monkeypatch):
    result, out, _ = overfitting_run
    import ntklab.train

    again, paths = rerun_from_cache("overfitting", out, monkeypatch, ntklab.train, "train")
    assert again["runs"]["fgsm_aniso"][1]["robust_acc"] == result["runs"]["fgsm_aniso"][1]["robust_acc"]
    assert torch.equal(again["kernels"]["fgsm"]["ae"], result["kernels"]["fgsm"]["ae"])
    # the entry, its sidecar and its lock; the checkpoints that let the computation resume are gone
    assert sorted(os.listdir(out / "overfitting")) == sorted(
        [paths[0][0].with_suffix(s).name for s in (".pt", ".json", ".lock")])


def history(pgd, train_acc):
    return {"extra": {"co_robust_acc": pgd}, "train_acc": train_acc}


def test_collapse_rule():
    # falls below the floor while the training accuracy is high: collapse at that epoch
    assert co.collapse_epoch(history([0.1, 0.2, 0.01, 0.0], [0.2, 0.4, 0.6, 0.7])) == 2
    # below the floor only while the model has not learned its own attack yet: no collapse
    assert co.collapse_epoch(history([0.0, 0.02, 0.3], [0.1, 0.3, 0.6])) is None
    # never below the floor
    assert co.collapse_epoch(history([0.1, 0.2, 0.3], [0.6, 0.7, 0.8])) is None
    assert co.collapse_epoch(history([0.1, 0.04], [0.6, 0.7]), floor=0.03) is None
    assert co.collapse_epoch(history([0.1, 0.04], [0.6, 0.7]), floor=0.05) == 1
    assert co.collapse_epoch(history([0.12, 0.09], [0.6, 0.7])) == 1            # default floor: chance, 0.1
    assert co.collapse_epoch(history([0.12, 0.09], [0.6, 0.7]), min_train_acc=0.8) is None
    with pytest.raises(ValueError, match="CatastrophicOverfittingDetector"):
        co.collapse_epoch({"extra": {}, "train_acc": [0.5]})


def test_make_config_per_profile(paper_profile):
    quick = co.make_config(get_profile("quick"))
    assert quick["profile"]["model_kwargs"] == {"width": 16} and quick["profile"]["epochs"] == 6
    assert quick["seeds"] == [0, 1, 2] and quick["channels_last"]
    assert quick["one_seed"] == ["n_fgsm"]  # N-FGSM does not learn at eps 0.3: one seed shows it
    assert co.make_config(get_profile("quick"), methods=("fgsm",))["one_seed"] == []
    assert co.make_config(get_profile("quick").replace(seed=2))["seeds"] == [2, 3, 4]
    paper = co.make_config(paper_profile)
    # the paper profile keeps its own schedule and sizes (here: the tiny fixture's)
    assert paper["profile"]["epochs"] == paper_profile.epochs == 2
    assert list(paper["profile"]["lr_milestones"]) == list(paper_profile.lr_milestones)
    assert paper["profile"]["n_probe"] == paper_profile.n_probe and paper["n_autoattack"] == paper_profile.n_eval
    assert paper["snapshot_every"] == 1 and not paper["channels_last"]
    assert co.make_config(get_profile("paper"))["snapshot_every"] == 10
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        co.make_config(get_profile("smoke"), methods=("fgsm", "free_at"))
    with pytest.raises(ValueError, match="grid_eps must map methods"):
        co.make_config(get_profile("smoke"), grid_eps={"pgd": (0.1,)})
    with pytest.raises(ValueError, match="n_seeds must be an integer >= 1"):
        co.make_config(get_profile("smoke"), n_seeds=0)


def test_overfitting_paper_code_path(paper_profile):
    """The paper profile's code path (CIFAR-10, PreAct ResNet-18) on the tiny fixture, with the two
    kernel methods, one seed and no extra radii to stay seconds-long."""
    with cache.track() as paths:
        result = co.run(paper_profile, "cpu", progress=False, methods=co.KERNEL_METHODS, n_seeds=1, grid_eps={})
    assert [how for _, how in paths] == ["computed"]
    cfg = result["config"]
    assert cfg["profile"]["dataset"] == "cifar10" and cfg["profile"]["model"] == "preact_resnet18"
    assert result["eps"] == pytest.approx(8 / 255) and result["seeds"] == [paper_profile.seed]
    assert co.make_config(paper_profile)["grid_eps"] == {"fgsm": [pytest.approx(4 / 255)],
                                                         "fgsm_rs": [pytest.approx(16 / 255)],
                                                         "fgsm_aniso": [pytest.approx(16 / 255)]}
    for r in [result["runs"][m][0] for m in co.KERNEL_METHODS] + [result["pgd_at"]]:
        assert len(r["history"]["epoch"]) == paper_profile.epochs
        assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
        assert 0 <= r["autoattack_acc"] <= r["clean_acc"]
    assert result["kernels"]["fgsm"]["clean"].shape == (3, 10, 10)
    assert result["grid"] == {}
    a = co.analyse(result)       # a subset of the methods: analyse works, the claims it cannot check fail
    assert a["noise"]["d"] == 3 * 32 * 32 and set(a["methods"]) == {"fgsm", "fgsm_aniso", "pgd"}
    assert not {c.key: c.holds for c in co.claims(a, paper_profile)}["pca_collapses"]


# ------------------------------------------------------------------ settings, analysis, claims
def test_settings_are_frozen_and_follow_the_profiles(paper_profile):
    quick = co.Settings.for_profile(get_profile("quick"))
    assert (quick.epochs, quick.lr, quick.batch_size, quick.n_seeds, quick.pgd_at_steps) == (6, 0.02, 64, 3, 3)
    assert quick.one_seed == ("n_fgsm",) and quick.final_steps == get_profile("quick").eval_pgd_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.epochs = 7
    paper = co.Settings.for_profile(paper_profile)
    assert paper.epochs == paper_profile.epochs and paper.n_final == paper_profile.n_eval
    assert paper.snapshot_every == max(1, paper_profile.epochs // 20)
    # the chapter's profile is the one config["profile"] records
    assert quick.profile(get_profile("quick")).to_dict() == co.make_config(get_profile("quick"))["profile"]


def test_smoke_noise_statistics(overfitting_run):
    noise = overfitting_run[0]["noise"]
    assert noise["d"] == 784 and 0 < noise["basis_rank"] < 784
    assert 0 < noise["share_top10"] < 1 and 0 < noise["constant_pixels"] < 1
    assert sorted(noise["stats"]) == sorted(co.NOISES)
    for s in noise["stats"].values():
        assert 1 <= s["erank"] <= 784 and 0 < s["top10"] <= 1 and s["rms"] > 0


def centred_erank(K):
    """Effective rank of H K H by torch in float64 (independent of ntklab.metrics)."""
    K = K.double()
    n = len(K)
    H = torch.eye(n, dtype=torch.float64) - 1 / n
    lam = torch.linalg.eigvalsh(H @ ((K + K.T) / 2) @ H)
    lam = lam[lam > 0]
    if lam.numel() == 0:
        return float("nan")
    p = lam / lam.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def test_analyse_on_a_smoke_run(overfitting_run):
    result = overfitting_run[0]
    a = co.analyse(result)
    assert set(a["methods"]) == set(co.METHODS) | {"pgd"} and a["n_seeds"] == 2
    fg, an = a["methods"]["fgsm"], a["methods"]["fgsm_aniso"]
    robust = [r["robust_acc"] for r in result["runs"]["fgsm"]]
    assert fg["robust_mean"] == pytest.approx(sum(robust) / 2) and fg["robust"] == robust
    assert fg["collapsed"] == sum(r["collapse_epoch"] is not None for r in result["runs"]["fgsm"])
    assert a["aniso_gaps"] == pytest.approx([x["robust_acc"] - y["robust_acc"] for x, y in
                                             zip(result["runs"]["fgsm_aniso"], result["runs"]["fgsm"])])
    assert a["aniso_gap_min"] == min(a["aniso_gaps"])
    steps = result["step_seconds"]
    assert a["cost_ratio"] == pytest.approx(steps["fgsm_aniso"] / steps["fgsm"]) and an["step_ms"] > 0
    assert a["methods"]["pgd"]["n_runs"] == 1 and a["noise"]["fgsm_pca"] == result["noise"]["stats"]["fgsm_pca"]
    assert [s["seed"] for s in a["fgsm_seeds"]] == result["seeds"]
    assert [r["eps"] for r in a["grid"]["fgsm"]] == [0.1, 0.3]
    assert a["larger"]["aniso_lead"] != a["larger"]["aniso_lead"]       # NaN: smoke has no larger radius
    k = a["kernel"]
    assert k["epochs"] == [0, 1, 2] and set(k["spectra"]) == set(co.KERNEL_METHODS)
    for m in co.KERNEL_METHODS:
        for which in ("clean", "ae"):
            assert k["spectra"][m][which]["erank"] == pytest.approx(
                [centred_erank(K) for K in result["kernels"][m][which]], rel=1e-6, nan_ok=True)
    cl = co.claims(a, "smoke")
    assert len(cl) == len({c.key for c in cl}) == 12
    assert C.check(cl, "smoke") == []          # nothing is asserted at the smoke scale


def test_kernel_analysis_around_a_collapse(overfitting_run):
    """Snapshots before and after the collapse epoch, and the changes, by hand on the smoke kernels
    with the collapse epoch set to 0 (the first epoch)."""
    result = copy.deepcopy(overfitting_run[0])
    result["runs"]["fgsm"][0]["collapse_epoch"] = 0
    k = co.analyse(result)["kernel"]
    assert k["collapsed"] and (k["collapse_epoch"], k["before"], k["after"]) == (0, 0, 1)
    erank = {m: [centred_erank(K) for K in result["kernels"][m]["ae"]] for m in co.KERNEL_METHODS}
    assert k["change"]["fgsm"]["ae"] == pytest.approx(erank["fgsm"][-1] - erank["fgsm"][0], rel=1e-6, nan_ok=True)
    assert k["change_at_once"]["fgsm"]["ae"] == pytest.approx(erank["fgsm"][1] - erank["fgsm"][0], rel=1e-6, nan_ok=True)
    assert k["specificity"] == pytest.approx(k["change"]["fgsm"]["ae"] - k["change"]["fgsm_aniso"]["ae"], nan_ok=True)
    assert sorted(k["ae_eigenvalues"]) == [0, 1, 2]


def good_analysis():
    """A synthetic analysis on which every claim of chapter 6 holds, each at its threshold where
    the threshold is inclusive (so that the controls below check that no threshold was loosened)."""
    return {
        "n_seeds": 3,
        "noise": {"d": 784, "fgsm_pca": {"erank": 60.0}},
        "methods": {"fgsm": {"collapsed": 2}, "fgsm_aniso": {"collapsed": 0}, "fgsm_pca": {"collapsed": 2},
                    "fgsm_rs": {"collapsed": 0}, "n_fgsm": {"clean_mean": 0.5}},
        "aniso_gap_min": 0.1,
        "cost_ratio": 1.2,
        "kernel": {"collapsed": True, "change": {"fgsm": {"ae": 3.0}, "fgsm_aniso": {"ae": 1.0}},
                   "change_at_once": {"fgsm": {"ae": 0.5}}, "specificity": 2.0},
        "larger": {"fgsm_aniso": {"collapsed": 0.0}, "fgsm_rs": {"collapsed": 1.0}, "aniso_lead": 0.1},
    }


def test_claims_negative_controls():
    assert_negative_controls(co.claims, good_analysis(), {
        "fgsm_collapses": _set(("methods", "fgsm", "collapsed"), 1),
        "aniso_no_collapse": _set(("methods", "fgsm_aniso", "collapsed"), 1),
        "aniso_gap": _set(("aniso_gap_min",), 0.0999),
        "aniso_cost": _set(("cost_ratio",), 1.2001),
        "pca_anisotropic": _set(("noise", "fgsm_pca", "erank"), 0.2 * 784),
        "pca_collapses": _set(("methods", "fgsm_pca", "collapsed"), 1),
        "rs_no_collapse": _set(("methods", "fgsm_rs", "collapsed"), 1),
        "ae_erank_rises": _set(("kernel", "change", "fgsm", "ae"), 0.0),
        "ae_rise_at_once": _set(("kernel", "change_at_once", "fgsm", "ae"), -0.1),
        "ae_rise_specific": _set(("kernel", "specificity"), 0.0),
        "aniso_separates": _set(("larger", "aniso_lead"), 0.099),
        "nfgsm_learns": _set(("methods", "n_fgsm", "clean_mean"), 0.1),
    })


@pytest.mark.parametrize("spoil", [
    _set(("kernel", "collapsed"), False),                       # no collapse in the kernel seed
    lambda a: a.__setitem__("kernel", {}),                      # no kernels at all
])
def test_the_kernel_claim_needs_a_collapse(spoil):
    bad = copy.deepcopy(good_analysis())
    spoil(bad)
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["ae_erank_rises"] is False


def test_which_claims_are_asserted():
    cl = co.claims(good_analysis(), "quick")
    assert [c.key for c in C.check(cl, "quick")] == [
        "fgsm_collapses", "aniso_no_collapse", "aniso_gap", "pca_anisotropic",
        "rs_no_collapse", "ae_erank_rises"]  # aniso_cost and pca_collapses did not hold in every run: reported only
    assert C.check(cl, "paper") == []
    # a method the run did not train makes its claims fail rather than raise
    bad = good_analysis()
    del bad["methods"]["fgsm_pca"]
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["pca_collapses"] is False


def test_seed_curves_draws_seeds_and_means():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ntklab import plots

    fig, ax = plt.subplots()
    stacks = {"a": [[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]], "b": [[0.5, 0.5, 0.5]]}
    plots.seed_curves([1, 2, 3], stacks, ax=ax)
    lines = ax.get_lines()
    assert len(lines) == 2 + 1 + 1 + 1          # per label: one line per seed, then the mean
    np.testing.assert_allclose(lines[2].get_ydata(), [0.2, 0.3, 0.4])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="2 values for 3 x values"):
        plots.seed_curves([1, 2, 3], {"c": [[0.1, 0.2]]}, ax=ax)
    plt.close(fig)
