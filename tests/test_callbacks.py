"""Tests of ntklab.callbacks: the automatic switch epoch (train(..., switch_epoch="auto"),
AutoSwitch, chapters 4 and 5). KernelSnapshots, the evaluation callbacks and the catastrophic-
overfitting detector are exercised through train() in test_train.py; the phase splitter it uses is
tested in test_metrics.py."""

import copy

import numpy as np
import pytest
import torch

import ntklab
from ntklab import metrics
from ntklab.callbacks import AutoSwitch
from ntklab.models import SmallCNN
from ntklab.train import CHECKPOINT_NAME, train
from test_train import Interrupt, strip_times  # tests/ is on the path: pytest's rootdir-relative imports

MEAN, STD = ntklab.data.stats("mnist5k")


# ---------------------------------------------------------------- the automatic switch
def test_autoswitch_decides_on_a_synthetic_curve():
    v = [1.0, 0.6, 0.35, 0.15, 0.1]
    decisions = [AutoSwitch.decide(v[:t], 0.2, cap=8) for t in range(len(v) + 1)]
    # undecided until the velocity over epoch 3 is below a fifth of epoch 0's: then switch at epoch 4
    assert decisions == [None, None, None, None, 4, 4]
    assert AutoSwitch.decide(v[:3], 0.2, cap=3) == 3          # the cap, once cap epochs are done
    assert AutoSwitch.decide(v[:4], 0.2, cap=3) == 3          # never later than the cap
    assert AutoSwitch.decide([1.0, 0.5], 0.5, cap=9) == 2     # at the threshold counts
    with pytest.raises(ValueError, match="cap"):
        AutoSwitch(torch.rand(4, 1, 28, 28), cap=0)
    with pytest.raises(ValueError, match="threshold"):
        AutoSwitch(torch.rand(4, 1, 28, 28), cap=2, threshold=1.0)


@pytest.fixture(scope="module")
def tiny():
    return ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 192, seed=0)


def cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4, mean=MEAN, std=STD)


AUTO_KW = dict(strategy="pgd", steps=1, eps=0.1, batch_size=64, device="cpu", progress=False)


class FakeKernels:
    """Replaces the kernel measurement by a synthetic curve of kernel distances, one per epoch."""

    def __init__(self, monkeypatch, distances):
        self.distances, self.calls = list(distances), 0
        monkeypatch.setattr(AutoSwitch, "_measure", self.measure)
        monkeypatch.setattr(metrics, "kernel_distance", self.distance)

    def measure(self, model):
        self.calls += 1
        return torch.eye(2)

    def distance(self, K1, K2, *, center=False):
        assert center, "the switch uses the centred kernel"
        return self.distances[self.calls - 2]  # the kernel at initialisation comes first


@pytest.mark.parametrize("schedule, cap, distances, expected", [
    ("multistep", 5, [0.1, 0.05, 0.03, 0.015, 0.01, 0.01], 4),  # lazy after epoch 3: AT from epoch 4
    ("multistep", 3, [0.1, 0.09, 0.08, 0.07], 3),               # never lazy: AT from the cap
    ("cosine", 5, [0.1, 0.05, 0.03, 0.018, 0.01], None),        # per unit of the falling cosine rate
])
def test_train_switches_at_the_epoch_the_curve_gives(tiny, monkeypatch, schedule, cap, distances, expected):
    fake = FakeKernels(monkeypatch, distances)
    epochs, n_batches = 7, 3
    h = train(cnn(), tiny, epochs=epochs, lr_schedule=schedule, milestones=(5,), switch_epoch="auto",
              switch_cap=cap, **AUTO_KW)
    lr = [np.mean([ntklab.train.CosineLR(0.05, epochs)(e, b, n_batches) for b in range(n_batches)])
          if schedule == "cosine" else 0.05 for e in range(epochs)]
    if expected is None:  # by hand: after the first epoch whose distance per unit lr is <= 0.2 x epoch 0's
        v = [d / lr[e] for e, d in enumerate(distances)]
        lazy = [e for e in range(1, len(v)) if v[e] <= 0.2 * v[0]]
        expected = min(lazy[0] + 1, cap) if lazy else cap
        # per epoch it would have switched at 4 (0.018 <= 0.02); per unit of the cosine rate the
        # kernel still moves fast, so the switch waits for the cap
        assert expected == 5
    assert h.switch_epoch == expected
    assert h.strategy == ["normal"] * expected + ["pgd"] * (epochs - expected)
    measured = h.extra["switch_velocity"]
    assert measured[:expected] == pytest.approx([d / lr[e] for e, d in enumerate(distances[:expected])], rel=1e-12)
    assert measured[expected:] == [None] * (epochs - expected) and fake.calls == expected + 1
    # its measurement is training time
    # after the decision AutoSwitch's hooks return at once (an ordinary callback: still called)
    assert all(t > 0 for t in h.time_switch[:expected]) and max(h.time_switch[expected:]) < 0.01
    assert h.training_time == pytest.approx(sum(h.time_attack) + sum(h.time_update) + sum(h.time_switch))
    assert set(h.time_attack[:expected]) == {0.0} and min(h.time_attack[expected:]) > 0


