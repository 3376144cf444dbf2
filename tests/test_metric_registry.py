"""The metric registry: built-ins in report order, custom metrics in compare() and its reports, plugins, errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import circuitdiff as cd
from circuitdiff import metrics
from plugin_helpers import installed_package

GRAPH = cd.AttributionGraph(2, 4, level="head")
BUILTINS = ["intensity", "information_complexity", "kurtosis", "diversity", "node_entropy", "gini",
            "effective_edges"]


def scores(per_sample: torch.Tensor) -> cd.EdgeScores:
    per_sample = per_sample * GRAPH.edge_mask
    return cd.EdgeScores(GRAPH, per_sample.mean(0), per_sample, torch.zeros(per_sample.shape[0]))


def random_scores(n: int = 12, seed: int = 0) -> cd.EdgeScores:
    g = torch.Generator().manual_seed(seed)
    return scores(torch.randn(n, GRAPH.n_sources, GRAPH.n_receivers, generator=g, dtype=torch.float64))


class LargestEdge(metrics.SampleMetric):
    """The largest |score| of the sample."""

    units = "score units"
    higher_means = "the strongest edge got stronger"

    def per_sample(self, chunk: metrics.Chunk) -> torch.Tensor:
        return chunk.values.abs().amax(-1)


class ShareOfLargest(metrics.SampleMetric):
    """Each sample's largest |score| over the largest of all samples (two passes)."""

    units = "1"
    higher_means = "the sample holds more of the strongest edges"
    passes = 2

    def __init__(self) -> None:
        self.top = 0.0
        self.seen = 0

    def observe(self, chunk: metrics.Chunk) -> None:
        self.top = max(self.top, float(chunk.values.abs().max()))
        self.seen += chunk.values.shape[0]

    def per_sample(self, chunk: metrics.Chunk) -> torch.Tensor:
        assert self.seen == 12  # every sample was observed before the first per_sample
        return chunk.values.abs().amax(-1) / self.top


@pytest.fixture
def registered():
    """Register metrics for one test: ``registered(name, factory)``; all unregistered afterwards."""
    names: list[str] = []

    def register(name: str, factory) -> None:
        metrics.register_metric(name, factory)
        names.append(name)

    yield register
    for name in names:
        metrics.registry.unregister(name)


def test_builtins_in_report_order_with_their_definitions():
    assert metrics.available() == BUILTINS
    for name in BUILTINS:
        metric = metrics.get(name)
        assert isinstance(metric, metrics.Metric) and metric.passes in (1, 2)
        assert metric.description and metric.units and metric.higher_means, name
    assert isinstance(metrics.get("information_complexity"), metrics.PooledMetric)
    assert not isinstance(metrics.get("intensity"), metrics.PooledMetric)
    assert metrics.get("diversity") is not metrics.get("diversity")  # a new instance per use: state is not shared


def test_custom_metric_appears_in_compare_reports_and_summaries(registered):
    registered("largest_edge", LargestEdge)
    assert metrics.available() == BUILTINS + ["largest_edge"]
    x = random_scores()
    result = cd.compare(x, scores(2 * x.per_sample), n_resamples=200, breakdown=False)
    assert result.metrics == BUILTINS + ["largest_edge"]
    row = result.get("largest_edge")
    expected = x.per_sample[:, GRAPH.edge_mask].abs().amax(-1)
    assert row.base == pytest.approx(expected.mean().item()) and row.percent_change == pytest.approx(100.0)
    assert row.test == "wilcoxon signed-rank" and row.n_base == row.n_tuned == 12
    assert result.per_sample["tuned"]["largest_edge"] == pytest.approx(2 * expected.numpy())
    assert "| largest_edge |" in result.to_markdown() and "+100.0%" in result.to_markdown()
    data = json.loads(result.to_json())
    assert data["definitions"]["largest_edge"] == {"description": "The largest |score| of the sample",
                                                   "units": "score units",
                                                   "higher_means": "the strongest edge got stronger"}
    assert set(data["definitions"]) == set(result.metrics)
    assert metrics.summarize(x)["all"]["largest_edge"] == pytest.approx(expected.mean().item())
    # the built-in rows are unchanged by the extra metric
    assert result.get("intensity").percent_change == pytest.approx(100.0)


