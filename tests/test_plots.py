import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ntklab import plots  # noqa: E402


def test_kernel_heatmap_draws_class_lines_and_checks_shapes():
    K = torch.eye(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    fig, ax = plt.subplots()
    plots.kernel_heatmap(K, labels, ax=ax, title="K")
    assert len(ax.lines) == 4  # two boundaries, horizontal and vertical
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="square"):
        plots.kernel_heatmap(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        plots.kernel_heatmap(K, labels[:5])
    plt.close("all")


def test_image_grid_signed_rows_use_a_symmetric_scale():
    images = torch.rand(4, 1, 8, 8)
    images[2:] -= 0.5
    fig = plots.image_grid(images, nrow=2, signed=[False, False, True, True], titles=list("abcd"))
    axes = fig.get_axes()
    assert len(axes) == 4
    lo, hi = axes[3].images[0].get_clim()
    assert lo == pytest.approx(-hi) and hi == pytest.approx(float(images[2:].abs().max()))
    assert axes[0].images[0].get_clim() == (0, 1.0)
    with pytest.raises(ValueError, match="one flag per image"):
        plots.image_grid(images, signed=[True])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        plots.image_grid(np.zeros((3, 8, 8)))
    plt.close("all")


def test_accuracy_curves():
    ax = plots.accuracy_curves([0, 0.1], {"a": [1.0, 0.5], "b": [1.0, 0.2]})
    assert len(ax.lines) == 2 and ax.get_legend() is not None
    plt.close("all")


def test_loglog_curves_floor_slopes_mark_and_checks():
    fig, ax = plt.subplots()
    x = [1e-3, 1e-2, 1e-1]
    plots.loglog_curves(x, {"a": [1e-6, 1e-4, 1e-2], "zero": [0.0, 0.0, 0.0]}, slopes={"a": 2.0}, mark=0.05,
                        mark_label="training eps", ax=ax, styles={"a": {"lw": 3}})
    a, zero, mark = ax.lines
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    np.testing.assert_allclose(a.get_ydata(), [1e-6, 1e-4, 1e-2])
    np.testing.assert_allclose(zero.get_ydata(), [1e-17] * 3)          # exact zeros drawn at the floor
    assert a.get_linewidth() == 3 and np.allclose(mark.get_xdata(), 0.05)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a (slope 2.00)", "zero", "training eps"]
    with pytest.raises(ValueError, match="x must be a 1-D array of positive values"):
        plots.loglog_curves([0.0, 1.0], {"a": [1, 2]}, ax=ax)
    with pytest.raises(ValueError, match=r"curve 'a' has \(2,\) values, x has \(3,\)"):
        plots.loglog_curves(x, {"a": [1, 2]}, ax=ax)
    plt.close("all")


def test_eigenvalue_spectra_normalises_sorts_and_checks():
    fig, ax = plt.subplots()
    K = np.diag([4.0, 2.0, 1.0, 1.0, 0.0])
    plots.eigenvalue_spectra({"kernel": K, "values": np.array([1.0, 3.0, -1.0])}, ax=ax, title="s")
    first, second = ax.lines
    np.testing.assert_allclose(first.get_ydata(), [0.5, 0.25, 0.125, 0.125])  # zero eigenvalue left out
    np.testing.assert_allclose(first.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(second.get_ydata(), [0.75, 0.25])              # negative one left out
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_title() == "s"
    plots.eigenvalue_spectra({"top": K}, ax=ax, top=2)
    assert len(ax.lines[-1].get_ydata()) == 2
    with pytest.raises(ValueError, match="at least one"):
        plots.eigenvalue_spectra({})
    with pytest.raises(ValueError, match="square"):
        plots.eigenvalue_spectra({"bad": np.ones((2, 3))})
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        plots.eigenvalue_spectra({"zero": np.zeros(3)})
    plt.close("all")


def test_kernel_curves_marks_decays_and_skips_missing_values():
    fig, ax = plt.subplots()
    plots.kernel_curves([1, 2, 3], {"a": [0.3, None, 0.1], "b": [0.2, 0.1, 0.05]}, ax=ax, decays=[2, 2.5],
                        logy=True, ylabel="velocity", styles={"b": {"ls": "--"}})
    lines = ax.get_lines()
    assert len(lines) == 4 and ax.get_yscale() == "log"   # two curves, two decay lines
    assert np.isnan(lines[0].get_ydata()[1]) and lines[1].get_linestyle() == "--"
    assert [ln.get_xdata()[0] for ln in lines[2:]] == [2, 2.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "lr decay"]
    with pytest.raises(ValueError, match="curve 'a' has 2 values for 3 x values"):
        plots.kernel_curves([1, 2, 3], {"a": [0.1, 0.2]})
    plt.close("all")


def test_distance_matrix():
    D = np.abs(np.subtract.outer(np.arange(21.0), np.arange(21.0)))
    fig, ax = plt.subplots()
    plots.distance_matrix(D, list(range(21)), ax=ax, title="D")
    assert ax.images[0].get_array().shape == (21, 21)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(0, 21, 2)]
    with pytest.raises(ValueError, match="square"):
        plots.distance_matrix(np.ones((2, 3)))
    with pytest.raises(ValueError, match="one entry per row"):
        plots.distance_matrix(D, [0, 1])
    plt.close("all")


# --- chapter 7 ---
def test_pgd_attack_and_adversarial_grid():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    attack = plots.pgd_attack(steps=3)
    x_adv = attack(net, x, y, 0.1)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and torch.equal(attack(net, x, y, 0.0), x)
    with pytest.raises(ValueError, match="steps"):
        plots.pgd_attack(steps=0)
    fig = plots.adversarial_grid(net, x, y, eps=0.5, steps=3, names={0: "a", 1: "b", 2: "c"}, model_name="net")
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 15 and titles[0].startswith("net: ") and titles[5].startswith("PGD: ")
    assert titles[10] == "perturbation" and "of 5 predictions" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="labels"):
        plots.adversarial_grid(net, x, y[:3], eps=0.1)
    plt.close("all")


def test_centred_ks_plot_draws_an_interval_that_misses_its_estimate():
    """A percentile bootstrap interval need not contain the point estimate (a tiny, degenerate
    sample, as under smoke): the chapter 3 figure draws it, bars stopping at the point."""
    ks = {"centred": {"a": 0.2, "b": 0.5}, "low": {"a": 0.25, "b": 0.4}, "high": {"a": 0.3, "b": 0.45}}
    analysis = {"ks": {"clean": ks, "ae": ks}, "robust": {"a": 0.1, "b": 0.6}}
    axes = plots.centred_ks_against_robustness(analysis)
    assert len(axes) == 2 and all(ax.get_title() for ax in axes)
    plt.close("all")
