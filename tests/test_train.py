"""Tests of the training loop (ntklab.train) and its callbacks (ntklab.callbacks): the config,
strategies, switch epoch, LR schedules, random streams, timing, checkpoint/resume, kernel snapshots,
the CO detector."""
import copy
import dataclasses
import json
import logging
import math
import os
import time

import pytest
import torch

import ntklab
from ntklab.callbacks import Callback, CatastrophicOverfittingDetector, KernelSnapshots
from ntklab.models import SmallCNN
from ntklab.config import get_profile
from ntklab.train import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, STRATEGIES, STREAMS, ConstantLR, CosineLR, History,
                          MultiStepLR, TrainConfig, make_schedule, stream_seed, train)

MEAN, STD = ntklab.data.stats("mnist5k")


@pytest.fixture(scope="module")
def tiny():
    """(train, test): 256 and 64 class-balanced embedded MNIST images."""
    train_set = ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 256, seed=0)
    test_set = ntklab.data.subset(ntklab.data.load("mnist5k", "test"), 64, seed=0)
    return train_set, test_set


def cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4, mean=MEAN, std=STD)


def fit(train_set, **kw):
    kw = {"strategy": "normal", "epochs": 1, "batch_size": 64, "device": "cpu", "progress": False, **kw}
    model = kw.pop("model", None) or cnn()
    return model, train(model, train_set, **kw)


def strip_times(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("time_")}


class Interrupt(Callback):
    """Raises KeyboardInterrupt at the end of a given epoch, like Ctrl-C."""

    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, epoch, model, history):
        if epoch == self.at:
            raise KeyboardInterrupt


class CountEpochs(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, model, history):
        self.seen.append(epoch)


# ---------------------------------------------------------------- learning
def test_normal_training_learns(mnist_small):
    train_set, test_set = mnist_small
    _, h = fit(train_set, epochs=3, batch_size=32, eval_set=test_set, eval_size=200)
    assert h.loss[-1] < h.loss[0] - 0.3
    assert h.train_acc[-1] > 0.5 and h.clean_acc[-1] > 0.5  # chance is 0.1
    assert all(0 <= a <= c for a, c in zip(h.pgd_acc, h.clean_acc))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_one_epoch(tiny, strategy):
    steps = 2 if strategy in ("pgd", "trades") else None
    model, h = fit(tiny[0], strategy=strategy, eps=0.1, steps=steps)
    assert h.strategy == [strategy] and len(h) == 1 and h.finished
    assert math.isfinite(h.loss[0])
    assert (h.time_attack[0] > 0) == (strategy != "normal")
    assert (h.train_acc[0] is None) == (strategy == "trades")
    assert not model.training
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_switch_epoch_changes_strategy(tiny):
    _, h = fit(tiny[0], strategy="pgd", steps=1, epochs=3, switch_epoch=2)
    assert h.strategy == ["normal", "normal", "pgd"]
    assert h.time_attack[:2] == [0.0, 0.0] and h.time_attack[2] > 0


