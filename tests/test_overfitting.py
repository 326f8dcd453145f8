"""The ``overfitting`` experiment (chapter 6): result shapes and invariants under ``smoke``, the
cache, the book's collapse rule, and the ``paper`` profile's code path on a tiny CPU subset."""
import copy
import math
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
        assert [r["seed"] for r in runs] == result["seeds"] and [r["method"] for r in runs] == [method] * 2
        assert [r["strategy"] for r in runs] == [co.SPECS[method][0]] * 2
        for r in runs:
            check_run(r, epochs, profile.eps)
        assert "autoattack_acc" not in runs[0]  # smoke skips AutoAttack (the paper test runs it)
    check_run(result["pgd_at"], epochs, profile.eps)
    assert list(result["grid"]) == ["fgsm"] and cfg["grid_eps"] == {"fgsm": [0.1]}
    assert [r["eps"] for r in result["grid"]["fgsm"]] == [0.1, profile.eps]
    check_run(result["grid"]["fgsm"][0], epochs, 0.1)
    n = profile.n_probe
    for method in co.METHODS:        # kernels in every seed of the kernel methods, in no other run
        for r in result["runs"][method]:
            assert ("kernels" in r) == (method in co.KERNEL_METHODS)
    for method in co.KERNEL_METHODS:
        for r in result["runs"][method]:
            k = r["kernels"]
            assert k["epochs"] == list(range(epochs + 1)) and set(k) == {"epochs", "clean"}
            assert k["clean"].shape == (epochs + 1, n, n)
            assert torch.allclose(k["clean"], k["clean"].transpose(1, 2), rtol=1e-4,
                                  atol=1e-5 * float(k["clean"].abs().max()))
    # the same initialisation in every method of a seed: identical kernels before training
    for a, b in zip(result["runs"]["fgsm"], result["runs"]["fgsm_logscale"]):
        assert torch.equal(a["kernels"]["clean"][0], b["kernels"]["clean"][0])
    assert not torch.equal(*[r["kernels"]["clean"][0] for r in result["runs"]["fgsm"]])
    assert result["probe_y"].shape == (n,)
    assert result["compute_seconds"] > 0
    assert cfg["cost_reps"] == 2 and cfg["gauss"] == co.GAUSS_SCALE
    assert sorted(result["step_seconds"]) == sorted(co.METHODS + ("pgd",))
    assert all(0 < t < float("inf") for t in result["step_seconds"].values())


def test_method_specs():
    cfg = co.make_config(get_profile("quick"))
    assert co.method_spec("fgsm", 0.28, cfg) == ("fgsm", None, {})
    assert co.method_spec("fgsm_rs", 0.28, cfg) == ("fgsm_rs", None, {})          # its own step, 1.25 eps
    assert co.method_spec("rs_step", 0.28, cfg) == ("fgsm_rs", 0.28, {})           # step matched: eps
    assert co.method_spec("gauss", 0.28, cfg) == ("fgsm_logscale", None, {"low": 0.357, "high": 0.357})
    assert co.method_spec("pca_floor", 0.28, cfg) == ("fgsm_pca", None, {"floor": cfg["pca_floor"]})
    assert co.method_spec("n_fgsm", 0.2, cfg) == ("n_fgsm", None, {"noise": pytest.approx(0.2 * cfg["nfgsm_noise"])})
    assert co.method_spec("gradalign", 0.28, cfg) == ("gradalign", None, {})        # a strategy, lambda in config
    assert cfg["gradalign_lambda"] > 0 and set(co.REMEDIES) <= set(co.METHODS)
    assert set(co.SPECS) == set(co.METHODS) and set(co.CONTROLS) <= set(co.METHODS)


def test_gauss_scale_matches_the_logscale_noise():
    """GAUSS_SCALE: a Gaussian of this std (in eps), clipped to the ball, has the root mean square of
    fgsm_logscale's clipped noise (Monte Carlo, 10^6 draws)."""
    import numpy as np

    rng = np.random.default_rng(1)
    z = rng.standard_normal(10**6)
    logscale = np.sqrt(np.mean(np.clip(np.exp(rng.uniform(-3, 0, 10**6)) * z, -1, 1) ** 2))
    gauss = np.sqrt(np.mean(np.clip(co.GAUSS_SCALE * rng.standard_normal(10**6), -1, 1) ** 2))
    assert gauss == pytest.approx(logscale, rel=0.005)


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
    assert again["runs"]["fgsm_logscale"][1]["robust_acc"] == result["runs"]["fgsm_logscale"][1]["robust_acc"]
    assert torch.equal(again["runs"]["fgsm"][1]["kernels"]["clean"], result["runs"]["fgsm"][1]["kernels"]["clean"])
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


