"""Chapter 7: the ``ntk_features`` experiment (smoke, cache, and the paper code path)."""
import math

import numpy as np
import pytest
import torch

import ntklab
from ntklab.experiments import cache, ntk_features
from claim_controls import assert_negative_controls, set_at as _set


def _check_result(res, config):
    widths, times = config["widths"], config["times"]
    assert res["times"] == times and times[-1] == config["steps"]
    assert len(res["kernel_rel_error"]) == len(config["kernel_widths"])
    p = res["predictor"]
    assert len(p["fgsm"]) == len(p["pgd"]) == len(config["eps_grid"])
    assert p["fgsm"][0] == p["pgd"][0] == p["clean_inf"]                    # eps 0 changes nothing
    assert all(0 <= a <= p["clean_inf"] for a in p["fgsm"] + p["pgd"])
    for w in widths:
        recs = res["nets"][str(w)]
        assert len(recs) == config["net_seeds"]
        for rec in recs:
            for key in ("cos", "cos_lin", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm"):
                assert len(rec[key]) == len(times), key
            assert all(-1 <= c <= 1 for c in rec["cos"] + rec["cos_lin"])
            assert all(r <= c + 1e-12 for r, c in zip(rec["own_fgsm"], rec["clean"]))
            assert all(r <= c + 1e-12 for r, c in zip(rec["kernel_fgsm"], rec["clean"]))
    fe = res["features"]
    q = len(fe["robustness"])
    assert len(fe["usefulness"]) == q == len(fe["eigenvalues"]) and q <= config["n_features"]
    assert (fe["eigenvalues"][:-1] >= fe["eigenvalues"][1:]).all()
    assert all(0 <= r <= u + 1e-12 for r, u in zip(fe["robustness"], fe["usefulness"]))
    assert fe["grad_images"].shape[1:] == fe["grad_image_x"].shape
    for key in ("robust_first", "useful_first"):
        assert len(fe[key]["clean"]) == len(fe["ks"])
        assert all(r <= c + 1e-12 for r, c in zip(fe[key]["robust"], fe[key]["clean"]))


def test_pair_data_is_balanced_and_disjoint():
    profile = ntklab.config.get_profile("smoke")
    d = ntk_features.pair_data(profile)
    (X, y), (Xv, yv), (Xt, yt) = d["kernel"], d["val"], d["test"]
    assert set(y.tolist()) == {0, 1} and abs(int(y.sum()) - len(y) / 2) <= 1
    assert len(y) == round(0.75 * (len(y) + len(yv)))
    assert set(yt.tolist()) == {0, 1} and abs(int(yt.sum()) - len(yt) / 2) <= 1
    flat = torch.cat([X, Xv, Xt]).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)                       # no image in two splits
    full, _ = ntklab.experiments.data_from_profile(profile)
    assert len(y) + len(yv) == int(((full.tensors[1] == 3) | (full.tensors[1] == 5)).sum())
    with pytest.raises(ValueError, match="fewer than 2 images"):
        ntk_features.pair_data(profile, classes=[3, 99])


def run_twice(name, tmp_path):
    """Run experiment ``name`` under ``smoke`` twice into ``tmp_path``: computed, then loaded."""
    profile = ntklab.config.get_profile("smoke")
    with cache.track() as seen:
        res = ntklab.experiments.run(name, profile, "cpu", out=tmp_path, progress=False)
        again = ntklab.experiments.run(name, profile, "cpu", out=tmp_path, progress=False)
    assert [how for _, how in seen] == ["computed", "loaded"]
    return profile, res, again


def test_smoke_run_and_cache(tmp_path):
    profile, res, again = run_twice("ntk_features", tmp_path)
    config = ntk_features.make_config(profile)
    _check_result(res, config)
    assert again["features"]["spearman"] == res["features"]["spearman"]
    # the closed form is close to the empirical NTK of the widest probe net (4096 units)
    assert res["kernel_rel_error"][-1] < 0.05 and res["kernel_rel_error"][-1] < res["kernel_rel_error"][0]
    _check_analysis(res, ntk_features.analyse(res))
    _check_predictor_rebuilt(profile, res)


def _check_analysis(res, a):
    """analyse against numpy on the result itself."""
    widths, kt, fe = res["config"]["widths"], res["kernel_times"], res["features"]
    assert ntk_features.claims(a, "smoke") and set(a["nets_end"]) == {str(w) for w in widths}

    def at_end(key, w):
        return np.array([rec[key][-1] for rec in res["nets"][str(w)]])

    for w in widths:
        assert math.isclose(a["nets_end"][str(w)]["cos"]["mean"], at_end("cos", w).mean(), rel_tol=1e-9)
        assert a["nets_end"][str(w)]["own_pgd"]["min"] == min(rec["own_pgd"] for rec in res["nets"][str(w)])
    cos_w, cos_n = at_end("cos", widths[-1]), at_end("cos", widths[0])
    expect = "better" if cos_w.min() > cos_n.max() else "worse" if cos_w.max() < cos_n.min() else "overlapping"
    assert a["full_alignment"] == expect
    best = int(np.argmax(kt["fgsm"]))
    assert a["kernel_machine"] == {"peak_fgsm": kt["fgsm"][best], "peak_step": res["times"][best],
                                   "clean_at_peak": kt["clean"][best], "end_fgsm": kt["fgsm"][-1],
                                   "end_clean": kt["clean"][-1]}
    assert math.isclose(a["features"]["robustness_top10"], np.mean(fe["robustness"][:10]))
    k_best = int(np.argmax(fe["robust_first"]["robust"]))
    assert a["sweet_spot"]["k"] == fe["ks"][k_best] and a["sweet_spot"]["clean"] == fe["robust_first"]["clean"][k_best]
    assert math.isclose(a["kernel_error_largest_step"], np.diff(res["kernel_rel_error"]).max())
    assert a["predictor"]["agreement"] == res["predictor"]["agreement"]


