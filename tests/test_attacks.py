"""ntklab.attacks: invariants of every attack, BN-mode handling, input checks, and a cross-check
against torchattacks."""
import copy
import inspect

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from tolerances import sum_rtol
from ntklab import attacks
from ntklab.bn import bn_layers, set_bn_running_stats

EPS = 0.1


# a noise basis for "fgsm_pca" (any (r, C, H, W) tensor will do for the invariants checked here)
BASIS = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) / 8


def run(name, model, x, y, *, eps=EPS, bn_mode="eval", **kw):
    """Every attack with small, fast settings (PGD: 3 steps, 2 restarts)."""
    if name == "fgsm_pca":
        kw = {"basis": BASIS, **kw}
    if name == "pgd":
        kw = {"alpha": eps / 4 if eps else 0.01, "steps": 3, "restarts": 2, **kw}
    if name == "trades":
        kw = {"alpha": eps / 4 if eps else 0.01, "steps": 3, **kw}
        return attacks.trades_loss(model, x, y, eps=eps, bn_mode=bn_mode, **kw)[1]
    return attacks.adversarial_examples(name, model, x, y, eps=eps, bn_mode=bn_mode, **kw)


def radius(name, eps=EPS):
    return 3 * eps if name == "n_fgsm" else eps  # n_fgsm: noise (2 eps) + alpha (eps)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def assert_same_state(model, snap):
    state, flags, grads = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]), f"{k} changed"
    assert [m.training for m in model.modules()] == flags
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


@pytest.fixture(scope="module")
def batch(mnist_small):
    x, y = mnist_small[1].tensors
    return x[:64], y[:64]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


