"""The scorers' memory options: the same scores with less memory.

- ``checkpoint_blocks=True``: each block keeps only its input for the backward pass and
  reruns its forward there (``Bridge.checkpointed_blocks``). The rerun fires every hook
  again, so the engine's hooks must leave ``delta`` and their gradient hooks alone then.
- ``positions_per_chunk=c``: the attention receivers' gradients are formed and contracted
  ``c`` positions at a time inside the one backward pass.
- ``fused_attention``: attention through torch's fused kernel instead of the bridge's
  eager attention, which keeps ``[batch, heads, pos, pos]`` scores and pattern (the
  default, None, fuses wherever the kernel computes the model's attention).

Pinned here: the scores are those of the plain run (eager attention, no options) for
every architecture, level, scorer and intervention (bfloat16 models with fused attention:
as close to the float32 scores as the eager run's); what the default picks;
the blocks really are rerun; what the memory planner counts; that with all three options
the whole peak grows linearly with the sequence length.
"""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from test_eap_correctness import make_data, reference_batches_for
from circuitdiff.engine.receivers import _requires_grad
from test_planner import CPU_SHAPES, _cpu_model, cpu_answer_batch, cpu_peak

SCORERS = {"eap": {}, "eap-ig-inputs": {"steps": 2}, "eap-ig-activations": {"steps": 2}}
INTERVENTIONS = ("zero", "patching", "mean", "mean-positional")


def _scores(model, level, scorer, intervention, **options):
    graph = cd.AttributionGraph.from_model(model, level=level)
    refs = reference_batches_for(model) if intervention.startswith("mean") else None
    return cd.attribute(model, graph, make_data(model, corrupted=intervention == "patching"), objective="answer_nll",
                        scorer=cd.scorers.get(scorer, **SCORERS[scorer], **options), intervention=intervention,
                        reference_batches=refs, progress=False)


def _cases():
    """Every architecture and level with EAP under every intervention (its checkpointed pass records
    ``delta`` in each of the three ways), and with both EAP-IG scorers under zero ablation (their
    interventions only change ``delta``, recorded in a pass without gradients that is not
    checkpointed). EAP-IG is left out on mixture-of-experts models, where it warns (routing jumps)."""
    for a in tm.ARCHITECTURES:
        for level in tm.levels(a):
            marks = () if a == "llama" else pytest.mark.slow  # -m "not slow": llama only
            yield from (pytest.param(a, level, "eap", i, marks=marks) for i in INTERVENTIONS)
            if a not in ("qwen3_moe", "mixtral"):
                yield from (pytest.param(a, level, s, "zero", marks=marks) for s in SCORERS if s != "eap")


# -m "not slow" (llama): each option on its own and all; the other families: all at once
# (fused attention as the default picks it: not for Gemma 2's soft-capped scores).
OPTIONS = {"checkpointed": {"checkpoint_blocks": True, "fused_attention": False},
           "chunked": {"positions_per_chunk": 2, "fused_attention": False},
           "fused": {}, "all": {"checkpoint_blocks": True, "positions_per_chunk": 3}}
SOFT_CAPPED = ("gemma2",)


@pytest.mark.parametrize("arch, level, scorer, intervention", list(_cases()))
def test_memory_options_give_the_plain_runs_scores(get_model, arch, level, scorer, intervention):
    model = get_model(arch)
    plain = _scores(model, level, scorer, intervention, fused_attention=False)
    for name in OPTIONS if arch == "llama" else ["all"]:
        other = _scores(model, level, scorer, intervention, **OPTIONS[name])
        # chunks add the positions' contributions in another order, the fused kernel sums its
        # softmax in another order: float32 rounding (measured: at most 1.5e-6 of the largest score)
        fused = OPTIONS[name].get("fused_attention", True) and arch not in SOFT_CAPPED
        torch.testing.assert_close(other.per_sample, plain.per_sample, rtol=1e-5,
                                   atol=(5e-6 if fused else 1e-6) * plain.per_sample.abs().max().item(), msg=name)
        torch.testing.assert_close(other.objective_values, plain.objective_values)
        # the options are not in the identity; which attention ran is (plain is eager)
        same = {k: v for k, v in other.metadata["identity"].items() if k not in ("fingerprint", "attention")}
        assert same == {k: v for k, v in plain.metadata["identity"].items() if k != "fingerprint"}
        assert other.metadata["identity"].get("attention") == ("fused" if fused else None)


