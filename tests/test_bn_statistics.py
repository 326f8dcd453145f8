"""Tests of the SmallCNN activation/pool options and of the BN-statistics tools of ntklab.models
(chapter 2, Theorem 2; chapter 3), each against a hand computation."""
import copy

import pytest
import torch
from torch import nn

from ntklab import models
from ntklab.models import (SmallCNN, bn_batch_statistics, bn_dataset_statistics, bn_layers, bn_statistics_gap,
                           using_bn_statistics)
from ntklab.ntk import empirical_ntk


def _with_running_stats(net, seed=0):
    """Give the BN buffers of ``net`` values far from (0, 1), so that mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bn_layers(net):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def _hand_forward(net, x, stats=None):
    """SmallCNN's forward pass written out, every BN normalised by ``stats[l]`` or, if None, by the
    statistics of its own input (train mode). Returns (logits, [(mean, biased var) per BN input])."""
    f = net.features
    seen = []

    def bn(module, h, layer):
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        seen.append((mean, var))
        if stats is not None:
            mean, var = stats[layer]
        mean, var = mean.to(h.dtype)[None, :, None, None], var.to(h.dtype)[None, :, None, None]
        return (h - mean) / torch.sqrt(var + module.eps) * module.weight[None, :, None, None] \
            + module.bias[None, :, None, None]

    h = f[0](net.normalize(x))
    h = f[3](f[2](bn(f[1], h, 0)))
    h = f[4](h)
    h = f[7](f[6](bn(f[5], h, 1)))
    return net.classifier(h), seen


# ---------------------------------------------------------------- SmallCNN options
def test_small_cnn_default_is_unchanged():
    net = SmallCNN()
    assert models.count_parameters(net) == 421_738
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                               nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(net.classifier[2], nn.ReLU)


@pytest.mark.parametrize("activation, pool, act_type, pool_type", [
    ("gelu", "avg", nn.GELU, nn.AvgPool2d), ("softplus", "max", nn.Softplus, nn.MaxPool2d),
    ("relu", "avg", nn.ReLU, nn.AvgPool2d)])
def test_small_cnn_variants_same_parameters_and_keys(activation, pool, act_type, pool_type):
    torch.manual_seed(0)
    ref = SmallCNN(width=4)
    torch.manual_seed(0)
    net = SmallCNN(width=4, activation=activation, pool=pool)
    assert list(net.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert isinstance(net.features[2], act_type) and isinstance(net.classifier[2], act_type)
    assert isinstance(net.features[3], pool_type) and isinstance(net.features[7], pool_type)
    x = torch.rand(3, 1, 28, 28)
    # the same weights compute another function, which the hand-written forward pass reproduces
    torch.testing.assert_close(net.eval()(x), _hand_forward(net, x, [(m.running_mean, m.running_var)
                                                                     for m in bn_layers(net)])[0])
    assert not torch.allclose(net(x), ref.eval()(x))


def test_small_cnn_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid activations are: relu, gelu, softplus"):
        SmallCNN(activation="tanh")
    with pytest.raises(ValueError, match="unknown pool 'min'; valid pools are: max, avg"):
        SmallCNN(pool="min")


@pytest.mark.parametrize("activation, pool", [("gelu", "avg"), ("softplus", "avg"), ("gelu", "max")])
def test_ntk_of_the_variants_against_the_jacobian_reference(activation, pool):
    torch.manual_seed(1)
    net = _with_running_stats(SmallCNN(width=3, activation=activation, pool=pool)).double()
    x1, x2 = torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.rand(4, 1, 28, 28, dtype=torch.float64)
    for kind in ("full", "trace"):
        K = empirical_ntk(net, x1, x2, kind=kind)
        K_ref = empirical_ntk(net, x1, x2, kind=kind, implementation="jacobian")
        torch.testing.assert_close(K, K_ref, rtol=1e-10, atol=1e-10 * float(K_ref.abs().max()))


def test_smooth_variant_is_smooth_in_the_input():
    """Finite differences of the output: second differences shrink like h^2 for GELU/avg pooling."""
    torch.manual_seed(2)
    net = _with_running_stats(SmallCNN(width=3, activation="gelu", pool="avg")).double()
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    d = torch.randn_like(x)
    second = []
    for h in (1e-2, 1e-3):
        with torch.no_grad():
            second.append(float((net(x + h * d) - 2 * net(x) + net(x - h * d)).abs().max()))
    assert second[1] < second[0] / 50          # ~ h^2: a factor 100 for h / 10


# ---------------------------------------------------------------- batch statistics
@pytest.mark.parametrize("track", [True, False])
def test_batch_statistics_match_a_hand_normalised_forward_pass(track):
    torch.manual_seed(3)
    net = _with_running_stats(SmallCNN(width=3, track_running_stats=track))
    buffers = copy.deepcopy(net.state_dict())
    x = torch.rand(12, 1, 28, 28)
    stats = bn_batch_statistics(net, x)
    _, seen = _hand_forward(net, x)
    assert len(stats) == 2
    for (mean, var), (mean_h, var_h) in zip(stats, seen):
        assert mean.dtype == var.dtype == torch.float64
        torch.testing.assert_close(mean, mean_h.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, var_h.double(), rtol=1e-5, atol=1e-6)
    # nothing changed: buffers (no running-statistics update) and modes
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("track", [True, False])
def test_installed_batch_statistics_reproduce_train_mode(track):
    torch.manual_seed(4)
    net = _with_running_stats(SmallCNN(width=3, track_running_stats=track))
    x = torch.rand(10, 1, 28, 28)
    stats = bn_batch_statistics(net, x)
    with using_bn_statistics(net, stats):
        inside = net(x)
        assert all(not m.training and m.running_mean is not None for m in bn_layers(net))
    twin = copy.deepcopy(net).train()
    torch.testing.assert_close(inside, twin(x), rtol=1e-4, atol=1e-5)
    # the statistics are constants: the output of one input does not depend on the others
    with using_bn_statistics(net, stats):
        torch.testing.assert_close(net(x[:3]), inside[:3], rtol=1e-5, atol=1e-6)


def test_using_statistics_restores_everything_even_after_an_error():
    torch.manual_seed(5)
    net = _with_running_stats(SmallCNN(width=3))
    net.features[1].train()
    before = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    stats = [(torch.zeros(3), torch.ones(3)), (torch.zeros(6), torch.ones(6))]
    with pytest.raises(RuntimeError, match="boom"):
        with using_bn_statistics(net, stats):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes
    free = SmallCNN(width=3, track_running_stats=False)
    with using_bn_statistics(free, stats):
        pass
    assert all(m.running_mean is None and m.running_var is None and not m.track_running_stats
               for m in bn_layers(free))
    # None leaves a layer as it is
    with using_bn_statistics(net, [None, stats[1]]):
        assert torch.equal(net.features[1].running_mean, before["features.1.running_mean"])
        assert net.features[5].running_mean.abs().max() == 0


def test_using_statistics_checks_its_input():
    net = SmallCNN(width=3)
    good = (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"one entry per BN layer \(2\), got 1"):
        with using_bn_statistics(net, [good]):
            pass
    with pytest.raises(ValueError, match=r"stats\[1\] mean must be a tensor of shape \(6,\)"):
        with using_bn_statistics(net, [good, good]):
            pass
    with pytest.raises(ValueError, match=r"stats\[0\] var must be >= 0"):
        with using_bn_statistics(net, [(torch.zeros(3), -torch.ones(3)), None]):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with using_bn_statistics(net, [(torch.full((3,), float("nan")), torch.ones(3)), None]):
            pass


def test_statistics_functions_check_their_input():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bn_batch_statistics(SmallCNN(width=3, bn=False), torch.rand(4, 1, 28, 28))
    with pytest.raises(ValueError, match="at least 2 inputs"):
        bn_batch_statistics(SmallCNN(width=3), torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        bn_dataset_statistics(SmallCNN(width=3), torch.full((4, 1, 28, 28), float("inf")))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        bn_dataset_statistics(SmallCNN(width=3), torch.rand(4, 1, 28, 28), batch_size=0)
    with pytest.raises(ValueError, match="floating-point batch"):
        bn_batch_statistics(SmallCNN(width=3), torch.ones(4, 1, 28, 28, dtype=torch.long))


# ---------------------------------------------------------------- data-set statistics
def test_dataset_statistics_layer_by_layer_by_hand():
    torch.manual_seed(6)
    net = _with_running_stats(SmallCNN(width=3))
    before = copy.deepcopy(net.state_dict())
    x = torch.rand(23, 1, 28, 28)
    stats = bn_dataset_statistics(net, x, batch_size=5)
    # layer 0: the moments of its input over all 23 images
    f = net.features
    h0 = f[0](net.normalize(x)).double()
    torch.testing.assert_close(stats[0][0], h0.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats[0][1], h0.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-7)
    # layer 1: the moments of its input, layer 0 normalised by the data-set statistics of layer 0
    _, seen = _hand_forward(net, x, stats=[stats[0], stats[1]])
    torch.testing.assert_close(stats[1][0], seen[1][0].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[1][1], seen[1][1].double(), rtol=1e-5, atol=1e-6)
    # the batch size does not matter; one batch holding everything gives its batch statistics
    for a, b in zip(stats, bn_dataset_statistics(net, x, batch_size=100)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(stats, bn_batch_statistics(net, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_dataset_statistics_differ_from_the_running_estimates():
    """The momentum estimates of a short train-mode run are not the exact data-set statistics."""
    torch.manual_seed(7)
    net = SmallCNN(width=3)
    x = torch.rand(64, 1, 28, 28) * torch.rand(64, 1, 1, 1)
    net.train()
    with torch.no_grad():
        for idx in torch.arange(64).split(16):
            net(x[idx])
    net.eval()
    exact = bn_dataset_statistics(net, x)
    running = [(m.running_mean, m.running_var) for m in bn_layers(net)]
    gap = bn_statistics_gap(running, exact)
    assert float(gap["total"]) > 0.05


# ---------------------------------------------------------------- the gap
def test_statistics_gap_by_hand():
    ref = [(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]))]
    same = bn_statistics_gap(ref, ref)
    assert float(same["total"]) == 0
    other = [(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 8.0]))]
    gap = bn_statistics_gap(other, ref)
    # mean: RMS of (0.5 / 1, 0 / 2) = sqrt(0.125); var: RMS of (0, 4 / 8) = sqrt(0.125)
    assert float(gap["mean"][0]) == pytest.approx(0.125 ** 0.5)
    assert float(gap["var"][0]) == pytest.approx(0.125 ** 0.5)
    assert float(gap["total"]) == pytest.approx(2 * 0.125 ** 0.5)
    with pytest.raises(ValueError, match="same number"):
        bn_statistics_gap(other + other, ref)
    with pytest.raises(ValueError, match="must be > 0"):
        bn_statistics_gap(ref, [(torch.zeros(2), torch.zeros(2))])
