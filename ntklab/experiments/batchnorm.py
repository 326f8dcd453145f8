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

Per-profile values (:func:`settings`): ``quick`` trains width-16 SmallCNNs (about a quarter of the
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
largest test batch, as used at test time), ``ks`` (model -> {"clean", "ae"}), ``histories``,
``training_time``.
"""
from __future__ import annotations

import time

from ntklab.experiments import cached, data_from_profile, model_from_profile, register, trained_model

__all__ = ["run", "make_config", "settings", "model_profile", "train_overrides", "NAME", "STRATEGIES", "BUFFERS",
           "TEST_BATCH_SIZES"]

NAME = "batchnorm"
STRATEGIES = ("normal", "pgd")
BUFFERS = ("with buffer", "without buffer")
TEST_BATCH_SIZES = (500, 100, 20)
SWITCH_EPOCH = 4                 # quick: normal epochs before PGD-AT starts
SAME_TRAINING = ("normal",)      # strategies whose training never reads the BN buffers


def settings(profile) -> dict:
    """The experiment's per-profile values (see the module docstring)."""
    table = {
        "smoke": {"width": None, "switch_epoch": 1, "n_eval": 40, "n_aa": 20, "n_ks": 20},
        "quick": {"width": 16, "switch_epoch": SWITCH_EPOCH, "n_eval": 500, "n_aa": 60, "n_ks": 50},
    }
    if profile.name in table:
        return dict(table[profile.name])
    return {"width": None, "switch_epoch": None, "n_eval": profile.n_eval, "n_aa": min(profile.n_eval, 500),
            "n_ks": min(profile.n_probe, 100)}


def model_profile(profile, buffer: str):
    """The profile of the models: the chapter's width, with (``buffer="with buffer"``) or without
    (``"without buffer"``) BN running statistics. Raises ``ValueError`` for another ``buffer``."""
    if buffer not in BUFFERS:
        raise ValueError(f"buffer must be one of {', '.join(map(repr, BUFFERS))}, got {buffer!r}")
    kw = dict(profile.model_kwargs)
    width = settings(profile)["width"]
    if width is not None:
        kw["width"] = width
    kw["track_running_stats"] = buffer == BUFFERS[0]
    return profile.replace(model_kwargs=kw)


def train_overrides(profile, strategy: str) -> dict:
    """Keywords of :func:`ntklab.experiments.trained_model` beyond the profile's defaults: no
    evaluation during training (the experiment evaluates; the trajectory is the same either way)
    and, for PGD-AT, the switch epoch of :func:`settings`."""
    out = {"eval_every": 0}
    switch = settings(profile)["switch_epoch"]
    if strategy == "pgd" and switch is not None:
        out["switch_epoch"] = switch
    return out


def make_config(profile) -> dict:
    """Everything the result depends on (the cache key)."""
    s = settings(profile)
    sizes = [b for b in TEST_BATCH_SIZES if b <= s["n_eval"]] or [s["n_eval"]]
    return {"profile": profile.to_dict(), "settings": s, "test_batch_sizes": sizes,
            "models": {f"{st}, {bf}": {"profile": model_profile(profile, bf).to_dict(),
                                       "train": train_overrides(profile, st)}
                       for st in STRATEGIES for bf in BUFFERS},
            "attacks": ["fgsm", "pgd"], "autoattack": "fast", "kernel": "full"}


@register(NAME, "normal and PGD training with and without BN running statistics: accuracies over test "
                "batch sizes, compositions and crafting modes, AutoAttack, KS of C-NTK and AE-NTK (chapter 3)")
def run(profile, device=None, *, force: bool = False, progress: bool = True) -> dict:
    """Train (or load) the four models and evaluate them (see the module docstring for the result)."""
    from ntklab.config import get_device

    config = make_config(profile)
    return cached(NAME, config, lambda: _compute(profile, config, get_device(device), progress), force=force)


def _compute(profile, config, device, progress) -> dict:
    import torch

    from ntklab import data
    from ntklab.config import seed_everything

    start = time.perf_counter()
    s = config["settings"]
    _, test_set = data_from_profile(profile)
    x, y = data.subset(test_set, s["n_eval"], seed=profile.seed).tensors
    out = {"config": config, "models": list(config["models"]), "rows": [], "autoattack": {}, "autoattack_flags": {},
           "robust": {}, "clean": {}, "ks": {}, "histories": {}, "training_time": {}, "shared_weights": {}}
    memo = {}                              # self-crafted examples, shared by models with the same weights
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
            _evaluate(out, name, strategy, buffer, net, x, y, profile, config, device, progress, memo)
    out["compute_seconds"] = time.perf_counter() - start
    return out


