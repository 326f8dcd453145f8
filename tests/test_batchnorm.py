"""Tests of the ``batchnorm`` experiment (chapter 3). ``evaluate.predict`` and ``craft``, the
batch-dependent evaluation it uses, are tested in test_evaluate.py."""
import copy
import dataclasses
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ntklab import experiments, plots  # noqa: E402
from ntklab.claims import check  # noqa: E402
from ntklab.config import get_profile  # noqa: E402
from ntklab.experiments import batchnorm  # noqa: E402
from ntklab.bn import bn_batch_statistics, using_bn_statistics  # noqa: E402

from claim_controls import assert_negative_controls, set_at as _set  # noqa: E402
from smoke_runs import rerun_from_cache, smoke_run  # noqa: E402


# ---------------------------------------------------------------- the experiment
@pytest.fixture(scope="module")
def batchnorm_run(tmp_path_factory):
    return smoke_run(tmp_path_factory, "batchnorm")


def test_batchnorm_result(batchnorm_run):
    """Properties of the code, whatever the run: the same initialisation, the normal models share
    their weights and history, robust accuracy never above clean accuracy (by definition: a unit
    test, not a claim)."""
    result, _, paths = batchnorm_run
    assert result["same_init"] is True
    assert result["models"] == list(batchnorm.MODEL_KEYS) == list(batchnorm.MODELS)
    # the normal model is trained and cached under "models" (normal without buffer has its weights);
    # the three PGD models are trained by the experiment itself
    assert [p.parent.name for p, how in paths if how == "computed"].count("models") == 1
    assert result["shared_weights"] == {"normal, without buffer": "normal, with buffer"}
    sizes = result["config"]["settings"]["test_batch_sizes"]
    n_probe = result["config"]["settings"]["n_ks"]
    for name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        with_buffer = batchnorm.MODELS[name][1] == "with buffer"
        # running: one row; batch statistics: per size, 2 (with buffer) or 3 crafting modes x 2 compositions
        assert len(rows) == (1 + 4 * len(sizes) if with_buffer else 4 * len(sizes) + 2)
        for r in rows:
            assert 0 <= r["robust"] <= r["clean"] <= 1
            assert (r["clean_next_to_adv"] is None) == (r["composition"] != "half")
            assert (r["correct"] is None) == (r["composition"] != "adversarial")
        assert 0 <= result["robust"][name] <= min(r["robust"] for r in rows
                                                  if r["test_bn"] == ("running" if with_buffer else "batch"))
        assert 0 <= result["autoattack"][name] <= 1 and result["robust"][name] <= result["autoattack"][name]
        n_aa = result["config"]["settings"]["n_aa" if name in batchnorm.AUTOATTACK_FULL else "n_aa_normal"]
        assert len(result["autoattack_correct"][name]) == n_aa
        assert result["autoattack"][name] == pytest.approx(sum(result["autoattack_correct"][name]) / n_aa)
        if with_buffer:     # per-example models: re-classifying changes nothing
            assert result["autoattack"][name] == result["autoattack_own"][name]
        assert all(isinstance(f, str) for f in result["autoattack_flags"][name])
        ks = result["ks"][name]
        assert len(ks["labels"]) == n_probe and ks["clean"].shape == ks["ae"].shape == (n_probe, n_probe, 10)
    # the same initialisation and data order with and without buffer: identical first (normal) epochs
    h = result["histories"]
    assert h["normal, with buffer"]["loss"] == h["normal, without buffer"]["loss"]
    switch = result["config"]["settings"]["switch_epoch"]
    pgd = [n for n in result["models"] if n.startswith("pgd")]
    assert all(h[n]["strategy"][:switch] == ["normal"] * switch and h[n]["strategy"][-1] == "pgd" for n in pgd)
    assert h[pgd[0]]["loss"][:switch] == h[pgd[1]]["loss"][:switch] == h[pgd[2]]["loss"][:switch]
    assert set(result["gradient"]) == {"dominated", "sign_agree"}
    assert all(0 <= v <= 1 for v in result["gradient"].values())


