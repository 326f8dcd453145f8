"""Tests of the command line, ``python -m ntklab``."""
import os
import subprocess
import sys

import pytest
import torch

from ntklab.__main__ import main


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


def test_run_strategies_end_to_end(tmp_path):
    out = tmp_path / "results"
    done = cli("run", "strategies", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = list((out / "strategies").glob("*.pt"))
    assert len(files) == 1 and f"results (computed): {files[0]}" in done.stdout
    result = torch.load(files[0], weights_only=True)["result"]
    assert result["strategies"] == ["normal", "fgsm_rs", "pgd", "trades"]
    again = cli("run", "strategies", "--profile", "smoke", "--device", "cpu", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0 and f"results (loaded): {files[0]}" in again.stdout


def one_line_error(stderr):
    return stderr.count("\n") == 1 and stderr.startswith("ntklab: error: ") and "Traceback" not in stderr


def test_changing_a_line_of_the_package_computes_a_new_entry(tmp_path):
    """A result is keyed by the source of the package that made it: the same command under a copy
    of ntklab with one more line computes a new entry instead of loading the old one."""
    import shutil

    import ntklab

    out, pkg = tmp_path / "results", tmp_path / "pkg"
    shutil.copytree(os.path.dirname(ntklab.__file__), pkg / "ntklab", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(pkg)}
    args = ("run", "strategies", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet")
    first = cli(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0 and "(computed)" in first.stdout, first.stderr
    again = cli(*args, cwd=tmp_path, env=env)
    assert "(loaded)" in again.stdout
    with open(pkg / "ntklab" / "plots.py", "a") as f:
        f.write("# one more line\n")
    changed = cli(*args, cwd=tmp_path, env=env)
    assert changed.returncode == 0 and "(computed)" in changed.stdout
    assert len(list((out / "strategies").glob("*.pt"))) == 2
    listing = cli("cache", "--out", str(out), cwd=tmp_path, env=env)
    rows = [line for line in listing.stdout.splitlines() if line.startswith("strategies ")]
    assert [r.split()[-1] for r in rows].count("current") == 1 and [r.split()[-1] for r in rows].count("stale") == 1
    # each of the experiment's training runs is an entry of its own ("kernel_runs"), 6 per source version
    assert listing.stdout.count("kernel_runs ") == 12


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
    assert one_line_error(err) and "cannot be written" in err


@pytest.mark.parametrize("device", ["mps", "meta", "cpu:7"])
def test_unusable_device_exits_2(device, capsys):
    assert main(["run", "strategies", "--profile", "smoke", "--device", device]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and device in err


def test_corrupt_checkpoint_fails_with_one_line_and_exit_1(tmp_path):
    from ntklab.config import get_profile
    from ntklab.experiments import checkpoint_dir, strategies, using_root

    out = tmp_path / "results"
    with using_root(out):
        # chapter 4's experiment checkpoints each training run beside its own entry; the first is normal training's
        folder = checkpoint_dir(strategies.RUNS_ENTRY, strategies.run_config(
            strategies.chapter_profile(get_profile("smoke")), "normal", "multistep", ae=False))
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    done = cli("run", "strategies", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--quiet",
               cwd=tmp_path)
    assert done.returncode == 1 and one_line_error(done.stderr), done.stderr
    assert "cannot read the checkpoint" in done.stderr and "delete it" in done.stderr
