"""A dummy experiment, registered only inside :func:`registered`, for testing the registry, the
result cache and the command line in milliseconds instead of training a chapter's models.

It sums ``0 + 1 + ... + (steps - 1)`` one step at a time, saving a checkpoint after each step in
its entry's checkpoint folder and resuming from it, like a training run. ``FAIL["at"]`` (a step)
and ``FAIL["with"]`` (an exception) make it fail at that step, as an interrupted or broken run.
"""
import contextlib

import torch

from ntklab.data import atomic_save, describe_load_error
from ntklab.experiments import EXPERIMENTS, RunContext, cache, experiment

NAME = "_dummy"
FAIL = {"at": None, "with": None}
CALLS = []


def make_config(profile, *, steps: int = 3) -> dict:
    return {"profile": profile.to_dict(), "steps": steps}


def compute(ctx: RunContext) -> dict:
    """The dummy computation (see the module docstring)."""
    CALLS.append(ctx)
    path = ctx.checkpoints / "checkpoint.pt"
    start, total = 0, 0
    if path.exists():
        try:
            state = torch.load(path, weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read the checkpoint {path} ({describe_load_error(err)}); "
                             f"delete it to start over") from err
        start, total = state["step"], state["total"]
    for step in range(start, ctx.config["steps"]):
        if step == FAIL["at"]:
            raise FAIL["with"]
        total += step
        ctx.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_save({"step": step + 1, "total": total}, path)
    return {"total": total, "resumed_at": start, "profile": ctx.profile.name, "device": str(ctx.device),
            "x": torch.arange(3.0)}


@contextlib.contextmanager
def registered():
    """Within the block the dummy is the registered experiment ``_dummy`` (``FAIL`` and ``CALLS``
    reset); afterwards it is gone from the registry again."""
    FAIL.update(at=None, **{"with": None})
    CALLS.clear()
    run = experiment(NAME, "a dummy experiment for the tests\nsecond line dropped", make_config)(compute)
    try:
        yield run
    finally:
        EXPERIMENTS.pop(NAME, None)
        cache._BOUND.pop(NAME, None)
