"""AttributionGraph: edge counts derived by hand, masks, names, coarsening."""

from __future__ import annotations

import json

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.choices import GroupKind, Level, ReceiverKind, SourceKind
from circuitdiff.graph import LEVELS


def head_level_edges(n_layers: int, n_heads: int, n_kv: int, parallel: bool) -> int:
    """Count edges from the definition: every receiver reads every earlier source."""
    total = 0
    for layer in range(n_layers):
        earlier = 1 + layer * (n_heads + 1)  # input, then per earlier layer: heads + MLP
        total += (n_heads + 2 * n_kv) * earlier  # q per query head, k and v per kv head
        total += earlier + (0 if parallel else n_heads)  # MLP also reads this layer's heads
    return total + 1 + n_layers * (n_heads + 1)  # logits read everything


@pytest.mark.parametrize("n_layers", [1, 2, 5, 28])
def test_layer_level_edge_count_matches_paper(n_layers):
    graph = cd.AttributionGraph(n_layers, n_heads=4, level="layer")
    expected = 5 * n_layers + 4 * n_layers * (n_layers - 1) + (2 * n_layers + 1)
    assert graph.n_edges == expected == int(graph.edge_mask.sum())
    assert (graph.n_sources, graph.n_receivers) == (2 * n_layers + 1, 4 * n_layers + 1)


def test_paper_figure_for_28_layers():
    assert cd.AttributionGraph(28, 28, 4, level="layer").n_edges == 3221


@pytest.mark.parametrize("n_layers,n_heads,n_kv,parallel", [
    (1, 1, 1, False), (3, 4, 4, False), (3, 4, 2, False), (2, 8, 1, True), (4, 6, 3, True)])
def test_head_level_edge_count(n_layers, n_heads, n_kv, parallel):
    graph = cd.AttributionGraph(n_layers, n_heads, n_kv, parallel_blocks=parallel, level="head")
    assert graph.n_edges == head_level_edges(n_layers, n_heads, n_kv, parallel)
    assert graph.n_sources == 1 + n_layers * (n_heads + 1)
    assert graph.n_receivers == n_layers * (n_heads + 2 * n_kv + 1) + 1


def test_parallel_blocks_drop_attention_to_same_layer_mlp():
    sequential = cd.AttributionGraph(3, 2, level="layer")
    parallel = cd.AttributionGraph(3, 2, parallel_blocks=True, level="layer")
    assert sequential.n_edges - parallel.n_edges == 3
    for layer in range(3):
        a, m = parallel.source_index(f"a{layer}"), parallel.receiver_index(f"m{layer}")
        assert not parallel.edge_mask[a, m] and sequential.edge_mask[a, m]


@pytest.mark.parametrize("arch", [a for a in tm.ARCHITECTURES if a not in tm.LAYER_LEVEL_ONLY])
def test_from_model_matches_architecture(get_model, arch):
    model = get_model(arch)
    cfg = model.cfg
    graph = cd.AttributionGraph.from_model(model, level="head")
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    assert graph.n_kv_heads == n_kv
    assert graph.parallel_blocks == (arch == "neox")
    assert graph.n_edges == head_level_edges(cfg.n_layers, cfg.n_heads, n_kv, arch == "neox")


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_supported_levels_name_the_graphs_a_family_has(get_model, arch):
    assert cd.supported_levels(get_model(arch)) == tm.levels(arch)


@pytest.mark.parametrize("arch", tm.LAYER_LEVEL_ONLY)
def test_post_norm_families_have_a_layer_level_graph_only(get_model, arch):
    model = get_model(arch)
    with pytest.raises(cd.UnsupportedModelError, match=r"post-norm.*norm\(sum of heads\).*level=\"layer\""):
        cd.AttributionGraph.from_model(model, level="head")
    head_graph = cd.AttributionGraph(model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads, level="head")
    with pytest.raises(cd.UnsupportedModelError, match="post-norm"):  # a graph built without the model
        head_graph.bind(model, objective="answer_nll")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    assert graph.n_edges == head_level_edges(model.cfg.n_layers, 1, 1, False)  # one head and kv head per layer


def test_edges_respect_computation_order():
    graph = cd.AttributionGraph(3, 2, level="head")
    mask = graph.edge_mask
    for r, source in enumerate(graph.sources):
        for c, receiver in enumerate(graph.receivers):
            s_layer, r_layer = graph.source_layers[r], graph.receiver_layers[c]
            same_layer_mlp = graph.source_kinds[r] == "attn" and graph.receiver_kinds[c] == "mlp"
            expected = s_layer < r_layer or (s_layer == r_layer and same_layer_mlp)
            assert bool(mask[r, c]) == expected, f"{source}->{receiver}"