def test_progress_bars(tiny, capsys, monkeypatch):
    small = ntklab.data.subset(tiny[0], 64, seed=0)
    monkeypatch.setenv("NTKLAB_PROGRESS", "1")
    fit(small, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "normal epochs" in err and "2/2" in err and "loss=" in err
    fit(small, epochs=1, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("NTKLAB_PROGRESS", "0")        # the switch for all bars (ntklab._progress)
    fit(small, epochs=1, progress=True)
    assert capsys.readouterr().err == ""


def test_unknown_strategy_and_schedule(tiny):
    with pytest.raises(ValueError, match="valid strategies are: normal, fgsm"):
        fit(tiny[0], strategy="free_at")
    with pytest.raises(ValueError, match="multistep, cosine, constant"):
        fit(tiny[0], lr_schedule="linear")
    with pytest.raises(ValueError, match="switch_epoch"):
        fit(tiny[0], epochs=2, switch_epoch=3)
    with pytest.raises(ValueError, match="makes no multi-step attack"):
        fit(tiny[0], strategy="fgsm_rs", steps=5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit((tiny[0].tensors[0] * 255, tiny[0].tensors[1]))


# ---------------------------------------------------------------- learning-rate schedules
def test_schedule_values():
    ms = make_schedule("multistep", lr=0.1, epochs=200, milestones=(100, 150), gamma=0.1)
    assert [ms(e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = CosineLR(0.1, epochs=4)
    assert cos.per_batch and cos(0) == pytest.approx(0.1) and cos(4) == pytest.approx(0.0)
    assert cos(1, batch=5, num_batches=10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 1.5 / 4)))
    assert ConstantLR(0.3)(7) == 0.3


@pytest.mark.parametrize("schedule, expected", [
    ("multistep", [0.1, 0.01, 0.001]),
    ("constant", [0.1, 0.1, 0.1]),
    ("cosine", [0.1, 0.075, 0.025]),
    (MultiStepLR(0.2, (2,), 0.5), [0.2, 0.2, 0.1]),
])
def test_history_records_schedule(tiny, schedule, expected, monkeypatch):
    used, lrs = [None], []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):  # the rate the optimiser really uses
        used[0] = self.param_groups[0]["lr"]
        return real_step(self, *a, **k)

    class LastLR(Callback):  # the rate of each epoch's last batch
        def on_epoch_end(self, epoch, model, history):
            lrs.append(used[0])

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    _, h = fit(tiny[0], epochs=3, lr=0.1, lr_schedule=schedule, milestones=(1, 2), batch_size=128,
               callbacks=[LastLR()])
    assert h.lr == pytest.approx(expected)
    if schedule == "cosine":  # per batch: the second (last) batch of each epoch is lower still
        assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * (e + 0.5) / 3)) for e in range(3)])
    else:
        assert lrs == pytest.approx(expected)


# ---------------------------------------------------------------- history and timing
def test_history_times_and_serialisation(tiny):
    train_set, test_set = tiny

    class Slow(Callback):
        def on_epoch_end(self, epoch, model, history):
            time.sleep(0.1)

    start = time.perf_counter()
    _, h = fit(train_set, strategy="fgsm", epochs=2, eval_set=test_set, eval_every=2, callbacks=[Slow()])
    wall = time.perf_counter() - start
    for key in ("time_attack", "time_update", "time_eval", "time_callbacks"):
        for values in (getattr(h, key), getattr(h, key + "_cpu")):  # wall and process-CPU seconds
            assert len(values) == 2 and all(v >= 0 for v in values)
    assert h.training_time_cpu == pytest.approx(sum(h.time_attack_cpu) + sum(h.time_update_cpu)) and h.training_time_cpu > 0
    assert max(h.time_callbacks_cpu) < 0.1 <= min(h.time_callbacks)  # sleeping costs no CPU
    assert h.clean_acc[0] is None and h.clean_acc[1] is not None  # eval_every=2
    assert h.time_eval[1] > 0 and min(h.time_callbacks) >= 0.1
    assert h.training_time == pytest.approx(sum(h.time_attack) + sum(h.time_update))
    # measurement is not training: both fit in the wall time only if they are disjoint
    assert h.training_time + h.measurement_time <= wall
    back = History.from_dict(json.loads(json.dumps(h.to_dict())))
    assert back == h and back.training_time == h.training_time


def test_history_log_pads_extra():
    h = History()
    h.append(epoch=0, strategy="normal")
    h.append(epoch=1, strategy="normal")
    h.log("x", 1.5)
    h.append(epoch=2, strategy="normal")
    assert h.extra["x"] == [None, 1.5, None]
    with pytest.raises(ValueError):
        h.append(epoch=3, bogus=1)


# ---------------------------------------------------------------- checkpoint and resume
RESUME_KW = dict(strategy="fgsm_rs", epochs=3, eps=0.2, lr_schedule="cosine", eval_every=1, seed=3)


def snapshots(probe):
    return KernelSnapshots(probe[0], probe[1], epochs=(0, 1, 3), eps=0.2, steps=2)