def test_the_blocks_are_rerun_and_the_hooks_record_once(get_model):
    """Every block's forward runs twice (the second time inside the backward); delta is written once."""
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="head")
    fired: dict[str, int] = {}

    def count(x, hook):
        fired[hook.name] = fired.get(hook.name, 0) + 1

    names = [block.hook_in.name for block in model.blocks]
    scorer = cd.scorers.get("eap", checkpoint_blocks=True)
    with model.hooks(fwd_hooks=[(name, count) for name in names]):  # outlives the engine's own hooks
        cd.attribute(model, graph, make_data(model)[:1], objective="answer_nll", scorer=scorer, progress=False)
    assert fired == {name: 2 for name in names}
    assert all("forward" not in vars(block) for block in model.blocks)  # the blocks' own forward again


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a == "llama" else pytest.mark.slow)
                                  for a in tm.ARCHITECTURES if a not in SOFT_CAPPED])
def test_fused_attention_in_bfloat16_is_as_close_to_float32_as_the_eager_attention(get_model, arch):
    """bfloat16 rounding moves scores by percents, so the fused and the eager runs are each set against
    the float32 scores (same weights: the checkpoints are bfloat16-representable)."""
    level = tm.finest_level(arch)
    reference = _scores(get_model(arch), level, "eap", "zero").per_sample
    model = get_model(arch, "bfloat16")
    error = {fused: float((_scores(model, level, "eap", "zero", fused_attention=fused).per_sample - reference).norm()
                          / reference.norm()) for fused in (False, True)}
    assert error[True] < 1.5 * error[False] + 0.005, error  # measured: 0.3x to 1.3x eager's 1-9% error


def _attention(model, scorer) -> set[str]:
    """The attention each layer ran in one EAP batch with ``scorer``: ``{"sdpa"}`` when torch's fused kernel
    ran once per layer output (counted at the kernel, and at each layer's attention output, a hook point both
    paths run), ``{"eager"}`` when it never ran."""
    graph = cd.AttributionGraph.from_model(model, level="layer")
    calls, outputs = [], []
    kernel = torch.nn.functional.scaled_dot_product_attention
    hooks = [(block.attn.o.hook_in.name, lambda z, hook: outputs.append(1)) for block in model.blocks]
    with model.hooks(fwd_hooks=hooks), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                                                         side_effect=lambda *a, **k: calls.append(1) or kernel(*a, **k)):
        cd.attribute(model, graph, make_data(model)[:1], objective="answer_nll", scorer=scorer, progress=False)
    assert outputs and len(calls) in (0, len(outputs)), (len(calls), len(outputs))
    return {"sdpa"} if calls else {"eager"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in ("llama", "phi3") else pytest.mark.slow)
                                  for a in tm.ARCHITECTURES if a not in SOFT_CAPPED])
def test_fused_attention_is_the_default_and_puts_the_model_back(get_model, arch):
    """llama: Hugging Face's own attention forward; phi3: a fused-qkv bridge's core; OLMo: with circuitdiff's
    own rotary casts on the bridge (not someone's hooks)."""
    model = get_model(arch)
    integrated = () if arch in ("qwen3_moe", "mixtral") else (cd.scorers.get("eap-ig-inputs", steps=2),)  # MoE: warns
    for scorer in (cd.scorers.get("eap"), *integrated):  # the default: fused
        assert _attention(model, scorer) == {"sdpa"}
    assert model.original_model.config._attn_implementation == "eager"
    assert all("forward" not in vars(b.attn) and "_reconstruct_attention" not in vars(b.attn) for b in model.blocks)
    assert _attention(model, cd.scorers.get("eap", fused_attention=False)) == {"eager"}
    fired = []
    with model.hooks(fwd_hooks=[(model.blocks[0].attn.hook_pattern.name, lambda p, hook: fired.append(1))]):
        model(make_data(model)[0].input_ids)  # the bridge's own attention again, pattern hook and all
    assert fired


