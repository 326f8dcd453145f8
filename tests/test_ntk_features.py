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
            for key in ("cos", "cos_lin", "cos_frozen", "flip_ratio", "clean", "own_fgsm", "kernel_fgsm"):
                assert len(rec[key]) == len(times), key
            assert all(-1 <= c <= 1 for c in rec["cos"] + rec["cos_lin"] + rec["cos_frozen"])
            h = rec["hits"]
            assert set(h) == {"clean", "own_fgsm", "own_pgd", "kernel_fgsm", "kernel_pgd", "random_sign",
                              "surrogate_fgsm", "surrogate_pgd"}
            # the final attacks run on the held-out images: the test images first, then the validation ones
            n_test = res["n_test"]
            assert len(h["clean"]) == res["n_heldout"] == n_test + res["n_val"]
            assert abs(sum(h["clean"][:n_test]) / n_test - rec["clean"][-1]) < 1e-12
            assert abs(sum(h["kernel_fgsm"][:n_test]) / n_test - rec["kernel_fgsm"][-1]) <= 1 / n_test
            for key, hk in h.items():          # robust hits are clean hits too
                assert len(hk) == len(h["clean"]) and all(a <= c for a, c in zip(hk, h["clean"])), key
                if not isinstance(rec.get(key), list) and key != "clean":   # the final-only attacks
                    assert abs(rec[key] - sum(hk) / len(hk)) < 1e-12, key
            assert all(r <= c + 1e-12 for r, c in zip(rec["own_fgsm"], rec["clean"]))
            assert all(r <= c + 1e-12 for r, c in zip(rec["kernel_fgsm"], rec["clean"]))
    kt = res["kernel_times"]
    assert [sum(h) / len(h) for h in kt["fgsm_hits"]] == kt["fgsm"] and len(kt["cos_frozen"]) == len(times)
    fe = res["features"]
    q = len(fe["robustness"])
    assert len(fe["random_k"]["robust"]) == len(fe["ks"]) and 0.5 <= fe["best_constant"] <= 1
    assert abs(sum(fe["full"]["robust_hits"]) / len(fe["full"]["robust_hits"]) - fe["full"]["robust"]) < 1e-12
    assert len(fe["full"]["val_robust_hits"]) == res["n_val"]
    assert [sum(h) / res["n_val"] for h in fe["robust_first"]["val_robust_hits"]] == fe["robust_first"]["val_robust"]
    assert [sum(d) / len(d) for d in fe["random_k"]["robust_draws"]] == pytest.approx(fe["random_k"]["robust"])
    assert len(res["kernel_rel_error_inits"]) == len(config["kernel_widths"])
    assert all(len(e) == config["kernel_inits"] for e in res["kernel_rel_error_inits"])
    assert res["kernel_rel_error"] == pytest.approx([np.mean(e) for e in res["kernel_rel_error_inits"]])
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
    """analyse against numpy/scipy on the result itself."""
    from scipy.stats import rankdata

    widths, kt, fe = res["config"]["widths"], res["kernel_times"], res["features"]
    assert ntk_features.claims(a, "smoke") and set(a["nets_end"]) == {str(w) for w in widths}

    def at_end(key, w):
        return np.array([rec[key][-1] if isinstance(rec[key], list) else rec[key] for rec in res["nets"][str(w)]])

    for w in widths:
        assert math.isclose(a["nets_end"][str(w)]["cos"]["mean"], at_end("cos", w).mean(), rel_tol=1e-9)
        assert a["nets_end"][str(w)]["own_pgd"]["min"] == min(rec["own_pgd"] for rec in res["nets"][str(w)])
        assert a["nets_end"][str(w)]["surrogate_fgsm"]["max"] == at_end("surrogate_fgsm", w).max()
    cos_w, cos_n = at_end("cos", widths[-1]), at_end("cos", widths[0])
    expect = "better" if cos_w.min() > cos_n.max() else "worse" if cos_w.max() < cos_n.min() else "overlapping"
    assert a["full_alignment"] == expect and math.isclose(a["full_alignment_gap"], cos_n.min() - cos_w.max())
    # the kernel machine's peak among the accurate steps, and the paired drop to the end
    clean, fgsm = np.array(kt["clean"]), np.array(kt["fgsm"])
    masked = np.where(clean >= ntk_features.CLEAN_MIN, fgsm, -np.inf)
    best = int(np.argmax(masked)) if np.isfinite(masked).any() else len(fgsm) - 1
    d = np.array(kt["fgsm_hits"][best], float) - np.array(kt["fgsm_hits"][-1], float)
    km = a["kernel_machine"]
    assert km["peak_step"] == res["times"][best] and km["peak_fgsm"] == kt["fgsm"][best]
    assert math.isclose(km["drop"], d.mean(), abs_tol=1e-12)
    assert math.isclose(km["drop_se"], d.std() / math.sqrt(len(d)), abs_tol=1e-12)
    # transfer: kernel FGSM hits minus the other attack's, per widest seed
    for t, rec in zip(a["transfer"], res["nets"][str(widths[-1])]):
        for other in ("surrogate_fgsm", "own_pgd", "random_sign"):
            diff = np.array(rec["hits"]["kernel_fgsm"], float) - np.array(rec["hits"][other], float)
            assert math.isclose(t[other]["diff"], diff.mean(), abs_tol=1e-12)
            assert math.isclose(t[other]["se"], diff.std() / math.sqrt(len(diff)), abs_tol=1e-12)
    # the m^(-1/2) slope
    slope = np.polyfit(np.log(res["kernel_widths"]), np.log(res["kernel_rel_error"]), 1)[0]
    assert math.isclose(a["kernel_error_slope"], slope, rel_tol=1e-9)
    # features: Spearman as the correlation of ranks, the count above chance, the sweet spot chosen on validation
    use, rob = np.array(fe["usefulness"]), np.array(fe["robustness"])
    idx = np.arange(len(use))
    rho_u = np.corrcoef(rankdata(idx), rankdata(use))[0, 1] if use.std() > 0 else 0.0
    assert math.isclose(a["features"]["usefulness_spearman"], rho_u, abs_tol=1e-9)
    n_val = res["n_val"]
    assert a["features"]["n_above_chance"] == int((rob - 0.5 > 2 * np.sqrt(rob * (1 - rob) / n_val)).sum())
    assert math.isclose(a["features"]["robustness_top10"], np.mean(fe["robustness"][:10]))
    rf = fe["robust_first"]
    vc, vr = np.array(rf["val_clean"]), np.array(rf["val_robust"])
    vr_ok = np.where(vc >= ntk_features.CLEAN_MIN, vr, -np.inf)
    k_best = int(np.argmax(vr_ok)) if np.isfinite(vr_ok).any() else int(np.argmax(vr))
    ss = a["sweet_spot"]
    assert ss["k"] == fe["ks"][k_best] and ss["clean"] == rf["clean"][k_best] and ss["robust"] == rf["robust"][k_best]
    gain = np.array(rf["robust_hits"][k_best], float) - np.array(fe["full"]["robust_hits"], float)
    assert math.isclose(ss["gain_over_full"], gain.mean(), abs_tol=1e-12)
    assert ss["random_robust"] == fe["random_k"]["robust"][k_best]
    assert math.isclose(ss["random_robust_se"], np.std(fe["random_k"]["robust_draws"][k_best], ddof=1)
                        / np.sqrt(len(fe["random_k"]["robust_draws"][k_best])), abs_tol=1e-12)
    back = np.array(rf["robust_hits"][-1], float) - np.array(rf["robust_hits"][k_best], float)
    assert math.isclose(ss["last_minus_spot"], back.mean(), abs_tol=1e-12)
    assert math.isclose(ss["last_minus_spot_se"], back.std() / np.sqrt(len(back)), abs_tol=1e-12)
    # cross-fitting: the number chosen on the test images, the gain measured on the validation images
    tc, tr = np.array(rf["clean"]), np.array(rf["robust"])
    tr_ok = np.where(tc >= ntk_features.CLEAN_MIN, tr, -np.inf)
    k_test = int(np.argmax(tr_ok)) if np.isfinite(tr_ok).any() else int(np.argmax(tr))
    gain_val = np.array(rf["val_robust_hits"][k_test], float) - np.array(fe["full"]["val_robust_hits"], float)
    assert ss["k_test"] == fe["ks"][k_test]
    assert math.isclose(ss["gain_crossed"], (gain.mean() + gain_val.mean()) / 2, abs_tol=1e-12)
    se_val = gain_val.std() / np.sqrt(len(gain_val))
    assert math.isclose(ss["gain_crossed_se"], np.hypot(gain.std() / np.sqrt(len(gain)), se_val) / 2, abs_tol=1e-12)
    # the kernel's distance: standard errors over the initialisations, carried into the slope by hand
    inits = np.array(res["kernel_rel_error_inits"])
    se = inits.std(axis=1, ddof=1) / np.sqrt(inits.shape[1])
    assert a["kernel_rel_error_se"] == pytest.approx(se)
    lx = np.log(res["kernel_widths"])
    w = (lx - lx.mean()) / ((lx - lx.mean()) ** 2).sum()
    assert math.isclose(a["kernel_error_slope_se"], np.sqrt((w ** 2 * (se / inits.mean(axis=1)) ** 2).sum()),
                        rel_tol=1e-9)
    m = ntk_features.margins(a)
    assert set(m) == {c.key for c in ntk_features.claims(a, "quick") if c.asserted_under("quick")}
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


