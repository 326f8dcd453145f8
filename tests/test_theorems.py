"""Tests of the ``theorems`` experiment (chapter 2): smoke-scale invariants, cache reuse, the
``paper`` profile's code path, ``analyse`` on a smoke run, the claims' negative controls, and the
helpers the chapter calls."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ntklab import attacks, experiments
from ntklab.config import get_profile
from ntklab.experiments import batchnorm, theorems

from claim_controls import assert_negative_controls, set_at as _set
from smoke_runs import rerun_from_cache, smoke_run


@pytest.fixture(scope="module")
def theorems_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "theorems")


def test_theorem1_result(theorems_run):
    result, _, _ = theorems_run
    profile = get_profile("smoke")
    t1 = result["theorem1"]
    assert t1["networks"] == ["smooth, init", "smooth, trained", "smooth, AT", "relu, init", "relu, trained", "relu, AT"]
    assert t1["perturbations"] == list(theorems.PERTURBATIONS)
    eps = t1["eps"]
    assert eps == sorted(eps) and eps[0] == pytest.approx(1e-6) and any(math.isclose(e, profile.eps) for e in eps)
    for n in t1["networks"]:
        for p, values in t1["rel_change"][n].items():
            assert len(values) == len(eps) and all(v >= 0 and math.isfinite(v) for v in values)
        assert (t1["clean_acc"][n] is None) == n.endswith("init")
        assert (n in t1["robust_acc"]) == (not n.endswith("init"))
    # the smooth network follows the theorem: orders 1 and 2 at small eps, for any direction
    for n in ("smooth, init", "smooth, trained", "smooth, AT"):
        assert t1["slopes"][n]["random"] == pytest.approx(1, abs=0.1)
        assert t1["slopes"][n]["antithetic"] == pytest.approx(2, abs=0.2)
        assert t1["slopes"][n]["fgsm"] == pytest.approx(1, abs=0.1)
        assert t1["slopes"][n]["antithetic_fgsm"] == pytest.approx(2, abs=0.2)
    mc = t1["monte_carlo"]
    assert mc["eps"] == list(theorems.MC_EPS) and mc["M"] == list(theorems.MC_M)
    assert {k for k in mc if k not in ("eps", "M")} == {"smooth, init", "smooth, AT"}
    for n in ("smooth, init", "smooth, AT"):
        assert [len(v) for v in mc[n]] == [len(theorems.MC_M)] * len(theorems.MC_EPS)
        # one draw of the Monte-Carlo control at the smallest M is an ordinary random-sign change
        assert all(v > 0 for row in mc[n] for v in row)
    assert result["compute_seconds"] > 0


def test_theorem2_result(theorems_run):
    result, _, _ = theorems_run
    t2 = result["theorem2"]
    assert t2["networks"] == ["smooth, trained", "relu, trained"]
    sizes = t2["batch_sizes"]
    assert sizes == [b for b in theorems.BATCH_SIZES if b <= get_profile("smoke").n_train]
    per_size = theorems.Settings.for_profile(get_profile("smoke")).batches_per_size
    for n in t2["networks"]:
        r = t2[n]
        adv_per_size = theorems.Settings.for_profile(get_profile("smoke")).adv_batches_per_size
        for source, k in (("clean", per_size), ("adversarial", adv_per_size)):
            assert r[source]["size"] == [b for b in sizes for _ in range(k)]
            assert all(g > 0 and e > 0 for g, e in zip(r[source]["gap"], r[source]["error"]))
            # the total gap is the sum of the per-layer mean and variance gaps
            np.testing.assert_allclose(r[source]["gap"], np.add(r[source]["mean_gap"], r[source]["var_gap"]))
        assert -1 <= r["spearman"]["clean"] <= 1
        # adversarial batches are further from the clean data-set statistics
        assert np.median(r["adversarial"]["gap"]) > np.median(r["clean"]["gap"])
    hand = t2["by_hand"]
    assert hand["size"] == min(64, get_profile("smoke").n_train) and hand["kernel_error"] > 0
    # the first layer's gap by hand is ntklab's first-layer gap
    assert hand["mean_gap"] == pytest.approx(hand["layer_mean_gaps"][0], rel=1e-4)
    assert hand["var_gap"] == pytest.approx(hand["layer_var_gaps"][0], rel=1e-4)
    assert hand["total"] == pytest.approx(sum(hand["layer_mean_gaps"]) + sum(hand["layer_var_gaps"]))


def test_theorems_second_run_loads_the_cache(theorems_run, monkeypatch):
    result, out, paths = theorems_run
    assert [how for p, how in paths if p.parent.name == "theorems"] == ["computed"]
    again, _ = rerun_from_cache("theorems", out, monkeypatch, theorems, "_compute")
    assert again["theorem1"]["slopes"] == result["theorem1"]["slopes"]


def test_config_and_settings():
    quick = get_profile("quick")
    config = theorems.make_config(quick)
    assert config["eps"][-1] == pytest.approx(0.3) and len(config["eps"]) == theorems.EPS_RANGE[2]
    assert config["smooth"]["model_kwargs"] == {"width": 16, "activation": "gelu", "pool": "avg"}
    # the ReLU network is chapter 3's normal model with buffer: one training run for both chapters
    relu = theorems.relu_profile(quick)
    assert relu.model_kwargs["width"] == 16
    for name in ("smoke", "quick", "paper"):
        profile = get_profile(name)
        assert theorems.relu_profile(profile) == batchnorm.model_profile(profile, "with buffer")
    assert theorems.TRAIN_OVERRIDES == batchnorm.train_overrides(quick, "normal")
    assert config["batch_sizes"] == list(theorems.BATCH_SIZES)
    assert config["settings"] == dataclasses.asdict(theorems.Settings.for_profile(quick))
    paper = get_profile("paper")
    # the training eps is on the grid (analyse reads the change at it)
    assert any(math.isclose(e, 8 / 255) for e in theorems.eps_grid(paper))
    assert any(abs(e - quick.eps) < 1e-9 * quick.eps for e in theorems.eps_grid(quick))
    assert theorems.smooth_profile(paper).model == "small_cnn"
    assert theorems.smooth_profile(paper).model_kwargs["width"] == theorems.Settings.for_profile(paper).smooth_width


def test_settings_are_frozen_per_profile():
    quick = theorems.Settings.for_profile(get_profile("quick"))
    assert (quick.n_probe1, quick.n_probe2, quick.batches_per_size, quick.adv_batches_per_size, quick.n_adv,
            quick.n_robust, quick.relu_width) == (12, 10, 20, 5, 1024, 200, 16)
    assert theorems.Settings.for_profile(get_profile("smoke")).relu_width is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.n_probe1 = 3


def test_theorems_paper_code_path(paper_profile):
    # float64 kernels of the ResNet are the cost: 4 probe images keep the test short
    paper_profile = paper_profile.replace(n_probe=4)
    result = experiments.run("theorems", paper_profile, "cpu", progress=False)
    config = result["config"]
    assert config["profile"]["dataset"] == "cifar10" and config["profile"]["model"] == "preact_resnet18"
    assert config["batch_sizes"] == [8, 16, 32]                       # at most n_train = 40
    t1 = result["theorem1"]
    assert t1["n_probe"] == paper_profile.n_probe
    assert any(math.isclose(e, paper_profile.eps) for e in t1["eps"])
    for n in t1["networks"]:
        assert all(math.isfinite(v) for values in t1["rel_change"][n].values() for v in values)
    for n in result["theorem2"]["networks"]:
        assert len(result["theorem2"][n]["clean"]["error"]) == 3 * 5
        assert torch.isfinite(torch.tensor(result["theorem2"][n]["clean"]["gap"])).all()


# ------------------------------------------------------------------ analyse
def test_analyse_on_a_smoke_run(theorems_run):
    result, _, _ = theorems_run
    t1, t2 = result["theorem1"], result["theorem2"]
    a = theorems.analyse(result)
    assert {"smooth_init", "smooth_trained", "smooth_AT", "relu_init", "relu_trained", "relu_AT"} <= set(a)
    assert a["train_eps"] == pytest.approx(get_profile("smoke").eps) and a["eps_min"] == t1["eps"][0]
    i = t1["eps"].index(a["train_eps"])
    log_eps = np.log(t1["eps"][:theorems.SLOPE_POINTS])
    for name in t1["networks"]:
        k = name.replace(", ", "_")
        rel = t1["rel_change"][name]
        fit = np.polyfit(log_eps, np.log(rel["antithetic"][:theorems.SLOPE_POINTS]), 1)[0]
        assert a[k]["slopes"]["antithetic"] == pytest.approx(fit)
        assert a[k]["cancel"] == pytest.approx(rel["antithetic"][0] / rel["random"][0])
        assert a[k]["pgd_at_train_eps"] == rel["pgd"][i]
        assert ("clean_acc" in a[k]) == ("robust_acc" in a[k]) == (not name.endswith("init"))
        assert a[k]["c_ratio"]["fgsm"] == pytest.approx(rel["fgsm"][0] / rel["random"][0])
    assert a["trained_pgd_min"] == min(t1["rel_change"][n]["pgd"][i] for n in ("smooth, trained", "relu, trained"))
    assert a["at_pgd_min"] == min(t1["rel_change"][n]["pgd"][i] for n in ("smooth, AT", "relu, AT"))
    robust = t1["robust_acc"]
    assert a["at_robust_gain"] == pytest.approx(min(robust[f"{n}, AT"] - robust[f"{n}, trained"] for n in ("smooth", "relu")))
    from scipy.stats import linregress
    mc = t1["monte_carlo"]
    for name in ("smooth, init", "smooth, AT"):
        k = name.replace(", ", "_")
        assert a[k]["mc_slope"] == pytest.approx(linregress(np.log(mc["M"]), np.log(mc[name][0])).slope)
        assert a[k]["mc_ratio_large"] == pytest.approx(mc[name][-1][0] / mc[name][-1][-1])
    assert "mc_slope" not in a["smooth_trained"]
    d = t1["decade"]
    assert d["eps"] == list(theorems.DECADE)
    assert a["decade_random"] == pytest.approx(d["random"][1] / d["random"][0])
    assert a["decade_antithetic"] == pytest.approx(d["antithetic"][1] / d["antithetic"][0])
    # the smoke network is a SmallCNN with max pooling: two pooling layers, ties on MNIST's background
    assert len(t1["ties"]) == 2 and a["ties_min"] == min(t1["ties"])
    assert a["swap_avg_antithetic"] < 1e-10 < a["swap_max_cancel"]
    sizes = t2["batch_sizes"]
    assert (a["batch_min"], a["batch_max"]) == (sizes[0], sizes[-1])
    for name in t2["networks"]:
        k, r = name.replace(", ", "_"), t2[name]
        # independent recomputation from the per-batch lists
        errors = np.array(r["clean"]["error"])
        size = np.array(r["clean"]["size"])
        assert a[k]["error_factor"] == pytest.approx(np.median(errors[size == sizes[0]]) / np.median(errors[size == sizes[-1]]))
        assert a[k]["spearman"] == pytest.approx(spearmanr(r["clean"]["gap"], r["clean"]["error"]).statistic)
        gaps = {s: np.array(r[s]["gap"]) for s in ("clean", "adversarial")}
        adv_size = np.array(r["adversarial"]["size"])
        ratio = min(np.median(gaps["adversarial"][adv_size == b]) / np.median(gaps["clean"][size == b]) for b in sizes)
        assert a[k]["adv_gap_ratio"] == pytest.approx(ratio)
        assert a[k]["adv_median_gap"] == pytest.approx(np.median(gaps["adversarial"]))
        assert a[k]["partial"] == pytest.approx(theorems._partial_correlation(np.log(gaps["clean"]), np.log(errors),
                                                                             np.log(size)))
        assert a[k]["gap_slope_fit"] == pytest.approx(linregress(np.log(gaps["clean"]), np.log(errors)).slope)
        assert a[k]["partial_se"] > 0 and a[k]["n_clean"] == len(errors)
    names = theorems.claims(a, "smoke")
    assert len(names) == 41 and not [c for c in names if c.asserted_under("smoke")]


# ------------------------------------------------------------------ claims
def _good_analysis():
    slopes = {"random": 1.0, "antithetic": 2.0, "fgsm": 1.0, "pgd": 1.02, "gaussian": 0.98, "antithetic_clipped": 1.0,
              "antithetic_fgsm": 2.0}
    c_ratio = {"fgsm": 4.0, "pgd": 3.5, "gaussian": 1.0}
    mc = {"mc_slope": -0.5, "mc_ratio_small": 4.0, "mc_ratio_large": 1.2}
    t2 = {"spearman": 0.9, "spearman_within": 0.5, "error_first": 0.3, "error_last": 0.04, "error_factor": 7.5,
          "size_slope": -0.5, "gap_slope": -0.5, "adv_size_slope": 0.02, "adv_gap_ratio": 5.0,
          "adv_error_margin": 2.0, "adv_median_gap": 1.0, "clean_median_gap": 0.1, "adv_median_error": 0.8,
          "gap_slope_fit": 1.0, "partial": 0.6, "mean_share_clean": 0.25, "mean_share_adv": 0.65,
          "adv_residual": 0.1, "pooled_gap_slope": 1.0}
    return {"eps_min": 1e-6, "train_eps": 0.3, "trained_pgd_min": 0.5, "at_pgd_min": 0.4, "at_robust_gain": 0.2,
            "decade_random": 10.0, "decade_antithetic": 100.0, "ties_min": 0.4, "swap_max_cancel": 0.8,
            "swap_avg_antithetic": 1e-16, "batch_min": 8, "batch_max": 512,
            "smooth_init": {"slopes": dict(slopes), "cancel": 1e-5, "pgd_at_train_eps": 0.1, "c_ratio": dict(c_ratio),
                            **mc},
            "smooth_trained": {"slopes": dict(slopes), "cancel": 1e-5, "pgd_at_train_eps": 0.5,
                               "c_ratio": dict(c_ratio), **t2},
            "smooth_AT": {"slopes": dict(slopes), "cancel": 1e-5, "pgd_at_train_eps": 0.5, "c_ratio": dict(c_ratio),
                          **mc},
            "relu_init": {"slopes": dict(slopes), "cancel": 0.9, "pgd_at_train_eps": 0.3},
            "relu_trained": {"slopes": dict(slopes), "cancel": 0.9, "pgd_at_train_eps": 0.6, **t2}}


CONTROLS = {
    "smooth_init_orders": _set(("smooth_init", "slopes", "antithetic"), 1.0),     # no cancellation
    "smooth_init_cancel": _set(("smooth_init", "cancel"), 0.01),
    "smooth_init_c_ratio": _set(("smooth_init", "c_ratio", "fgsm"), 1.0),          # an attack no stronger than noise
    "smooth_init_mc_slope": _set(("smooth_init", "mc_slope"), -0.1),              # averaging removes nothing
    "smooth_init_mc_floor": _set(("smooth_init", "mc_ratio_large"), 4.0),          # no eps^2 floor
    "smooth_trained_orders": _set(("smooth_trained", "slopes", "fgsm"), 2.0),     # an attack of order 2
    "smooth_trained_cancel": _set(("smooth_trained", "cancel"), 0.5),
    "smooth_trained_c_ratio": _set(("smooth_trained", "c_ratio", "fgsm"), 1.5),
    "smooth_AT_orders": _set(("smooth_AT", "slopes", "antithetic_fgsm"), 1.0),     # antithetic FGSM not cancelling
    "smooth_AT_cancel": _set(("smooth_AT", "cancel"), 0.01),
    "smooth_AT_c_ratio": _set(("smooth_AT", "c_ratio", "fgsm"), 0.9),
    "smooth_AT_mc_slope": _set(("smooth_AT", "mc_slope"), -1.0),                   # faster than 1/sqrt(M)
    "smooth_AT_mc_floor": _set(("smooth_AT", "mc_ratio_small"), 1.2),
    "decade": _set(("decade_antithetic",), 10.0),                                 # order 1, not 2
    "relu_init_no_cancel": _set(("relu_init", "cancel"), 1e-5),
    "relu_trained_no_cancel": _set(("relu_trained", "cancel"), 0.05),
    "ties": _set(("ties_min",), 0.04),
    "pool_swap": _set(("swap_avg_antithetic",), 1e-3),
    "pgd_at_train_eps": _set(("trained_pgd_min",), 0.15),
    "at_pgd_at_train_eps": _set(("at_pgd_min",), 0.1),
    "at_robust": _set(("at_robust_gain",), 0.0),                                 # AT did not make it robust
    "smooth_trained_gap_fit": _set(("smooth_trained", "gap_slope_fit"), 0.3),
    "smooth_trained_partial": _set(("smooth_trained", "partial"), 0.1),          # the batch size does it all
    "smooth_trained_size_slope": _set(("smooth_trained", "size_slope"), -0.1),
    "smooth_trained_gap_slope": _set(("smooth_trained", "gap_slope"), -1.2),
    "smooth_trained_adv_gap": _set(("smooth_trained", "adv_gap_ratio"), 1.5),
    "smooth_trained_adv_flat": _set(("smooth_trained", "adv_size_slope"), -0.5),
    "smooth_trained_adv_error": _set(("smooth_trained", "adv_error_margin"), 0.7),
    "smooth_trained_var_part": _set(("smooth_trained", "mean_share_clean"), 0.6),
    "smooth_trained_mean_part": _set(("smooth_trained", "mean_share_adv"), 0.3),
    "smooth_trained_adv_on_line": _set(("smooth_trained", "adv_residual"), 1.0),
    "relu_trained_gap_fit": _set(("relu_trained", "gap_slope_fit"), 2.0),
    "relu_trained_partial": _set(("relu_trained", "partial"), float("nan")),
    "relu_trained_size_slope": _set(("relu_trained", "size_slope"), -0.9),
    "relu_trained_gap_slope": _set(("relu_trained", "gap_slope"), -0.2),
    "relu_trained_adv_gap": _set(("relu_trained", "adv_gap_ratio"), 2.0),         # the bound is strict
    "relu_trained_adv_flat": _set(("relu_trained", "adv_size_slope"), 0.3),
    "relu_trained_adv_error": _set(("relu_trained", "adv_error_margin"), 1.0),
    "relu_trained_var_part": _set(("relu_trained", "mean_share_clean"), 0.45),
    "relu_trained_mean_part": _set(("relu_trained", "mean_share_adv"), 0.4),
    "relu_trained_adv_on_line": _set(("relu_trained", "adv_residual"), -1.0),
}


def test_claims_negative_controls():
    assert_negative_controls(theorems.claims, _good_analysis(), CONTROLS)


# ------------------------------------------------------------------ statistics of analyse
def test_partial_correlation_against_the_textbook_formula():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    z = rng.normal(size=80)
    x = 2 * z + rng.normal(size=80)
    y = -z + 0.5 * x + rng.normal(size=80)
    r_xy, r_xz, r_yz = (pearsonr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    assert theorems._partial_correlation(x, y, z) == pytest.approx(expected, rel=1e-10)
    # x and y related only through z: no partial correlation left (a large sample)
    z = rng.normal(size=20000)
    assert abs(theorems._partial_correlation(z + rng.normal(size=20000), z + rng.normal(size=20000), z)) < 0.03
    assert math.isnan(theorems._partial_correlation(z, z, z))


def test_line_fit_and_gap_statistics_against_scipy():
    from scipy.stats import linregress

    rng = np.random.default_rng(1)
    size = np.repeat([8, 32, 128], 10)
    gap = np.exp(rng.normal(size=30)) / np.sqrt(size)
    error = 0.5 * gap ** 1.1 * np.exp(0.1 * rng.normal(size=30))
    mean_gap = 0.3 * gap
    clean = {"size": size.tolist(), "gap": gap.tolist(), "error": error.tolist(), "mean_gap": mean_gap.tolist()}
    adv_gap = np.full(6, 0.8) * np.exp(0.05 * rng.normal(size=6))
    adv = {"size": [8] * 6, "gap": adv_gap.tolist(), "error": (2 * 0.5 * adv_gap ** 1.1).tolist(),
           "mean_gap": (0.7 * adv_gap).tolist()}
    fit = linregress(np.log(gap), np.log(error))
    assert theorems._line_fit(np.log(gap), np.log(error)) == pytest.approx((fit.slope, fit.intercept))
    g = theorems.gap_statistics(clean, adv)
    assert g["gap_slope_fit"] == pytest.approx(fit.slope) and g["gap_intercept"] == pytest.approx(fit.intercept)
    pred = fit.intercept + fit.slope * np.log(adv_gap)
    assert g["adv_residual"] == pytest.approx(np.mean(np.log(adv["error"]) - pred))
    assert g["adv_residual"] == pytest.approx(math.log(2), abs=0.15)     # twice the clean line, as built
    pooled = linregress(np.log(np.r_[gap, adv_gap]), np.log(np.r_[error, adv["error"]]))
    assert g["pooled_gap_slope"] == pytest.approx(pooled.slope)
    assert (g["mean_share_clean"], g["mean_share_adv"]) == (pytest.approx(0.3), pytest.approx(0.7))
    z = np.log(size)
    assert g["partial"] == pytest.approx(theorems._partial_correlation(np.log(gap), np.log(error), z))
    se = theorems.bootstrap_se(clean, adv, n_boot=200, seed=0)
    assert set(se) == set(g)
    # the bootstrap SE of the slope is of the order of the least-squares one
    assert 0.3 * fit.stderr < se["gap_slope_fit"] < 3 * fit.stderr
    assert se == theorems.bootstrap_se(clean, adv, n_boot=200, seed=0)


def test_monte_carlo_changes_on_a_linear_model():
    """f(x) = W x: the kernel is linear in x, so the Monte-Carlo mean of M draws changes it by
    exactly ||eps mean(S_m) X^T|| / ||X X^T||, which for independent signs falls like 1/sqrt(M)."""
    torch.manual_seed(0)
    d, k, n, M = 400, 2, 4, 16
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k, bias=False)).double()
    X = torch.rand(n, 1, 20, 20, dtype=torch.float64)
    draws = torch.randint(0, 2, (M, *X.shape), dtype=torch.float64) * 2 - 1
    eps = 0.01
    out = theorems.monte_carlo_changes(net, X, draws, eps, [1, 4, 16])
    A = X.flatten(1)
    for m, value in zip([1, 4, 16], out):
        S = eps * draws[:m].mean(0).flatten(1)
        assert value == pytest.approx(float((S @ A.T).norm() / (A @ A.T).norm()), rel=1e-9)
    assert out[0] / out[2] == pytest.approx(4, rel=0.35)


def test_claims_are_asserted_under_quick_only():
    claims = theorems.claims(_good_analysis(), "quick")
    observations = {c.key for c in claims if c.profiles == ()}
    assert observations == ({f"{k}_{c}" for k in ("smooth_trained", "relu_trained") for c in ("adv_on_line", "mean_part")}
                            | {f"relu_trained_{c}" for c in ("gap_fit", "partial", "size_slope")})
    assert all(c.profiles == ("quick",) for c in claims if c.key not in observations)
    assert not [c for c in theorems.claims(_good_analysis(), "paper") if c.asserted_under("paper")]


@pytest.mark.parametrize("key,value,holds", [
    (("smooth_init", "slopes", "random"), 1.1, True), (("smooth_init", "slopes", "random"), 1.11, False),
    (("smooth_init", "slopes", "antithetic"), 1.8, True), (("smooth_init", "slopes", "antithetic"), 1.79, False),
    (("decade_random",), 19.9, True), (("decade_random",), 20.0, False), (("decade_random",), 5.0, False),
    (("relu_trained", "size_slope"), -0.31, True), (("relu_trained", "size_slope"), -0.3, False),
    (("relu_trained", "adv_size_slope"), -0.19, True), (("relu_trained", "adv_size_slope"), -0.2, False),
])
def test_claims_keep_the_chapters_bounds(key, value, holds):
    """The notebook's thresholds, inclusive (|slope - 1| <= 0.1) or strict (5 < ratio < 20)."""
    a = _good_analysis()
    _set(key, value)(a)
    claim = {"smooth_init": "smooth_init_orders", "decade_random": "decade", "relu_trained": None}[key[0]]
    claim = claim or {"size_slope": "relu_trained_size_slope", "adv_size_slope": "relu_trained_adv_flat"}[key[1]]
    assert {c.key: c.holds for c in theorems.claims(a, "quick")}[claim] is holds