def test_analyse_on_a_smoke_run(batchnorm_run):
    result, _, _ = batchnorm_run
    a = batchnorm.analyse(result)
    sizes = result["config"]["settings"]["test_batch_sizes"]
    assert a["sizes"] == sizes and a["n_gradient"] == result["config"]["settings"]["n_gradient"]
    for key in ("self", "twin", "gap"):
        assert len(a["trap"][key]) == len(sizes)
    for key in ("batch_clean", "batch_robust", "robust_drop", "clean_move", "margin", "drop_se"):
        assert len(a["swap"][key]) == len(sizes)
    assert set(a["autoattack"]) == set(a["clean"]) == set(a["robust"]) == set(batchnorm.MODEL_KEYS.values())
    assert a["gradient"] == result["gradient"]
    # against an independent reading of the rows
    by = {(r["model"], r["test_bn"], r["craft"], r["composition"], r["batch_size"]): r for r in result["rows"]}
    gap = min(by["normal, without buffer", "batch", "self", "adversarial", b]["robust"]
              - by["normal, without buffer", "batch", "twin", "adversarial", b]["robust"] for b in sizes)
    assert a["trap"]["gap_min"] == pytest.approx(gap)
    run = by["pgd, with buffer", "running", "self", "adversarial", sizes[0]]
    # the swap compares identical examples: the twin's (for a model with buffer: its own running ones)
    margin = min(run["robust"] - by["pgd, with buffer", "batch", "twin", "adversarial", b]["robust"]
                 - abs(by["pgd, with buffer", "batch", "twin", "adversarial", b]["clean"] - run["clean"])
                 for b in sizes)
    assert a["swap"]["margin_min"] == pytest.approx(margin)
    w, wo = (torch.tensor(result["autoattack_correct"][n], dtype=torch.float64)
             for n in ("pgd, with buffer", "pgd, without buffer"))
    assert a["without_buffer"]["autoattack_cost"] == pytest.approx(float(w.mean() - wo.mean()))
    assert a["without_buffer"]["autoattack_se"] == pytest.approx(float((w - wo).std(unbiased=False)) / len(w) ** 0.5)
    assert a["trap_training"]["uniform_loss"] == pytest.approx(math.log(10))
    assert a["trap_training"]["final_loss"] == result["histories"][
        "pgd, without buffer, through the statistics"]["loss"][-1]
    assert a["trained"]["clean_min"] == min(a["clean"][k] for k in batchnorm.AT_KEYS)
    for which in ("clean", "ae"):
        ks = a["ks"][which]
        assert set(ks["centred"]) == set(batchnorm.KS_KEYS)
        labels = result["ks"]["normal, with buffer"]["labels"]
        assert ks["centred"]["pgd_w"] == pytest.approx(
            batchnorm.specialization(result["ks"]["pgd, with buffer"][which], labels))
        assert ks["gap"]["pgd_w"] == pytest.approx(ks["centred"]["normal_w"] - ks["centred"]["pgd_w"])
        assert all(ks["low"][k] <= ks["high"][k] for k in batchnorm.KS_KEYS)
    assert all(-1 <= r <= 1 or math.isnan(r) for r in a["ks_rho"].values())
    # the claims are made (not asserted) under smoke; check() asserts nothing there
    cl = batchnorm.claims(a, "smoke")
    assert len(cl) == 12 and check(cl, "smoke") == []


GOOD = {
    "n_aa": 500, "sizes": [500, 100, 20],
    "gradient": {"dominated": 0.5, "sign_agree": 0.7},
    "trap": {"gap_min": 0.42, "twin_max": 0.0},
    "autoattack": {"normal_w": 0.0, "normal_wo": 0.01, "pgd_w": 0.5, "pgd_wo": 0.4, "pgd_trap": 0.2},
    "trained": {"clean_min": 0.95, "robust_min": 0.5},
    "swap": {"clean_move_max": 0.002, "margin_min": 0.09},
    "without_buffer": {"clean_cost": 0.0, "autoattack_cost": -0.1},
    "trap_training": {"fixed_cost": 0.2},
    "ks": {"clean": {"gap_low_min": 0.01}, "ae": {"gap_low_min": 0.02}},
}


