"""Exact ablation and EAP-IG against slow references that share no code with circuitdiff.

The reference bridge (tests/tiny_models.py) runs TransformerLens's own per-receiver
mode and patches one receiver, or one whole source block, per forward pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.scorers.eap_ig import EAPIGActivations, EAPIGInputs
from circuitdiff.scorers.exact import Exact
from test_eap_correctness import make_data, pick_edges, reference_batches_for, reference_deltas

INTERVENTIONS = ("zero", "patching", "mean", "mean-positional")


def setup(get_model, arch: str, level: str, intervention: str):
    model = get_model(arch, "float64")
    graph = cd.AttributionGraph.from_model(model, level=level)
    batches = make_data(model, corrupted=intervention == "patching")
    refs = reference_batches_for(model) if intervention.startswith("mean") else None
    return model, graph, batches, refs


def brute_force(reference, graph, batch, objective, deltas, edges) -> dict[tuple[int, int], torch.Tensor]:
    """One hooked forward per edge: loss(receiver reads replacement of source) - clean loss."""
    clean = tm.patched_losses(reference, graph, batch, objective, "logits", torch.zeros_like(deltas["input"]))
    return {
        (r, c): tm.patched_losses(reference, graph, batch, objective, graph.receivers[c], deltas[graph.sources[r]]) - clean
        for r, c in edges
    }


# ---------------------------------------------------------------------------- exact
@pytest.mark.parametrize("arch, intervention, level", [  # -m "not slow": llama only
    pytest.param(a, i, level, marks=() if a == "llama" else pytest.mark.slow)
    for a in tm.ARCHITECTURES for i in INTERVENTIONS for level in tm.levels(a)])
def test_exact_equals_one_edge_at_a_time(get_model, get_reference, arch, intervention, level):
    model, graph, batches, refs = setup(get_model, arch, level, intervention)
    reference = get_reference(arch)
    objective = cd.objectives.answer_nll()
    scores = cd.attribute(model, graph, batches, objective=objective, method="exact", intervention=intervention,
                          reference_batches=refs, progress=False)
    first = 0
    for batch in batches:  # one padded, one unpadded
        deltas = reference_deltas(reference, graph, batch, intervention, refs)
        for (r, c), expected in brute_force(reference, graph, batch, objective, deltas, pick_edges(graph)).items():
            got = scores.per_sample[first:first + batch.size, r, c].double()
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (
                f"{graph.sources[r]}->{graph.receivers[c]}: exact {got.tolist()} vs brute force {expected.tolist()}"
            )
        first += batch.size
    assert torch.count_nonzero(scores.per_sample[:, ~graph.edge_mask]) == 0


def test_exact_every_edge_of_a_gqa_model(get_model, get_reference):
    """All real edges of the head-level Llama graph (GQA), one padded batch."""
    model, graph, batches, _ = setup(get_model, "llama", "head", "patching")
    reference, batch = get_reference("llama"), batches[0]
    objective = cd.objectives.answer_nll()
    scores = cd.attribute(model, graph, [batch], objective=objective, method="exact", intervention="patching",
                          progress=False)
    deltas = reference_deltas(reference, graph, batch, "patching")
    edges = [tuple(e) for e in torch.nonzero(graph.edge_mask).tolist()]
    expected = brute_force(reference, graph, batch, objective, deltas, edges)
    got = torch.stack([scores.per_sample[:, r, c] for r, c in edges]).double()
    assert torch.allclose(got, torch.stack([expected[e] for e in edges]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("intervention", ["zero", pytest.param("patching", marks=pytest.mark.slow)])
def test_exact_does_not_depend_on_batching(get_model, intervention):
    """Copies per forward 1 vs 64, and batches of 3 vs one sample per batch."""
    model = get_model("qwen2")
    graph = cd.AttributionGraph.from_model(model, level="head")
    together = make_data(model, corrupted=intervention == "patching")
    separate = []
    for batch in together:
        for i in range(batch.size):
            n = int(batch.lengths[i])
            corrupted = None if batch.corrupted_input_ids is None else batch.corrupted_input_ids[i:i + 1, :n]
            separate.append(cd.Batch(batch.input_ids[i:i + 1, :n], labels=batch.labels[i:i + 1, :n],
                                     corrupted_input_ids=corrupted))
    kwargs = dict(objective="answer_nll", intervention=intervention, progress=False)
    batched = cd.attribute(model, graph, together, method=Exact(edges_per_forward=64), **kwargs)
    one_by_one = cd.attribute(model, graph, together[:1], method=Exact(edges_per_forward=1), **kwargs)
    unbatched = cd.attribute(model, graph, separate, method="exact", **kwargs)
    n = together[0].size
    assert torch.allclose(batched.per_sample[:n], one_by_one.per_sample, atol=1e-5)
    assert torch.allclose(batched.per_sample, unbatched.per_sample, atol=1e-5)
    assert torch.allclose(batched.objective_values, unbatched.objective_values, rtol=1e-5)


def test_exact_sees_what_first_order_methods_cannot(get_model):
    """With kl_to_clean the gradient at the clean point is zero: EAP gives 0, exact does not."""
    model, graph, batches, _ = setup(get_model, "gpt2", "layer", "zero")
    eap = cd.attribute(model, graph, batches, objective="kl_to_clean", progress=False)
    exact = cd.attribute(model, graph, batches, objective="kl_to_clean", method="exact", progress=False)
    assert eap.per_sample.abs().max() < 1e-8
    real = exact.per_sample[:, graph.edge_mask]
    assert bool((real >= -1e-9).all()), "a KL divergence cannot fall below its clean value of 0"
    assert real.max() > 1e-3


# ---------------------------------------------------------------------------- EAP-IG
@pytest.mark.parametrize("scorer", [EAPIGInputs, EAPIGActivations])
@pytest.mark.parametrize("intervention", ["zero", "patching"])
def test_eap_ig_with_one_step_is_eap(get_model, scorer, intervention):
    """Right-endpoint rule: the only point is alpha = 1, the clean run, where EAP takes its gradient."""
    model, graph, batches, _ = setup(get_model, "llama", "head", intervention)
    kwargs = dict(objective="answer_nll", intervention=intervention, progress=False)
    eap = cd.attribute(model, graph, batches, method="eap", **kwargs)
    ig = cd.attribute(model, graph, batches, method=scorer(steps=1), **kwargs)
    assert torch.allclose(ig.per_sample, eap.per_sample, rtol=1e-9, atol=1e-12)
    assert torch.equal(ig.objective_values, eap.objective_values)


@pytest.mark.parametrize("scorer", [EAPIGInputs, EAPIGActivations])
def test_left_and_right_points_differ_by_the_end_gradients_over_steps(get_model, scorer):
    """Riemann sums over k/m: steps * (right - left) = grad(1) - grad(0), whatever m, so
    3 * (right_3 - left_3) equals 1 * (right_1 - left_1), and the two rules differ."""
    model, graph, batches, refs = setup(get_model, "llama", "head", "patching")
    kwargs = dict(objective="answer_nll", intervention="patching", reference_batches=refs, progress=False)

    def scores(steps: int, points: str) -> torch.Tensor:
        return cd.attribute(model, graph, batches, method=scorer(steps=steps, points=points), **kwargs).per_sample

    one = scores(1, "right") - scores(1, "left")
    three = 3 * (scores(3, "right") - scores(3, "left"))
    assert one.abs().max() > 1e-4
    assert torch.allclose(three, one, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_left_points_converge_to_the_input_block_ablation(get_model, get_reference):
    """hannamw/EAP-IG's rule (alpha = 0..(m-1)/m) satisfies completeness in the limit too. Patching: with
    zero ablation its first point is an all-zero input, where RMSNorm's gradient is about 1/sqrt(eps)."""
    model, graph, batches, refs = setup(get_model, "llama", "head", "patching")
    reference, batch = get_reference("llama"), batches[0]
    objective = cd.objectives.answer_nll()
    kwargs = dict(objective=objective, intervention="patching", reference_batches=refs, progress=False)
    deltas = reference_deltas(reference, graph, batch, "patching", refs)
    clean = block_ablated_losses(reference, batch, objective, "blocks.0.hook_resid_pre", 0.0)
    exact = block_ablated_losses(reference, batch, objective, "blocks.0.hook_resid_pre", deltas[graph.sources[0]]) - clean
    errors = {}
    for steps in (4, 64):
        left = cd.attribute(model, graph, [batch], method=EAPIGInputs(steps=steps, points="left"), **kwargs).per_sample
        errors[steps] = (left[:, [0]].sum((1, 2)).double() - exact).abs().max().item()
    # Riemann sums: the error falls like 1 / steps (16x fewer here; 8x asserted), to a few percent at 64 steps
    assert errors[64] < min(errors[4] / 8, 0.1 * exact.abs().max().item()), errors