def _check_predictor_rebuilt(profile, res):
    """The kernel predictor the chapter rebuilds from the result (data, lr, steps) classifies the
    test images as the experiment's did (the notebook asserted this before)."""
    import functools

    import torch.nn.functional as F

    d = ntk_features.pair_data(profile)
    (X, y), (Xt, yt) = d["kernel"], d["test"]
    mean, std = ntklab.data.stats(profile.dataset)
    kernel_fn = functools.partial(ntklab.kernels.two_layer_ntk, mean=mean, std=std)
    alpha = ntklab.kernels.regression_weights(kernel_fn(X.double()), F.one_hot(y, 2).double(), lr=res["lr"],
                                              steps=res["times"][-1])
    P = ntklab.kernels.KernelPredictor(kernel_fn, X, alpha)
    assert abs(float(ntklab.evaluate.clean_accuracy(P, (Xt, yt))) - res["predictor"]["clean_inf"]) < 1e-6


def _good_analysis():
    """A synthetic analysis on which every claim of chapter 7 holds (with margin)."""
    return {"kernel_error_largest_step": -0.05, "kernel_rel_error_widest": 0.02, "predictor": {"agreement": 0.98},
            "widest": {"own_fgsm": [0.40, 0.45, 0.42], "kernel_fgsm": [0.30, 0.46, 0.40],
                       "cos": [0.20, 0.22, 0.25], "cos_lin": [0.80, 0.82, 0.85]},
            "narrowest": {"cos": [0.40, 0.45, 0.50], "cos_lin": [0.50, 0.55, 0.60]},
            "kernel_machine": {"peak_fgsm": 0.60, "end_fgsm": 0.40, "clean_at_peak": 0.90, "end_clean": 0.97},
            "features": {"spearman": -0.8, "full_robust": 0.30, "full_clean": 0.97},
            "sweet_spot": {"robust": 0.55, "clean": 0.85, "last_robust": 0.35}}


def test_claims_have_negative_controls():
    assert_negative_controls(ntk_features.claims, _good_analysis(), {
        "kernel_error_falls": _set(["kernel_error_largest_step"], 0.001),
        "kernel_error_widest": _set(["kernel_rel_error_widest"], 0.05),
        "predictor_agreement": _set(["predictor", "agreement"], 0.94),
        "kernel_fgsm_transfers": _set(["widest", "kernel_fgsm"], [0.30, 0.51, 0.40]),   # one seed 0.06 above its own
        "lazy_alignment_grows": _set(["narrowest", "cos_lin"], [0.50, 0.55, 0.81]),
        "full_alignment_ordered": _set(["narrowest", "cos"], [0.10, 0.21, 0.30]),        # the seeds overlap
        "robustness_peaks_early": _set(["kernel_machine", "end_fgsm"], 0.58),
        "clean_keeps_rising": _set(["kernel_machine", "end_clean"], 0.90),
        "robustness_at_the_top": _set(["features", "spearman"], -0.5),
        "sweet_spot_robust": _set(["sweet_spot", "robust"], 0.35),
        "sweet_spot_costs_accuracy": _set(["sweet_spot", "clean"], 0.95),
        "vulnerability_returns": _set(["sweet_spot", "last_robust"], 0.51),
    })


def test_full_alignment_claim_holds_either_way():
    a = _good_analysis()                     # the good analysis has the widest below; now above: "better"
    a["widest"]["cos"], a["narrowest"]["cos"] = [0.6, 0.7, 0.8], [0.1, 0.2, 0.3]
    assert {c.key: c.holds for c in ntk_features.claims(a, "quick")}["full_alignment_ordered"]


def test_claims_keep_the_chapters_thresholds_at_the_boundary():
    a = _good_analysis()
    a["kernel_rel_error_widest"], a["predictor"]["agreement"], a["features"]["spearman"] = 0.049, 0.95, -0.51
    verdict = {c.key: c.holds for c in ntk_features.claims(a, "quick")}
    assert verdict["kernel_error_widest"] and verdict["predictor_agreement"] and verdict["robustness_at_the_top"]
    assert all(c.profiles == ("quick",) for c in ntk_features.claims(a, "quick"))


def test_settings_follow_the_profiles(paper_profile):
    quick = ntk_features.Settings.for_profile(ntklab.config.get_profile("quick"))
    assert quick.classes == (3, 5) and quick.widths == (32, 256, 2048) and quick.times[-1] == quick.steps == 160
    with pytest.raises(AttributeError):
        quick.steps = 1                                  # frozen
    real = ntk_features.Settings.for_profile(ntklab.config.get_profile("paper"))
    assert real.classes == (0, 1) and real.widths == (256, 2048, 16384) and real.steps == 10000
    assert real.eps == 8 / 255
    tiny = ntk_features.Settings.for_profile(paper_profile)
    assert tiny.widths == (16, 128, 1024) and tiny.steps == 100
    assert ntk_features.make_config(paper_profile)["widths"] == [16, 128, 1024]


def test_paper_code_path(paper_profile, tmp_path):
    res = ntklab.experiments.run("ntk_features", paper_profile, "cpu", out=tmp_path, progress=False)
    _check_result(res, ntk_features.make_config(paper_profile))
    assert res["features"]["grad_image_x"].shape == (3, 32, 32)
