"""Experiment ``batchnorm``: batch normalisation in adversarial training (chapter 3).

Li et al. (arXiv 2312.02236, case study 1) compare models trained "with buffer" (BN keeps running
estimates of the data-set statistics and uses them at test time) and "without buffer" (BN always
normalises with the statistics of the batch it sees, ``track_running_stats=False``). This
experiment has four models of the profile's architecture: normal training and PGD-AT (Madry et
al. 2018), each with and without buffer, from the same initialisation with the same data order
(:func:`ntklab.experiments.trained_model`; checked: the initial weights agree). Normal training
never reads the buffers (train-mode BN normalises with the batch), so the normal model without
buffer has exactly the weights of the one with buffer (copied, not retrained; a unit test checks
that training both gives identical weights). PGD-AT crafts its examples in eval mode, which uses
the running estimates with buffer and the batch statistics without: those two models differ.

Every model is evaluated on ``n_eval`` test images over a grid:

* BN at test time: ``"running"`` (with-buffer models only) or ``"batch"`` (statistics of the test
  batch; for with-buffer models, train-mode BN with the buffers restored);
* test batch sizes (500, 100, 20 under ``quick``); batch composition: all adversarial, or half
  clean and half adversarial (:func:`ntklab.evaluate.predict`), clean accuracy in all-clean batches;
* crafting: ``"self"``, against the model exactly as it is used at test time (with batch
  statistics: the attacked batch normalised by its own statistics while it is crafted), and
  ``"twin"``, transferred from the model's running-statistics twin: the same weights normalised
  by fixed statistics (the running estimates with buffer; the exact data-set statistics of
  :func:`ntklab.models.bn_dataset_statistics` without).

Robust accuracy is per example the worst of FGSM and PGD-``eval_pgd_steps`` (an example counts if
it is classified correctly clean, in an all-clean batch of the same size, and after both attacks).
AutoAttack (``version="fast"``, :func:`ntklab.evaluate.autoattack_accuracy`) runs on a
class-balanced subset of ``n_aa`` images, each model as it is used at test time (without buffer:
the subset is one batch); the warnings of AutoAttack's own checks are kept. Kernel specialization
(:func:`ntklab.metrics.kernel_specialization`) of the full C-NTK and AE-NTK (the AEs: twin PGD) on a
class-balanced probe of ``n_ks`` test images, BN as at test time: running statistics with buffer,
the statistics of the probe batch itself (held fixed, :func:`ntklab.models.using_bn_statistics`)
without.

Per-profile values (:class:`Settings`): ``quick`` trains width-16 SmallCNNs (about a quarter of the
convolution cost of width 32, so that the chapter fits its budget) for the profile's 10 epochs;
PGD-AT (PGD-5, step eps / 4, eps 0.3) starts after ``switch_epoch`` normal epochs, because from
scratch it does not get off the ground at eps 0.3 in 10 epochs at this scale (clean accuracy about
0.4 after 6 to 10 epochs in our runs); 500 test images, AutoAttack on 60, KS on 50. ``paper``: the
profile's model and schedule, PGD-AT from the start, ``n_eval`` test images.

The result (cached by config and package version): ``config``, ``compute_seconds``, ``models``
(names such as ``"pgd, with buffer"``), ``same_init`` (bool), ``shared_weights`` (model -> the
model whose weights it has), ``rows`` (list of dicts: ``model``, ``strategy``, ``buffer``,
``test_bn``, ``batch_size``, ``craft``, ``composition``, ``clean``, ``robust``,
``clean_next_to_adv``: accuracy of the clean half of a half-adversarial batch), ``autoattack``
(model -> accuracy), ``autoattack_flags`` (model -> list of AutoAttack's warnings), ``robust``
(model -> the smallest robust accuracy measured in its test-time setting, over the crafting
modes, batch sizes, compositions and AutoAttack), ``clean`` (model -> clean accuracy at the
largest test batch, as used at test time), ``ks`` (model -> {"clean", "ae"}), ``gradient``
(:func:`gradient_shares` of the normally trained model on ``n_gradient`` test images),
``histories``, ``training_time``.

:func:`analyse` turns a result into the numbers the chapter discusses (models named by
:data:`MODEL_KEYS`), :func:`claims` into the chapter's claims.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from ntklab.experiments import RunContext, data_from_profile, experiment, model_from_profile, trained_model

__all__ = ["run", "make_config", "Settings", "model_profile", "train_overrides", "analyse", "claims",
           "gradient_split", "gradient_shares", "accuracy_row", "accuracy_table", "NAME", "STRATEGIES",
           "BUFFERS", "TEST_BATCH_SIZES", "MODEL_KEYS"]

NAME = "batchnorm"
STRATEGIES = ("normal", "pgd")
BUFFERS = ("with buffer", "without buffer")
TEST_BATCH_SIZES = (500, 100, 20)
SAME_TRAINING = ("normal",)      # strategies whose training never reads the BN buffers
# the short names :func:`analyse` gives the four models (keys of its dicts, and of the glued numbers)
MODEL_KEYS = {"normal, with buffer": "normal_w", "normal, without buffer": "normal_wo",
              "pgd, with buffer": "pgd_w", "pgd, without buffer": "pgd_wo"}


@dataclass(frozen=True)
class Settings:
    """The experiment's per-profile values (see the module docstring).

    width: the models' width (None: the profile's); switch_epoch: normal epochs before PGD-AT starts
    (None: PGD-AT from the start); n_eval: test images of the accuracy grid; n_aa: of AutoAttack;
    n_ks: of the kernel-specialization probe; n_gradient: of the gradient split
    (:func:`gradient_shares`); test_batch_sizes: the test batch sizes (those of
    :data:`TEST_BATCH_SIZES` up to ``n_eval``, else ``n_eval`` alone).
    """

    width: int | None
    switch_epoch: int | None
    n_eval: int
    n_aa: int
    n_ks: int
    n_gradient: int
    test_batch_sizes: tuple[int, ...]

    @classmethod
    def for_profile(cls, profile) -> "Settings":
        """The values for ``profile``: fixed for ``smoke`` and ``quick``, derived from the
        profile's ``n_eval`` and ``n_probe`` for any other."""
        table = {
            "smoke": {"width": None, "switch_epoch": 1, "n_eval": 40, "n_aa": 20, "n_ks": 20, "n_gradient": 20},
            "quick": {"width": 16, "switch_epoch": 4, "n_eval": 500, "n_aa": 60, "n_ks": 50, "n_gradient": 100},
        }
        kw = table.get(profile.name) or {
            "width": None, "switch_epoch": None, "n_eval": profile.n_eval, "n_aa": min(profile.n_eval, 500),
            "n_ks": min(profile.n_probe, 100), "n_gradient": min(profile.n_eval, 100)}
        sizes = tuple(b for b in TEST_BATCH_SIZES if b <= kw["n_eval"]) or (kw["n_eval"],)
        return cls(**kw, test_batch_sizes=sizes)