ALL = attacks.ATTACKS + ("trades",)


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("name", ALL)
def test_output_in_ball_in_range_same_shape_dtype(name, trained_cnn, batch):
    x, y = batch
    out = run(name, trained_cnn, x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert not out.requires_grad
    assert out.min() >= 0 and out.max() <= 1
    dist = (out - x).abs().amax()
    assert dist <= radius(name) + 1e-6
    assert dist > 0.5 * EPS  # the attack did move the inputs


def test_n_fgsm_leaves_the_eps_ball_but_not_noise_plus_alpha(trained_cnn, batch):
    x, y = batch
    out = attacks.n_fgsm(trained_cnn, x, y, eps=EPS, noise=0.15, alpha=0.05)
    dist = (out - x).abs().amax()
    assert EPS + 0.05 < dist <= 0.2 + 1e-6


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bn_mode", ["eval", "train", "keep"])
def test_model_state_unchanged(name, bn_mode, trained_cnn, batch):
    model = copy.deepcopy(trained_cnn)
    model.train()
    model.features[1].eval()  # mixed modes: first BN in eval, second BN in train mode
    for p in list(model.parameters())[:2]:
        p.grad = torch.randn_like(p)  # existing gradients must stay as they are
    snap = snapshot(model)
    if name == "trades":  # the loss itself is computed in the model's own mode
        model.eval()
        snap = snapshot(model)
    run(name, model, *batch, bn_mode=bn_mode)
    assert_same_state(model, snap)


@pytest.mark.parametrize("name", ALL)
def test_no_parameter_gradient_is_computed(name, trained_cnn, batch):
    model = copy.deepcopy(trained_cnn)
    fired = []
    for p in model.parameters():
        p.register_hook(lambda g: fired.append(1))
    run(name, model, *batch)
    assert not fired
    assert all(p.grad is None for p in model.parameters())


def test_crafting_in_train_mode_would_move_running_stats(trained_cnn, batch):
    """The restoring of BN buffers is needed: a train-mode forward does change them."""
    model = copy.deepcopy(trained_cnn).train()
    before = bn_layers(model)[0].running_mean.clone()
    with torch.no_grad():
        model(batch[0])
    assert not torch.equal(before, bn_layers(model)[0].running_mean)


@pytest.mark.parametrize("name", ALL)
def test_robust_accuracy_at_most_clean(name, trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors
    clean = accuracy(trained_cnn, x, y)
    robust = accuracy(trained_cnn, run(name, trained_cnn, x, y), y)
    assert robust < clean


def test_pgd_at_least_as_strong_as_fgsm(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors
    torch.manual_seed(0)
    acc_pgd = accuracy(trained_cnn, attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=10), y)
    acc_fgsm = accuracy(trained_cnn, attacks.fgsm(trained_cnn, x, y, eps=EPS), y)
    assert acc_pgd <= acc_fgsm + 0.01


def test_pgd_restarts_never_weaker(trained_cnn, mnist_small):
    x, y = (t[:100] for t in mnist_small[1].tensors)
    kw = dict(eps=EPS, alpha=EPS / 4, steps=3)
    one = attacks.pgd(trained_cnn, x, y, restarts=1, generator=torch.Generator().manual_seed(3), **kw)
    three = attacks.pgd(trained_cnn, x, y, restarts=3, generator=torch.Generator().manual_seed(3), **kw)
    with torch.no_grad():
        wrong1 = trained_cnn(one).argmax(1) != y
        wrong3 = trained_cnn(three).argmax(1) != y
        loss1 = F.cross_entropy(trained_cnn(one), y, reduction="none")
        loss3 = F.cross_entropy(trained_cnn(three), y, reduction="none")
    assert (wrong3 | ~wrong1).all()  # every example the first run broke stays broken
    keep = wrong1 == wrong3
    assert (loss3[keep] >= loss1[keep] - 1e-5).all()


@pytest.mark.parametrize("name", ALL)
def test_eps_zero_returns_x(name, trained_cnn, batch):
    x, y = batch
    assert torch.equal(run(name, trained_cnn, x, y, eps=0.0), x)


def test_other_dtype(trained_cnn, batch):
    model = copy.deepcopy(trained_cnn).double()
    x, y = batch[0][:16].double(), batch[1][:16]
    for name in ("fgsm", "pgd"):
        out = run(name, model, x, y)
        assert out.dtype == torch.float64 and (out - x).abs().max() <= EPS + 1e-12


def test_generator_makes_random_attacks_reproducible(trained_cnn, batch):
    x, y = batch[0][:16], batch[1][:16]
    for name in ("fgsm_rs", "n_fgsm", "fgsm_logscale", "fgsm_pca", "pgd"):
        kw = dict(steps=1, restarts=1) if name == "pgd" else {}
        a = run(name, trained_cnn, x, y, generator=torch.Generator().manual_seed(1), **kw)
        b = run(name, trained_cnn, x, y, generator=torch.Generator().manual_seed(1), **kw)
        c = run(name, trained_cnn, x, y, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, b) and not torch.equal(a, c), name


def test_fgsm_logscale_noise_is_heavy_tailed(trained_cnn):
    """With a negligible step the output is the noisy start: per-pixel scales spread over
    [e^-3, 1] eps give far more tiny perturbations than one common scale eps does (the law of
    each coordinate differs; the covariance is isotropic in both cases, see test_pca_noise.py)."""
    x = torch.full((8, 1, 28, 28), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    logscale = attacks.fgsm_logscale(trained_cnn, x, y, eps=EPS, alpha=1e-7, generator=g) - x
    iso = attacks.fgsm_logscale(trained_cnn, x, y, eps=EPS, alpha=1e-7, low=1.0, high=1.0, generator=g) - x
    small = lambda d: (d.abs() < 0.05 * EPS).float().mean().item()
    assert small(iso) < 0.06  # N(0, eps^2): P(|z| < 0.05) = 0.04
    assert small(logscale) > 2 * small(iso)
    assert logscale.abs().max() <= EPS + 1e-6


def test_fgsm_aniso_is_a_deprecated_alias_of_fgsm_logscale(trained_cnn, batch):
    """The old name, as a function and as a name for adversarial_examples, warns and gives exactly
    fgsm_logscale's examples."""
    x, y = batch[0][:8], batch[1][:8]
    want = attacks.fgsm_logscale(trained_cnn, x, y, eps=EPS, low=0.2, generator=torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="'fgsm_aniso' is deprecated.*'fgsm_logscale'"):
        old = attacks.fgsm_aniso(trained_cnn, x, y, eps=EPS, low=0.2, generator=torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="'fgsm_aniso' is deprecated"):
        named = attacks.adversarial_examples("fgsm_aniso", trained_cnn, x, y, eps=EPS, low=0.2,
                                             generator=torch.Generator().manual_seed(3))
    assert torch.equal(old, want) and torch.equal(named, want)
    assert "fgsm_aniso" not in attacks.ATTACKS and attacks.DEPRECATED == {"fgsm_aniso": "fgsm_logscale"}


def test_fgsm_pca_floor_adds_isotropic_noise(trained_cnn):
    """floor > 0: the start is the basis noise plus floor * eps * N(0, I), drawn in that order from the
    generator, then clipped; it reaches the pixels the basis leaves at zero. floor = 0 draws nothing more."""
    x = torch.full((16, 1, 28, 28), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    basis = torch.zeros(2, 1, 28, 28)
    basis[0, 0, 10:18, 10:18], basis[1, 0, 12:16, 12:16] = 1.0, 0.5       # zero outside the centre
    out = attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=basis, alpha=1e-7, floor=0.3,
                           generator=torch.Generator().manual_seed(7)) - x
    g = torch.Generator().manual_seed(7)
    noise = (torch.randn(16, 2, generator=g) @ basis.flatten(1)).reshape(x.shape)
    want = torch.clamp(EPS * noise + 0.3 * EPS * torch.randn(x.shape, generator=g), -EPS, EPS)
    assert torch.allclose(out, want, atol=1e-6)
    assert out[:, :, :5].abs().min() > 0 and out[:, :, :5].std() == pytest.approx(0.3 * EPS, rel=0.1)
    none = attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=basis, alpha=1e-7, generator=torch.Generator().manual_seed(7)) - x
    assert none[:, :, :5].abs().max() < 1e-6
    with pytest.raises(ValueError, match="floor must be >= 0"):
        attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=basis, floor=-0.1)


# ------------------------------------------------------------------ BN modes
def skewed(model):
    model = copy.deepcopy(model)
    for m in bn_layers(model):
        m.running_mean += 3.0
        m.running_var *= 20.0
    return model


def test_bn_train_uses_batch_statistics(trained_cnn, batch):
    x, y = batch
    bad = skewed(trained_cnn)
    # batch statistics do not depend on the running ones: same result as on the unskewed model
    # and as on a model without running statistics at all
    no_running = set_bn_running_stats(copy.deepcopy(trained_cnn), False)
    a = attacks.fgsm(bad, x, y, eps=EPS, bn_mode="train")
    assert torch.equal(a, attacks.fgsm(trained_cnn, x, y, eps=EPS, bn_mode="train"))
    assert torch.allclose(a, attacks.fgsm(no_running, x, y, eps=EPS, bn_mode="eval"))
    # ... while eval mode uses the (skewed) running statistics
    assert not torch.equal(a, attacks.fgsm(bad, x, y, eps=EPS, bn_mode="eval"))
    # "keep" follows the model's own BN mode
    assert torch.equal(attacks.fgsm(copy.deepcopy(bad).train(), x, y, eps=EPS, bn_mode="keep"), a)
    assert torch.equal(attacks.fgsm(bad, x, y, eps=EPS, bn_mode="keep"),
                       attacks.fgsm(bad, x, y, eps=EPS, bn_mode="eval"))


def test_dropout_is_off_while_crafting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(32, 3)).train()
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    a = attacks.fgsm(model, x, y, eps=EPS, bn_mode="keep")
    b = attacks.fgsm(model, x, y, eps=EPS, bn_mode="keep")
    assert torch.equal(a, b)
    assert model.training and model[4].training