def test_resume_after_interruption_is_bitwise_identical(tiny, tmp_path):
    train_set, test_set = tiny
    probe = ntklab.data.subset(train_set, 8, seed=1).tensors
    ref_snaps = snapshots(probe)
    ref, h_ref = fit(train_set, model=cnn(0), eval_set=test_set, callbacks=[ref_snaps], **RESUME_KW)

    snaps = snapshots(probe)
    with pytest.raises(KeyboardInterrupt):
        fit(train_set, model=cnn(0), eval_set=test_set, callbacks=[snaps, Interrupt(at=1)],
            checkpoint_dir=tmp_path, **RESUME_KW)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["history"]["epoch"] == [0] and not saved["history"]["finished"]

    resumed_snaps, count = snapshots(probe), CountEpochs()
    model = cnn(seed=99)  # another init: the weights must come from the checkpoint
    _, h = fit(train_set, model=model, eval_set=test_set, callbacks=[resumed_snaps, count],
               checkpoint_dir=tmp_path, **RESUME_KW)
    assert count.seen == [1, 2]  # epoch 0 was not trained again
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert strip_times(h.to_dict()) == strip_times(h_ref.to_dict())
    assert resumed_snaps.snapshot_epochs == ref_snaps.snapshot_epochs == [0, 1, 3]
    assert torch.equal(resumed_snaps.kernels("ae"), ref_snaps.kernels("ae"))

    # a finished run returns at once, with its weights and callback states
    again, count2, model2 = snapshots(probe), CountEpochs(), cnn(seed=5)
    _, h2 = fit(train_set, model=model2, eval_set=test_set, callbacks=[again, count2],
                checkpoint_dir=tmp_path, **RESUME_KW)
    assert count2.seen == [] and h2.to_dict() == h.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert torch.equal(again.kernels("clean"), ref_snaps.kernels("clean"))

    with pytest.raises(ValueError, match=r"different run \(.*eps: checkpoint 0.2, this call 0.3"):
        fit(train_set, model=cnn(0), eval_set=test_set, callbacks=[snapshots(probe)],
            checkpoint_dir=tmp_path, **{**RESUME_KW, "eps": 0.3})


def test_measurement_does_not_change_training(tiny):
    """Evaluation and callbacks draw random numbers from a fork: same weights with or without."""
    a, _ = fit(tiny[0], strategy="fgsm_rs", epochs=2, eps=0.2)
    b, _ = fit(tiny[0], strategy="fgsm_rs", epochs=2, eps=0.2, eval_set=tiny[1],
               callbacks=[CatastrophicOverfittingDetector(*tiny[1].tensors, eps=0.2, steps=2)])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_checkpoint_write_is_atomic(tiny, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):  # the second checkpoint dies half-way through writing
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny[0], epochs=3, checkpoint_dir=tmp_path)
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]  # no temporary file left behind
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["history"]["epoch"] == [0]  # the previous checkpoint, intact


# ---------------------------------------------------------------- callbacks
def test_kernel_snapshots_shapes_and_epochs(tiny):
    train_set = tiny[0]
    px, py = ntklab.data.subset(train_set, 6, seed=2).tensors
    model = cnn()
    initial = copy.deepcopy(model)
    snaps = KernelSnapshots(px, py, epochs=(0, 2), eps=0.1, steps=2)
    diag = KernelSnapshots(px, epochs=(1,), kind="diagonal", ae=False, dtype=torch.float16)
    _, h = fit(train_set, model=model, epochs=2, callbacks=[snaps, diag])
    assert snaps.snapshot_epochs == [0, 2] and diag.snapshot_epochs == [1]
    clean, ae = snaps.kernels("clean"), snaps.kernels("ae")
    assert clean.shape == ae.shape == (2, 6, 6) and clean.dtype == torch.float32 and clean.device.type == "cpu"
    assert diag.kernels("clean").shape == (1, 6, 6, 10) and diag._state["clean"][0].dtype == torch.float16
    assert not torch.allclose(clean, ae)
    assert torch.allclose(snaps.kernel(0), ntklab.ntk.empirical_ntk(initial, px, kind="trace"), rtol=1e-4)
    assert torch.allclose(snaps.kernel(2), ntklab.ntk.empirical_ntk(model, px, kind="trace"), rtol=1e-4)
    assert not torch.allclose(snaps.kernel(0), snaps.kernel(2), rtol=1e-3)
    assert len(snaps.probe_ae_acc) == 2 and all(0 <= a <= 1 for a in snaps.probe_ae_acc)
    with pytest.raises(ValueError, match="ae=False"):
        diag.kernels("ae")
    with pytest.raises(ValueError, match="probe_y"):
        KernelSnapshots(px)