def _transfer(kernel_minus):
    return {other: {"diff": kernel_minus[other], "se": 0.025} for other in kernel_minus}


def _good_analysis():
    """A synthetic analysis on which every claim of chapter 7 holds (with margin)."""
    t = {"own_fgsm": -0.18, "own_pgd": -0.12, "surrogate_fgsm": -0.16, "surrogate_pgd": -0.14, "random_sign": -0.35}
    return {"kernel_error_largest_step": -0.05, "kernel_error_slope": -0.52, "kernel_rel_error_widest": 0.02,
            "kernel_rel_error": [0.3, 0.1, 0.04, 0.02], "kernel_rel_error_se": [0.02, 0.005, 0.002, 0.001],
            "kernel_error_slope_se": 0.02, "n_test": 200,
            "predictor": {"agreement": 0.98}, "clean_min": 0.8,
            "widest": {"clean": [0.99, 0.99, 0.98], "cos": [0.45, 0.50, 0.48], "cos_lin": [0.980, 0.985, 0.983],
                       "cos_frozen": [0.997, 0.998, 0.996]},
            "narrowest": {"cos": [0.88, 0.90, 0.91], "cos_lin": [0.92, 0.94, 0.95]},
            "transfer": [_transfer(t), _transfer(t), _transfer(t)],
            "full_alignment_gap": 0.38,
            "kernel_machine": {"drop_z": 3.0, "clean_at_peak": 0.92, "end_clean": 0.99},
            "features": {"spearman": -0.8, "usefulness_spearman": -0.2, "n_above_chance": 0, "full_robust": 0.40,
                         "full_clean": 0.985, "best_constant": 0.5,
                         "robustness": [0.5 - 0.004 * i + 0.02 * ((7 * i) % 5 - 2) for i in range(100)],
                         "usefulness": [0.7 - 0.001 * i + 0.03 * ((3 * i) % 7 - 3) for i in range(100)]},
            "sweet_spot": {"robust": 0.65, "clean": 0.93, "random_robust": 0.15, "random_robust_se": 0.03,
                           "gain_over_full": 0.25, "gain_se": 0.03, "gain_crossed": 0.22, "gain_crossed_se": 0.025,
                           "last_robust": 0.45, "last_minus_spot": -0.20, "last_minus_spot_se": 0.03}}


