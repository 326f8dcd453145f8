"""ntklab.bn: the BN layers and their running estimators, the modes (bn_mode, eval_mode, the one
BN-mode check), the BN statistics of chapter 2 (Theorem 2) and chapter 3 each against a hand
computation, and the import graph of the package (bn.py is a leaf; no module imports one that
imports it back, at top level or inside a function)."""
import ast
import copy
import pathlib
import warnings

import pytest
import torch
from torch import nn

import ntklab
from bn_helpers import hand_forward, with_running_stats
from ntklab import attacks, bn, models
from ntklab.bn import (bn_batch_statistics, bn_dataset_statistics, bn_layers, bn_statistics_gap, set_bn_running_stats,
                       using_bn_statistics)
from ntklab.models import SmallCNN


# ---------------------------------------------------------------- layers and running estimators
def test_set_bn_running_stats_switches_estimators():
    torch.manual_seed(0)
    net = SmallCNN(width=2)
    x = torch.rand(16, 1, 28, 28) * 0.5 + 0.5  # statistics far from the initial running ones
    net.train()
    net(x)
    net.eval()
    with_running = net(x[:4])
    set_bn_running_stats(net, False)
    assert all(m.running_mean is None and not m.track_running_stats for m in bn_layers(net))
    batch_stats = net(x[:4])  # eval mode, but normalised with the batch's own statistics
    assert not torch.allclose(with_running, batch_stats, atol=1e-3)
    set_bn_running_stats(net, True)
    bn = bn_layers(net)[0]
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert net(x[:4]).shape == (4, 10)


# ---------------------------------------------------------------- batch statistics
@pytest.mark.parametrize("track", [True, False])
def test_batch_statistics_match_a_hand_normalised_forward_pass(track):
    torch.manual_seed(3)
    net = with_running_stats(SmallCNN(width=3, track_running_stats=track))
    buffers = copy.deepcopy(net.state_dict())
    x = torch.rand(12, 1, 28, 28)
    stats = bn_batch_statistics(net, x)
    _, seen = hand_forward(net, x)
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
    net = with_running_stats(SmallCNN(width=3, track_running_stats=track))
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
    net = with_running_stats(SmallCNN(width=3))
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
    net = with_running_stats(SmallCNN(width=3))
    before = copy.deepcopy(net.state_dict())
    x = torch.rand(23, 1, 28, 28)
    stats = bn_dataset_statistics(net, x, batch_size=5)
    # layer 0: the moments of its input over all 23 images
    f = net.features
    h0 = f[0](net.normalize(x)).double()
    torch.testing.assert_close(stats[0][0], h0.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats[0][1], h0.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-7)
    # layer 1: the moments of its input, layer 0 normalised by the data-set statistics of layer 0
    _, seen = hand_forward(net, x, stats=[stats[0], stats[1]])
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


# ---------------------------------------------------------------- modes
def snapshot(model):
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]


