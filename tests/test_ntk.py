"""Tests of ntklab.ntk: every implementation and kind against a plain autograd loop.

Exactness is checked in float64 (the reference loop runs on a float64 copy of each model); the
float32 kernels are compared with tolerances from the number of summed products
(``tests/tolerances.py``), which hold whatever the CPU.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntklab import _ntk_structured
from ntklab.models import PreActResNet18, SmallCNN, TwoLayerNet, set_bn_running_stats
from ntklab.ntk import empirical_ntk
from tolerances import n_params, rel_err, sum_rtol

KINDS = ("full", "trace", "diagonal", "logit")
IMPLEMENTATIONS = ("jacobian", "structured", "auto")
LOGIT = 1


def reference_ntk(model, x1, x2):
    """The definition, literally: per input and output, torch.autograd.grad, flattened, dot products."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobian(x):
        rows = []
        for i in range(x.shape[0]):
            y = model(x[i:i + 1])[0]
            per_output = []
            for a in range(y.shape[0]):
                grads = torch.autograd.grad(y[a], params, retain_graph=True, allow_unused=True)
                per_output.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                             for g, p in zip(grads, params)]))
            rows.append(torch.stack(per_output))
        return torch.stack(rows)                                  # (n, k, P)

    j1, j2 = jacobian(x1), jacobian(x2)
    return torch.einsum("iaf,jbf->ijab", j1, j2)


def select(K_full, kind):
    return {"full": K_full, "trace": K_full.diagonal(dim1=2, dim2=3).sum(-1),
            "diagonal": K_full.diagonal(dim1=2, dim2=3), "logit": K_full[:, :, LOGIT, LOGIT]}[kind]


def with_bn_statistics(model, shape):
    """Non-trivial running statistics and affine parameters, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *shape) * 2 + 0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


class Shared(nn.Module):
    """Weight sharing (one Linear used twice), a raw scale parameter and a LayerNorm: the fallback paths."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.hidden(torch.tanh(self.hidden(h))))
        return self.out(self.norm(h)) * self.scale


class Misc(nn.Module):
    """Every structured path: convs with bias and few output pixels (factored), linear layers on
    sequences (P > 1, factored and materialised), a plain linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(16, 8, 2)
        self.tok1 = nn.Linear(16, 6)
        self.tok2 = nn.Linear(16, 32)
        self.head = nn.Linear(8 + 6 + 32, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))                             # (n, 16, 2, 2)
        t = h.flatten(2).transpose(1, 2)                          # (n, 4, 16): 4 tokens
        feats = [torch.relu(self.conv2(h)).flatten(1), torch.tanh(self.tok1(t)).mean(1),
                 torch.tanh(self.tok2(t[:, :2])).mean(1)]
        return self.head(torch.cat(feats, 1))


class Pooling(nn.Module):
    """ReLU and max pooling in the forms whose backward the recorder replaces, and forms it must leave alone."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(2)                  # on the raw input: its input has no gradient
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 2)
        self.conv4 = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(16 + 12 + 4 + 8 + 64, 3)

    def forward(self, x):                                         # x (n, 2, 8, 8)
        h = self.conv1(self.bn0(x.relu()))                        # ReLU of an input without gradient
        r = F.relu(h)
        a = F.max_pool2d(r, 2)                                    # ReLU -> pool: (n, 4, 4, 4)
        b = F.max_pool2d(r, 3, stride=2, padding=1, ceil_mode=True)   # overlapping windows: (n, 4, 5, 5)
        skip = r.mean((2, 3))                                     # the ReLU output read directly too
        d = F.max_pool2d(torch.relu(self.conv2(a)), 2)            # torch.relu -> pool: (n, 4, 2, 2)
        e = F.max_pool2d(self.conv3(b).relu(), 2, return_indices=True)[0]   # (n, 3, 2, 2)
        f = F.max_pool2d(F.relu(self.conv4(a), inplace=True), 2)  # in-place ReLU: (n, 2, 2, 2)
        g = torch.tanh(F.max_pool2d(h, 2))                        # pooling without ReLU: (n, 4, 4, 4)
        return self.head(torch.cat([d.flatten(1), e.flatten(1), skip, f.flatten(1), g.flatten(1)], 1))