def test_unknown_points_are_refused():
    with pytest.raises(ValueError, match="points must be one of"):
        EAPIGInputs(points="middle")
    assert cd.scorers.get("eap-ig-activations", points="left").alphas() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert EAPIGInputs(steps=4).alphas() == pytest.approx([0.25, 0.5, 0.75, 1])


def source_blocks(graph) -> list[tuple[str, str, list[int]]]:
    """(name, reference hook where the block's output enters the residual stream, its source rows)."""
    blocks = [("input", "blocks.0.hook_resid_pre", [0])]
    for layer in range(graph.n_layers):
        heads = graph.attention_sources(layer)
        blocks.append((f"a{layer}", f"blocks.{layer}.hook_attn_out", list(range(heads.start, heads.stop))))
        blocks.append((f"m{layer}", f"blocks.{layer}.hook_mlp_out", [graph.mlp_source(layer)]))
    return blocks


def block_ablated_losses(reference, batch, objective, hook_name: str, add: torch.Tensor) -> torch.Tensor:
    """Loss when a whole block's output is replaced (every reader of it reads the replacement)."""
    with torch.no_grad(), reference.hooks(fwd_hooks=[(hook_name, lambda x, hook: x + add)]):
        return objective(reference(batch.input_ids, attention_mask=batch.attention_mask), batch)


