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
    their weights and history, robust accuracy never above clean accuracy."""
    result, _, paths = batchnorm_run
    assert result["same_init"] is True
    assert result["models"] == list(batchnorm.MODEL_KEYS)
    # three models trained and cached under "models" (normal without buffer has the weights of
    # normal with buffer), then the experiment
    assert [p.parent.name for p, how in paths if how == "computed"].count("models") == 3
    assert result["shared_weights"] == {"normal, without buffer": "normal, with buffer"}
    sizes = result["config"]["settings"]["test_batch_sizes"]
    for name in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        with_buffer = name.endswith("with buffer")
        # running: one row; batch statistics: per size, 2 crafting modes x 2 compositions
        assert len(rows) == (1 if with_buffer else 0) + 4 * len(sizes)
        for r in rows:
            assert 0 <= r["robust"] <= r["clean"] <= 1
            assert (r["clean_next_to_adv"] is None) == (r["composition"] != "half")
        assert 0 <= result["robust"][name] <= min(r["robust"] for r in rows
                                                  if r["test_bn"] == ("running" if with_buffer else "batch"))
        assert 0 <= result["autoattack"][name] <= 1 and result["robust"][name] <= result["autoattack"][name]
        assert all(isinstance(f, str) for f in result["autoattack_flags"][name])
        assert set(result["ks"][name]) == {"clean", "ae"} and all(v > 0 for v in result["ks"][name].values())
    # the same initialisation and data order with and without buffer: identical first (normal) epochs
    h = result["histories"]
    assert h["normal, with buffer"]["loss"] == h["normal, without buffer"]["loss"]
    assert h["pgd, with buffer"]["strategy"][0] == "normal"
    assert h["normal, with buffer"]["loss"][0] == pytest.approx(h["pgd, with buffer"]["loss"][0])
    assert set(result["gradient"]) == {"dominated", "sign_agree"}
    assert all(0 <= v <= 1 for v in result["gradient"].values())


def test_analyse_on_a_smoke_run(batchnorm_run):
    result, _, _ = batchnorm_run
    a = batchnorm.analyse(result)
    sizes = result["config"]["settings"]["test_batch_sizes"]
    assert a["sizes"] == sizes and a["n_gradient"] == result["config"]["settings"]["n_gradient"]
    for key in ("self", "twin", "gap"):
        assert len(a["trap"][key]) == len(sizes)
    for key in ("batch_clean", "batch_robust", "robust_drop", "clean_move", "margin"):
        assert len(a["swap"][key]) == len(sizes)
    assert set(a["autoattack"]) == set(a["clean"]) == set(a["robust"]) == set(batchnorm.MODEL_KEYS.values())
    assert a["gradient"] == result["gradient"]
    # against an independent reading of the rows
    by = {(r["model"], r["test_bn"], r["craft"], r["composition"], r["batch_size"]): r for r in result["rows"]}
    gap = min(by["normal, without buffer", "batch", "self", "adversarial", b]["robust"]
              - by["normal, without buffer", "batch", "twin", "adversarial", b]["robust"] for b in sizes)
    assert a["trap"]["gap_min"] == pytest.approx(gap)
    run = by["pgd, with buffer", "running", "self", "adversarial", sizes[0]]
    margin = min(run["robust"] - min(by["pgd, with buffer", "batch", c, "adversarial", b]["robust"]
                                     for c in ("self", "twin"))
                 - abs(by["pgd, with buffer", "batch", "self", "adversarial", b]["clean"] - run["clean"])
                 for b in sizes)
    assert a["swap"]["margin_min"] == pytest.approx(margin)
    ks = result["ks"]
    assert a["ks_margin"]["clean"] == pytest.approx(
        min(ks["normal, with buffer"]["clean"], ks["normal, without buffer"]["clean"])
        - max(ks["pgd, with buffer"]["clean"], ks["pgd, without buffer"]["clean"]))
    assert a["without_buffer"]["uniform_loss"] == pytest.approx(math.log(10))
    assert a["without_buffer"]["final_loss"] == result["histories"]["pgd, without buffer"]["loss"][-1]
    assert a["autoattack"]["pgd_w"] - a["autoattack"]["pgd_wo"] == pytest.approx(a["without_buffer"]["autoattack_cost"])
    assert all(-1 <= r <= 1 or math.isnan(r) for r in a["ks_rho"].values())
    assert a["more_robust_pgd"] in ("pgd, with buffer", "pgd, without buffer")
    # the claims are made (not asserted) under smoke; check() asserts nothing there
    cl = batchnorm.claims(a, "smoke")
    assert len(cl) == 14 and check(cl, "smoke") == []


GOOD = {
    "gradient": {"dominated": 0.5, "sign_agree": 0.7},
    "trap": {"gap_min": 0.42, "twin_max": 0.0},
    "autoattack": {"normal_w": 0.0, "normal_wo": 0.01, "pgd_w": 0.5, "pgd_wo": 0.12},
    "swap": {"clean_move_max": 0.002, "margin_min": 0.09},
    "without_buffer": {"clean_cost": 0.37, "autoattack_cost": 0.38, "loss_ratio": 0.97},
    "ks_margin": {"clean": 1.08, "ae": 0.43},
    "ks_pgd_order": {"clean": -0.05, "ae": -0.08},
}


def test_claims_negative_controls():
    # each control sits just on the wrong side of its claim's threshold (the chapter's thresholds)
    assert_negative_controls(batchnorm.claims, GOOD, {
        "gradient_split": _set("gradient", "sign_agree", 0.9),
        "trap_gap": _set("trap", "gap_min", 0.19),
        "trap_twin": _set("trap", "twin_max", 0.06),
        "trap_autoattack": _set("autoattack", "normal_w", 0.06),
        "swap_clean": _set("swap", "clean_move_max", 0.03),
        "swap_robust": _set("swap", "margin_min", 0.01),
        "without_buffer_clean": _set("without_buffer", "clean_cost", 0.049),
        "without_buffer_autoattack": _set("without_buffer", "autoattack_cost", 0.0499),
        "ks_clean": _set("ks_margin", "clean", 0.3),
        "pgd_robust": _set("autoattack", "pgd_w", 0.2),
        "pgd_without_buffer_collapsed": _set("without_buffer", "loss_ratio", 0.76),
        "ks_ae_lower": _set("ks_margin", "ae", -0.01),
        "ks_clean_orders_pgd": _set("ks_pgd_order", "clean", 0.05),
        "ks_ae_orders_pgd": _set("ks_pgd_order", "ae", 0.0),
    })
    # the other parts of the combined claims fail on their own too
    for key, spoil in (("gradient_split", _set("gradient", "dominated", 0.2)),
                       ("trap_autoattack", _set("autoattack", "normal_wo", 0.051))):
        bad = copy.deepcopy(GOOD)
        spoil(bad)
        assert {c.key: c.holds for c in batchnorm.claims(bad, "quick")}[key] is False
    # asserted under quick only; the observations under no profile
    cl = batchnorm.claims(GOOD, "quick")
    assert [c.key for c in cl if c.profiles == ("quick",)][-1] == "pgd_robust"
    # the clean-accuracy cost of training without buffer did not hold on every seed: reported only
    assert [c.key for c in cl if c.profiles == ()] == ["without_buffer_clean", "pgd_without_buffer_collapsed",
                                                       "ks_ae_lower", "ks_clean_orders_pgd", "ks_ae_orders_pgd"]


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
    """Why the experiment copies the normal model instead of training it twice; PGD-AT differs,
    because its attack runs in eval mode (running statistics with buffer, batch without)."""
    profile = get_profile("smoke").replace(epochs=1)
    weights = {}
    for strategy in ("normal", "pgd"):
        for buffer in batchnorm.BUFFERS:
            net, _ = experiments.trained_model(batchnorm.model_profile(profile, buffer), strategy, device="cpu",
                                               progress=False, eval_every=0)
            weights[strategy, buffer] = net.state_dict()
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
    axes = plots.ks_against_robustness(result)
    assert all(len(a.collections) == 4 for a in axes)
    plt.close("all")
    text = batchnorm.accuracy_table(result)
    assert len(text.splitlines()) == 2 + len({(r["model"], r["test_bn"], r["craft"], r["composition"])
                                              for r in result["rows"]})
    with pytest.raises(KeyError, match="no row"):
        batchnorm.accuracy_row(result, "pgd, without buffer", "running", "self", "adversarial", 20)


def test_settings():
    quick = batchnorm.Settings.for_profile(get_profile("quick"))
    assert quick == batchnorm.Settings(width=16, switch_epoch=4, n_eval=500, n_aa=60, n_ks=50, n_gradient=100,
                                       test_batch_sizes=(500, 100, 20))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.n_eval = 10
    paper = batchnorm.Settings.for_profile(get_profile("paper"))
    assert (paper.width, paper.switch_epoch, paper.n_eval, paper.n_aa, paper.n_ks) == (None, None, 1000, 500, 100)
    assert paper.test_batch_sizes == (500, 100, 20)
    assert batchnorm.Settings.for_profile(get_profile("smoke")).test_batch_sizes == (20,)


def test_batchnorm_config():
    quick = get_profile("quick")
    config = batchnorm.make_config(quick)
    assert config["settings"]["test_batch_sizes"] == [500, 100, 20]
    models = config["models"]
    assert models["pgd, with buffer"]["train"] == {"eval_every": 0, "switch_epoch": 4}
    assert models["normal, without buffer"]["profile"]["model_kwargs"] == {"width": 16, "track_running_stats": False}
    assert batchnorm.model_profile(get_profile("paper"), "with buffer").model_kwargs == {"track_running_stats": True}
    with pytest.raises(ValueError, match="buffer must be one of 'with buffer', 'without buffer', got 'none'"):
        batchnorm.model_profile(quick, "none")


def test_batchnorm_paper_code_path(paper_profile):
    result = experiments.run("batchnorm", paper_profile, "cpu", progress=False)
    assert result["config"]["profile"]["model"] == "preact_resnet18"
    assert result["config"]["settings"]["test_batch_sizes"] == [20]
    assert result["same_init"] is True
    for name in result["models"]:
        assert 0 <= result["robust"][name] <= result["clean"][name] <= 1
        assert "switch_epoch" not in result["config"]["models"][name]["train"]
    assert len(batchnorm.claims(batchnorm.analyse(result), paper_profile)) == 14


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
