"""ACDC against a slow sequential reference that re-runs the algorithm on the reference bridge."""

from __future__ import annotations

import math

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.circuits import Circuit
from test_eap_correctness import make_data
from test_faithfulness import reference_replacement


def reference_acdc(reference, graph, batches, objective, threshold):
    """ACDC written out plainly: every edge tried, logits first, then layers backwards, MLP before attention."""
    replacements = [reference_replacement(reference, graph, b, "patching") for b in batches]
    n = sum(b.size for b in batches)

    def mean_loss(ablate):
        return sum(float(tm.ablated_losses(reference, graph, b, objective, r, ablate).sum())
                   for b, r in zip(batches, replacements)) / n

    columns = [graph.receivers.index("logits")]
    for layer in reversed(range(graph.n_layers)):
        columns.append(graph.receivers.index(f"m{layer}"))
        columns += [c for c, r in enumerate(graph.receivers) if r.startswith(f"a{layer}<")]
    kept = graph.edge_mask.clone()
    current = mean_loss(torch.zeros_like(kept))
    changes = {}
    for column in columns:
        for row in reversed(range(graph.n_sources)):
            if not kept[row, column]:
                continue
            kept[row, column] = False
            loss = mean_loss(graph.edge_mask & ~kept)
            changes[row, column] = loss - current
            if loss - current < threshold:
                current = loss
            else:
                kept[row, column] = True
    return kept, changes


# 0.1 disconnects nodes, so edges are removed without a pass (and others with one): the inner loop's case
@pytest.mark.parametrize("threshold", [pytest.param(0.02, marks=pytest.mark.slow), 0.1])
def test_decisions_match_a_sequential_reference(get_model, get_reference, threshold):
    model, reference = get_model("llama", "float64"), get_reference("llama")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model, corrupted=True)
    objective = cd.objectives.answer_nll()
    result = cd.acdc(model, graph, batches, objective=objective, threshold=threshold, intervention="patching",
                     progress=False)
    kept, changes = reference_acdc(reference, graph, batches, objective, threshold)
    assert all(abs(c - threshold) > 1e-6 for c in changes.values()), "threshold too close to a measured change"
    assert torch.equal(result.circuit.edges, kept)
    assert 0 < result.circuit.n_edges < graph.n_edges, "the case should keep some edges and remove others"
    measured = ~torch.isnan(result.changes)
    for (row, column), change in changes.items():
        if measured[row, column]:
            assert result.changes[row, column].item() == pytest.approx(change, abs=1e-9)
        else:  # removed without a pass: its reader had lost every outgoing edge, so it cannot matter
            assert abs(change) < 1e-9
    assert not bool(measured[~graph.edge_mask].any())
    evaluation = cd.evaluate_circuit(model, result.circuit, batches, objective=objective, intervention="patching",
                                     progress=False)
    assert result.circuit_loss == pytest.approx(evaluation.circuit_losses.mean().item(), abs=1e-12)
    assert result.clean_loss == pytest.approx(evaluation.clean_losses.mean().item(), abs=1e-12)


def test_infinite_thresholds_remove_or_keep_everything(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)[:1]
    kwargs = dict(objective="kl_to_clean", progress=False)
    everything = cd.acdc(model, graph, batches, threshold=math.inf, **kwargs)
    nothing = cd.acdc(model, graph, batches, threshold=-math.inf, **kwargs)
    assert everything.circuit == Circuit.empty(graph)
    assert nothing.circuit == Circuit.full(graph)
    assert int((~torch.isnan(nothing.changes)).sum()) == graph.n_edges  # every edge tried
    assert nothing.circuit_loss == pytest.approx(nothing.clean_loss, abs=1e-6) == pytest.approx(0.0, abs=1e-6)
    assert everything.circuit_loss > 1e-3  # KL of the all-ablated run


@pytest.mark.parametrize("threshold", [float("nan"), "0.1", None, True])
def test_bad_threshold_is_refused(get_model, threshold):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    with pytest.raises(cd.DataError, match="threshold must be a number"):
        cd.acdc(model, graph, make_data(model)[:1], objective="answer_nll", threshold=threshold, progress=False)
