"""Helpers of the BN tests (tests/test_bn.py) and of the SmallCNN option tests (tests/test_models.py):
a SmallCNN with BN buffers and affine parameters far from their defaults, and SmallCNN's forward pass
written out by hand."""
import torch

from ntklab.bn import bn_layers


def with_running_stats(net, seed=0):
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


def hand_forward(net, x, stats=None):
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
