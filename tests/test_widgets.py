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


def test_kernel_explorer_shows_the_chosen_snapshot(monkeypatch):
    from ntklab import metrics, plots

    kernels = {"normal": torch.rand(3, 4, 4) + torch.eye(4), "pgd": torch.rand(3, 4, 4) + 2 * torch.eye(4)}
    shown = []
    monkeypatch.setattr(plots, "kernel_heatmap", lambda K, labels, ax, title: shown.append((K, title)))
    box = widgets.kernel_explorer(kernels, [0, 1, 2], labels=torch.tensor([0, 0, 1, 1]))
    run, index, centred = box.children[0].children
    K, title = shown[-1]
    assert title.startswith("normal, epoch 2") and abs(K.sum()) < 1e-9  # centred: rows sum to zero
    centred.value = False
    run.value = "pgd"
    index.value = 1
    K, title = shown[-1]
    assert torch.equal(torch.as_tensor(K), kernels["pgd"][1]) and title.startswith("pgd, epoch 1")
    assert f"{metrics.kernel_distance(kernels['pgd'][0], kernels['pgd'][1]):.4f}" in title
    with pytest.raises(ValueError, match=r"shape \(T=2, n, n\)"):
        widgets.kernel_explorer(kernels, [0, 1])


def test_switch_explorer_marks_the_epoch_autoswitch_chooses():
    import matplotlib.pyplot as plt

    box = widgets.switch_explorer([1.0, 0.5, 0.3, 0.15, 0.1, 0.1], cap=4, threshold=0.2,
                                  outcomes={3: "loses 0.01", 4: "loses 0.05"})
    slider = box.children[0]
    assert box.summary.value == "switch after epoch 4: loses 0.05"   # 0.15 <= 0.2 in epoch 4
    spans = []
    real = plt.Axes.axvspan
    plt.Axes.axvspan = lambda self, a, b, **kw: spans.append(a - 0.5) or real(self, a, b, **kw)
    try:
        slider.value = 0.4   # 0.3 <= 0.4 in epoch 3 (1-based): 3 normal epochs, AT from epoch 4
        assert box.summary.value == "switch after epoch 3: loses 0.01"
        slider.value = 0.05  # never lazy: the cap
    finally:
        plt.Axes.axvspan = real
    assert spans == [3, 4]
    box = widgets.switch_explorer([1.0, 0.5, 0.1], cap=2, threshold=0.2)
    assert box.summary.value == "switch after epoch 2: no run switched there"
    with pytest.raises(ValueError, match="cap"):
        widgets.switch_explorer([1.0, 0.5], cap=0)
    plt.close("all")


def test_phase_explorer_recomputes_the_phases_when_a_threshold_moves():
    curves = {"a": [1.0, 0.3, 0.2, 0.25, 0.6, 0.2], "b": [1.0, 0.5, 0.3, 0.3, 0.35, 0.3]}
    box = widgets.phase_explorer(curves, [1, 2, 3, 4, 5, 6], lazy_below=0.45, rise_above=1.7, decays=[4])
    run, low, high = box.children[0].children
    first = box.summary.value
    assert "kernel learning epochs 5-5" in first and "1 of 2" in first  # a's burst after the decay
    high.value = 3.0                                                     # the burst is below 3x the lazy level
    assert box.summary.value != first and "0 of 2" in box.summary.value
    assert "kernel learning epochs 5-5" not in box.summary.value
    low.value = 0.15                                                     # never lazy: one phase
    assert "<b>a</b>: kernel learning epochs 1-6<br>" in box.summary.value
    run.value = "b"
    assert box.summary.value.startswith("<b>b</b>")
    with pytest.raises(ValueError, match="one value per entry"):
        widgets.phase_explorer(curves, [1, 2], lazy_below=0.45, rise_above=1.7)
