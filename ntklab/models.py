"""Models of the book, each with the input normalisation inside it.

Inputs are images in [0, 1] of shape (N, C, H, W); every model starts with a :class:`Normalize`
layer, so attacks and kernels work in pixel space. Models:

* :class:`SmallCNN` — the ``quick`` model (conv-BN-ReLU-pool twice, then two linear layers; about
  421k parameters at the default width 32 on 28x28 inputs);
* :class:`PreActResNet18` — the ``paper`` model (He et al. 2016, "Identity mappings in deep residual
  networks"; CIFAR-style stem as in Wong et al. 2020 and Li et al., arXiv 2312.02236);
* :class:`WideResNet` — WRN-34-10 (Zagoruyko & Komodakis 2016), as used by TRADES;
* :class:`TwoLayerNet` — a wide two-layer ReLU net in NTK parameterisation (Tsilivis & Kempe 2022,
  appendix C, after Arora et al. 2019 and Du et al. 2019).

Batch normalisation: every model with BN takes ``bn`` (use BN at all) and ``track_running_stats``
(keep running estimates of the data-set mean and variance, used in eval mode; without them BN
always normalises with the statistics of the batch it sees, the setting of Li et al.'s
section 3). The BN layers' modes and statistics live in :mod:`ntklab.bn`
(:func:`~ntklab.bn.set_bn_running_stats` changes the latter on a built model,
:func:`~ntklab.bn.bn_mode` sets the BN layers to train or eval mode for a block of code); the names
``bn_layers``, ``set_bn_running_stats`` and the BN statistics functions are importable from here too.
Introduced in chapter 1 (Primer); BN is the subject of chapter 3.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ntklab import _checks
from ntklab.bn import (bn_batch_statistics, bn_dataset_statistics, bn_layers, bn_statistics_gap,  # noqa: F401
                       set_bn_running_stats, using_bn_statistics)

__all__ = [
    "Normalize", "SmallCNN", "PreActResNet18", "WideResNet", "TwoLayerNet", "build_model",
    "MODELS", "set_bn_running_stats", "bn_layers", "count_parameters",
    "bn_batch_statistics", "bn_dataset_statistics", "using_bn_statistics", "bn_statistics_gap",
]


class Normalize(nn.Module):
    """Per-channel standardisation ``(x - mean) / std`` as the model's first layer.

    mean, std: sequences of length C (the input channels). Input (N, C, H, W) in [0, 1].
    The statistics are buffers, not parameters: the NTK does not differentiate them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        try:
            mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"mean and std must be sequences of numbers, got {mean!r} and {std!r}") from err
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
            raise ValueError(f"mean and std must be finite, got {list(mean)} and {list(std)}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected input of shape (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std


def _bn2d(channels: int, bn: bool, track_running_stats: bool) -> nn.Module:
    return nn.BatchNorm2d(channels, track_running_stats=track_running_stats) if bn else nn.Identity()


def _sizes(**sizes) -> None:
    """Each size (a number of channels, classes, units, blocks...) must be an integer >= 1."""
    for name, value in sizes.items():
        _checks.count(name, value)


def _stats(in_channels: int, mean, std):
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per input channel)")
    return mean, std


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class SmallCNN(nn.Module):
    """The ``quick`` model: [conv3x3(w) - BN - ReLU - maxpool2] , [conv3x3(2w) - BN - ReLU - maxpool2],
    linear(4w), ReLU, linear(num_classes).

    Input (N, in_channels, H, W) in [0, 1] with H and W divisible by 4 (28x28 MNIST: 421,738
    parameters at width 32; width 4 gives the ``smoke`` model). Output: logits (N, num_classes).
    mean, std: the data set's per-channel statistics (``ntklab.data.stats(name)``).

    activation: ``"relu"`` (default), ``"gelu"`` or ``"softplus"`` for all three nonlinearities;
    pool: ``"max"`` (default) or ``"avg"`` (2x2 pooling). With ``"gelu"`` or ``"softplus"`` and
    ``"avg"`` the network is a smooth (C^2, indeed C^infinity) function of its input in eval
    mode, as Theorem 1 of Li et al. (arXiv 2312.02236) assumes; ReLU and max pooling have kinks.
    Neither option changes the parameters or the state-dict keys. Chapter 2 compares the two.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, bn: bool = True,
                 track_running_stats: bool = True, image_size: int = 28,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 activation: str = "relu", pool: str = "max"):
        super().__init__()
        _sizes(in_channels=in_channels, num_classes=num_classes, width=width, image_size=image_size)
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid activations are: {', '.join(ACTIVATIONS)}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; valid pools are: {', '.join(POOLS)}")
        act, pooling = ACTIVATIONS[activation], POOLS[pool]
        mean, std = _stats(in_channels, mean, std)
        self.image_size = image_size
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=not bn),
            _bn2d(width, bn, track_running_stats), act(), pooling(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not bn),
            _bn2d(2 * width, bn, track_running_stats), act(), pooling(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, 4 * width), act(),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"SmallCNN was built for {self.image_size}x{self.image_size} images, got {tuple(x.shape)}"
            )
        return self.classifier(self.features(self.normalize(x)))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a (1x1-conv) shortcut: the pre-activation basic block
    of PreAct ResNets and of Wide ResNets (without dropout)."""

    def __init__(self, in_planes, planes, stride, bn, track):
        super().__init__()
        self.bn1 = _bn2d(in_planes, bn, track)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn2d(planes, bn, track)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 images (He et al. 2016), the ``paper`` model of Li et al.

    Input (N, in_channels, H, W) in [0, 1]; output logits (N, num_classes). ``width`` is the number
    of channels of the first stage (64 in the paper; smaller for tests). About 11.2M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, bn: bool = True,
                 track_running_stats: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, num_blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        _sizes(num_classes=num_classes, in_channels=in_channels, width=width)
        if isinstance(num_blocks, (str, bytes)) or len(num_blocks) == 0:
            raise ValueError(f"num_blocks must be a sequence of block counts, got {num_blocks!r}")
        _sizes(**{f"num_blocks[{i}]": b for i, b in enumerate(num_blocks)})
        mean, std = _stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], width
        for stage, blocks in enumerate(num_blocks):
            planes = width * 2 ** stage
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(_PreActBlock(in_planes, planes, stride, bn, track_running_stats))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = _bn2d(in_planes, bn, track_running_stats)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016); WRN-34-10 is the TRADES model.

    depth = 6n + 4. Input (N, in_channels, H, W) in [0, 1]; output logits (N, num_classes).
    """

    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, in_channels: int = 3,
                 bn: bool = True, track_running_stats: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        _sizes(depth=depth, widen=widen, num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        mean, std = _stats(in_channels, mean, std)
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers, in_planes = [], widths[0]
        for stage in range(3):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(_PreActBlock(in_planes, widths[stage + 1], stride, bn, track_running_stats))
                in_planes = widths[stage + 1]
        self.layers = nn.Sequential(*layers)
        self.bn = _bn2d(in_planes, bn, track_running_stats)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(self.normalize(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TwoLayerNet(nn.Module):
    """Two-layer ReLU net in NTK parameterisation (Tsilivis & Kempe 2022, appendix C):

        f(x) = a relu(W vec(x)) / sqrt(width),  W_ij ~ N(0, 1),  a_cj uniform in {-1, +1},

    with d = in_features inputs and ``num_classes`` outputs. With ``freeze_second=True`` (their
    setting, after Arora et al. 2019 and Du et al. 2019) ``a`` is a buffer, not a parameter, and
    only W is trained; the NTK is then (x.x'/... ) as in their eq. (16). Inputs (N, ...) are
    flattened to (N, in_features) after the normalisation; output (N, num_classes).
    """

    def __init__(self, in_features: int = 784, width: int = 1024, num_classes: int = 10,
                 freeze_second: bool = True, in_channels: int = 1,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        _sizes(in_features=in_features, width=width, num_classes=num_classes, in_channels=in_channels)
        mean, std = _stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.width = width
        self.in_features = in_features
        self.weight = nn.Parameter(torch.randn(width, in_features))
        second = torch.randint(0, 2, (num_classes, width)).float() * 2 - 1
        if freeze_second:
            self.register_buffer("second", second)
        else:
            self.second = nn.Parameter(second)

    def forward(self, x):
        h = self.normalize(x).flatten(1)
        if h.shape[1] != self.in_features:
            raise ValueError(f"TwoLayerNet expects {self.in_features} input features, got {h.shape[1]}")
        return F.relu(h @ self.weight.t()) @ self.second.t() / math.sqrt(self.width)


MODELS = {"small_cnn": SmallCNN, "preact_resnet18": PreActResNet18, "wide_resnet": WideResNet,
          "two_layer": TwoLayerNet}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name (``small_cnn``, ``preact_resnet18``, ``wide_resnet``, ``two_layer``).

    Raises ``ValueError`` listing the valid names for an unknown one.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