def model_profile(profile, buffer: str):
    """The profile of the models: the chapter's width, with (``buffer="with buffer"``) or without
    (``"without buffer"``) BN running statistics. Raises ``ValueError`` for another ``buffer``."""
    if buffer not in BUFFERS:
        raise ValueError(f"buffer must be one of {', '.join(map(repr, BUFFERS))}, got {buffer!r}")
    kw = dict(profile.model_kwargs)
    width = Settings.for_profile(profile).width
    if width is not None:
        kw["width"] = width
    kw["track_running_stats"] = buffer == BUFFERS[0]
    return profile.replace(model_kwargs=kw)


def train_overrides(profile, strategy: str) -> dict:
    """Keywords of :func:`ntklab.experiments.trained_model` beyond the profile's defaults: no
    evaluation during training (the experiment evaluates; the trajectory is the same either way)
    and, for PGD-AT, the switch epoch of :class:`Settings`."""
    out = {"eval_every": 0}
    switch = Settings.for_profile(profile).switch_epoch
    if strategy == "pgd" and switch is not None:
        out["switch_epoch"] = switch
    return out


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    s = dataclasses.asdict(Settings.for_profile(profile))
    s["test_batch_sizes"] = list(s["test_batch_sizes"])
    return {"profile": profile.to_dict(), "settings": s,
            "models": {f"{st}, {bf}": {"profile": model_profile(profile, bf).to_dict(),
                                       "train": train_overrides(profile, st)}
                       for st in STRATEGIES for bf in BUFFERS},
            "attacks": ["fgsm", "pgd"], "autoattack": "fast", "kernel": "full"}


