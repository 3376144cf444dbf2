"""EAP with a bfloat16 contraction (``contraction_dtype=torch.bfloat16``).

The scores must be the float32-accumulated product of the *rounded* factors: checked
element by element against ``sum(bf16(delta) * bf16(G))`` built from TransformerLens's
own per-receiver hooks on the float64 reference bridge. On a bfloat16 model they must
add little to the model's own bfloat16 error; the buffer must halve, as planned.
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff.engine import Window
import tiny_models as tm
from test_eap_correctness import ARCHS, eap_scores, make_data, reference_batches_for, reference_outputs
from test_planner import SHAPES_7B, planned_and_measured_peak

GIB = 2**30
BF16 = torch.bfloat16


def _round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16, back in float64."""
    return x.to(BF16).double()


def _receiver_gradients(reference, graph, batch, objective) -> dict[str, torch.Tensor]:
    """dL_b/d(input of v) [batch, pos, d_model] for every receiver v, by autograd on the reference bridge."""
    out = {}
    for receiver in graph.receivers:
        hook_name, head = tm.receiver_site(receiver)
        add = torch.zeros(*batch.input_ids.shape, reference.cfg.d_model, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad(), reference.hooks(fwd_hooks=[(hook_name, lambda x, hook: tm.shifted(x, head, add))]):
            logits = reference(batch.input_ids, attention_mask=batch.attention_mask)
            objective(logits, batch).sum().backward()
        out[receiver] = add.grad
    return out


@pytest.mark.parametrize("arch, level, intervention", [
    ("llama", "head", "zero"), ("llama", "head", "patching"), ("llama", "layer", "mean-positional"),
    pytest.param("gpt2", "head", "mean", marks=pytest.mark.slow),
    pytest.param("qwen2", "head", "zero", marks=pytest.mark.slow),
])
def test_scores_are_the_product_of_rounded_factors(get_model, get_reference, arch, level, intervention):
    model, reference = get_model(arch, "float64"), get_reference(arch)
    scores = eap_scores(model, level, intervention, contraction_dtype=BF16)
    exact = eap_scores(model, level, intervention)
    graph = cd.AttributionGraph.from_model(model, level=level)
    refs = reference_batches_for(model) if intervention.startswith("mean") else None
    objective = cd.objectives.answer_nll()
    expected = torch.zeros_like(scores.per_sample)
    first = 0
    for batch in make_data(model, corrupted=intervention == "patching"):
        replacement, clean = reference_outputs(reference, graph, batch, intervention, refs)
        mask = batch.attention_mask.double()[:, :, None]
        gradients = _receiver_gradients(reference, graph, batch, objective)
        for r, source in enumerate(graph.sources):
            # The buffer is bfloat16: the replacement and the clean output are rounded, then their difference.
            delta = _round(_round(replacement[source]) - _round(clean[source])) * mask
            for c, receiver in enumerate(graph.receivers):
                if graph.edge_mask[r, c]:
                    products = delta * _round(gradients[receiver])
                    expected[first:first + batch.size, r, c] = products.sum((1, 2))
        first += batch.size
    # Exact products of the rounded factors, summed in float32.
    tolerance = dict(rtol=1e-5, atol=1e-7 * expected.abs().max().item())
    torch.testing.assert_close(scores.per_sample, expected, **tolerance)
    # The test tells rounded factors from exact ones: the float64 scores miss this tolerance.
    assert not torch.allclose(exact.per_sample, expected, **tolerance)


@pytest.mark.parametrize("arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS])  # -m "not slow": llama only
def test_on_a_bfloat16_model_it_adds_little_to_the_models_own_error(get_model, arch):
    """Relative Frobenius distance from float32-model scores: bf16 model alone vs bf16 model + bf16 contraction.

    The bfloat16 contraction alone, on the float32 model, stays between 0.01% and 1%; on a
    bf16 model it adds at most 15% to the model's own bf16 error (1.1-8.7% on these
    models, tests/test_eap_correctness.py).
    """
    batches = make_data(get_model(arch))
    level = tm.finest_level(arch)
    reference = eap_scores(get_model(arch), level, batches=batches).per_sample

    def distance(dtype, contraction):
        scores = eap_scores(get_model(arch, dtype), level, batches=batches, contraction_dtype=contraction)
        assert scores.per_sample.dtype == torch.float32
        return ((scores.per_sample - reference).norm() / reference.norm()).item()

    alone = distance("float32", BF16)
    model_only, both = distance("bfloat16", None), distance("bfloat16", BF16)
    assert 1e-4 < alone < 1e-2, alone
    assert both < 1.15 * model_only, (model_only, both)


def test_buffer_is_bfloat16_and_scores_stay_float32(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="head")
    batch = make_data(model)[0]
    run = graph.bind(model, objective="answer_nll")
    assert run.new_delta(batch, Window(dtype=BF16)).dtype == BF16
    assert run.new_scores(batch).dtype == torch.float32
    assert run.new_delta(batch).dtype == torch.float32
    assert run.new_delta(batch, Window(dtype=torch.float32)).dtype == torch.float32
    with pytest.raises(ValueError, match="contraction dtype must be"):
        run.new_delta(batch, Window(dtype=torch.float16))


def test_combines_with_position_windows(get_model):
    model = get_model("mistral")
    one_pass = eap_scores(model, "head", "patching", contraction_dtype=BF16).per_sample
    windows = eap_scores(model, "head", "patching", contraction_dtype=BF16, positions_per_pass=3).per_sample
    # The same rounded factors, summed in another order.
    torch.testing.assert_close(windows, one_pass, rtol=1e-5, atol=1e-7 * one_pass.abs().max().item())
    assert one_pass.abs().max() > 0


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, "bfloat16", 16])
def test_bad_contraction_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="contraction_dtype must be None"):
        cd.scorers.get("eap", contraction_dtype=bad)