def build(name):
    torch.manual_seed(0)
    if name == "mlp":
        # an in-place ReLU changes a linear layer's output after the fact: the recorder must notice
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 16),
                             nn.ReLU(), nn.Linear(16, 3)), (1, 3, 4)
    if name == "small_cnn":                                       # width 16: conv2 is streamed too
        return with_bn_statistics(SmallCNN(width=16), (1, 28, 28)), (1, 28, 28)
    if name == "frozen_bias":                                     # theta excludes frozen parameters
        model = SmallCNN(width=4, bn=False)
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(False)
        return model, (1, 28, 28)
    if name == "conv_bn":           # conv bias followed by BN; per-sample gradients laid out both ways
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3),
                            nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
        return with_bn_statistics(net, (1, 6, 6)), (1, 6, 6)
    if name == "strided_conv":                                    # stride, dilation, tuple padding
        net = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)), nn.ReLU(),
                            nn.Flatten(), nn.Linear(3 * 10 * 5, 3))
        return net, (2, 10, 10)
    if name == "small_cnn_no_bn":         # conv biases; conv2's 10k-long per-sample gradients are streamed
        return SmallCNN(width=24, bn=False), (1, 28, 28)
    if name == "resnet":
        return with_bn_statistics(PreActResNet18(width=4), (3, 8, 8)), (3, 8, 8)
    if name == "two_layer":
        return TwoLayerNet(in_features=64, width=32, num_classes=4, freeze_second=False), (1, 8, 8)
    if name == "shared":
        return Shared(), (1, 3, 4)
    if name == "misc":
        return Misc(), (3, 4, 4)
    if name == "pooling":
        return with_bn_statistics(Pooling(), (2, 8, 8)), (2, 8, 8)
    raise KeyError(name)


_CASES = {}


def case(name):
    """(float32 model, x1, x2, reference K(x1, x2), reference K(x1, x1)), computed once per model.
    The references are float64: the autograd loop on a float64 copy of the model and the inputs."""
    if name not in _CASES:
        model, shape = build(name)
        torch.manual_seed(1)
        x1, x2 = torch.rand(5, *shape), torch.rand(3, *shape)
        m64 = copy.deepcopy(model).double()
        _CASES[name] = (model, x1, x2, reference_ntk(m64, x1.double(), x2.double()),
                        reference_ntk(m64, x1.double(), x1.double()))
    return _CASES[name]


CASE_NAMES = ["mlp", "small_cnn", "small_cnn_no_bn", "conv_bn", "strided_conv", "frozen_bias", "resnet",
              "two_layer", "shared", "misc", "pooling"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_against_autograd_loop(name, implementation, dtype):
    """float64: the same numbers as the definition up to float64 rounding; float32: up to the
    rounding of sums of that many products."""
    model, x1, x2, R12, R11 = case(name)
    model = copy.deepcopy(model).to(dtype)
    tol = sum_rtol(dtype, n_params(model))
    for kind in KINDS:
        logit = LOGIT if kind == "logit" else None
        for other, R in ((x2, R12), (None, R11)):
            K = empirical_ntk(model, x1.to(dtype), None if other is None else other.to(dtype), kind=kind,
                              logit=logit, implementation=implementation)
            expected = select(R, kind)
            assert K.shape == expected.shape and K.dtype == dtype
            assert rel_err(K, expected) < tol, (name, implementation, kind, other is None)


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "conv_bn", "strided_conv", "frozen_bias", "resnet",
                                  "two_layer", "misc", "pooling"])
def test_structured_needs_no_fallback(name, monkeypatch):
    """The book's models are handled layer by layer: torch.func is never called."""
    model, x1, x2, R12, _ = case(name)

    def forbidden(*args, **kwargs):
        raise AssertionError("structured implementation fell back to torch.func")

    monkeypatch.setattr(_ntk_structured, "func_jacobians", forbidden)
    for kind in ("full", "trace"):
        K = empirical_ntk(model, x1, x2, kind=kind, implementation="auto")
        assert rel_err(K, select(R12, kind)) < sum_rtol(torch.float32, n_params(model))


def _backward_nodes(y):
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("name", ["small_cnn", "pooling"])
def test_recorded_graph_uses_the_cheap_backward_passes(name):
    """The recorder replaces ReLU, ReLU -> max-pool and eval batch norm by one-multiply (or one-scatter)
    backward passes with the same values; the kernels above check the gradients, this checks they are used."""
    from ntklab._ntk_record import record
    model, x1, _, _, _ = case(name)
    names = {id(p): nm for nm, p in model.named_parameters()}
    with torch.enable_grad():
        y, _, _ = record(model, x1, names)
    nodes = _backward_nodes(y)
    assert {"_MaskedReLUBackward", "_ReLUMaxPool2dBackward"} <= nodes, nodes
    assert torch.allclose(y, model(x1), rtol=0, atol=1e-6)
    if name == "small_cnn":                   # every ReLU, pool and BN of the book's model takes the cheap path
        assert "_AffineBackward" in nodes
        assert not nodes & {"ThresholdBackward0", "ReluBackward0", "MaxPool2DWithIndicesBackward0",
                            "NativeBatchNormBackward0", "AddcmulBackward0"}, nodes
    else:       # return_indices, in-place ReLU, a pool without ReLU and BN of the raw input keep PyTorch's
        assert {"MaxPool2DWithIndicesBackward0", "AddcmulBackward0"} <= nodes, nodes


