"""Sweeps that several processes (or GPUs) share: ``python -m ntklab run NAME --shard i/n``.

A sweep is a list of independent runs, each stored in the result cache on its own. Under
:func:`sharding` (the command line's ``--shard i/n``, 1-based ``i``), :func:`sweep` computes only
the items whose position p has ``p % n == i - 1``; an item of another shard is loaded when its
entry is already in the cache and otherwise left to its shard. When this process's share is done
but other shards' items are still missing, :func:`sweep` raises :class:`ShardDone`: the experiment
stops there (the command line prints the message and exits with 0), and once every shard has
finished, ``python -m ntklab run NAME`` without ``--shard`` assembles the result from the cache
(computing nothing that a shard computed). Without ``--shard`` nothing changes.

The sweeps that shard: the training runs of chapter 4 (``strategies``: seven runs, through
:func:`ntklab.experiments.runs.kernel_runs`) and the seeds of chapter 5 (``schedule``: each seed's
switch grid, controls and FGSM-RS run is one cache entry, ``"schedule_seeds"``; the runs of one seed
share a normal prefix and stay together). The others do not shard: chapters 2, 3, 6, 7 and 8 compute
one result each (their runs share models or checkpoints inside it), and ``run all --shard i/n``
deals them out whole (:func:`owners`: by their cost in :func:`ntklab.plan.plan`, the heaviest first
to the least loaded shard) while every shard takes its part of chapters 4 and 5. Start the shards with the same code, profile and results folder
(``--out`` on a shared disk, or copy the entries together before assembling).

    >>> with sharding(Shard(1, 2), "strategies"):
    ...     results = sweep(items, compute, exists=is_cached)      # raises ShardDone if items are missing
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

__all__ = ["Shard", "parse_shard", "sharding", "current", "sweep", "owners", "ShardDone", "SHARDED_SWEEPS"]

#: the experiments whose sweeps shard (see the module docstring)
SHARDED_SWEEPS = ("strategies", "schedule")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self):
        for name in ("index", "count"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"--shard {name} must be an integer, got {v!r}")
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ValueError(f"--shard must be i/n with 1 <= i <= n, got {self.index}/{self.count}")

    def mine(self, position: int) -> bool:
        """Whether the item at 0-based ``position`` of a sweep is this shard's."""
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text) -> Shard | None:
    """``"i/n"`` (1-based i) as a :class:`Shard`; ``None`` for ``None``. A ``ValueError`` naming
    ``--shard`` for anything else (``0/2``, ``3/2``, ``a/b``, ``1``)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard must be i/n (for example 1/2: the first of two shards), got {text!r}")
    return Shard(int(m.group(1)), int(m.group(2)))


class ShardDone(Exception):
    """This shard's share of a sweep is done and other shards' items are not in the cache yet."""

    def __init__(self, experiment: str, shard: Shard, done: int, total: int, missing: int):
        self.experiment, self.shard, self.done, self.total, self.missing = experiment, shard, done, total, missing
        name = experiment or "the experiment"
        super().__init__(f"shard {shard} of {name}: {done} of {total} runs done here ({missing} left to the other "
                         f"shards); when every shard has finished, run `python -m ntklab run {experiment or 'NAME'}` "
                         "without --shard (the same --profile and --out) to assemble")


_SHARD: contextvars.ContextVar[tuple[Shard, str] | None] = contextvars.ContextVar("ntklab_shard", default=None)


@contextlib.contextmanager
def sharding(shard: Shard | None, experiment: str = "") -> Iterator[None]:
    """Within the block, :func:`sweep` computes only ``shard``'s items (``None``: all) of
    ``experiment``'s sweeps (the name is for the message)."""
    token = _SHARD.set((shard, experiment) if shard is not None else None)
    try:
        yield
    finally:
        _SHARD.reset(token)


def current() -> Shard | None:
    """The active shard, or ``None``."""
    state = _SHARD.get()
    return state[0] if state else None


def sweep(items: Sequence, fn: Callable, *, exists: Callable[[object], bool], load: Callable | None = None) -> list:
    """``[fn(item) for item in items]``, or under :func:`sharding` this shard's part of it.

    exists(item): whether the item's result is in the cache already. Under a shard, an item of
    another shard is loaded with ``load(item)`` (default ``fn``; give one that never recomputes,
    so that ``--force`` recomputes this shard's items only) when it exists and skipped otherwise;
    if any was skipped, raises :class:`ShardDone` once this shard's items are computed."""
    state = _SHARD.get()
    if state is None:
        return [fn(item) for item in items]
    shard, experiment = state
    results, missing, done = [], 0, 0
    for position, item in enumerate(items):
        if shard.mine(position):
            results.append(fn(item))
            done += 1
        elif exists(item):
            results.append((load or fn)(item))
        else:
            missing += 1
    if missing:
        raise ShardDone(experiment, shard, done, len(items), missing)
    return results


def owners(names: Sequence[str], shard: Shard, weights: dict[str, float] | None = None) -> dict[str, int]:
    """For ``run all --shard i/n``: the shard (1-based) that runs each experiment of ``names`` that
    does not shard itself (those of :data:`SHARDED_SWEEPS` are left out: every shard runs its part
    of them). Without ``weights``, in turn (position p goes to shard p % n + 1); with ``weights``
    (experiment -> its cost, e.g. image-passes of :func:`ntklab.plan.totals`), the heaviest first,
    each to the shard with the least so far (ties: the lowest shard), so that the shards finish
    close together. The same names and weights give every shard the same answer."""
    whole = [n for n in names if n not in SHARDED_SWEEPS]
    if not weights:
        return {n: p % shard.count + 1 for p, n in enumerate(whole)}
    load = [0.0] * shard.count
    out = {}
    for n in sorted(whole, key=lambda n: (-float(weights.get(n, 0.0)), n)):
        i = min(range(shard.count), key=lambda j: (load[j], j))
        out[n] = i + 1
        load[i] += float(weights.get(n, 0.0))
    return {n: out[n] for n in whole}