@experiment(NAME, "normal and PGD training with and without BN running statistics: accuracies over test "
                  "batch sizes, compositions and crafting modes, AutoAttack, KS of C-NTK and AE-NTK (chapter 3)",
            make_config)
def run(ctx: RunContext) -> dict:
    """Train (or load) the four models and evaluate them (see the module docstring for the result)."""
    return _compute(ctx.profile, ctx.config, ctx.device, ctx.progress)


# ------------------------------------------------------------------------------------------ analysis and claims
def accuracy_row(result: dict, model: str, test_bn: str, craft: str, composition: str, batch_size: int) -> dict:
    """The row of ``result["rows"]`` of ``model`` (a name such as ``"pgd, with buffer"``) with BN
    in ``test_bn`` at test time, examples crafted ``craft``, batches of ``composition`` and
    ``batch_size``. Raises ``KeyError`` when the grid has no such row."""
    for r in result["rows"]:
        if (r["model"], r["test_bn"], r["craft"], r["composition"], r["batch_size"]) == (
                model, test_bn, craft, composition, batch_size):
            return r
    raise KeyError(f"no row for {model!r}, {test_bn!r}, {craft!r}, {composition!r}, batch size {batch_size}")


def accuracy_table(result: dict) -> str:
    """The accuracy grid as text: one line per model, BN at test time, crafting and composition;
    robust accuracy (clean accuracy in brackets) per test batch size."""
    sizes = result["config"]["settings"]["test_batch_sizes"]
    lines = ["robust accuracy (clean accuracy) by test batch size",
             f"{'model':24s} {'BN at test':10s} {'examples':8s} {'batch':12s}" + "".join(f"{b:>14d}" for b in sizes)]
    for r0 in (r for r in result["rows"] if r["batch_size"] == sizes[0]):
        cells = [accuracy_row(result, r0["model"], r0["test_bn"], r0["craft"], r0["composition"], b)
                 for b in (sizes if r0["test_bn"] == "batch" else sizes[:1])]
        lines.append(f"{r0['model']:24s} {r0['test_bn']:10s} {r0['craft']:8s} {r0['composition']:12s}"
                     + "".join(f"{c['robust']:7.3f} ({c['clean']:.3f})" for c in cells))
    return "\n".join(lines)


def _span(values) -> dict:
    return {"min": min(values), "max": max(values)}