def test_float32_contraction_of_a_float64_model_is_refused(get_model):
    model = get_model("gpt2", "float64")
    with pytest.raises(ValueError, match="contraction dtype must be torch.float64"):
        eap_scores(model, "layer", contraction_dtype=torch.float32)


def test_resuming_with_another_contraction_dtype_is_refused(get_model, tmp_path):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)
    run = dict(objective="answer_nll", progress=False, checkpoint_dir=tmp_path)
    first = cd.attribute(model, graph, batches, method=cd.scorers.get("eap", contraction_dtype=BF16), **run)
    again = cd.attribute(model, graph, batches, method=cd.scorers.get("eap", contraction_dtype=BF16), **run)
    assert torch.equal(first.per_sample, again.per_sample)
    with pytest.raises(cd.DataError, match="contraction_dtype"):
        cd.attribute(model, graph, batches, method=cd.scorers.get("eap"), **run)


# ---------------------------------------------------------------------------- memory
def test_planner_halves_the_source_buffer_and_suggests_it():
    shape = SHAPES_7B["deepseek-math-7b"]
    full = cd.estimate_memory(shape, "head", batch_size=1, seq_len=2048)
    half = cd.estimate_memory(shape, "head", batch_size=1, seq_len=2048, contraction_dtype=BF16)
    assert half.source_buffer * 2 == full.source_buffer
    assert half.total < full.total - 0.4 * full.source_buffer
    assert "source buffer delta (bfloat16)" in half.to_markdown()
    with pytest.raises(cd.MemoryPlanError, match=r"contraction_dtype=torch.bfloat16\) halves the source buffer"):
        cd.plan_batch_size(shape, "head", seq_len=2048, max_memory=50 * GIB)  # 55.7 GiB needed
    with pytest.raises(cd.ArgumentError, match="contraction_dtype must be"):
        cd.estimate_memory(shape, "head", batch_size=1, seq_len=512, contraction_dtype=torch.float16)
    with pytest.raises(cd.ArgumentError, match="options of scorer='eap'"):
        cd.estimate_memory(shape, "head", batch_size=1, seq_len=512, scorer="eap-ig-inputs", contraction_dtype=BF16)
    bf16_eap = cd.scorers.EAP(contraction_dtype=BF16)  # the scorer object carries its options
    assert cd.estimate_memory(shape, "head", batch_size=1, seq_len=2048, scorer=bf16_eap) == half


def test_bfloat16_contraction_lowers_the_measured_peak_as_planned():
    """CPU profiler peaks of one batch of 128 tokens at head level, float32 vs bfloat16 contraction."""
    planned, measured = planned_and_measured_peak("llama-256", "head", 1, 128)
    planned_bf16, measured_bf16 = planned_and_measured_peak("llama-256", "head", 1, 128, contraction_dtype=BF16)
    assert measured - measured_bf16 > 0.5 * (planned - planned_bf16) > 0
