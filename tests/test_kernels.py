"""ntklab.kernels: the closed-form two-layer NTK, kernel regression and eigen-features (chapter 7)."""
import functools
import math

import pytest
import torch

import ntklab
from ntklab import kernels
from ntklab.kernels import KernelPredictor, eigen_features, gd_filter, regression_weights, two_layer_ntk
from ntklab.models import TwoLayerNet

MEAN, STD = (0.4,), (0.3,)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("freeze_second", [True, False])
def test_closed_form_is_the_limit_of_the_empirical_ntk(images, freeze_second):
    errors, cross = [], []
    for width in (256, 4096, 65536):
        torch.manual_seed(1)
        net = TwoLayerNet(in_features=64, width=width, num_classes=2, freeze_second=freeze_second,
                          mean=MEAN, std=STD).double()
        K_emp = ntklab.ntk.empirical_ntk(net, images, kind="full")
        K_inf = two_layer_ntk(images, net=net)
        errors.append(float((K_emp[:, :, 0, 0] - K_inf).norm() / K_inf.norm()))
        errors.append(float((K_emp[:, :, 1, 1] - K_inf).norm() / K_inf.norm()))
        cross.append(float(K_emp[:, :, 0, 1].norm() / K_inf.norm()))
    # the error of an average over m units falls like m^-1/2: 16x the width, about 4x less error
    assert errors[2] < errors[0] / 2 and errors[3] < errors[1] / 2 and errors[4] < errors[2] / 2, errors
    assert max(errors[4:]) < 0.02, errors
    assert cross[2] < cross[0] / 4 and cross[2] < 0.02, cross   # no kernel across outputs in the limit


def test_closed_form_by_hand():
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)   # (n, d): used as is
    K = two_layer_ntk(h)
    # theta = 0: half of the units are on; orthogonal inputs: h.h' = 0
    assert torch.allclose(K.diagonal(), (h ** 2).sum(1) / 2)
    assert abs(float(K[0, 1])) < 1e-12
    # 45 degrees: h.h' (pi - pi/4) / (2 pi) = 3 * 3/8
    assert math.isclose(float(K[0, 2]), 3 * 0.375, rel_tol=1e-6)
    K2 = two_layer_ntk(h, freeze_second=False)
    # second layer trained: + |h||h'| (sin + (pi - theta) cos) / (2 pi)
    assert math.isclose(float(K2[0, 1]), 6 / (2 * math.pi), rel_tol=1e-6)
    assert torch.allclose(K2.diagonal(), (h ** 2).sum(1))


def test_net_argument_reads_normalisation_and_freezing(images):
    net = TwoLayerNet(in_features=64, width=8, num_classes=2, freeze_second=False, mean=MEAN, std=STD)
    assert torch.allclose(two_layer_ntk(images, net=net),
                          two_layer_ntk(images, mean=MEAN, std=STD, freeze_second=False))
    assert not torch.allclose(two_layer_ntk(images, net=net), two_layer_ntk(images, mean=MEAN, std=STD))
    cross = two_layer_ntk(images[:2], images[2:], mean=MEAN, std=STD)
    assert torch.allclose(cross, two_layer_ntk(images, mean=MEAN, std=STD)[:2, 2:])


def test_closed_form_gradient_matches_finite_differences(images):
    x = images[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: two_layer_ntk(a, images[2:], mean=MEAN, std=STD), (x,))
    # at x = x' the clamp keeps the gradient finite
    (g,) = torch.autograd.grad(two_layer_ntk(x, mean=MEAN, std=STD).sum(), x)
    assert torch.isfinite(g).all()