def analyse(result: dict) -> dict:
    """The numbers chapter 3 discusses, from a result of :func:`run` (models by :data:`MODEL_KEYS`):

    ``gradient``: :func:`gradient_shares` of the normal model. ``trap``: the normal model without
    buffer, all-adversarial batches with batch statistics, per test batch size (lists ``self``,
    ``twin``, ``gap`` = self - twin) and their extremes (``self_min``, ``self_max``, ``twin_max``,
    ``gap_min``). ``autoattack``, ``clean``, ``robust``: per model. ``swap``: the PGD model with
    buffer, running statistics (``running_clean``, ``running_robust``) against batch statistics
    per size (``batch_clean``, ``batch_robust``: the worse crafting mode), ``robust_drop`` and
    ``clean_move`` (absolute) per size, ``margin`` = drop - clean move per size and their extremes.
    ``without_buffer``: PGD with minus without buffer (``clean_cost``, ``autoattack_cost``), the
    final training loss of PGD without buffer against a uniform guess (``final_loss``,
    ``uniform_loss`` = ln(classes), ``loss_ratio``). ``next_to_adv``: the PGD model with buffer,
    batch statistics, twin examples: change of clean accuracy of the clean half of half-adversarial
    batches per size (``change``, ``change_min``, ``change_max``). ``ks``: per kernel (``clean``,
    ``ae``) per model; ``ks_margin``: per kernel, the lower KS of the normal models minus the higher
    of the PGD models; ``ks_rho``: per kernel, Spearman's rank correlation of KS with robust accuracy
    over the four models; ``more_robust_pgd``: the PGD model with the higher robust accuracy;
    ``ks_pgd_order``: per kernel, its KS minus the other PGD model's. ``sizes``, ``n_aa``, ``n_ks``,
    ``n_gradient``: the settings used.
    """
    from ntklab import data

    s, names = result["config"]["settings"], {v: k for k, v in MODEL_KEYS.items()}
    sizes = list(s["test_batch_sizes"])

    def rows(key, test_bn, craft, composition, field):
        return [accuracy_row(result, names[key], test_bn, craft, composition, b)[field] for b in sizes]

    per_model = {f: {k: float(result[f][n]) for k, n in names.items()} for f in ("autoattack", "clean", "robust")}
    a = {"sizes": sizes, "n_aa": s["n_aa"], "n_ks": s["n_ks"], "n_gradient": s["n_gradient"],
         "gradient": dict(result["gradient"]), **per_model}

    self_, twin = rows("normal_wo", "batch", "self", "adversarial", "robust"), rows("normal_wo", "batch", "twin",
                                                                                    "adversarial", "robust")
    gap = [p - q for p, q in zip(self_, twin)]
    a["trap"] = {"self": self_, "twin": twin, "gap": gap, "self_min": min(self_), "self_max": max(self_),
                 "twin_max": max(twin), "gap_min": min(gap)}

    running = accuracy_row(result, names["pgd_w"], "running", "self", "adversarial", sizes[0])
    batch_clean = rows("pgd_w", "batch", "self", "adversarial", "clean")
    batch_robust = [min(p, q) for p, q in zip(rows("pgd_w", "batch", "self", "adversarial", "robust"),
                                              rows("pgd_w", "batch", "twin", "adversarial", "robust"))]
    drop = [running["robust"] - r for r in batch_robust]
    move = [abs(c - running["clean"]) for c in batch_clean]
    margin = [d - m for d, m in zip(drop, move)]
    a["swap"] = {"running_clean": running["clean"], "running_robust": running["robust"],
                 "batch_clean": batch_clean, "batch_robust": batch_robust, "robust_drop": drop, "clean_move": move,
                 "margin": margin, **{f"batch_clean_{k}": v for k, v in _span(batch_clean).items()},
                 **{f"batch_robust_{k}": v for k, v in _span(batch_robust).items()},
                 **{f"robust_drop_{k}": v for k, v in _span(drop).items()},
                 "clean_move_max": max(move), "margin_min": min(margin)}

    classes = data.info(result["config"]["profile"]["dataset"])["num_classes"]
    final_loss = float(result["histories"][names["pgd_wo"]]["loss"][-1])
    a["without_buffer"] = {"clean_cost": a["clean"]["pgd_w"] - a["clean"]["pgd_wo"],
                           "autoattack_cost": a["autoattack"]["pgd_w"] - a["autoattack"]["pgd_wo"],
                           "final_loss": final_loss, "uniform_loss": math.log(classes),
                           "loss_ratio": final_loss / math.log(classes)}

    change = [n - c for n, c in zip(rows("pgd_w", "batch", "twin", "half", "clean_next_to_adv"),
                                    rows("pgd_w", "batch", "twin", "half", "clean"))]
    a["next_to_adv"] = {"change": change, "change_min": min(change), "change_max": max(change)}

    a["ks"] = {w: {k: float(result["ks"][n][w]) for k, n in names.items()} for w in ("clean", "ae")}
    more, less = sorted(("pgd_w", "pgd_wo"), key=lambda k: -a["robust"][k])    # ties: with buffer first
    a["more_robust_pgd"] = names[more]
    a["ks_margin"] = {w: min(ks["normal_w"], ks["normal_wo"]) - max(ks["pgd_w"], ks["pgd_wo"])
                      for w, ks in a["ks"].items()}
    a["ks_pgd_order"] = {w: ks[more] - ks[less] for w, ks in a["ks"].items()}
    a["ks_rho"] = {w: _rank_correlation([ks[k] for k in names], [a["robust"][k] for k in names])
                   for w, ks in a["ks"].items()}
    return a


