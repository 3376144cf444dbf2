"""Circuit evaluation in one forward pass against a slow edge-by-edge reference.

The reference (tests/tiny_models.py: ablated_losses) runs TransformerLens's own
per-receiver mode, records every source's output in the current run and shifts each
receiver's own input copy by the replacement minus current output of each of its
ablated sources. It shares no code with circuitdiff's ablation hooks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.circuits import Circuit
from test_eap_correctness import make_data, reference_batches_for, reference_deltas


def random_circuit(graph, fraction: float, seed: int = 0) -> Circuit:
    g = torch.Generator().manual_seed(seed)
    return Circuit(graph, graph.edge_mask & (torch.rand(graph.edge_mask.shape, generator=g) < fraction))


def reference_replacement(reference, graph, batch, intervention, refs=None) -> dict[str, torch.Tensor]:
    clean = tm.source_outputs(reference, graph, batch.input_ids, batch.attention_mask)
    deltas = reference_deltas(reference, graph, batch, intervention, refs)
    return {name: clean[name] + deltas[name] for name in clean}


@pytest.mark.parametrize(("arch", "level"), [("llama", "head"), ("gpt2", "layer"), ("neox", "head")])
@pytest.mark.parametrize("intervention", ["zero", "patching", "mean"])
def test_one_forward_evaluation_equals_edge_by_edge_reference(get_model, get_reference, arch, level, intervention):
    model, reference = get_model(arch, "float64"), get_reference(arch)
    graph = cd.AttributionGraph.from_model(model, level=level)
    batches = make_data(model, corrupted=intervention == "patching")
    refs = reference_batches_for(model) if intervention == "mean" else None
    objective = cd.objectives.answer_nll()
    circuit = random_circuit(graph, 0.4)
    result = cd.evaluate_circuit(model, circuit, batches, objective=objective, intervention=intervention,
                                 reference_batches=refs, progress=False)
    expected = {"clean": [], "ablated": [], "circuit": []}
    for batch in batches:  # one padded, one unpadded
        replacement = reference_replacement(reference, graph, batch, intervention, refs)
        for name, ablate in [("clean", torch.zeros_like(graph.edge_mask)), ("ablated", graph.edge_mask),
                             ("circuit", graph.edge_mask & ~circuit.edges)]:
            expected[name].append(tm.ablated_losses(reference, graph, batch, objective, replacement, ablate))
    for name, got in [("clean", result.clean_losses), ("ablated", result.ablated_losses),
                      ("circuit", result.circuit_losses)]:
        want = torch.cat(expected[name])
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8), f"{name}: {got.tolist()} vs {want.tolist()}"
    assert result.n_edges == circuit.n_edges
    # the circuit really is in between: neither clean nor fully ablated
    assert not torch.allclose(result.circuit_losses, result.clean_losses)
    assert not torch.allclose(result.circuit_losses, result.ablated_losses)


def test_full_circuit_is_faithful_and_empty_is_the_corrupted_run(get_model, get_reference):
    model = get_model("llama", "float64")
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = make_data(model, corrupted=True)
    kwargs = dict(objective="answer_nll", intervention="patching", progress=False)
    full = cd.evaluate_circuit(model, Circuit.full(graph), batches, **kwargs)
    empty = cd.evaluate_circuit(model, Circuit.empty(graph), batches, **kwargs)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-9)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(full.circuit_losses, full.clean_losses, atol=1e-10)
    # with patching, every edge ablated is the corrupted run (scored on the clean labels)
    reference = get_reference("llama")
    corrupted = []
    for batch in batches:
        run = cd.Batch(batch.corrupted_input_ids, labels=batch.labels, attention_mask=batch.attention_mask)
        corrupted.append(tm.patched_losses(reference, graph, run, cd.objectives.answer_nll(), "logits",
                                           torch.zeros(1, dtype=torch.float64)))
    assert torch.allclose(empty.ablated_losses, torch.cat(corrupted), rtol=1e-6)
    d = full.to_dict()
    assert d["faithfulness"] == full.faithfulness and d["n_samples"] == 5 and d["n_edges"] == graph.n_edges


def test_faithfulness_is_nan_when_ablation_changes_nothing():
    e = cd.faithfulness.CircuitEvaluation(3, torch.ones(2), torch.ones(2), torch.ones(2))
    assert math.isnan(e.faithfulness)


def test_curve_points_equal_single_evaluations(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)
    kwargs = dict(objective="answer_nll", intervention="zero", progress=False)
    scores = cd.attribute(model, graph, batches, **kwargs)
    curve = cd.faithfulness_curve(model, scores, batches, sizes=[0, 5, 20, graph.n_edges], **kwargs)
    assert curve.requested == [0, 5, 20, graph.n_edges]
    assert curve.n_edges[0] == 0 and curve.n_edges[-1] == graph.n_edges
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-6)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    for n, losses in zip([5, 20], curve.circuit_losses[1:3]):
        single = cd.evaluate_circuit(model, cd.circuits.top_n(scores, n), batches, **kwargs)
        assert torch.allclose(losses, single.circuit_losses, atol=1e-6)
    table = curve.to_markdown()
    assert "| edges | objective | faithfulness |" in table and table.count("\n|") == 2 + 4  # header, separator, one row per size
    assert curve.to_dict()["faithfulness"] == curve.faithfulness
    # CPR and CMD from the losses, with numpy's trapezoid rule over the requested fractions
    x = np.array([0, 5, 20, graph.n_edges]) / graph.n_edges
    clean, ablated = curve.clean_losses.mean().item(), curve.ablated_losses.mean().item()
    f = (curve.circuit_losses.mean(1).numpy() - ablated) / (clean - ablated)
    assert curve.total_edges == graph.n_edges and curve.fractions == pytest.approx(x.tolist())
    assert curve.cpr == pytest.approx(np.trapezoid(f, x), rel=1e-9)
    assert curve.cmd == pytest.approx(np.trapezoid(np.abs(1 - f), x), rel=1e-9)
    assert f"CPR {curve.cpr:.3f} (higher is better), CMD {curve.cmd:.3f}" in table
    assert curve.to_dict()["cpr"] == curve.cpr and curve.to_dict()["cmd"] == curve.cmd


def curve_of(faithfulness: list[float], requested: list[int], total_edges: int) -> cd.faithfulness.FaithfulnessCurve:
    """A curve of one sample whose points have the given faithfulness: clean loss 0, all-ablated 1."""
    circuit = torch.tensor([[1.0 - f] for f in faithfulness], dtype=torch.float64)
    return cd.faithfulness.FaithfulnessCurve(requested, list(requested), torch.zeros(1, dtype=torch.float64),
                                             torch.ones(1, dtype=torch.float64), circuit, "top_n", total_edges)


def test_cpr_and_cmd_by_hand():
    # x = 0, 0.1, 0.5, 1 (of 100 edges); f = 0, 0.5, 1.2, 1, so |1 - f| = 1, 0.5, 0.2, 0
    # CPR = 0.1 * (0 + 0.5) / 2 + 0.4 * (0.5 + 1.2) / 2 + 0.5 * (1.2 + 1) / 2 = 0.025 + 0.34 + 0.55 = 0.915
    # CMD = 0.1 * (1 + 0.5) / 2 + 0.4 * (0.5 + 0.2) / 2 + 0.5 * (0.2 + 0) / 2 = 0.075 + 0.14 + 0.05 = 0.265
    curve = curve_of([0.0, 0.5, 1.2, 1.0], [0, 10, 50, 100], 100)
    assert curve.fractions == pytest.approx([0.0, 0.1, 0.5, 1.0])
    assert curve.cpr == pytest.approx(0.915, abs=1e-12)
    assert curve.cmd == pytest.approx(0.265, abs=1e-12)
    # the same points in another order
    shuffled = curve_of([1.0, 0.5, 0.0, 1.2], [100, 10, 0, 50], 100)
    assert shuffled.cpr == pytest.approx(0.915, abs=1e-12) and shuffled.cmd == pytest.approx(0.265, abs=1e-12)
    table = curve.to_markdown()
    assert "CMD 0.265 (lower is better)" in table and "fractions 0 to 1 of 100 edges" in table


def test_cpr_and_cmd_at_mib_sizes_of_a_perfect_circuit():
    # MIB's fractions of 1000 edges: 1, 2, 5, ..., 1000 edges; f = 1 everywhere integrates 1 over [0.001, 1]
    sizes = [int(f * 1000) for f in cd.faithfulness.MIB_FRACTIONS]
    assert sizes == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    curve = curve_of([1.0] * 10, sizes, 1000)
    assert curve.cpr == pytest.approx(0.999, abs=1e-12) and curve.cmd == 0.0


def test_cpr_and_cmd_are_nan_when_undefined():
    assert math.isnan(curve_of([0.7], [10], 100).cpr) and math.isnan(curve_of([0.7], [10], 100).cmd)
    assert math.isnan(curve_of([0.2, 0.2], [10, 10], 100).cpr)  # one distinct size: no width
    assert math.isnan(curve_of([0.0, math.nan, 1.0], [0, 10, 100], 100).cpr)
    assert math.isnan(curve_of([0.0, math.nan, 1.0], [0, 10, 100], 100).cmd)
    flat = cd.faithfulness.FaithfulnessCurve([0, 100], [0, 100], torch.ones(1, dtype=torch.float64),
                                             torch.ones(1, dtype=torch.float64),
                                             torch.ones(2, 1, dtype=torch.float64), "top_n", 100)
    assert math.isnan(flat.cpr) and math.isnan(flat.cmd)  # ablating everything changes nothing
    assert "CPR nan" in flat.to_markdown()


def test_curve_default_sizes_and_selections(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)[:1]
    kwargs = dict(objective="answer_nll", progress=False)
    scores = cd.attribute(model, graph, batches, **kwargs)
    default = cd.faithfulness_curve(model, scores, batches, **kwargs)
    assert default.requested == cd.circuits.sizes_for_curve(graph.n_edges)
    greedy = cd.faithfulness_curve(model, scores, batches, sizes=[10], selection="greedy", **kwargs)
    expected = cd.evaluate_circuit(model, cd.circuits.greedy(scores, 10), batches, **kwargs)
    assert greedy.selection == "greedy" and torch.allclose(greedy.circuit_losses[0], expected.circuit_losses)

    def signed(s, n):
        return cd.circuits.top_n(s, n, absolute=False)

    custom = cd.faithfulness_curve(model, scores, batches, sizes=[10], selection=signed, **kwargs)
    assert custom.selection == "signed" and custom.n_edges == [signed(scores, 10).n_edges]


def test_bad_curve_arguments_are_refused(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)[:1]
    scores = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    curve = lambda **kw: cd.faithfulness_curve(model, scores, batches, objective="answer_nll", progress=False, **kw)
    with pytest.raises(cd.UnknownNameError, match="top_n, greedy"):
        curve(selection="best")
    with pytest.raises(cd.DataError, match=r"sizes must be .* \[0, "):
        curve(sizes=[graph.n_edges + 1])
    with pytest.raises(cd.DataError, match="sizes must be"):
        curve(sizes=[])
    with pytest.raises(cd.DataError, match="no batches"):
        cd.evaluate_circuit(model, Circuit.full(graph), [], objective="answer_nll", progress=False)
    with pytest.raises(TypeError, match="Circuit"):
        cd.evaluate_circuit(model, graph.edge_mask, batches, objective="answer_nll", progress=False)
    other = cd.AttributionGraph.from_model(get_model("llama"), level="layer")
    with pytest.raises(cd.DataError, match="was not built for this model"):
        cd.evaluate_circuit(model, Circuit.full(other), batches, objective="answer_nll", progress=False)
