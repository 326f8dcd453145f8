"""The negative-control check every experiment's claim function goes through in its unit test."""
from __future__ import annotations

import copy
from typing import Callable


def assert_negative_controls(claims_fn: Callable, good: dict, controls: dict[str, Callable[[dict], None]],
                             profile: str = "quick") -> None:
    """``claims_fn(good, profile)``: every claim holds. Then, for each ``key, spoil`` of
    ``controls``: on a deep copy of ``good`` changed in place by ``spoil``, the claim ``key`` comes
    out False. Every claim that ``claims_fn`` makes must have a control (keys compared as sets)."""
    claims = claims_fn(good, profile)
    assert [c.key for c in claims if not c.holds] == [], [c for c in claims if not c.holds]
    keys = [c.key for c in claims]
    assert len(set(keys)) == len(keys), keys
    assert set(controls) == set(keys), (f"claims without a negative control: {sorted(set(keys) - set(controls))}; "
                                        f"controls of no claim: {sorted(set(controls) - set(keys))}")
    for key, spoil in controls.items():
        bad = copy.deepcopy(good)
        spoil(bad)
        verdict = {c.key: c.holds for c in claims_fn(bad, profile)}
        assert verdict[key] is False, f"claim {key!r} still holds on its negative control"


def set_at(*path_value) -> Callable[[dict], None]:
    """A negative control that sets one value of the analysis: ``set_at("methods", "fgsm", 0.0)``
    (or ``set_at(["methods", "fgsm"], 0.0)``) sets ``analysis["methods"]["fgsm"] = 0.0``."""
    *path, value = path_value
    if len(path) == 1 and isinstance(path[0], (list, tuple)):
        path = list(path[0])
    if not path:
        raise ValueError("set_at needs a path and a value")

    def spoil(analysis: dict) -> None:
        for key in path[:-1]:
            analysis = analysis[key]
        analysis[path[-1]] = value

    return spoil