def _rank_correlation(u, v) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(u)) < 2 or len(set(v)) < 2:
        return math.nan
    return float(spearmanr(u, v).statistic)


def claims(analysis: dict, profile) -> list:
    """The chapter's claims on an :func:`analyse` dict: the first ten asserted under ``quick``
    (the thresholds the chapter has always asserted), the last four observations of the run that
    no profile asserts (the table says whether they hold on the run)."""
    from ntklab.claims import all_of, compare

    a, sw, wb = analysis, analysis["swap"], analysis["without_buffer"]
    aa, observed = analysis["autoattack"], {"profiles": ()}
    return [
        all_of("gradient_split",
               "Through the batch statistics: for a normally trained network, the part of the input gradient "
               "through the statistics is larger than the image's own part for more than 20% of the images, and "
               "the full gradient has the sign of the own part on fewer than 90% of the pixels",
               [compare("dominated", "", a["gradient"]["dominated"], ">", 0.2),
                compare("sign_agree", "", a["gradient"]["sign_agree"], "<", 0.9)]),
        compare("trap_gap",
                "The trap: PGD crafted through the batch statistics of the normal model without buffer leaves at "
                "least 0.2 more robust accuracy than its twin's examples, at every test batch size (smallest gap)",
                a["trap"]["gap_min"], ">=", 0.2),
        compare("trap_twin",
                "The twin's examples find (almost) every example of the normal model without buffer: robust "
                "accuracy at most 0.05 at every test batch size (largest)",
                a["trap"]["twin_max"], "<=", 0.05),
        all_of("trap_autoattack",
               "AutoAttack finds (almost) every example of both normal models as used at test time: robust "
               "accuracy at most 0.05",
               [compare("normal_wo", "", aa["normal_wo"], "<=", 0.05),
                compare("normal_w", "", aa["normal_w"], "<=", 0.05)]),
        compare("swap_clean",
                "Test-time swap, PGD model with buffer: batch instead of running statistics moves clean accuracy "
                "by less than 0.03 at every test batch size (largest move)",
                sw["clean_move_max"], "<", 0.03),
        compare("swap_robust",
                "Test-time swap: with the same attacks, robust accuracy drops by more than clean accuracy moves "
                "(by over 0.01) at every test batch size (smallest drop minus move)",
                sw["margin_min"], ">", 0.01),
        compare("without_buffer_clean",
                "Training without buffer costs the PGD model at least 0.05 of clean accuracy. Reported, not "
                "asserted: it did not hold on every seed.", wb["clean_cost"], ">=", 0.05, profiles=()),
        compare("without_buffer_autoattack",
                "Training without buffer costs the PGD model at least 0.05 of AutoAttack robust accuracy",
                wb["autoattack_cost"], ">=", 0.05 - 1e-9),
        compare("ks_clean",
                "The KS of the C-NTK is lower for both PGD models than for both normal ones, by more than 0.3 "
                "(margin)",
                a["ks_margin"]["clean"], ">", 0.3),
        compare("pgd_robust",
                "The PGD model with buffer is robust at all: AutoAttack accuracy above 0.2",
                aa["pgd_w"], ">", 0.2),
        compare("pgd_without_buffer_collapsed",
                "Observed: PGD-AT without buffer collapsed in training (final loss above 0.95 of a uniform "
                "guess's; measured: the ratio)",
                wb["loss_ratio"], ">", 0.95, **observed),
        compare("ks_ae_lower",
                "Observed: the KS of the AE-NTK is lower for both PGD models than for both normal ones (margin)",
                a["ks_margin"]["ae"], ">", 0, **observed),
        compare("ks_clean_orders_pgd",
                "Observed: of the two PGD models, the more robust one has the lower C-NTK KS (its KS minus the "
                "other's)",
                a["ks_pgd_order"]["clean"], "<", 0, **observed),
        compare("ks_ae_orders_pgd",
                "Observed: of the two PGD models, the more robust one has the lower AE-NTK KS (its KS minus the "
                "other's)",
                a["ks_pgd_order"]["ae"], "<", 0, **observed),
    ]


