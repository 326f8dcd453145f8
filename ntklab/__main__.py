"""Command line of ntklab: list the book's experiments, run one (or all) under a profile.

    python -m ntklab list
    python -m ntklab run strategies --profile quick --device auto
    python -m ntklab run all --profile paper --device cuda --out /data/ntklab-results

Results go to the result cache (see :mod:`ntklab.experiments.cache`); each run prints where.
A second run of the same experiment under the same profile and package version loads the stored
result instead of recomputing (``--force`` recomputes); an interrupted run resumes from its last
checkpoint when started again. Errors in the arguments print one line and exit with code 2.
Introduced in chapter 9 (Reproducing at paper scale).
"""
from __future__ import annotations

import argparse
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
                    "Results are keyed by the experiment's config (including the profile) and the "
                    "ntklab version; an interrupted run resumes from its checkpoints.")
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
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"ntklab: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 success, 2 bad arguments, 1 missing data, 130 interrupted)."""
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

    from ntklab.config import get_device, get_profile

    try:
        profile = get_profile(args.profile)
        device = get_device(args.device)
    except ValueError as err:
        return _fail(str(err))
    names = sorted(experiments.EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in experiments.EXPERIMENTS]
    if unknown:
        return _fail(f"unknown experiment {unknown[0]!r}; available: "
                     f"{', '.join(sorted(experiments.EXPERIMENTS))} (or 'all')")
    for name in names:
        start = time.perf_counter()
        try:
            with experiments.cache.track() as paths:
                experiments.run(name, profile, device, force=args.force, out=args.out,
                                progress=not args.quiet)
        except FileNotFoundError as err:  # e.g. paper-scale data not downloaded
            return _fail(str(err).splitlines()[0], code=1)
        except KeyboardInterrupt:
            return _fail(f"{name} interrupted; run the same command again to resume", code=130)
        print(f"{name} (profile {profile.name}, device {device}): {time.perf_counter() - start:.1f} s")
        for path, how in dict.fromkeys(paths):
            print(f"  results ({how}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