def test_collapse_rule_with_a_robust_phase():
    """With ``robust`` a collapse needs an earlier epoch at or above it: never at epoch 0, not from a
    low peak, and the first qualifying fall after the robust phase counts."""
    assert co.collapse_epoch(history([0.05, 0.3, 0.02], [0.6, 0.7, 0.8]), robust=0.3) == 2
    assert co.collapse_epoch(history([0.05, 0.3, 0.02], [0.6, 0.7, 0.8])) == 0           # without: epoch 0
    assert co.collapse_epoch(history([0.05, 0.29, 0.02], [0.6, 0.7, 0.8]), robust=0.3) is None  # a low peak
    assert co.collapse_epoch(history([0.5, 0.05, 0.6, 0.01], [0.6, 0.4, 0.7, 0.8]), robust=0.3) == 3
    assert co.collapse_epoch(history([0.09], [0.9]), robust=0.0) is None                 # nothing earlier


def test_detector_min_best():
    """CatastrophicOverfittingDetector(min_best=...): a fall flags only once the best was robust."""
    from ntklab.callbacks import CatastrophicOverfittingDetector
    from ntklab.train import History

    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    for min_best, flags in ((0.0, [False, False, True, False, True]), (0.3, [False, False, False, False, True])):
        det = CatastrophicOverfittingDetector(x, y, eps=0.1, drop=0.1, min_best=min_best)
        values = iter([0.2, 0.25, 0.05, 0.4, 0.05])
        det.robust_accuracy = lambda model: next(values)
        h = History()
        for epoch in range(5):
            h.append(epoch=epoch, strategy="fgsm")
            det.on_epoch_end(epoch, None, h)
        assert h.extra["co_flag"] == flags
    with pytest.raises(ValueError, match="min_best must be in"):
        CatastrophicOverfittingDetector(x, y, eps=0.1, min_best=1.5)


def test_make_config_per_profile(paper_profile):
    quick = co.make_config(get_profile("quick"))
    s = co.Settings.for_profile(get_profile("quick"))
    assert quick["profile"]["model_kwargs"] == {"width": 16} and quick["profile"]["epochs"] == s.epochs
    assert quick["profile"]["eps"] == s.eps and quick["lr_schedule"] == s.lr_schedule
    # the PGD step scales with the radius: eps / 4 as in the profile
    assert quick["profile"]["pgd_alpha"] == pytest.approx(s.eps / 4)
    assert quick["seeds"] == [0, 1, 2] and quick["channels_last"] and not quick["pgd_at"]
    assert quick["profile"]["n_train"] == s.n_train == 2500 and quick["gradalign_lambda"] == co.GRADALIGN_LAMBDA
    assert "gradalign" in quick["one_seed"]
    assert co.make_config(get_profile("quick").replace(seed=2))["seeds"] == [2, 3, 4]
    paper = co.make_config(paper_profile)
    # the paper profile keeps its model and sizes (here: the tiny fixture's) and trains a short
    # cosine schedule, as the CO literature does (the book's guess)
    assert paper["profile"]["epochs"] == 30 and paper["lr_schedule"] == "cosine"
    assert list(paper["profile"]["lr_milestones"]) == []
    assert paper["profile"]["n_probe"] == paper_profile.n_probe and paper["n_autoattack"] == paper_profile.n_eval
    assert paper["snapshot_every"] == 1 and not paper["channels_last"] and paper["pgd_at"]
    assert paper["nfgsm_noise"] == 2.0
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        co.make_config(get_profile("smoke"), methods=("fgsm", "free_at"))
    with pytest.raises(ValueError, match="grid_eps must map methods"):
        co.make_config(get_profile("smoke"), grid_eps={"pgd": (0.1,)})
    with pytest.raises(ValueError, match="n_seeds must be an integer >= 1"):
        co.make_config(get_profile("smoke"), n_seeds=0)


