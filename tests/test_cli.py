"""Tests of the command line, ``python -m ntklab``."""
import os
import subprocess
import sys

import pytest
import torch

from ntklab.__main__ import main


def cli(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # as in conftest
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
