"""Exports (circuitdiff.export): EAP-IG / MIB graph JSON, pandas, CSV, networkx, DOT.

Expected names, values and node flags are written out by hand for tiny graphs; scores
are read back from the EdgeScores tensors by (source, receiver) index, never through the
code under test. The EAP-IG schema checked here is what ``eap.graph.Graph.from_json``
(hannamw/EAP-IG) reads: top-level ``cfg``, ``nodes``, ``edges``; cfg ``n_layers``,
``n_heads``, ``parallel_attn_mlp``, ``d_model``; ``edges[name]["score"]`` and
``["in_graph"]``; ``nodes[name]["in_graph"]``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import sys

import networkx as nx
import numpy as np
import pytest
import torch

import circuitdiff as cd
from circuitdiff import export
from circuitdiff.circuits import Circuit
from circuitdiff.errors import (
    ArgumentError,
    FileFormatError,
    MissingDependencyError,
    MissingPathError,
    NonFiniteError,
)

# AttributionGraph(1, 2): sources input, a0.h0, a0.h1, m0; receivers a0.h{0,1}<q|k|v>, m0, logits
TINY_EDGES = [
    "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
    "input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>",
    "input->m0", "a0.h0->m0", "a0.h1->m0",
    "input->logits", "a0.h0->logits", "a0.h1->logits", "m0->logits",
]
TINY_NODES = ["input", "a0.h0", "a0.h1", "m0", "logits"]
TINY_VALUES = {"input->a0.h1<k>": 0.1, "a0.h0->m0": -2.5, "m0->logits": 3.0, "a0.h0->logits": 1e-7}


def tiny_graph(parallel: bool = False) -> cd.AttributionGraph:
    return cd.AttributionGraph(1, 2, parallel_blocks=parallel, level="head")


def index(graph: cd.AttributionGraph, edge: str) -> tuple[int, int]:
    source, receiver = edge.split("->")
    return graph.source_index(source), graph.receiver_index(receiver)


def mean_scores(graph: cd.AttributionGraph, values: dict[str, float], **metadata) -> cd.EdgeScores:
    mean = torch.zeros(graph.n_sources, graph.n_receivers)
    for edge, value in values.items():
        mean[index(graph, edge)] = value
    return cd.EdgeScores(graph, mean=mean, per_sample=None, objective_values=torch.zeros(1), metadata=metadata)


def per_sample_scores(graph: cd.AttributionGraph, n: int = 3) -> cd.EdgeScores:
    per_sample = torch.randn(n, graph.n_sources, graph.n_receivers) * graph.edge_mask
    return cd.EdgeScores(graph, mean=per_sample.mean(0), per_sample=per_sample, objective_values=torch.rand(n),
                         sample_ids=tuple(f"q{i}" for i in range(n)))


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------ EAP-IG JSON: schema
def test_eap_ig_json_has_the_keys_names_and_values_eap_ig_reads(tmp_path):
    scores = mean_scores(tiny_graph(), TINY_VALUES)
    doc = read_json(scores.to_eap_ig_json(tmp_path / "g.json", d_model=8))
    assert set(doc) == {"cfg", "nodes", "edges"}
    assert doc["cfg"] == {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
    assert list(doc["nodes"]) == TINY_NODES
    assert sorted(doc["edges"]) == sorted(TINY_EDGES)
    for info in doc["edges"].values():
        assert set(info) == {"score", "in_graph"} and isinstance(info["score"], float) and info["in_graph"] is False
    # no circuit: nothing is in the graph but the logits (as in a freshly scored EAP-IG Graph)
    assert {name: node for name, node in doc["nodes"].items()} == {
        "input": {"in_graph": False}, "a0.h0": {"in_graph": False}, "a0.h1": {"in_graph": False},
        "m0": {"in_graph": False}, "logits": {"in_graph": True}}
    # the float32 score, sign unchanged, written exactly
    for edge in TINY_EDGES:
        assert doc["edges"][edge]["score"] == float(np.float32(TINY_VALUES.get(edge, 0.0)))
    assert doc["edges"]["a0.h0->m0"]["score"] == -2.5


def test_parallel_blocks_have_no_same_layer_attention_to_mlp_edges(tmp_path):
    doc = read_json(mean_scores(tiny_graph(parallel=True), {}).to_eap_ig_json(tmp_path / "g.json", d_model=8))
    assert doc["cfg"]["parallel_attn_mlp"] is True
    assert sorted(doc["edges"]) == sorted(set(TINY_EDGES) - {"a0.h0->m0", "a0.h1->m0"})


def test_node_flags_follow_eap_ig_rule(tmp_path):
    # input->a0.h0<q> feeds a0.h0, which writes to the logits: input and a0.h0 are in;
    # a0.h1 writes (to m0) but is fed nothing, m0 is fed but writes nothing: both out
    graph = tiny_graph()
    circuit = Circuit.from_edge_names(graph, ["input->a0.h0<q>", "a0.h0->logits", "a0.h1->m0"])
    doc = read_json(mean_scores(graph, TINY_VALUES).to_eap_ig_json(tmp_path / "g.json", circuit=circuit, d_model=8))
    assert {name: node["in_graph"] for name, node in doc["nodes"].items()} == {
        "input": True, "a0.h0": True, "a0.h1": False, "m0": False, "logits": True}
    assert sorted(e for e, info in doc["edges"].items() if info["in_graph"]) == sorted(
        ["input->a0.h0<q>", "a0.h0->logits", "a0.h1->m0"])


# ------------------------------------------------------------------ EAP-IG JSON: round trip
@pytest.mark.parametrize("parallel", [False, True])
def test_round_trip_is_exact(tmp_path, parallel):
    graph = cd.AttributionGraph(2, 3, parallel_blocks=parallel, level="head")
    scores = per_sample_scores(graph)
    circuit = cd.circuits.top_n(scores, 12, prune=False)
    path = scores.to_eap_ig_json(tmp_path / "g.json", circuit=circuit, d_model=24)
    back, back_circuit = export.read_eap_ig_json(path)
    assert back.graph == graph
    assert back.mean.dtype == torch.float32 and torch.equal(back.mean, scores.mean)
    assert back_circuit == circuit and Circuit.from_eap_ig_json(path) == circuit
    assert torch.equal(cd.EdgeScores.from_eap_ig_json(path).mean, scores.mean)
    assert back.per_sample is None and back.n_samples == 1 and math.isnan(float(back.objective_values[0]))
    assert back.metadata["d_model"] == 24
    # d_model travels in the metadata: exporting again needs no argument and writes the same bytes
    again = back.to_eap_ig_json(tmp_path / "again.json", circuit=back_circuit)
    assert again.read_bytes() == path.read_bytes()


def test_reading_fills_missing_edges_with_zero(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8},
                                "nodes": {"input": {"in_graph": True}},
                                "edges": {"a0.h1->logits": {"score": -0.25, "in_graph": True},
                                          "input->m0": {"in_graph": False}}}))
    scores, circuit = export.read_eap_ig_json(path)
    expected = torch.zeros(scores.graph.n_sources, scores.graph.n_receivers)
    expected[index(scores.graph, "a0.h1->logits")] = -0.25
    assert torch.equal(scores.mean, expected)
    assert circuit.edge_names() == ["a0.h1->logits"]


# ------------------------------------------------------------------ EAP-IG JSON: refusals
def test_export_refuses_what_eap_ig_cannot_hold(tmp_path):
    path = tmp_path / "g.json"
    with pytest.raises(ArgumentError, match="layer-level"):
        mean_scores(cd.AttributionGraph(1, 2, level="layer"), {}).to_eap_ig_json(path, d_model=8)
    with pytest.raises(ArgumentError, match="grouped-query"):
        mean_scores(cd.AttributionGraph(1, 4, n_kv_heads=2), {}).to_eap_ig_json(path, d_model=8)
    with pytest.raises(ArgumentError, match="d_model=model.cfg.d_model"):
        mean_scores(tiny_graph(), {}).to_eap_ig_json(path)
    with pytest.raises(ArgumentError, match="positive int"):
        mean_scores(tiny_graph(), {}).to_eap_ig_json(path, d_model=0)
    with pytest.raises(NonFiniteError, match="1 edge score"):
        mean_scores(tiny_graph(), {"m0->logits": math.nan}).to_eap_ig_json(path, d_model=8)
    other = Circuit.full(cd.AttributionGraph(2, 2))
    with pytest.raises(ArgumentError, match="another graph"):
        mean_scores(tiny_graph(), {}).to_eap_ig_json(path, circuit=other, d_model=8)
    assert not path.exists()


@pytest.mark.parametrize("content,match", [
    ("not json", "not a JSON file"),
    ('{"cfg": {}, "nodes": {}}', "'cfg', 'nodes' and 'edges'"),
    ('{"cfg": {"n_layers": 1, "n_heads": 2}, "nodes": {}, "edges": {}}', r"lacks \['parallel_attn_mlp', 'd_model'\]"),
    ('{"cfg": {"n_layers": 0, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8}, "nodes": {}, "edges": {}}',
     "describes no graph"),
    ('{"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8}, "nodes": {}, '
     '"edges": {"a1.h0->logits": {"score": 1.0, "in_graph": false}}}', "'a1.h0->logits'"),
    ('{"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8}, "nodes": {}, '
     '"edges": {"input->m0": {"score": "big", "in_graph": false}}}', "numeric"),
    ('{"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8}, '
     '"nodes": {"m0": {"in_graph": true, "neurons": [true]}}, "edges": {}}', "neuron-level"),
])
def test_reading_refuses_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FileFormatError, match=match):
        export.read_eap_ig_json(path)


def test_reading_a_missing_file(tmp_path):
    with pytest.raises(MissingPathError, match="no EAP-IG graph file"):
        export.read_eap_ig_json(tmp_path / "absent.json")


# ------------------------------------------------------------------ pandas / CSV
def test_to_pandas_per_sample_rows_match_the_tensors():
    graph = tiny_graph()
    scores = per_sample_scores(graph, n=3)
    frame = scores.to_pandas()
    assert tuple(frame.columns) == export.COLUMNS
    assert len(frame) == 3 * len(TINY_EDGES)
    assert list(frame["sample_id"][:: len(TINY_EDGES)]) == ["q0", "q1", "q2"]
    assert sorted(frame["edge"][: len(TINY_EDGES)]) == sorted(TINY_EDGES)
    for row in frame.itertuples(index=False):
        sample = int(row.sample_id[1:])
        r, c = index(graph, row.edge)
        assert row.edge == f"{row.source}->{row.receiver}"
        assert row.score == scores.per_sample[sample, r, c].item()
    by_edge = frame[frame["sample_id"] == "q0"].set_index("edge")
    assert tuple(by_edge.loc["input->a0.h1<k>", ["source_kind", "source_layer", "receiver_kind", "receiver_layer"]]) \
        == ("input", -1, "k", 0)
    assert tuple(by_edge.loc["a0.h1->logits", ["source_kind", "source_layer", "receiver_kind", "receiver_layer"]]) \
        == ("attn", 0, "logits", 1)
    assert tuple(by_edge.loc["m0->logits", ["source_kind", "receiver_kind"]]) == ("mlp", "logits")
    assert by_edge.loc["a0.h0->m0", "receiver_kind"] == "mlp"


def test_to_pandas_mean_only():
    scores = mean_scores(tiny_graph(), TINY_VALUES)
    frame = scores.to_pandas()
    assert len(frame) == len(TINY_EDGES) and frame["sample_id"].isna().all()
    assert dict(zip(frame["edge"], frame["score"])) == {e: np.float32(TINY_VALUES.get(e, 0.0)) for e in TINY_EDGES}
    with pytest.raises(ArgumentError, match="per_sample=True"):
        scores.to_pandas(per_sample=True)
    # per-sample scores can still be asked for their means
    many = per_sample_scores(tiny_graph())
    means = many.to_pandas(per_sample=False)
    assert [s == many.mean[index(many.graph, e)].item() for e, s in zip(means["edge"], means["score"])] == [True] * 13


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError, match="pip install pandas"):
        mean_scores(tiny_graph(), {}).to_pandas()


def test_csv_needs_no_pandas_and_holds_the_same_rows(tmp_path, monkeypatch):
    graph = tiny_graph()
    scores = per_sample_scores(graph, n=2)
    expected = scores.to_pandas()
    monkeypatch.setitem(sys.modules, "pandas", None)
    path = scores.to_csv(tmp_path / "s.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == export.COLUMNS and len(rows) == 1 + 2 * len(TINY_EDGES)
    for row, want in zip(rows[1:], expected.itertuples(index=False)):
        sample_id, edge, source, receiver, source_kind, source_layer, receiver_kind, receiver_layer, score = row
        assert (sample_id, edge, source, receiver, source_kind, receiver_kind) == (
            want.sample_id, want.edge, want.source, want.receiver, want.source_kind, want.receiver_kind)
        assert (int(source_layer), int(receiver_layer)) == (want.source_layer, want.receiver_layer)
        r, c = index(graph, edge)
        assert np.float32(score) == scores.per_sample[int(sample_id[1:]), r, c].item()  # exact float32


def test_csv_mean_rows_have_an_empty_sample_id(tmp_path):
    path = mean_scores(tiny_graph(), TINY_VALUES).to_csv(tmp_path / "m.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["sample_id"] for row in rows] == [""] * len(TINY_EDGES)
    # the shortest text that reads back to the same float32
    assert {row["edge"]: row["score"] for row in rows}["input->a0.h1<k>"] == "0.1"
    assert {row["edge"]: np.float32(row["score"]) for row in rows} == {
        e: np.float32(TINY_VALUES.get(e, 0.0)) for e in TINY_EDGES}


# ------------------------------------------------------------------ networkx
def test_to_networkx_full_graph():
    graph = tiny_graph()
    scores = mean_scores(graph, TINY_VALUES)
    network = scores.to_networkx()
    assert isinstance(network, nx.DiGraph)
    assert dict(network.nodes(data="kind")) == {
        "input": "input", "a0.h0<q>": "q", "a0.h1<q>": "q", "a0.h0<k>": "k", "a0.h1<k>": "k", "a0.h0<v>": "v",
        "a0.h1<v>": "v", "a0.h0": "attn", "a0.h1": "attn", "m0": "mlp", "logits": "logits"}
    assert network.nodes["logits"]["layer"] == 1 and network.nodes["input"]["layer"] == -1
    real = {f"{u}->{v}": data["score"] for u, v, data in network.edges(data=True) if not data["internal"]}
    assert real == {e: scores.mean[index(graph, e)].item() for e in TINY_EDGES}
    internal = sorted((u, v) for u, v, data in network.edges(data=True) if data["internal"])
    assert internal == sorted((f"a0.h{h}<{x}>", f"a0.h{h}") for h in (0, 1) for x in "qkv")
    assert all("score" not in data for _, _, data in network.edges(data=True) if data["internal"])
    assert nx.has_path(network, "input", "logits") and nx.has_path(network, "a0.h1<v>", "logits")


def test_to_networkx_of_a_circuit():
    graph = tiny_graph()
    circuit = Circuit.from_edge_names(graph, ["input->a0.h1<k>", "a0.h1->m0", "m0->logits"])
    network = circuit.to_networkx(mean_scores(graph, TINY_VALUES))
    assert set(network.nodes) == {"input", "a0.h1<k>", "a0.h1", "m0", "logits"}
    assert {(u, v): (d["internal"], d.get("score")) for u, v, d in network.edges(data=True)} == {
        ("input", "a0.h1<k>"): (False, np.float32(0.1).item()), ("a0.h1<k>", "a0.h1"): (True, None),
        ("a0.h1", "m0"): (False, 0.0), ("m0", "logits"): (False, 3.0)}
    assert nx.has_path(network, "input", "logits")
    assert all("score" not in d for _, _, d in circuit.to_networkx().edges(data=True))


def test_to_networkx_gqa_key_value_receivers_feed_every_head_of_their_group():
    graph = cd.AttributionGraph(1, 4, n_kv_heads=2)
    network = Circuit.from_edge_names(graph, ["input->a0.kv1<v>"]).to_networkx()
    assert sorted(network.successors("a0.kv1<v>")) == ["a0.h2", "a0.h3"]


def test_network_exports_refuse_bad_arguments(monkeypatch):
    with pytest.raises(ArgumentError, match="scores, a circuit, or both"):
        export.to_networkx()
    with pytest.raises(ArgumentError, match="another graph"):
        export.to_dot(mean_scores(tiny_graph(), {}), circuit=Circuit.full(cd.AttributionGraph(2, 2)))
    monkeypatch.setitem(sys.modules, "networkx", None)
    with pytest.raises(MissingDependencyError, match="pip install networkx"):
        mean_scores(tiny_graph(), {}).to_networkx()


# ------------------------------------------------------------------ DOT
def test_dot_colours_by_sign_and_widens_by_magnitude():
    graph = tiny_graph()
    scores = mean_scores(graph, {"a0.h0->m0": -1.0, "m0->logits": 2.0, "input->a0.h0<q>": 0.5})
    circuit = Circuit.from_edge_names(graph, ["input->a0.h0<q>", "a0.h0->m0", "m0->logits", "input->logits"])
    lines = circuit.to_dot(scores, min_width=1.0, max_width=3.0).splitlines()
    assert lines[0] == 'digraph "circuit" {' and lines[-1] == "}"
    blue, red, grey = export.COLORS["positive"], export.COLORS["negative"], export.COLORS["neutral"]
    # width = 1 + 2 * |score| / 2
    assert f'  "m0" -> "logits" [color="{blue}", penwidth=3.000, tooltip="m0->logits: +2"];' in lines
    assert f'  "a0.h0" -> "m0" [color="{red}", penwidth=2.000, tooltip="a0.h0->m0: -1"];' in lines
    assert f'  "input" -> "a0.h0<q>" [color="{blue}", penwidth=1.500, tooltip="input->a0.h0<q>: +0.5"];' in lines
    assert f'  "input" -> "logits" [color="{grey}", penwidth=1.000, tooltip="input->logits: +0"];' in lines
    assert f'  "a0.h0<q>" -> "a0.h0" [style=dashed, color="{grey}", penwidth=0.5, arrowsize=0.5];' in lines
    nodes = [line.strip().split(" ")[0].strip('";') for line in lines if line.startswith('  "') and "->" not in line]
    assert nodes == ["input", "a0.h0<q>", "a0.h0", "m0", "logits"]


def test_dot_without_scores_and_bad_widths():
    graph = tiny_graph()
    text = Circuit.from_edge_names(graph, ["m0->logits"]).to_dot()
    assert f'"m0" -> "logits" [color="{export.COLORS["neutral"]}", penwidth=0.500, tooltip="m0->logits"];' in text
    with pytest.raises(ArgumentError, match="min_width"):
        export.to_dot(mean_scores(graph, {}), min_width=2.0, max_width=1.0)
    with pytest.raises(NonFiniteError):
        export.to_dot(mean_scores(graph, {"m0->logits": math.inf}))


def test_render_dot_without_graphviz(monkeypatch, tmp_path):
    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install graphviz"):
        export.render_dot("digraph {}", tmp_path / "c.png")
    with pytest.raises(ArgumentError, match="format"):
        export.render_dot("digraph {}", tmp_path / "no_suffix")


def _fake_dot(directory, body: str) -> None:
    """A ``dot`` program on PATH that runs ``body`` (Python, with ``sys.argv`` and stdin)."""
    program = directory / "dot"
    program.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(os.name == "nt", reason="the stand-in for Graphviz's dot is a POSIX shebang script, which "
                                            "Windows cannot execute (CI runs on Linux)")
def test_render_dot_calls_dot_with_format_and_output(monkeypatch, tmp_path):
    _fake_dot(tmp_path, "out = sys.argv[sys.argv.index('-o') + 1]\n"
                        "open(out, 'w').write(sys.argv[1] + '\\n' + sys.stdin.read())")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    text = Circuit.from_edge_names(tiny_graph(), ["m0->logits"]).to_dot()
    path = export.render_dot(text, tmp_path / "c.svg")
    assert path.read_text() == "-Tsvg\n" + text
    assert export.render_dot(text, tmp_path / "c.img", format="png").read_text().startswith("-Tpng\n")
    _fake_dot(tmp_path, "sys.stderr.write('syntax error in line 1'); sys.exit(1)")
    with pytest.raises(ArgumentError, match="syntax error in line 1"):
        export.render_dot("digraph {", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
