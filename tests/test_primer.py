"""Chapter 1 (Primer): ``analyse`` and ``claims`` of ``ntklab.experiments.primer``, the facts
the chapter relies on that hold by construction (a symmetric PSD kernel, the by-hand kernel and FGSM
equal to the package's, adversarial examples within eps and in [0, 1]), and what its BN exercise
says happens in train mode."""
import copy
import math

import matplotlib
import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

import ntklab
from ntklab import experiments
from ntklab.experiments import primer
from ntklab.models import SmallCNN, count_parameters
from ntklab.ntk import empirical_ntk

from claim_controls import assert_negative_controls, set_at

matplotlib.use("Agg")

EPS_GRID = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]       # the chapter's sweep


# ------------------------------------------------------------------ the chapter's by-hand code
def trace_ntk_by_hand(net, x):
    """The Primer's ``trace_ntk_by_hand``, verbatim."""
    net.eval()
    params = {name: p.detach() for name, p in net.named_parameters()}

    def f(p, xi):
        return functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return sum(torch.einsum("iap,jap->ij", J.flatten(2), J.flatten(2)) for J in jac.values())


def fgsm_by_hand(net, x, y, eps):
    """The Primer's ``fgsm_by_hand``, verbatim."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


@pytest.fixture(scope="module")
def probe(mnist_small):
    """50 test images, 5 per class, sorted by class, as in the chapter."""
    p = ntklab.data.subset(mnist_small[1], 50, seed=0)
    order = p.tensors[1].argsort(stable=True)
    return p.tensors[0][order], p.tensors[1][order]


@pytest.fixture(scope="module")
def primer_net():
    """The chapter's network: SmallCNN at width 4 with MNIST's statistics, at initialisation."""
    torch.manual_seed(0)
    mean, std = ntklab.data.stats("mnist5k")
    return SmallCNN(width=4, mean=mean, std=std).eval()


@pytest.mark.parametrize("which", ["init", "trained"])
def test_trace_ntk_is_a_symmetric_psd_gram_matrix_equal_to_the_by_hand_one(which, primer_net, trained_cnn, probe):
    net = copy.deepcopy(primer_net if which == "init" else trained_cnn)
    x, _ = probe
    K = empirical_ntk(net, x, kind="trace")
    assert torch.allclose(K, K.T, rtol=1e-4, atol=1e-5 * float(K.abs().max()))
    eigenvalues = torch.linalg.eigvalsh(K.double())
    assert float(eigenvalues.min()) >= -1e-4 * float(eigenvalues.max())
    K_hand = trace_ntk_by_hand(net, x)
    rel_diff = float((K - K_hand).abs().max() / K_hand.abs().max())
    assert rel_diff < 16 * torch.finfo(torch.float32).eps * count_parameters(net) ** 0.5


def test_fgsm_by_hand_is_the_package_fgsm(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors[0][:64], mnist_small[1].tensors[1][:64]
    assert float((fgsm_by_hand(trained_cnn, x, y, 0.1) - ntklab.attacks.fgsm(trained_cnn, x, y, eps=0.1)).abs().max()) < 1e-5


def test_attacks_stay_within_eps_and_in_range_over_the_chapters_sweep(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors[0][:64], mnist_small[1].tensors[1][:64]
    for eps in EPS_GRID:
        for x_adv in (ntklab.attacks.fgsm(trained_cnn, x, y, eps=eps),
                      ntklab.attacks.pgd(trained_cnn, x, y, eps=eps, alpha=max(eps / 4, 1e-8), steps=10)):
            assert float((x_adv - x).abs().max()) <= eps + 1e-6
            assert x_adv.min() >= 0 and x_adv.max() <= 1
            if eps == 0:
                assert torch.equal(x_adv, x)                 # both curves start at the clean accuracy


def test_the_bn_exercise_vmap_refuses_train_mode_and_one_image_has_a_variance(primer_net, probe):
    """The solution of ex-primer-bn: in train mode torch.func refuses the in-place update of the
    running statistics; one image alone is no problem for BatchNorm2d (statistics over N x H x W)."""
    net = copy.deepcopy(primer_net).train()
    x, _ = probe
    with pytest.raises(RuntimeError, match="in-place operation"):
        trace_ntk_by_hand_train(net, x[:4])
    out = net(x[:1])                                      # a one-image batch in train mode is fine
    assert torch.isfinite(out).all()
    for m in ntklab.bn.bn_layers(net):
        m.track_running_stats = False                     # no running update: it runs, another function
    K = trace_ntk_by_hand_train(net, x[:4])
    assert torch.isfinite(K).all() and K.shape == (4, 4)


def trace_ntk_by_hand_train(net, x):
    """``trace_ntk_by_hand`` without its switch to eval mode (the exercise)."""
    params = {name: p.detach() for name, p in net.named_parameters()}

    def f(p, xi):
        return functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return sum(torch.einsum("iap,jap->ij", J.flatten(2), J.flatten(2)) for J in jac.values())


# ------------------------------------------------------------------ statistics, against numpy
def test_within_over_between_against_a_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    K = torch.rand(6, 6, generator=g)
    same = [K[i, j] for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]]
    other = [K[i, j] for i in range(6) for j in range(6) if labels[i] != labels[j]]
    expected = float(sum(same) / len(same) / (sum(other) / len(other)))
    assert primer.within_over_between(K, labels) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        primer.within_over_between(K, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="n, n"):
        primer.within_over_between(K[:5], labels)


def _random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return A @ A.T + 0.5


def test_normalise_kernel_and_pixel_gram_against_numpy():
    K = _random_psd(7, 0)
    k = K.numpy()
    expected = k / np.sqrt(np.outer(np.diag(k), np.diag(k)))
    assert np.allclose(primer.normalise_kernel(K).numpy(), expected)
    assert np.allclose(np.diag(primer.normalise_kernel(K).numpy()), 1)
    with pytest.raises(ValueError, match="positive diagonal"):
        primer.normalise_kernel(torch.zeros(3, 3))
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    X = x.reshape(5, -1).numpy().astype(np.float64)
    assert np.allclose(primer.pixel_gram(x).numpy(), X @ X.T)
    cos = X @ X.T / np.outer(np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=1))
    assert np.allclose(primer.normalise_kernel(primer.pixel_gram(x)).numpy(), cos)


def test_pair_correlation_against_numpy():
    A, B = _random_psd(9, 2), _random_psd(9, 3)
    iu = np.triu_indices(9, 1)
    expected = np.corrcoef(A.numpy()[iu], B.numpy()[iu])[0, 1]
    assert primer.pair_correlation(A, B) == pytest.approx(expected, rel=1e-9)
    # scale and a constant offset do not matter; the diagonal does not enter
    assert primer.pair_correlation(3 * A + 7, B + torch.eye(9) * 100) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="equal shapes"):
        primer.pair_correlation(A, B[:8, :8])


def test_bootstrap_pair_correlations_against_a_loop():
    n, n_boot = 8, 25
    A, B, C = _random_psd(n, 4), _random_psd(n, 5), _random_psd(n, 6)
    boot = primer.bootstrap_pair_correlations({"ab": (A, B), "ac": (A, C)}, n_boot=n_boot, seed=3)
    assert boot.shape == (n_boot, 2)
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(3)).numpy()
    for r in range(n_boot):
        pos = [(p, q) for p in range(n) for q in range(p + 1, n) if idx[r, p] != idx[r, q]]
        for c, M in enumerate((B, C)):
            u = [float(A[idx[r, p], idx[r, q]]) for p, q in pos]
            v = [float(M[idx[r, p], idx[r, q]]) for p, q in pos]
            assert float(boot[r, c]) == pytest.approx(np.corrcoef(u, v)[0, 1], rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="same n"):
        primer.bootstrap_pair_correlations({"ab": (A, B[:7, :7])})


def test_bootstrap_se_is_of_the_size_of_the_spread_over_independent_probes():
    """Independent check of the bootstrap SE: correlations of two noisy copies of one similarity
    over many independent probe sets spread as the bootstrap of one probe set says (within 2x)."""
    g = torch.Generator().manual_seed(0)

    def probe_pair(n=40):
        z = torch.randn(n, 5, generator=g, dtype=torch.float64)
        K1 = z @ z.T + 0.5 * torch.randn(n, 40, generator=g, dtype=torch.float64) @ torch.randn(40, n, generator=g, dtype=torch.float64) / 40
        return K1 + K1.T, z @ z.T
    spread = np.std([primer.pair_correlation(*probe_pair()) for _ in range(60)])
    se = float(primer.bootstrap_pair_correlations({"x": probe_pair()}, n_boot=400)[:, 0].std())
    assert 0.5 * spread < se < 2 * spread


def test_perturbation_fractions():
    eps = 0.1
    delta = torch.tensor([0.1, 0.1, 0.0, -0.1, 0.05, 0.0, 0.1, 0.0])
    assert primer.perturbation_fractions(delta, eps) == pytest.approx(
        {"plus": 3 / 8, "zero": 3 / 8, "minus": 1 / 8, "other": 1 / 8})
    with pytest.raises(ValueError, match="eps positive"):
        primer.perturbation_fractions(delta, 0.0)


# ------------------------------------------------------------------ analyse
def _values(K_init, K_trained, labels, probe_x, K_default=None, n_test=200):
    """Accuracies of the sweep (0.9 clean) as correctness rows over n_test images."""
    acc_fgsm = [0.9, 0.85, 0.75, 0.6, 0.45, 0.3, 0.1]
    acc_pgd = [0.9, 0.84, 0.7, 0.5, 0.3, 0.1, 0.0]

    def rows(accs):                 # image j correct while j < acc * n: nested, like a real sweep
        return torch.stack([torch.arange(n_test) < round(a * n_test) for a in accs])
    delta = torch.tensor([0.1, 0.1, 0.0, -0.1, 0.03])
    return {"K_init": K_init, "K_default": K_init if K_default is None else K_default, "K_trained": K_trained,
            "probe_x": probe_x, "labels": labels, "clean_acc": 0.9, "fgsm_delta": delta, "eps": EPS_GRID,
            "correct_fgsm": rows(acc_fgsm), "correct_pgd": rows(acc_pgd)}


KEYS = {"ratio_init", "ratio_trained", "scale_growth", "kd_default", "kd_default_centred", "default_scale",
        "class_corr_init", "class_corr_trained", "class_corr_pixels", "class_corr_gain", "class_corr_gain_se",
        "class_corr_gain_low", "pixel_corr_init", "pixel_corr_trained", "pixel_corr_default", "pixel_corr_shuffled",
        "pixel_corr_init_se", "pixel_corr_init_low", "pixel_corr_change", "pixel_corr_change_se",
        "pixel_corr_change_high",
        "fgsm_plus", "fgsm_zero", "fgsm_minus", "fgsm_other", "clean_acc", "clean_acc_se", "n_test", "attack_eps",
        "fgsm_at_attack_eps", "pgd_at_attack_eps", "fgsm_cost", "fgsm_cost_se", "pgd_excess", "pgd_excess_se",
        "max_eps", "fgsm_at_max_eps", "pgd_at_max_eps"}


def test_analyse_on_real_kernels(primer_net, trained_cnn, probe, mnist_small):
    x, labels = probe
    start = ntklab.bn.refresh_bn_statistics(primer_net, mnist_small[0].tensors[0], batch_size=128)
    K_default = empirical_ntk(primer_net, x, kind="trace")
    K_init, K_trained = empirical_ntk(start, x, kind="trace"), empirical_ntk(trained_cnn, x, kind="trace")
    a = primer.analyse(_values(K_init, K_trained, labels, x, K_default=K_default), n_boot=200)
    assert set(a) == KEYS
    assert all(isinstance(v, float) for v in a.values())
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    assert a["ratio_trained"] == pytest.approx(float(K_trained[same].mean() / K_trained[labels[:, None] != labels[None, :]].mean()))
    N = primer.normalise_kernel(K_trained.double())
    iu = np.triu_indices(len(labels), 1)
    same_np = (labels[:, None] == labels[None, :]).numpy().astype(float)
    assert a["class_corr_trained"] == pytest.approx(np.corrcoef(N.numpy()[iu], same_np[iu])[0, 1], rel=1e-9)
    assert a["class_corr_gain"] == pytest.approx(a["class_corr_trained"] - a["class_corr_init"])
    assert a["class_corr_gain_low"] == pytest.approx(a["class_corr_gain"] - 2 * a["class_corr_gain_se"])
    assert a["pixel_corr_init_low"] == pytest.approx(a["pixel_corr_init"] - 2 * a["pixel_corr_init_se"])
    # the statistics pass changes the kernel (the chapter reports by how much)
    assert a["kd_default"] > 0 and a["default_scale"] != pytest.approx(1.0)
    # the trained network's kernel has the class structure the chapter shows; shuffled pairs do not
    assert a["class_corr_trained"] > a["class_corr_init"]
    assert abs(a["pixel_corr_shuffled"]) < 0.1 < a["pixel_corr_init"]
    assert a["fgsm_cost"] == pytest.approx(0.9 - 0.6) and a["pgd_at_attack_eps"] == 0.5
    assert a["pgd_excess"] == pytest.approx(-0.01) and (a["max_eps"], a["pgd_at_max_eps"]) == (0.3, 0.0)
    # nested rows: 0.01 of the images differ between PGD and FGSM at eps 0.02
    assert a["pgd_excess_se"] == pytest.approx(math.sqrt(0.01 * 0.99 / 200))
    assert a["clean_acc_se"] == pytest.approx(math.sqrt(0.9 * 0.1 / 200))
    assert (a["fgsm_plus"], a["fgsm_zero"], a["fgsm_minus"], a["fgsm_other"]) == pytest.approx((0.4, 0.2, 0.2, 0.2))


def test_analyse_refuses_inconsistent_values():
    K, labels = torch.eye(4) + 1, torch.tensor([0, 0, 1, 1])
    values = _values(K, K, labels, torch.rand(4, 1, 3, 3))
    with pytest.raises(ValueError, match="one row per eps"):
        primer.analyse({**values, "correct_pgd": values["correct_pgd"][:-1]})
    with pytest.raises(ValueError, match="0.1"):
        primer.analyse({**values, "eps": [e + 0.01 for e in EPS_GRID]})


def test_raw_and_normalised_kernels_figure(probe):
    import matplotlib.pyplot as plt
    _, labels = probe
    K1, K2 = _random_psd(50, 7), _random_psd(50, 8) * 100
    axes = ntklab.plots.raw_and_normalised_kernels({"a": K1, "b": K2}, labels, titles={"a": "A raw"})
    assert axes.shape == (2, 2) and axes[0, 0].get_title() == "A raw" and axes[1, 1].get_title() == "b, normalised"
    assert axes[1, 0].images[-1].get_clim() == axes[1, 1].images[-1].get_clim()
    assert axes[1, 0].images[-1].get_clim()[1] == 1.0
    with pytest.raises(ValueError, match="positive diagonal"):
        ntklab.plots.raw_and_normalised_kernels({"z": torch.zeros(3, 3)})
    plt.close("all")


# ------------------------------------------------------------------ claims
GOOD = {**{k: 0.0 for k in KEYS},
        "class_corr_init": 0.2, "class_corr_trained": 0.45, "class_corr_gain": 0.25, "class_corr_gain_se": 0.05,
        "class_corr_gain_low": 0.15, "pixel_corr_init": 0.5, "pixel_corr_init_se": 0.05, "pixel_corr_init_low": 0.4,
        "pixel_corr_shuffled": 0.0, "pixel_corr_change": 0.1, "pixel_corr_change_high": 0.2, "clean_acc": 0.95, "attack_eps": 0.1, "fgsm_at_attack_eps": 0.5,
        "pgd_at_attack_eps": 0.3, "fgsm_cost": 0.45, "pgd_excess": -0.01, "max_eps": 0.3}


CONTROLS = {
    "kernel_reshaped": set_at("class_corr_gain_low", -0.01),     # a gain within two SE of zero
    "pixel_similarity": set_at("pixel_corr_init_low", 0.3),      # the bound is strict
    "pixel_kept": set_at("pixel_corr_change_high", -0.05),       # a fall by more than two SE
    "clean_acc": set_at("clean_acc", 0.8),                       # the bound is strict
    "fgsm_cost": set_at("fgsm_cost", 0.15),
    "pgd_stronger": set_at("pgd_excess", 0.02),
}


OBSERVATIONS = {"pixel_similarity", "pixel_kept"}     # shown in the table, asserted under no profile


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_claims_negative_controls(profile):
    assert_negative_controls(primer.claims, GOOD, CONTROLS, profile=profile)


def test_claims_asserted_under_every_profile_and_edges():
    claims = primer.claims(GOOD, "paper")
    real = [p for p, prof in ntklab.config.PROFILES.items() if prof.dataset not in ntklab.data.SYNTHETIC]
    assert "quick" in real and "paper" in real and "paper_cpu" not in real
    assert all(c.asserted_under(p) for c in claims for p in real if c.key not in OBSERVATIONS)
    # the paper-shaped dry run on synthetic data asserts nothing
    assert not any(c.asserted_under("paper_cpu") for c in claims)
    assert not any(c.asserted_under(p) for c in claims for p in ntklab.config.PROFILES if c.key in OBSERVATIONS)
    edge = {c.key: c.holds for c in primer.claims({**GOOD, "pgd_excess": 0.01, "class_corr_gain_low": 0.0}, "quick")}
    assert edge["pgd_stronger"] is True and edge["kernel_reshaped"] is False


def test_primer_registers_no_experiment():
    assert "primer" not in experiments.EXPERIMENTS
    assert all(fn.__module__ != primer.__name__ for fn in experiments.EXPERIMENTS.values())