def _twin(net, stats):
    """A context in which ``net`` computes per example: with its running estimates (``stats`` None)
    or with the given fixed statistics (the exact data-set statistics, for a model without buffer)."""
    import contextlib

    from ntklab.models import using_bn_statistics

    return contextlib.nullcontext(net) if stats is None else using_bn_statistics(net, stats)


def _evaluate(out, name, strategy, buffer, net, x, y, profile, config, device, progress, memo):
    import contextlib

    import torch
    from torch.utils.data import TensorDataset

    from ntklab import data, evaluate
    from ntklab.metrics import kernel_specialization
    from ntklab.models import bn_batch_statistics, bn_dataset_statistics, using_bn_statistics
    from ntklab.ntk import empirical_ntk

    s = config["settings"]
    eps, sizes = profile.eps, config["test_batch_sizes"]
    kw = {"pgd": {"alpha": profile.pgd_alpha, "steps": profile.eval_pgd_steps}, "fgsm": {}}
    with_buffer = buffer == BUFFERS[0]
    deployed = "running" if with_buffer else "batch"
    twin_stats = None if with_buffer else bn_dataset_statistics(net, data_from_profile(profile)[0].tensors[0])

    def attack(mode, batch_size, inputs=(x, y), names=config["attacks"]):
        torch.manual_seed(profile.seed)
        return {a: evaluate.craft(net, inputs, attack=a, eps=eps, batch_size=batch_size, bn_mode=mode,
                                  device=device, progress=progress, **kw[a]) for a in names}

    with _twin(net, twin_stats):
        twin_adv = attack("eval", sizes[0])
    for mode in ["running", "batch"] if with_buffer else ["batch"]:
        bn_mode = "eval" if mode == "running" else "train"
        for b in sizes if mode == "batch" else sizes[:1]:
            clean_ok = evaluate.predict(net, x, batch_size=b, bn_mode=bn_mode, device=device) == y
            # with running statistics the model is its own twin: "self" is the twin attack. With batch
            # statistics, a model with the same weights computes the same function: craft once.
            if mode == "batch":
                key = (out["shared_weights"].get(name, name), b)
                memo[key] = memo[key] if key in memo else attack("train", b)
            crafted = {"self": memo[key], "twin": twin_adv} if mode == "batch" else {"self": twin_adv}
            for craft, advs in crafted.items():
                for composition in ["adversarial", "half"] if mode == "batch" else ["adversarial"]:
                    mix = x if composition == "half" else None
                    ok = clean_ok.clone()
                    for x_adv in advs.values():
                        ok &= evaluate.predict(net, x_adv, batch_size=b, bn_mode=bn_mode, mix=mix, device=device) == y
                    next_to_adv = None
                    if composition == "half":     # clean images classified next to adversarial ones
                        next_to_adv = _mean(evaluate.predict(net, x, batch_size=b, bn_mode=bn_mode,
                                                             mix=advs["pgd"], device=device) == y)
                    out["rows"].append({"model": name, "strategy": strategy, "buffer": buffer, "test_bn": mode,
                                        "batch_size": b, "craft": craft, "composition": composition,
                                        "clean": _mean(clean_ok), "robust": _mean(ok),
                                        "clean_next_to_adv": next_to_adv})
    # AutoAttack on a class-balanced subset, the model as it is used at test time (one batch)
    aa_x, aa_y = data.subset(TensorDataset(x, y), s["n_aa"], seed=profile.seed).tensors
    with _autoattack_flags() as flags:
        aa = evaluate.autoattack_accuracy(net, (aa_x, aa_y), eps=eps, version=config["autoattack"],
                                          seed=profile.seed, batch_size=len(aa_y), device=device)
    out["autoattack"][name] = aa
    out["autoattack_flags"][name] = sorted(set(flags))
    rows = [r for r in out["rows"] if r["model"] == name and r["test_bn"] == deployed]
    out["robust"][name] = min([r["robust"] for r in rows] + [aa])
    out["clean"][name] = next(r["clean"] for r in rows if r["batch_size"] == sizes[0])
    # kernel specialization of the full C-NTK and AE-NTK on a class-balanced probe
    px, py = data.subset(TensorDataset(x, y), s["n_ks"], seed=profile.seed + 1).tensors
    with _twin(net, twin_stats):
        px_adv = attack("eval", len(py), (px, py), ["pgd"])["pgd"]
    out["ks"][name] = {}
    for which, inputs in (("clean", px), ("ae", px_adv)):
        inputs = inputs.to(device)
        # without buffer BN normalises the probe batch with its own statistics (held fixed)
        fixed = contextlib.nullcontext() if with_buffer else using_bn_statistics(net, bn_batch_statistics(net, inputs))
        with fixed:
            K = empirical_ntk(net, inputs, kind=config["kernel"])
        out["ks"][name][which] = kernel_specialization(K, py)[0]


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
