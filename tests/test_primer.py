"""Chapter 1 (Primer): ``analyse`` and ``claims`` of ``ntklab.experiments.primer``, and the facts
the chapter relies on that hold by construction (a symmetric PSD kernel, the by-hand kernel and FGSM
equal to the package's, adversarial examples within eps and in [0, 1])."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

import ntklab
from ntklab import experiments
from ntklab.experiments import primer
from ntklab.models import SmallCNN, count_parameters
from ntklab.ntk import empirical_ntk

from claim_controls import assert_negative_controls

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
    """30 test images, 3 per class, sorted by class, as in the chapter."""
    p = ntklab.data.subset(mnist_small[1], 30, seed=0)
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


# ------------------------------------------------------------------ analyse
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


def _values(K_init, K_trained, labels):
    return {"K_init": K_init, "K_trained": K_trained, "labels": labels, "clean_acc": 0.9, "eps": EPS_GRID,
            "acc_fgsm": [0.9, 0.85, 0.75, 0.6, 0.45, 0.3, 0.1], "acc_pgd": [0.9, 0.84, 0.7, 0.5, 0.3, 0.1, 0.0]}


def test_analyse_on_real_kernels(primer_net, trained_cnn, probe):
    x, labels = probe
    K_init, K_trained = empirical_ntk(primer_net, x, kind="trace"), empirical_ntk(trained_cnn, x, kind="trace")
    a = primer.analyse(_values(K_init, K_trained, labels))
    assert set(a) == {"ratio_init", "ratio_trained", "ratio_gain", "scale_growth", "clean_acc", "attack_eps",
                      "fgsm_at_attack_eps", "pgd_at_attack_eps", "fgsm_cost", "pgd_excess", "max_eps",
                      "fgsm_at_max_eps", "pgd_at_max_eps"}
    assert all(isinstance(v, float) for v in a.values())
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    assert a["ratio_trained"] == pytest.approx(float(K_trained[same].mean() / K_trained[labels[:, None] != labels[None, :]].mean()))
    assert a["ratio_gain"] == pytest.approx(a["ratio_trained"] - a["ratio_init"])
    # the trained network's kernel has the class structure the chapter shows
    assert a["ratio_trained"] > a["ratio_init"]
    assert a["fgsm_cost"] == pytest.approx(0.9 - 0.6) and a["pgd_at_attack_eps"] == 0.5
    assert a["pgd_excess"] == pytest.approx(0.0) and (a["max_eps"], a["pgd_at_max_eps"]) == (0.3, 0.0)


def test_analyse_refuses_inconsistent_values():
    K, labels = torch.eye(4) + 1, torch.tensor([0, 0, 1, 1])
    values = _values(K, K, labels)
    with pytest.raises(ValueError, match="one entry per eps"):
        primer.analyse({**values, "acc_pgd": values["acc_pgd"][:-1]})
    with pytest.raises(ValueError, match="0.1"):
        primer.analyse({**values, "eps": [e + 0.01 for e in EPS_GRID]})


# ------------------------------------------------------------------ claims
GOOD = {"ratio_init": 1.1, "ratio_trained": 2.0, "ratio_gain": 0.9, "scale_growth": 50.0, "clean_acc": 0.95,
        "attack_eps": 0.1, "fgsm_at_attack_eps": 0.5, "pgd_at_attack_eps": 0.3, "fgsm_cost": 0.45,
        "pgd_excess": 0.0, "max_eps": 0.3, "fgsm_at_max_eps": 0.1, "pgd_at_max_eps": 0.0}


def _set(key, value):
    return lambda a: a.__setitem__(key, value)


CONTROLS = {
    "kernel_reshaped": _set("ratio_gain", -0.05),
    "clean_acc": _set("clean_acc", 0.8),                 # the bound is strict
    "fgsm_cost": _set("fgsm_cost", 0.15),
    "pgd_stronger": _set("pgd_excess", 0.02),
}


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_claims_negative_controls(profile):
    assert_negative_controls(primer.claims, GOOD, CONTROLS, profile=profile)


def test_claims_asserted_under_every_profile_and_edges():
    claims = primer.claims(GOOD, "paper")
    assert all(c.asserted_under(p) for c in claims for p in ntklab.config.PROFILES)
    edge = {c.key: c.holds for c in primer.claims({**GOOD, "pgd_excess": 0.01, "ratio_gain": 0.0}, "quick")}
    assert edge["pgd_stronger"] is True and edge["kernel_reshaped"] is False


def test_primer_registers_no_experiment():
    assert "primer" not in experiments.EXPERIMENTS
    assert all(fn.__module__ != primer.__name__ for fn in experiments.EXPERIMENTS.values())
