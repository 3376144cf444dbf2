"""Metrics and compare() on analytic cases (expected values derived by hand, not by the code)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import circuitdiff as cd
from circuitdiff import metrics
from circuitdiff.comparison import compare


def scores_from(graph, per_sample: torch.Tensor) -> cd.EdgeScores:
    per_sample = per_sample * graph.edge_mask  # structural zeros stay zero
    return cd.EdgeScores(graph=graph, mean=per_sample.mean(0), per_sample=per_sample,
                         objective_values=torch.zeros(per_sample.shape[0]))


def random_scores(graph, n: int = 30, seed: int = 0) -> cd.EdgeScores:
    g = torch.Generator().manual_seed(seed)
    return scores_from(graph, torch.randn(n, graph.n_sources, graph.n_receivers, generator=g, dtype=torch.float64))


@pytest.fixture(scope="module")
def graph(checkpoints):
    model = cd.load_model(checkpoints["llama"], dtype=torch.float32, device="cpu")
    return cd.AttributionGraph.from_model(model, level="head")


# ---------------------------------------------------------------------- building blocks
def test_intensity_of_a_known_matrix(graph):
    first = torch.full((graph.n_sources, graph.n_receivers), 0.5)
    second = torch.full((graph.n_sources, graph.n_receivers), -1.5)
    scores = scores_from(graph, torch.stack([first, second]).double())
    assert metrics.summarize(scores)["all"]["intensity"] == pytest.approx(1.0)
    cells = graph.n_sources * graph.n_receivers
    full = metrics.summarize(scores, structural_zeros=True)["all"]["intensity"]
    assert full == pytest.approx(graph.n_edges / cells)  # the zeros dilute it


def test_scaling_scales_intensity_only(graph):
    x = random_scores(graph)
    scaled = scores_from(graph, -3.0 * x.per_sample)
    a, b = metrics.summarize(x)["all"], metrics.summarize(scaled)["all"]
    assert b["intensity"] == pytest.approx(3.0 * a["intensity"], rel=1e-12)
    for metric in ("information_complexity", "kurtosis", "gini", "diversity", "effective_edges", "node_entropy"):
        assert b[metric] == pytest.approx(a[metric], rel=1e-9, abs=1e-12), metric


def test_histogram_entropy_extremes():
    assert metrics.histogram_entropy(torch.tensor([0.0, 7.0, 0.0])).item() == 0.0
    assert metrics.histogram_entropy(torch.full((16,), 3.0)).item() == pytest.approx(math.log(16))
    assert math.isnan(metrics.histogram_entropy(torch.zeros(4)).item())


def test_information_complexity_of_equal_magnitudes_is_zero(graph):
    signs = torch.randint(0, 2, (4, graph.n_sources, graph.n_receivers), generator=torch.Generator().manual_seed(0))
    scores = scores_from(graph, (2.0 * signs - 1).double())  # every |score| is 1: one bin
    assert metrics.summarize(scores)["all"]["information_complexity"] == 0.0


def test_kurtosis_gaussian_and_two_point():
    g = torch.Generator().manual_seed(0)
    assert abs(metrics.excess_kurtosis(torch.randn(1_000_000, generator=g, dtype=torch.float64)).item()) < 0.03
    p = 0.25  # two-point distribution: excess kurtosis (1 - 6pq) / (pq), whatever the two values
    values = torch.tensor([5.0] * 25 + [-2.0] * 75, dtype=torch.float64)
    assert metrics.excess_kurtosis(values).item() == pytest.approx((1 - 6 * p * (1 - p)) / (p * (1 - p)))
    assert math.isnan(metrics.excess_kurtosis(torch.ones(10)).item())


def test_gini_and_effective_edges_extremes():
    one_hot = torch.tensor([0.0, 0.0, 4.0, 0.0])
    assert metrics.gini(torch.ones(4)).item() == pytest.approx(0.0)
    assert metrics.gini(one_hot).item() == pytest.approx(1 - 1 / 4)
    assert metrics.effective_edges(torch.ones(8)).item() == pytest.approx(8.0)
    assert metrics.effective_edges(one_hot).item() == pytest.approx(1.0)
    x = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).abs()
    mean_abs_difference = (x[:, None] - x[None, :]).abs().mean()  # the textbook definition
    assert metrics.gini(x).item() == pytest.approx((mean_abs_difference / (2 * x.mean())).item())


def test_node_entropy_one_hot_and_uniform():
    cells = torch.tensor([[True, True, True, False], [True, True, False, False], [False, False, False, False]])
    matrix = torch.tensor([[0.0, -2.0, 0.0, 9.0], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    h = metrics.node_entropy(matrix, cells)
    assert h[0].item() == 0.0  # one-hot over its cells (the 9 is not one of its cells)
    assert h[1].item() == pytest.approx(math.log(2))  # uniform over its out-degree
    assert math.isnan(h[2].item())  # no outgoing edges


def test_diversity_identical_and_independent(graph):
    same = scores_from(graph, random_scores(graph, n=1).per_sample.expand(6, -1, -1).clone())
    assert metrics.summarize(same)["all"]["diversity"] == pytest.approx(0.0, abs=1e-12)
    independent = random_scores(graph, n=40)
    assert metrics.summarize(independent)["all"]["diversity"] == pytest.approx(1.0, abs=0.05)


def test_streaming_equals_in_memory(graph):
    """Chunked per-sample values equal whole-tensor references (numpy / scipy, all samples at once)."""
    x = random_scores(graph, n=25, seed=3)
    x = scores_from(graph, x.per_sample * torch.linspace(0.1, 2.0, 25, dtype=torch.float64)[:, None, None])
    groups = metrics.edge_groups(graph)
    tops = metrics.largest_magnitude(x, groups)
    one = metrics.profile(x, groups, tops, chunk_size=1)
    whole = metrics.profile(x, groups, tops, chunk_size=1000)
    for g in groups:
        for m in metrics.available():
            np.testing.assert_allclose(one[g].per_sample[m], whole[g].per_sample[m], rtol=1e-10, err_msg=f"{g} {m}")
        np.testing.assert_array_equal(one[g].histograms, whole[g].histograms)
    values = x.per_sample[:, graph.edge_mask]
    profile = whole["all"]
    assert profile.value("diversity") == pytest.approx(metrics.diversity(values), rel=1e-10)
    np.testing.assert_allclose(profile.per_sample["kurtosis"], stats.kurtosis(values.numpy(), axis=1), rtol=1e-10)
    np.testing.assert_allclose(profile.per_sample["intensity"], values.abs().mean(1).numpy(), rtol=1e-12)
    pooled, _ = np.histogram(values.abs().numpy(), bins=profile.bin_edges)
    np.testing.assert_array_equal(profile.histograms.sum(0), pooled)


def test_edge_groups_partition_the_edges(graph):
    groups = metrics.edge_groups(graph)
    for prefix in ("receiver:", "source:", "layer:"):
        parts = [cells for name, cells in groups.items() if name.startswith(prefix)]
        total = torch.stack(parts).sum(0)
        assert torch.equal(total, graph.edge_mask.long()), prefix
    assert set(groups) >= {"all", "receiver:q", "receiver:k", "receiver:v", "receiver:mlp", "receiver:logits",
                           "source:input", "source:attn", "source:mlp", "layer:0", "layer:logits"}


def test_relative_change():
    base = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    tuned = torch.tensor([[-3.0, 1.0], [5.0, 4.0]])
    cells = torch.tensor([[True, True], [True, False]])
    change = metrics.relative_change(base, tuned, cells)
    assert change[0, 0].item() == 2.0 and change[0, 1].item() == -0.5
    assert math.isnan(change[1, 0].item()) and math.isnan(change[1, 1].item())  # base 0; not a cell


# ---------------------------------------------------------------------- compare
def test_compare_with_itself_finds_nothing(graph):
    x = random_scores(graph)
    result = compare(x, x, n_resamples=200)
    assert result.paired
    for row in result.rows:
        if math.isnan(row.base):
            continue
        assert row.difference == 0.0 and row.ci_low == 0.0 and row.ci_high == 0.0, row
        assert row.p_value == 1.0 and row.test == "wilcoxon signed-rank", row
    for s in result.similarity:
        assert s.wasserstein == 0.0 and s.top_k_jaccard == 1.0


def test_compare_with_double_is_plus_100_percent_intensity(graph):
    x = random_scores(graph)
    result = compare(x, scores_from(graph, 2 * x.per_sample), n_resamples=500)
    row = result.get("intensity")
    assert row.percent_change == 100.0
    assert row.ci_low <= row.difference <= row.ci_high and row.ci_low > 0
    assert row.p_value < 1e-6
    for metric in ("kurtosis", "gini", "diversity", "effective_edges"):
        assert result.get(metric).difference == pytest.approx(0.0, abs=1e-9), metric
    similarity = result.similarity[0]
    assert similarity.spearman == pytest.approx(1.0) and similarity.top_k_jaccard == 1.0
    # |2x| is |x| stretched: the 1-Wasserstein distance is E|x|, the base intensity
    assert similarity.wasserstein == pytest.approx(result.get("intensity").base, abs=similarity.wasserstein_resolution)
    finite = torch.isfinite(result.relative_change)
    assert torch.equal(finite, graph.edge_mask & (x.mean != 0))
    assert torch.allclose(result.relative_change[finite], torch.ones(int(finite.sum()), dtype=torch.float64))


def test_detects_a_real_change_and_not_noise(graph):
    x = random_scores(graph, n=40, seed=1)
    noise = random_scores(graph, n=40, seed=2).per_sample
    louder = scores_from(graph, 1.2 * x.per_sample + 0.01 * noise)
    jitter = scores_from(graph, x.per_sample + 0.01 * noise)
    assert compare(x, louder, n_resamples=500).get("intensity").p_value < 1e-4
    row = compare(x, jitter, n_resamples=500).get("intensity")
    assert abs(row.percent_change) < 1.0


def test_unpaired_on_request_and_no_guess_without_ids(graph):
    a, b = random_scores(graph, n=20, seed=1), random_scores(graph, n=30, seed=2)
    result = compare(a, b, paired=False, n_resamples=200, breakdown=False)
    assert not result.paired and result.get("intensity").test == "mann-whitney u"
    assert result.groups == ["all"] and result.settings["n_base"] == 20 and result.settings["n_tuned"] == 30
    for paired in (None, True):  # positional ids and different counts: no pairing is guessed
        with pytest.raises(cd.DataError, match="carry no sample ids.*paired=False"):
            compare(a, b, paired=paired)


def test_shared_bins(graph):
    x = random_scores(graph)
    result = compare(x, scores_from(graph, 3 * x.per_sample), n_resamples=200, breakdown=False)
    top = 3 * x.per_sample.abs().max().item()
    assert result.bin_edges[0] == 0.0 and result.bin_edges[-1] == pytest.approx(top)
    assert result.histograms["base"].sum() == result.histograms["tuned"].sum() == 30 * graph.n_edges


def test_graphs_must_match_unless_coarsened(graph, checkpoints):
    x = random_scores(graph)
    layer = scores_from(graph.layer_level(), random_scores(graph.layer_level()).per_sample)
    with pytest.raises(cd.DataError, match="coarsen=True"):
        compare(x, layer)
    result = compare(x, layer, coarsen=True, n_resamples=200, breakdown=False)
    assert result.graph == graph.layer_level()
    neox = cd.AttributionGraph.from_model(cd.load_model(checkpoints["neox"], device="cpu"), level="layer")
    assert neox != graph.layer_level()  # parallel blocks: no edge from a layer's attention to its MLP
    other = scores_from(neox, torch.randn(30, neox.n_sources, neox.n_receivers, dtype=torch.float64))
    with pytest.raises(cd.DataError, match="different architectures"):
        compare(x, other, coarsen=True)


def test_needs_per_sample_scores(graph):
    x = random_scores(graph)
    no_samples = cd.EdgeScores(graph=graph, mean=x.mean, per_sample=None, objective_values=x.objective_values)
    with pytest.raises(cd.DataError, match="per_sample=True"):
        compare(no_samples, x)
    with pytest.raises(cd.ArgumentError, match="bins must be"):
        compare(x, x, bins=0)
    with pytest.raises(cd.ArgumentError, match="chunk_size must be"):
        compare(x, x, chunk_size=0)


@pytest.mark.parametrize("options", [dict(top_k=-5), dict(top_k="a"), dict(seed="x"), dict(n_resamples=0),
                                     dict(n_resamples=1.5), dict(confidence="x"), dict(paired="yes")],
                         ids=["top_k", "top_k-type", "seed", "n_resamples", "n_resamples-type", "confidence", "paired"])
def test_compare_refuses_bad_arguments(graph, options):
    x = random_scores(graph)
    with pytest.raises(cd.ArgumentError, match=next(iter(options))):
        compare(x, x, **options)


def test_outputs(graph, tmp_path):
    x = random_scores(graph)
    result = compare(x, scores_from(graph, 1.5 * x.per_sample), n_resamples=200)
    data = json.loads(result.to_json(str(tmp_path / "c.json")))
    assert json.loads((tmp_path / "c.json").read_text()) == data
    assert data["settings"]["test"] == "wilcoxon signed-rank" and data["histogram"]["bins"] == 100
    records = result.to_records()
    assert len(records) == len(result.groups) * len(metrics.available())
    assert {"metric", "group", "base", "tuned", "difference", "percent_change", "ci_low", "ci_high", "test",
            "p_value"} <= set(records[0])
    table = result.to_markdown(groups=["all", "receiver:q"])
    assert "| intensity |" in table and "**receiver:q**" in table and "+50.0%" in table
    with pytest.raises(cd.UnknownNameError, match="groups"):
        result.get("intensity", "nope")


def test_resampled_histogram_sums_equal_indexing():
    from circuitdiff.metrics.builtin import _resampled_sum

    rng = np.random.default_rng(0)
    histograms = rng.integers(0, 9, size=(7, 5)).astype(float)
    index = rng.integers(0, 7, size=(3, 4, 7)).astype(float)  # resamples with repeats, two leading axes
    np.testing.assert_array_equal(_resampled_sum(histograms, index), histograms[index.astype(int)].sum(-2))


def test_entropy_interval_brackets_a_real_change(graph):
    x = random_scores(graph, n=40, seed=4)
    spread = scores_from(graph, x.per_sample * torch.linspace(0.5, 1.5, x.per_sample.shape[-1], dtype=torch.float64))
    row = compare(x, spread, n_resamples=500, breakdown=False).get("information_complexity")
    assert row.ci_low <= row.difference <= row.ci_high and row.ci_low < row.ci_high
