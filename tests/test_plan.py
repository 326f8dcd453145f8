"""Tests of ntklab.plan: the runs each experiment makes, counted before anything runs, and their cost."""
import json
import math
from collections import Counter

import pytest

import ntklab.train
from ntklab import plan
from ntklab.config import get_profile
from ntklab.plan import PlannedRun

COSTS = {"seconds_per_pass": 0.002, "kernel_500_seconds": 40.0, "autoattack_seconds_per_image": 0.5}


@pytest.mark.parametrize("strategy, steps, clean_update, expected", [
    ("normal", None, False, 1), ("fgsm", None, False, 2), ("fgsm_rs", None, False, 2), ("n_fgsm", None, False, 2),
    ("fgsm_logscale", None, False, 2), ("fgsm_pca", None, False, 2), ("pgd", 10, False, 11), ("pgd", None, False, 11),
    ("pgd", 3, True, 5), ("trades", 10, False, 12), ("fgsm_rs", None, True, 3), ("gradalign", None, False, 5),
])
def test_passes_per_example(strategy, steps, clean_update, expected):
    assert plan.passes_per_example(strategy, steps, clean_update=clean_update) == expected


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy 'sgd'"):
        plan.passes_per_example("sgd")


def test_project_on_hand_computed_costs():
    runs = [
        PlannedRun("a", "pgd", epochs=10, n_train=1000, passes=11, eval_passes=500, kernel_images=(500, 250),
                   autoattack_images=100),
        PlannedRun("a", "normal, a quarter of the cost", epochs=2, n_train=100, passes=1, kernel_images=(1000,),
                   settings={"pass_cost": 0.25}),
        PlannedRun("b", "shared", epochs=100, n_train=10**6, passes=11, settings={"shared_with": "a"}),
        PlannedRun("b", "kernels only", epochs=0, n_train=50, passes=0, kernel_images=(100,) * 25),
    ]
    hours = plan.project(runs, {**COSTS, "device": "cpu", "torch": "2"})      # other keys are ignored
    # a: (10*1000*11 + 500) passes * 0.002 s + (1 + 1/4) kernels * 40 s + 100 * 0.5 s, and
    #    0.25 * (2*100 passes * 0.002 s + 4 kernels * 40 s)
    a = (110_500 * 0.002 + 1.25 * 40 + 50) + 0.25 * (200 * 0.002 + 4 * 40)
    b = 25 * (100 / 500) ** 2 * 40                                             # the shared run counts 0
    assert hours == pytest.approx({"a": a / 3600, "b": b / 3600})
    t = plan.totals(runs)
    assert t["b"]["runs"] == 2 and t["b"]["training_runs"] == 0 and t["b"]["image_passes"] == 0
    assert t["total"]["image_passes"] == pytest.approx(110_500 + 0.25 * 200)
    assert t["total"]["autoattack_images"] == 100 and t["total"]["kernels"] == 28


@pytest.mark.parametrize("costs, message", [
    ({"kernel_500_seconds": 1, "autoattack_seconds_per_image": 1}, "no 'seconds_per_pass'"),
    ({**COSTS, "kernel_500_seconds": -1}, "costs\\['kernel_500_seconds'\\] must be a finite number"),
    ({**COSTS, "autoattack_seconds_per_image": "fast"}, "autoattack_seconds_per_image"),
    ({**COSTS, "seconds_per_pass": math.nan}, "seconds_per_pass"),
    ([1, 2, 3], "costs must be a dict"),
])
def test_project_refuses_bad_costs(costs, message):
    with pytest.raises(ValueError, match=message):
        plan.project([], costs)


def _train_passes(history, config) -> float:
    """Image-passes of a finished training run, counted from what it did: its per-epoch strategies
    (history), its attack steps and its data (independent of ntklab.plan's table)."""
    per = {"normal": 1, "fgsm": 2, "fgsm_rs": 2, "n_fgsm": 2, "fgsm_logscale": 2, "fgsm_pca": 2}
    steps = 10 if config.steps is None else config.steps
    total = 0
    for strategy in history.strategy:
        n = per.get(strategy) or (steps + 1 if strategy == "pgd" else steps + 2)
        total += n + (1 if config.clean_update and strategy != "normal" else 0)
    return total