@pytest.mark.parametrize("arch, intervention", [
    ("llama", "patching"),  # -m "not slow"
    *(pytest.param("llama", "mean", marks=pytest.mark.slow), pytest.param("gpt2", "mean", marks=pytest.mark.slow)),
    # patching for the others: EAP-IG shares the engine that every intervention's EAP proof covers (CI time)
    *(pytest.param(a, "patching", marks=pytest.mark.slow) for a in tm.ARCHITECTURES if a != "llama"),
])
def test_eap_ig_completeness_approaches_exact_block_ablation(get_model, get_reference, arch, intervention):
    """The sum of a block's outgoing scores tends to L(block replaced) - L(clean) as steps grow.

    Integrated gradients along a path that moves only the block's output satisfies
    completeness: the line integral of the gradient is the change of the loss. With
    right-endpoint sums the error falls like 1/steps; EAP (one point) has no such limit.
    EAP-IG-inputs moves only the input embeddings, so its limit is the input block's.
    Head level, or layer level for the post-norm families. Mixture-of-experts models route every token to every expert here: top-k routing makes
    the loss jump along the path, and integrated gradients cannot see jumps (with top-2 of
    4 experts, 256 steps leave about the error of 64, ten times the bound; docs/support.md).
    """
    model, graph, batches, refs = setup(get_model, arch, tm.finest_level(arch), intervention)
    reference, batch = get_reference(arch), batches[0]
    with tm.dense_routing(model, reference), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mixture-of-experts")  # routing jumps: none with dense routing
        check_completeness(model, graph, batch, refs, reference, intervention)


