"""ntklab.evaluate: accuracies against hand counts, the worst case as a per-example AND, train-mode
warnings, and AutoAttack on a small subset."""
import copy
import warnings

import pytest
import torch
from torch import nn

from ntklab import attacks, evaluate

EPS = 0.1


def correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def frac(flags):
    return int(flags.sum()) / len(flags)


def train_mode_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "train mode" in str(w.message)]


def test_clean_accuracy_equals_hand_count(trained_cnn, mnist_small):
    test = mnist_small[1]
    x, y = test.tensors
    hand = frac(correct(trained_cnn, x, y))
    acc = evaluate.clean_accuracy(trained_cnn, test)
    assert isinstance(acc, float) and 0.8 < acc < 1
    assert acc == pytest.approx(hand, abs=1e-9)
    # a tuple and a batch size that does not divide N give the same count
    assert evaluate.clean_accuracy(trained_cnn, (x, y), batch_size=64) == pytest.approx(hand, abs=1e-9)
    # and it counts: flipping five correct labels costs exactly 5 / N
    y2 = y.clone()
    right = torch.nonzero(correct(trained_cnn, x, y)).flatten()[:5]
    y2[right] = (y2[right] + 1) % 10
    assert evaluate.clean_accuracy(trained_cnn, (x, y2)) == pytest.approx(hand - 5 / len(y), abs=1e-9)


def test_pgd_accuracy_equals_hand_count(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors
    acc = evaluate.pgd_accuracy(trained_cnn, (x, y), eps=EPS, steps=5, random_start=False)
    x_adv = attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=5, random_start=False)
    hand = frac(correct(trained_cnn, x, y) & correct(trained_cnn, x_adv, y))
    assert acc == pytest.approx(hand, abs=1e-9)
    assert acc < evaluate.clean_accuracy(trained_cnn, (x, y))
    assert evaluate.pgd_accuracy(trained_cnn, (x, y), eps=0.0) == pytest.approx(
        evaluate.clean_accuracy(trained_cnn, (x, y)))


def test_worst_case_is_the_per_example_and(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors
    kw = dict(eps=EPS, steps=5, random_start=False)
    worst = evaluate.worst_case_accuracy(trained_cnn, (x, y), **kw)
    fgsm_acc = evaluate.worst_case_accuracy(trained_cnn, (x, y), eps=EPS, attacks=("fgsm",))
    pgd_acc = evaluate.pgd_accuracy(trained_cnn, (x, y), **kw)
    assert worst <= min(fgsm_acc, pgd_acc) + 1e-9
    ok_fgsm = correct(trained_cnn, attacks.fgsm(trained_cnn, x, y, eps=EPS), y)
    ok_pgd = correct(trained_cnn, attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=5,
                                              random_start=False), y)
    ok_clean = correct(trained_cnn, x, y)
    assert fgsm_acc == pytest.approx(frac(ok_clean & ok_fgsm), abs=1e-9)
    assert worst == pytest.approx(frac(ok_clean & ok_fgsm & ok_pgd), abs=1e-9)


