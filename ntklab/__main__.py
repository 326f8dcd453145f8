"""Command line of ntklab: list the book's experiments, run one (or all) under a profile.

    python -m ntklab list
    python -m ntklab run strategies --profile quick --device auto
    python -m ntklab run all --profile paper --device cuda --out /data/ntklab-results
    torchrun --nproc_per_node=4 -m ntklab run strategies --profile paper --device cuda   # 4 GPUs
    python -m ntklab run strategies --profile paper --shard 1/2   # half of chapter 4's runs (see below)
    python -m ntklab plan --profile paper --costs costs.json       # the runs and their projected hours
    python -m ntklab cache                      # the cache's folder, entries and size
    python -m ntklab cache --clear --stale      # delete what older code computed
    python -m ntklab student-edition OUT        # the chapters without solutions, for a class

Results go to the result cache (see :mod:`ntklab.experiments.cache`); each run prints where.
A second run of the same experiment under the same profile and the same code (the experiment's
module and the ``ntklab`` modules it imports, docstrings and comments aside) loads the stored
result instead of recomputing (``--force`` recomputes); an interrupted run resumes from its
last checkpoint when started again (from its last finished epoch).

``--shard i/n`` (1-based i) spreads the independent runs of a sweep over n processes or GPUs
(:mod:`ntklab.experiments._sweep`): shard i trains the runs at positions p with p % n == i - 1, then
stops with a message and exit code 0 if other shards' runs are not in the cache yet; once every
shard has finished, the same command without ``--shard`` assembles the result from the cache. The
sweeps that shard are chapter 4's seven training runs (``strategies``) and chapter 5's seeds
(``schedule``); the other experiments compute one cache entry each: ``run all --shard i/n`` deals
them out whole, one shard each (the heaviest by :mod:`ntklab.plan`'s count first, to the least
loaded shard), and every shard takes its part of chapters 4 and 5. Give every shard the same ``--out``
(a shared disk) or copy the entries together before assembling.

``plan`` lists every run an experiment will make under a profile (epochs, examples, passes per
example, kernels, AutoAttack images, settings; :mod:`ntklab.plan`) without computing or
downloading anything; with ``--costs`` (the JSON of ``python bench/gpu.py --out costs.json``) also
the projected hours per experiment.

Errors print one line on stderr, never a traceback: exit code
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
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="compute only shard I of N (1-based) of the sweeps that shard: chapter 4's training runs "
                          "(strategies) and chapter 5's seeds (schedule), and with 'all' the other experiments, dealt "
                          "out whole. A shard stops with "
                          "exit code 0 when its share is done; then run the same command without --shard to assemble "
                          "the result from the cache")
    plan = sub.add_parser(
        "plan", help="list the runs of every experiment under a profile and their cost, computing nothing",
        description="List every training run, kernel and AutoAttack evaluation the experiments make under a "
                    "profile (from their own settings; nothing is computed or downloaded), with the totals in "
                    "image-passes (one forward and backward pass of one image), and with --costs the projected "
                    "hours per experiment.")
    plan.add_argument("names", nargs="*", metavar="NAME", help="only these experiments (default: all)")
    plan.add_argument("--profile", default=None, help="smoke, quick, paper, ... Default: $NTKLAB_PROFILE or quick.")
    plan.add_argument("--costs", default=None, metavar="FILE.json",
                      help="measured costs: the JSON written by 'python bench/gpu.py --out FILE.json' "
                           "(seconds_per_pass, kernel_500_seconds, autoattack_seconds_per_image)")
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


def _list_command(experiments) -> int:
    descriptions = experiments.list_experiments()
    width = max(map(len, descriptions), default=0)
    for name, text in descriptions.items():
        print(f"{name:<{width}}  {text}")
    return 0


def _names(experiments, name_or_all: list[str]) -> tuple[list[str], str | None]:
    """The experiment names asked for (``all`` or none: every one), or an error message."""
    names = sorted(experiments.EXPERIMENTS) if not name_or_all or "all" in name_or_all else list(name_or_all)
    unknown = [n for n in names if n not in experiments.EXPERIMENTS]
    if unknown:
        return [], (f"unknown experiment {unknown[0]!r}; available: {', '.join(sorted(experiments.EXPERIMENTS))} "
                    "(or 'all')")
    return names, None


def _read_costs(path: str) -> dict:
    """The costs JSON of ``bench/gpu.py``; ``ValueError`` naming ``--costs`` when it cannot be used."""
    import json

    from ntklab import plan

    try:
        with open(path, encoding="utf-8") as f:
            costs = json.load(f)
    except OSError as err:
        raise ValueError(f"--costs {path}: cannot read it ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--costs {path}: not JSON ({err.msg} at line {err.lineno})") from None
    try:
        plan._check_costs(costs)
    except ValueError as err:
        raise ValueError(f"--costs {path}: {err}") from None
    return costs


def _plan_command(args, experiments) -> int:
    from ntklab import plan
    from ntklab.config import get_profile

    try:
        profile = get_profile(args.profile)
        costs = _read_costs(args.costs) if args.costs is not None else None
    except ValueError as err:
        return _fail(str(err))
    names, problem = _names(experiments, args.names)
    if problem:
        return _fail(problem)
    try:
        runs = [r for r in plan.plan(profile) if r.experiment in names]
    except Exception as err:  # a settings object that cannot be resolved under this profile
        if os.environ.get("NTKLAB_DEBUG"):
            raise
        return _fail(f"plan failed: {_one_line(err)} (NTKLAB_DEBUG=1 shows the traceback)", code=1)
    print(f"plan of profile {profile.name} ({profile.dataset}, {profile.model}): {len(runs)} runs; "
          "image-passes = forward+backward passes of one image through the profile's model (see ntklab.plan)")
    print(plan.table(runs, costs))
    for r in (r for r in runs if r.shared):
        print(f"shared through the result cache, counted once (under {r.settings['shared_with']}): "
              f"{r.experiment}, {r.label!r}")
    left_out = [n for n in plan.missing() if n in names]
    if left_out:
        print(f"not planned (no plan function): {', '.join(left_out)}")
    if costs is None:
        print("hours: measure the costs on the machine that will run, then add them: python bench/gpu.py --out "
              f"costs.json && {PROG} plan --profile {profile.name} --costs costs.json")
    else:
        hours = plan.project(runs, costs)
        where = f" on {costs['device']}" if isinstance(costs.get("device"), str) else ""
        print(f"projected hours{where}: {sum(hours.values()):.3g} in total (an estimate from the measured costs "
              "per pass, per 500-image kernel and per AutoAttack image)")
    return 0


def _weights(profile) -> dict | None:
    """Image-passes per experiment under ``profile`` (:mod:`ntklab.plan`), to deal out ``run all
    --shard``'s experiments; ``None`` (deal them in turn) if the plan cannot be made."""
    from ntklab import plan

    try:
        return {name: t["image_passes"] for name, t in plan.totals(plan.plan(profile)).items() if name != "total"}
    except Exception:  # a profile the plan does not know how to count: every shard deals in turn alike
        return None