def test_two_layer_ntk_rejects_bad_input(images):
    with pytest.raises(ValueError, match="x1 must be a floating-point tensor"):
        two_layer_ntk(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="x2 contains NaN"):
        two_layer_ntk(images, images * float("nan"))
    with pytest.raises(ValueError, match="same number of features"):
        two_layer_ntk(images, torch.rand(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="one value per channel"):
        two_layer_ntk(images, mean=(0.1, 0.2), std=(1.0, 1.0))


@pytest.fixture(scope="module")
def gram():
    g = torch.Generator().manual_seed(3)
    X = torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 2
    K = two_layer_ntk(X, mean=MEAN, std=STD)
    Y = torch.nn.functional.one_hot(y, 2).double()
    return X, y, K, Y


def test_regression_weights_converged_is_a_ridge_solve(gram):
    _, _, K, Y = gram
    ridge = 0.1
    expected = torch.linalg.solve(K + ridge * torch.eye(len(K), dtype=K.dtype), Y)
    assert torch.allclose(regression_weights(K, Y, ridge=ridge), expected, rtol=1e-8, atol=1e-10)


def test_regression_weights_after_steps_follow_gradient_descent(gram):
    _, _, K, Y = gram
    n = len(K)
    lr = 0.5 * n / float(torch.linalg.eigvalsh(K)[-1])
    alpha = torch.zeros_like(Y)
    for step in range(1, 41):        # the linear model f = K alpha on L = |f - Y|^2 / (2n)
        alpha = alpha - lr / n * (K @ alpha - Y)
        if step in (1, 7, 40):
            assert torch.allclose(regression_weights(K, Y, lr=lr, steps=step), alpha, rtol=1e-7, atol=1e-10)
    assert torch.allclose(regression_weights(K, Y, lr=lr, steps=0), torch.zeros_like(Y))


def test_eigen_features_sum_to_the_kernel_predictor(gram):
    X, y, K, Y = gram
    kernel_fn = functools.partial(two_layer_ntk, mean=MEAN, std=STD)
    x_test = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for kw in ({"ridge": 0.05}, {"lr": 0.01, "steps": 30}):
        lam, alphas = eigen_features(K, Y, **kw)
        assert alphas.shape == (len(K), len(K), 2)
        assert (lam[:-1] >= lam[1:]).all()
        full = KernelPredictor(kernel_fn, X, regression_weights(K, Y, **kw), dtype=torch.float64)
        features = sum(full.with_alpha(a)(x_test) for a in alphas)
        assert torch.allclose(features, full(x_test), rtol=1e-7, atol=1e-9)
    # one feature by its definition: K(x, X) v_i v_i^T Y / (lambda_i + r)
    lam, V = torch.linalg.eigh(K)
    v = V[:, -1]
    lam_top, top = eigen_features(K, Y, ridge=0.05, top=1)
    assert top.shape == (1, len(K), 2)
    assert torch.allclose(top[0], torch.outer(v, v @ Y) / (lam[-1] + 0.05), rtol=1e-7, atol=1e-10)


def test_gd_filter_limits():
    lam = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    g = gd_filter(lam, 5, lr=0.1, steps=3)
    assert math.isclose(float(g[2]), 3 * 0.1 / 5)               # lambda = 0: t lr / n
    assert math.isclose(float(g[0]), (1 - (1 - 0.2) ** 3) / 10)
    assert torch.allclose(gd_filter(lam[:2], 5, lr=0.1, steps=100_000), 1 / lam[:2])
    with pytest.raises(ValueError, match="steps needs lr"):
        gd_filter(lam, 5, steps=3)
    with pytest.raises(ValueError, match="ridge must be"):
        gd_filter(lam, 5, ridge=-1.0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        gd_filter(lam, 5, lr=0.1, steps=-1)


def test_kernel_functions_reject_bad_shapes(gram):
    X, _, K, Y = gram
    with pytest.raises(ValueError, match="square"):
        regression_weights(K[:3], Y)
    with pytest.raises(ValueError, match="Y must be"):
        eigen_features(K, Y[:3])
    with pytest.raises(ValueError, match="top must be"):
        eigen_features(K, Y, top=0)
    with pytest.raises(ValueError, match="finite"):
        regression_weights(K * float("nan"), Y)
    with pytest.raises(ValueError, match="alpha must have shape"):
        KernelPredictor(two_layer_ntk, X, Y[:3])


def test_kernel_predictor_is_attacked_through_autograd(gram):
    X, y, K, Y = gram
    kernel_fn = functools.partial(two_layer_ntk, mean=MEAN, std=STD)
    P = KernelPredictor(kernel_fn, X.float(), regression_weights(K, Y, ridge=1e-3))
    x = X.float()
    x_adv = ntklab.attacks.fgsm(P, x, y, eps=0.05)
    assert float((x_adv - x).abs().max()) <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    loss = lambda z: torch.nn.functional.cross_entropy(P(z), y)   # noqa: E731
    assert float(loss(x_adv)) > float(loss(x))
    # FGSM moves every pixel along the sign of the analytic gradient (checked by finite differences)
    x64 = X[:1].clone().requires_grad_(True)
    P64 = KernelPredictor(kernel_fn, X, regression_weights(K, Y, ridge=1e-3), dtype=torch.float64)
    f = lambda z: torch.nn.functional.cross_entropy(P64(z), y[:1])   # noqa: E731
    (g,) = torch.autograd.grad(f(x64), x64)
    i = int(g.abs().flatten().argmax())
    e = torch.zeros_like(x64).flatten()
    e[i] = 1e-6
    fd = (f(x64.detach() + e.view_as(x64)) - f(x64.detach() - e.view_as(x64))) / 2e-6
    assert math.isclose(float(fd), float(g.flatten()[i]), rel_tol=1e-4)
    assert not P.training   # a kernel machine has no train mode: ntklab.evaluate does not warn


def test_kernel_inputs_that_are_not_a_gram_matrix_are_refused():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    K, Y = A @ A.T + torch.eye(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)[:, :3]
    with pytest.raises(ValueError, match=r"K must be a symmetric Gram matrix; max\|K - K\^T\|"):
        kernels.regression_weights(K + torch.triu(torch.ones_like(K), 1), Y, ridge=0.1)
    with pytest.raises(ValueError, match="K must be a real tensor"):
        kernels.regression_weights(K.to(torch.complex128), Y, ridge=0.1)
    # rounding-level asymmetry is symmetrised away: the same weights as the symmetric matrix
    noisy = K + 1e-9 * torch.randn_like(K)
    assert torch.allclose(kernels.regression_weights(noisy, Y, ridge=0.1),
                          kernels.regression_weights((noisy + noisy.T) / 2, Y, ridge=0.1))


def test_singular_kernels_need_a_ridge():
    X = torch.randn(6, 2, dtype=torch.float64)
    K, Y = X @ X.T, torch.eye(6, dtype=torch.float64)[:, :2]   # rank 2
    with pytest.raises(ValueError, match=r"singular or indefinite \(smallest eigenvalue .*ridge > 0"):
        kernels.regression_weights(K, Y)
    assert torch.isfinite(kernels.regression_weights(K, Y, ridge=1e-3)).all()


def test_gradient_descent_that_diverges_is_refused_and_oscillation_is_exact():
    torch.manual_seed(1)
    A = torch.randn(5, 5, dtype=torch.float64)
    K, Y = A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    lam_max, n = float(torch.linalg.eigvalsh(K).max()), 5
    with pytest.raises(ValueError, match=r"diverges on this kernel .*lr must be below 2 n / lambda_max"):
        kernels.regression_weights(K, Y, lr=2.01 * n / lam_max, steps=3)
    # 1 < lr lambda_max / n < 2 oscillates but converges: the closed form equals the iteration itself
    lr, steps = 1.6 * n / lam_max, 7
    alpha = torch.zeros_like(Y)
    for _ in range(steps):   # f = K alpha; alpha <- alpha - lr/n (K alpha - Y)
        alpha = alpha - lr / n * (K @ alpha - Y)
    assert torch.allclose(kernels.regression_weights(K, Y, lr=lr, steps=steps), alpha, rtol=1e-9, atol=1e-10)


def test_two_layer_ntk_refuses_inputs_of_two_layouts():
    images = torch.rand(3, 1, 2, 2)
    with pytest.raises(ValueError, match="x1 and x2 must have the same layout"):
        kernels.two_layer_ntk(images, images.flatten(1), mean=(0.5,), std=(0.25,))


def test_frozen_gates_keep_the_values_and_drop_the_angle_derivative():
    """With frozen gates the input gradient of sum_i c_i Theta(x, x_i) is sum_i c_i (pi - theta_i) h_i / (2 pi);
    the full gradient adds sum_i c_i (h . h_i) / (2 pi) (-d theta_i / d h), computed here by hand in numpy."""
    import numpy as np

    torch.manual_seed(0)
    h = torch.randn(1, 7, dtype=torch.float64)
    H = torch.randn(5, 7, dtype=torch.float64)
    c = torch.randn(5, dtype=torch.float64)
    assert torch.equal(two_layer_ntk(h, H), two_layer_ntk(h, H, frozen_gates=True))
    grads = {}
    for frozen in (False, True):
        x = h.clone().requires_grad_(True)
        (grads[frozen],) = torch.autograd.grad((two_layer_ntk(x, H, frozen_gates=frozen)[0] * c).sum(), x)
    hn, Hn, cn = h.numpy()[0], H.numpy(), c.numpy()
    cos = Hn @ hn / (np.linalg.norm(Hn, axis=1) * np.linalg.norm(hn))
    theta = np.arccos(cos)
    frozen = ((cn * (np.pi - theta))[:, None] * Hn).sum(0) / (2 * np.pi)
    # d cos / d h = h_i / (|h| |h_i|) - cos h / |h|^2, and d theta = -d cos / sin theta
    dcos = Hn / (np.linalg.norm(Hn, axis=1)[:, None] * np.linalg.norm(hn)) - cos[:, None] * hn / (hn @ hn)
    minus_dtheta = dcos / np.sin(theta)[:, None]
    extra = ((cn * (Hn @ hn))[:, None] * minus_dtheta).sum(0) / (2 * np.pi)
    np.testing.assert_allclose(grads[True].numpy()[0], frozen, rtol=1e-10)
    np.testing.assert_allclose(grads[False].numpy()[0], frozen + extra, rtol=1e-10)
