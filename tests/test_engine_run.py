"""The bound run (``graph.bind``): validated once, owns the hooks and the model's mode; scorer options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import circuitdiff as cd
from circuitdiff.engine import AttributionRun, Window, architectures
import tiny_models as tm
from test_eap_correctness import make_data


def test_bind_makes_a_run_of_this_model_graph_objective_and_intervention(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="head")
    run = graph.bind(model, objective="answer_nll", intervention="zero")
    assert isinstance(run, AttributionRun) and run is not graph.bind(model, objective="answer_nll")
    assert run.model is model and run.graph is graph and run.intervention.name == "zero"
    assert run.spec == cd.describe_model(model) and run.dtype == torch.float32
    batch = make_data(model)[0]
    assert run.new_scores(batch).shape == (batch.size, graph.n_sources, graph.n_receivers)
    assert run.new_delta(batch).shape == (batch.size, graph.n_sources, batch.input_ids.shape[1], run.spec.d_model)
    assert run.new_delta(batch, Window.over(slice(2, 4))).shape[2] == 2


def test_a_graph_of_another_model_is_refused_at_bind(get_model):
    other = cd.AttributionGraph.from_model(get_model("gpt2"), level="head")
    with pytest.raises(cd.DataError, match="was not built for this model"):
        other.bind(get_model("llama"), objective="answer_nll")


def test_bad_names_are_refused_at_bind(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    with pytest.raises(cd.UnknownNameError, match="unknown intervention 'zer0'; valid: zero, patching"):
        graph.bind(model, objective="answer_nll", intervention="zer0")
    with pytest.raises(cd.UnknownNameError):
        graph.bind(model, objective="answer_nl")


def test_the_model_is_validated_once_per_attribute_call(get_model, monkeypatch):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    calls = []
    real = architectures.describe_model

    def counting(m):
        calls.append(m)
        return real(m)

    for module in ("circuitdiff.engine.bridge", "circuitdiff.engine.architectures", "circuitdiff.models"):
        monkeypatch.setattr(f"{module}.describe_model", counting)
    cd.attribute(model, graph, make_data(model)[:1], objective="answer_nll", progress=False)
    assert len(calls) == 1


def test_hooked_removes_its_hooks_also_after_an_error(get_model):
    model = get_model("gpt2")
    run = cd.AttributionGraph.from_model(model, level="layer").bind(model, objective="answer_nll")
    fired = []

    def hook(x, hook):
        fired.append(hook.name)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), run.hooked([(run.bridge.input_hook, hook)]):
        model(make_data(model)[0].input_ids)
    assert fired == [run.bridge.input_hook]
    model(make_data(model)[0].input_ids)  # no hook left behind
    assert len(fired) == 1


def test_entering_a_run_freezes_parameters_and_restores_them(get_model):
    model = get_model("gpt2")
    run = cd.AttributionGraph.from_model(model, level="layer").bind(model, objective="answer_nll")
    before = [p.requires_grad for p in model.parameters()]
    model.train()
    try:
        with run:
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert model.training
    finally:
        model.eval()
    assert [p.requires_grad for p in model.parameters()] == before


def test_nested_runs_restore_the_outer_mode(get_model):
    model = get_model("gpt2")
    run = cd.AttributionGraph.from_model(model, level="layer").bind(model, objective="answer_nll")
    first = next(model.parameters())
    original = first.requires_grad
    first.requires_grad_(True)
    try:
        with run:
            with run:
                assert not first.requires_grad
            assert not first.requires_grad  # still inside the outer block
        assert first.requires_grad
    finally:
        first.requires_grad_(original)


def test_hook_names_are_the_bridges_own(get_model):
    model = get_model("qwen2")
    bridge = cd.AttributionGraph.from_model(model).bind(model, objective="answer_nll").bridge
    names = dict(model.hook_dict)
    for name in [bridge.input_hook, bridge.logits_input_hook, bridge.attention_values_hook(1),
                 bridge.mlp_output_hook(2), bridge.projection_hook(0, "k"), bridge.attention_input_hook(1),
                 bridge.mlp_input_hook(0), bridge.attention_output_hook(2)]:
        assert name in names, name
    assert bridge.projection_hook(1, "v") == "blocks.1.attn.v.hook_out"


def test_method_is_a_deprecated_alias_of_scorer(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    data = make_data(model)[:1]
    new = cd.attribute(model, graph, data, objective="answer_nll", scorer="eap", progress=False)
    with pytest.warns(DeprecationWarning, match="pass scorer= instead"):
        old = cd.attribute(model, graph, data, objective="answer_nll", method="eap", progress=False)
    assert torch.equal(new.per_sample, old.per_sample) and old.metadata["method"] == "eap"
    with pytest.raises(cd.ArgumentTypeError, match="scorer must be a scorer name"):
        cd.attribute(model, graph, data, objective="answer_nll", scorer=object(), progress=False)


def test_scorers_are_frozen_options_validated_at_construction():
    eap = cd.scorers.EAP(positions_per_pass=8)
    assert eap == cd.scorers.get("eap", positions_per_pass=8) != cd.scorers.EAP()
    with pytest.raises(dataclasses.FrozenInstanceError):
        eap.positions_per_pass = 16  # type: ignore[misc]
    with pytest.raises(cd.ArgumentError, match="eap: positions_per_pass"):
        cd.scorers.EAP(positions_per_pass=0)
    assert cd.scorers.get("exact", edges_per_forward=3) == cd.scorers.Exact(3)


class _OldStyleIntervention:
    """The 0.x protocol: fills a buffer in place."""

    name = "old"

    def prefill(self, hooks, batch, delta):
        return False


def test_an_intervention_with_the_old_protocol_is_refused_with_the_new_one(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    with pytest.raises(cd.ArgumentTypeError, match=r"return the replacement tensor from replacement\(run"):
        graph.bind(model, objective="answer_nll", intervention=_OldStyleIntervention())


class _Halves:
    """A custom intervention: half of every source's clean output (a tensor from replacement)."""

    name = "halves"

    def replacement(self, run, batch, window):
        return 0.5 * run.record_sources(batch.input_ids, batch.attention_mask, window)


