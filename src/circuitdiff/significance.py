"""Bootstrap intervals and tests of a metric's difference between two models (tuned - base).

Intervals are ``scipy.stats.bootstrap`` BCa intervals over samples (resampled together
when paired); tests are Wilcoxon signed-rank (paired) or Mann-Whitney U (unpaired) on
the per-sample values. Each function takes the generator it draws from, so a sequence of
calls with one generator is reproducible from its seed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
from jaxtyping import Float
from scipy import optimize, stats

from circuitdiff.metrics import PooledMetric, Profile

#: Fewer samples than this on a side get a warning: tests, intervals and p-values rest on few samples.
SMALL_SAMPLE = 30

__all__ = ["mean_difference_interval", "pooled_difference_interval", "difference_test", "holm", "minimum_detectable_effect",
           "SMALL_SAMPLE"]


def _interval(data: tuple[np.ndarray, np.ndarray], statistic: Callable[..., Any], paired: bool, confidence: float,
              n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """BCa interval of a vectorized statistic; a constant bootstrap distribution gives that value twice."""
    if min(len(d) for d in data) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        # a constant bootstrap distribution (e.g. a model compared with itself) makes BCa divide 0 by 0
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=confidence,
                                 n_resamples=n_resamples, method="BCa", rng=rng, batch=100)
    distribution = result.bootstrap_distribution
    if np.ptp(distribution) == 0:  # every resample gives the same value: so does the interval
        return float(distribution.flat[0]), float(distribution.flat[0])
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_difference_interval(x: Float[np.ndarray, "n_base"], y: Float[np.ndarray, "n_tuned"], paired: bool,
                             confidence: float, n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Interval of ``mean(y) - mean(x)`` from the per-sample values (base ``x``, tuned ``y``, no NaN).

    NaN twice with fewer than 2 values on a side.
    """
    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(b, axis=axis) - np.mean(a, axis=axis)

    return _interval((x, y), statistic, paired, confidence, n_resamples, rng)


def pooled_difference_interval(metric: PooledMetric, base: Profile, tuned: Profile, paired: bool, confidence: float,
                               n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Interval of a pooled metric's difference, tuned - base: resample the samples, recompute the pooled values."""
    def statistic(i: np.ndarray, j: np.ndarray, axis: int = -1) -> np.ndarray:
        return metric.resampled_values(tuned, j) - metric.resampled_values(base, i)

    ib, it = np.arange(base.histograms.shape[0], dtype=float), np.arange(tuned.histograms.shape[0], dtype=float)
    return _interval((ib, it), statistic, paired, confidence, n_resamples, rng)


def difference_test(x: Float[np.ndarray, "n_base"], y: Float[np.ndarray, "n_tuned"],
                    paired: bool) -> tuple[str, float, float]:
    """``(test name, statistic, two-sided p-value)`` of tuned ``y`` against base ``x``.

    Paired: Wilcoxon signed-rank (p = 1 when every difference is 0); else Mann-Whitney U.
    NaN statistic and p-value without values. scipy's p-values throughout; for a paired
    sample of at most 13 finite differences with ties or zeros, scipy's exact sign-flip
    permutation test is run with a vectorised statistic (:func:`_small_tied_wilcoxon`):
    the same p-value, 30-60x faster.
    """
    if paired:
        name = "wilcoxon signed-rank"
        if x.size == 0:
            return name, math.nan, math.nan
        d = y - x
        if np.all(d == 0):
            return name, 0.0, 1.0  # no difference at all: nothing to test
        if d.size <= SMALL_WILCOXON and np.isfinite(d).all() and (
                (d == 0).any() or np.unique(np.abs(d)).size < d.size):  # zeros or ties: scipy's slow exact path
            return name, *_small_tied_wilcoxon(d)
        result = stats.wilcoxon(y, x)
    else:
        name = "mann-whitney u"
        if x.size == 0 or y.size == 0:
            return name, math.nan, math.nan
        result = stats.mannwhitneyu(y, x)
    return name, float(result.statistic), float(result.pvalue)


#: The largest paired sample whose tied Wilcoxon test scipy runs as an exact permutation test (2^n sign flips).
SMALL_WILCOXON = 13


def _small_tied_wilcoxon(d: np.ndarray) -> tuple[float, float]:
    """``(min(R+, R-), two-sided p)`` for differences ``d`` with ties or zeros: the exact test over all sign flips.

    What ``scipy.stats.wilcoxon`` computes for such a sample (zeros ranked 0, the others
    by the midranks of their ``|d|``; ``scipy.stats.permutation_test`` over the 2^n sign
    flips), with the statistic vectorised: a flip changes the signs, never the ranks.
    """
    nonzero = d != 0
    ranks = np.zeros(d.shape)
    ranks[nonzero] = stats.rankdata(np.abs(d[nonzero]))

    def r_plus(flipped: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(ranks * (flipped > 0), axis=axis)

    test = stats.permutation_test((d,), r_plus, permutation_type="samples", vectorized=True, n_resamples=np.inf,
                                  alternative="two-sided")
    plus = float(r_plus(d))
    return min(plus, float(ranks.sum()) - plus), float(test.pvalue)


def holm(p_values: Float[np.ndarray, "m"]) -> Float[np.ndarray, "m"]:
    """Holm-adjusted p-values of one family of tests (NaN entries stay NaN and do not count).

    The adjusted p-value of the i-th smallest of m p-values is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where it is <= alpha controls
    the family-wise error rate at alpha under any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, math.nan)
    defined = np.flatnonzero(~np.isnan(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m = order.size
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def minimum_detectable_effect(x: Float[np.ndarray, "n_base"], y: Float[np.ndarray, "n_tuned"], paired: bool,
                              alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference of means (tuned - base, in the metric's units) detectable at ``power``.

    The two-sided t-test at level ``alpha`` on these sample sizes and the observed spread
    (paired: of the differences; unpaired: Welch) rejects a true difference of this size
    with probability ``power`` (noncentral t distribution). NaN with fewer than 2 values on
    a side or no spread at all. For the rank tests of :func:`~circuitdiff.compare` it is a
    guide, not their exact power: Wilcoxon and Mann-Whitney do not test the mean, and their
    efficiency relative to the t-test is about 0.95 for normal data, at least 0.86 for
    symmetric ones, and above 1 for heavy tails.
    """
    if paired:
        n = x.size
        if n < 2:
            return math.nan
        se, df = float(np.std(y - x, ddof=1)) / math.sqrt(n), n - 1
    else:
        if x.size < 2 or y.size < 2:
            return math.nan
        vx, vy = np.var(x, ddof=1) / x.size, np.var(y, ddof=1) / y.size
        se = math.sqrt(vx + vy)
        df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1)) if se > 0 else math.nan
    if not se > 0:
        return math.nan
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(noncentrality: float) -> float:
        upper_tail = stats.nct.sf(critical, df, noncentrality)
        lower_tail = np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality))  # underflows far out
        return float(upper_tail + lower_tail - power)

    upper = critical + 8.0  # enough for large df; few df with a small alpha need more
    while shortfall(upper) <= 0:
        upper *= 2
        if upper > 1e6:
            return math.nan
    return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10)) * se