def _break(model):
    """Constant predictions (class 0): any robust accuracy collapses to the share of class 0."""
    last = model.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(10.0).flip(0))


def test_co_detector_flags_a_drop(trained_cnn, mnist_small, caplog):
    x, y = mnist_small[1].tensors
    model = copy.deepcopy(trained_cnn)
    det = CatastrophicOverfittingDetector(x[:100], y[:100], eps=0.03, alpha=0.01, steps=5, drop=0.2)
    h = History()
    for epoch in range(3):
        h.append(epoch=epoch, strategy="fgsm")
        if epoch == 2:
            _break(model)
        with caplog.at_level(logging.WARNING, logger="ntklab.train"):
            det.on_epoch_end(epoch, model, h)
    assert h.extra["co_flag"] == [False, False, True]
    assert h.extra["co_robust_acc"][0] > 0.5 and h.extra["co_robust_acc"][2] < 0.2
    assert det.flagged_epochs == [2] and "catastrophic overfitting at epoch 2" in caplog.text
    assert h.stop_reason is None  # stop=False only flags


def test_co_detector_stops_the_loop(trained_cnn, mnist_small):
    train_set, test_set = mnist_small
    x, y = test_set.tensors

    class Breaker(Callback):
        def on_epoch_end(self, epoch, model, history):
            if epoch == 1:
                _break(model)

    det = CatastrophicOverfittingDetector(x[:100], y[:100], eps=0.03, steps=5, stop=True)
    model = copy.deepcopy(trained_cnn)
    _, h = fit(ntklab.data.subset(train_set, 128, seed=0), model=model, epochs=5, lr=1e-12,
               lr_schedule="constant", weight_decay=0.0, callbacks=[Breaker(), det])
    assert len(h) == 2 and h.finished and "catastrophic overfitting" in h.stop_reason
    assert h.extra["co_flag"] == [False, True]


