"""ntklab.evaluate: accuracies against hand counts, the worst case as a per-example AND, train-mode
warnings, AutoAttack on a small subset, and the batch-dependent predict and craft (chapter 3)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from ntklab import attacks, bn, evaluate
from ntklab.models import SmallCNN

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
    # the routine behind all three, per example
    assert torch.equal(evaluate.robust_flags(model, (x, y), batch_size=8), ok_clean)
    assert torch.equal(evaluate.robust_flags(model, (x, y), [flipper(3), flipper(5)], batch_size=8),
                       ok_clean & (index % 3 != 0) & (index % 5 != 0))
    with pytest.raises(ValueError, match="attacks must be callables"):
        evaluate.robust_flags(model, (x, y), ["fgsm"])


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


# ---------------------------------------------------------------- predict (batch-dependent models, chapter 3)
@pytest.fixture(scope="module")
def free_cnn(trained_cnn):
    """The trained test CNN with its BN layers switched to batch statistics (no buffers)."""
    net = copy.deepcopy(trained_cnn)
    for m in bn.bn_layers(net):
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None
    return net.eval()


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


@pytest.mark.parametrize("k", [2, 3, 5])
def test_autoattack_with_fewer_than_ten_classes(k, monkeypatch):
    """Every version caps its target classes at k - 1; versions whose DLR loss needs more classes
    than the model has are refused before any work, naming the attacks that would run."""
    import pyautoattack.checks

    torch.manual_seed(0)
    model = SmallCNN(width=2, num_classes=k).eval()
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4) % k
    targets = []
    real = pyautoattack.checks.check_n_classes
    monkeypatch.setattr(pyautoattack.checks, "check_n_classes",
                        lambda n, runs, apgd, fab, **kw: targets.append((apgd, fab)) or real(n, runs, apgd, fab, **kw))
    for version in ("standard", "plus", "rand", "fast"):
        needs = {"standard": 4, "plus": 4, "fast": 4, "rand": 3}[version]
        if k < needs:
            with pytest.raises(ValueError, match=rf"version '{version}' runs .* needs at least {needs} classes; the "
                                                 rf"model has {k}: use version='custom'"):
                evaluate.autoattack_accuracy(model, (x, y), eps=0.1, version=version)
        else:
            evaluate.autoattack_accuracy(model, (x, y), eps=0.1, version=version)
            assert max(targets[-1]) <= k - 1
    if k == 2:
        assert evaluate.autoattack_accuracy(model, (x, y), eps=0.1, version="custom",
                                            attacks=["apgd-ce", "fab-t", "square"]) <= 1
        assert max(targets[-1]) == 1


class _FlatForDarkImages(torch.nn.Module):
    """Logits that do not depend on images of mean brightness below 0.5: zero input gradient."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 10))
        self.b = torch.nn.Parameter(-torch.arange(10.0))          # class 0 wins

    def forward(self, x):
        return torch.relu(x.flatten(1).mean(1, keepdim=True) - 0.5) * self.w + self.b


def test_autoattack_flags_are_captured_not_printed(capsys):
    """pyautoattack's own check ("there are N points with zero gradient! ... See flags_doc.md")
    neither prints nor reaches the log handlers; return_flags returns it, autoattack_flag reads it."""
    pytest.importorskip("pyautoattack")
    import logging

    x, y = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.2, torch.zeros(6, dtype=torch.long)
    model = _FlatForDarkImages().eval()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            acc, flags = evaluate.autoattack_accuracy(model, (x, y), eps=0.1, version="custom",
                                                      attacks=["apgd-dlr"], return_flags=True)
            plain = evaluate.autoattack_accuracy(model, (x, y), eps=0.1, version="custom", attacks=["apgd-dlr"])
    finally:
        logging.getLogger().removeHandler(handler)
    out = capsys.readouterr()
    assert acc == plain == 1.0                      # nothing to follow: every point stays correct
    assert any("there are 6 points with zero gradient" in f and "flags_doc.md" in f for f in flags), flags
    assert "zero gradient" not in out.out + out.err and not seen
    assert not [w for w in record if "zero gradient" in str(w.message)]
    assert logging.getLogger(evaluate.AUTOATTACK_LOGGER).propagate
    assert evaluate.autoattack_flag(flags) == {"zero_gradient_points": 6, "other": [
        f for f in flags if "zero gradient" not in f]}
    assert evaluate.autoattack_flag([]) == {"zero_gradient_points": 0, "other": []}
    assert evaluate.autoattack_flag(["there are 2 points with zero gradient! x", "there are 5 points with "
                                     "zero gradient! y", "it seems to be a randomized defense!"]) == {
        "zero_gradient_points": 5, "other": ["it seems to be a randomized defense!"]}
