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
from scipy import stats

from circuitdiff.metrics import PooledMetric, Profile

__all__ = ["mean_difference_interval", "pooled_difference_interval", "difference_test"]


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
    NaN statistic and p-value without values.
    """
    if paired:
        name = "wilcoxon signed-rank"
        if x.size == 0:
            return name, math.nan, math.nan
        if np.all(y - x == 0):
            return name, 0.0, 1.0  # no difference at all: nothing to test
        result = stats.wilcoxon(y, x)
    else:
        name = "mann-whitney u"
        if x.size == 0 or y.size == 0:
            return name, math.nan, math.nan
        result = stats.mannwhitneyu(y, x)
    return name, float(result.statistic), float(result.pvalue)
