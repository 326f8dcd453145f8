"""ntklab.claims: comparisons, combined claims, check, table, and the negative-control helper."""
import math

import pytest
import torch

from ntklab import claims as C
from ntklab.config import get_profile
from claim_controls import assert_negative_controls


@pytest.mark.parametrize("op,threshold,value,holds", [
    (">=", 0.75, 0.75, True), (">=", 0.75, 0.749, False), (">", 1, 1, False), ("<", 0.3, 0.29, True),
    ("<=", 0.0, 0.1, False), ("==", 3, 3, True), ("!=", 3, 3, False),
    ("between", (2, 10), 2, True), ("between", (2, 10), 10.5, False),
])
def test_compare(op, threshold, value, holds):
    c = C.compare("k", "s", value, op, threshold)
    assert c.holds is holds and c.key == "k" and isinstance(c.value, float)


def test_compare_takes_tensor_and_numpy_scalars_and_never_holds_for_nan():
    import numpy as np

    assert C.compare("k", "s", torch.tensor(0.9), ">", 0.5).holds
    assert C.compare("k", "s", np.float32(0.9), ">", 0.5).holds
    assert not C.compare("k", "s", math.nan, "<", 1.0).holds
    assert not C.compare("k", "s", math.inf, ">", 1.0).holds


@pytest.mark.parametrize("kwargs,match", [
    ({"op": "~", "threshold": 1, "value": 1}, "op"),
    ({"op": ">", "threshold": 1, "value": "high"}, "value"),
    ({"op": "between", "threshold": 1, "value": 1}, "threshold"),
])
def test_compare_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.compare("k", "s", **kwargs)


def test_all_of_holds_only_when_every_part_holds():
    a, b = C.compare("a", "", 1, ">", 0), C.compare("b", "", 1, "<", 0)
    assert C.all_of("both", "s", [a, a]).holds
    both = C.all_of("both", "s", [a, b])
    assert not both.holds and "a" in both.value and "b" in both.threshold
    with pytest.raises(ValueError, match="parts"):
        C.all_of("none", "s", [])


def test_check_asserts_only_the_profiles_claims_and_names_the_failures():
    ok = C.compare("ok", "fine", 1, ">", 0)
    bad_quick = C.compare("bad", "the effect shows", 0.1, ">", 0.5)
    bad_paper = C.compare("paper_only", "at scale", 0.1, ">", 0.5, profiles=("paper",))
    assert C.check([ok, bad_paper], "quick") == [ok]
    with pytest.raises(AssertionError, match="bad: the effect shows") as err:
        C.check([ok, bad_quick, bad_paper], get_profile("quick"))
    assert "paper_only" not in str(err.value)
    assert C.failing([ok, bad_quick, bad_paper], "paper") == [bad_paper]
    with pytest.raises(ValueError, match="unique"):
        C.check([ok, ok], "quick")


def test_table_marks_claims_not_asserted_at_this_scale():
    rows = C.table([C.compare("a", "x holds", 0.8, ">=", 0.75), C.compare("b", "y", 0.1, ">", 0.5)], "paper").rows()
    assert rows[0][1:] == ("x holds", "0.800", ">= 0.75", "holds (not asserted at this scale)")
    assert rows[1][4] == "fails (not asserted at this scale)"
    html = C.table([C.compare("a", "x < y", 1, ">", 0)], "quick")._repr_html_()
    assert "x &lt; y" in html and "<td>holds</td>" in html


def test_glue_glues_numbers_and_nested_dicts(monkeypatch):
    myst_nb = pytest.importorskip("myst_nb")
    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.__setitem__(name, value))
    names = C.glue({"a": 0.5, "b": {"c": torch.tensor(2.0)}, "skip": [1, 2], "none": None}, prefix="ch1_")
    assert names == ["ch1_a", "ch1_b_c", "ch1_none"]
    assert glued["ch1_a"] == 0.5 and glued["ch1_b_c"] == 2.0 and math.isnan(glued["ch1_none"])


def _claims(analysis, profile):
    return [C.compare("big", "x is big", analysis["x"], ">", 1), C.compare("small", "y is small", analysis["y"], "<", 1)]