# ------------------------------------------------------------------ helpers the chapter calls
def test_tied_max_windows_counts_positive_ties():
    net = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten())
    x = torch.tensor([[[[1.0, 1.0, 0.5, 0.2, 0.0, 0.0],
                        [0.0, 0.0, 0.1, 0.0, 0.0, 0.0]]]])     # windows: tied 1s; untied; all zero
    assert theorems.tied_max_windows(net, x) == [pytest.approx(1 / 3)]
    assert theorems.tied_max_windows(torch.nn.Flatten(), x) == []


def test_sign_changes_on_a_linear_model():
    """f(x) = W x: Theta(x, x') = (x . x') I, so one draw changes the kernel by ||S X^T|| / ||X X^T||
    (S the perturbation rows) and the antithetic average not at all."""
    torch.manual_seed(0)
    d, k, n = 12, 3, 5
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k, bias=False)).double()
    X = torch.rand(n, 1, 3, 4, dtype=torch.float64)
    signs = torch.randint(0, 2, X.shape, dtype=torch.float64) * 2 - 1
    eps = 0.01
    out = theorems.sign_changes(net, X, signs, eps)
    A, S = X.flatten(1), eps * signs.flatten(1)
    assert out["random"] == pytest.approx(float((S @ A.T).norm() / (A @ A.T).norm()), rel=1e-9)
    assert out["antithetic"] < 1e-14


