"""Tests of the ``batchnorm`` experiment (chapter 3). ``evaluate.predict`` and ``craft``, the
batch-dependent evaluation it uses, are tested in test_evaluate.py."""
import pytest
import torch

from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import batchnorm

from smoke_runs import rerun_from_cache, smoke_run


# ---------------------------------------------------------------- the experiment
@pytest.fixture(scope="module")
def batchnorm_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "batchnorm")


def test_batchnorm_result(batchnorm_run):
    result, _, paths = batchnorm_run
    assert result["same_init"] is True
    assert result["models"] == ["normal, with buffer", "normal, without buffer", "pgd, with buffer",
                                "pgd, without buffer"]
    # three models trained and cached under "models" (normal without buffer has the weights of
    # normal with buffer), then the experiment
    assert [p.parent.name for p, how in paths if how == "computed"].count("models") == 3
    assert result["shared_weights"] == {"normal, without buffer": "normal, with buffer"}
    sizes = result["config"]["test_batch_sizes"]
    for name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        with_buffer = name.endswith("with buffer")
        # running: one row; batch statistics: per size, 2 crafting modes x 2 compositions
        assert len(rows) == (1 if with_buffer else 0) + 4 * len(sizes)
        for r in rows:
            assert 0 <= r["robust"] <= r["clean"] <= 1
            assert (r["clean_next_to_adv"] is None) == (r["composition"] != "half")
        assert 0 <= result["robust"][name] <= min(r["robust"] for r in rows
                                                  if r["test_bn"] == ("running" if with_buffer else "batch"))
        assert 0 <= result["autoattack"][name] <= 1 and result["robust"][name] <= result["autoattack"][name]
        assert all(isinstance(f, str) for f in result["autoattack_flags"][name])
        assert set(result["ks"][name]) == {"clean", "ae"} and all(v > 0 for v in result["ks"][name].values())
    # the same initialisation and data order with and without buffer: identical first (normal) epochs
    h = result["histories"]
    assert h["pgd, with buffer"]["strategy"][0] == "normal"
    assert h["normal, with buffer"]["loss"][0] == pytest.approx(h["pgd, with buffer"]["loss"][0])


def test_normal_training_never_reads_the_buffers():
    """Why the experiment copies the normal model instead of training it twice; PGD-AT differs,
    because its attack runs in eval mode (running statistics with buffer, batch without)."""
    profile = get_profile("smoke").replace(epochs=1)
    weights = {}
    for strategy in ("normal", "pgd"):
        for buffer in batchnorm.BUFFERS:
            net, _ = experiments.trained_model(batchnorm.model_profile(profile, buffer), strategy, device="cpu",
                                               progress=False, eval_every=0)
            weights[strategy, buffer] = net.state_dict()
    for strategy, same in (("normal", True), ("pgd", False)):
        a, b = weights[strategy, "with buffer"], weights[strategy, "without buffer"]
        assert set(b) < set(a) and all("running" in k or "num_batches" in k for k in set(a) - set(b))
        assert all(torch.equal(a[k], b[k]) for k in b) == same, strategy


def test_batchnorm_second_run_loads_the_cache(batchnorm_run, monkeypatch):
    result, out, _ = batchnorm_run
    again, _ = rerun_from_cache("batchnorm", out, monkeypatch, batchnorm, "_compute")
    assert again["rows"] == result["rows"]


def test_batchnorm_config():
    quick = get_profile("quick")
    config = batchnorm.make_config(quick)
    assert config["test_batch_sizes"] == [500, 100, 20]
    models = config["models"]
    assert models["pgd, with buffer"]["train"] == {"eval_every": 0, "switch_epoch": 4}
    assert models["normal, without buffer"]["profile"]["model_kwargs"] == {"width": 16, "track_running_stats": False}
    assert batchnorm.model_profile(get_profile("paper"), "with buffer").model_kwargs == {"track_running_stats": True}
    with pytest.raises(ValueError, match="buffer must be one of 'with buffer', 'without buffer', got 'none'"):
        batchnorm.model_profile(quick, "none")


def test_batchnorm_paper_code_path(paper_profile):
    result = experiments.run("batchnorm", paper_profile, "cpu", progress=False)
    assert result["config"]["profile"]["model"] == "preact_resnet18"
    assert result["config"]["test_batch_sizes"] == [20]
    assert result["same_init"] is True
    for name in result["models"]:
        assert 0 <= result["robust"][name] <= result["clean"][name] <= 1
        assert "switch_epoch" not in result["config"]["models"][name]["train"]
