"""agreement(): hand-built score pairs with known correlations, overlaps and signs."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import circuitdiff as cd
from circuitdiff.agreement import Agreement, agreement

GRAPH = cd.AttributionGraph(2, 2, level="layer")  # 23 edges


def scores_from_edges(values: torch.Tensor, graph: cd.AttributionGraph = GRAPH) -> cd.EdgeScores:
    mean = torch.zeros(graph.n_sources, graph.n_receivers, dtype=values.dtype)
    mean[graph.edge_mask] = values
    return cd.EdgeScores(graph, mean=mean, per_sample=None, objective_values=torch.zeros(1))


def random_values(seed: int = 0) -> torch.Tensor:
    return torch.randn(GRAPH.n_edges, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_scores_agree_perfectly():
    s = scores_from_edges(random_values())
    result = agreement(s, s)
    assert result.pearson == pytest.approx(1.0) and result.spearman == pytest.approx(1.0)
    assert result.top_k_overlap == result.sign_agreement == result.top_k_sign_agreement == 1.0
    # the default k (100) would reach all 23 edges, where the overlap is 1 whatever the scores: clamped to half
    assert result.n_edges == 23 and result.k == 11 and result.k_clamped


def test_clamped_default_k_is_labelled_and_informative():
    a, b = random_values(1), random_values(2)
    result = agreement(scores_from_edges(a), scores_from_edges(b))
    assert result.k_clamped and result.k == 11
    assert result.top_k_overlap < 1.0  # top 11 of 23 by |score| differ for unrelated scores
    assert "(k clamped to half the edges)" in result.to_markdown()
    assert not agreement(scores_from_edges(a), scores_from_edges(b), k=23).k_clamped


def test_negated_scores():
    v = random_values()
    result = agreement(scores_from_edges(-v), scores_from_edges(v), k=5)
    assert result.pearson == pytest.approx(-1.0) and result.spearman == pytest.approx(-1.0)
    assert result.sign_agreement == 0.0 and result.top_k_sign_agreement == 0.0
    assert result.top_k_overlap == 1.0  # same magnitudes


def test_monotone_nonlinear_transform():
    v = random_values()
    result = agreement(scores_from_edges(torch.exp(v)), scores_from_edges(v))
    assert result.spearman == pytest.approx(1.0)
    assert result.pearson < 0.99


def test_hand_built_top_k_overlap_and_signs():
    a = torch.full((23,), 0.1, dtype=torch.float64)
    b = torch.full((23,), 0.1, dtype=torch.float64)
    a[:4] = torch.tensor([10.0, 9.0, 8.0, 0.0], dtype=torch.float64)
    b[:4] = torch.tensor([10.0, 0.0, -8.0, 9.0], dtype=torch.float64)
    result = agreement(scores_from_edges(a), scores_from_edges(b), k=3)
    # top-3 |a| = {0, 1, 2}, top-3 |b| = {0, 2, 3}
    assert result.top_k_overlap == pytest.approx(2 / 3)
    # both nonzero: edge 0 and 2 and the 19 edges at 0.1; edge 2 disagrees
    assert result.sign_agreement == pytest.approx(20 / 21)
    # reference's top 3: edge 3 has a == 0 (skipped), edge 0 agrees, edge 2 does not
    assert result.top_k_sign_agreement == pytest.approx(0.5)
    assert agreement(scores_from_edges(a), scores_from_edges(b), k=1).top_k_overlap == 1.0


def test_top_k_ties_follow_edge_order():
    a = torch.ones(23, dtype=torch.float64)  # all tied: top-2 are edges 0 and 1
    b = torch.zeros(23, dtype=torch.float64)
    b[1], b[5] = 2.0, 1.0
    assert agreement(scores_from_edges(a), scores_from_edges(b), k=2).top_k_overlap == 0.5


def test_constant_input_gives_nan_without_warnings():
    v = random_values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = agreement(scores_from_edges(v), scores_from_edges(torch.zeros(23, dtype=torch.float64)))
        same = agreement(scores_from_edges(torch.ones(23)), scores_from_edges(torch.ones(23)))
    assert math.isnan(result.pearson) and math.isnan(result.spearman)
    assert math.isnan(result.sign_agreement) and math.isnan(result.top_k_sign_agreement)
    assert math.isnan(same.pearson) and same.sign_agreement == 1.0 and same.top_k_overlap == 1.0


def test_graph_mismatch_is_refused_with_a_fix():
    head = cd.AttributionGraph(2, 2, level="head")
    head_scores = cd.EdgeScores(head, mean=torch.randn(head.n_sources, head.n_receivers) * head.edge_mask,
                                per_sample=None, objective_values=torch.zeros(1))
    layer_scores = scores_from_edges(random_values().float())
    with pytest.raises(cd.DataError, match="to_layer_level"):
        agreement(head_scores, layer_scores)
    coarse = agreement(head_scores.to_layer_level(), layer_scores)
    assert coarse.n_edges == 23
    other = cd.AttributionGraph(3, 2, level="layer")
    other_scores = cd.EdgeScores(other, mean=torch.zeros(other.n_sources, other.n_receivers),
                                 per_sample=None, objective_values=torch.zeros(1))
    with pytest.raises(cd.DataError, match="same model"):
        agreement(other_scores, layer_scores)


def test_bad_k_and_nan_are_refused():
    s = scores_from_edges(random_values())
    for k in (0, 24):
        with pytest.raises(ValueError, match="k="):
            agreement(s, s, k=k)
    nan = random_values()
    nan[3] = float("nan")
    with pytest.raises(cd.DataError, match="NaN"):
        agreement(scores_from_edges(nan), s)


def test_reporting():
    s = scores_from_edges(random_values())
    result = agreement(s, s, k=5)
    assert isinstance(result, Agreement)
    data = result.to_dict()
    assert set(data) == {"pearson", "spearman", "top_k_overlap", "k", "sign_agreement",
                         "top_k_sign_agreement", "n_edges", "k_clamped"}
    json.dumps(data)
    markdown = result.to_markdown()
    assert markdown.startswith("| metric | value |") and "| top-5 overlap | 1.000 |" in markdown
    assert "23 edges" in str(result) and "spearman=1.000" in str(result)