def test_claims_negative_controls():
    # each control sits just on the wrong side of its claim's threshold (the chapter's thresholds)
    B = batchnorm
    assert_negative_controls(batchnorm.claims, GOOD, {
        "gradient_split": _set("gradient", "sign_agree", 0.9),
        "trap_gap": _set("trap", "gap_min", 0.19),
        "trap_twin": _set("trap", "twin_max", 0.06),
        "trap_autoattack": _set("autoattack", "normal_w", 0.06),
        "at_trained": _set("trained", "clean_min", B.CLEAN_FLOOR),
        "swap_clean": _set("swap", "clean_move_max", B.SWAP_CLEAN),
        "swap_robust": _set("swap", "margin_min", B.SWAP_MARGIN),
        "without_buffer_autoattack": _set("without_buffer", "autoattack_cost", B.WB_AA),
        "without_buffer_clean": _set("without_buffer", "clean_cost", B.WB_CLEAN + 0.001),
        "trap_training": _set("trap_training", "fixed_cost", B.TRAP_AA),
        "ks_ae_separates": _set("ks", "ae", "gap_low_min", -0.01),
        "ks_clean_separates": _set("ks", "clean", "gap_low_min", 0.0),
    })
    # the other parts of the combined claims fail on their own too
    for key, spoil in (("gradient_split", _set("gradient", "dominated", 0.2)),
                       ("trap_autoattack", _set("autoattack", "normal_wo", 0.051)),
                       ("at_trained", _set("trained", "robust_min", B.ROBUST_FLOOR))):
        bad = copy.deepcopy(GOOD)
        spoil(bad)
        assert {c.key: c.holds for c in batchnorm.claims(bad, "quick")}[key] is False
    bad = copy.deepcopy(GOOD)
    _set("without_buffer", "clean_cost", -B.WB_CLEAN - 0.001)(bad)       # the other side of the interval
    assert {c.key: c.holds for c in batchnorm.claims(bad, "quick")}["without_buffer_clean"] is False
    cl = batchnorm.claims(GOOD, "quick")
    assert [c.key for c in cl if c.profiles == ()] == OBSERVATIONS
    assert all(c.profiles in ((), ("quick",)) for c in cl)


def test_eps_and_lr_schedules():
    profile = get_profile("quick")
    s = batchnorm.Settings.for_profile(profile)
    eps = [batchnorm.eps_of_epoch(s, 0.3, e) for e in range(profile.epochs)]
    assert eps[:s.switch_epoch] == [0.0] * s.switch_epoch
    assert eps[s.switch_epoch] == pytest.approx(0.3 / s.ramp_epochs) and eps[-1] == 0.3
    assert all(a <= b for a, b in zip(eps, eps[1:]))
    lr = [batchnorm.lr_of_epoch(s, profile, e) for e in range(profile.epochs)]
    assert lr[0] == profile.lr and lr[s.switch_epoch] == pytest.approx(s.at_lr or profile.lr)
    assert lr[-1] == pytest.approx((s.at_lr or profile.lr) * profile.lr_gamma)
    paper = batchnorm.Settings.for_profile(get_profile("paper"))
    assert batchnorm.eps_of_epoch(paper, 8 / 255, 0) == pytest.approx(8 / 255)


def test_craft_training_examples_fixed_statistics(trained_cnn, mnist_small):
    """"fixed" is PGD on the network normalising with the clean batch's statistics held fixed (an
    independent loop by hand agrees); "batch" (through the statistics) gives other examples
    (negative control); buffers and modes are untouched."""
    from ntklab import attacks

    x, y = mnist_small[1].tensors[0][:32], mnist_small[1].tensors[1][:32]
    net = set_bn_running_stats_off(trained_cnn)
    buffers = copy.deepcopy(net.state_dict())
    gen = lambda: torch.Generator().manual_seed(5)   # noqa: E731
    fixed = batchnorm.craft_training_examples(net, x, y, craft="fixed", eps=0.3, steps=3, alpha=0.1, generator=gen())
    stats = bn_batch_statistics(net, x)
    x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-0.3, 0.3, generator=gen()), 0, 1)
    for _ in range(3):
        xa = x_adv.clone().requires_grad_(True)
        with using_bn_statistics(net, stats):
            g = torch.autograd.grad(F.cross_entropy(net(xa), y), xa)[0]
        x_adv = torch.min(torch.max(x_adv + 0.1 * g.sign(), x - 0.3), x + 0.3).clamp(0, 1)
    torch.testing.assert_close(fixed, x_adv)
    through = batchnorm.craft_training_examples(net, x, y, craft="batch", eps=0.3, steps=3, alpha=0.1,
                                                generator=gen())
    assert not torch.equal(fixed, through)
    assert (fixed - x).abs().max() <= 0.3 + 1e-6
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items()) and not net.training
    with pytest.raises(ValueError, match="craft must be one of"):
        batchnorm.craft_training_examples(net, x, y, craft="eval", eps=0.3, steps=1, alpha=0.1)


def set_bn_running_stats_off(net):
    """A copy of ``net`` whose BN layers do not track running statistics (a model without buffer)."""
    from ntklab.bn import set_bn_running_stats

    return set_bn_running_stats(copy.deepcopy(net), False).eval()