# ------------------------------------------------------------------------------------------ the gradient split
def gradient_split(net, X, y):
    """The gradient of the mean cross-entropy of the batch ``(X, y)`` with respect to ``X``, BN
    normalising with the batch's own statistics, split in two: ``(own, through_stats)``, the
    gradient with the statistics held fixed (each image's own part) and the rest, which flows
    through the statistics to every image of the batch. ``own + through_stats`` is the full
    gradient. The model's modes and buffers are left as they were."""
    import torch
    import torch.nn.functional as F

    from ntklab.attacks import attack_mode
    from ntklab.models import bn_batch_statistics, using_bn_statistics

    def grad(context):
        x = X.clone().requires_grad_(True)
        with context:
            return torch.autograd.grad(F.cross_entropy(net(x), y), x)[0]

    full = grad(attack_mode(net, "train"))
    own = grad(using_bn_statistics(net, bn_batch_statistics(net, X)))
    return own, full - own


def gradient_shares(net, X, y) -> dict:
    """Of :func:`gradient_split` on the batch ``(X, y)``: ``dominated``, the share of images whose
    part through the statistics has a larger norm than their own part, and ``sign_agree``, the
    share of pixels where the full gradient has the sign of the own part (PGD steps along the sign)."""
    own, stats = gradient_split(net, X, y)
    full = own + stats
    dominated = (stats.flatten(1).norm(dim=1) > own.flatten(1).norm(dim=1)).double().mean()
    return {"dominated": float(dominated), "sign_agree": float((full.sign() == own.sign()).double().mean())}


# ------------------------------------------------------------------------------------------ compute
@dataclass
class _Bench:
    """What every model is evaluated on: the test images, the profile, the config, the device,
    and the examples crafted through the batch statistics, shared by models with the same weights
    (key: (model whose weights, batch size))."""

    x: object
    y: object
    profile: object
    config: dict
    device: object
    progress: bool
    memo: dict = dataclasses.field(default_factory=dict)


def _compute(profile, config, device, progress) -> dict:
    import torch

    from ntklab import data
    from ntklab.config import seed_everything

    start = time.perf_counter()
    s = config["settings"]
    _, test_set = data_from_profile(profile)
    x, y = data.subset(test_set, s["n_eval"], seed=profile.seed).tensors
    bench = _Bench(x, y, profile, config, device, progress)
    out = {"config": config, "models": list(config["models"]), "rows": [], "autoattack": {}, "autoattack_flags": {},
           "robust": {}, "clean": {}, "ks": {}, "histories": {}, "training_time": {}, "shared_weights": {}}
    inits = []
    for buffer in BUFFERS:
        seed_everything(profile.seed)
        inits.append({k: v for k, v in model_from_profile(model_profile(profile, buffer)).state_dict().items()
                      if "running" not in k and "num_batches" not in k})
    out["same_init"] = inits[0].keys() == inits[1].keys() and all(torch.equal(inits[0][k], inits[1][k])
                                                                  for k in inits[0])
    for strategy in STRATEGIES:
        trained = {}
        for buffer in BUFFERS:
            name = f"{strategy}, {buffer}"
            if buffer == BUFFERS[1] and strategy in SAME_TRAINING:
                # Normal training never reads the running buffers (train-mode BN normalises with the
                # batch), so the model without buffer has the same weights: copied, not retrained.
                net = model_from_profile(model_profile(profile, buffer)).to(device)
                net.load_state_dict({k: v for k, v in trained[BUFFERS[0]].state_dict().items()
                                     if k in net.state_dict()})
                net.eval()
                out["shared_weights"][name] = f"{strategy}, {BUFFERS[0]}"
                history = out["histories"][f"{strategy}, {BUFFERS[0]}"]
                out["histories"][name] = history
                out["training_time"][name] = out["training_time"][f"{strategy}, {BUFFERS[0]}"]
            else:
                net, history = trained_model(model_profile(profile, buffer), strategy, device=device,
                                             progress=progress, **train_overrides(profile, strategy))
                out["histories"][name] = history.to_dict()
                out["training_time"][name] = history.training_time
            trained[buffer] = net
            if name == "normal, with buffer":
                gx, gy = data.subset(test_set, s["n_gradient"], seed=profile.seed).tensors
                out["gradient"] = gradient_shares(net, gx.to(device), gy.to(device))
            _evaluate(out, bench, name=name, strategy=strategy, buffer=buffer, net=net)
    out["compute_seconds"] = time.perf_counter() - start
    return out