def test_fgsm_signs_are_the_input_gradients(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors[0][:16], mnist_small[1].tensors[1][:16]
    grad = theorems._ce_input_grad(trained_cnn, x, y)
    eps = 0.1
    assert torch.allclose(attacks.fgsm(trained_cnn, x, y, eps=eps), (x + eps * grad.sign()).clamp(0, 1))


def test_theorem1_inputs_are_the_probe():
    smoke = get_profile("smoke")
    X, y, signs, gauss = theorems.theorem1_inputs(smoke)
    assert X.dtype == torch.float64 and len(y) == theorems.Settings.for_profile(smoke).n_probe1
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(gauss.flatten(1).norm(dim=1), torch.full((len(y),), math.sqrt(X[0].numel()), dtype=torch.float64))
    again = theorems.theorem1_inputs(smoke)
    assert all(torch.equal(u, v) for u, v in zip((X, y, signs, gauss), again))


def test_log_slope_uses_positive_medians_and_is_none_without_two():
    """A median kernel error of exactly 0 (no batch statistic reaches the kernel) cannot enter a
    log-log fit: the slope uses the positive points, and is None (NaN in the analysis) without two."""
    sizes = [8, 16, 32, 64]
    assert theorems._log_slope(sizes, [2 / np.sqrt(b) for b in sizes]) == pytest.approx(-0.5)
    assert theorems._log_slope(sizes, [0.0, 2 / 4, 2 / np.sqrt(32), 0.25]) == pytest.approx(-0.5)
    assert theorems._log_slope(sizes, [0.0, 0.0, 0.0, 0.3]) is None
    assert math.isnan(theorems._nan_if_none(None)) and theorems._nan_if_none(-0.5) == -0.5
