"""The paper-shaped dry run (issue 20): every chapter of the book at the ``paper`` profile's structure,
end to end, on the CPU, in a few minutes.

Under the ``paper_cpu`` profile (PreAct ResNet-18 at width 4 on the generated, SYNTHETIC
``synthetic_cifar10``, a few epochs with two learning-rate decays, crop and flip, best and last
checkpoints, kernels every 2 epochs; :mod:`ntklab.config`) the test

(a) runs ``python -m ntklab run all --profile paper_cpu --device cpu --out D`` in a subprocess;
(b) copies ``D`` to another folder ``D2`` and makes it read-only: the results folder is portable, and
    the build below needs no computation (a result that had to be computed could not be written; as
    root, where permissions do not bind, the folder's files are also compared before and after);
(c) builds the book from a copy of its sources with ``NTKLAB_PROFILE=paper_cpu NTKLAB_RESULTS=D2
    jupyter-book build --path-output <tmp>`` (every chapter executed; an error in any cell fails the
    build, ``nb_execution_raise_on_error`` in ``_config.yml``), and checks that every chapter of
    ``_toc.yml`` has an HTML page, every notebook chapter with at least one figure and saying that
    its data are synthetic.

It writes nothing into the repository (the build runs on a copy of the book's files). The times of
(a) and (c) are printed (``pytest -s``). The chapters assert no claim under ``paper_cpu``; their
claims tables are printed.
"""
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib")


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTKLAB_")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), NTKLAB_PROGRESS="0",
               NTKLAB_CACHE=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", **extra)
    return env


def _chapters() -> list[str]:
    """The files of ``_toc.yml`` (root first), as paths relative to the repository, without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [ch["file"] for ch in part["chapters"]]
    files += [ch["file"] for ch in toc.get("chapters", [])]
    return files


def _snapshot(folder: Path) -> dict:
    """Size and modification time of every file under ``folder`` but the cache's lock files (loading
    an entry may open its lock file: as root, where a read-only folder is still written)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def _make_read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_run_all_then_build_the_book_from_a_copied_read_only_results_folder(tmp_path):
    results, moved = tmp_path / "results", tmp_path / "moved"
    # (a) every registered experiment under the paper-shaped profile
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "ntklab", "run", "all", "--profile", "paper_cpu", "--device", "cpu",
                          "--out", str(results)], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=1800)
    run_seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "results (computed)" in run.stdout and list(results.rglob("*.pt"))

    # (b) the folder moved elsewhere, read-only
    shutil.copytree(results, moved)
    _make_read_only(moved)
    before = _snapshot(moved)

    # (c) the book built from a copy of its sources, reading the moved results
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in BOOK_FILES:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "book", src / "book", ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    if (ROOT / "bench" / "results").is_dir():   # chapter 9 reads the bench's measured figures
        shutil.copytree(ROOT / "bench" / "results", src / "bench" / "results")
    repo_before = _snapshot(ROOT / "book")
    start = time.perf_counter()
    try:
        build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--path-output",
                                str(out)], cwd=tmp_path, env=_env(tmp_path, NTKLAB_PROFILE="paper_cpu",
                                                                  NTKLAB_RESULTS=str(moved)),
                               capture_output=True, text=True, timeout=3600)
    finally:
        after = _snapshot(moved)
        _make_writable(moved)   # so that pytest can remove its temporary folder
    build_seconds = time.perf_counter() - start
    print(f"\npaper_cpu dry run: run all {run_seconds:.0f} s, book build {build_seconds:.0f} s")
    log = build.stdout[-4000:] + build.stderr[-4000:]
    assert build.returncode == 0, log
    assert after == before, "the build changed the results folder: something was recomputed"
    assert _snapshot(ROOT / "book") == repo_before and not (ROOT / "book" / "_build").exists()

    html = out / "_build" / "html"
    notebooks = 0
    for chapter in _chapters():
        page = html / f"{chapter}.html"
        assert page.exists(), f"{chapter} has no page in the built book"
        if (ROOT / f"{chapter}.ipynb").exists():
            notebooks += 1
            text = page.read_text()
            assert "<img" in text, f"{chapter}: no figure on its page"
            assert "synthetic" in text.lower(), f"{chapter}: the page does not say that its data are synthetic"
    assert notebooks >= 8