def _twin(net, stats):
    """A context in which ``net`` computes per example: with its running estimates (``stats`` None)
    or with the given fixed statistics (the exact data-set statistics, for a model without buffer)."""
    import contextlib

    from ntklab.models import using_bn_statistics

    return contextlib.nullcontext(net) if stats is None else using_bn_statistics(net, stats)


def _craft(net, bench: _Bench, *, bn_mode: str, batch_size: int, inputs=None, attacks=None) -> dict:
    """Adversarial examples of ``inputs`` (default: the bench's test images) against ``net``, for
    each attack of ``attacks`` (default: the config's), crafted with BN in ``bn_mode``."""
    import torch

    from ntklab import evaluate

    profile = bench.profile
    kw = {"pgd": {"alpha": profile.pgd_alpha, "steps": profile.eval_pgd_steps}, "fgsm": {}}
    torch.manual_seed(profile.seed)
    return {a: evaluate.craft(net, inputs or (bench.x, bench.y), attack=a, eps=profile.eps, batch_size=batch_size,
                              bn_mode=bn_mode, device=bench.device, progress=bench.progress, **kw[a])
            for a in attacks or bench.config["attacks"]}


def _evaluate(out: dict, bench: _Bench, *, name: str, strategy: str, buffer: str, net) -> None:
    """Evaluate the model ``name`` (trained with ``strategy``, with or without ``buffer``) on the
    bench: its rows of the accuracy grid, AutoAttack, its robust and clean accuracy as used at test
    time, and the KS of its kernels, all written into ``out``."""
    from ntklab.models import bn_dataset_statistics

    with_buffer = buffer == BUFFERS[0]
    twin_stats = None if with_buffer else bn_dataset_statistics(net, data_from_profile(bench.profile)[0].tensors[0])
    with _twin(net, twin_stats):
        twin_adv = _craft(net, bench, bn_mode="eval", batch_size=bench.config["settings"]["test_batch_sizes"][0])
    rows = _accuracy_rows(out, bench, name=name, net=net, with_buffer=with_buffer, twin_adv=twin_adv)
    out["rows"] += [{"model": name, "strategy": strategy, "buffer": buffer, **r} for r in rows]
    out["autoattack"][name], out["autoattack_flags"][name] = _autoattack(net, bench)
    deployed = [r for r in rows if r["test_bn"] == ("running" if with_buffer else "batch")]
    out["robust"][name] = min([r["robust"] for r in deployed] + [out["autoattack"][name]])
    largest = bench.config["settings"]["test_batch_sizes"][0]
    out["clean"][name] = next(r["clean"] for r in deployed if r["batch_size"] == largest)
    out["ks"][name] = _kernel_specialization(net, bench, with_buffer=with_buffer, twin_stats=twin_stats)


