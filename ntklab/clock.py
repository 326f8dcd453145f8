"""One clock for every run: wall seconds and process-CPU seconds of named intervals.

Wall seconds are what a reader waits; on a machine shared with other processes they grow with the
others' load (on the book's 2-core machine a run with fewer adversarial epochs once took longer than
full PGD-AT). Process-CPU seconds (``time.process_time``) are the compute this process spent; another
process sharing the cores changes them far less. With one thread CPU seconds are compute seconds;
with several they add up over threads, so compare runs made with the same number. :class:`Clock`
records both for every interval of :func:`ntklab.train.train` (``History.time_*`` and
``History.time_*_cpu``). On a GPU the wall time of an interval comes from CUDA events read once per
:meth:`Clock.collect`, so timing costs no host synchronisation per batch; its CPU time is the host's.

:func:`step_cost` measures what one step of several methods costs, interleaved so that
other work on the machine disturbs every method alike (chapters 5 and 6); :func:`ntklab.train.training_step_costs`
uses it for the training steps of :func:`ntklab.train.train`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

from ntklab import _checks

__all__ = ["Clock", "step_cost"]


class Clock:
    """Sums wall and process-CPU seconds of named intervals.

    device: the device the timed work runs on; on CUDA the wall time is taken with CUDA events.
    ``start = clock.now()`` ... ``clock.add(name, start)`` adds the interval; ``collect()`` returns
    ``{name: (wall, cpu)}`` since the last ``collect`` and starts over. ``with clock.interval(name):``
    is the same around a block.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self._totals: dict[str, list[float]] = {}
        self._pending: list = []

    def now(self):
        """A mark: (wall mark, process-CPU seconds)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event, time.process_time()
        return time.perf_counter(), time.process_time()

    def add(self, name: str, start, end=None) -> None:
        """Add the interval from mark ``start`` to mark ``end`` (default: now) to ``name``."""
        end = self.now() if end is None else end
        totals = self._totals.setdefault(name, [0.0, 0.0])
        totals[1] += end[1] - start[1]
        if self.cuda:
            self._pending.append((name, start[0], end[0]))
        else:
            totals[0] += end[0] - start[0]

    def interval(self, name: str):
        """A context manager adding the time of its block to ``name``."""
        return _Interval(self, name)

    def collect(self, *names: str) -> dict[str, tuple[float, float]]:
        """``{name: (wall seconds, CPU seconds)}`` of ``names`` (default: all) since they were last
        collected, which starts them over (synchronises CUDA once)."""
        if self.cuda and self._pending:
            torch.cuda.synchronize()
            for name, s, e in self._pending:
                self._totals[name][0] += s.elapsed_time(e) / 1000.0
            self._pending = []
        return {name: tuple(self._totals.pop(name)) for name in (names or list(self._totals))
                if name in self._totals}


class _Interval:
    def __init__(self, clock: Clock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.start = self.clock.now()
        return self

    def __exit__(self, *exc):
        self.clock.add(self.name, self.start)
        return False


def _seconds(device: torch.device) -> float:
    """Process-CPU seconds on the CPU; wall seconds after synchronising on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def step_cost(steps: Mapping[str, Callable[[], object]], *, rounds: int = 3, batches: int = 1,
              device=None, per_round: bool = False) -> dict:
    """Seconds per call of every function in ``steps``, measured interleaved.

    steps: ``{name: step}``, each ``step()`` one training step (attack plus update) of a method on
        its own model copy and batch (e.g. ``lambda: ntklab.train.sgd_step(net, opt,
        attacks.adversarial_examples(m, net, xb, yb, **kw), yb)``).
    rounds: in each round every step runs ``batches`` times in turn, so that other work on the
        machine falls on every method alike; the cost of a method is the median over the rounds.
    device: the clock is the process's CPU time on the CPU (another process sharing the cores
        changes it far less than the wall clock), the wall clock after synchronising on a GPU.

    Returns ``{name: seconds per step}``; with ``per_round``, ``{name: [seconds per step in each
    round]}`` (for a standard error over rounds). Introduced in chapter 6, used again in chapter 5.
    """
    rounds, batches = _checks.count("rounds", rounds), _checks.count("batches", batches)
    device = torch.device(device if device is not None else "cpu")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = _seconds(device)
            for _ in range(batches):
                step()
            times[name].append((_seconds(device) - start) / batches)
    if per_round:
        return times
    return {name: statistics.median(t) for name, t in times.items()}
