"""Claims: what a chapter says about its run, as data that code checks and a table shows.

Every experiment module offers ``analyse(result) -> dict`` (the numbers its chapter discusses) and
``claims(analysis, profile) -> list[Claim]``. A :class:`Claim` holds the statement, the measured
value, the threshold, whether it holds, and the profiles under which it is asserted; the chapter
shows them with :func:`table`, quotes numbers of the run with :func:`glue`, and ends with a hidden
cell that calls :func:`check`, which fails on every claim asserted under the active profile that
does not hold. Each claim function is unit-tested with a negative control: an analysis on which it
must come out False.

    >>> analysis = ch5.analyse(result)
    >>> cl = ch5.claims(analysis, profile)
    >>> ntklab.claims.table(cl, profile)          # in a notebook: the claims table
    >>> ntklab.claims.check(cl, profile)          # AssertionError naming every failed claim

A claim compares one measured number with a threshold (:func:`compare`), or combines several
comparisons (:func:`all_of`) when one sentence of the chapter rests on them all. Introduced in
chapter 1.
"""
from __future__ import annotations

import html
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = ["Claim", "compare", "all_of", "check", "failing", "table", "ClaimsTable", "glue", "binomial_se",
           "paired_difference", "mcnemar_exact", "bootstrap"]

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}


def _profile_name(profile) -> str:
    name = getattr(profile, "name", profile)
    if not isinstance(name, str):
        raise ValueError(f"profile must be a Profile or a profile name; got {type(profile).__name__}")
    return name


@dataclass(frozen=True)
class Claim:
    """One claim of a chapter about its run.

    key: a short identifier, unique within an experiment (tests name claims by it);
    statement: the sentence the chapter makes; value: the measured value (a number, or a short text
    for a combined claim); threshold: what it is compared with, as text (``">= 0.75"``,
    ``"in [2, 10]"``); holds: whether the run supports the statement; profiles: the profile names
    under which :func:`check` asserts it (the book's thresholds are written for ``quick``; under
    other profiles the table shows the claim as "not asserted at this scale"; with no profile the
    claim is an observation of the run that the table reports and nothing asserts).
    """

    key: str
    statement: str
    value: Any
    threshold: str
    holds: bool
    profiles: tuple[str, ...] = ("quick",)
    parts: tuple["Claim", ...] = field(default=(), repr=False)

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"key must be a non-empty string; got {self.key!r}")
        if not isinstance(self.holds, bool):
            object.__setattr__(self, "holds", bool(self.holds))
        object.__setattr__(self, "profiles", tuple(self.profiles))

    def asserted_under(self, profile) -> bool:
        """Whether :func:`check` asserts this claim under ``profile`` (a Profile or a name)."""
        return _profile_name(profile) in self.profiles


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) or (hasattr(x, "item") and getattr(x, "ndim", None) == 0)