def test_hooks_inside_attention_keep_it_eager(get_model):
    """Someone's hook on the attention pattern would be skipped by the fused path: the default then runs the
    eager attention (the hook fires, and changes the scores), fused_attention=True refuses."""
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="head")
    data = make_data(model)[:1]
    plain = cd.attribute(model, graph, data, objective="answer_nll", progress=False)
    halved = (model.blocks[1].attn.hook_pattern.name, lambda pattern, hook: pattern * 0.5)
    with model.hooks(fwd_hooks=[halved]):
        hooked = cd.attribute(model, graph, data, objective="answer_nll", progress=False)
        with pytest.raises(cd.UnsupportedModelError, match=r"hooks on blocks\.1\.attn\.hook_pattern"):
            cd.attribute(model, graph, data, objective="answer_nll", progress=False,
                         scorer=cd.scorers.get("eap", fused_attention=True))
    assert not torch.allclose(hooked.per_sample, plain.per_sample, rtol=1e-3)
    model.blocks[0].attn.hook_rot_q.add_hook(lambda q, hook: q)  # any hook point the fused path skips
    try:
        assert _attention(model, cd.scorers.get("eap")) == {"eager"}
    finally:
        model.blocks[0].attn.hook_rot_q.remove_hooks()
    assert _attention(model, cd.scorers.get("eap")) == {"sdpa"}


def test_soft_capped_attention_stays_eager_by_default_and_refuses_fused(get_model):
    model = get_model("gemma2")
    assert _attention(model, cd.scorers.get("eap")) == {"eager"}
    with pytest.raises(cd.UnsupportedModelError, match="soft-caps its scores"):
        _attention(model, cd.scorers.get("eap", fused_attention=True))
    assert model.original_model.config._attn_implementation == "eager"
    assert all("forward" not in vars(b.attn) for b in model.blocks)


def test_the_options_are_checked_and_not_part_of_the_identity():
    with pytest.raises(cd.ArgumentError, match="checkpoint_blocks must be True or False"):
        cd.scorers.get("eap", checkpoint_blocks="yes")
    with pytest.raises(cd.ArgumentError, match="checkpoint_blocks must be True or False"):
        cd.scorers.get("eap-ig-inputs", checkpoint_blocks=1)
    with pytest.raises(cd.ArgumentError, match="fused_attention must be True or False"):
        cd.scorers.get("eap-ig-activations", fused_attention="no")
    for bad in (0, -3, 2.5):
        with pytest.raises(cd.ArgumentError, match="positions_per_chunk"):
            cd.scorers.get("eap-ig-activations", positions_per_chunk=bad)
    from circuitdiff.identity import describe_component

    options = describe_component("scorer", cd.scorers.get("eap", checkpoint_blocks=True, positions_per_chunk=8,
                                                          fused_attention=True))
    assert not {"checkpoint_blocks", "positions_per_chunk", "fused_attention"} & set(options["options"])


