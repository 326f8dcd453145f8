"""Command line of ntklab: list the book's experiments, run one (or all) under a profile.

    python -m ntklab list
    python -m ntklab run strategies --profile quick --device auto
    python -m ntklab run all --profile paper --device cuda --out /data/ntklab-results
    torchrun --nproc_per_node=4 -m ntklab run strategies --profile paper --device cuda   # 4 GPUs
    python -m ntklab cache                      # the cache's folder, entries and size
    python -m ntklab cache --clear --stale      # delete what older code computed
    python -m ntklab student-edition OUT        # the chapters without solutions, for a class

Results go to the result cache (see :mod:`ntklab.experiments.cache`); each run prints where.
A second run of the same experiment under the same profile and the same code (the experiment's
module and the ``ntklab`` modules it imports, docstrings and comments aside) loads the stored
result instead of recomputing (``--force`` recomputes); an interrupted run resumes from its
last checkpoint when started again. Errors print one line on stderr, never a traceback: exit code
2 for bad arguments (usage), 1 for a run that fails (missing data, a corrupt checkpoint, a folder
that cannot be written), 130 when interrupted; ``NTKLAB_DEBUG=1`` shows the traceback of a failure.
Introduced in chapter 9 (Reproducing at paper scale).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "python -m ntklab"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the experiments of the ntklab book (adversarial training through the "
                    "neural tangent kernel; Li et al., arXiv 2312.02236).",
        epilog="Examples:\n  %(prog)s list\n  %(prog)s run strategies --profile smoke --device cpu\n"
               "  %(prog)s run all --profile paper --device cuda --out results/\n"
               "Run '%(prog)s run --help' for the options of a run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the experiments with one-line descriptions",
                   description="List the registered experiments with one-line descriptions.")
    run = sub.add_parser(
        "run", help="run an experiment (or 'all') and print where its results went",
        description="Run an experiment, or load its cached result, and print where the result is stored. "
                    "Results are keyed by the experiment's config (including the profile) and a digest "
                    "of the code it runs (docstrings and comments aside); an interrupted run resumes "
                    "from its checkpoints.")
    run.add_argument("name", metavar="NAME", help="experiment name (see 'list'), or 'all' for every one")
    run.add_argument("--profile", default=None,
                     help="scale of the run: smoke (seconds, for tests), quick (CPU, minutes; the default) "
                          "or paper (GPU, the papers' scale). Default: $NTKLAB_PROFILE or quick.")
    run.add_argument("--device", default=None,
                     help="cpu, cuda, cuda:N or auto (cuda if available). Default: $NTKLAB_DEVICE or auto.")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="folder for the results. Default: $NTKLAB_RESULTS or ~/.cache/ntklab/results.")
    run.add_argument("--force", action="store_true", help="recompute even if a cached result exists")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    cache = sub.add_parser(
        "cache", help="show the result cache (folder, entries, size), or clear it",
        description="List the entries of the result cache: experiment, key, profile, size, time, and "
                    "whether this code made them ('current') or other code did ('stale': the cache is "
                    "keyed by a digest of the code each experiment runs, so those entries are never "
                    "read again). "
                    "With --clear, delete entries (results, sidecars and checkpoints).")
    cache.add_argument("names", nargs="*", metavar="NAME", help="only these experiments (default: all)")
    cache.add_argument("--out", default=None, metavar="DIR",
                       help="the cache folder. Default: $NTKLAB_RESULTS or ~/.cache/ntklab/results.")
    cache.add_argument("--clear", action="store_true", help="delete the entries listed")
    cache.add_argument("--stale", action="store_true", help="only entries made by other code than this")
    sub.add_parser("student-edition", add_help=False,
                   help="write the chapters without their solutions, for students (see 'student-edition --help')")
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"ntklab: error: {message}", file=sys.stderr)
    return code


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return text or type(err).__name__


def _check_out(out: str | None) -> str | None:
    """``None`` if ``--out`` is usable (:func:`ntklab.experiments.cache.check_folder`), else why not."""
    if out is None:
        return None
    from ntklab.experiments import cache

    try:
        cache.check_folder(out, name="--out")
    except ValueError as err:
        return str(err)
    return None


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _cache_command(args) -> int:
    from ntklab.experiments import cache

    try:
        folder = cache.results_root(args.out)
    except ValueError as err:
        return _fail(str(err).replace("out ", "--out ", 1) if args.out is not None else str(err))
    if folder.exists() and not folder.is_dir():
        return _fail(f"the cache folder {folder} is a file")
    names = set(args.names) or None
    try:
        if args.clear:
            removed = cache.clear(args.out, names=names, stale_only=args.stale)
            print(f"cleared {len(removed)} entries ({_size(sum(e.size for e in removed))}) from {folder}")
            return 0
        listed = [e for e in cache.entries(args.out)
                  if (names is None or e.name in names) and not (args.stale and e.current)]
    except OSError as err:  # a read-only mount, a folder that vanished
        return _fail(_one_line(err), code=1)
    print(f"results folder: {folder} ({len(listed)} entries, {_size(sum(e.size for e in listed))})")
    if listed:
        width = max(len(e.name) for e in listed)
        print(f"{'NAME':<{width}}  {'KEY':<16}  {'PROFILE':<7}  {'SIZE':>8}  {'MODIFIED':<16}  CODE")
        for e in listed:
            state = "current" if e.current else "stale"
            if not e.finished:
                state += ", unfinished (checkpoints only)"
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified))
            print(f"{e.name:<{width}}  {e.key:<16}  {e.profile or '?':<7}  {_size(e.size):>8}  {when:<16}  {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 success, 2 bad arguments, 1 a failed run, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["student-edition"]:  # a parser of its own: ntklab.student.main
        from ntklab import student

        return student.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    from ntklab import experiments  # imports torch: only after argparse has handled --help

    if args.command == "list":
        descriptions = experiments.list_experiments()
        width = max(map(len, descriptions), default=0)
        for name, text in descriptions.items():
            print(f"{name:<{width}}  {text}")
        return 0
    if args.command == "cache":
        return _cache_command(args)

    from ntklab import distributed
    from ntklab.config import get_profile

    try:  # under torchrun: join the process group; "cuda" is then this rank's GPU, and rank 0 alone prints
        distributed.init_from_env("gloo" if (args.device or os.environ.get("NTKLAB_DEVICE") or "").startswith("cpu")
                                  else None)
        profile = get_profile(args.profile)
        device = distributed.device(args.device)
    except ValueError as err:
        return _fail(str(err))
    if not distributed.is_main():
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # errors still go to stderr (_fail)
    names = sorted(experiments.EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in experiments.EXPERIMENTS]
    if unknown:
        return _fail(f"unknown experiment {unknown[0]!r}; available: "
                     f"{', '.join(sorted(experiments.EXPERIMENTS))} (or 'all')")
    problem = _check_out(args.out)
    if problem:
        return _fail(problem)
    for name in names:
        start = time.perf_counter()
        try:
            with experiments.cache.track() as paths:
                experiments.run(name, profile, device, force=args.force, out=args.out,
                                progress=not args.quiet)
        except KeyboardInterrupt:
            return _fail(f"{name} interrupted; run the same command again to resume", code=130)
        except Exception as err:  # missing data, a corrupt checkpoint, an unwritable folder, a bug
            if os.environ.get("NTKLAB_DEBUG"):
                raise
            return _fail(f"{name} failed: {_one_line(err)} (NTKLAB_DEBUG=1 shows the traceback)", code=1)
        print(f"{name} (profile {profile.name}, device {device}): {time.perf_counter() - start:.1f} s")
        for path, how in dict.fromkeys(paths):
            print(f"  results ({how}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
