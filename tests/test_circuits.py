"""Circuit selection on small hand-built graphs; every expected edge set is derived by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import circuitdiff as cd
from circuitdiff import circuits
from circuitdiff.circuits import Circuit


def layer_graph(**kwargs) -> cd.AttributionGraph:
    # sources: input, a0, m0, a1, m1
    # receivers: a0<q>, a0<k>, a0<v>, m0, a1<q>, a1<k>, a1<v>, m1, logits
    return cd.AttributionGraph(2, 2, level="layer", **kwargs)


def gqa_graph() -> cd.AttributionGraph:
    # 4 query heads, 2 kv heads: kv0 is read by h0 and h1, kv1 by h2 and h3
    return cd.AttributionGraph(2, 4, n_kv_heads=2, level="head")


def scores_of(graph: cd.AttributionGraph, values: dict[str, float]) -> cd.EdgeScores:
    mean = torch.zeros(graph.n_sources, graph.n_receivers)
    for name, value in values.items():
        source, receiver = name.split("->")
        mean[graph.source_index(source), graph.receiver_index(receiver)] = value
    return cd.EdgeScores(graph, mean=mean, per_sample=None, objective_values=torch.zeros(1))


def circuit_of(graph: cd.AttributionGraph, names: list[str]) -> Circuit:
    return Circuit.from_edge_names(graph, names)


SPARSE = {"input->a0<q>": 0.5, "a0->m0": -3.0, "m0->logits": 2.0, "a1->logits": 1.0}


# ------------------------------------------------------------------ top_n
def test_top_n_absolute_and_signed():
    scores = scores_of(layer_graph(), SPARSE)
    assert set(circuits.top_n(scores, 2, prune=False).edge_names()) == {"a0->m0", "m0->logits"}
    assert set(circuits.top_n(scores, 2, absolute=False, prune=False).edge_names()) == {"m0->logits", "a1->logits"}
    assert set(circuits.top_n(scores, 4, prune=False).edge_names()) == set(SPARSE)


def test_top_n_edge_names_are_row_major():
    scores = scores_of(layer_graph(), SPARSE)
    assert circuits.top_n(scores, 4, prune=False).edge_names() == [
        "input->a0<q>", "a0->m0", "m0->logits", "a1->logits"]


def test_top_n_ties_follow_row_major_order():
    graph = layer_graph()
    zero = circuits.top_n(scores_of(graph, {}), 3, prune=False)
    assert zero.edge_names() == ["input->a0<q>", "input->a0<k>", "input->a0<v>"]
    tied = scores_of(graph, {"m1->logits": 1.0, "a0->m0": -1.0, "input->logits": 1.0})
    assert circuits.top_n(tied, 2, prune=False).edge_names() == ["input->logits", "a0->m0"]
    assert circuits.top_n(tied, 2, absolute=False, prune=False).edge_names() == ["input->logits", "m1->logits"]


def test_top_n_prunes_by_default():
    scores = scores_of(layer_graph(), SPARSE)
    # a0->m0 alone: a0 is not reachable from input
    assert circuits.top_n(scores, 1).n_edges == 0
    # all four: input->a0<q> feeds a0, a0->m0 feeds m0, m0->logits; a1 is fed by nothing
    assert circuits.top_n(scores, 4).edge_names() == ["input->a0<q>", "a0->m0", "m0->logits"]


def test_top_n_bounds_and_bad_input():
    graph = layer_graph()
    scores = scores_of(graph, SPARSE)
    assert circuits.top_n(scores, 0).n_edges == 0
    assert circuits.top_n(scores, graph.n_edges, prune=False) == Circuit.full(graph)
    for bad in (-1, graph.n_edges + 1):
        with pytest.raises(ValueError, match="out of range"):
            circuits.top_n(scores, bad)
    with pytest.raises(TypeError, match="EdgeScores"):
        circuits.top_n(scores.mean, 2)
    nan = scores_of(graph, {"a0->m0": float("nan")})
    with pytest.raises(cd.DataError, match="NaN"):
        circuits.top_n(nan, 2)
    with pytest.raises(cd.DataError, match="NaN"):
        circuits.greedy(nan, 2)


def test_structural_zero_cells_are_ignored():
    graph = layer_graph()
    scores = scores_of(graph, {"a0->m0": 1.0})
    scores.mean[graph.source_index("m1"), graph.receiver_index("a0<q>")] = 100.0  # not an edge
    assert circuits.top_n(scores, 1, prune=False).edge_names() == ["a0->m0"]


# ------------------------------------------------------------------ threshold
def test_threshold_is_inclusive_absolute_and_signed():
    scores = scores_of(layer_graph(), SPARSE)
    assert set(circuits.threshold(scores, 1.0, prune=False).edge_names()) == {"a0->m0", "m0->logits", "a1->logits"}
    assert set(circuits.threshold(scores, 1.0, absolute=False, prune=False).edge_names()) == {
        "m0->logits", "a1->logits"}
    assert circuits.threshold(scores, 5.0).n_edges == 0
    assert circuits.threshold(scores, 0.5).edge_names() == ["input->a0<q>", "a0->m0", "m0->logits"]
    with pytest.raises(ValueError, match="tau"):
        circuits.threshold(scores, float("nan"))


# ------------------------------------------------------------------ greedy
GREEDY = {
    "input->logits": 0.1, "a0->logits": 0.2, "m0->logits": 0.5, "a1->logits": 0.05, "m1->logits": 0.3,
    "input->m1": 0.01, "a0->m1": 0.02, "m0->m1": 0.4, "a1->m1": 0.03,
    "input->m0": 0.35, "a0->m0": 0.6,
    "input->a0<q>": 0.25,
}
# by hand: logits' inputs are the first candidates; m0->logits (0.5) brings m0, whose
# inputs add a0->m0 (0.6, taken next, brings a0 and its q/k/v inputs); then input->m0
# (0.35) beats m1->logits (0.3); m1 then adds m0->m1 (0.4), which top_n would have taken
# earlier; then input->a0<q> (0.25), a0->logits (0.2).
GREEDY_ORDER = ["m0->logits", "a0->m0", "input->m0", "m1->logits", "m0->m1", "input->a0<q>", "a0->logits"]


@pytest.mark.parametrize("n", range(1, len(GREEDY_ORDER) + 1))
def test_greedy_grows_from_logits_in_order(n):
    scores = scores_of(layer_graph(), GREEDY)
    assert set(circuits.greedy(scores, n, prune=False).edge_names()) == set(GREEDY_ORDER[:n])


def test_greedy_differs_from_top_n_and_prunes():
    scores = scores_of(layer_graph(), GREEDY)
    assert "m0->m1" in circuits.top_n(scores, 4, prune=False)
    assert "m0->m1" not in circuits.greedy(scores, 4, prune=False)
    # {m0->logits, a0->m0}: nothing leaves input, so nothing is reachable
    assert circuits.greedy(scores, 2).n_edges == 0
    # adding input->m0 makes m0 reachable; a0 still is not
    assert circuits.greedy(scores, 3).edge_names() == ["input->m0", "m0->logits"]


def test_greedy_signed_and_full():
    graph = layer_graph()
    scores = scores_of(graph, {"m0->logits": -5.0, "m1->logits": 1.0, "a0->logits": 0.5})
    assert circuits.greedy(scores, 1, prune=False).edge_names() == ["m0->logits"]
    assert circuits.greedy(scores, 1, absolute=False, prune=False).edge_names() == ["m1->logits"]
    assert circuits.greedy(scores, graph.n_edges, prune=False) == Circuit.full(graph)
    assert circuits.greedy(scores, 0).n_edges == 0


def test_greedy_gqa_kv_receiver_becomes_candidate_for_any_owner():
    graph = gqa_graph()
    scores = scores_of(graph, {
        "a1.h1->logits": 1.0,
        "input->a1.kv0<k>": 0.9,   # kv0 is read by h0 and h1: a candidate once h1 is in
        "input->a1.kv1<k>": 0.95,  # kv1 is read by h2 and h3: never a candidate here
        "input->a1.h1<q>": 0.1,
    })
    picked = circuits.greedy(scores, 2, prune=False).edge_names()
    assert set(picked) == {"a1.h1->logits", "input->a1.kv0<k>"}
    assert circuits.greedy(scores, 2).edge_names() == ["input->a1.kv0<k>", "a1.h1->logits"]


# ------------------------------------------------------------------ pruning
def test_pruning_drops_dangling_edges_and_keeps_a_chain():
    graph = layer_graph()
    chain = ["input->a0<q>", "a0->m0", "m0->logits"]
    dangling = [
        "a1->logits",  # a1 has no incoming circuit edge: unreachable from input
        "input->m1",   # m1 has no outgoing circuit edge: does not reach logits
    ]
    circuit = circuit_of(graph, chain + dangling)
    assert circuit.pruned().edge_names() == chain
    assert circuit.pruned().pruned() == circuit.pruned()
    assert circuit_of(graph, chain).pruned() == circuit_of(graph, chain)


def test_pruning_parallel_blocks():
    graph = layer_graph(parallel_blocks=True)
    with pytest.raises(cd.UnknownNameError, match="not an edge"):
        circuit_of(graph, ["a0->m0"])
    chain = ["input->a0<v>", "a0->a1<k>", "a1->logits", "input->m0", "m0->m1"]
    # m1 writes nowhere, so input->m0 and m0->m1 go; the attention chain stays
    assert circuit_of(graph, chain).pruned().edge_names() == ["input->a0<v>", "a0->a1<k>", "a1->logits"]


def test_pruning_gqa_kv_receiver_owns_several_heads():
    graph = gqa_graph()
    # kv0 feeds heads h0 and h1, so h1 is reachable
    kept = ["input->a0.kv0<k>", "a0.h1->logits"]
    assert circuit_of(graph, kept).pruned() == circuit_of(graph, kept)
    # kv1 feeds h2 and h3 only: h1 unreachable, and kv1's heads write nowhere
    assert circuit_of(graph, ["input->a0.kv1<k>", "a0.h1->logits"]).pruned().n_edges == 0
    # backward through a kv receiver: h0 reaches logits via m0
    chain = ["input->a0.kv0<v>", "a0.h0->m0", "m0->logits"]
    assert circuit_of(graph, chain).pruned() == circuit_of(graph, chain)


def test_pruning_head_level_without_gqa_keys_belong_to_one_head():
    graph = cd.AttributionGraph(2, 2, level="head")
    assert circuit_of(graph, ["input->a0.h1<k>", "a0.h0->logits"]).pruned().n_edges == 0
    kept = ["input->a0.h0<k>", "a0.h0->logits"]
    assert circuit_of(graph, kept).pruned() == circuit_of(graph, kept)


def test_pruning_random_circuits_is_idempotent_subset():
    generator = torch.Generator().manual_seed(0)
    for graph in (layer_graph(), gqa_graph(), cd.AttributionGraph(3, 2, parallel_blocks=True)):
        for density in (0.05, 0.2, 0.5):
            edges = (torch.rand(graph.n_sources, graph.n_receivers, generator=generator) < density) & graph.edge_mask
            pruned = Circuit(graph, edges).pruned()
            assert not (pruned.edges & ~edges).any()
            assert pruned.pruned() == pruned
    assert Circuit.full(layer_graph()).pruned() == Circuit.full(layer_graph())


def test_receiver_owners():
    graph = gqa_graph()
    owners = circuits.receiver_owners(graph)
    s = graph.source_index
    assert owners[graph.receiver_index("a1.h2<q>")] == (s("a1.h2"),)
    assert owners[graph.receiver_index("a1.kv1<v>")] == (s("a1.h2"), s("a1.h3"))
    assert owners[graph.receiver_index("a0.kv0<k>")] == (s("a0.h0"), s("a0.h1"))
    assert owners[graph.receiver_index("m1")] == (s("m1"),)
    assert owners[graph.receiver_index("logits")] == ()
    layer = layer_graph()
    assert circuits.receiver_owners(layer)[layer.receiver_index("a1<k>")] == (layer.source_index("a1"),)


def test_node_structure_lives_in_circuit_nodes_and_stays_exported_from_circuits():
    from circuitdiff import circuit_nodes

    assert circuits.receiver_owners is circuit_nodes.receiver_owners
    assert set(circuits.__all__) == {"Circuit", "greedy", "receiver_owners", "sizes_for_curve", "threshold", "top_n"}
    graph = gqa_graph()
    edges = Circuit.from_edge_names(graph, ["input->a0.kv0<k>", "a0.h1->m0", "m0->m1"]).edges  # m1 reaches nothing
    assert circuit_nodes.connected_edges(graph, edges).sum() == 0
    assert circuit_nodes.touched_nodes(graph, edges) == Circuit(graph, edges).nodes()


# ------------------------------------------------------------------ Circuit
def test_circuit_validation():
    graph = layer_graph()
    with pytest.raises(ValueError, match="shape"):
        Circuit(graph, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        Circuit(graph, graph.edge_mask.float())
    not_edge = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.bool)
    not_edge[graph.source_index("m1"), graph.receiver_index("a0<q>")] = True
    with pytest.raises(ValueError, match="m1->a0<q>"):
        Circuit(graph, not_edge)
    with pytest.raises(cd.UnknownNameError):
        circuit_of(graph, ["a7->m0"])
    circuit = Circuit.empty(graph)
    with pytest.raises(dataclasses.FrozenInstanceError):
        circuit.edges = graph.edge_mask  # type: ignore[misc]


def test_circuit_copies_its_mask():
    graph = layer_graph()
    mask = graph.edge_mask
    circuit = Circuit(graph, mask)
    mask[:] = False
    assert circuit.n_edges == graph.n_edges == 23


def test_circuit_queries():
    graph = layer_graph()
    circuit = circuit_of(graph, ["m0->logits", "input->a0<q>", "a0->m0"])
    assert circuit.n_edges == len(circuit) == 3
    assert circuit.nodes() == ["input", "a0", "m0", "logits"]
    assert "a0->m0" in circuit and "a0->m1" not in circuit and "bogus->x" not in circuit
    assert "m0" in circuit and "a1" not in circuit and "logits" in circuit
    assert circuit_of(gqa_graph(), ["input->a0.kv0<k>"]).nodes() == ["input", "a0.h0", "a0.h1"]
    assert "3/23 edges" in repr(circuit)
    assert Circuit.full(graph).n_edges == 23 and Circuit.empty(graph).nodes() == []


def test_to_dict_roundtrip_through_json():
    for graph, names in (
        (layer_graph(), ["input->a0<q>", "a0->m0", "m0->logits"]),
        (gqa_graph(), ["input->a0.kv1<v>", "a0.h3->a1.h0<q>", "a1.h0->logits"]),
    ):
        circuit = circuit_of(graph, names)
        data = json.loads(json.dumps(circuit.to_dict()))
        assert data["edges"] == names
        back = Circuit.from_dict(data)
        assert back == circuit and back.graph == graph and hash(back) == hash(circuit)
    with pytest.raises(cd.DataError, match="to_dict"):
        Circuit.from_dict({"edges": []})
    with pytest.raises(cd.UnknownNameError):
        Circuit.from_dict({"graph": layer_graph().to_dict(), "edges": ["m1->a0<q>"]})


def test_sizes_for_curve():
    assert circuits.sizes_for_curve(1000, 4) == [1, 10, 100, 1000]
    assert circuits.sizes_for_curve(3, 10) == [1, 2, 3]
    sizes = circuits.sizes_for_curve(3221)
    assert sizes[0] == 1 and sizes[-1] == 3221 and sizes == sorted(set(sizes)) and len(sizes) == 10
    with pytest.raises(ValueError):
        circuits.sizes_for_curve(0)