def _run_command(args, experiments) -> int:
    from ntklab import distributed
    from ntklab.config import get_profile
    from ntklab.experiments import _sweep

    try:  # under torchrun: join the process group; "cuda" is then this rank's GPU, and rank 0 alone prints
        distributed.init_from_env("gloo" if (args.device or os.environ.get("NTKLAB_DEVICE") or "").startswith("cpu")
                                  else None)
        profile = get_profile(args.profile)
        device = distributed.device(args.device)
        shard = _sweep.parse_shard(args.shard)
    except ValueError as err:
        return _fail(str(err))
    if not distributed.is_main():
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # errors still go to stderr (_fail)
    names, problem = _names(experiments, [args.name])
    if problem:
        return _fail(problem)
    problem = _check_out(args.out)
    if problem:
        return _fail(problem)
    owners = _sweep.owners(names, shard, _weights(profile)) if shard is not None and args.name == "all" else {}
    left = []
    for name in names:
        if owners.get(name, shard and shard.index) != (shard and shard.index):
            left.append(f"{name} (shard {owners[name]}/{shard.count})")
            continue
        start = time.perf_counter()
        try:
            with experiments.cache.track() as paths, _sweep.sharding(shard, name):
                experiments.run(name, profile, device, force=args.force, out=args.out,
                                progress=not args.quiet)
        except _sweep.ShardDone as done:  # this shard's share is done; the others' are not in the cache yet
            print(f"{name} (profile {profile.name}, device {device}): {done} "
                  f"({time.perf_counter() - start:.1f} s)")
            for path, how in dict.fromkeys(paths):
                print(f"  results ({how}): {path}")
            continue
        except KeyboardInterrupt:
            return _fail(f"{name} interrupted; run the same command again to resume", code=130)
        except Exception as err:  # missing data, a corrupt checkpoint, an unwritable folder, a bug
            if os.environ.get("NTKLAB_DEBUG"):
                raise
            return _fail(f"{name} failed: {_one_line(err)} (NTKLAB_DEBUG=1 shows the traceback)", code=1)
        shard_note = f", shard {shard}" if shard is not None else ""
        print(f"{name} (profile {profile.name}, device {device}{shard_note}): {time.perf_counter() - start:.1f} s")
        for path, how in dict.fromkeys(paths):
            print(f"  results ({how}): {path}")
    if left:
        print(f"shard {shard} of all: left to the other shards: {', '.join(left)}; when every shard has finished, "
              f"run `{PROG} run all` without --shard (the same --profile and --out) to assemble")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 success, or a finished shard; 2 bad arguments, 1 a failed
    run, 130 interrupted)."""
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
        return _list_command(experiments)
    if args.command == "cache":
        return _cache_command(args)
    if args.command == "plan":
        return _plan_command(args, experiments)
    return _run_command(args, experiments)


if __name__ == "__main__":
    sys.exit(main())
