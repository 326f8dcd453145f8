"""Tests of ntklab.evaluate.predict / craft (batch-dependent models) and of the ``batchnorm``
experiment (chapter 3)."""
import copy

import pytest
import torch

from ntklab import attacks, evaluate, experiments
from ntklab.config import get_profile
from ntklab.experiments import batchnorm
from ntklab.models import bn_layers

from smoke_runs import rerun_from_cache, smoke_run


@pytest.fixture(scope="module")
def free_cnn(trained_cnn):
    """The trained test CNN with its BN layers switched to batch statistics (no buffers)."""
    net = copy.deepcopy(trained_cnn)
    for m in bn_layers(net):
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None
    return net.eval()


# ---------------------------------------------------------------- predict
def test_predict_in_eval_mode_is_per_example(trained_cnn, mnist_small):
    x = mnist_small[1].tensors[0][:50]
    with torch.no_grad():
        ref = trained_cnn(x).argmax(1)
    for b in (50, 7, 1):
        assert torch.equal(evaluate.predict(trained_cnn, x, batch_size=b), ref)


def test_predict_with_batch_statistics_by_hand(trained_cnn, mnist_small):
    x = mnist_small[1].tensors[0][:30]
    buffers = copy.deepcopy(trained_cnn.state_dict())
    pred = evaluate.predict(trained_cnn, x, batch_size=10, bn_mode="train")
    twin = copy.deepcopy(trained_cnn).train()                       # train-mode BN, by hand
    with torch.no_grad():
        ref = torch.cat([twin(x[s:s + 10]).argmax(1) for s in (0, 10, 20)])
    assert torch.equal(pred, ref)
    assert all(torch.equal(buffers[k], v) for k, v in trained_cnn.state_dict().items())
    assert not trained_cnn.training


def test_predict_mixed_batches_by_hand(free_cnn, mnist_small):
    x = mnist_small[1].tensors[0][:20]
    other = 1 - x                                                   # very different statistics
    pred = evaluate.predict(free_cnn, x, batch_size=8, mix=other)
    ref = torch.empty(20, dtype=torch.long)
    with torch.no_grad():
        for s, e in ((0, 8), (8, 16), (16, 20)):
            h = (e - s) // 2
            first = free_cnn(torch.cat([x[s:s + h], other[s + h:e]])).argmax(1)
            second = free_cnn(torch.cat([other[s:s + h], x[s + h:e]])).argmax(1)
            ref[s:s + h], ref[s + h:e] = first[:h], second[h:]
    assert torch.equal(pred, ref)
    # the company matters for a batch-statistics model
    assert not torch.equal(pred, evaluate.predict(free_cnn, x, batch_size=8))


def test_predict_checks_its_input(trained_cnn):
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="bn_mode must be 'eval' or 'train'"):
        evaluate.predict(trained_cnn, x, bn_mode="keep")
    with pytest.raises(ValueError, match="mix must have the shape of X"):
        evaluate.predict(trained_cnn, x, mix=x[:2])
    with pytest.raises(ValueError, match=r"X must be a 4-D tensor \(N, C, H, W\) of images in \[0, 1\]"):
        evaluate.predict(trained_cnn, x[0])
    with pytest.raises(ValueError, match=r"X must lie in \[0, 1\]"):
        evaluate.predict(trained_cnn, x + 1)
    with pytest.raises(ValueError, match=r"mix must lie in \[0, 1\]"):
        evaluate.predict(trained_cnn, x, mix=x - 1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate.predict(trained_cnn, x, batch_size=0)


# ---------------------------------------------------------------- craft
def test_craft_equals_the_attack_batch_by_batch(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors[0][:30], mnist_small[1].tensors[1][:30]
    torch.manual_seed(0)
    x_adv = evaluate.craft(trained_cnn, (x, y), attack="pgd", eps=0.1, alpha=0.03, steps=3, batch_size=12,
                           bn_mode="train")
    torch.manual_seed(0)
    ref = torch.cat([attacks.pgd(trained_cnn, x[s:s + 12], y[s:s + 12], eps=0.1, alpha=0.03, steps=3, bn_mode="train")
                     for s in (0, 12, 24)])
    assert torch.equal(x_adv, ref)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    fg = evaluate.craft(trained_cnn, (x, y), attack="fgsm", eps=0.1)
    assert torch.equal(fg, attacks.fgsm(trained_cnn, x, y, eps=0.1))
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate.craft(trained_cnn, (x, y), attack="cw", eps=0.1)


def test_gradient_masking_by_batch_statistics(free_cnn, trained_cnn, mnist_small):
    """Attacking a batch-statistics model batch by batch is weaker than transferring the examples
    of its running-statistics twin: the trap chapter 3 describes (a normally trained net)."""
    x, y = mnist_small[1].tensors[0][:100], mnist_small[1].tensors[1][:100]
    torch.manual_seed(0)
    own = evaluate.craft(free_cnn, (x, y), attack="pgd", eps=0.3, alpha=0.075, steps=10, batch_size=100)
    torch.manual_seed(0)
    transferred = evaluate.craft(trained_cnn, (x, y), attack="pgd", eps=0.3, alpha=0.075, steps=10, batch_size=100)
    acc_own = float((evaluate.predict(free_cnn, own, batch_size=100) == y).float().mean())
    acc_transfer = float((evaluate.predict(free_cnn, transferred, batch_size=100) == y).float().mean())
    assert acc_transfer < acc_own


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