def check_completeness(model, graph, batch, refs, reference, intervention: str) -> None:
    """The completeness assertions of the test above, for one batch."""
    objective = cd.objectives.answer_nll()
    kwargs = dict(objective=objective, intervention=intervention, reference_batches=refs, progress=False)
    eap = cd.attribute(model, graph, [batch], **kwargs).per_sample
    coarse = cd.attribute(model, graph, [batch], method=EAPIGActivations(steps=4), **kwargs).per_sample
    fine = cd.attribute(model, graph, [batch], method=EAPIGActivations(steps=64), **kwargs).per_sample
    def inputs(steps: int) -> torch.Tensor:
        return cd.attribute(model, graph, [batch], method=EAPIGInputs(steps=steps), **kwargs).per_sample

    deltas = reference_deltas(reference, graph, batch, intervention, refs)
    clean = block_ablated_losses(reference, batch, objective, "blocks.0.hook_resid_pre", 0.0)
    errors = {"eap": 0.0, "ig-4": 0.0, "ig-64": 0.0}
    for name, hook_name, rows in source_blocks(graph):
        exact = block_ablated_losses(reference, batch, objective, hook_name,
                                     sum(deltas[graph.sources[r]] for r in rows)) - clean
        for label, scores in (("eap", eap), ("ig-4", coarse), ("ig-64", fine)):
            errors[label] += (scores[:, rows].sum((1, 2)).double() - exact).abs().sum().item()
        if name == "input":
            bound = 0.05 * exact.abs().max().item()
            error = {64: (inputs(64)[:, rows].sum((1, 2)).double() - exact).abs().max().item()}
            if error[64] >= bound:  # a more curved model (Phi-3's): right-endpoint sums converge like 1 / steps,
                error[256] = (inputs(256)[:, rows].sum((1, 2)).double() - exact).abs().max().item()
                assert error[256] < min(error[64] / 2, bound), error  # so 4x the steps is about a quarter the error
    assert errors["ig-64"] < errors["ig-4"] < errors["eap"], errors
    assert errors["ig-64"] < 0.05 * errors["eap"], errors


@pytest.mark.parametrize("scorer", ["eap-ig-inputs", "eap", "exact"])
def test_eap_ig_on_a_mixture_of_experts_warns_of_routing_jumps(get_model, scorer):
    model = get_model("mixtral")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cd.attribute(model, graph, make_data(model)[:1], objective="answer_nll", scorer=scorer, progress=False)
    routing = [w for w in caught if "mixture-of-experts" in str(w.message)]
    assert len(routing) == (1 if scorer.startswith("eap-ig") else 0), [str(w.message) for w in caught]


@pytest.mark.slow  # -m "not slow" checks EAP-IG-activations' convergence to exact ablation by completeness
def test_eap_ig_activations_beats_eap_on_single_edges_it_integrates_exactly(get_model):
    """Edges m{last} -> logits: the last MLP's output reaches the loss only through that edge,
    so EAP-IG-activations' path is that edge's ablation and converges to the exact score."""
    model, graph, batches, _ = setup(get_model, "neox", "head", "patching")
    kwargs = dict(objective="answer_nll", intervention="patching", progress=False)
    exact = cd.attribute(model, graph, batches, method="exact", **kwargs).per_sample
    eap = cd.attribute(model, graph, batches, **kwargs).per_sample
    ig = cd.attribute(model, graph, batches, method=EAPIGActivations(steps=32), **kwargs).per_sample
    r, c = graph.source_index(f"m{graph.n_layers - 1}"), graph.receiver_index("logits")
    ig_error = (ig[:, r, c] - exact[:, r, c]).abs()
    eap_error = (eap[:, r, c] - exact[:, r, c]).abs()
    assert bool((ig_error < eap_error).all()), (ig_error, eap_error)
    assert ig_error.max() < 0.1 * eap_error.max()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "5", True])
def test_bad_options_are_refused(bad):
    for scorer in (EAPIGInputs, EAPIGActivations):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            scorer(steps=bad)
    with pytest.raises(ValueError, match="edges_per_forward must be a positive integer"):
        Exact(edges_per_forward=bad)


def test_default_steps_are_set():
    assert EAPIGInputs().steps == EAPIGActivations().steps == 5
    assert cd.scorers.get("eap-ig-inputs", steps=7).steps == 7


def test_one_edge_per_copy_refuses_several_edges(get_model):
    """The fast path's fixed delta is only exact for single edges; it must not be misused silently."""
    from circuitdiff.engine.ablation import EdgeAblation

    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batch = make_data(model)[1]
    run = graph.bind(model, objective="answer_nll", intervention="zero", progress=False)
    ablate = graph.edge_mask.expand(batch.size, -1, -1)
    with run:
        general = EdgeAblation(run, batch, 0).losses(torch.arange(batch.size), ablate)
        fast = EdgeAblation(run, batch, 0, one_edge_per_copy=True)
        with pytest.raises(ValueError, match="one_edge_per_copy=False"):
            fast.losses(torch.arange(batch.size), ablate)
    assert torch.isfinite(general).all()