def mixed_model():
    """A model in train mode whose first BN layer is in eval mode, with dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    model[2].eval()
    return model


def test_refresh_statistics_averages_the_batch_statistics_and_keeps_the_weights():
    torch.manual_seed(0)
    net = SmallCNN(width=2).double()
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64) * 0.5 + 0.5
    weights = copy.deepcopy(net.state_dict())
    fresh = bn.refresh_bn_statistics(net, x, batch_size=4)
    # the original is untouched (a copy was refreshed), weights and buffers alike
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    # layer 1's buffers are the mean over the three batches of its batch statistics (by hand)
    first = bn_layers(fresh)[0]
    batches = [bn_batch_statistics(net, x[s:s + 4])[0] for s in (0, 4, 8)]
    mean = torch.stack([m for m, _ in batches]).mean(0)
    n = 4 * x.shape[-1] ** 2  # N x H x W values per channel: PyTorch keeps the unbiased variance
    var = torch.stack([v * n / (n - 1) for _, v in batches]).mean(0)
    assert torch.allclose(first.running_mean, mean) and torch.allclose(first.running_var, var)
    assert int(first.num_batches_tracked) == 3 and first.momentum == bn_layers(net)[0].momentum
    # weights unchanged, modes kept, the buffers moved away from the defaults
    for k, v in fresh.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, weights[k]), k
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))
    assert fresh.training == net.training
    # in place: the model itself
    assert bn.refresh_bn_statistics(net, x, batch_size=4, inplace=True) is net
    assert torch.allclose(bn_layers(net)[0].running_mean, mean)


def test_refresh_statistics_leaves_models_without_estimators_alone_and_checks_input():
    net = SmallCNN(width=2)
    set_bn_running_stats(net, False)
    out = bn.refresh_bn_statistics(net, torch.rand(4, 1, 28, 28))
    assert all(m.running_mean is None for m in bn_layers(out))
    with pytest.raises(ValueError, match="batch_size"):
        bn.refresh_bn_statistics(SmallCNN(width=2), torch.rand(4, 1, 28, 28), batch_size=0)
    with pytest.raises(ValueError, match="X"):
        bn.refresh_bn_statistics(SmallCNN(width=2), torch.zeros(0, 1, 28, 28))


@pytest.mark.parametrize("mode, expected", [("eval", [False, False]), ("train", [True, True]),
                                            ("keep", [False, True])])
def test_bn_mode_sets_bn_layers_only_and_restores_buffers(mode, expected):
    model = mixed_model()
    before = snapshot(model)
    with bn.bn_mode(model, mode) as inside:
        assert inside is model
        assert [m.training for m in bn_layers(model)] == expected
        assert not any(m.training for m in model.modules() if not isinstance(m, nn.BatchNorm1d))
        model(torch.rand(6, 1, 4, 4))                   # a train-mode BN would move its buffers
    after = snapshot(model)
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items()) and after[1] == before[1]


def test_bn_mode_restores_after_an_error_and_is_attack_mode():
    model = mixed_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with bn.bn_mode(model, "train"):
            model(torch.rand(6, 1, 4, 4))
            raise RuntimeError("boom")
    after = snapshot(model)
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items()) and after[1] == before[1]
    assert attacks.attack_mode is bn.bn_mode and attacks.BN_MODES is bn.BN_MODES


def test_check_bn_mode_is_the_one_check():
    assert bn.check_bn_mode("keep") == "keep"
    with pytest.raises(ValueError, match="bn_mode must be one of 'eval', 'train', 'keep', got 'batch'"):
        bn.check_bn_mode("batch")
    with pytest.raises(ValueError, match="attack_bn_mode must be 'eval' or 'train', got 'keep'"):
        bn.check_bn_mode("keep", name="attack_bn_mode", allowed=("eval", "train"))
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        with bn.bn_mode(nn.Linear(2, 2), "batch"):
            pass


def my_function(model, warn="my_function"):
    """A public function that evaluates ``model`` the way ntklab.evaluate does."""
    with bn.eval_mode(model, warn=warn):
        assert not any(m.training for m in model.modules())


def test_eval_mode_warns_only_when_asked_and_in_train_mode():
    model = mixed_model()
    before = snapshot(model)[1]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        my_function(model)
        my_function(model, warn=None)
        my_function(model.eval())
    assert [str(w.message).split(":")[0] for w in record] == ["my_function"]
    # the warning points at the code that called my_function
    assert "train mode" in str(record[0].message) and record[0].filename == __file__
    model.train()
    model[2].eval()
    with pytest.raises(RuntimeError, match="boom"):
        with bn.eval_mode(model):
            raise RuntimeError("boom")
    assert snapshot(model)[1] == before


def test_no_module_switches_modes_by_hand():
    """Every save/restore of a model's mode goes through ntklab.bn (bn_mode, eval_mode): no other
    module assigns ``.training`` or keeps a ``was_training`` flag."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "bn.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for leaf in ast.walk(t):
                    if (isinstance(leaf, ast.Attribute) and leaf.attr == "training") or \
                            (isinstance(leaf, ast.Name) and leaf.id == "was_training"):
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders


# ---------------------------------------------------------------- the import graph
PACKAGE = pathlib.Path(ntklab.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the ntklab modules it imports}`` for every module of the package, read from its
    AST: every import statement, at top level or inside a function. ``from ntklab import x`` imports
    the module ``ntklab.x`` when x is one; a module's own parent packages are not counted."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for a in node.names:
                    found.add(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source)
        graph[name] = {m for m in found if m in modules and m != name
                       and not name.startswith(m + ".")}        # its parent packages
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"ntklab.bn", "ntklab.models", "ntklab.attacks", "ntklab.evaluate"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    """The check above can fail: the cycle models <-> attacks this module ended."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    graph["ntklab.bn"] = graph["ntklab.bn"] | {"ntklab.attacks"}
    assert find_cycle(graph) is not None


def test_bn_is_a_leaf():
    graph = import_graph()
    assert graph["ntklab.bn"] <= {"ntklab._checks", "ntklab._progress"}
    assert "ntklab.bn" in graph["ntklab.models"] and "ntklab.models" not in graph["ntklab.attacks"]
