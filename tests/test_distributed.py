"""Training under torchrun (ntklab.distributed, the DDP path of ntklab.train.train, the cache's rank 0).

One launch of ``python -m torch.distributed.run --nproc_per_node=2`` (gloo, CPU) runs this file as
its worker (``--worker``): the ``smoke`` profile's model (SmallCNN width 4, BN on) trained for 2
epochs with FGSM and ``sync_bn=True``, in float64; the tests compare what the two ranks did with a
single-process run of the same config, made here in the pytest process. FGSM, not PGD: PGD's
random start comes from each rank's own stream, so a PGD run under 2 processes is another sample,
not the same run.

Tolerance of the comparison: 1e-9 (absolute, on weights of order 0.1-1; relative on the kernel).
The two runs differ only in the order of float sums (each rank sums its half of every batch, the
BN statistics and the gradients are then all-reduced, DDP averages the two gradients, the last
batch's halves are weighted 30/59 and 29/59): float64 rounding, about 1e-16 per operation, grown
by 8 SGD steps with momentum. Measured: 1.3e-14 on the weights.

The model uses average pooling (``pool="avg"``, otherwise the smoke model): with max pooling the
runs part after the first update (weights 7e-3 apart after 2 epochs, though 2e-15 apart after one
batch), because MNIST's constant background gives max-pooling windows whose values tie up to the
last bit, so a 1e-15 change of the weights moves the argmax, routes the input gradient to another
pixel and flips FGSM's sign() there (102 pixels of the second batch). That is a property of FGSM
on max-pooled MNIST (one process with the batch summed in another order would part the same way),
not of the distribution; the smooth pooling removes the ties and leaves the float noise. The radius
is 0.03, not smoke's 0.3: at 0.3 (and 0.05) two epochs of FGSM kill every ReLU of the width-4
network, whose trace kernel is then the constant 10 (the last layer's bias alone), and comparing
it would show nothing; the test checks that the kernel it compares is not constant.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

N_TRAIN = 251          # smoke's batch 64: 3 batches of 64 and a last one of 59, split 30/29 (weighted)
TOL = 1e-9
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the run both sides make
def _run_setup(sync_bn: bool = True, strategy: str = "fgsm"):
    """(model, train_set, eval_set, config, probe) of the smoke profile, float64, seeded."""
    from ntklab import data
    from ntklab.config import get_profile
    from ntklab.experiments import data_from_profile, model_from_profile
    from ntklab.train import TrainConfig

    profile = get_profile("smoke")
    profile = profile.replace(model_kwargs={**profile.model_kwargs, "pool": "avg"})  # see the module docstring
    train_set, test_set = data_from_profile(profile)
    x, y = train_set.tensors
    train_set = torch.utils.data.TensorDataset(x[:N_TRAIN].double(), y[:N_TRAIN])
    test_set = torch.utils.data.TensorDataset(test_set.tensors[0].double(), test_set.tensors[1])
    torch.manual_seed(profile.seed)
    model = model_from_profile(profile).double()
    config = TrainConfig.from_profile(profile, strategy, sync_bn=sync_bn, eval_size=32, eps=0.03)
    probe = data.subset(test_set, 6, seed=1).tensors[0].double()
    return model, train_set, test_set, config, probe


class _Interrupt:
    """Raises after epoch ``at`` (0-based) has been trained, before its checkpoint is written."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_end(self, epoch, model, history):
        if epoch == self.at:
            raise RuntimeError("interrupted on purpose")


def _snapshots(probe):
    from ntklab.callbacks import KernelSnapshots

    return KernelSnapshots(probe, epochs=[0, 2], ae=False, dtype=torch.float64)


def _train_mode_attack_run() -> dict:
    """One epoch of FGSM crafted with train-mode BN (the batch's statistics: the global batch's under
    ``sync_bn``, through the attack's view of the model); the final weights."""
    from ntklab import train as T

    model, train_set, _, config, _ = _run_setup()
    T.train(model, train_set, config.replace(epochs=1, attack_bn_mode="train"), progress=False)
    return _weights(model)