def test_two_pass_metric_observes_every_chunk_first(registered):
    registered("share_of_largest", ShareOfLargest)
    x = random_scores()
    groups = metrics.edge_groups(GRAPH, breakdown=False)
    profile = metrics.profile(x, groups, metrics.largest_magnitude(x, groups), chunk_size=5,
                              metrics=["share_of_largest"])["all"]
    largest = x.per_sample[:, GRAPH.edge_mask].abs().amax(-1)
    assert list(profile.per_sample) == ["share_of_largest"]
    assert profile.per_sample["share_of_largest"] == pytest.approx((largest / largest.max()).numpy())


def test_unknown_and_duplicate_names(registered):
    with pytest.raises(cd.UnknownNameError, match="unknown metric 'nope'; available: intensity, information_complexity"):
        metrics.get("nope")
    registered("largest_edge", LargestEdge)
    metrics.register_metric("largest_edge", LargestEdge)  # the same class again: nothing to do
    with pytest.raises(cd.DuplicateNameError, match="metric 'largest_edge' is already registered.*replace=True"):
        metrics.register_metric("largest_edge", ShareOfLargest)
    with pytest.raises(cd.DuplicateNameError, match="metric 'intensity' is already registered"):
        metrics.register_metric("intensity", LargestEdge)
    metrics.register_metric("largest_edge", ShareOfLargest, replace=True)
    assert isinstance(metrics.get("largest_edge"), ShareOfLargest)


def test_broken_metrics_are_named(registered):
    x = random_scores()
    registered("not_a_metric", lambda: object())
    with pytest.raises(cd.ArgumentTypeError, match="metric 'not_a_metric'.*not a metric.*SampleMetric"):
        cd.compare(x, x, breakdown=False)
    metrics.registry.unregister("not_a_metric")

    class OneNumber(LargestEdge):
        """A single number instead of one per sample."""

        def per_sample(self, chunk):
            return chunk.values.abs().max()

    registered("one_number", OneNumber)
    with pytest.raises(cd.ArgumentError, match=r"metric 'one_number': per_sample returned shape \(\)"):
        cd.compare(x, x, breakdown=False)


def test_a_pooled_custom_metric_sets_value_and_interval(registered):
    class PooledIntensity(LargestEdge):
        """Mean |score| over all samples at once, from the per-sample values."""

        def per_sample(self, chunk):
            return chunk.values.abs().mean(-1)

        def pooled_value(self, profile):
            return float(profile.per_sample["pooled_intensity"].mean())

        def resampled_values(self, profile, index):
            return profile.per_sample["pooled_intensity"][index.astype(int)].mean(-1)

    registered("pooled_intensity", PooledIntensity)
    x = random_scores()
    result = cd.compare(x, scores(1.5 * x.per_sample), n_resamples=200, breakdown=False)
    row, reference = result.get("pooled_intensity"), result.get("intensity")
    assert row.base == pytest.approx(reference.base) and row.difference == pytest.approx(reference.difference)
    assert row.ci_low <= row.difference <= row.ci_high and not math.isnan(row.ci_low)


PLUGIN_SOURCE = '''
import circuitdiff as cd


class LargestEdge(cd.metrics.SampleMetric):
    """The largest |score| of the sample."""

    units = "score units"
    higher_means = "the strongest edge got stronger"

    def per_sample(self, chunk):
        return chunk.values.abs().amax(-1)
'''


def test_entry_point_plugin_is_compared(tmp_path, monkeypatch):
    installed_package(tmp_path, monkeypatch, "metric-plugin",
                      {"circuitdiff.metrics": {"largest_edge": "metric_plugin:LargestEdge"}},
                      {"metric_plugin": PLUGIN_SOURCE})
    try:
        assert metrics.available() == BUILTINS + ["largest_edge"]
        assert "metric_plugin" not in sys.modules  # listed without being imported
        x = random_scores()
        result = cd.compare(x, x, n_resamples=200, breakdown=False)
        assert result.get("largest_edge").difference == 0.0
        assert result.definitions["largest_edge"]["units"] == "score units"
    finally:
        sys.modules.pop("metric_plugin", None)