def test_unused_parameters():
    """Parameters that do not reach the output contribute nothing (and do not break anything)."""
    class WithUnused(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.unused = net, nn.Linear(3, 3)

        def forward(self, x):
            return self.net(x)

    mlp, shape = build("mlp")
    x = torch.rand(4, *shape, dtype=torch.float64)
    model = WithUnused(mlp).double()
    R = reference_ntk(model, x, x)
    for implementation in IMPLEMENTATIONS:
        assert rel_err(empirical_ntk(model, x, implementation=implementation), R) < sum_rtol(torch.float64, n_params(model))
    only_unused = WithUnused(nn.Flatten())
    assert torch.count_nonzero(empirical_ntk(only_unused, x, implementation="structured")) == 0


def test_float64():
    model, shape = build("mlp")
    model = model.double()
    x1, x2 = torch.rand(4, *shape, dtype=torch.float64), torch.rand(3, *shape, dtype=torch.float64)
    R = reference_ntk(model, x1, x2)
    for implementation in ("jacobian", "structured"):
        K = empirical_ntk(model, x1, x2, implementation=implementation)
        assert K.dtype == torch.float64 and rel_err(K, R) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
@pytest.mark.parametrize("kind", ["full", "trace"])
def test_chunk_size_does_not_change_the_result(implementation, kind, dtype):
    """Chunks change only the order of the additions: equal in float64 up to its rounding, and in
    float32 up to the rounding of sums of that many products (a fixed 1e-5 failed on an AMD EPYC)."""
    model, x1, x2, _, _ = case("small_cnn")
    model, x1, x2 = copy.deepcopy(model).to(dtype), x1.to(dtype), x2.to(dtype)
    tol = sum_rtol(dtype, n_params(model))
    for other in (x2, None):
        whole = empirical_ntk(model, x1, other, kind=kind, implementation=implementation)
        for chunk in (1, 2):
            K = empirical_ntk(model, x1, other, kind=kind, implementation=implementation, chunk_size=chunk)
            assert rel_err(K, whole) < tol


@pytest.mark.parametrize("name", ["small_cnn", "misc"])
def test_micro_batches_inside_a_block(name, monkeypatch):
    """Activations are processed in micro-batches (here of one input) without changing the result."""
    import ntklab.ntk
    model, x1, x2, R12, R11 = case(name)
    monkeypatch.setattr(ntklab.ntk, "MICRO_BYTES", 1)
    tol = sum_rtol(torch.float32, n_params(model))
    for kind in ("full", "diagonal"):
        assert rel_err(empirical_ntk(model, x1, x2, kind=kind), select(R12, kind)) < tol
        assert rel_err(empirical_ntk(model, x1, kind=kind, chunk_size=3), select(R11, kind)) < tol


def test_symmetric_gram_in_strips():
    """nk >= 512 rows: the symmetric Gram is computed in row strips (upper triangle only)."""
    model, shape = build("small_cnn")
    model = model.double()
    x = torch.rand(60, *shape, dtype=torch.float64)
    K = empirical_ntk(model, x, implementation="structured")
    assert rel_err(K, empirical_ntk(model, x, implementation="jacobian", chunk_size=60)) < \
        sum_rtol(torch.float64, n_params(model))


def test_symmetry_without_x2():
    model, x1, _, _, _ = case("small_cnn")
    K = empirical_ntk(model, x1, chunk_size=2)
    assert torch.allclose(K, K.permute(1, 0, 3, 2))


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def _assert_same_state(model, state):
    tensors, flags = state
    after = model.state_dict()
    assert tensors.keys() == after.keys()
    assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    assert flags == [m.training for m in model.modules()]


def test_model_state_is_restored():
    model, shape = build("small_cnn")
    model.train()
    model.classifier.eval()                      # a mixed state must come back as it was
    state = _state(model)
    x = torch.rand(4, *shape)
    K = empirical_ntk(model, x, kind="trace")
    _assert_same_state(model, state)
    assert all(p.grad is None for p in model.parameters())
    assert rel_err(K, select(reference_ntk(model, x, x), "trace")) < \
        sum_rtol(torch.float32, n_params(model))    # computed in eval mode
    model.train()
    model.classifier.eval()
    with pytest.raises(ValueError):              # the model itself rejects 20x20 images
        empirical_ntk(model, torch.rand(3, 1, 20, 20))
    _assert_same_state(model, state)


def test_bn_without_running_statistics():
    """Batch statistics couple the inputs of a batch: 'structured' refuses, 'auto' uses the Jacobian."""
    model, shape = build("small_cnn")
    set_bn_running_stats(model, False)
    x = torch.rand(3, *shape)
    with pytest.raises(ValueError, match="independent"):
        empirical_ntk(model, x, implementation="structured")
    K = empirical_ntk(model, x, kind="trace")
    assert torch.allclose(K, empirical_ntk(model, x, kind="trace", implementation="jacobian"))


def test_bad_inputs():
    model, shape = build("mlp")
    x = torch.rand(4, *shape)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        empirical_ntk(model, torch.rand(12))
    with pytest.raises(ValueError, match="same feature shape"):
        empirical_ntk(model, x, torch.rand(4, 1, 4, 3))
    with pytest.raises(ValueError, match="unknown kind"):
        empirical_ntk(model, x, kind="eigen")
    with pytest.raises(ValueError, match="unknown implementation"):
        empirical_ntk(model, x, implementation="fast")
    with pytest.raises(ValueError, match="needs logit"):
        empirical_ntk(model, x, kind="logit")
    with pytest.raises(ValueError, match=r"logit must be in \[0, 3\)"):
        empirical_ntk(model, x, kind="logit", logit=3)
    with pytest.raises(ValueError, match="only used with kind='logit'"):
        empirical_ntk(model, x, kind="trace", logit=0)
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(nn.Flatten(), x)
    frozen, _ = build("mlp")
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(frozen, x)


@pytest.mark.slow
def test_bench_quick():
    """bench/ntk.py --quick runs and reports its ratios (a few minutes; only with --runslow)."""
    script = Path(__file__).resolve().parents[1] / "bench" / "ntk.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "speed-up" in out.stdout


def test_bench_refuses_a_peer_without_neural_tangents(tmp_path):
    """--peer needs an interpreter that has neural-tangents: this one does not (it is never a
    dependency of ntklab), so the bench stops at once with a usage error."""
    script = Path(__file__).resolve().parents[1] / "bench" / "ntk.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--peer", sys.executable], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "cannot import neural_tangents" in out.stderr