class MeanThreshold(nn.Module):
    """Class 1 if the mean pixel is above 0.5: ``1 - x`` flips its prediction."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)


def test_counting_rules_with_designed_attacks(monkeypatch):
    """Attacks that flip known examples: robust = correct clean AND after every attack, even for
    examples that an attack would turn from wrong to right."""
    n = 30
    v = torch.linspace(0.05, 0.95, n)
    x = v.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    y = (v > 0.5).long()
    y[::7] = 1 - y[::7]  # clean mistakes, some of which the attacks "repair"
    index = torch.arange(n)

    def flipper(k):
        def attack(model, xb, yb, **kw):
            i = torch.round((xb[:, 0, 0, 0] - 0.05) / (0.9 / (n - 1))).long()
            out = xb.clone()
            out[i % k == 0] = 1 - xb[i % k == 0]
            return out
        return attack

    monkeypatch.setattr(attacks, "fgsm", flipper(3))
    monkeypatch.setattr(attacks, "pgd", flipper(5))
    model = MeanThreshold().eval()
    ok_clean = index % 7 != 0
    assert evaluate.clean_accuracy(model, (x, y), batch_size=8) == frac(ok_clean)
    assert evaluate.pgd_accuracy(model, (x, y), eps=EPS, batch_size=8) == frac(ok_clean & (index % 5 != 0))
    assert evaluate.worst_case_accuracy(model, (x, y), eps=EPS, attacks=("fgsm",), batch_size=8) == frac(
        ok_clean & (index % 3 != 0))
    assert evaluate.worst_case_accuracy(model, (x, y), eps=EPS, batch_size=8) == frac(
        ok_clean & (index % 3 != 0) & (index % 5 != 0))


def test_worst_case_rejects_bad_attack_lists(trained_cnn, mnist_small):
    test = mnist_small[1]
    with pytest.raises(ValueError, match="'n_fgsm' leaves the eps-ball"):
        evaluate.worst_case_accuracy(trained_cnn, test, eps=EPS, attacks=("fgsm", "n_fgsm"))
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        evaluate.worst_case_accuracy(trained_cnn, test, eps=EPS, attacks=("cw",))
    with pytest.raises(ValueError, match="at least one attack"):
        evaluate.worst_case_accuracy(trained_cnn, test, eps=EPS, attacks=())


def test_bad_data(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors
    with pytest.raises(ValueError, match="TensorDataset or a tuple"):
        evaluate.clean_accuracy(trained_cnn, x)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\)"):
        evaluate.clean_accuracy(trained_cnn, (x, y[:-1]))
    with pytest.raises(ValueError, match="labels must be integers"):
        evaluate.clean_accuracy(trained_cnn, (x, y.float()))
    with pytest.raises(ValueError, match="data is empty"):
        evaluate.clean_accuracy(trained_cnn, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="batch_size must be"):
        evaluate.clean_accuracy(trained_cnn, (x, y), batch_size=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        evaluate.pgd_accuracy(trained_cnn, (x * 2, y), eps=EPS)


@pytest.mark.parametrize("fn, kw", [
    (evaluate.clean_accuracy, {}),
    (evaluate.pgd_accuracy, dict(eps=EPS, steps=2)),
    (evaluate.worst_case_accuracy, dict(eps=EPS, steps=2)),
])
def test_train_mode_warns_once_evaluates_in_eval_and_restores(fn, kw, trained_cnn, mnist_small):
    x, y = (t[:100] for t in mnist_small[1].tensors)
    torch.manual_seed(0)
    expected = fn(trained_cnn, (x, y), batch_size=40, **kw)
    model = copy.deepcopy(trained_cnn).train()
    model.classifier.eval()  # mixed modes come back as they were
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = fn(model, (x, y), batch_size=40, **kw)
    assert len(train_mode_warnings(record)) == 1
    assert got == pytest.approx(expected, abs=1e-9)  # eval mode: BN with running statistics
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    # a model in eval mode gets no warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(trained_cnn, (x, y), **kw)
    assert not train_mode_warnings(record)


def test_autoattack_on_a_small_subset(trained_cnn, mnist_small):
    pytest.importorskip("pyautoattack")
    from ntklab import data

    sub = data.subset(mnist_small[1], 32, seed=0)
    model = copy.deepcopy(trained_cnn).train()
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        aa = evaluate.autoattack_accuracy(model, mnist_small[1], eps=EPS, version="custom",
                                          attacks=["apgd-ce"], n=32, seed=0)
    assert len(train_mode_warnings(record)) == 1
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # pyautoattack reseeds; we restore
    model.eval()
    clean = evaluate.clean_accuracy(model, sub)
    torch.manual_seed(0)
    pgd = evaluate.pgd_accuracy(model, sub, eps=EPS, steps=10)
    assert isinstance(aa, float)
    assert 0 <= aa <= clean
    assert aa <= pgd + 0.05
    assert aa < clean  # the attack does something at this eps


def test_autoattack_rejects_bad_versions(trained_cnn, mnist_small):
    pytest.importorskip("pyautoattack")
    with pytest.raises(ValueError, match="unknown AutoAttack version 'quick'"):
        evaluate.autoattack_accuracy(trained_cnn, mnist_small[1], eps=EPS, version="quick")
    with pytest.raises(ValueError, match="version='custom'"):
        evaluate.autoattack_accuracy(trained_cnn, mnist_small[1], eps=EPS, version="custom")
    with pytest.raises(ValueError, match="version='custom'"):
        evaluate.autoattack_accuracy(trained_cnn, mnist_small[1], eps=EPS, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="valid attacks are: apgd-ce"):
        evaluate.autoattack_accuracy(trained_cnn, mnist_small[1], eps=EPS, version="custom",
                                     attacks=["apgd-ce", "pgd"])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        evaluate.autoattack_accuracy(trained_cnn, mnist_small[1], eps=-1)