def _every_predictor_constant(a):
    """The negative control of the whole chapter: every predictor and feature a constant (clean and
    "robust" accuracy 0.5 on the balanced pair, no attack changes it, no ranking)."""
    a["widest"]["clean"] = [0.5, 0.5, 0.5]
    a["transfer"] = [_transfer(dict.fromkeys(a["transfer"][0], 0.0)) for _ in range(3)]
    a["features"].update(spearman=0.0, usefulness_spearman=0.0)
    a["sweet_spot"].update(robust=0.5, clean=0.5, random_robust=0.5, gain_over_full=0.0, gain_crossed=0.0,
                           last_robust=0.5)


ROBUSTNESS_CLAIMS = ("kernel_attack_transfers", "kernel_attack_beats_noise", "robustness_at_the_top",
                     "sweet_spot_robust", "vulnerability_returns")


def _claims_but_strong_alignment(a, profile):
    """Every claim but the observation of strong full-gradient alignment at the widest width, which
    cannot hold together with ``full_alignment_falls`` (cosines are at most 1): it has its own test."""
    return [c for c in ntk_features.claims(a, profile) if c.key != "strong_alignment_widest"]


def test_claims_have_negative_controls():
    assert_negative_controls(_claims_but_strong_alignment, _good_analysis(), {
        "kernel_error_falls": _set(["kernel_error_largest_step"], 0.001),
        "kernel_error_slope": _set(["kernel_error_slope"], -0.66),
        "kernel_error_widest": _set(["kernel_rel_error_widest"], 0.05),
        "predictor_agreement": _set(["predictor", "agreement"], 0.94),
        "kernel_attack_transfers": lambda a: a["transfer"][1]["surrogate_fgsm"].update(diff=-0.03),
        "kernel_attack_beats_noise": lambda a: a["transfer"][2]["random_sign"].update(diff=-0.15),
        "lazy_alignment_grows": _set(["narrowest", "cos_lin"], [0.92, 0.94, 0.981]),
        "lazy_is_frozen_gate": _set(["widest", "cos_frozen"], [0.997, 0.984, 0.996]),
        "full_alignment_falls": _set(["full_alignment_gap"], 0.05),
        "robustness_peaks_early": _set(["kernel_machine", "drop_z"], 1.5),
        "clean_keeps_rising": _set(["kernel_machine", "end_clean"], 0.92),
        "robustness_at_the_top": _set(["features", "usefulness_spearman"], -0.6),        # only as fast as usefulness
        "no_feature_robust_alone": _set(["features", "n_above_chance"], 1),
        "sweet_spot_robust": _set(["sweet_spot", "clean"], 0.79),
        "sweet_spot_costs_accuracy": _set(["sweet_spot", "clean"], 0.985),
        "vulnerability_returns": _set(["sweet_spot", "last_robust"], 0.61),
    })