def test_auto_switch_trains_like_the_fixed_switch_it_chose(tiny):
    """Measuring never changes the trajectory: the same weights as switch_epoch=<the chosen epoch>."""
    auto_model = cnn()
    auto = train(auto_model, tiny, epochs=5, milestones=(4,), switch_epoch="auto", **AUTO_KW)
    assert 2 <= auto.switch_epoch <= 4 and auto.extra["switch_velocity"][0] > 0
    fixed_model = cnn()
    fixed = train(fixed_model, tiny, epochs=5, milestones=(4,), switch_epoch=auto.switch_epoch, **AUTO_KW)
    assert fixed.switch_epoch == auto.switch_epoch and fixed.strategy == auto.strategy
    assert set(fixed.time_switch) == {0.0} and auto.training_time > sum(auto.time_attack) + sum(auto.time_update)
    for (name, a), b in zip(auto_model.state_dict().items(), fixed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_watching_auto_switch_decides_the_same_and_leaves_the_run_alone(tiny):
    """``steer=False`` (chapter 5 watches a normal run): the same velocities and decision as the
    steering switch of ``train(switch_epoch="auto")``, with the run untouched (its strategy, its
    history, its training time) and the measurement's CPU seconds on the callback."""
    from ntklab.train import MultiStepLR

    auto = train(cnn(), tiny, epochs=5, milestones=(4,), switch_epoch="auto", switch_probe=16, **AUTO_KW)
    probe = ntklab.data.subset(tiny, 16, seed=0).tensors[0]  # as train draws it (seed 0)
    lr = MultiStepLR(0.05, (4,))
    watcher = AutoSwitch(probe, 4, lr_of_epoch=lambda e: lr.epoch_mean(e, 3), bn_x=tiny.tensors[0],
                         bn_batch_size=64, steer=False)
    assert watcher.part_of_training is False and auto.switch_epoch is not None
    watched_model, plain_model = cnn(), cnn()
    watched = train(watched_model, tiny, epochs=5, milestones=(4,), switch_epoch=4, callbacks=[watcher], **AUTO_KW)
    plain = train(plain_model, tiny, epochs=5, milestones=(4,), switch_epoch=4, **AUTO_KW)
    assert watcher.switch_epoch == auto.switch_epoch and watcher.cpu_seconds > 0
    assert watcher.velocities == pytest.approx([v for v in auto.extra["switch_velocity"] if v is not None], rel=1e-6)
    assert watched.switch_epoch == 4 and watched.strategy == plain.strategy and "switch_velocity" not in watched.extra
    assert set(watched.time_switch) == {0.0} and sum(watched.time_callbacks) > 0
    for (name, a), b in zip(watched_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert watcher.state_dict()["cpu_seconds"] == watcher.cpu_seconds
    with pytest.raises(ValueError, match="steer"):
        AutoSwitch(probe, 4, steer="no")


def test_auto_switch_reference_is_the_kernel_sgd_starts_from(tiny):
    """With bn_x, the reference kernel is taken with the statistics of a statistics-only pass (the
    network SGD starts from), not with PyTorch's default buffers; the model is left untouched."""
    from ntklab import ntk
    from ntklab.bn import refresh_bn_statistics

    model, x = cnn(), tiny.tensors[0]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    switch = AutoSwitch(x[:8], cap=3, bn_x=x, bn_batch_size=64)
    switch.on_train_begin(model, ntklab.train.History())
    refreshed = ntk.empirical_ntk(refresh_bn_statistics(model, x, batch_size=64).eval(), x[:8], kind="trace")
    default = ntk.empirical_ntk(model.eval(), x[:8], kind="trace")
    assert torch.allclose(switch._kernel, refreshed, rtol=1e-5, atol=1e-6)
    assert metrics.kernel_distance(switch._kernel, default, center=True) > 1e-3  # the buffers matter
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


@pytest.mark.parametrize("when", ["before", "after"])
def test_auto_switch_resumes_from_a_checkpoint(tiny, tmp_path, when):
    kw = dict(epochs=6, milestones=(5,), switch_cap=4, switch_epoch="auto", switch_probe=16, **AUTO_KW)
    ref_model = cnn()
    ref = train(ref_model, tiny, **kw)
    s = ref.switch_epoch
    assert 2 <= s <= 4
    # the decision falls at the end of epoch s - 1; interrupting at the end of epoch e leaves the
    # checkpoint of epoch e - 1
    at = s - 2 if when == "before" else s
    with pytest.raises(KeyboardInterrupt):
        train(cnn(), tiny, callbacks=[Interrupt(at + 1)], checkpoint_dir=tmp_path, **kw)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    switch_state = [c["state"] for c in saved["callbacks"] if c["name"] == "AutoSwitch"][0]
    assert saved["history"]["epoch"][-1] == at
    if when == "before":
        assert saved["history"]["switch_epoch"] is None and switch_state["switch_epoch"] is None
        assert switch_state["kernel"].shape == (16, 16)  # the last kernel, for the next velocity
    else:
        assert saved["history"]["switch_epoch"] == s and saved["history"]["strategy"][-1] == "pgd"
    model = cnn(seed=99)  # the weights must come from the checkpoint
    h = train(model, tiny, callbacks=[Interrupt(-1)], checkpoint_dir=tmp_path, **kw)
    assert h.switch_epoch == s and strip_times(h.to_dict()) == strip_times(ref.to_dict())
    assert h.time_switch[:at + 1] == saved["history"]["time_switch"]  # kept from the checkpoint
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # a checkpoint of another switch rule is another run
    with pytest.raises(ValueError, match="switch_threshold: checkpoint 0.2, this call 0.3"):
        train(cnn(), tiny, checkpoint_dir=tmp_path, **{**kw, "switch_threshold": 0.3})


def test_auto_switch_rejects_bad_arguments(tiny):
    for kw, match in [({"switch_epoch": "soon"}, "switch_epoch must be 'auto'"),
                      ({"switch_epoch": True}, "switch_epoch must be 'auto'"),
                      ({"switch_epoch": "auto", "switch_cap": 4}, r"switch_cap must be an integer in \[1, epochs - 1 = 3\]"),
                      ({"switch_epoch": "auto", "switch_cap": 0}, "switch_cap"),
                      ({"switch_epoch": "auto", "epochs": 1}, "epochs >= 2"),
                      ({"switch_epoch": "auto", "switch_probe": 1}, "switch_probe"),
                      ({"switch_epoch": "auto", "switch_threshold": 1.5}, "switch_threshold")]:
        with pytest.raises(ValueError, match=match):
            train(cnn(), tiny, **{**AUTO_KW, "epochs": 4, **kw})


def test_default_cap_is_the_first_decay_or_half_the_epochs(tiny, monkeypatch):
    FakeKernels(monkeypatch, [0.1] * 10)  # never lazy: the switch comes at the cap
    assert train(cnn(), tiny, epochs=7, milestones=(5, 3), switch_epoch="auto", **AUTO_KW).switch_epoch == 3
    FakeKernels(monkeypatch, [0.1] * 10)
    assert train(cnn(), tiny, epochs=7, lr_schedule="constant", switch_epoch="auto", **AUTO_KW).switch_epoch == 3


# ---------------------------------------------------------------- kernel snapshots at a true initialisation
def _eval_ntk(model, x):
    with ntklab.bn.eval_mode(model):
        return ntklab.ntk.empirical_ntk(model, x, kind="trace").float()


def test_kernel_snapshots_take_k0_on_refreshed_statistics_and_leave_training_alone(tiny):
    from ntklab.bn import refresh_bn_statistics
    from ntklab.callbacks import KernelSnapshots

    x, y = tiny.tensors
    px, py = x[:12], y[:12]
    kw = dict(epochs=2, batch_size=64, lr=0.05, strategy="normal", device="cpu", progress=False)
    fresh = cnn()
    plain = KernelSnapshots(px, py, (0, 1, 2), ae=False)
    true = KernelSnapshots(px, py, (0, 1, 2), ae=True, eps=0.1, steps=1, statistics_x=x, statistics_batch_size=64,
                           floor=True)
    m_plain, m_true = cnn(), cnn()
    train(m_plain, tiny, callbacks=[plain], **kw)
    train(m_true, tiny, callbacks=[true], **kw)
    # the statistics pass runs on a copy: training is bit-identical
    for (k, a), b in zip(m_plain.state_dict().items(), m_true.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(plain.kernels()[1:], true.kernels()[1:])
    # K_0 is the kernel of the fresh network with statistics of the training images...
    k0 = _eval_ntk(refresh_bn_statistics(fresh, x, batch_size=64), px)
    default = _eval_ntk(fresh, px)
    assert torch.allclose(true.kernel(0), k0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(true.default_kernel, default, rtol=1e-5, atol=1e-6)
    assert metrics.kernel_distance(k0, default, center=True) > 1e-3          # the two K_0 differ
    # ... and without statistics inputs it is the default-buffer kernel (the negative control)
    assert plain.default_kernel is None
    assert torch.allclose(plain.kernel(0), default, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain.kernel(0), k0, rtol=1e-3, atol=1e-4)
    # the floor: at every snapshot the kernel of a refreshed twin; at 0 the snapshot itself
    R = true.kernels("refreshed")
    assert R.shape == true.kernels().shape and torch.equal(R[0], true.kernels()[0])
    assert torch.allclose(R[-1], _eval_ntk(refresh_bn_statistics(m_true, x, batch_size=64), px), rtol=1e-5, atol=1e-6)
    assert 0 < metrics.kernel_distance(R[-1], true.kernels()[-1], center=True) < 0.5
    with pytest.raises(ValueError, match="floor"):
        plain.kernels("refreshed")
    with pytest.raises(ValueError, match="statistics_x"):
        KernelSnapshots(px, py, floor=True)


# ---------------------------------------------------------------- best checkpoint (issue 20)
def test_best_checkpoint_keeps_the_earliest_best_epoch_and_its_weights():
    """On a made-up history: PGD accuracies 0.2, 0.5, None (not evaluated), 0.5 (a tie), 0.3."""
    from ntklab.callbacks import BestCheckpoint
    from ntklab.train import History

    cb, h, net = BestCheckpoint(), History(), torch.nn.Linear(2, 2)
    states = []
    for epoch, (pgd, clean) in enumerate([(0.2, 0.6), (0.5, 0.7), (None, None), (0.5, 0.9), (0.3, 0.95)]):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        states.append(copy.deepcopy(net.state_dict()))
        h.append(epoch=epoch, pgd_acc=pgd, clean_acc=clean)
        cb.on_epoch_end(epoch, net, h)
    assert (cb.best_epoch, cb.best_pgd_acc, cb.best_clean_acc) == (1, 0.5, 0.7)
    assert (h.best_epoch, h.best_pgd_acc, h.best_clean_acc) == (1, 0.5, 0.7)
    assert all(torch.equal(cb.best_state[k], states[1][k]) for k in states[1])
    assert not torch.equal(net.weight, states[1]["weight"])          # a copy: training went on
    fresh = torch.nn.Linear(2, 2)
    assert torch.equal(cb.load_into(fresh).weight, states[1]["weight"])
    again = BestCheckpoint()
    again.load_state_dict(cb.state_dict())
    assert again.best_epoch == 1 and torch.equal(again.best_state["weight"], states[1]["weight"])
    with pytest.raises(ValueError, match="no weights yet"):
        BestCheckpoint().load_into(fresh)


@pytest.fixture(scope="module")
def split():
    """(train, held out): 192 training and 48 test images of mnist5k, class-balanced."""
    return (ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 192, seed=0),
            ntklab.data.subset(ntklab.data.load("mnist5k", "test"), 48, seed=0))


class _EpochStates:
    def __init__(self):
        self.states = []

    def on_epoch_end(self, epoch, model, history):
        self.states.append(copy.deepcopy(model.state_dict()))


def _best_run(data, tmp_path=None, callbacks=(), **kw):
    kw = {"strategy": "fgsm_rs", "eps": 0.1, "epochs": 4, "batch_size": 64, "lr": 0.05, "keep_best": True,
          "eval_set": data[1], "eval_size": 32, "eval_steps": 3, **kw}
    torch.manual_seed(0)
    model = SmallCNN(width=4, mean=MEAN, std=STD)
    history = train(model, data[0], callbacks=list(callbacks), device="cpu", progress=False,
                    checkpoint_dir=tmp_path, **kw)
    return model, history


def test_keep_best_selects_the_best_evaluated_epoch(split):
    from ntklab.callbacks import BestCheckpoint

    cb, states = BestCheckpoint(), _EpochStates()
    model, h = _best_run(split, callbacks=[states, cb])
    assert h.pgd_acc == [a for a in h.pgd_acc if a is not None] and len(h.pgd_acc) == 4   # evaluated every epoch
    best = h.pgd_acc.index(max(h.pgd_acc))
    assert best < 3 and h.pgd_acc[best + 1] == h.pgd_acc[best]      # this run: a tie after the best (kept: the earlier)
    assert (h.best_epoch, h.best_pgd_acc, h.best_clean_acc) == (best, max(h.pgd_acc), h.clean_acc[best])
    assert cb.best_epoch == best and all(torch.equal(cb.best_state[k], v) for k, v in states.states[best].items())
    assert all(torch.equal(v, states.states[-1][k]) for k, v in model.state_dict().items())   # the model: the last
    # without a callback of its own the loop adds one: the same selection
    _, alone = _best_run(split)
    assert (alone.best_epoch, alone.best_pgd_acc) == (h.best_epoch, h.best_pgd_acc)


def test_keep_best_survives_resume(split, tmp_path):
    from ntklab.callbacks import BestCheckpoint

    ref_cb = BestCheckpoint()
    _, ref = _best_run(split, callbacks=[ref_cb], augment="crop_flip")
    with pytest.raises(KeyboardInterrupt):
        _best_run(split, tmp_path, callbacks=[BestCheckpoint(), Interrupt(2)], augment="crop_flip")
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert [s["name"] for s in state["callbacks"]] == ["BestCheckpoint"]    # the one passed; none added
    cb = BestCheckpoint()
    _, resumed = _best_run(split, tmp_path, callbacks=[cb, Interrupt(99)], augment="crop_flip")
    assert strip_times(resumed.to_dict()) == strip_times(ref.to_dict())
    assert cb.best_epoch == ref_cb.best_epoch and all(torch.equal(cb.best_state[k], v)
                                                      for k, v in ref_cb.best_state.items())
    # the loop's own BestCheckpoint is saved too
    _best_run(split, tmp_path / "own", epochs=1)
    assert [s["name"] for s in torch.load(tmp_path / "own" / CHECKPOINT_NAME, weights_only=True)["callbacks"]] \
        == ["BestCheckpoint"]


def test_keep_best_needs_an_eval_set_and_evaluation_every_epoch(split):
    from ntklab.train import TrainConfig

    with pytest.raises(ValueError, match="keep_best needs an eval_set"):
        _best_run(split, eval_set=None)
    with pytest.raises(ValueError, match="keep_best needs the held-out evaluation after every epoch.*eval_every=2"):
        TrainConfig(strategy="pgd", epochs=2, keep_best=True, eval_every=2)


def _selecting(profile, augment="crop_flip"):
    """``profile`` with ``select_best=True`` and ``augment``: the Profile fields of issue 20, which
    ntklab.config may not have yet (then a subclass adds them)."""
    import dataclasses

    from ntklab.config import Profile

    @dataclasses.dataclass(frozen=True)
    class Selecting(Profile):
        augment: str | None = None
        select_best: bool = False

    return Selecting(**{**dataclasses.asdict(profile), "augment": augment, "select_best": True})


def test_from_profile_maps_augment_and_select_best():
    from ntklab.config import get_profile
    from ntklab.train import TrainConfig

    plain = TrainConfig.from_profile(get_profile("smoke"), "pgd")
    assert plain.augment is None and plain.keep_best is False and plain.amp is None and not plain.channels_last

    prof = _selecting(get_profile("smoke"))
    config = TrainConfig.from_profile(prof, "pgd")
    assert config.augment == "crop_flip" and config.keep_best is True and config.eval_every == 1
    off = TrainConfig.from_profile(prof, "pgd", eval_every=0)        # not evaluated every epoch: no selection
    assert off.keep_best is False and off.augment == "crop_flip"
    with pytest.raises(ValueError, match="keep_best needs"):
        TrainConfig.from_profile(prof, "pgd", eval_every=0, keep_best=True)


def test_kernel_run_and_trained_model_report_the_best_and_the_last_checkpoint(tmp_path, monkeypatch):
    """Under a profile that selects the best checkpoint, the runs of chapters 4-5 and the models of
    trained_model gain the best epoch and its accuracies, evaluated as the last (an independent
    evaluation of the stored weights here); without it nothing is added and nothing is evaluated."""
    from ntklab import data, evaluate
    from ntklab.config import get_profile
    from ntklab.experiments import data_from_profile, model_from_profile, runs, trained_model

    monkeypatch.setenv("NTKLAB_RESULTS", str(tmp_path))
    cp = runs.chapter_profile(_selecting(get_profile("smoke"), augment=None)).replace(
        epochs=3, n_train=128, n_eval=32, n_probe=8, lr_milestones=(2,))
    res = runs.kernel_run(cp, "fgsm_rs", device="cpu", progress=False)
    h = res["history"]
    assert None not in h["pgd_acc"] and res["best_epoch"] == h["pgd_acc"].index(max(h["pgd_acc"])) == h["best_epoch"]
    test = data.subset(data_from_profile(cp)[1], cp.n_eval, seed=cp.seed)
    for prefix, key in (("best_", "best_state_dict"), ("", "state_dict")):
        net = model_from_profile(cp)
        net.load_state_dict(res[key])
        net.eval()
        torch.manual_seed(cp.seed)
        assert res[prefix + "clean_acc"] == evaluate.clean_accuracy(net, test)
        assert res[prefix + "robust_acc"] == evaluate.worst_case_accuracy(net, test, eps=cp.eps, attacks=["fgsm", "pgd"],
                                                                          alpha=cp.pgd_alpha, steps=cp.eval_pgd_steps)
    plain = runs.kernel_run(runs.chapter_profile(get_profile("smoke")).replace(epochs=1, n_probe=8), "normal",
                            device="cpu", progress=False)
    assert "best_epoch" not in plain and plain["history"]["pgd_acc"] == [None] and plain["history"]["best_epoch"] is None

    prof = _selecting(get_profile("smoke")).replace(epochs=3, n_train=128, n_eval=32)
    last, hist = trained_model(prof, "fgsm_rs", device="cpu", progress=False)
    best, again = trained_model(prof, "fgsm_rs", device="cpu", progress=False, which="best")   # from the cache
    assert hist == again and hist.best_epoch == hist.pgd_acc.index(max(hist.pgd_acc))
    assert hist.best_clean_acc == hist.clean_acc[hist.best_epoch]
    differ = any(not torch.equal(p, q) for p, q in zip(last.state_dict().values(), best.state_dict().values()))
    assert differ == (hist.best_epoch != len(hist) - 1)
    with pytest.raises(ValueError, match="which='best' needs a run that keeps its best checkpoint"):
        trained_model(get_profile("smoke"), "normal", device="cpu", which="best")
    with pytest.raises(ValueError, match="which must be 'last' or 'best'"):
        trained_model(prof, "normal", device="cpu", which="first")
