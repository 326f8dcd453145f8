"""The ``overfitting`` experiment (chapter 6): result shapes and invariants under ``smoke``, the
cache, the book's collapse rule, and the ``paper`` profile's code path on a tiny CPU subset."""
import os

import pytest
import torch

from ntklab.config import get_profile
from ntklab.experiments import cache
from ntklab.experiments import overfitting as co

from smoke_runs import rerun_from_cache, smoke_run


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