def test_alignment_matrix_against_an_independent_computation():
    """Centred alignment (Cortes et al.) by its definition with explicit centring matrices, and the
    uncentred KS against ntklab.metrics.kernel_specialization; a kernel that is the class structure
    itself specialises, a kernel of constant plus noise does not (negative control)."""
    import numpy as np

    from ntklab.metrics import kernel_specialization

    rng = np.random.default_rng(0)
    n, k = 30, 3
    labels = np.arange(n) % k
    U = np.eye(k)[labels]
    A = rng.normal(size=(n, n, k))
    K = np.einsum("ijc,kjc->ikc", A, A) + 5.0            # PSD per output plus a large constant
    H = np.eye(n) - np.ones((n, n)) / n
    S = batchnorm.alignment_matrix(K, labels)
    for c in range(k):
        for d in range(k):
            Kc, T = H @ K[:, :, c] @ H, H @ np.outer(U[:, d], U[:, d]) @ H
            assert S[c, d] == pytest.approx(np.sum(Kc * T) / (np.linalg.norm(Kc) * np.linalg.norm(T)))
    full = np.zeros((n, n, k, k))
    for c in range(k):
        full[:, :, c, c] = K[:, :, c]
    assert batchnorm.specialization(K, labels, centred=False) == pytest.approx(kernel_specialization(full, labels)[0])
    structured = np.stack([np.outer(U[:, c], U[:, c]) + 0.01 * np.eye(n) for c in range(k)], axis=2) + 5.0
    assert batchnorm.specialization(structured, labels) > 0.5
    assert abs(batchnorm.specialization(K, labels)) < 0.2


def test_gradient_split_by_hand(trained_cnn, mnist_small):
    """The own part is what each image gets with the statistics held fixed: computed image by
    image (the statistics of the whole batch, one image's loss) it agrees; the two parts add up to
    the gradient through train-mode BN; the model's buffers and mode are untouched."""
    x, y = mnist_small[1].tensors[0][:40], mnist_small[1].tensors[1][:40]
    buffers = copy.deepcopy(trained_cnn.state_dict())
    own, through = batchnorm.gradient_split(trained_cnn, x, y)
    stats = bn_batch_statistics(trained_cnn, x)
    for i in (0, 17, 39):
        xi = x[i:i + 1].clone().requires_grad_(True)
        with using_bn_statistics(trained_cnn, stats):
            g = torch.autograd.grad(F.cross_entropy(trained_cnn(xi), y[i:i + 1]), xi)[0]
        torch.testing.assert_close(own[i:i + 1], g / len(y))
    net = copy.deepcopy(trained_cnn).train()
    xf = x.clone().requires_grad_(True)
    full = torch.autograd.grad(F.cross_entropy(net(xf), y), xf)[0]
    torch.testing.assert_close(own + through, full)
    assert through.abs().max() > 0
    assert all(torch.equal(buffers[k], v) for k, v in trained_cnn.state_dict().items()) and not trained_cnn.training
    shares = batchnorm.gradient_shares(trained_cnn, x, y)
    assert shares["dominated"] == pytest.approx(
        float((through.flatten(1).norm(dim=1) > own.flatten(1).norm(dim=1)).double().mean()))


def test_normal_training_never_reads_the_buffers():
    """Why the experiment copies the normal model instead of training it twice (the "same network"
    of the chapter, by construction); PGD-AT differs, because its attack sees BN differently
    (running statistics with buffer, the batch's fixed statistics without)."""
    profile = get_profile("smoke").replace(epochs=1)
    weights = {}
    for buffer in batchnorm.BUFFERS:
        net, _ = experiments.trained_model(batchnorm.model_profile(profile, buffer), "normal", device="cpu",
                                           progress=False, eval_every=0)
        weights["normal", buffer] = net.state_dict()
    for buffer, craft in (("with buffer", "running"), ("without buffer", "fixed")):
        net, _ = batchnorm.adversarial_training(profile.replace(epochs=2), buffer, craft, device="cpu")
        weights["pgd", buffer] = net.state_dict()
    for strategy, same in (("normal", True), ("pgd", False)):
        a, b = weights[strategy, "with buffer"], weights[strategy, "without buffer"]
        assert set(b) < set(a) and all("running" in k or "num_batches" in k for k in set(a) - set(b))
        assert all(torch.equal(a[k], b[k]) for k in b) == same, strategy


def test_batchnorm_second_run_loads_the_cache(batchnorm_run, monkeypatch):
    result, out, _ = batchnorm_run
    again, _ = rerun_from_cache("batchnorm", out, monkeypatch, batchnorm, "_compute")
    assert again["rows"] == result["rows"]