def test_attack_mode_restores_after_an_error(trained_cnn):
    model = copy.deepcopy(trained_cnn).train()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with attacks.attack_mode(model, "train"):
            model(torch.rand(4, 1, 28, 28))
            raise RuntimeError("boom")
    assert_same_state(model, snap)


# ------------------------------------------------------------------ TRADES
def test_trades_loss_value_and_gradient(trained_cnn, batch):
    model = copy.deepcopy(trained_cnn)
    x, y = batch
    loss, x_adv = attacks.trades_loss(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, beta=6.0)
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    # the same value summed in another order (a KL over N x k terms): float32 rounding of such sums
    assert torch.allclose(loss, F.cross_entropy(logits, y) + 6.0 * kl, rtol=sum_rtol(torch.float32, logits.numel()),
                          atol=0)
    # the inner maximisation increases the KL well beyond that of the start noise
    with torch.no_grad():
        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        kl0 = F.kl_div(F.log_softmax(model(start), 1), F.softmax(logits, 1), reduction="batchmean")
    assert kl > 10 * kl0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    loss0, _ = attacks.trades_loss(model, x, y, eps=0.0, alpha=0.01, steps=1)
    assert torch.allclose(loss0, F.cross_entropy(model(x), y), rtol=sum_rtol(torch.float32, logits.numel()), atol=0)