# ---------------------------------------------------------------- the config
def test_train_config_is_checked_frozen_and_replaced():
    config = TrainConfig(strategy="pgd", epochs=3, milestones=[2])
    assert config.milestones == (2,) and config.alpha is None  # defaults are resolved where used
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eps = 0.1
    other = config.replace(eps=0.2)
    assert other.eps == 0.2 and config.eps == 0.3 and other.replace() is other
    for changes, message in [({"epochs": -1}, "epochs must be an integer >= 0"), ({"strategy": "adam"}, "unknown strategy"),
                             ({"switch_epoch": 4}, r"switch_epoch must be in \[0, epochs=3\]"),
                             ({"bogus": 1, "eps": 0.1}, "unknown training option.*'bogus'"),
                             ({"attack_kwargs": {"eps": 0.1}}, "must not hold"),
                             ({"strategy": "normal", "attack_kwargs": {"noise": 0.1}}, "attack_kwargs is for")]:
        with pytest.raises(ValueError, match=message):
            config.replace(**changes)
    # the plain form is what checkpoints and cache keys hold
    d = config.replace(lr_schedule=MultiStepLR(0.1, (1,)), attack_kwargs={"random_start": True}).to_dict()
    assert json.loads(json.dumps(d)) == d and d["lr_schedule"]["class"] == "MultiStepLR"
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_train_takes_a_config_or_its_fields_and_names_an_unknown_keyword(tiny):
    config = TrainConfig(strategy="fgsm", epochs=2, batch_size=64, eps=0.1, seed=4)
    a, ha = cnn(), None
    ha = train(a, tiny[0], config, epochs=1, device="cpu", progress=False)   # a field overridden
    b, hb = fit(tiny[0], strategy="fgsm", epochs=1, eps=0.1, seed=4)
    assert len(ha) == 1 and strip_times(ha.to_dict()) == strip_times(hb.to_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="unknown training option.*'learning_rate'"):
        fit(tiny[0], learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown training option.*'learning_rate'"):
        train(cnn(), tiny[0], config, learning_rate=0.1)
    with pytest.raises(TypeError, match="strategy"):
        train(cnn(), tiny[0], epochs=1)


def test_config_from_profile():
    profile = get_profile("smoke")
    pgd = TrainConfig.from_profile(profile, "pgd")
    assert (pgd.epochs, pgd.lr, pgd.eps, pgd.steps, pgd.alpha) == (profile.epochs, profile.lr, profile.eps,
                                                                   profile.pgd_steps, profile.pgd_alpha)
    fgsm = TrainConfig.from_profile(profile, "fgsm", epochs=1)
    assert fgsm.alpha is None and fgsm.steps is None and fgsm.epochs == 1
    assert ntklab.experiments.train_kwargs(profile, "pgd") == {
        k: v for k, v in dataclasses.asdict(pgd).items() if v is not None}


# ---------------------------------------------------------------- random streams
def test_random_streams_cannot_collide_over_cifar_sized_epochs():
    """Every consumer, epoch and batch has its own seed: 391 batches (CIFAR-10 at batch 128) and a
    few epochs and callbacks; the shuffle's generator is seeded with the seed itself. The old scheme,
    seed * 1_000_003 + epoch * 101 + salt with salt 3 + b for the batch callbacks and 3 for
    AutoSwitch, fails the same count (the negative control)."""
    epochs, batches, callbacks = range(-1, 4), range(392), range(4)
    keys = [("eval", 0, e, 0) for e in epochs] + [("attack", 0, e, b) for e in epochs for b in batches]
    keys += [("callback", i, e, b) for i in callbacks for e in epochs for b in batches]
    keys += [("augment", 0, e, b) for e in epochs for b in batches]
    for seed in (0, 1):
        seeds = [stream_seed(seed, s, index=i, epoch=e, batch=b) for s, i, e, b in keys] + [seed]
        assert len(set(seeds)) == len(keys) + 1 and all(0 <= x < 2**64 for x in seeds)
    assert stream_seed(0, "attack", epoch=1) != stream_seed(1, "attack", epoch=1)
    old = [0 * 1_000_003 + e * 101 + salt for e in epochs for salt in [1, 2, 3] + [3 + b for b in batches]]
    assert len(set(old)) < len(old)
    assert set(STREAMS) == {"attack", "eval", "callback", "augment"}
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "dropout")


def test_the_attack_stream_is_per_batch(tiny, monkeypatch):
    """The random start of every batch's attack comes from that batch's own stream."""
    starts = []
    real = ntklab.attacks.adversarial_examples

    def attack(*args, **kw):  # the random state the attack starts from
        starts.append(torch.get_rng_state())
        return real(*args, **kw)

    monkeypatch.setattr(ntklab.attacks, "adversarial_examples", attack)
    fit(tiny[0], strategy="fgsm_rs", eps=0.1, epochs=2, batch_size=128, seed=5)
    expected = [torch.Generator().manual_seed(stream_seed(5, "attack", epoch=e, batch=b)).get_state()
                for e in range(2) for b in range(2)]
    assert len(starts) == 4 and all(torch.equal(a, b) for a, b in zip(starts, expected))


def test_normal_training_shuffles_as_before(tiny):
    """The order of the batches is a generator seeded with the seed, one permutation per epoch: a
    run without random attacks is the hand-written loop over those permutations."""
    model, _ = fit(tiny[0], epochs=2, batch_size=64, lr=0.05, lr_schedule="constant", seed=7)
    ref = cnn()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(7)
    x, y = tiny[0].tensors
    ref.train()
    for _ in range(2):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(model.parameters(), ref.parameters()))