def test_overfitting_paper_code_path(paper_profile, monkeypatch):
    """The paper profile's code path (CIFAR-10, PreAct ResNet-18) on the tiny fixture, with the two
    kernel methods, one seed, two epochs and no extra radii to stay seconds-long."""
    real = co.Settings.for_profile
    monkeypatch.setattr(co.Settings, "for_profile", classmethod(
        lambda cls, p: dataclasses.replace(real(p), epochs=2)))
    with cache.track() as paths:
        result = co.run(paper_profile, "cpu", progress=False, methods=co.KERNEL_METHODS, n_seeds=1, grid_eps={})
    assert [how for _, how in paths] == ["computed"]
    cfg = result["config"]
    assert cfg["profile"]["dataset"] == "cifar10" and cfg["profile"]["model"] == "preact_resnet18"
    assert result["eps"] == pytest.approx(8 / 255) and result["seeds"] == [paper_profile.seed]
    for r in [result["runs"][m][0] for m in co.KERNEL_METHODS] + [result["pgd_at"]]:
        assert len(r["history"]["epoch"]) == 2
        assert 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
        assert 0 <= r["autoattack_acc"] <= r["clean_acc"] and isinstance(r["autoattack_flags"], list)
    assert result["runs"]["fgsm"][0]["kernels"]["clean"].shape == (3, 10, 10)
    assert result["grid"] == {}
    a = co.analyse(result)       # a subset of the methods: analyse works, the claims it cannot check fail
    assert a["noise"]["d"] == 3 * 32 * 32 and set(a["methods"]) == {"fgsm", "fgsm_logscale", "pgd"}
    assert not {c.key: c.holds for c in co.claims(a, paper_profile)}["pca_collapses"]


# ------------------------------------------------------------------ settings, analysis, claims
def test_settings_are_frozen_and_follow_the_profiles(paper_profile):
    quick = co.Settings.for_profile(get_profile("quick"))
    assert (quick.n_seeds, quick.co_robust, quick.co_floor) == (3, 0.25, 0.1)
    assert quick.final_steps == get_profile("quick").eval_pgd_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.epochs = 7
    paper = co.Settings.for_profile(paper_profile)
    assert paper.n_final == paper_profile.n_eval and paper.eps == paper_profile.eps
    # the chapter's profile is the one config["profile"] records
    assert quick.profile(get_profile("quick")).to_dict() == co.make_config(get_profile("quick"))["profile"]


def test_smoke_noise_statistics(overfitting_run):
    noise = overfitting_run[0]["noise"]
    assert noise["d"] == 784 and 0 < noise["basis_rank"] < 784
    assert 0 < noise["share_top10"] < 1 and 0 < noise["constant_pixels"] < 1
    assert sorted(noise["stats"]) == sorted(co.NOISES)
    for s in noise["stats"].values():
        assert 1 <= s["erank"] <= 784 and 0 < s["top10"] <= 1 and s["rms"] > 0
    st = noise["stats"]
    # the floor spreads fgsm_pca's noise (higher effective rank, larger rms); the Gaussian control
    # matches fgsm_logscale's rms
    assert st["pca_floor"]["erank"] > st["fgsm_pca"]["erank"] and st["pca_floor"]["rms"] > st["fgsm_pca"]["rms"]
    assert st["gauss"]["rms"] == pytest.approx(st["fgsm_logscale"]["rms"], rel=0.03)


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


def centred_angle(A, B):
    """Angle between the centred kernels, by torch in float64 (independent of ntklab.metrics)."""
    import math

    n = len(A)
    H = torch.eye(n, dtype=torch.float64) - 1 / n
    a, b = (H @ A.double() @ H).flatten(), (H @ B.double() @ H).flatten()
    return math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))


