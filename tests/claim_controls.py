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