def test_callbacks_draw_from_their_own_streams(tiny):
    class Draw(Callback):
        def __init__(self):
            self.draws = []

        def on_epoch_end(self, epoch, model, history):
            self.draws.append(torch.rand(1).item())

        def on_batch_end(self, epoch, batch, num_batches, model, history):
            self.draws.append(torch.rand(1).item())

    first, second = Draw(), Draw()
    fit(tiny[0], epochs=2, batch_size=128, callbacks=[first, second])
    assert len(first.draws) == 6 and len(set(first.draws + second.draws)) == 12
    again = Draw()
    fit(tiny[0], epochs=2, batch_size=128, callbacks=[again])
    assert again.draws == first.draws  # a callback's numbers depend on its place, not on the others


# ---------------------------------------------------------------- checkpoint format
def test_a_checkpoint_of_another_format_is_refused(tiny, tmp_path):
    fit(tiny[0], epochs=1, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["config"]["strategy"] == "normal"
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(state["config"])
    state["format"] = CHECKPOINT_FORMAT - 1
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=f"format {CHECKPOINT_FORMAT - 1}.*reads format {CHECKPOINT_FORMAT}.*delete"):
        fit(tiny[0], epochs=1, checkpoint_dir=tmp_path)


def test_history_from_dict_refuses_another_layout():
    h = History()
    h.append(epoch=0, strategy="normal", time_attack=1.0, time_update_cpu=2.0)
    assert History.from_dict(h.to_dict()) == h and h.training_time_cpu == 2.0
    with pytest.raises(ValueError, match="unknown keys \\['time_old'\\]"):
        History.from_dict({**h.to_dict(), "time_old": [0.0]})


# ---------------------------------------------------------------- augmentation (issue 20)
def _torchvision_crop_flip(x, top, left, flip, padding):
    """The reference: torchvision.transforms.v2.functional on one image at a time."""
    from torchvision.transforms.v2 import functional as TF

    h, w = x.shape[-2:]
    out = []
    for img, t, l, f in zip(x, top.tolist(), left.tolist(), flip.tolist()):
        img = TF.crop(TF.pad(img, [padding], fill=0), t, l, h, w)
        out.append(TF.horizontal_flip(img) if f else img)
    return torch.stack(out)


@pytest.mark.parametrize("padding, shape", [(4, (16, 3, 32, 32)), (4, (9, 1, 10, 12)), (2, (6, 2, 7, 5)), (0, (8, 3, 6, 6))])
def test_augment_crop_flip_matches_torchvision_image_by_image(padding, shape):
    from ntklab.augment import augment_crop_flip, crop_flip_parameters

    x = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    out = augment_crop_flip(x, padding=padding, generator=torch.Generator().manual_seed(11))
    top, left, flip = crop_flip_parameters(shape[0], padding, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out, _torchvision_crop_flip(x, top, left, flip, padding))
    assert torch.equal(x, before) and out.shape == x.shape and out.dtype == x.dtype


def test_augment_crop_flip_draws_every_offset_and_flips_half():
    from ntklab.augment import augment_crop_flip, crop_flip_parameters

    top, left, flip = crop_flip_parameters(4000, 4, generator=torch.Generator().manual_seed(0))
    assert set(top.tolist()) == set(range(9)) == set(left.tolist())    # torchvision's {0, ..., 2 * padding}
    assert abs(flip.float().mean().item() - 0.5) < 0.03
    x = torch.rand(64, 3, 8, 8)
    a = augment_crop_flip(x, generator=torch.Generator().manual_seed(1))
    b = augment_crop_flip(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, augment_crop_flip(x, generator=torch.Generator().manual_seed(2)))
    cl = augment_crop_flip(x.contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cl, a) and cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="padding"):
        augment_crop_flip(x, padding=-1)
    with pytest.raises(ValueError, match="4-D"):
        augment_crop_flip(x[0])