def test_analyse_on_a_smoke_run(overfitting_run):
    result = overfitting_run[0]
    a = co.analyse(result)
    assert set(a["methods"]) == set(co.METHODS) | {"pgd"} and a["n_seeds"] == 2
    fg, ls = a["methods"]["fgsm"], a["methods"]["fgsm_logscale"]
    robust = [r["robust_acc"] for r in result["runs"]["fgsm"]]
    assert fg["robust_mean"] == pytest.approx(sum(robust) / 2) and fg["robust"] == robust
    assert fg["collapsed"] == sum(r["collapse_epoch"] is not None for r in result["runs"]["fgsm"])
    assert fg["min_pgd"] == [min(r["history"]["extra"]["co_robust_acc"]) for r in result["runs"]["fgsm"]]
    assert a["logscale_gaps"] == pytest.approx([x["robust_acc"] - y["robust_acc"] for x, y in
                                                zip(result["runs"]["fgsm_logscale"], result["runs"]["fgsm"])])
    assert a["logscale_gap_min"] == min(a["logscale_gaps"])
    steps = result["step_seconds"]
    assert a["cost_ratio"] == pytest.approx(steps["fgsm_logscale"] / steps["fgsm"]) and ls["step_ms"] > 0
    assert a["methods"]["pgd"]["n_runs"] == 1 and a["noise"]["fgsm_pca"] == result["noise"]["stats"]["fgsm_pca"]
    assert [s["seed"] for s in a["fgsm_seeds"]] == result["seeds"]
    assert [r["eps"] for r in a["grid"]["fgsm"]] == [0.1, 0.3]
    k = a["kernel"]
    assert [s["seed"] for s in k["seeds"]] == result["seeds"]
    for s, f, c in zip(k["seeds"], result["runs"]["fgsm"], result["runs"]["fgsm_logscale"]):
        assert s["epochs"] == [0, 1, 2]
        assert s["erank"]["fgsm"] == pytest.approx([centred_erank(K) for K in f["kernels"]["clean"]], rel=1e-6,
                                                   nan_ok=True)
        assert s["erank"]["control"] == pytest.approx([centred_erank(K) for K in c["kernels"]["clean"]], rel=1e-6,
                                                      nan_ok=True)
    cl = co.claims(a, "smoke")
    assert len(cl) == len({c.key for c in cl}) == 16
    ga = a["methods"]["gradalign"]       # GradAlign: by hand from its run
    assert ga["min_after_robust"] == pytest.approx([co._min_after(r["history"]["extra"]["co_robust_acc"], 0.25)
                                                    for r in result["runs"]["gradalign"]], nan_ok=True)
    seed = result["runs"]["gradalign"][0]["seed"]        # smoke trains every seed (one_seed is empty)
    assert seed == result["seeds"][0] and a["gradalign_seed"] == seed and "gradalign" not in result["config"]["one_seed"]
    same = [r for r in result["runs"]["fgsm"] if r["seed"] == seed][0]
    assert a["gradalign_gap"] == pytest.approx(result["runs"]["gradalign"][0]["robust_acc"] - same["robust_acc"])
    assert a["gradalign_cost_ratio"] == pytest.approx(steps["gradalign"] / steps["fgsm"])
    assert C.check(cl, "smoke") == []          # nothing is asserted at the smoke scale


def test_kernel_analysis_around_a_collapse(overfitting_run):
    """Snapshots before and after the collapse epoch, the changes and the excess over the control,
    by hand on the smoke kernels with the collapse epoch set to 1 (the second epoch); a collapse in
    epoch 0 (nothing before it but the initialisation) is not used."""
    result = copy.deepcopy(overfitting_run[0])
    f, c = result["runs"]["fgsm"][0], result["runs"]["fgsm_logscale"][0]
    for run in (f, c):            # kernels that are certainly non-zero, so every statistic is defined
        run["kernels"]["clean"] = torch.stack([K + (i + 1) * torch.eye(len(K)) * (1 + i * (run is f))
                                               for i, K in enumerate(run["kernels"]["clean"])])
    f["collapse_epoch"] = 1
    result["runs"]["fgsm"][1]["collapse_epoch"] = 0
    k = co.analyse(result)["kernel"]
    s = k["seeds"][0]
    assert (s["collapse_epoch"], s["before"], s["after"]) == (1, 1, 2)
    ef = [centred_erank(K) for K in f["kernels"]["clean"]]
    ec = [centred_erank(K) for K in c["kernels"]["clean"]]
    assert s["change"]["fgsm"] == pytest.approx(ef[2] - ef[1], rel=1e-6)
    assert s["excess"] == pytest.approx((ef[2] - ef[1]) - (ec[2] - ec[1]), rel=1e-6, abs=1e-9)
    assert s["angle"]["fgsm"] == pytest.approx(centred_angle(f["kernels"]["clean"][1], f["kernels"]["clean"][2]),
                                               abs=1e-5)
    assert s["angle_excess"] == pytest.approx(s["angle"]["fgsm"] - s["angle"]["control"], abs=1e-12)
    assert k["seeds"][1]["before"] != k["seeds"][1]["before"]          # NaN: a collapse in epoch 0
    assert k["n_collapsed"] == 1
    assert k["n_rise"] == int(s["excess"] > 0) and k["n_faster"] == int(s["angle_excess"] > 0)


