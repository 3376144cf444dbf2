"""Power, multiplicity and warnings of compare: Holm across metrics, the smallest detectable change, small n."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import circuitdiff as cd
from circuitdiff.significance import holm, minimum_detectable_effect

GRAPH = cd.AttributionGraph(2, 2, level="layer")


def scores(values: torch.Tensor) -> cd.EdgeScores:
    values = values * GRAPH.edge_mask
    return cd.EdgeScores(GRAPH, values.mean(0), values, torch.zeros(values.shape[0]),
                         sample_ids=tuple(f"q{i}" for i in range(values.shape[0])))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    adjusted = holm(np.array([0.01, 0.04, math.nan, 0.03, 0.005]))
    assert adjusted[[0, 1, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[2])
    assert holm(np.array([0.02, 0.3])) == pytest.approx([0.04, 0.3])
    assert holm(np.array([0.9, 0.8])) == pytest.approx([1.0, 1.0])  # 2 x 0.8 clipped at 1, and monotone


def test_holm_controls_the_family_wise_error_under_the_null():
    rng = np.random.default_rng(0)
    trials, alpha = 4000, 0.05
    any_rejection = np.mean([holm(rng.uniform(size=7)).min() <= alpha for _ in range(trials)])
    # FWER <= alpha; 3 binomial standard errors above it still fails a method without correction (~0.30)
    assert any_rejection <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


@pytest.mark.parametrize("paired", [True, False])
def test_minimum_detectable_effect_has_the_stated_power(paired):
    """Simulate the t-test on data with a true difference of the MDE: it rejects in 80% of trials."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=40), rng.normal(size=40) * 1.5
    effect = minimum_detectable_effect(x, y, paired)
    spread = np.std(y - x, ddof=1) if paired else None
    trials = 3000
    rejections = 0
    for _ in range(trials):
        if paired:
            rejections += stats.ttest_1samp(rng.normal(effect, spread, size=40), 0).pvalue < 0.05
        else:
            a, b = rng.normal(0, np.std(x, ddof=1), 40), rng.normal(effect, np.std(y, ddof=1), 40)
            rejections += stats.ttest_ind(b, a, equal_var=False).pvalue < 0.05
    assert rejections / trials == pytest.approx(0.8, abs=3 * math.sqrt(0.16 / trials) + 0.01)


def test_minimum_detectable_effect_shrinks_with_n_and_is_nan_when_undefined():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=400), rng.normal(size=400)
    small, large = minimum_detectable_effect(x[:25], y[:25], True), minimum_detectable_effect(x, y, True)
    assert large < small / 3  # about 1 / sqrt(n): 16x the samples, a quarter of the size
    assert math.isnan(minimum_detectable_effect(x[:1], y[:1], True))
    assert math.isnan(minimum_detectable_effect(x, x, True))  # no spread: nothing to size


def test_compare_rows_carry_holm_and_detectable_and_warn_on_small_samples():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(12, GRAPH.n_sources, GRAPH.n_receivers, generator=g) + 0.5
    result = cd.compare(scores(base), scores(base * 1.01 + 0.3 * torch.rand(base.shape, generator=g)),
                        n_resamples=300, breakdown=False)
    rows = [r for r in result.rows if r.group == "all"]
    assert [r.p_holm for r in rows] == pytest.approx(list(holm(np.array([r.p_value for r in rows]))), nan_ok=True)
    assert all(r.p_holm >= r.p_value for r in rows if not math.isnan(r.p_value))
    assert all(r.detectable > 0 for r in rows if r.metric != "information_complexity")
    assert result.warnings[0].startswith("few samples (base 12, tuned 12; fewer than 30)")
    spanning = [r for r in rows if r.ci_low <= 0 <= r.ci_high]
    assert spanning, "the example should hold a metric whose CI spans 0"
    for row in spanning:
        assert any(w.startswith(f"{row.metric}: the 95% CI") and f"±{row.detectable:.3g}" in w
                   for w in result.warnings)
    markdown = result.to_markdown()
    assert "| p (Holm) | detectable |" in markdown and "**Warnings**" in markdown


def test_top_k_at_layer_level_is_clamped_and_labelled():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, GRAPH.n_sources, GRAPH.n_receivers, generator=g)
    tuned = torch.randn(40, GRAPH.n_sources, GRAPH.n_receivers, generator=g)
    result = cd.compare(scores(base), scores(tuned), n_resamples=100, breakdown=False, top_k=100)
    similarity = result.similarity[0]
    assert GRAPH.n_edges < 100 and similarity.k_clamped and similarity.k == GRAPH.n_edges // 2
    assert similarity.top_k_jaccard < 1  # over every edge it would be 1 whatever the scores
    assert f"({similarity.k}; clamped from 100, which reaches every edge)" in result.to_markdown()
    unclamped = cd.compare(scores(base), scores(tuned), n_resamples=100, breakdown=False, top_k=5).similarity[0]
    assert unclamped.k == 5 and not unclamped.k_clamped


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.001])
def test_minimum_detectable_effect_at_tiny_n_and_small_alpha(n, alpha):
    """Few degrees of freedom and a small alpha need a large noncentrality: found, not a solver error."""
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(size=n)
    for paired in (True, False):
        effect = minimum_detectable_effect(x, y, paired, alpha)
        assert math.isfinite(effect) and effect > 0
        if paired:  # the power at that effect is the stated 80%
            df, se = n - 1, np.std(y - x, ddof=1) / math.sqrt(n)
            critical = stats.t.ppf(1 - alpha / 2, df)
            power = stats.nct.sf(critical, df, effect / se) + stats.nct.cdf(-critical, df, effect / se)
            assert power == pytest.approx(0.8, abs=1e-6)
    g = torch.Generator().manual_seed(n)
    base = torch.rand(n, GRAPH.n_sources, GRAPH.n_receivers, generator=g)
    result = cd.compare(scores(base), scores(base + 0.1 * torch.rand(base.shape, generator=g)), confidence=1 - alpha,
                        n_resamples=50, breakdown=False, edge_tests=False)
    assert all(math.isfinite(r.detectable) for r in result.rows if r.metric == "intensity")