def test_the_strong_alignment_observation_holds_only_when_strong():
    a = _good_analysis()
    verdict = {c.key: c for c in ntk_features.claims(a, "quick")}
    assert not verdict["strong_alignment_widest"].holds and verdict["strong_alignment_widest"].profiles == ()
    a["widest"]["cos"] = [0.95, 0.92, 0.93]
    assert {c.key: c.holds for c in ntk_features.claims(a, "quick")}["strong_alignment_widest"]


def test_no_robustness_claim_holds_for_constant_predictors():
    a = _good_analysis()
    _every_predictor_constant(a)
    verdict = {c.key: c.holds for c in ntk_features.claims(a, "quick")}
    assert not any(verdict[k] for k in ROBUSTNESS_CLAIMS), verdict


def test_sweet_spot_parts_each_fail_alone():
    for key, value in (("robust", 0.5), ("random_robust", 0.56), ("gain_crossed", 0.09)):
        a = _good_analysis()
        a["sweet_spot"][key] = value
        assert not {c.key: c.holds for c in ntk_features.claims(a, "quick")}["sweet_spot_robust"], key


def test_claims_keep_the_chapters_thresholds_at_the_boundary():
    a = _good_analysis()
    a["kernel_rel_error_widest"], a["predictor"]["agreement"], a["features"]["spearman"] = 0.049, 0.95, -0.51
    verdict = {c.key: c.holds for c in ntk_features.claims(a, "quick")}
    assert verdict["kernel_error_widest"] and verdict["predictor_agreement"] and verdict["robustness_at_the_top"]
    observations = {"strong_alignment_widest", "robustness_peaks_early", "clean_keeps_rising",
                    "no_feature_robust_alone", "sweet_spot_costs_accuracy"}
    for c in ntk_features.claims(a, "quick"):
        assert c.profiles == (() if c.key in observations else ("quick",)), c.key