def test_existing_random_streams_keep_their_seeds():
    """"augment" is appended: the seeds of the streams that were there before are the hash of the
    same key as before (their place in the old tuple), so a run without augment is unchanged."""
    import hashlib
    import struct

    assert STREAMS[:3] == ("attack", "eval", "callback") and STREAMS[3] == "augment"
    for place, stream in enumerate(("attack", "eval", "callback")):
        for seed, index, epoch, batch in ((0, 0, 0, 0), (7, 2, -1, 5), (2**40, 1, 3, 390)):
            key = struct.pack("<Q4q", seed, place, index, epoch + 1, batch)
            old = int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"ntklab.stream").digest(), "little")
            assert stream_seed(seed, stream, index=index, epoch=epoch, batch=batch) == old


def test_augment_feeds_the_attack_augmented_batches_from_their_own_stream(tiny, monkeypatch):
    """The attack sees the clean batch of the epoch's permutation, cropped and flipped with the
    batch's "augment" stream (an independent replay of both), before it crafts anything."""
    from ntklab import attacks
    from ntklab.augment import augment_crop_flip

    seen = []
    real = attacks.adversarial_examples
    monkeypatch.setattr(attacks, "adversarial_examples", lambda s, m, x, y, **kw: (seen.append(x.clone()),
                                                                                  real(s, m, x, y, **kw))[1])
    x, y = tiny[0].tensors
    fit(tiny[0], strategy="fgsm_rs", eps=0.1, epochs=2, batch_size=100, augment="crop_flip", seed=5)
    shuffle = torch.Generator().manual_seed(5)
    expected = []
    for epoch in range(2):
        for b, idx in enumerate(torch.randperm(len(y), generator=shuffle).split(100)):
            g = torch.Generator().manual_seed(stream_seed(5, "augment", epoch=epoch, batch=b))
            expected.append(augment_crop_flip(x[idx], generator=g))
    assert len(seen) == len(expected) == 6 and all(torch.equal(a, e) for a, e in zip(seen, expected))


def test_resume_with_augment_is_exact(tiny, tmp_path):
    kw = dict(strategy="pgd", eps=0.1, steps=2, epochs=3, augment="crop_flip", eval_set=tiny[1], eval_size=16,
              eval_steps=2)
    ref_model, ref = fit(tiny[0], **kw)
    _, plain = fit(tiny[0], **{**kw, "augment": None})
    assert strip_times(plain.to_dict()) != strip_times(ref.to_dict())      # the augmentation changed the run
    with pytest.raises(KeyboardInterrupt):
        fit(tiny[0], **kw, checkpoint_dir=tmp_path, callbacks=[Interrupt(1)])
    model, resumed = fit(tiny[0], **kw, checkpoint_dir=tmp_path)
    assert strip_times(resumed.to_dict()) == strip_times(ref.to_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()))


# ---------------------------------------------------------------- mixed precision, channels_last (issue 20)
def test_bf16_autocasts_the_update_only_and_keeps_float32_weights(tiny):
    x, y = tiny[0].tensors
    one = TrainConfig(strategy="pgd", epochs=1, batch_size=len(y), eps=0.1, steps=2)   # one batch: the first step's loss
    model = cnn()
    dtypes = []
    model.register_forward_hook(lambda m, i, out: dtypes.append((torch.is_grad_enabled(), m.training, out.dtype)))
    h16 = train(model, tiny[0], one, amp="bf16", eval_set=tiny[1], eval_size=16, eval_steps=2, device="cpu", progress=False)
    _, h32 = fit(tiny[0], **{k: getattr(one, k) for k in ("strategy", "epochs", "batch_size", "eps", "steps")})
    bf16 = torch.finfo(torch.bfloat16).eps
    assert abs(h16.loss[0] - h32.loss[0]) <= 4 * bf16 * abs(h32.loss[0]) and h16.loss[0] != h32.loss[0]
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    # the update's forward (train mode, the one step) in bfloat16; the PGD steps and the evaluation in float32
    assert sum(d == torch.bfloat16 for *_, d in dtypes) == 1
    assert sum(d == torch.float32 for *_, d in dtypes) >= 2 + 2
    _, long = fit(tiny[0], strategy="fgsm_rs", eps=0.1, epochs=2, amp="bf16", clean_update=True)
    assert all(math.isfinite(v) for v in long.loss) and long.loss[1] < long.loss[0]


