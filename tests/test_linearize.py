"""ntklab.linearize: the linearised model (chapter 8) and the centred model (chapter 7)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ntklab
from ntklab.linearize import Centered, Linearized
from ntklab.models import SmallCNN


@pytest.fixture(scope="module")
def cnn64():
    """A float64 SmallCNN(width=4) whose BN running statistics come from real images, in eval mode."""
    torch.manual_seed(0)
    x = ntklab.data.load("mnist5k", "train").tensors[0][:64].double()
    mean, std = ntklab.data.stats("mnist5k")
    net = SmallCNN(width=4, mean=mean, std=std).double()
    with torch.no_grad():
        net.train()(x)
    return net.eval(), x[:6]


@pytest.fixture(scope="module")
def smooth64():
    """A float64 conv-BN-tanh-avgpool-linear net (smooth, so that finite differences in x and theta
    are derivatives: a ReLU network's Jacobian jumps where a unit switches) and 6 images 8x8."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                              torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 5)).double()
    x = torch.rand(38, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        net.train()(x[6:])
    return net.eval(), x[:6]


def _shift(lin, direction, scale):
    with torch.no_grad():
        for th, v in zip(lin.theta, direction):
            th.add_(scale * v)


def test_equals_the_model_at_theta_t(cnn64):
    net, x = cnn64
    lin = Linearized(net)
    assert torch.equal(lin(x), net(x))
    assert [n for n, _ in net.named_parameters()] == lin.names
    centred = Linearized(net, centered=True)
    assert float(centred(x).detach().abs().max()) == 0.0


def _difference_and_slope(net, x, direction, h):
    """The central difference of the network along ``direction`` (step ``h``), the slope of its
    linearisation along it, and the two shifted networks."""
    plus, minus = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        for p_plus, p_minus, v in zip(plus.parameters(), minus.parameters(), direction):
            p_plus.add_(h * v)
            p_minus.sub_(h * v)
        fd = (plus(x) - minus(x)) / (2 * h)
    lin = Linearized(net)
    _shift(lin, direction, h)
    with torch.no_grad():
        slope = (lin(x) - net(x)) / h
    return fd, slope, plus, minus


def test_matches_finite_differences_of_the_model(smooth64):
    net, x = smooth64
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in net.parameters()]
    h = 1e-5
    fd, slope, _, _ = _difference_and_slope(net, x, direction, h)
    assert torch.allclose(slope, fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max()))
    # and it is linear: the centred output scales exactly with the step
    centred = Linearized(net, centered=True)
    _shift(centred, direction, 1.0)
    out1 = centred(x)
    _shift(centred, direction, 2.0)
    assert torch.allclose(centred(x), 3 * out1, rtol=1e-10, atol=1e-12)
    # the uncentred model is the centred one plus f(x; theta_t)
    lin = Linearized(net)
    _shift(lin, direction, h)
    assert torch.allclose(lin(x), net(x) + h * out1, rtol=1e-10, atol=1e-12)


def test_centred_kernel_is_the_empirical_ntk_at_theta_t(cnn64):
    net, x = cnn64
    centred = Linearized(net, centered=True)
    _shift(centred, [torch.randn_like(p) for p in net.parameters()], 0.1)   # the kernel does not move
    K = ntklab.ntk.empirical_ntk(net, x, kind="full")
    K_lin = ntklab.ntk.empirical_ntk(centred, x, kind="full", implementation="jacobian")
    assert torch.allclose(K_lin, K, rtol=1e-8, atol=1e-10 * float(K.abs().max()))


def test_input_gradient_matches_finite_differences(smooth64):
    net, x = smooth64
    lin = Linearized(net, centered=True)
    _shift(lin, [torch.randn_like(p) for p in net.parameters()], 0.05)
    y = torch.arange(len(x)) % 5
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(lin(xg), y, reduction="sum"), xg)
    v = torch.randn_like(x)
    h = 1e-6
    with torch.no_grad():
        fd = (F.cross_entropy(lin(x + h * v), y, reduction="sum") - F.cross_entropy(lin(x - h * v), y, reduction="sum")) / (2 * h)
    assert torch.allclose((g * v).sum(), fd, rtol=1e-5)


def test_batch_norm_is_frozen_in_any_mode(cnn64):
    net, x = cnn64
    lin = Linearized(net)
    buffers = {k: v.clone() for k, v in lin.base.named_buffers()}
    expected = lin(x)
    lin.train()
    assert torch.equal(lin(x), expected)                    # running statistics, not the batch's
    assert all(torch.equal(v, buffers[k]) for k, v in lin.base.named_buffers())
    assert all(m.training for m in lin.base.modules())       # forward restores the modes it found
    lin.eval()
    assert not any(p.requires_grad for p in lin.base.parameters())