def _as_float(value, what: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{what} must be a number; got {type(value).__name__}: {value!r}")
    return float(value.item() if hasattr(value, "item") else value)


def compare(key: str, statement: str, value, op: str, threshold, *,
            profiles: Sequence[str] = ("quick",)) -> Claim:
    """A claim that ``value op threshold``: op is one of ``>=``, ``>``, ``<=``, ``<``, ``==``,
    ``!=``, or ``"between"`` with ``threshold = (low, high)`` (both inclusive). A value that is not
    finite (NaN, inf) never holds. Raises ``ValueError`` for an unknown op or a non-numeric value."""
    v = _as_float(value, "value")
    if op == "between":
        if not (isinstance(threshold, (tuple, list)) and len(threshold) == 2):
            raise ValueError(f"threshold for 'between' must be (low, high); got {threshold!r}")
        low, high = (_as_float(t, "threshold") for t in threshold)
        holds = math.isfinite(v) and low <= v <= high
        text = f"in [{low:g}, {high:g}]"
    elif op in _OPS:
        t = _as_float(threshold, "threshold")
        holds = math.isfinite(v) and _OPS[op](v, t)
        text = f"{op} {t:g}"
    else:
        raise ValueError(f"unknown op {op!r}; valid ops are: {', '.join([*_OPS, 'between'])}")
    return Claim(key, statement, v, text, holds, tuple(profiles))


def all_of(key: str, statement: str, parts: Iterable[Claim], *, profiles: Sequence[str] = ("quick",)) -> Claim:
    """A claim that holds when every one of ``parts`` (claims made with :func:`compare`; their
    keys and profiles are ignored) holds. Its value and threshold list the parts'."""
    parts = tuple(parts)
    if not parts:
        raise ValueError("parts must hold at least one claim")
    value = "; ".join(f"{p.key} {_fmt(p.value)}" for p in parts)
    threshold = "; ".join(f"{p.key} {p.threshold}" for p in parts)
    return Claim(key, statement, value, threshold, all(p.holds for p in parts), tuple(profiles), parts)


def failing(claims: Iterable[Claim], profile) -> list[Claim]:
    """The claims asserted under ``profile`` that do not hold."""
    return [c for c in claims if c.asserted_under(profile) and not c.holds]


def check(claims: Iterable[Claim], profile) -> list[Claim]:
    """Assert every claim asserted under ``profile``: raises ``AssertionError`` listing each one
    that does not hold (with its value and threshold); returns the claims it asserted."""
    claims = list(claims)
    keys = [c.key for c in claims]
    if len(set(keys)) != len(keys):
        raise ValueError(f"claim keys must be unique; got {keys}")
    bad = failing(claims, profile)
    if bad:
        lines = [f"{c.key}: {c.statement} (measured {_fmt(c.value)}, needs {c.threshold})" for c in bad]
        raise AssertionError(f"{len(bad)} claim(s) do not hold under {_profile_name(profile)!r}:\n" + "\n".join(lines))
    return [c for c in claims if c.asserted_under(profile)]


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if _is_number(value):
        v = _as_float(value, "value")
        if math.isfinite(v) and v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    return str(value)


class ClaimsTable:
    """A table of claims for a notebook (HTML) or a terminal (text): number, statement, measured
    value, threshold, and "holds", "fails" or "not asserted at this scale"."""

    def __init__(self, claims: Sequence[Claim], profile):
        self.claims = list(claims)
        self.profile = _profile_name(profile)
        self.note = _data_note(profile)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for i, c in enumerate(self.claims, 1):
            verdict = "holds" if c.holds else "fails"
            if not c.profiles:
                verdict += " (an observation, never asserted)"
            elif not c.asserted_under(self.profile):
                verdict += " (not asserted at this scale)"
            rows.append((str(i), c.statement, _fmt(c.value), c.threshold, verdict))
        return rows

    def __str__(self) -> str:
        lines = [f"{n}. {s} | measured {v} | needs {t} | {h}" for n, s, v, t, h in self.rows()]
        return "\n".join(([self.note] if self.note else []) + lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("", "claim", "measured", "threshold", f"under {self.profile}"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                       for row in self.rows())
        note = f"<p><strong>{html.escape(self.note)}</strong></p>" if self.note else ""
        return f"{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_note(profile) -> str:
    """A warning for a table computed on generated data (``ntklab.data.SYNTHETIC``; ``profile`` a
    Profile or a profile name), else ``""``."""
    from ntklab import data
    from ntklab.config import PROFILES

    dataset = getattr(PROFILES.get(profile) if isinstance(profile, str) else profile, "dataset", None)
    if dataset not in getattr(data, "SYNTHETIC", ()):
        return ""
    return (f"These numbers come from {dataset}, SYNTHETIC CIFAR-shaped images generated for the "
            f"paper-shaped dry run, not from CIFAR-10: they show that the code runs at the paper's "
            f"structure, not whether a claim holds.")


def table(claims: Sequence[Claim], profile) -> ClaimsTable:
    """The claims as a table (shown as HTML in a notebook, as text by ``print``)."""
    return ClaimsTable(claims, profile)


def glue(values: dict, prefix: str = "") -> list[str]:
    """Glue every number (and string) of ``values`` for myst-nb, as ``prefix + key``, so that the
    chapter's markdown quotes it with ``{glue:text}`ch5_saving:.0%```. Nested dicts are glued with
    keys joined by ``_``; ``None`` (a quantity the run did not reach, e.g. no lazy onset) is glued as
    NaN, so the sentence quoting it prints "nan" instead of losing its key; other values are skipped.
    Returns the glued names. Needs ``myst_nb`` (installed with the book's requirements)."""
    from myst_nb import glue as _glue

    names = []

    def walk(d, head):
        for k, v in d.items():
            name = f"{head}{k}"
            if isinstance(v, dict):
                walk(v, name + "_")
            elif v is None:
                _glue(name, math.nan, display=False)
                names.append(name)
            elif isinstance(v, (str, bool)) or _is_number(v):
                _glue(name, v if isinstance(v, str) else (bool(v) if isinstance(v, bool) else _as_float(v, name)),
                      display=False)
                names.append(name)

    walk(values, prefix)
    return names


# ------------------------------------------------------------------ statistics for thresholds
def binomial_se(p: float, n: int) -> float:
    """The standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` examples
    (what "2 SE" means for a claim about one run's accuracy). Raises ``ValueError`` for ``n < 1``
    or ``p`` outside [0, 1]. Introduced in chapter 3."""
    p, n = _as_float(p, "p"), int(n)
    if n < 1 or not 0 <= p <= 1:
        raise ValueError(f"binomial_se needs n >= 1 and p in [0, 1]; got p={p}, n={n}")
    return math.sqrt(p * (1 - p) / n)


def mcnemar_exact(a, b) -> float:
    """The two-sided exact McNemar p-value for paired binary outcomes ``a`` and ``b`` (e.g. per
    example "still correct after the attack" for two models on the same examples): a binomial test
    of the discordant pairs (a and not b against b and not a) at 1/2; 1.0 without discordant pairs.
    Introduced in chapter 3."""
    from scipy.stats import binomtest

    d = paired_difference(a, b)
    n = d["only_a"] + d["only_b"]
    return 1.0 if n == 0 else float(binomtest(d["only_a"], n, 0.5).pvalue)


def paired_difference(a, b) -> dict:
    """The difference of two paired accuracies: ``a``, ``b`` sequences of 0/1 (or bools) of equal
    length n over the same examples. Returns ``diff`` = mean(a) - mean(b), ``se`` its paired
    standard error ``sqrt((n01 + n10 - (n10 - n01)^2 / n) / n^2)`` (the standard error of the mean
    of the per-example differences, with the 1/n variance), ``only_a`` (a right, b wrong),
    ``only_b`` and ``n``. Introduced in chapter 3."""
    import numpy as np

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape or a.size == 0 or not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("a and b must be non-empty 0/1 sequences of equal length")
    diff = a - b
    return {"diff": float(diff.mean()), "se": float(diff.std() / math.sqrt(a.size)), "only_a": int((diff > 0).sum()),
            "only_b": int((diff < 0).sum()), "n": int(a.size)}


def bootstrap(statistic, n: int, *, draws: int = 1000, seed: int = 0, strata=None, level: float = 0.95) -> dict:
    """A percentile bootstrap of ``statistic(index)`` (a function of an integer index array of
    resampled examples, returning a float or a 1-d array) over ``n`` examples: ``draws``
    resamples with replacement, within each stratum of ``strata`` (e.g. the labels, so every class
    keeps its count) when given. Returns ``value`` (the statistic on all examples), ``se`` (the
    bootstrap standard deviation), ``low`` and ``high`` (the percentile interval at ``level``), as
    floats or arrays like the statistic. Introduced in chapter 3."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == s)
                                                    for s in np.unique(np.asarray(strata))]
    if n < 1 or sum(len(g) for g in groups) != n:
        raise ValueError(f"bootstrap needs n >= 1 and strata of length n; got n={n}")
    value = np.asarray(statistic(np.arange(n)), dtype=float)
    samples = np.stack([np.asarray(statistic(np.concatenate([rng.choice(g, size=len(g)) for g in groups])),
                                   dtype=float) for _ in range(draws)])
    q = (1 - level) / 2
    out = {"value": value, "se": samples.std(axis=0, ddof=1), "low": np.quantile(samples, q, axis=0),
           "high": np.quantile(samples, 1 - q, axis=0)}
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}