def _accuracy_rows(out: dict, bench: _Bench, *, name: str, net, with_buffer: bool, twin_adv: dict) -> list[dict]:
    """The model's rows of the grid (BN at test time x batch size x crafting x composition)."""
    from ntklab import evaluate

    x, y, sizes, rows = bench.x, bench.y, bench.config["settings"]["test_batch_sizes"], []
    for mode in ["running", "batch"] if with_buffer else ["batch"]:
        bn_mode = "eval" if mode == "running" else "train"
        for b in sizes if mode == "batch" else sizes[:1]:
            clean_ok = evaluate.predict(net, x, batch_size=b, bn_mode=bn_mode, device=bench.device) == y
            # with running statistics the model is its own twin: "self" is the twin attack. With batch
            # statistics, a model with the same weights computes the same function: craft once.
            crafted = {"self": twin_adv}
            if mode == "batch":
                key = (out["shared_weights"].get(name, name), b)
                if key not in bench.memo:
                    bench.memo[key] = _craft(net, bench, bn_mode="train", batch_size=b)
                crafted = {"self": bench.memo[key], "twin": twin_adv}
            for craft, advs in crafted.items():
                for composition in ["adversarial", "half"] if mode == "batch" else ["adversarial"]:
                    mix = x if composition == "half" else None
                    ok = clean_ok.clone()
                    for x_adv in advs.values():
                        ok &= evaluate.predict(net, x_adv, batch_size=b, bn_mode=bn_mode, mix=mix,
                                               device=bench.device) == y
                    next_to_adv = None
                    if composition == "half":     # clean images classified next to adversarial ones
                        next_to_adv = _mean(evaluate.predict(net, x, batch_size=b, bn_mode=bn_mode,
                                                             mix=advs["pgd"], device=bench.device) == y)
                    rows.append({"test_bn": mode, "batch_size": b, "craft": craft, "composition": composition,
                                 "clean": _mean(clean_ok), "robust": _mean(ok), "clean_next_to_adv": next_to_adv})
    return rows


def _autoattack(net, bench: _Bench) -> tuple[float, list[str]]:
    """AutoAttack's accuracy on a class-balanced subset, the model as it is used at test time (the
    subset is one batch), and the warnings of AutoAttack's own checks."""
    from torch.utils.data import TensorDataset

    from ntklab import data, evaluate

    profile, config = bench.profile, bench.config
    aa_x, aa_y = data.subset(TensorDataset(bench.x, bench.y), config["settings"]["n_aa"], seed=profile.seed).tensors
    with _autoattack_flags() as flags:
        aa = evaluate.autoattack_accuracy(net, (aa_x, aa_y), eps=profile.eps, version=config["autoattack"],
                                          seed=profile.seed, batch_size=len(aa_y), device=bench.device)
    return aa, sorted(set(flags))


def _kernel_specialization(net, bench: _Bench, *, with_buffer: bool, twin_stats) -> dict:
    """KS of the full C-NTK and AE-NTK (PGD from the twin) on a class-balanced probe; without
    buffer BN normalises the probe batch with its own statistics (held fixed)."""
    import contextlib

    from torch.utils.data import TensorDataset

    from ntklab import data
    from ntklab.metrics import kernel_specialization
    from ntklab.models import bn_batch_statistics, using_bn_statistics
    from ntklab.ntk import empirical_ntk

    probe = data.subset(TensorDataset(bench.x, bench.y), bench.config["settings"]["n_ks"], seed=bench.profile.seed + 1)
    px, py = probe.tensors
    with _twin(net, twin_stats):
        px_adv = _craft(net, bench, bn_mode="eval", batch_size=len(py), inputs=(px, py), attacks=["pgd"])["pgd"]
    ks = {}
    for which, inputs in (("clean", px), ("ae", px_adv)):
        inputs = inputs.to(bench.device)
        fixed = contextlib.nullcontext() if with_buffer else using_bn_statistics(net, bn_batch_statistics(net, inputs))
        with fixed:
            K = empirical_ntk(net, inputs, kind=bench.config["kernel"])
        ks[which] = kernel_specialization(K, py)[0]
    return ks


def _autoattack_flags():
    """A context collecting (as a list of strings) the warnings AutoAttack's own checks log
    (randomised or dynamic model, zero gradients, ...) instead of printing them."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def collect():
        messages = []

        class Handler(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage().split(" See ")[0])

        logger = logging.getLogger("auto-attack")
        handler, propagate = Handler(level=logging.WARNING), logger.propagate
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield messages
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate

    return collect()


def _mean(flags) -> float:
    return float(flags.double().mean())
