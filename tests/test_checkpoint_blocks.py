"""Checkpointed blocks (``checkpoint_blocks=True``): the same scores, one block's activations kept.

Each block keeps only its input for the backward pass and reruns its forward there
(``Bridge.checkpointed_blocks``). The rerun fires every hook again, so the engine's hooks
must leave ``delta`` and their gradient hooks alone then; these tests pin that the scores
are those of the plain run for every architecture, level, scorer and intervention, that
the blocks really are rerun, and what the memory planner counts.
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from test_eap_correctness import make_data, reference_batches_for
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


@pytest.mark.parametrize("arch, level, scorer, intervention", list(_cases()))
def test_checkpointed_blocks_give_the_plain_runs_scores(get_model, arch, level, scorer, intervention):
    model = get_model(arch)
    plain = _scores(model, level, scorer, intervention)
    checkpointed = _scores(model, level, scorer, intervention, checkpoint_blocks=True)
    torch.testing.assert_close(checkpointed.per_sample, plain.per_sample, rtol=1e-6,
                               atol=1e-6 * plain.per_sample.abs().max().item())
    torch.testing.assert_close(checkpointed.objective_values, plain.objective_values)
    assert checkpointed.metadata["identity"]["fingerprint"] == plain.metadata["identity"]["fingerprint"]


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


def test_checkpoint_blocks_is_a_bool_and_not_part_of_the_identity():
    with pytest.raises(cd.ArgumentError, match="checkpoint_blocks must be True or False"):
        cd.scorers.get("eap", checkpoint_blocks="yes")
    with pytest.raises(cd.ArgumentError, match="checkpoint_blocks must be True or False"):
        cd.scorers.get("eap-ig-inputs", checkpoint_blocks=1)
    from circuitdiff.identity import describe_component

    assert "checkpoint_blocks" not in describe_component("scorer", cd.scorers.get("eap", checkpoint_blocks=True))["options"]


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
