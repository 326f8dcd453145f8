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


def test_step_cost_per_round():
    rounds = step_cost({"a": lambda: busy(0.01), "b": lambda: busy(0.02)}, rounds=4, per_round=True)
    assert sorted(rounds) == ["a", "b"] and all(len(v) == 4 for v in rounds.values())
    assert min(rounds["b"]) >= 0.02 and min(rounds["a"]) >= 0.01


def test_training_step_costs_time_the_steps_of_train():
    """One step of each config on its own copy of the model: PGD-3 (three attack passes and the
    update) costs more than a normal step; the model itself is not trained."""
    from ntklab.train import TrainConfig, training_step_costs

    torch.manual_seed(0)
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    configs = {"normal": TrainConfig(strategy="normal", epochs=1),
               "pgd": TrainConfig(strategy="pgd", epochs=1, eps=0.1, steps=3)}
    costs = training_step_costs(model, [(x[:32], y[:32]), (x[32:], y[32:])], configs, rounds=3)
    assert sorted(costs) == ["normal", "pgd"] and 0 < costs["normal"] < costs["pgd"]
    per_round = training_step_costs(model, [(x, y)], configs, rounds=2, per_round=True)
    assert all(len(v) == 2 for v in per_round.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="at least one"):
        training_step_costs(model, [], configs)


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