def test_plan_counts_the_training_runs_that_smoke_makes(tmp_path, monkeypatch):
    """Run chapters 2 and 4 under smoke with ntklab.train.train wrapped, and compare every call
    (epochs, examples, passes) and the cache entries they made with their plans."""
    from ntklab import experiments
    from ntklab.experiments import cache, strategies, theorems

    monkeypatch.setenv("NTKLAB_RESULTS", str(tmp_path / "results"))
    calls = []
    real = ntklab.train.train

    def recording(model, train_set, config=None, **kw):
        history = real(model, train_set, config, **kw)
        cfg = ntklab.train._config(config, {k: v for k, v in kw.items() if k not in (
            "eval_set", "callbacks", "device", "checkpoint_dir", "progress")})
        n = len(train_set) if not isinstance(train_set, tuple) else len(train_set[1])
        calls.append((len(history.epoch), n, _train_passes(history, cfg) * n))
        return history

    monkeypatch.setattr(ntklab.train, "train", recording)
    profile = get_profile("smoke")
    planned = []
    for module in (strategies, theorems):
        experiments.run(module.NAME, profile, "cpu", progress=False)
        planned += [r for r in module.plan(profile) if r.epochs > 0]
    assert len(calls) == len(planned) == 11
    as_run = Counter((e, n, round(p, 6)) for e, n, p in calls)
    as_planned = Counter((r.epochs, r.n_train, round(r.epochs * r.n_train * r.passes, 6)) for r in planned)
    assert as_run == as_planned
    # the runs the plans say are cache entries are those entries (so sharing is found where it happens)
    stored = set()
    for entry in cache.entries():
        if entry.name in ("models", "kernel_runs"):
            config = json.loads(entry.path.with_suffix(".json").read_text())["config"]
            stored.add(plan.cache_key(entry.name, config))
    keys = {r.settings["cache"] for r in planned if "cache" in r.settings}
    assert len(keys) == 7 + 2 and keys == stored


def test_plan_of_every_profile_needs_no_data(monkeypatch, tmp_path):
    """paper's CIFAR-10 is not here, and plan must not load or download any data set."""
    from ntklab import data

    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded a data set")

    monkeypatch.setattr(data, "load", refuse)
    monkeypatch.setenv("NTKLAB_CACHE", str(tmp_path / "empty"))
    assert plan.missing() == []
    from ntklab import experiments
    from ntklab.config import PROFILES

    for name, profile in PROFILES.items():            # every profile on a data set of the tables
        if profile.dataset in plan.TRAIN_SIZES:
            assert {r.experiment for r in plan.plan(name)} == set(experiments.EXPERIMENTS), name
    runs = plan.plan("paper")

    assert {r.experiment for r in runs} == set(experiments.EXPERIMENTS)
    # chapter 3's normal model with buffer is chapter 2's ReLU model: listed twice, counted once
    shared = [r for r in runs if r.shared]
    assert [(r.experiment, r.settings["shared_with"]) for r in shared] == [("theorems", "batchnorm")]
    hours = plan.project(runs, COSTS)
    assert set(hours) == set(experiments.EXPERIMENTS) and all(h > 0 for h in hours.values())
    # chapter 4 under paper: seven runs of 200 epochs on 50,000 images, PGD-10 and TRADES-10
    ch4 = [r for r in runs if r.experiment == "strategies"]
    assert len(ch4) == 7 and {(r.epochs, r.n_train) for r in ch4} == {(200, 50_000)}
    assert sorted(r.passes for r in ch4) == [1, 1, 1, 1, 2, 11, 12]
    text = plan.table(runs, COSTS)
    assert text.splitlines()[-1].split()[0] == "total"


def test_train_size_table_and_limit():
    p = get_profile("paper")
    assert plan.train_size(p) == 50_000 and plan.train_size(p.replace(dataset="svhn")) == 73_257
    assert plan.train_size(p.replace(n_train=1000)) == 1000
    assert plan.train_size(get_profile("quick")) == 4_000 and plan.train_size(p.replace(n_train=10**6)) == 50_000


def test_a_run_that_keeps_its_best_checkpoint_counts_its_per_epoch_evaluation():
    """Under ``paper`` (select_best: Rice et al.'s best checkpoint) every epoch is evaluated with
    clean and PGD accuracy on ``n_eval`` images and the best weights are evaluated again; without
    select_best neither is counted."""
    from ntklab.experiments.runs import chapter_profile

    cp = chapter_profile(get_profile("paper"))
    assert cp.select_best
    best = plan.kernel_run_plan("strategies", cp, "pgd")
    last = plan.kernel_run_plan("strategies", cp.replace(select_best=False), "pgd")
    per_epoch = cp.epochs * cp.n_eval * (plan.FORWARD + cp.eval_pgd_steps)
    again = plan.worst_case_passes(cp.n_eval, cp.eval_pgd_steps)
    assert best.eval_passes - last.eval_passes == pytest.approx(per_epoch + again)
    assert (best.epochs, best.n_train, best.passes) == (last.epochs, last.n_train, last.passes)