def test_checkpointed_peak_keeps_one_blocks_activations_and_the_planner_counts_it():
    """4 layers: the plain peak holds 4 blocks' activations, the checkpointed one 1 and the 4 inputs (CPU profiler)."""
    name, level, batch, tokens = "llama-256", "layer", 2, 128
    model = _cpu_model(name)
    graph = cd.AttributionGraph.from_model(model, level=level)
    data = cpu_answer_batch(name, batch, tokens)
    peaks, planned = {}, {}
    for checkpointed in (False, True):
        scorer = cd.scorers.get("eap", checkpoint_blocks=checkpointed)
        peaks[checkpointed] = cpu_peak(model, lambda: cd.attribute(model, graph, [data], objective="answer_nll",
                                                                   scorer=scorer, progress=False))
        planned[checkpointed] = cd.estimate_memory(model, graph, batch_size=batch, seq_len=tokens, scorer=scorer,
                                                   loss_positions=tokens // 4)
        assert abs(planned[checkpointed].total / peaks[checkpointed] - 1) < 0.30
    saved = planned[False].saved_activations - planned[True].saved_activations
    assert saved > 0 and planned[True].checkpoint_blocks
    # the measured saving is the planned one, within 30% (the profiler counts every tensor)
    assert abs((peaks[False] - peaks[True]) / saved - 1) < 0.30, (peaks, saved)
    assert CPU_SHAPES[name].n_layers == 4


def test_with_both_options_the_engines_own_memory_grows_linearly_with_the_sequence():
    """EAP's peak minus that of the same checkpointed pass without the engine's hooks (CPU profiler).

    What is left is the engine's own memory: the source buffer, the stashed gradients and,
    with positions_per_chunk, receiver transients of a fixed size. It doubles with the
    sequence. (The whole peak: see the next test.)
    """
    model = _cpu_model("llama-256")
    graph = cd.AttributionGraph.from_model(model, level="head")
    run = graph.bind(model, objective="answer_nll", progress=False)
    scorer = cd.scorers.get("eap", checkpoint_blocks=True, positions_per_chunk=16)
    extra = []
    for length in (64, 128, 256, 512):
        data = cpu_answer_batch("llama-256", 1, length)
        with run:
            engine = cpu_peak(model, lambda: scorer.score_batch(run, data, 0))
            with run.bridge.fused_attention(None):  # the scorer's default attention
                bare = cpu_peak(model, lambda: run.backward_pass(data, 0, [(run.bridge.input_hook, _requires_grad)],
                                                                  checkpoint_blocks=True))
        extra.append(engine - bare)
    ratios = [b / a for a, b in zip(extra, extra[1:])]
    assert all(abs(r - 2) < 0.1 for r in ratios), (extra, ratios)


@pytest.mark.slow
def test_with_all_three_options_the_whole_peak_grows_linearly_with_the_sequence():
    """The CPU profiler's peak of a whole EAP batch, weights included, at 256, 512 and 1024 tokens.

    With checkpointed blocks, position chunks and fused attention nothing is quadratic:
    each doubling of the sequence adds twice what the one before added (measured: 15.1,
    30.1 MiB). The eager attention's ``heads x pos x pos`` pattern makes the same steps
    grow more than threefold (30.6, 98.6 MiB), which shows the measurement can tell.
    """
    model = _cpu_model("llama-256")
    graph = cd.AttributionGraph.from_model(model, level="head")
    run = graph.bind(model, objective="answer_nll", progress=False)
    growth = {}
    for fused in (True, False):
        scorer = cd.scorers.get("eap", checkpoint_blocks=True, positions_per_chunk=64, fused_attention=fused)
        with run:
            peaks = [cpu_peak(model, lambda: scorer.score_batch(run, cpu_answer_batch("llama-256", 1, length), 0))
                     for length in (256, 512, 1024)]
        growth[fused] = (peaks[2] - peaks[1]) / (peaks[1] - peaks[0])
    assert abs(growth[True] - 2) < 0.1 and growth[False] > 2.5, growth


@pytest.mark.parametrize("level", ["head", "layer"])
def test_the_planner_counts_both_options_within_15_percent_of_the_cpu_peak(level):
    from test_planner import planned_and_measured_peak

    planned, measured = planned_and_measured_peak("llama-256", level, 1, 256, checkpoint_blocks=True,
                                                  positions_per_chunk=32)
    assert abs(planned / measured - 1) < 0.15  # measured: +2.1% head, -0.8% layer (fused attention, the default)
    # all three options at 1024 tokens, where the eager pattern would be 5 times the engine's delta
    long_planned, long_measured = planned_and_measured_peak("llama-256", level, 1, 1024, checkpoint_blocks=True,
                                                            positions_per_chunk=32, fused_attention=True)
    assert abs(long_planned / long_measured - 1) < 0.15  # measured: -2.2% head, -3.4% layer
    whole = cd.estimate_memory(_cpu_model("llama-256"), level, batch_size=1, seq_len=256, loss_positions=64)
    chunked = cd.estimate_memory(_cpu_model("llama-256"), level, batch_size=1, seq_len=256, loss_positions=64,
                                 positions_per_chunk=32)
    assert chunked.receiver_gradients < whole.receiver_gradients and planned < whole.total


def test_plan_scorer_adds_the_cheapest_options_that_fit():
    """The deepseek-math-7b shape (bfloat16) on budgets from roomy to tight, against the planner's own estimates."""
    from test_planner import SHAPES_7B

    shape = SHAPES_7B["deepseek-math-7b"]

    def need(scorer, tokens=4096):
        return cd.estimate_memory(shape, "head", batch_size=1, seq_len=tokens, scorer=scorer,
                                  loss_positions=tokens // 4).total

    plain = need("eap")
    plan = lambda budget, tokens=4096: cd.plan_scorer(shape, "head", seq_len=tokens, max_memory=budget,
                                                      loss_positions=tokens // 4)
    assert plan(plain) == cd.scorers.get("eap")  # fits as it is: no options (fused attention is the default)
    assert need("eap") < need(cd.scorers.get("eap", fused_attention=False))
    chunked = plan(plain - 1)
    assert chunked.positions_per_chunk and not chunked.checkpoint_blocks and need(chunked) <= plain - 1
    assert need(replace(chunked, positions_per_chunk=chunked.positions_per_chunk + 1)) > plain - 1  # the largest
    checkpointed = cd.scorers.get("eap", checkpoint_blocks=True)
    tight = plan(need(checkpointed))
    assert tight.checkpoint_blocks and need(tight) <= need(checkpointed)
    bf16 = replace(checkpointed, contraction_dtype=torch.bfloat16, positions_per_chunk=1)
    assert plan(need(bf16)).contraction_dtype is torch.bfloat16
    windowed = plan(need(bf16) - 2**30)
    assert windowed.positions_per_pass and windowed.positions_per_pass < 4096 and need(windowed) <= need(bf16) - 2**30
    # the fused kernel does not soft-cap attention scores (Gemma 2): the default plans the eager attention
    capped = replace(shape, architecture="Gemma2ForCausalLM", attention_softcap=True)
    estimate = cd.estimate_memory(capped, "layer", batch_size=1, seq_len=4096, loss_positions=1024)
    assert not estimate.fused_attention
    assert estimate == cd.estimate_memory(capped, "layer", batch_size=1, seq_len=4096, loss_positions=1024,
                                          fused_attention=False)
    with pytest.raises(cd.UnsupportedModelError, match="soft-caps"):
        cd.estimate_memory(capped, "layer", batch_size=1, seq_len=4096, fused_attention=True)
    ig = cd.plan_scorer(shape, "head", seq_len=4096, max_memory=need(checkpointed), scorer="eap-ig-inputs",
                        loss_positions=1024)
    assert ig.name == "eap-ig-inputs" and ig.checkpoint_blocks
    with pytest.raises(cd.MemoryPlanError, match="does not fit"):
        plan(shape.parameter_bytes())
    with pytest.raises(cd.UnknownNameError, match="plan_scorer plans"):
        cd.plan_scorer(shape, "head", seq_len=16, max_memory=2**40, scorer="exact")


def test_the_pipeline_refuses_the_options_for_scorers_without_them():
    from circuitdiff.pipeline import PipelineConfig

    for options in ({"checkpoint_blocks": True}, {"positions_per_chunk": 64}, {"fused_attention": False}):
        with pytest.raises(cd.DataError, match="options of the eap and eap-ig scorers"):
            PipelineConfig(scorer="exact", device="cpu", **options).validate()
        scorer = PipelineConfig(scorer="eap-ig-inputs", device="cpu", **options).make_scorer()
        assert scorer.name == "eap-ig-inputs" and any(getattr(scorer, k) == v for k, v in options.items())