def test_negative_control_helper_catches_a_claim_that_cannot_fail_and_a_missing_control():
    good = {"x": 2, "y": 0}

    def x_low(a):
        a["x"] = 0

    def y_high(a):
        a["y"] = 5

    assert_negative_controls(_claims, good, {"big": x_low, "small": y_high})
    with pytest.raises(AssertionError, match="still holds"):
        assert_negative_controls(_claims, good, {"big": y_high, "small": y_high})
    with pytest.raises(AssertionError, match="without a negative control"):
        assert_negative_controls(_claims, good, {"big": x_low})


def test_table_calls_a_claim_of_no_profile_an_observation():
    rows = C.table([C.compare("o", "seen", 1, ">", 0, profiles=())], "quick").rows()
    assert rows[0][4] == "holds (an observation, never asserted)"
    assert C.check([C.compare("o", "seen", 0, ">", 1, profiles=())], "quick") == []


# ---------------------------------------------------------------- statistics helpers
def test_binomial_se():
    assert C.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert C.binomial_se(1.0, 10) == 0
    with pytest.raises(ValueError):
        C.binomial_se(0.5, 0)
    with pytest.raises(ValueError):
        C.binomial_se(1.5, 10)


def test_paired_difference_and_mcnemar_against_scipy_and_numpy():
    import numpy as np
    from scipy.stats import binomtest

    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.6
    b = a.copy()
    flip = rng.random(500) < 0.2
    b[flip] = rng.random(flip.sum()) < 0.4
    d = C.paired_difference(a, b)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    assert (d["only_a"], d["only_b"], d["n"]) == (n10, n01, 500)
    assert d["diff"] == pytest.approx(a.mean() - b.mean())
    assert d["se"] == pytest.approx(np.std(a.astype(float) - b.astype(float)) / np.sqrt(500))
    assert d["se"] == pytest.approx(np.sqrt((n10 + n01 - (n10 - n01) ** 2 / 500) / 500 ** 2))
    assert C.mcnemar_exact(a, b) == pytest.approx(binomtest(n10, n10 + n01, 0.5).pvalue)
    # negative control: identical outcomes differ by nothing and are not significant
    assert C.mcnemar_exact(a, a) == 1.0 and C.paired_difference(a, a)["diff"] == 0
    # a clear difference is significant
    assert C.mcnemar_exact(np.ones(100), np.r_[np.ones(70), np.zeros(30)]) < 1e-6
    with pytest.raises(ValueError):
        C.paired_difference([1, 0], [1])


def test_bootstrap_of_a_mean_matches_the_analytic_standard_error():
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    bs = C.bootstrap(lambda i: x[i].mean(), len(x), draws=2000, seed=3)
    assert bs["value"] == pytest.approx(x.mean())
    assert bs["se"] == pytest.approx(x.std() / np.sqrt(len(x)), rel=0.1)
    assert bs["low"] < x.mean() < bs["high"]
    # stratified: every resample keeps each stratum's count; a statistic of the strata is constant
    strata = np.r_[np.zeros(100), np.ones(300)]
    s = C.bootstrap(lambda i: strata[i].mean(), 400, draws=50, strata=strata)
    assert s["se"] == 0 and s["low"] == s["high"] == 0.75
    # vector statistics
    v = C.bootstrap(lambda i: np.array([x[i].mean(), x[i].max()]), 400, draws=100)
    assert v["value"].shape == (2,) and (v["low"] <= v["high"]).all()
    with pytest.raises(ValueError):
        C.bootstrap(lambda i: 0.0, 10, strata=np.zeros(5))


def test_a_table_of_synthetic_data_says_so():
    """Under the paper-shaped dry run (generated data) the claims table says, in text and HTML, that
    its numbers are not CIFAR-10's; under the book's profiles it says nothing of the kind."""
    from ntklab import claims
    from ntklab.config import get_profile

    cl = [claims.compare("k", "a statement", 0.5, ">", 0.1)]
    dry = claims.table(cl, get_profile("paper_cpu"))
    assert "SYNTHETIC" in str(dry) and "SYNTHETIC" in dry._repr_html_()
    for name in ("quick", "smoke", "paper"):
        table = claims.table(cl, get_profile(name))
        assert "SYNTHETIC" not in str(table) and "SYNTHETIC" not in table._repr_html_()
    assert "SYNTHETIC" in str(claims.table(cl, "paper_cpu"))        # a profile's name says it too
