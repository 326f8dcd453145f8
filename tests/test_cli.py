"""Tests of the command line, ``python -m ntklab``."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ntklab.__main__ import main
from ntklab.config import get_profile

import dummy_experiment


def cli(*args, cwd=None, timeout=120, env=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}  # as in conftest
    return subprocess.run([sys.executable, "-m", "ntklab", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "list" in text and "run" in text and "python -m ntklab" in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--profile", "--device", "--out", "--force", "smoke", "quick", "paper", "NAME"):
        assert option in text


def test_list(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == "strategies" and "chapter 4" in line for line in lines)


@pytest.mark.parametrize("args, message", [
    (["run", "no_such_experiment", "--profile", "smoke"], "unknown experiment 'no_such_experiment'"),
    (["run", "strategies", "--profile", "huge"], "unknown profile 'huge'"),
    (["run", "strategies", "--device", "tpu9"], "unknown device 'tpu9'"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("ntklab: error: ")
    assert message in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    assert main(["run", "strategies", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_experiment_in_a_subprocess_has_no_traceback(tmp_path):
    done = cli("run", "nope", "--profile", "smoke", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "unknown experiment 'nope'" in done.stderr


@pytest.fixture
def dummy():
    """The dummy experiment ``_dummy`` registered for the test (tests/dummy_experiment.py)."""
    with dummy_experiment.registered() as run:
        yield run


def one_line_error(stderr):
    return stderr.count("\n") == 1 and stderr.startswith("ntklab: error: ") and "Traceback" not in stderr


def test_run_computes_then_loads_then_forces(dummy, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(args) == 0
    files = list((out / "_dummy").glob("*.pt"))
    text = capsys.readouterr().out
    assert len(files) == 1 and f"results (computed): {files[0]}" in text
    assert text.startswith("_dummy (profile smoke, device cpu): ")
    assert torch.load(files[0], weights_only=True)["result"]["total"] == 3
    assert main(args) == 0 and f"results (loaded): {files[0]}" in capsys.readouterr().out
    assert main(args + ["--force"]) == 0 and f"results (computed): {files[0]}" in capsys.readouterr().out
    assert len(dummy_experiment.CALLS) == 2 and dummy_experiment.CALLS[-1].force


def test_list_shows_a_registered_experiment(dummy, capsys):
    assert main(["list"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split(maxsplit=1) == ["_dummy", "a dummy experiment for the tests"]


def test_interrupted_run_exits_130_and_resumes(dummy, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(out)]
    dummy_experiment.FAIL.update(at=2, **{"with": KeyboardInterrupt()})
    assert main(args) == 130
    err = capsys.readouterr().err
    assert one_line_error(err) and "_dummy interrupted; run the same command again to resume" in err
    dummy_experiment.FAIL.update(at=None)
    assert main(args) == 0 and "(computed)" in capsys.readouterr().out
    assert dummy_experiment.CALLS[-1].checkpoints.parent == out / "_dummy"
    assert not dummy_experiment.CALLS[-1].checkpoints.exists()
    result = torch.load(next((out / "_dummy").glob("*.pt")), weights_only=True)["result"]
    assert result["resumed_at"] == 2 and result["total"] == 3


def test_failed_run_exits_1_with_one_line(dummy, tmp_path, capsys, monkeypatch):
    args = ["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path)]
    dummy_experiment.FAIL.update(at=1, **{"with": RuntimeError("something broke\nsecond line")})
    assert main(args) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "_dummy failed: something broke (NTKLAB_DEBUG=1 shows the traceback)" in err
    monkeypatch.setenv("NTKLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(args)


def test_corrupt_checkpoint_fails_with_one_line_and_exit_1(dummy, tmp_path, capsys):
    from ntklab.experiments import checkpoint_dir, using_root

    out = tmp_path / "results"
    with using_root(out):
        folder = checkpoint_dir("_dummy", dummy_experiment.make_config(get_profile("smoke")))
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "cannot read the checkpoint" in err and "delete it" in err


def test_failed_run_in_a_subprocess_has_no_traceback(tmp_path):
    """The whole path in a fresh process: the dummy registered, then the command line's main()."""
    script = ("import sys, dummy_experiment\n"
              "from ntklab.__main__ import main\n"
              "with dummy_experiment.registered():\n"
              "    dummy_experiment.FAIL.update(at=0, **{'with': OSError('disk full')})\n"
              "    sys.exit(main(sys.argv[1:]))\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, "run", "_dummy", "--profile", "smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 1 and one_line_error(done.stderr), done.stderr
    assert "_dummy failed: disk full" in done.stderr


def test_cache_lists_stale_entries_of_older_code(dummy, tmp_path, capsys, monkeypatch):
    """An entry made by other code (another digest of the experiment's code) is listed as stale and
    ``--clear --stale`` removes it; the entry of this code stays."""
    from ntklab.experiments import cache

    args = ["run", "_dummy", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    real = cache.code_digest
    monkeypatch.setattr(cache, "code_digest", lambda module, **kw: "0" * 16)     # older code
    assert main(args) == 0
    monkeypatch.setattr(cache, "code_digest", real)
    assert main(args) == 0 and "(computed)" in capsys.readouterr().out
    assert main(["cache", "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("_dummy ")]
    assert sorted(r.split()[-1] for r in rows) == ["current", "stale"]
    assert main(["cache", "--clear", "--stale", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("cleared 1 entries")
    assert [e.current for e in cache.entries(tmp_path)] == [True]


def test_cache_command_lists_and_clears(tmp_path, capsys):
    from ntklab.experiments import cache

    cache.cached("demo", {"a": 1}, lambda: {"x": torch.ones(1000)}, root=tmp_path)
    cache.cached("other", {"a": 1}, lambda: {"x": 1}, root=tmp_path)
    assert main(["cache", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"results folder: {tmp_path} (2 entries" in text
    assert any(line.split()[:3] == ["demo", cache.config_key("demo", {"a": 1}), "?"] and line.endswith("current")
               for line in text.splitlines())
    assert main(["cache", "other", "--out", str(tmp_path)]) == 0
    assert "(1 entries" in capsys.readouterr().out
    assert main(["cache", "--clear", "--stale", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("cleared 0 entries")
    assert main(["cache", "demo", "--clear", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("cleared 1 entries")
    assert [e.name for e in cache.entries(tmp_path)] == ["other"]


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "strategies", "--profile", "smoke", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "is a file, not a folder" in err
    # /proc refuses new folders even to root (a read-only folder would not stop root)
    assert main(["run", "strategies", "--profile", "smoke", "--out", "/proc/ntklab-results"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "cannot be created or written" in err


@pytest.mark.parametrize("device", ["mps", "meta", "cpu:7"])
def test_unusable_device_exits_2(device, capsys):
    assert main(["run", "strategies", "--profile", "smoke", "--device", device]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and device in err


@pytest.mark.parametrize("out, message", [("", "--out is empty"), ("~nosuchuser-ntklab/results", "cannot be expanded")])
def test_out_that_is_empty_or_cannot_be_expanded(out, message, capsys):
    for argv in (["run", "strategies", "--profile", "smoke", "--out", out], ["cache", "--out", out]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert one_line_error(err) and message in err


def test_the_api_checks_out_as_the_command_line_does(tmp_path):
    from ntklab import experiments

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in (("", "out is empty"), (afile, "is a file, not a folder"),
                         ("~nosuchuser-ntklab/r", "cannot be expanded"), ("/proc/ntklab-results", "cannot be created")):
        with pytest.raises(ValueError, match=message):
            experiments.run("strategies", "smoke", "cpu", out=out, progress=False)


def test_cache_listing_survives_damaged_sidecars_and_symlinks_and_read_only_clear(tmp_path, capsys, monkeypatch):
    from ntklab.experiments import cache

    cache.cached("demo", {"a": 1}, lambda: {"x": 1}, root=tmp_path)
    path = cache.result_path("demo", {"a": 1}, root=tmp_path)
    path.with_suffix(".json").write_text("{damaged")
    (tmp_path / "demo" / "0123456789abcdef.pt").symlink_to(tmp_path / "nowhere.pt")   # a broken symlink
    assert main(["cache", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "(2 entries" in text and "current" in text
    monkeypatch.setattr(cache.os, "access", lambda p, mode: False)            # a read-only mount
    assert main(["cache", "--clear", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "is not writable: nothing was cleared" in err and path.exists()
    monkeypatch.undo()
    assert main(["cache", "--clear", "--out", str(tmp_path)]) == 0 and cache.entries(tmp_path) == []


def test_student_edition_goes_through_the_command_line(tmp_path):
    """``python -m ntklab student-edition OUT`` dispatches to ntklab.student (its own tests check
    the edition): the chapters are written, and the book's own folder is refused with exit code 2."""
    out = tmp_path / "edition"
    done = cli("student-edition", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.ipynb")) and (out / "primer.ipynb").is_file()
    refused = cli("student-edition", str(pathlib.Path(__file__).resolve().parents[1] / "book"))
    assert refused.returncode == 2 and refused.stderr.startswith("ntklab: error: out must not be the book")


# ------------------------------------------------------------------ plan, --shard, resume (issue 20)
def test_plan_lists_every_experiment_without_costs(capsys):
    from ntklab import experiments

    assert main(["plan", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in experiments.EXPERIMENTS:
        assert rows.count(name) >= 2, name             # its runs and its line of the totals
    assert "total" in rows and "python bench/gpu.py --out costs.json" in out and "HOURS" not in out


def test_plan_of_paper_with_costs(tmp_path, capsys):
    from ntklab import plan

    costs = {"device": "cpu", "seconds_per_pass": 0.01, "kernel_500_seconds": 100.0,
             "autoattack_seconds_per_image": 2.0}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs))
    assert main(["plan", "--profile", "paper", "--costs", str(path), "strategies"]) == 0
    out = capsys.readouterr().out
    hours = plan.project([r for r in plan.plan("paper") if r.experiment == "strategies"], costs)["strategies"]
    assert "HOURS" in out and f"projected hours on cpu: {hours:.3g} in total" in out
    assert not [line for line in out.splitlines() if line.split()[:1] in (["schedule"], ["theorems"])]
    lines = [line for line in out.splitlines() if line.startswith("strategies")]
    assert len(lines) == 7 + 1 and "200" in lines[0] and "50000" in lines[0]


@pytest.mark.parametrize("content, message", [
    (None, "--costs .*cannot read it"), ("{not json", "--costs .*not JSON"),
    ('{"seconds_per_pass": 1}', "--costs .*no 'kernel_500_seconds'"),
])
def test_plan_with_bad_costs_exits_2(tmp_path, capsys, content, message):
    import re

    path = tmp_path / "costs.json"
    if content is not None:
        path.write_text(content)
    assert main(["plan", "--profile", "smoke", "--costs", str(path)]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and re.search(message, err), err


@pytest.mark.parametrize("shard, message", [
    ("0/2", "--shard must be i/n with 1 <= i <= n, got 0/2"), ("3/2", "got 3/2"), ("1/0", "got 1/0"),
    ("a/b", "--shard must be i/n"), ("2", "--shard must be i/n"), ("-1/2", "--shard must be i/n"),
])
def test_bad_shard_exits_2(shard, message, capsys):
    assert main(["run", "strategies", "--profile", "smoke", f"--shard={shard}"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and message in err


def test_two_shards_split_a_sweep_and_the_run_without_shard_assembles(tmp_path, capsys, monkeypatch):
    """Chapter 4's seven runs over two shards: disjoint shares (4 and 3 runs), each trained once;
    the run without --shard trains nothing and loads every run from the cache."""
    import ntklab.train
    from ntklab.experiments import cache

    out = tmp_path / "results"
    trained = []
    real = ntklab.train.train

    def counting(*args, **kwargs):
        trained.append(kwargs.get("checkpoint_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ntklab.train, "train", counting)
    args = ["run", "strategies", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet"]

    def runs_in_cache():
        return {e.key for e in cache.entries(out) if e.name == "kernel_runs" and e.finished}

    assert main(args + ["--shard", "1/2"]) == 0
    text = capsys.readouterr().out
    assert ("shard 1/2 of strategies: 4 of 7 runs done here (3 left to the other shards); when every shard has "
            "finished, run `python -m ntklab run strategies` without --shard") in text
    first = runs_in_cache()
    assert len(trained) == 4 and len(first) == 4
    assert not (out / "strategies").exists() or not list((out / "strategies").glob("*.pt"))
    assert main(args + ["--shard", "2/2"]) == 0          # its three runs, the others loaded: it assembles
    text = capsys.readouterr().out
    both = runs_in_cache()
    assert len(trained) == 7 and len(both) == 7 and first < both
    assert text.count("(computed): ") == 3 + 1 and text.count("(loaded): ") == 4
    # the run without --shard: from the cache, nothing trained (also with the assembled result deleted)
    cache.clear(out, names={"strategies"})
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(trained) == 7 and text.count("(loaded): ") == 7 and text.count("(computed): ") == 1
    assert runs_in_cache() == both


def test_run_resumes_after_sigint_from_its_last_epoch(tmp_path):
    """``run strategies`` in a subprocess, interrupted (SIGINT) once a run's checkpoint exists, then
    run again: it resumes. Evidence a restart could not produce: the measured seconds of the epochs
    done before the interruption are in the final history, bit for bit (a restart measures anew).
    With ``--shard 1/7`` each process trains only the first of chapter 4's seven runs (then stops
    with exit code 0), to keep the test cheap; the resume is train()'s, the same with or without it."""
    import signal
    import time as _time

    out = tmp_path / "results"
    args = [sys.executable, "-m", "ntklab", "run", "strategies", "--profile", "smoke", "--device", "cpu",
            "--out", str(out), "--quiet", "--shard", "1/7"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = _time.time() + 120
    try:
        while not list(out.glob("kernel_runs/*.checkpoints/checkpoint.pt")):
            assert proc.poll() is None and _time.time() < deadline, "no checkpoint appeared"
            _time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "strategies interrupted; run the same command again to resume" in err
    saved = {}
    for path in out.glob("kernel_runs/*.checkpoints/checkpoint.pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved[path.parent.name.split(".")[0]] = (state["history"], path.stat().st_mtime)
    assert saved, "the interrupted run left no checkpoint"
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "shard 1/7 of strategies: 1 of 7 runs done here" in done.stdout, done.stderr
    epochs = None
    for key, (history, _) in saved.items():
        result = torch.load(out / "kernel_runs" / f"{key}.pt", weights_only=True)["result"]
        final = result["history"]
        epochs = len(final["epoch"])
        k = len(history["epoch"])
        assert 1 <= k <= epochs == 4
        for timing in ("time_attack", "time_update", "time_attack_cpu", "time_update_cpu"):
            assert final[timing][:k] == history[timing][:k]          # measured once, before the interruption
        assert not (out / "kernel_runs" / f"{key}.checkpoints").exists()   # removed once the result is stored
    assert epochs == 4


def test_run_all_with_shards_deals_out_the_experiments(monkeypatch, capsys):
    """``run all --shard i/n``: every experiment that does not shard itself runs in exactly one
    shard, chapters 4 and 5 (whose runs shard) in every one; the dispatch only (experiments.run
    recorded)."""
    from ntklab import experiments
    from ntklab.experiments import _sweep

    assert set(_sweep.SHARDED_SWEEPS) == {"strategies", "schedule"}

    ran = []
    monkeypatch.setattr(experiments, "run", lambda name, *a, **k: ran.append((name, str(_sweep.current()))))
    seen = []
    for i in (1, 2, 3):
        ran.clear()
        assert main(["run", "all", "--profile", "paper", "--device", "cpu", "--shard", f"{i}/3", "--quiet"]) == 0
        text = capsys.readouterr().out
        assert ("strategies", f"{i}/3") in ran and ("schedule", f"{i}/3") in ran
        assert f"shard {i}/3 of all: left to the other shards:" in text and "run all` without --shard" in text
        seen += [name for name, _ in ran if name not in _sweep.SHARDED_SWEEPS]
    assert sorted(seen) == sorted(set(experiments.EXPERIMENTS) - set(_sweep.SHARDED_SWEEPS))


def test_schedule_shards_by_seed(tmp_path, capsys, monkeypatch):
    """Chapter 5 under smoke (two seeds) with --shard 1/2: the first seed's runs only, one cache
    entry; then the run without --shard trains the second seed only and loads the first."""
    import ntklab.train
    from ntklab.experiments import cache

    out = tmp_path / "results"
    trained = []
    real = ntklab.train.train
    monkeypatch.setattr(ntklab.train, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
    args = ["run", "schedule", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet"]

    def seeds_in_cache():
        return {e.key for e in cache.entries(out) if e.name == "schedule_seeds" and e.finished}

    assert main(args + ["--shard", "1/2"]) == 0
    assert "shard 1/2 of schedule: 1 of 2 runs done here" in capsys.readouterr().out
    first, per_seed = seeds_in_cache(), len(trained)
    assert len(first) == 1 and per_seed >= 5 and not list(out.glob("schedule/*.pt"))
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(trained) == 2 * per_seed and len(seeds_in_cache()) == 2 and first < seeds_in_cache()
    assert f"(loaded): {out / 'schedule_seeds' / (next(iter(first)) + '.pt')}" in text


def test_owners_balance_by_weight():
    from ntklab.experiments._sweep import Shard, owners

    names = ["a", "b", "c", "d", "strategies"]
    assert owners(names, Shard(1, 2)) == {"a": 1, "b": 2, "c": 1, "d": 2}
    # the heaviest first, each to the least loaded shard: 10 | 6 + 3 + 1
    assert owners(names, Shard(2, 2), {"a": 10, "b": 6, "c": 3, "d": 1}) == {"a": 1, "b": 2, "c": 2, "d": 2}


def test_a_forced_shard_recomputes_its_own_items_only():
    from ntklab.experiments._sweep import Shard, ShardDone, sharding, sweep

    calls = []
    with sharding(Shard(2, 2), "x"):
        out = sweep([0, 1, 2, 3], lambda i: calls.append(("computed", i)) or i, exists=lambda i: True,
                    load=lambda i: calls.append(("loaded", i)) or -i)
        assert out == [0, 1, -2, 3] and calls == [("loaded", 0), ("computed", 1), ("loaded", 2), ("computed", 3)]
        with pytest.raises(ShardDone, match="shard 2/2 of x: 2 of 4 runs done here \\(1 left"):
            sweep([0, 1, 2, 3], lambda i: i, exists=lambda i: i != 2)
    assert sweep([0, 1], lambda i: i + 1, exists=lambda i: False) == [1, 2]      # no shard: everything
