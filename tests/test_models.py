import pytest
import torch

from ntklab import models


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


def test_set_bn_running_stats_switches_estimators():
    torch.manual_seed(0)
    net = models.SmallCNN(width=2)
    x = torch.rand(16, 1, 28, 28) * 0.5 + 0.5  # statistics far from the initial running ones
    net.train()
    net(x)
    net.eval()
    with_running = net(x[:4])
    models.set_bn_running_stats(net, False)
    assert all(m.running_mean is None and not m.track_running_stats for m in models.bn_layers(net))
    batch_stats = net(x[:4])  # eval mode, but normalised with the batch's own statistics
    assert not torch.allclose(with_running, batch_stats, atol=1e-3)
    models.set_bn_running_stats(net, True)
    bn = models.bn_layers(net)[0]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert net(x[:4]).shape == (4, 10)


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
