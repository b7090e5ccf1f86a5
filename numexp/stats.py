"""Summaries over seeds: mean, standard deviation, Student-t confidence intervals, paired differences.

Plain numpy and the standard library (scipy is a test-only dependency): the Student-t
distribution comes from the regularized incomplete beta function,

    P(T > t) = I_x(df/2, 1/2) / 2,   x = df / (df + t^2),   t >= 0,

evaluated by its continued fraction (Numerical Recipes, 3rd ed., section 6.4) and inverted
by bisection, which agrees with ``scipy.stats.t.ppf`` to 1e-10 relative (df from 0.5 to 1e5).

    >>> summarize([0.97, 0.98, 0.975])["ci_low"]          # 95% t interval of the mean
    >>> paired_difference({0: 0.98, 1: 0.97}, {0: 0.975, 1: 0.972})   # matched by seed
"""
import math
from statistics import NormalDist

import numpy as np

_EPS = 1e-15
_TINY = 1e-300


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return float(x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges fast only for x < (a + 1) / (a + b + 2): use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a, b, x, max_iter=10000):
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def t_sf(t, df):
    """Survival function P(T > t) of Student's t with ``df`` > 0 degrees of freedom (inf = normal)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    t = float(t)
    if math.isnan(t):
        return math.nan
    if math.isinf(df):
        return 1.0 - NormalDist().cdf(t) if t < 0 else NormalDist().cdf(-t)
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t, df):
    """Cumulative distribution P(T <= t) of Student's t."""
    return 1.0 - t_sf(t, df) if t >= 0 else t_sf(-t, df)


def t_ppf(p, df):
    """Quantile (inverse CDF) of Student's t: the ``t`` with P(T <= t) = ``p``, 0 < p < 1.

    ``t_ppf(0.975, 4)`` = 2.7764..., the factor of a 95% interval from 5 values.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p == 0.5:
        return 0.0
    tail = min(p, 1.0 - p)
    # bracket the upper-tail point, then bisect: t_sf is strictly decreasing
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


def summarize(values, confidence=0.95):
    """Mean, sample standard deviation and the Student-t confidence interval of the mean.

    NaN values (a run without a result) are left out and not counted.

    Args:
        values: numbers (e.g. one test accuracy per seed).
        confidence: two-sided coverage of the interval.

    Returns:
        dict: n, mean, std (ddof=1), sem (std / sqrt(n)), half_width (t_{(1+c)/2, n-1} * sem),
        ci_low, ci_high, min, max. With n = 1, std and the interval are NaN; with n = 0, all are NaN.
    """
    x = np.asarray(list(values), dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    nan = math.nan
    out = {"n": n, "mean": nan, "std": nan, "sem": nan, "half_width": nan, "ci_low": nan, "ci_high": nan,
           "min": nan, "max": nan}
    if n == 0:
        return out
    mean = float(x.mean())
    out.update(mean=mean, min=float(x.min()), max=float(x.max()))
    if n >= 2:
        std = float(x.std(ddof=1))
        sem = std / math.sqrt(n)
        half = t_ppf(0.5 + confidence / 2.0, n - 1) * sem
        out.update(std=std, sem=sem, half_width=half, ci_low=mean - half, ci_high=mean + half)
    return out


def paired_difference(a, b, confidence=0.95):
    """The difference ``a - b`` paired by key (seed), with its t interval and paired t-test.

    Args:
        a, b: mappings key -> value (dicts or pandas Series indexed by seed). Only keys present
            in both with finite values are paired.

    Returns:
        dict: the :func:`summarize` entries of the differences, plus ``keys`` (paired keys,
        sorted), ``unpaired`` (keys in only one side), ``t`` and ``p_value`` (two-sided, H0: mean
        difference 0; NaN with fewer than two pairs, and for zero spread with a zero mean).
    """
    a, b = _as_mapping(a), _as_mapping(b)
    keys = sorted(k for k in set(a) & set(b) if np.isfinite(a[k]) and np.isfinite(b[k]))
    unpaired = sorted(set(a) ^ set(b))
    diffs = [a[k] - b[k] for k in keys]
    out = {**summarize(diffs, confidence), "keys": keys, "unpaired": unpaired, "t": math.nan,
           "p_value": math.nan}
    n = out["n"]
    if n >= 2:
        if out["sem"] > 0:
            t = out["mean"] / out["sem"]
            out.update(t=t, p_value=min(1.0, 2.0 * t_sf(abs(t), n - 1)))
        elif out["mean"] != 0:
            out.update(t=math.copysign(math.inf, out["mean"]), p_value=0.0)
    return out


def excludes_zero(result):
    """True if the interval ``[ci_low, ci_high]`` of a :func:`summarize` result lies on one side of 0."""
    lo, hi = result["ci_low"], result["ci_high"]
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))


def _as_mapping(values):
    items = values.items() if hasattr(values, "items") else enumerate(values)
    return {_plain(k): float(v) for k, v in items}


def _plain(key):
    """numpy integer keys as python ints, so that 0 and np.int64(0) pair."""
    return key.item() if isinstance(key, np.generic) else key