def test_names_are_unique_and_follow_the_scheme():
    graph = cd.AttributionGraph(4, 4, 2, level="head")
    assert len(set(graph.sources)) == graph.n_sources and len(set(graph.receivers)) == graph.n_receivers
    names = graph.edge_names()
    assert len(names) == graph.n_edges == len(set(names))
    for example in ("input->a0.h0<q>", "a0.h1->a3.kv1<k>", "a2.h3->m2", "m3->logits", "input->logits"):
        assert example in names
    assert "a3.h1->a3.h2<q>" not in names and "m3->m3" not in names
    plain = cd.AttributionGraph(2, 4, level="head")
    assert "a0.h1->a1.h2<k>" in plain.edge_names()  # no GQA: k/v receivers are named per head
    assert graph.receiver_kinds.count("k") == 4 * 2 and graph.receiver_kinds.count("q") == 4 * 4


def test_index_lookups_and_groups():
    graph = cd.AttributionGraph(3, 4, 2, level="head")
    assert graph.sources[graph.attention_sources(1)] == ("a1.h0", "a1.h1", "a1.h2", "a1.h3")
    assert graph.sources[graph.mlp_source(2)] == "m2"
    attn = graph.group("attn", 1)
    assert graph.receivers[attn.columns][0] == "a1.h0<q>" and graph.receivers[attn.columns][-1] == "a1.kv1<v>"
    assert attn.n_sources_read == graph.source_index("m0") + 1
    assert graph.group("mlp", 1).n_sources_read == graph.source_index("a1.h3") + 1
    assert graph.group("logits").n_sources_read == graph.n_sources
    with pytest.raises(cd.UnknownNameError, match="no source named 'a9.h0'"):
        graph.source_index("a9.h0")
    with pytest.raises(cd.UnknownNameError, match="no receiver"):
        graph.receiver_index("a0<q>")


def test_coarsening_index_maps_heads_to_their_layer():
    graph = cd.AttributionGraph(2, 4, 2, level="head")
    coarse = graph.layer_level()
    src, recv = graph.coarsening_index()
    assert coarse.sources[src[graph.source_index("a1.h3")]] == "a1"
    assert coarse.receivers[recv[graph.receiver_index("a1.kv1<v>")]] == "a1<v>"
    assert coarse.receivers[recv[graph.receiver_index("logits")]] == "logits"
    # Every head-level edge lands on a layer-level edge, and every layer-level edge is covered.
    mask = graph.edge_mask
    landed = torch.zeros(coarse.n_sources, coarse.n_receivers, dtype=torch.bool)
    for r, c in torch.nonzero(mask).tolist():
        assert coarse.edge_mask[src[r], recv[c]]
        landed[src[r], recv[c]] = True
    assert torch.equal(landed, coarse.edge_mask)


def test_invalid_graphs_are_refused():
    with pytest.raises(cd.UnknownNameError, match="unknown graph level 'neuron'"):
        cd.AttributionGraph(2, 4, level="neuron")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        cd.AttributionGraph(2, 4, 3)


def test_round_trip_and_equality():
    graph = cd.AttributionGraph(3, 4, 2, parallel_blocks=True, level="head")
    assert cd.AttributionGraph.from_dict(graph.to_dict()) == graph
    assert graph != graph.layer_level()
    graph.edge_mask[0, 0] = False  # a copy: the graph is unchanged
    assert graph.edge_mask[0, 0]


def test_level_is_a_level_enum_that_reads_and_writes_as_its_string(get_model):
    for level in ("head", Level.HEAD):
        graph = cd.AttributionGraph(2, 4, level=level)
        assert graph.level is Level.HEAD and graph.level == "head" and f"{graph.level}" == "head"
    model = get_model("gpt2")
    assert cd.AttributionGraph.from_model(model, level=Level.LAYER) == cd.AttributionGraph.from_model(model, "layer")
    graph = cd.AttributionGraph(2, 4, 2, level="layer")
    assert type(graph.to_dict()["level"]) is str and json.dumps(graph.to_dict()).endswith('"level": "layer"}')
    assert repr(graph).startswith("AttributionGraph(level='layer', ")
    assert cd.AttributionGraph.from_dict(json.loads(json.dumps(graph.to_dict()))).level is Level.LAYER
    assert LEVELS == ("head", "layer") and all(type(level) is str for level in LEVELS)


def test_kinds_are_enums_equal_to_their_strings():
    graph = cd.AttributionGraph(1, 2, level="head")
    assert graph.source_kinds == ("input", "attn", "attn", "mlp")
    assert all(isinstance(kind, SourceKind) for kind in graph.source_kinds)
    assert graph.receiver_kinds == ("q", "q", "k", "k", "v", "v", "mlp", "logits")
    assert all(isinstance(kind, ReceiverKind) for kind in graph.receiver_kinds)
    assert [group.kind for group in graph.receiver_groups] == [GroupKind.ATTN, GroupKind.MLP, GroupKind.LOGITS]
    assert graph.group(GroupKind.MLP, 0) == graph.group("mlp", 0)
    with pytest.raises(cd.UnknownNameError, match="unknown receiver group kind 'q'; valid: attn, mlp, logits"):
        graph.group("q", 0)
