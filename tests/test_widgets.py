import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from ntklab import widgets  # noqa: E402


def test_attack_explorer_redraws_with_the_chosen_eps(trained_cnn, mnist_small):
    x, y = mnist_small[1].tensors[0][:5], mnist_small[1].tensors[1][:5]
    calls = []

    def attack(model, xb, yb, eps):
        calls.append((xb.shape, eps))
        return (xb + eps).clamp(0, 1)

    box = widgets.attack_explorer(trained_cnn, x, y, attack, eps_max=0.3)
    eps_slider, index_slider = box.children[0].children
    assert calls == [((1, 1, 28, 28), pytest.approx(0.1))]
    eps_slider.value = 0.2
    index_slider.value = 3
    assert [c[1] for c in calls][-2:] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert index_slider.max == 4 and eps_slider.max == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) and labels \(N,\)"):
        widgets.attack_explorer(trained_cnn, x[0], y, attack)


def test_choice_explorer_redraws_with_every_choice():
    calls = []
    box = widgets.choice_explorer(lambda ax, network, kind: calls.append((network, kind)),
                                  {"network": ["a", "b"], "kind": ["all", "pgd"]})
    network_menu, kind_menu = box.children[0].children
    assert calls == [("a", "all")]
    network_menu.value = "b"
    kind_menu.value = "pgd"
    assert calls[-2:] == [("b", "all"), ("b", "pgd")]
    with pytest.raises(ValueError, match="options must map each name to a non-empty list"):
        widgets.choice_explorer(lambda ax, network: None, {"network": []})


def test_spectrum_explorer_redraws_for_the_chosen_epoch(monkeypatch):
    from ntklab import plots

    drawn = []
    real = plots.eigenvalue_spectra
    monkeypatch.setattr(plots, "eigenvalue_spectra", lambda spectra, **kw: (drawn.append(list(spectra)),
                                                                            real(spectra, **kw))[1])
    A = torch.randn(3, 6, 6)
    kernels = {"a": A @ A.transpose(1, 2), "b": A @ A.transpose(1, 2) + torch.eye(6)}
    box = widgets.spectrum_explorer(kernels, [0, 2, 4], q=2)
    slider = box.children[0]
    assert slider.value == 4 and len(drawn) == 2 and len(drawn[0]) == 2        # epochs 0 and 4, per kernel
    assert drawn[0][0].startswith("epoch 0: erank") and drawn[0][1].startswith("epoch 4: erank")
    slider.value = 0
    assert len(drawn) == 4 and len(drawn[-1]) == 1                            # the first epoch alone
    with pytest.raises(ValueError, match="one snapshot per epoch"):
        widgets.spectrum_explorer(kernels, [0, 1])