def _augmented_run() -> dict:
    """One epoch with crop-and-flip augmentation: the global batch is augmented as one process
    augments it, then sharded, so two processes must train as one here too."""
    from ntklab import train as T

    model, data, _, config, _ = _run_setup()
    T.train(model, data, config.replace(epochs=1, augment="crop_flip"), progress=False)
    return _weights(model)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the worker (under torchrun)
def _worker(out: Path) -> None:
    from ntklab import distributed, ntk
    from ntklab import train as T
    from ntklab.experiments import cache

    torch.set_num_threads(1)
    assert distributed.init_from_env()
    r = distributed.rank()
    writes = []
    save = T.atomic_save
    T.atomic_save = lambda obj, path: (writes.append(str(path)), save(obj, path))[1]
    seen = []
    T._index_hook = lambda epoch, batch, idx: seen.append((epoch, batch, idx.tolist()))

    model, train_set, eval_set, config, probe = _run_setup()
    snap = _snapshots(probe)
    history = T.train(model, train_set, config, eval_set=eval_set, callbacks=[snap],
                      checkpoint_dir=out / "run", progress=False)
    T._index_hook = None
    result = {"rank": r, "world": distributed.world_size(), "seen": seen, "writes": writes,
              "history": history.to_dict(), "weights": _weights(model),
              "kernel": ntk.empirical_ntk(model, probe, kind="trace"),
              "snapshots": snap.kernels("clean"), "snapshot_epochs": snap.snapshot_epochs}

    # interrupted after epoch 1 (its checkpoint written), then resumed by the same call
    model2, *_ = _run_setup()
    try:
        T.train(model2, train_set, config, eval_set=eval_set, callbacks=[_Interrupt(1)],
                checkpoint_dir=out / "resumed", progress=False)
    except RuntimeError as err:
        result["interrupt"] = str(err)
    resumed = T.train(model2, train_set, config, eval_set=eval_set, checkpoint_dir=out / "resumed", progress=False)
    result.update(resumed_history=resumed.to_dict(), resumed_weights=_weights(model2))

    # without sync_bn; and TRADES (its attack inside the loss, through DistributedDataParallel)
    for key, kw in (("unsynced", {"sync_bn": False}), ("trades", {"strategy": "trades"})):
        m, data, ev, cfg, _ = _run_setup(**kw)
        T.train(m, data, cfg.replace(epochs=1), progress=False)
        result[key] = _weights(m)
    result["train_mode_attack"] = _train_mode_attack_run()
    result["augmented"] = _augmented_run()

    # the cache: both ranks compute (as training needs), rank 0 alone writes; then both load
    calls = []

    def compute():
        calls.append("computed")
        return {"value": torch.tensor([float(r)])}

    first = cache.cached("ddp_entry", {"a": 1}, compute, root=out / "results", module="ntklab.train")
    second = cache.cached("ddp_entry", {"a": 1}, compute, root=out / "results", module="ntklab.train")
    result.update(cache_calls=calls, cache_first=first, cache_second=second,
                  cache_files=sorted(p.name for p in (out / "results" / "ddp_entry").iterdir()))

    # the command line under torchrun: every rank runs, rank 0 alone prints
    import contextlib
    import io

    import dummy_experiment
    from ntklab.__main__ import main

    printed = io.StringIO()
    with dummy_experiment.registered(), contextlib.redirect_stdout(printed):
        result["cli_code"] = main(["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(out / "cli")])
    result["cli_printed"] = printed.getvalue()
    torch.save(result, out / f"rank{r}.pt")


# ------------------------------------------------------------------ the tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results of one torchrun launch of :func:`_worker` (2 processes, gloo)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NTKLAB_DIST_TIMEOUT": "120"}
    env.pop("NTKLAB_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, "--worker", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.fixture(scope="module")
def single():
    """The same run in one process (no process group), recording every batch's indices."""
    from ntklab import ntk
    from ntklab import train as T

    seen = []
    T._index_hook = lambda epoch, batch, idx: seen.append((epoch, batch, idx.tolist()))
    try:
        model, train_set, eval_set, config, probe = _run_setup()
        snap = _snapshots(probe)
        history = T.train(model, train_set, config, eval_set=eval_set, callbacks=[snap], progress=False)
    finally:
        T._index_hook = None
    return {"seen": seen, "history": history.to_dict(), "weights": _weights(model),
            "kernel": ntk.empirical_ntk(model, probe, kind="trace"), "snapshots": snap.kernels("clean"),
            "train_mode_attack": _train_mode_attack_run(), "augmented": _augmented_run()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def test_the_ranks_see_together_what_one_process_sees(ranks, single):
    (r0, r1), _ = ranks
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    by_batch = {(e, b): idx for e, b, idx in single["seen"]}
    assert len(by_batch) == 2 * 4
    for rank in (r0, r1):
        assert [(e, b) for e, b, _ in rank["seen"]] == list(by_batch)
    for (e, b, i0), (_, _, i1) in zip(r0["seen"], r1["seen"]):
        whole = by_batch[(e, b)]
        assert not set(i0) & set(i1)                       # a partition of the global batch ...
        assert sorted(i0 + i1) == sorted(whole)            # ... into positions r::2 of it
        assert i0 == whole[0::2] and i1 == whole[1::2]
    for epoch in (0, 1):
        together = sorted(i for rank in (r0, r1) for e, _, idx in rank["seen"] if e == epoch for i in idx)
        assert together == list(range(N_TRAIN))


def test_two_processes_train_as_one(ranks, single):
    (r0, r1), _ = ranks
    assert _max_diff(r0["weights"], r1["weights"]) == 0.0      # DDP: the same update on both ranks
    diff = _max_diff(r0["weights"], single["weights"])
    print(f"\n2 processes against 1: weights differ by at most {diff:.2e}")
    assert diff < TOL
    h, h1 = r0["history"], single["history"]
    assert r1["history"]["clean_acc"] == h["clean_acc"] and r1["history"]["pgd_acc"] == h["pgd_acc"]
    for key in ("train_acc", "clean_acc", "pgd_acc", "strategy", "lr"):
        assert h[key] == h1[key], key
    assert h["loss"] == pytest.approx(h1["loss"], rel=1e-6, abs=0)   # the loop sums the epoch's loss in float32
    # the same weights after two epochs is a test that can fail: without sync_bn they are not
    assert _max_diff(r0["unsynced"], r1["unsynced"]) == 0.0
    unsynced_vs_synced = max(float((r0["unsynced"][k] - r0["weights"][k]).abs().max())
                             for k in r0["weights"] if r0["weights"][k].is_floating_point())
    assert unsynced_vs_synced > 1e-6
    assert _max_diff(r0["trades"], r1["trades"]) == 0.0
    # attacks crafted with train-mode BN use the global batch's statistics too
    diff = _max_diff(r0["train_mode_attack"], single["train_mode_attack"])
    print(f"\nFGSM crafted with train-mode BN, 2 processes against 1: weights differ by at most {diff:.2e}")
    assert diff < TOL
    assert _max_diff(r0["train_mode_attack"], r0["unsynced"]) > 1e-6


def test_kernels_agree_and_snapshots_reach_every_rank(ranks, single):
    (r0, r1), _ = ranks
    assert float(single["kernel"].std()) > 0.5          # a live network's kernel, not the constant 10
    for rank in (r0, r1):
        k = rank["kernel"]
        rel = float((k - single["kernel"]).abs().max() / single["kernel"].abs().max())
        print(f"\ntrace kernel, rank {rank['rank']} against 1 process: relative difference {rel:.2e}")
        assert rel < TOL
    assert r0["snapshot_epochs"] == r1["snapshot_epochs"] == [0, 2]
    assert torch.equal(r0["snapshots"], r1["snapshots"])           # rank 0's, shared after training
    assert float((r0["snapshots"] - single["snapshots"]).abs().max()) < TOL * float(single["snapshots"].abs().max())


def test_checkpoints_are_written_by_rank_0_and_resume_under_two_processes(ranks):
    (r0, r1), out = ranks
    assert r1["writes"] == []
    # the uninterrupted run's 2 epochs, the interrupted run's first, the resumed run's second
    assert [Path(p).name for p in r0["writes"]] == ["checkpoint.pt"] * 4
    assert "interrupted on purpose" in r0["interrupt"] and "interrupted on purpose" in r1["interrupt"]
    for rank in (r0, r1):   # interrupted after epoch 1, resumed: the uninterrupted run exactly
        assert _max_diff(rank["resumed_weights"], r0["weights"]) == 0.0
        assert rank["resumed_history"]["loss"] == r0["history"]["loss"]
        assert rank["resumed_history"]["pgd_acc"] == r0["history"]["pgd_acc"]
    saved = torch.load(out / "resumed" / "checkpoint.pt", weights_only=True)
    assert saved["history"]["finished"] and len(saved["history"]["epoch"]) == 2


def test_the_cache_is_decided_and_written_by_rank_0(ranks):
    (r0, r1), _ = ranks
    assert r0["cache_calls"] == r1["cache_calls"] == ["computed"]       # both computed once, none loaded again
    for rank in (r0, r1):
        assert float(rank["cache_first"]["value"]) == 0.0               # rank 0's result on every rank
        assert float(rank["cache_second"]["value"]) == 0.0
    assert r0["cache_files"] == r1["cache_files"]
    assert [name.split(".", 1)[1] for name in r0["cache_files"]] == ["json", "lock", "pt"]


def test_the_command_line_runs_on_every_rank_and_prints_on_rank_0(ranks):
    (r0, r1), out = ranks
    assert r0["cli_code"] == r1["cli_code"] == 0
    assert "_dummy (profile smoke, device cpu)" in r0["cli_printed"] and "results (computed)" in r0["cli_printed"]
    assert r1["cli_printed"] == ""
    assert len(list((out / "cli" / "_dummy").glob("*.pt"))) == 1


# ------------------------------------------------------------------ one process, bad input
def test_helpers_without_a_process_group_are_one_process(monkeypatch):
    from ntklab import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.is_distributed() and not distributed.launched()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank(), distributed.is_main()) == (0, 1, 0, True)
    assert distributed.init_from_env() is False and not distributed.is_distributed()
    distributed.barrier()
    obj = {"a": [1]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.main_only(lambda x: x + 1, 1) == 2
    with pytest.raises(KeyError):
        distributed.main_only(lambda: {}["missing"])
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    idx = torch.arange(10)
    assert distributed.shard(idx) is idx
    assert distributed.shard(idx, 1, 3).tolist() == [1, 4, 7]
    assert distributed.shard_weight(29, 59, 2) == pytest.approx(58 / 59)
    bn = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with distributed.global_batch_norm(bn):
        assert type(bn) is torch.nn.BatchNorm2d                    # nothing to synchronise with
        assert torch.equal(bn(x), torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    assert distributed.device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="process group"):
        distributed.data_parallel(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_bad_input_is_refused(monkeypatch):
    from ntklab import distributed
    from ntklab import train as T

    with pytest.raises(ValueError, match="backend"):
        distributed.init_from_env("mpi")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.init_from_env()
    monkeypatch.setenv("LOCAL_RANK", "x")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        distributed.init_from_env()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="timeout"):
        distributed.init_from_env(timeout=0)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.init_from_env()
    assert not distributed.is_distributed()
    with pytest.raises(ValueError, match="sync_bn"):
        T.TrainConfig(strategy="normal", epochs=1, sync_bn="yes")

    # the split of the global batch, checked as it would be under 2 and 3 processes
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    config = T.TrainConfig(strategy="normal", epochs=1, batch_size=64)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size 64 must be divisible by the number of processes"):
        T._data_parallel(model, config, 256, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="last batch of every epoch would hold 1 example"):
        T._data_parallel(model, config, 257, torch.device("cpu"))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        T._data_parallel(model, config.replace(batch_size=2), 256, torch.device("cpu"))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))


def test_augmented_batches_are_the_global_batch_s_share(ranks, single):
    (r0, r1), _ = ranks
    diff = _max_diff(r0["augmented"], single["augmented"])
    assert diff < TOL, diff
    assert _max_diff(r0["augmented"], r0["unsynced"]) > 1e-6   # the check can fail: another run differs
