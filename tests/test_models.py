"""ntklab.models: the architectures, their sizes and options (SmallCNN's activation and pooling
variants against a hand-written forward pass), and the input normalisation inside them."""
import pytest
import torch
from torch import nn

from bn_helpers import hand_forward, with_running_stats
from ntklab import models
from ntklab.bn import bn_layers
from ntklab.ntk import empirical_ntk


def test_small_cnn_shapes_and_size():
    net = models.SmallCNN()
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert models.count_parameters(net) == 421_738
    tiny = models.SmallCNN(width=4, num_classes=3, in_channels=3, image_size=32)
    assert tiny(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert models.count_parameters(tiny) < models.count_parameters(net) / 20


def test_small_cnn_rejects_wrong_shapes():
    net = models.SmallCNN()
    with pytest.raises(ValueError, match=r"built for 28x28 images"):
        net(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\)"):
        net(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="divisible by 4"):
        models.SmallCNN(image_size=30)


def test_preact_resnet18_and_wide_resnet():
    net = models.PreActResNet18()
    assert 11_000_000 < models.count_parameters(net) < 11_300_000
    narrow = models.PreActResNet18(width=4)
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    wrn = models.WideResNet(depth=10, widen=2, num_classes=100)
    assert wrn(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.WideResNet(depth=33)
    assert 46_000_000 < models.count_parameters(models.WideResNet(34, 10)) < 46_300_000


def test_normalisation_lives_inside_the_model():
    mean, std = (0.5,), (0.25,)
    net = models.SmallCNN(width=2, mean=mean, std=std).eval()
    plain = models.SmallCNN(width=2).eval()
    plain.load_state_dict(net.state_dict(), strict=False)
    plain.normalize.mean.fill_(0.0)
    plain.normalize.std.fill_(1.0)
    x = torch.rand(4, 1, 28, 28)
    # the normalised model on x equals the identity-normalised one on (x - mean) / std
    torch.testing.assert_close(net(x), plain((x - 0.5) / 0.25))
    assert not any("normalize" in name for name, _ in net.named_parameters())
    with pytest.raises(ValueError, match="positive"):
        models.Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="one per input channel"):
        models.SmallCNN(in_channels=3, mean=(0.5,), std=(0.2,))


def test_bn_option():
    with_bn = models.SmallCNN(width=2)
    without = models.SmallCNN(width=2, bn=False)
    assert len(models.bn_layers(with_bn)) == 2 and models.bn_layers(without) == []
    no_stats = models.PreActResNet18(width=2, track_running_stats=False)
    assert all(m.running_mean is None for m in models.bn_layers(no_stats))
    assert models.PreActResNet18(width=2, bn=False)(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_two_layer_net_ntk_parameterisation():
    torch.manual_seed(0)
    net = models.TwoLayerNet(in_features=784, width=4096)
    assert [name for name, _ in net.named_parameters()] == ["weight"]  # second layer frozen
    assert set(net.second.unique().tolist()) == {-1.0, 1.0}
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        out, out_wide = net(x), models.TwoLayerNet(in_features=784, width=16384)(x)
    assert out.shape == (64, 10)
    # NTK scaling: outputs stay O(|x|) as the width grows (1/sqrt(width) normalisation)
    ratio = float(out_wide.std() / out.std())
    assert 0.7 < ratio < 1.4
    trainable = models.TwoLayerNet(in_features=784, width=8, freeze_second=False)
    assert {n for n, _ in trainable.named_parameters()} == {"weight", "second"}
    with pytest.raises(ValueError, match="expects 784 input features"):
        net(torch.rand(2, 1, 8, 8))


def test_build_model_by_name():
    net = models.build_model("small_cnn", width=2)
    assert isinstance(net, models.SmallCNN)
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*small_cnn"):
        models.build_model("resnet50")


# ---------------------------------------------------------------- SmallCNN options
def test_small_cnn_default_is_unchanged():
    net = models.SmallCNN()
    assert models.count_parameters(net) == 421_738
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                               nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(net.classifier[2], nn.ReLU)


@pytest.mark.parametrize("activation, pool, act_type, pool_type", [
    ("gelu", "avg", nn.GELU, nn.AvgPool2d), ("softplus", "max", nn.Softplus, nn.MaxPool2d),
    ("relu", "avg", nn.ReLU, nn.AvgPool2d)])
def test_small_cnn_variants_same_parameters_and_keys(activation, pool, act_type, pool_type):
    torch.manual_seed(0)
    ref = models.SmallCNN(width=4)
    torch.manual_seed(0)
    net = models.SmallCNN(width=4, activation=activation, pool=pool)
    assert list(net.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert isinstance(net.features[2], act_type) and isinstance(net.classifier[2], act_type)
    assert isinstance(net.features[3], pool_type) and isinstance(net.features[7], pool_type)
    x = torch.rand(3, 1, 28, 28)
    # the same weights compute another function, which the hand-written forward pass reproduces
    torch.testing.assert_close(net.eval()(x), hand_forward(net, x, [(m.running_mean, m.running_var)
                                                                     for m in bn_layers(net)])[0])
    assert not torch.allclose(net(x), ref.eval()(x))


def test_small_cnn_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid activations are: relu, gelu, softplus"):
        models.SmallCNN(activation="tanh")
    with pytest.raises(ValueError, match="unknown pool 'min'; valid pools are: max, avg"):
        models.SmallCNN(pool="min")


@pytest.mark.parametrize("activation, pool", [("gelu", "avg"), ("softplus", "avg"), ("gelu", "max")])
def test_ntk_of_the_variants_against_the_jacobian_reference(activation, pool):
    torch.manual_seed(1)
    net = with_running_stats(models.SmallCNN(width=3, activation=activation, pool=pool)).double()
    x1, x2 = torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.rand(4, 1, 28, 28, dtype=torch.float64)
    for kind in ("full", "trace"):
        K = empirical_ntk(net, x1, x2, kind=kind)
        K_ref = empirical_ntk(net, x1, x2, kind=kind, implementation="jacobian")
        torch.testing.assert_close(K, K_ref, rtol=1e-10, atol=1e-10 * float(K_ref.abs().max()))


def test_smooth_variant_is_smooth_in_the_input():
    """Finite differences of the output: second differences shrink like h^2 for GELU/avg pooling."""
    torch.manual_seed(2)
    net = with_running_stats(models.SmallCNN(width=3, activation="gelu", pool="avg")).double()
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    d = torch.randn_like(x)
    second = []
    for h in (1e-2, 1e-3):
        with torch.no_grad():
            second.append(float((net(x + h * d) - 2 * net(x) + net(x - h * d)).abs().max()))
    assert second[1] < second[0] / 50          # ~ h^2: a factor 100 for h / 10