def test_channels_last_gives_the_same_weights(tiny):
    from tolerances import n_params, rel_err, sum_rtol

    kw = dict(strategy="pgd", eps=0.1, steps=2, epochs=2, batch_size=64, augment="crop_flip")
    ref_model, ref = fit(tiny[0], **kw)
    seen = []
    model = cnn()
    second = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]     # 4 input channels, not 1
    second.register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)
                                                              and not i[0].is_contiguous()))
    _, h = fit(tiny[0], **kw, channels_last=True, model=model)
    assert all(seen) and len(seen) > 0
    assert second.weight.is_contiguous(memory_format=torch.channels_last) and not second.weight.is_contiguous()
    tol = sum_rtol(torch.float32, n_params(model))
    for name, p in model.state_dict().items():
        if p.is_floating_point():
            assert rel_err(p, ref_model.state_dict()[name]) <= tol, name
    assert h.train_acc == ref.train_acc


@pytest.mark.parametrize("field, value, match", [
    ("augment", "cutout", "augment must be None or one of 'crop_flip'"),
    ("amp", "fp16", "amp must be None or 'bf16'"),
    ("amp", True, "amp must be None or 'bf16'"),
    ("channels_last", 1, "channels_last must be True or False"),
    ("keep_best", "yes", "keep_best must be True or False"),
])
def test_bad_speed_and_selection_options_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(strategy="pgd", epochs=1, **{field: value})


def test_amp_is_refused_for_trades():
    with pytest.raises(ValueError, match="amp does not apply to 'trades'"):
        TrainConfig(strategy="trades", epochs=1, amp="bf16")


def test_new_fields_come_last_in_order():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names.index("seed") < names.index("augment") < names.index("amp") < names.index("channels_last") \
        < names.index("keep_best")


# ---------------------------------------------------------------- GradAlign (chapter 6)
def test_gradalign_with_lambda_zero_trains_as_fgsm(tiny):
    m1, h1 = fit(tiny[0], strategy="fgsm", eps=0.1)
    m2, h2 = fit(tiny[0], strategy="gradalign", eps=0.1, gradalign_lambda=0.0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert h2.train_acc[0] is not None and abs(h1.train_acc[0] - h2.train_acc[0]) < 1e-9
    m3, _ = fit(tiny[0], strategy="gradalign", eps=0.1, gradalign_lambda=1.0)     # the regulariser acts
    assert max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m3.parameters())) > 1e-4


def test_gradalign_refuses_what_it_does_not_use(tiny):
    for bad in ({"alpha": 0.1}, {"attack_kwargs": {"noise": 0.1}}, {"amp": "bf16"}, {"gradalign_lambda": -1.0}):
        with pytest.raises(ValueError):
            TrainConfig(strategy="gradalign", epochs=1, eps=0.1, **bad)


def test_loss_step_is_one_sgd_update_from_zeroed_gradients():
    """ntklab.train.loss_step zeroes stale gradients, backpropagates the loss and steps: the weights
    move by -lr times the loss's own gradient (checked by hand), whatever gradient was left before."""
    from ntklab.train import loss_step

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    w0 = lin.weight.detach().clone()
    (lin(x) ** 2).sum().backward()                     # a stale gradient that must not leak in
    loss = lin(x).sum()
    grad = torch.autograd.grad(loss, lin.weight, retain_graph=True)[0]
    loss_step(torch.optim.SGD(lin.parameters(), lr=0.1), loss)
    assert torch.allclose(lin.weight, w0 - 0.1 * grad, atol=1e-14)
    assert not torch.allclose(grad, torch.zeros_like(grad))