# ------------------------------------------------------------------ input checks
BAD = [
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=float("nan")), "eps must be a finite number"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2.5), "steps must be an integer >= 1"),
    (dict(restarts=0), "restarts must be an integer >= 1"),
    (dict(restarts=2, random_start=False), "restarts > 1 needs random_start"),
    (dict(bn_mode="batch"), "bn_mode must be one of"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_pgd_rejects_bad_arguments(kw, match, trained_cnn, batch):
    args = {**dict(eps=EPS, alpha=0.01, steps=2), **kw}
    with pytest.raises(ValueError, match=match):
        attacks.pgd(trained_cnn, *batch, **args)


def bad_x(x):
    return {
        "above 1": (x + 0.5, r"x must lie in \[0, 1\]"),
        "below 0": (x - 0.5, r"x must lie in \[0, 1\]"),
        "nan": (torch.where(x > 0.5, torch.nan, x), "x contains NaN"),
        "3-D": (x[:, 0], r"x must be a 4-D tensor \(N, C, H, W\)"),
        "integer": ((x * 255).to(torch.uint8), "x must be a floating-point tensor"),
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["above 1", "below 0", "nan", "3-D", "integer", "y shape",
                                  "y float", "y 2-D"])
def test_every_attack_checks_its_inputs(name, case, trained_cnn, batch):
    x, y = batch
    if case in bad_x(x):
        x, match = bad_x(x)[case]
    elif case == "y shape":
        y, match = y[:-1], r"y must have shape \(N,\)"
    elif case == "y float":
        y, match = y.float(), "y must hold integer class labels"
    else:
        y, match = y[:, None], r"y must have shape \(N,\)"
    with pytest.raises(ValueError, match=match):
        run(name, trained_cnn, x, y)


def test_single_step_specific_checks(trained_cnn, batch):
    with pytest.raises(ValueError, match="noise must be >= 0"):
        attacks.n_fgsm(trained_cnn, *batch, eps=EPS, noise=-0.1)
    with pytest.raises(ValueError, match="low <= high"):
        attacks.fgsm_logscale(trained_cnn, *batch, eps=EPS, low=0.5, high=0.1)
    with pytest.raises(ValueError, match="low must be > 0"):
        attacks.fgsm_logscale(trained_cnn, *batch, eps=EPS, low=0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        attacks.fgsm_rs(trained_cnn, *batch, eps=EPS, alpha=0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        attacks.trades_loss(trained_cnn, *batch, eps=EPS, alpha=0.01, steps=1, beta=-1)


def test_every_attack_function_is_listed_in_attacks():
    """The test matrices (here, test_bad_input.py, the training strategies) are generated from
    ATTACKS: an attack function ``f(model, x, y, *, eps, ...)`` missing from it would escape them."""
    found = {name for name in attacks.__all__
             if inspect.isfunction(getattr(attacks, name))
             and list(inspect.signature(getattr(attacks, name)).parameters)[:4] == ["model", "x", "y", "eps"]}
    assert found - {"trades_loss", "gradalign_loss"} - set(attacks.DEPRECATED) == set(attacks.ATTACKS)   # losses
    assert all(callable(getattr(attacks, name)) for name in attacks.ATTACKS)


def test_dispatcher(trained_cnn, batch):
    x, y = batch
    with pytest.raises(ValueError, match="unknown attack 'cw'; valid attacks are: fgsm, fgsm_rs"):
        attacks.adversarial_examples("cw", trained_cnn, x, y, eps=EPS)
    with pytest.raises(ValueError, match="steps is required"):
        attacks.adversarial_examples("pgd", trained_cnn, x, y, eps=EPS)
    with pytest.raises(ValueError, match="'fgsm' takes no alpha"):
        attacks.adversarial_examples("fgsm", trained_cnn, x, y, eps=EPS, alpha=0.1)
    with pytest.raises(ValueError, match="single-step attack"):
        attacks.adversarial_examples("fgsm_rs", trained_cnn, x, y, eps=EPS, steps=3)
    assert torch.equal(attacks.adversarial_examples("fgsm", trained_cnn, x, y, eps=EPS),
                       attacks.fgsm(trained_cnn, x, y, eps=EPS))
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(
        attacks.adversarial_examples("pgd", trained_cnn, x, y, eps=EPS, steps=2, generator=g()),
        attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=2, generator=g()))


# ------------------------------------------------------------------ defaults and the single-step skeleton
def test_pgd_and_trades_default_step_is_eps_over_4(trained_cnn, batch):
    x, y = batch[0][:16], batch[1][:16]
    assert attacks.pgd_alpha(0.3) == 0.075 and attacks.pgd_alpha(0.3, 0.01) == 0.01
    assert attacks.pgd_alpha(0.0) is None and attacks.pgd_alpha(0, 0.01) == 0.01
    with pytest.raises(ValueError, match="eps must be >= 0"):
        attacks.pgd_alpha(-1.0)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(attacks.pgd(trained_cnn, x, y, eps=EPS, steps=2, generator=g()),
                       attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=2, generator=g()))
    assert torch.equal(attacks.trades_loss(trained_cnn, x, y, eps=EPS, steps=2, generator=g())[1],
                       attacks.trades_loss(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=2, generator=g())[1])


def input_grad_sign(model, x, y):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return x.grad.sign()


def test_single_step_attacks_by_hand(trained_cnn, batch):
    """fgsm_rs and fgsm_pca written out: start point from the same generator, one signed step,
    projection (the skeleton changes nothing of the arithmetic)."""
    model = copy.deepcopy(trained_cnn).eval()
    x, y = batch[0][:16], batch[1][:16]
    g = torch.Generator().manual_seed(4)
    start = torch.clamp(x + (2 * torch.rand(x.shape, generator=g) - 1) * EPS, 0, 1)
    step = start + 1.25 * EPS * input_grad_sign(model, start, y)
    ref = torch.clamp(x + torch.clamp(step - x, -EPS, EPS), 0, 1)
    assert torch.equal(attacks.fgsm_rs(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(4)), ref)
    g = torch.Generator().manual_seed(5)
    noise = (torch.randn(16, len(BASIS), generator=g) @ BASIS.flatten(1)).reshape(x.shape)
    start = torch.clamp(x + torch.clamp(x + 0.5 * EPS * noise - x, -EPS, EPS), 0, 1)
    step = start + 0.05 * input_grad_sign(model, start, y)
    ref = torch.clamp(x + torch.clamp(step - x, -EPS, EPS), 0, 1)
    out = attacks.fgsm_pca(model, x, y, eps=EPS, basis=BASIS, alpha=0.05, scale=0.5,
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_every_attack_checks_dtype_and_label_range(name, trained_cnn, batch):
    """The checks every attack shares (fgsm_pca used to skip both)."""
    x, y = batch[0][:8], batch[1][:8]
    with pytest.raises(ValueError, match="dtype torch.float64 but the model computes in torch.float32"):
        run(name, trained_cnn, x.double(), y)
    bad = y.clone()
    bad[0] = -100                               # cross_entropy's "ignore" label
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        run(name, trained_cnn, x, bad)


# ------------------------------------------------------------------ cross-check: torchattacks
def test_fgsm_matches_torchattacks(trained_cnn, mnist_small):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = mnist_small[1].tensors
    ours = attacks.fgsm(trained_cnn, x, y, eps=EPS)
    theirs = torchattacks.FGSM(trained_cnn, eps=EPS)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_pgd_matches_torchattacks(trained_cnn, mnist_small):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = mnist_small[1].tensors
    ours = attacks.pgd(trained_cnn, x, y, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)
    theirs = torchattacks.PGD(trained_cnn, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)(x, y)
    assert abs(accuracy(trained_cnn, ours, y) - accuracy(trained_cnn, theirs, y)) <= 0.01
    assert (ours - theirs).abs().gt(1e-5).float().mean() < 0.01  # the same points, nearly everywhere


# ------------------------------------------------------------------ GradAlign (chapter 6)
def _smooth_net(seed=0):
    """A tiny float64 network with a smooth activation (the double backward pass is not zero)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Softplus(), nn.Linear(6, 3)).double()


def _tiny_batch(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _gradalign_by_hand(model, x, y, eps, lam, gen_seed):
    """The loss written out: FGSM from x (step eps, clipped), CE there, plus lam (1 - mean cos) of the
    input gradients at x (a constant) and at the clipped uniform point (differentiable), cosines by
    F.cosine_similarity."""
    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
    x_adv = torch.clamp(x + eps * g.sign(), 0, 1)
    loss = F.cross_entropy(model(x_adv), y)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=x.dtype)
    x2 = torch.clamp(x + (2 * u - 1) * eps, 0, 1).requires_grad_(True)
    x1 = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
    return loss + lam * (1 - cos.mean()), x_adv


def test_gradalign_loss_matches_a_hand_computation_in_float64():
    model = _smooth_net()
    x, y = _tiny_batch()
    eps, lam = 0.3, 0.7
    loss, logits, x_adv = attacks.gradalign_loss(model, x, y, eps=eps, lam=lam,
                                                 generator=torch.Generator().manual_seed(5))
    ours = torch.autograd.grad(loss, list(model.parameters()))
    ref, ref_adv = _gradalign_by_hand(model, x, y, eps, lam, 5)
    theirs = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.equal(x_adv, ref_adv) and torch.allclose(logits, model(ref_adv), atol=1e-12)
    assert abs(loss.item() - ref.item()) < 1e-12
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours, theirs))
    # the regulariser is really differentiated (double backprop): its parameter gradient is not zero
    fgsm_only = torch.autograd.grad(F.cross_entropy(model(ref_adv), y), list(model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(ours, fgsm_only)) > 1e-4
    # negative control: a hand computation that also differentiates the gradient at x differs
    x1 = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y), x1, create_graph=True)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    x2 = torch.clamp(x + (2 * u - 1) * eps, 0, 1).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    both = F.cross_entropy(model(ref_adv), y) + lam * (1 - F.cosine_similarity(g1.flatten(1), g2.flatten(1)).mean())
    other = torch.autograd.grad(both, list(model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(ours, other)) > 1e-6


def test_gradalign_with_lambda_zero_is_fgsm_at_loss():
    model = _smooth_net(2)
    x, y = _tiny_batch(3)
    loss, logits, x_adv = attacks.gradalign_loss(model, x, y, eps=0.2, lam=0.0)
    expected = F.cross_entropy(model(attacks.fgsm(model, x, y, eps=0.2)), y)
    assert torch.equal(x_adv, attacks.fgsm(model, x, y, eps=0.2))
    assert abs(loss.item() - expected.item()) < 1e-14
    assert (x_adv - x).abs().max() <= 0.2 + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not logits.requires_grad and not x_adv.requires_grad


def test_gradalign_cosine_term_is_in_range_and_zero_for_aligned_gradients():
    # a linear model of two classes has input gradients (p_1 - y_1)(w_1 - w_0): one direction, the
    # same sign for a label, so cos = 1 and the regulariser vanishes
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double()
    x, y = _tiny_batch(4)
    loss, _, x_adv = attacks.gradalign_loss(linear, x, y % 2, eps=0.25, lam=3.0)
    assert abs(loss.item() - F.cross_entropy(linear(x_adv), y % 2).item()) < 1e-10
    model = _smooth_net(1)                          # a nonlinear one: 0 <= reg <= 2 lam, here > 0
    loss, _, x_adv = attacks.gradalign_loss(model, x, y, eps=0.25, lam=1.0)
    reg = loss.item() - F.cross_entropy(model(x_adv), y).item()
    assert 0 < reg <= 2


def test_gradalign_checks_its_arguments():
    model = _smooth_net()
    x, y = _tiny_batch()
    for bad in (-0.1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="lam"):
            attacks.gradalign_loss(model, x, y, eps=0.1, lam=bad)
    with pytest.raises(ValueError, match="eps"):
        attacks.gradalign_loss(model, x, y, eps=-0.1)
    with pytest.raises(ValueError):
        attacks.gradalign_loss(model, x.float(), y, eps=0.1)    # dtype not the model's
    with pytest.raises(ValueError, match="bn_mode"):
        attacks.gradalign_loss(model, x, y, eps=0.1, bn_mode="nope")
    before = [p.detach().clone() for p in model.parameters()]
    attacks.gradalign_loss(model, x, y, eps=0.1, lam=1.0)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))