def test_margins_in_standard_errors():
    """Each asserted claim's distance from its threshold over its standard error, by hand."""
    from scipy.stats import spearmanr

    a = _good_analysis()
    m = ntk_features.margins(a)
    assert set(m) == {c.key for c in ntk_features.claims(a, "quick") if c.asserted_under("quick")}
    se = a["kernel_rel_error_se"]
    assert m["kernel_error_falls"] == pytest.approx(min((0.3 - 0.1) / np.hypot(0.02, 0.005),
                                                        (0.1 - 0.04) / np.hypot(0.005, 0.002),
                                                        (0.04 - 0.02) / np.hypot(0.002, 0.001)))
    assert m["kernel_error_slope"] == pytest.approx((0.15 - 0.02) / 0.02)
    assert m["kernel_error_widest"] == pytest.approx((0.05 - 0.02) / se[-1])
    assert m["predictor_agreement"] == pytest.approx(0.03 / np.sqrt(0.95 * 0.05 / 200))    # the SE at the threshold
    # transfer: the smallest over seeds and parts; the clean parts binomial, the differences paired
    assert m["kernel_attack_transfers"] == pytest.approx(min((-0.05 + 0.12) / 0.025, 0.18 / np.sqrt(0.8 * 0.2 / 200)))
    assert m["kernel_attack_beats_noise"] == pytest.approx((-0.20 + 0.35) / 0.025)
    wl, nl = a["widest"]["cos_lin"], a["narrowest"]["cos_lin"]
    assert m["lazy_alignment_grows"] == pytest.approx((min(wl) - max(nl)) / np.sqrt(np.var(wl, ddof=1)
                                                                                   + np.var(nl, ddof=1)))
    gaps = np.array(a["widest"]["cos_frozen"]) - np.array(wl)
    assert m["lazy_is_frozen_gate"] == pytest.approx(gaps.min() / gaps.std(ddof=1))
    spread = np.sqrt(np.var(a["narrowest"]["cos"], ddof=1) + np.var(a["widest"]["cos"], ddof=1))
    assert m["full_alignment_falls"] == pytest.approx((0.38 - 0.1) / spread)
    # the Spearman correlations: a bootstrap over the features, by hand with the same resamples
    rob, use = np.array(a["features"]["robustness"]), np.array(a["features"]["usefulness"])
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(200):
        i = rng.choice(len(rob), size=len(rob))
        r, u = spearmanr(i, rob[i]).statistic, spearmanr(i, use[i]).statistic
        boot.append((r, r - u))
    sd = np.std(boot, axis=0, ddof=1)
    assert m["robustness_at_the_top"] == pytest.approx(min((-0.5 + 0.8) / sd[0], (-0.3 + 0.6) / sd[1]))
    ss = a["sweet_spot"]
    se_spot = np.sqrt(0.65 * 0.35 / 200)
    assert m["sweet_spot_robust"] == pytest.approx(min((0.93 - 0.8) / np.sqrt(0.8 * 0.2 / 200),
                                                       (0.65 - 0.5) / np.sqrt(0.5 * 0.5 / 200),
                                                       (0.65 - 0.15 - 0.10) / np.hypot(se_spot, 0.03),
                                                       (0.22 - 0.10) / 0.025))
    assert m["vulnerability_returns"] == pytest.approx((-0.05 + 0.20) / ss["last_minus_spot_se"])
    # a thinner value gives a smaller margin
    a["sweet_spot"]["gain_crossed"] = 0.13
    assert ntk_features.margins(a)["sweet_spot_robust"] == pytest.approx(0.03 / 0.025)


def test_above_chance():
    assert ntk_features.above_chance(0.5) == 0 and ntk_features.above_chance(1.0) == 1
    assert ntk_features.above_chance(0.25) == -0.5


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
