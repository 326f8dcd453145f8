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
    assert box.grid.value == "s = 3: loses 0.01<br><b>s = 4: loses 0.05</b>"
    past = widgets.switch_explorer([1.0, 0.5, 0.3], cap=2, outcomes={2: "a", 3: "b"})   # the grid runs past the cap
    assert past.grid.value == "<b>s = 2: a</b><br>s = 3: b (past the cap)"
    spans = []
    real = plt.Axes.axvspan
    plt.Axes.axvspan = lambda self, a, b, **kw: spans.append(a - 0.5) or real(self, a, b, **kw)
    try:
        slider.value = 0.4   # 0.3 <= 0.4 in epoch 3 (1-based): 3 normal epochs, AT from epoch 4
        assert box.summary.value == "switch after epoch 3: loses 0.01"
        assert box.grid.value == "<b>s = 3: loses 0.01</b><br>s = 4: loses 0.05"
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


# --- recomputing widgets (issue 21) ---
def _full_ntk_by_hand(net, x1, x2):
    """Theta[i, j, a, b] = <d f_a(x1_i)/d theta, d f_b(x2_j)/d theta>, from per-example Jacobians."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def jac(x):
        J = jacrev(lambda p: functional_call(net, (p, buffers), (x,)))(params)
        return torch.cat([v.flatten(2) for v in J.values()], dim=2)   # (n, k, P)

    J1, J2 = jac(x1), jac(x2)
    return torch.einsum("iap,jbp->ijab", J1, J2)


def test_kernel_change_explorer_recomputes_the_kernel_for_the_chosen_eps(mnist_small):
    import copy

    from ntklab.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(width=4, activation="gelu", pool="avg").eval()      # smooth: Theorem 1's setting
    X = mnist_small[1].tensors[0][:3]
    box = widgets.kernel_change_explorer({"smooth": net}, X, eps=1e-2)
    network, eps_slider, draw_slider = box.children[0].children
    first = box.summary.value
    assert [p[:2] for p in box.points["smooth"]] == [(pytest.approx(1e-2), 0)]
    eps_slider.value = 1e-3
    assert box.summary.value != first and "eps 1.0e-03, draw 0" in box.summary.value
    (e1, _, r1, a1), (e2, _, r2, a2) = box.points["smooth"]
    # independent: the kernel change from per-example Jacobians, same signs
    net64, X64 = copy.deepcopy(net).double().eval(), X.double()
    signs = torch.randint(0, 2, X64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    K0 = _full_ntk_by_hand(net64, X64, X64)
    Kp = _full_ntk_by_hand(net64, X64 + 1e-3 * signs, X64)
    Km = _full_ntk_by_hand(net64, X64 - 1e-3 * signs, X64)
    assert r2 == pytest.approx(float((Kp - K0).norm() / K0.norm()), rel=1e-6)
    assert a2 == pytest.approx(float(((Kp + Km) / 2 - K0).norm() / K0.norm()), rel=1e-5)
    # Theorem 1's orders: a tenth of the eps, a tenth of one draw's change, a hundredth of the antithetic's
    assert 0.05 < r2 / r1 < 0.2 and a2 / a1 < 0.03
    draw_slider.value = 3                                               # new signs, same eps
    assert box.points["smooth"][-1][1] == 3 and box.points["smooth"][-1][2] != pytest.approx(r2, rel=1e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        widgets.sign_kernel_change(net, X, 0.0)
    with pytest.raises(ValueError, match="nets must name at least one network"):
        widgets.kernel_change_explorer({}, X)


def _first_layer_gap_by_hand(net, batch, X):
    """Theorem 2's statistics gap of the first BN layer (RMS over channels of the standardised mean
    gap plus that of the variance gap), from the layer's inputs read with a hook: its input does
    not depend on any BN layer, so mode and statistics do not matter."""
    from ntklab.bn import bn_layers

    first = bn_layers(net)[0]
    seen = []
    hook = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].double()))
    try:
        with torch.no_grad():
            net.eval()
            net(batch)
            net(X)
    finally:
        hook.remove()
    h_b, h_all = seen
    mu_b, var_b = h_b.mean((0, 2, 3)), h_b.var((0, 2, 3), unbiased=False)
    mu, var = h_all.mean((0, 2, 3)), h_all.var((0, 2, 3), unbiased=False)
    return float(((mu_b - mu) / var.sqrt()).pow(2).mean().sqrt() + ((var_b - var) / (2 * var)).pow(2).mean().sqrt())


def test_batch_statistics_explorer_recomputes_gap_and_kernel_error_for_the_chosen_size(trained_cnn, mnist_small):
    import copy

    net = copy.deepcopy(trained_cnn)
    X, y = mnist_small[0].tensors
    probe = mnist_small[1].tensors[0][:4]

    def shift(model, xb, yb):                                  # a stand-in attack: a bias no batch size removes
        return (xb + 0.3).clamp(0, 1)

    box = widgets.batch_statistics_explorer(net, X, probe, sizes=(8, 64, 256), n_batches=2, y=y, attack=shift)
    size, draw_slider, adversarial = box.children[0].children
    assert size.value == 64 and [b["size"] for b in box.batches] == [64, 64]
    first = box.summary.value
    size.value = 8
    assert box.summary.value != first and "clean batches of 8" in box.summary.value
    small = [b["gap"] for b in box.batches if b["size"] == 8]
    size.value = 256
    large = [b["gap"] for b in box.batches if b["size"] == 256]
    assert max(large) < min(small)                             # the gap shrinks as the batch grows
    adversarial.value = True
    shifted = [b for b in box.batches if b["source"] == "adversarial"]
    assert [b["size"] for b in shifted] == [256, 256] and min(b["gap"] for b in shifted) > 3 * max(large)
    # independent: the first layer's gap by hand for the batch the widget drew (seed 1000 b + draw)
    r = widgets.batch_statistics_errors(net, X, probe, 8, n_batches=1, seed=1000 * 8)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(1000 * 8))[:8]
    assert r["gap"][0] == pytest.approx(small[0])
    assert r["layers"][0][0] == pytest.approx(_first_layer_gap_by_hand(net, X[idx], X), rel=1e-6)
    assert r["gap"][0] == pytest.approx(sum(r["layers"][0]))
    # the whole pool as one batch has the data set's statistics: no gap, the same kernel
    whole = widgets.batch_statistics_errors(net, X, probe, len(X), n_batches=1)
    assert whole["gap"][0] < 1e-6 and whole["error"][0] < 1e-4
    with pytest.raises(ValueError, match="batch_size must be at most len"):
        widgets.batch_statistics_errors(net, X, probe, len(X) + 1)
    with pytest.raises(ValueError, match="sizes must be batch sizes"):
        widgets.batch_statistics_explorer(net, X, probe, sizes=(1,))


def test_noise_explorer_recomputes_the_noise_spectrum_for_the_chosen_floor(trained_cnn, mnist_small):
    import math

    import numpy as np

    from ntklab import attacks

    X = mnist_small[0].tensors[0]
    basis = attacks.pca_noise_basis(X)
    box = widgets.noise_explorer(trained_cnn, X, 0.3, basis=basis, n=300,
                                 marks={"pca_floor": (1.0, 0.5, "trained: collapsed in 0 of 1")})
    scale, floor = box.children[0].children
    first = box.summary.value
    assert first.startswith("scale 1.00, floor 0.00") and "trained" not in first
    floor.value = 0.5
    assert box.summary.value != first and "trained: collapsed in 0 of 1" in box.summary.value
    erank = lambda text: float(text.split("effective rank ")[1].split(" ")[0])
    assert erank(box.summary.value) > erank(first)             # the isotropic floor spreads the spectrum
    # independent: the statistics from the drawn starts by hand
    for f in (0.0, 0.5):
        r = widgets.noise_start_statistics(trained_cnn, X, 0.3, basis=basis, floor=f, n=300)
        flat = r["delta"].flatten(1).double().numpy()
        lam = np.clip(np.linalg.eigvalsh(flat.T @ flat / 300), 0, None)
        p = lam[lam > 0] / lam.sum()
        assert r["erank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert r["rms"] == pytest.approx(float(np.sqrt((flat ** 2).mean())) / 0.3, rel=1e-6)
        assert np.abs(flat).max() <= 0.3 + 1e-6                # the start stays in the eps-ball
        constant = (X.flatten(1).std(0) == 0).numpy()          # pixels the data never change
        assert constant.any()
        on_constant = np.abs(flat[:, constant]).max()
        assert on_constant < 1e-5 if f == 0 else on_constant > 0.01   # data-shaped noise leaves them alone
    scale.value = 3.0                                          # large scale: the eps-ball clips more pixels
    clipped = lambda text: float(text.split("eps, ")[1].split("%")[0])
    assert clipped(box.summary.value) > 0
    with pytest.raises(ValueError, match="eps must be at most 0.5"):
        widgets.noise_start_statistics(trained_cnn, X, 0.6, basis=basis)


def test_cost_explorer_recomputes_the_projection_for_the_chosen_device_and_gpus():
    """Chapter 9's explorer: every slider move recomputes ntklab.plan.project on scaled costs; checked
    against hours computed by hand from the plan's image-passes, kernels and AutoAttack images."""
    from ntklab import plan

    runs = [plan.PlannedRun("a", "one", 2, 100, 3.0, eval_passes=40.0, kernel_images=(500, 250), autoattack_images=10),
            plan.PlannedRun("b", "two", 1, 50, 1.0)]
    costs = {"seconds_per_pass": 0.36, "kernel_500_seconds": 720.0, "autoattack_seconds_per_image": 36.0}
    by_hand = {"a": (640 * 0.36 + (1 + 0.25) * 720 + 10 * 36) / 3600, "b": 50 * 0.36 / 3600}
    assert widgets.cost_projection(runs, costs) == pytest.approx(by_hand)
    assert widgets.cost_projection(runs, costs, speedup=10, gpus=4, efficiency=0.5) == \
        pytest.approx({k: v / 10 / 2 for k, v in by_hand.items()})
    box = widgets.cost_explorer(runs, costs)
    speed, gpus, eff = box.controls
    first = box.summary.value
    assert f"total {sum(by_hand.values()):.3g} wall hours" in first
    speed.value = 100.0
    gpus.value = 8
    assert box.summary.value != first
    expected = sum(by_hand.values()) / 100 / (8 * eff.value)
    assert f"total {expected:.3g} wall hours" in box.summary.value
    for bad in ({"speedup": 0}, {"gpus": 0}, {"efficiency": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            widgets.cost_projection(runs, costs, **bad)
