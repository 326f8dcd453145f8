"""Tests of the ``theorems`` experiment (chapter 2): smoke-scale invariants, cache reuse, and the
``paper`` profile's code path."""
import math

import numpy as np
import pytest
import torch

from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import batchnorm, theorems

from smoke_runs import rerun_from_cache, smoke_run


@pytest.fixture(scope="module")
def theorems_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "theorems")


def test_theorem1_result(theorems_run):
    result, _, _ = theorems_run
    profile = get_profile("smoke")
    t1 = result["theorem1"]
    assert t1["networks"] == ["smooth, init", "smooth, trained", "relu, init", "relu, trained"]
    assert t1["perturbations"] == list(theorems.PERTURBATIONS)
    eps = t1["eps"]
    assert eps == sorted(eps) and eps[0] == pytest.approx(1e-6) and any(math.isclose(e, profile.eps) for e in eps)
    for n in t1["networks"]:
        for p, values in t1["rel_change"][n].items():
            assert len(values) == len(eps) and all(v >= 0 and math.isfinite(v) for v in values)
        assert (t1["clean_acc"][n] is None) == n.endswith("init")
    # the smooth network follows the theorem: orders 1 and 2 at small eps
    for n in ("smooth, init", "smooth, trained"):
        assert t1["slopes"][n]["random"] == pytest.approx(1, abs=0.1)
        assert t1["slopes"][n]["antithetic"] == pytest.approx(2, abs=0.2)
        assert t1["slopes"][n]["fgsm"] == pytest.approx(1, abs=0.1)
    assert result["compute_seconds"] > 0


def test_theorem2_result(theorems_run):
    result, _, _ = theorems_run
    t2 = result["theorem2"]
    assert t2["networks"] == ["smooth, trained", "relu, trained"]
    sizes = t2["batch_sizes"]
    assert sizes == [b for b in theorems.BATCH_SIZES if b <= get_profile("smoke").n_train]
    per_size = theorems.settings(get_profile("smoke"))["batches_per_size"]
    for n in t2["networks"]:
        r = t2[n]
        for source in ("clean", "adversarial"):
            assert r[source]["size"] == [b for b in sizes for _ in range(per_size)]
            assert all(g > 0 and e > 0 for g, e in zip(r[source]["gap"], r[source]["error"]))
            # the total gap is the sum of the per-layer mean and variance gaps
            np.testing.assert_allclose(r[source]["gap"], np.add(r[source]["mean_gap"], r[source]["var_gap"]))
        assert -1 <= r["spearman"]["clean"] <= 1
        # adversarial batches are further from the clean data-set statistics
        assert np.median(r["adversarial"]["gap"]) > np.median(r["clean"]["gap"])


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
    assert relu == batchnorm.model_profile(quick, "with buffer") and relu.model_kwargs["width"] == 16
    assert theorems.TRAIN_OVERRIDES == batchnorm.train_overrides(quick, "normal")
    assert config["batch_sizes"] == list(theorems.BATCH_SIZES)
    paper = get_profile("paper")
    assert any(math.isclose(e, 8 / 255) for e in theorems.eps_grid(paper))   # the training eps is on the grid
    assert theorems.smooth_profile(paper).model == "small_cnn"


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
