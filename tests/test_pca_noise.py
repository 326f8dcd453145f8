"""The book's data-derived anisotropic noise (chapter 6): ntklab.attacks.pca_noise_basis,
pca_noise and fgsm_pca, by name and as a training strategy with ``attack_kwargs``."""
import copy

import numpy as np
import pytest
import torch

import ntklab
from ntklab import attacks
from ntklab.models import SmallCNN
from ntklab.train import train

EPS = 0.1


@pytest.fixture(scope="module")
def images():
    """500 class-balanced embedded MNIST training images (N, 1, 28, 28) in [0, 1]."""
    return ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 500, seed=0).tensors[0]


def data_covariance(X):
    """The pixel covariance of X, (d, d) float64, by numpy (the independent reference)."""
    return np.cov(X.reshape(len(X), -1).double().numpy(), rowvar=False)


def cosine(A, B):
    return float(np.sum(A * B) / (np.linalg.norm(A) * np.linalg.norm(B)))


# ------------------------------------------------------------------ the basis
@pytest.mark.parametrize("n, shape", [(40, (1, 4, 5)), (12, (2, 3, 3)), (500, None)])
def test_basis_covariance_is_the_datas(n, shape, images):
    """B^T B = c Sigma exactly (float64 reference from numpy), with the largest per-pixel variance 1;
    the first case goes through the covariance (N > d), the second through the SVD (N <= d)."""
    if shape is None:
        X = images[:n]
    else:
        X = torch.rand((n,) + shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    B = attacks.pca_noise_basis(X)
    d = X[0].numel()
    assert B.shape[1:] == X.shape[1:] and B.dtype == X.dtype
    assert B.shape[0] == min(n - 1, d) if shape is not None else B.shape[0] <= min(n - 1, d)
    cov = B.reshape(len(B), -1).double().T @ B.reshape(len(B), -1).double()
    sigma = data_covariance(X)
    c = sigma.diagonal().max()
    tol = 1e-9 if X.dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(cov.numpy() * c, sigma, atol=tol * c)
    assert float(cov.diagonal().max()) == pytest.approx(1.0, rel=tol)


def test_basis_rank_keeps_the_top_directions(images):
    X = images[:300].double()
    B = attacks.pca_noise_basis(X, rank=5).reshape(5, -1)
    lam, vecs = np.linalg.eigh(data_covariance(X))
    top = vecs[:, ::-1][:, :5] * np.sqrt(lam[::-1][:5])
    reference = top @ top.T
    cov = (B.T @ B).numpy()
    np.testing.assert_allclose(cov, reference / reference.diagonal().max(), atol=1e-9)
    # rows are orthogonal (principal directions) with decreasing norms (standard deviations)
    gram = (B @ B.T).numpy()
    np.testing.assert_allclose(gram - np.diag(gram.diagonal()), 0, atol=1e-9)
    assert np.all(np.diff(gram.diagonal()) <= 1e-12)


def test_basis_is_zero_where_the_data_do_not_vary(images):
    B = attacks.pca_noise_basis(images)
    constant = images.std(0) == 0                       # MNIST's black border
    assert constant.sum() > 50
    assert float(B[:, constant].abs().max()) < 1e-6


def test_basis_checks_its_input(images):
    with pytest.raises(ValueError, match=r"X must be a 4-D floating-point tensor"):
        attacks.pca_noise_basis(images[:, 0])
    with pytest.raises(ValueError, match="at least 2 images"):
        attacks.pca_noise_basis(images[:1])
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attacks.pca_noise_basis(images * 2)
    with pytest.raises(ValueError, match="no variance"):
        attacks.pca_noise_basis(torch.full((5, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        attacks.pca_noise_basis(images, rank=0)


# ------------------------------------------------------------------ the noise and the attack
def test_noise_covariance_follows_the_data(images):
    """20,000 draws of pca_noise: their covariance is B^T B (to sampling error), which is the data's;
    isotropic noise of the same size is far from it."""
    B = attacks.pca_noise_basis(images)
    n = 20_000
    noise = attacks.pca_noise(B, n, generator=torch.Generator().manual_seed(0)).reshape(n, -1).double()
    assert noise.shape == (n, 784)
    empirical = (noise.T @ noise / n).numpy()          # the mean is 0 by construction
    expected = (B.reshape(len(B), -1).double().T @ B.reshape(len(B), -1).double()).numpy()
    # each entry of a sample covariance has standard error <= sqrt(2 / n) for unit variances
    assert np.abs(empirical - expected).max() < 6 * np.sqrt(2 / n)
    sigma = data_covariance(images)
    assert cosine(empirical, sigma) > 0.99
    assert cosine(np.eye(784), sigma) < 0.3


def test_fgsm_pca_start_follows_the_data(trained_cnn, images):
    """With a negligible step, fgsm_pca returns its noisy start: within the eps-ball and [0, 1], with
    the largest per-pixel standard deviation scale * eps and the data's covariance (up to the
    clipping of the tails)."""
    B = attacks.pca_noise_basis(images)
    x = torch.full((4000, 1, 28, 28), 0.5)
    y = torch.zeros(4000, dtype=torch.long)
    scale = 0.5
    out = attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=B, alpha=1e-7, scale=scale,
                           generator=torch.Generator().manual_seed(0))
    delta = (out - x).reshape(len(x), -1).double()
    assert float(delta.abs().max()) <= EPS + 1e-6 and out.min() >= 0 and out.max() <= 1
    std = delta.std(0)
    assert float(std.max()) == pytest.approx(scale * EPS, rel=0.1)     # 2-sigma clipping shrinks it a little
    assert cosine((delta.T @ delta / len(x)).numpy(), data_covariance(images)) > 0.95
    assert float(std[images.reshape(len(images), -1).std(0) == 0].max()) < 1e-6


def test_fgsm_pca_in_ball_range_shape(trained_cnn, images):
    x, y = ntklab.data.subset(ntklab.data.load("mnist5k", "test"), 64, seed=0).tensors
    B = attacks.pca_noise_basis(images)
    for eps in (0.05, 0.3):
        out = attacks.adversarial_examples("fgsm_pca", trained_cnn, x, y, eps=eps, basis=B, scale=3.0)
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
        assert float((out - x).abs().max()) <= eps + 1e-6
        assert out.min() >= 0 and out.max() <= 1
    # scale 0 is FGSM with step alpha; alpha = eps makes it plain FGSM
    assert torch.equal(attacks.fgsm_pca(trained_cnn, x, y, eps=0.1, basis=B, scale=0.0),
                       attacks.fgsm(trained_cnn, x, y, eps=0.1))


def test_fgsm_pca_is_reproducible_with_a_generator(trained_cnn, images):
    x, y = images[:16], torch.arange(16) % 10
    B = attacks.pca_noise_basis(images)
    run = lambda seed: attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=B,
                                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    torch.manual_seed(5)
    a = attacks.pca_noise(B, 3)
    torch.manual_seed(5)
    assert torch.equal(a, attacks.pca_noise(B, 3))


def test_fgsm_pca_checks_its_basis(trained_cnn, images):
    x, y = images[:8], torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="needs basis"):
        attacks.adversarial_examples("fgsm_pca", trained_cnn, x, y, eps=EPS)
    with pytest.raises(ValueError, match=r"basis must have shape \(r, 1, 28, 28\)"):
        attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=torch.zeros(3, 1, 14, 14))
    with pytest.raises(ValueError, match="non-finite"):
        attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=torch.full((3, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="scale must be >= 0"):
        attacks.fgsm_pca(trained_cnn, x, y, eps=EPS, basis=attacks.pca_noise_basis(images), scale=-1)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        attacks.pca_noise(attacks.pca_noise_basis(images), 0)


# ------------------------------------------------------------------ as a training strategy
@pytest.fixture(scope="module")
def small_train():
    return ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 128, seed=0)


def fit(train_set, seed=0, **kw):
    torch.manual_seed(seed)
    model = SmallCNN(width=4, mean=ntklab.data.stats("mnist5k")[0], std=ntklab.data.stats("mnist5k")[1])
    history = train(model, train_set, **{"strategy": "fgsm_pca", "epochs": 1, "batch_size": 64, "eps": 0.3,
                                        "device": "cpu", "progress": False, **kw})
    return model, history


def test_training_with_fgsm_pca_uses_the_training_images_basis(small_train):
    """Without attack_kwargs the basis is computed from the training images: the same run as with
    that basis given explicitly, and reproducible under a seed."""
    a, _ = fit(small_train)
    b, _ = fit(small_train, attack_kwargs={"basis": attacks.pca_noise_basis(small_train.tensors[0])})
    c, _ = fit(small_train, attack_kwargs={"basis": attacks.pca_noise_basis(small_train.tensors[0]),
                                           "scale": 3.0})
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_attack_kwargs_reach_the_attack(small_train, monkeypatch):
    seen = []
    real = attacks.fgsm_logscale

    def spy(*args, **kw):
        seen.append({k: kw[k] for k in ("low", "high")})
        return real(*args, **kw)

    monkeypatch.setattr(attacks, "fgsm_logscale", spy)
    fit(small_train, strategy="fgsm_logscale", attack_kwargs={"low": 0.5, "high": 0.9})
    # the check of attack_kwargs before the first epoch (one attack on two images), then 128 images in batches of 64
    assert seen == [{"low": 0.5, "high": 0.9}] * 3


def test_deprecated_strategy_fgsm_aniso_trains_as_fgsm_logscale(small_train):
    """The old strategy name is accepted, warns, and trains exactly the fgsm_logscale run."""
    new, _ = fit(small_train, strategy="fgsm_logscale")
    with pytest.warns(DeprecationWarning, match="'fgsm_aniso' is deprecated"):
        old, _ = fit(small_train, strategy="fgsm_aniso")
    for (k, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), k


def test_attack_kwargs_checks(small_train, tmp_path):
    with pytest.raises(ValueError, match="not for 'normal'"):
        fit(small_train, strategy="normal", attack_kwargs={"low": 0.5})
    with pytest.raises(ValueError, match=r"must not hold \['alpha'\]"):
        fit(small_train, strategy="fgsm_rs", attack_kwargs={"alpha": 0.5})
    with pytest.raises(ValueError, match="needs basis|basis must"):
        fit(small_train, attack_kwargs={"basis": torch.zeros(2, 1, 5, 5)})
    # a checkpoint remembers the attack's arguments
    fit(small_train, attack_kwargs={"scale": 0.5}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different run.*attack_kwargs"):
        fit(small_train, attack_kwargs={"scale": 0.7}, checkpoint_dir=tmp_path)
    basis = attacks.pca_noise_basis(small_train.tensors[0])
    fit(small_train, attack_kwargs={"basis": basis}, checkpoint_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="different run.*attack_kwargs"):
        fit(small_train, attack_kwargs={"basis": basis * 0.5}, checkpoint_dir=tmp_path / "b")
    model, history = fit(small_train, attack_kwargs={"basis": copy.deepcopy(basis)}, checkpoint_dir=tmp_path / "b")
    assert history.finished


# ------------------------------------------------------------------ the chapter's noises (chapter 6)
def test_basis_by_hand_on_the_whole_training_set():
    """Chapter 6 builds the basis by hand in float64 (covariance, eigen-decomposition, scaling) next
    to ntklab's float32 one, on every training image of the quick profile: the two noise covariances
    agree to 1e-6, and fewer directions than pixels carry variance (MNIST's border is constant)."""
    X = ntklab.data.load("mnist5k", "train").tensors[0]
    flat = X.flatten(1).double()
    centred = flat - flat.mean(0)
    lam, U = torch.linalg.eigh(centred.T @ centred / (len(flat) - 1))
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)
    B_hand = (U * lam.sqrt()).T
    B_hand = B_hand / (B_hand ** 2).sum(0).max().sqrt()
    B = attacks.pca_noise_basis(X).flatten(1).double()
    assert float((B_hand.T @ B_hand - B.T @ B).abs().max()) < 1e-6
    assert len(B) < X[0].numel()


def test_uniform_and_log_uniform_noise_are_isotropic_in_covariance(trained_cnn, images):
    """The noises of chapter 6, drawn through the attacks as the chapter draws them (3000 draws at
    eps 0.3): the effective rank of the covariance of the uniform, log-uniform-scale and Gaussian
    noises is above 0.8 d (isotropic noise gives a little less than d from finitely many draws,
    Marchenko-Pastur), that of fgsm_pca's far below and that of fgsm_pca with its floor in between;
    FGSM-RS's root mean square is eps / sqrt(3) (uniform on [-eps, eps]), fgsm_logscale's that of
    s z projected to [-1, 1] (by Monte Carlo), and the Gaussian control's the same."""
    from ntklab.experiments import overfitting as co

    starts = co.noise_starts(trained_cnn, images, 0.3, 3000, seed=0)
    assert set(starts) == set(co.NOISES) and starts["fgsm_pca"].shape == (3000, 1, 28, 28)
    stats = co.noise_statistics(starts, 0.3)
    d = 784
    for m in ("fgsm_rs", "n_fgsm", "fgsm_logscale", "gauss"):
        assert stats[m]["erank"] > co.ISOTROPIC_ABOVE * d, (m, stats[m])
    assert stats["fgsm_pca"]["erank"] < 0.2 * d < stats["pca_floor"]["erank"] < co.ISOTROPIC_ABOVE * d
    assert stats["fgsm_rs"]["rms"] == pytest.approx(3 ** -0.5, rel=0.01)
    rng = np.random.default_rng(0)     # sqrt E[clip(s z, -1, 1)^2], log s uniform on [-3, 0], z ~ N(0, 1)
    clipped = np.clip(np.exp(rng.uniform(-3, 0, 10**6)) * rng.standard_normal(10**6), -1, 1)
    assert stats["fgsm_logscale"]["rms"] == pytest.approx(np.sqrt(np.mean(clipped ** 2)), rel=0.01)
    assert stats["gauss"]["rms"] == pytest.approx(stats["fgsm_logscale"]["rms"], rel=0.02)
    # reproducible by seed, and the seed matters
    again = co.noise_starts(trained_cnn, images, 0.3, 10, seed=0)
    assert torch.equal(again["fgsm_rs"], starts["fgsm_rs"][:10])
    assert not torch.equal(co.noise_starts(trained_cnn, images, 0.3, 10, seed=1)["fgsm_rs"], again["fgsm_rs"])