def test_trained_by_the_book_loop_and_attacked_as_itself():
    torch.manual_seed(0)
    train, test = (ntklab.data.subset(ntklab.data.load("mnist5k", s), 96, seed=0) for s in ("train", "test"))
    mean, std = ntklab.data.stats("mnist5k")
    net = SmallCNN(width=4, mean=mean, std=std)
    ntklab.train.train(net, train, strategy="normal", epochs=1, batch_size=32, progress=False)
    lin = Linearized(net, centered=True)
    theta_t = [p.detach().clone() for p in lin.base.parameters()]
    buffers = [b.clone() for b in lin.base.buffers()]
    history = ntklab.train.train(lin, train, strategy="pgd", eps=0.1, alpha=0.05, steps=2, epochs=2, lr=0.05,
                                 weight_decay=0.0, lr_schedule="constant", batch_size=32, clean_update=True,
                                 progress=False)
    assert history.loss[-1] < history.loss[0]
    assert all(torch.equal(a, b) for a, b in zip(theta_t, lin.base.parameters()))    # theta_t is frozen
    assert all(torch.equal(a, b) for a, b in zip(buffers, lin.base.buffers()))       # BN statistics too
    assert any(float(d.abs().max()) > 0 for d in lin.delta().values())
    x, y = test.tensors
    x_adv = ntklab.attacks.pgd(lin, x, y, eps=0.1, alpha=0.025, steps=5)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(lin(x_adv), y) > F.cross_entropy(lin(x), y)
    clean = ntklab.evaluate.clean_accuracy(lin, test)
    assert ntklab.evaluate.pgd_accuracy(lin, test, eps=0.1, steps=5) <= clean
    # a state dict round-trips into a wrapper of a fresh network
    other = Linearized(SmallCNN(width=4, mean=mean, std=std), centered=True)
    other.load_state_dict(lin.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), lin(x))


def test_centered_is_the_model_minus_its_start():
    torch.manual_seed(0)
    net = ntklab.models.TwoLayerNet(in_features=16, width=32, num_classes=2)
    x = torch.rand(5, 1, 4, 4)
    model = Centered(net)
    assert float(model(x).abs().max()) == 0.0
    f0 = net(x).detach()
    with torch.no_grad():
        net.weight.add_(0.1)
    assert torch.allclose(model(x), net(x) - f0)
    assert [p for p in model.parameters() if p.requires_grad] == [net.weight]   # the reference is frozen
    model.train()
    assert model.net.training and not model.reference.training


def test_rejects_bad_models():
    with pytest.raises(ValueError, match="nn.Module"):
        Linearized(lambda x: x)
    frozen = torch.nn.Linear(3, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Linearized(frozen)
    with pytest.raises(ValueError, match="nn.Module"):
        Centered("net")


def test_centered_with_frozen_batch_norm():
    torch.manual_seed(0)
    mean, std = ntklab.data.stats("mnist5k")
    net = SmallCNN(width=4, mean=mean, std=std)
    x = ntklab.data.load("mnist5k", "train").tensors[0][:32]
    with torch.no_grad():
        net.train()(x)
    net.eval()
    model = Centered(net, frozen_bn=True)
    buffers = [b.clone() for b in model.net.buffers()]
    model.train()
    assert all(not m.training for m in ntklab.bn.bn_layers(model.net)) and model.net.training
    assert float(model(x).detach().abs().max()) == 0.0              # running statistics, not the batch's
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(x), torch.arange(32) % 10).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.net.buffers()))
    assert float(model(x).detach().abs().max()) > 0
    free = Centered(copy.deepcopy(net).eval())                   # default: as before, the net's own modes
    assert not free.net.training
    free.train()
    assert all(m.training for m in ntklab.bn.bn_layers(free.net))
    with pytest.raises(ValueError, match="frozen_bn"):
        Centered(net, frozen_bn="yes")


def _decisions(net, x):
    """The piecewise choices of a ReLU/max-pool network on x: every ReLU's sign and, in every
    max-pool window whose maximum is positive (windows of ReLU zeros are ties, harmless), where
    the maximum is."""
    out = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.MaxPool2d):
            values, where = F.max_pool2d(args[0], module.kernel_size, module.stride, return_indices=True)
            out.append(torch.where(values > 0, where, -1))
        else:
            out.append(output > 0)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return out


def test_finite_differences_of_a_relu_network_agree_unless_a_kink_is_crossed():
    """Float64, SmallCNN (ReLU and max-pooling): the linearised model's slope J_t v against the
    central difference (f(theta + h v) - f(theta - h v)) / 2h. A ReLU network is smooth in theta
    between kinks, so the two agree to rounding exactly when no ReLU changes sign and no max-pool
    window changes its maximum between theta - h v and theta + h v; a crossed kink (as on seed 4
    with h = 1e-6: two entries of one pooling window closer than the step) makes the difference a
    mixture of two slopes, with a relative error of order 1e-3."""
    x32 = ntklab.data.load("mnist5k", "train").tensors[0][:256]
    x = x32[:8].double()
    mean, std = ntklab.data.stats("mnist5k")
    crossed = []
    for seed in range(6):                       # built as the chapter's first cells build theirs
        torch.manual_seed(seed)
        net = SmallCNN(width=4, mean=mean, std=std)
        with torch.no_grad():
            net.train()(x32)
        net.eval()
        v = [(0.01 * torch.randn_like(p)).double() / 0.01 for p in net.parameters()]
        net = net.double()
        fd, slope, plus, minus = _difference_and_slope(net, x, v, 1e-6)
        error = float((fd - slope).abs().max() / slope.abs().max())
        kink = any(not torch.equal(a, b) for a, b in zip(_decisions(plus, x), _decisions(minus, x)))
        assert kink or error < 1e-8, (seed, error)
        crossed.append((seed, kink, error))
    assert any(not kink for _, kink, _ in crossed)
    seed4 = crossed[4]
    assert seed4[1] and seed4[2] > 1e-5, seed4             # the failure a reader saw: a max-pool kink
