"""numexp.stats: the Student-t quantile, intervals and paired differences, by hand and against scipy."""
import math

import numpy as np
import pandas as pd
import pytest

from numexp import stats

# t_{0.975, df} from a printed t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), 6 significant digits
T_TABLE_975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 10: 2.22814, 20: 2.08596,
               30: 2.04227, 100: 1.98397}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE_975.items()))
def test_t_ppf_matches_the_printed_table(df, expected):
    assert stats.t_ppf(0.975, df) == pytest.approx(expected, abs=6e-6 * expected)
    # 1 - 0.975 is not exactly 0.025 in floating point: symmetric to rounding
    assert stats.t_ppf(0.025, df) == pytest.approx(-stats.t_ppf(0.975, df), rel=1e-14)


def test_t_ppf_of_one_half_is_zero_and_infinite_df_is_the_normal():
    assert stats.t_ppf(0.5, 3) == 0.0
    assert stats.t_ppf(0.975, math.inf) == pytest.approx(1.959963984540054, abs=1e-12)
    assert stats.t_ppf(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)


def test_t_ppf_inverts_t_cdf():
    for df in (1, 2.5, 7, 40):
        for p in (1e-6, 0.01, 0.2, 0.7, 0.99, 1 - 1e-7):
            assert stats.t_cdf(stats.t_ppf(p, df), df) == pytest.approx(p, rel=1e-10)


@pytest.mark.parametrize("bad", [(0.0, 3), (1.0, 3), (0.5, 0), (0.5, -1)])
def test_t_ppf_rejects_impossible_arguments(bad):
    with pytest.raises(ValueError):
        stats.t_ppf(*bad)


def test_t_quantile_and_cdf_match_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (0.5, 1, 1.5, 2, 3, 4, 5, 7, 10, 29.3, 30, 50, 100, 1000, 1e5):
        for p in (1e-9, 1e-4, 0.001, 0.025, 0.05, 0.1, 0.3, 0.6, 0.9, 0.95, 0.975, 0.995, 1 - 1e-8):
            assert stats.t_ppf(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-10)
        for t in (-30.0, -2.0, -0.1, 0.0, 0.4, 1.96, 12.0):
            # lgamma cancellation at df = 1e5 limits the agreement to ~2e-11
            assert stats.t_cdf(t, df) == pytest.approx(st.t.cdf(t, df), rel=1e-10, abs=1e-15)


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b in ((0.5, 0.5), (1.0, 3.0), (15.0, 0.5), (50.0, 0.5), (2.5, 7.5)):
        for x in (0.0, 1e-6, 0.1, 0.5, 0.93, 1.0):
            assert stats.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-12, abs=1e-300)


def test_summarize_hand_computed_case():
    # 1, 2, 3, 4: mean 2.5, sample variance 5/3, sem sqrt(5/3)/2, t_{0.975,3} = 3.182446305284263
    s = stats.summarize([1, 2, 3, 4])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert s["n"] == 4 and s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert s["half_width"] == pytest.approx(half, rel=1e-12)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(2.5 - half, rel=1e-12), pytest.approx(2.5 + half, rel=1e-12))
    assert (s["min"], s["max"]) == (1.0, 4.0)


def test_summarize_interval_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    x = np.array([0.9812, 0.9790, 0.9845, 0.9801, 0.9833])
    s = stats.summarize(x, confidence=0.9)
    lo, hi = st.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_summarize_one_value_has_no_interval_and_nan_values_are_left_out():
    one = stats.summarize([0.97, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.97 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    none = stats.summarize([])
    assert none["n"] == 0 and math.isnan(none["mean"])


def test_paired_difference_hand_computed_case():
    # differences 0.5, 1.0, 0.1: mean 1.6/3, the paired t-test on 2 degrees of freedom, t_{0.975,2} = 4.3026527...
    d = stats.paired_difference({0: 1.0, 1: 3.0, 2: 5.0}, {0: 0.5, 1: 2.0, 2: 4.9})
    diffs = np.array([0.5, 1.0, 0.1])
    sem = diffs.std(ddof=1) / math.sqrt(3)
    assert d["n"] == 3 and d["keys"] == [0, 1, 2] and d["unpaired"] == []
    assert d["mean"] == pytest.approx(1.6 / 3, rel=1e-12)
    assert d["t"] == pytest.approx(diffs.mean() / sem, rel=1e-12)
    assert d["ci_high"] - d["mean"] == pytest.approx(4.302652729749464 * sem, rel=1e-12)


def test_paired_difference_pairs_by_seed_not_by_position():
    a = pd.Series([0.90, 0.95, 0.80], index=[2, 0, 5])
    b = {0: 0.94, 2: 0.88, 3: 0.99}
    d = stats.paired_difference(a, b)
    assert d["keys"] == [0, 2] and d["unpaired"] == [3, 5]
    assert d["mean"] == pytest.approx(((0.95 - 0.94) + (0.90 - 0.88)) / 2)
    # numpy integer seeds pair with python ints
    assert stats.paired_difference({np.int64(0): 1.0, 1: 2.0}, {0: 0.5, 1: 1.0})["n"] == 2


def test_paired_difference_matches_scipy_ttest_rel():
    st = pytest.importorskip("scipy.stats")
    a = [0.9855, 0.9841, 0.9862, 0.9838, 0.9850]
    b = [0.9818, 0.9830, 0.9825, 0.9841, 0.9809]
    d = stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    ref = st.ttest_rel(a, b)
    assert d["t"] == pytest.approx(ref.statistic, rel=1e-10) and d["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
    assert stats.excludes_zero(d) == (lo > 0 or hi < 0)


def test_paired_difference_with_zero_spread():
    same = stats.paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same["mean"] == 0 and same["ci_low"] == same["ci_high"] == 0 and math.isnan(same["p_value"])
    assert not stats.excludes_zero(same)
    shifted = stats.paired_difference({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})
    assert shifted["p_value"] == 0.0 and stats.excludes_zero(shifted)
