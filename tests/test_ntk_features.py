"""Chapter 7: the ``ntk_features`` experiment (smoke, cache, and the paper code path)."""
import pytest
import torch

import ntklab
from ntklab.experiments import cache, ntk_features


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


def test_paper_settings_follow_tsilivis_and_kempe(paper_profile):
    real = ntk_features.settings(ntklab.config.get_profile("paper"))
    assert real["classes"] == [0, 1] and real["widths"] == [256, 2048, 16384] and real["steps"] == 10000
    assert real["eps"] == 8 / 255
    tiny = ntk_features.settings(paper_profile)
    assert tiny["widths"] == [16, 128, 1024] and tiny["steps"] == 100


def test_paper_code_path(paper_profile, tmp_path):
    res = ntklab.experiments.run("ntk_features", paper_profile, "cpu", out=tmp_path, progress=False)
    _check_result(res, ntk_features.make_config(paper_profile))
    assert res["features"]["grad_image_x"].shape == (3, 32, 32)