def test_batchnorm_figures_and_table(batchnorm_run):
    result, _, _ = batchnorm_run
    fig, ax = plt.subplots()
    plots.batch_size_robustness(ax, result, "pgd, with buffer")
    assert len(ax.lines) == 4 + 2                       # 4 crafting x composition lines, running, AutoAttack
    ax.clear()
    plots.batch_size_robustness(ax, result, "normal, without buffer", show="twin")
    assert len(ax.lines) == 2 + 1
    with pytest.raises(ValueError, match="show must be"):
        plots.batch_size_robustness(ax, result, "pgd, with buffer", show="both")
    axes = plots.centred_ks_against_robustness(batchnorm.analyse(result))
    assert all(len(a.containers) == len(batchnorm.KS_KEYS) for a in axes)
    plt.close("all")
    text = batchnorm.accuracy_table(result)
    assert len(text.splitlines()) == 1 + len(result["models"])
    assert text.splitlines()[1].startswith("normal, with buffer") and " - " in text
    with pytest.raises(KeyError, match="no row"):
        batchnorm.accuracy_row(result, "pgd, without buffer", "running", "self", "adversarial", 20)


def test_settings():
    quick = batchnorm.Settings.for_profile(get_profile("quick"))
    assert quick == batchnorm.Settings(width=16, **batchnorm.QUICK_RECIPE, n_eval=500, n_aa=500, n_aa_normal=100,
                                       n_ks=50, n_gradient=100, draws=400, test_batch_sizes=(500, 100, 20))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.n_eval = 10
    paper = batchnorm.Settings.for_profile(get_profile("paper"))
    assert (paper.width, paper.switch_epoch, paper.ramp_epochs, paper.n_eval, paper.n_aa, paper.n_ks) == (
        None, None, 1, 1000, 1000, 100)
    assert paper.test_batch_sizes == (500, 100, 20)
    assert batchnorm.Settings.for_profile(get_profile("smoke")).test_batch_sizes == (20,)


def test_batchnorm_config():
    quick = get_profile("quick")
    config = batchnorm.make_config(quick)
    assert config["settings"]["test_batch_sizes"] == [500, 100, 20]
    models = config["models"]
    assert models["normal, with buffer"]["train"] == {"eval_every": 0}
    assert {n: m["craft"] for n, m in models.items() if m["strategy"] == "pgd"} == {
        "pgd, with buffer": "running", "pgd, without buffer": "fixed",
        "pgd, without buffer, through the statistics": "batch"}
    assert models["normal, without buffer"]["profile"]["model_kwargs"] == {"width": 16, "track_running_stats": False}
    assert batchnorm.model_profile(get_profile("paper"), "with buffer").model_kwargs == {"track_running_stats": True}
    with pytest.raises(ValueError, match="buffer must be one of 'with buffer', 'without buffer', got 'none'"):
        batchnorm.model_profile(quick, "none")
    with pytest.raises(ValueError, match="only the normal model"):
        batchnorm.train_overrides(quick, "pgd")


def test_batchnorm_paper_code_path(paper_profile):
    result = experiments.run("batchnorm", paper_profile, "cpu", progress=False)
    assert result["config"]["profile"]["model"] == "preact_resnet18"
    assert result["config"]["settings"]["test_batch_sizes"] == [20]
    assert result["same_init"] is True
    for name in result["models"]:
        assert 0 <= result["robust"][name] <= result["clean"][name] <= 1
    assert result["histories"]["pgd, with buffer"]["strategy"][0] == "pgd"      # AT from the start
    cl = batchnorm.claims(batchnorm.analyse(result), paper_profile)
    assert len(cl) == 12 and check(cl, paper_profile) == []


def test_every_number_the_chapter_quotes_is_glued(batchnorm_run):
    """Each ``{glue:text}`ch3_...``` of book/batchnorm.ipynb names a number (or text) of analyse()."""
    import json
    import pathlib
    import re

    from ntklab.claims import glue

    pytest.importorskip("myst_nb")
    nb = json.loads((pathlib.Path(__file__).resolve().parents[1] / "book" / "batchnorm.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    quoted = {ref.split(":")[0] for ref in re.findall(r"\{glue:text\}`([^`]+)`", text)}
    assert quoted and quoted <= set(glue(batchnorm.analyse(batchnorm_run[0]), prefix="ch3_"))
OBSERVATIONS = ["swap_robust", "trap_training", "ks_ae_separates"]
