"""The paired and unpaired difference tests: scipy's p-values, also where scipy's own path is slow."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from circuitdiff.significance import SMALL_WILCOXON, difference_test


def test_small_tied_paired_samples_get_scipys_exact_permutation_p_value():
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(2, 11, 20), SMALL_WILCOXON]  # scipy's reference takes seconds at n = 13
    for k, n in enumerate(sizes):
        dtype = np.float32 if k % 2 else np.float64
        x = rng.integers(0, 4, n).astype(dtype)
        y = x + (rng.integers(-2, 3, n) * rng.choice([0.5, 1.0])).astype(dtype)  # ties and zeros in the differences
        y[0] = x[0] + 1.0  # not all zero
        name, statistic, p = difference_test(x, y, paired=True)
        reference = stats.wilcoxon(y, x)
        assert name == "wilcoxon signed-rank"
        assert (statistic, p) == (pytest.approx(reference.statistic, abs=1e-12), pytest.approx(reference.pvalue,
                                                                                                abs=1e-12)), (x, y)


def test_one_zero_difference_without_ties_takes_the_fast_exact_path(monkeypatch):
    x = np.arange(10, dtype=np.float32)
    y = x + np.array([0, 1, -2, 3, 4, -5, 6, 7, 8, 9], dtype=np.float32) * 0.1
    expected = stats.wilcoxon(y, x)  # scipy's own permutation test (one zero, no ties)
    monkeypatch.setattr(stats, "wilcoxon", None)  # the fast path must not call it
    assert difference_test(x, y, paired=True)[1:] == (pytest.approx(expected.statistic), pytest.approx(expected.pvalue))


def test_untied_and_unpaired_samples_are_scipys_tests():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=9), rng.normal(size=9) + 0.5
    assert difference_test(x, y, paired=True)[1:] == pytest.approx(tuple(stats.wilcoxon(y, x)))
    assert difference_test(x, y[:7], paired=False)[1:] == pytest.approx(tuple(stats.mannwhitneyu(y[:7], x)))
    assert difference_test(x, x.copy(), paired=True)[1:] == (0.0, 1.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("x, y", [
    ([0.0, 0, 0, 0], [0.0, 0, 0, 1]),  # one nonzero difference
    ([1.0, 2, 3], [2.0, 3, 3]),  # a tie and a zero
    ([np.inf, 1, 2, 3], [np.inf, 2, 4, 3]),  # inf - inf is NaN: scipy's own handling
    ([np.nan, 1, 2, 3, 5], [0.0, 2, 3, 3, 7]),  # NaN: scipy's NaN p-value, not a significant one
    ([np.inf, 1, 2, 3], [0.0, 2, 4, 3]),
])
def test_edge_cases_give_scipys_answer(x, y):
    x, y = np.array(x), np.array(y)
    expected = stats.wilcoxon(y, x)
    got = difference_test(x, y, paired=True)[1:]
    assert got == (pytest.approx(expected.statistic, nan_ok=True), pytest.approx(expected.pvalue, nan_ok=True))