def test_a_custom_intervention_returns_its_replacement(get_model):
    """Replacement 0.5 * clean: delta = -0.5 * clean, so the scores are half the zero-ablation ones."""
    model = get_model("llama", "float64")
    graph = cd.AttributionGraph.from_model(model, level="head")
    data = make_data(model)
    zero = cd.attribute(model, graph, data, objective="answer_nll", progress=False)
    halves = cd.attribute(model, graph, data, objective="answer_nll", intervention=_Halves(), progress=False)
    assert halves.metadata["intervention"] == "halves"
    torch.testing.assert_close(halves.per_sample, 0.5 * zero.per_sample, rtol=1e-6, atol=1e-9)


def test_faithfulness_and_acdc_work_through_a_given_run(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    data = make_data(model)[:1]
    run = graph.bind(model, objective="answer_nll", intervention="zero", progress=False)
    circuit = cd.circuits.top_n(cd.attribute(model, graph, data, objective="answer_nll", progress=False), 5)
    by_run = cd.evaluate_circuit(run, circuit, data)
    by_model = cd.evaluate_circuit(model, circuit, data, objective="answer_nll", progress=False)
    assert torch.equal(by_run.circuit_losses, by_model.circuit_losses)
    kept = cd.acdc(run, graph, data, threshold=0.05).circuit
    assert kept == cd.acdc(model, graph, data, objective="answer_nll", threshold=0.05, progress=False).circuit
    with pytest.raises(cd.ArgumentError, match="a run already has its objective"):
        cd.evaluate_circuit(run, circuit, data, objective="answer_nll")
    with pytest.raises(cd.ArgumentError, match="objective is required with a model"):
        cd.evaluate_circuit(model, circuit, data)
    other = cd.AttributionGraph.from_model(model, level="head").bind(model, objective="answer_nll")
    with pytest.raises(cd.DataError, match="bound to another graph"):
        cd.evaluate_circuit(other, circuit, data)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_the_sources_sum_to_the_residual_stream_the_logits_read(get_model, arch):
    """Every write into the residual stream is a source: input + all recorded sources (+ the attention output
    biases, which no source carries) is the final norm's input. Ties the source hooks (post-norm outputs, MoE
    blocks, z @ W_O) to the model, where the proofs read sources at the same hooks as the engine."""
    model = get_model(arch, "float64")
    graph = cd.AttributionGraph.from_model(model, level=tm.finest_level(arch))
    batch = make_data(model)[1]
    run = graph.bind(model, objective="answer_nll")
    recorded = run.record_sources(batch.input_ids, batch.attention_mask).sum(1)  # [batch, pos, d_model]
    kept = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(run.bridge.logits_input_hook,
                                                  lambda x, hook: kept.__setitem__("x", x))]):
        model(batch.input_ids, attention_mask=batch.attention_mask)
    biases = [block.attn.o.original_component.bias for block in model.blocks]
    expected = kept["x"] - sum(b for b in biases if b is not None)
    torch.testing.assert_close(recorded, expected, rtol=1e-9, atol=1e-9)
