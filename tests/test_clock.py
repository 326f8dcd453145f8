"""Tests of ntklab.clock: the wall/CPU clock of every run and the interleaved step cost."""
import time

import pytest
import torch

import ntklab
from ntklab.callbacks import Callback
from ntklab.clock import Clock, step_cost
from ntklab.models import SmallCNN
from ntklab.train import train


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_clock_records_wall_and_cpu_seconds():
    clock = Clock("cpu")
    with clock.interval("sleep"):
        time.sleep(0.2)
    start = clock.now()
    busy(0.2)
    clock.add("busy", start)
    clock.add("busy", start, start)  # an empty interval adds nothing
    assert set(clock.collect("sleep")) == {"sleep"}  # the others stay
    totals = clock.collect()
    assert set(totals) == {"busy"} and clock.collect() == {}
    wall, cpu = totals["busy"]
    assert cpu >= 0.2 and wall >= cpu * 0.9


def test_sleeping_is_wall_time_only():
    clock = Clock()
    with clock.interval("sleep"):
        time.sleep(0.2)
    wall, cpu = clock.collect()["sleep"]
    assert wall >= 0.2 and cpu < 0.05


def test_step_cost_is_per_call_and_interleaved():
    order = []

    def step(name, seconds):
        def run():
            order.append(name)
            busy(seconds)
        return run

    costs = step_cost({"cheap": step("cheap", 0.01), "dear": step("dear", 0.05)}, rounds=3, batches=2)
    assert set(costs) == {"cheap", "dear"}
    assert 0.01 <= costs["cheap"] < costs["dear"] and costs["dear"] >= 0.05
    assert order == ["cheap", "cheap", "dear", "dear"] * 3  # round after round, every method in turn
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        step_cost({"a": lambda: None}, rounds=0)


def test_training_cpu_time_excludes_measurement_and_survives_a_checkpoint(tmp_path):
    """What the chapters' runs once measured with a clock of their own: CPU seconds of every epoch's training, without the
    measurements, kept across an interruption."""
    from test_train import Interrupt

    class Busy(Callback):  # a measurement that burns CPU: it must not count as training
        def on_epoch_end(self, epoch, model, history):
            busy(0.3)

    data = ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 256, seed=0)
    mean, std = ntklab.data.stats("mnist5k")

    def model():
        torch.manual_seed(0)
        return SmallCNN(width=4, mean=mean, std=std)

    kw = dict(strategy="normal", epochs=3, batch_size=64, device="cpu", progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(model(), data, callbacks=[Busy(), Interrupt(at=1)], **kw)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    h = train(model(), data, callbacks=[Busy(), Callback()], **kw)
    cpu = h.epoch_training_times(cpu=True)
    assert len(cpu) == 3 and cpu[0] == saved["time_update_cpu"][0] + saved["time_attack_cpu"][0]
    assert all(0 < t < 0.3 for t in cpu) and min(h.time_callbacks_cpu) >= 0.3
    assert h.training_time_cpu == pytest.approx(sum(cpu))