def good_analysis():
    """A synthetic analysis on which every claim of chapter 6 holds, each at its threshold where
    the threshold is inclusive (so that the controls below check that no threshold was loosened)."""
    return {
        "n_seeds": 3,
        "noise": {"d": 784, "fgsm_pca": {"erank": 60.0}},
        "methods": {"fgsm": {"collapsed": 2}, "fgsm_logscale": {"collapsed": 0}, "fgsm_pca": {"collapsed": 1},
                    "fgsm_rs": {"collapsed": 0}, "rs_step": {"collapsed": 0}, "gauss": {"collapsed": 0},
                    "pca_floor": {"collapsed": 0}, "n_fgsm": {"collapsed": 0},
                    "gradalign": {"collapsed": 0, "min_after_robust": [0.1]}},
        "co_robust": 0.25, "co_floor": 0.1,
        "logscale_gap_min": 0.1,
        "gradalign_gap": 0.1,
        "gradalign_cost_ratio": 4.0,
        "cost_ratio": 1.2,
        "kernel": {"n_rise": 2, "n_faster": 2},
    }


def test_claims_negative_controls():
    assert_negative_controls(co.claims, good_analysis(), {
        "fgsm_collapses": _set(("methods", "fgsm", "collapsed"), 1),
        "logscale_no_collapse": _set(("methods", "fgsm_logscale", "collapsed"), 1),
        "logscale_gap": _set(("logscale_gap_min",), 0.0999),
        "rs_no_collapse": _set(("methods", "fgsm_rs", "collapsed"), 1),
        "rs_step_no_collapse": _set(("methods", "rs_step", "collapsed"), 1),
        "gauss_no_collapse": _set(("methods", "gauss", "collapsed"), 1),
        "pca_anisotropic": _set(("noise", "fgsm_pca", "erank"), 0.2 * 784),
        "pca_collapses": _set(("methods", "fgsm_pca", "collapsed"), 0),
        "pca_floor_no_collapse": _set(("methods", "pca_floor", "collapsed"), 1),
        "nfgsm_no_collapse": _set(("methods", "n_fgsm", "collapsed"), 1),
        "kernel_rise": _set(("kernel", "n_rise"), 1),
        "kernel_moves": _set(("kernel", "n_faster"), 1),
        "logscale_cost": _set(("cost_ratio",), 1.2001),
        "gradalign_holds": _set(("methods", "gradalign", "min_after_robust"), [0.0999]),
        "gradalign_gap": _set(("gradalign_gap",), 0.0999),
        "gradalign_cost": _set(("gradalign_cost_ratio",), 4.001),
    })


def test_the_kernel_claim_needs_kernels():
    bad = copy.deepcopy(good_analysis())
    bad["kernel"] = {}
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["kernel_rise"] is False


def test_which_claims_are_asserted():
    cl = co.claims(good_analysis(), "quick")
    assert [c.key for c in C.check(cl, "quick")] == ASSERTED
    assert C.check(cl, "paper") == []
    # a method the run did not train makes its claims fail rather than raise
    bad = good_analysis()
    del bad["methods"]["fgsm_pca"]
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["pca_collapses"] is False
    del bad["methods"]["gradalign"]                 # and a GradAlign run that never became robust (NaN)
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["gradalign_holds"] is False
    bad = good_analysis()
    bad["methods"]["gradalign"]["min_after_robust"] = [math.nan]
    assert {c.key: c.holds for c in co.claims(bad, "quick")}["gradalign_holds"] is False


#: The claims asserted under quick (the others did not hold on every seed or are not predicted).
ASSERTED = ["logscale_no_collapse", "rs_no_collapse", "pca_anisotropic"]


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


def test_min_after_robust_by_hand():
    assert co._min_after([0.1, 0.3, 0.05, 0.4], 0.25) == 0.05       # from the first robust epoch on
    assert co._min_after([0.3, 0.2, 0.26], 0.25) == 0.2
    assert co._min_after([0.05, 0.2, 0.24], 0.25) != co._min_after([0.05, 0.2, 0.24], 0.25)   # never robust: NaN


def test_remedy_seed():
    runs = [{"seed": 4, "collapse_epoch": None}, {"seed": 5, "collapse_epoch": 3}, {"seed": 6, "collapse_epoch": 1}]
    assert co.remedy_seed(runs, [4, 5, 6]) == 5
    assert co.remedy_seed(runs[:1], [4, 5, 6]) == 4 and co.remedy_seed([], [7, 8]) == 7