@pytest.mark.slow
def test_bench_peer_when_neural_tangents_is_there():
    """With $NTKLAB_PEER_PYTHON (an interpreter that has neural-tangents) the bench times both libraries in
    one run, and their kernels of the same network with the same weights agree (only with --runslow)."""
    import os

    peer = os.environ.get("NTKLAB_PEER_PYTHON")
    if not peer:
        pytest.skip("set NTKLAB_PEER_PYTHON to an interpreter that has neural-tangents")
    script = Path(__file__).resolve().parents[1] / "bench" / "ntk.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--peer", peer], capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr
    diffs = [float(line.split("largest difference ")[1].split()[0]) for line in out.stdout.splitlines()
             if "largest difference" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-3, out.stdout       # float32 sums of 421,642 products


def test_outputs_that_are_not_logits_are_refused():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), {"aux": 1}

    for model, message in ((Pair(), "got a tuple"), (nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), r"output shape \(2,\)")):
        with pytest.raises(ValueError, match=message):
            empirical_ntk(model, torch.rand(5, 4), kind="trace")


def test_batch_coupling_is_found_even_when_the_probe_inputs_coincide():
    """Batch statistics mix the samples of a batch; two equal inputs would not show it."""
    from ntklab.bn import set_bn_running_stats
    from ntklab.models import SmallCNN

    torch.manual_seed(0)
    model = set_bn_running_stats(SmallCNN(width=2), False)
    same = torch.rand(1, 1, 28, 28).repeat(3, 1, 1, 1)
    with pytest.raises(ValueError, match="needs the samples of a batch to be independent"):
        empirical_ntk(model, same, kind="trace", implementation="structured")


def test_a_kernel_larger_than_memory_is_refused_before_allocating(monkeypatch):
    import ntklab.ntk as ntk_module

    monkeypatch.setattr(ntk_module, "_free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"kernel of shape \(20, 20, 3, 3\) needs .* GiB, more than .* free"):
        empirical_ntk(nn.Linear(4, 3), torch.rand(20, 4), kind="full")
    assert empirical_ntk(nn.Linear(4, 3), torch.rand(5, 4), kind="trace").shape == (5, 5)   # 100 bytes fit
