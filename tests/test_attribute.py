"""attribute(): what a run records and shows."""

from __future__ import annotations

import torch

import circuitdiff as cd


def test_metadata_describes_the_run(get_model):
    model = get_model("neox")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3]] * 3, [[4, 5]] * 3, batch_size=2)
    scores = cd.attribute(model, graph, batches, objective="answer_nll", intervention="zero", progress=False)
    meta = scores.metadata
    assert meta["method"] == "eap" and meta["intervention"] == "zero" and meta["objective"] == "answer_nll"
    assert meta["level"] == "layer" and meta["n_samples"] == 3 == scores.n_samples
    assert meta["architecture"] == "GPTNeoXForCausalLM"
    assert set(meta["versions"]) == {"circuitdiff", "torch", "transformer-lens", "transformers"}
    assert scores.per_sample.shape == (3, graph.n_sources, graph.n_receivers)


def test_progress_bar_on_stderr(get_model, capsys):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2]] * 4, [[3]] * 4, batch_size=2)
    cd.attribute(model, graph, batches, objective="answer_nll")
    err = capsys.readouterr().err
    assert "eap (layer level)" in err and "2/2" in err
    cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    assert capsys.readouterr().err == ""


def test_generator_of_batches_is_accepted(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2]] * 4, [[3]] * 4, batch_size=2)
    from_list = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    from_generator = cd.attribute(model, graph, (b for b in batches), objective="answer_nll", progress=False)
    assert torch.equal(from_list.mean, from_generator.mean)


def test_model_is_unchanged_after_a_patching_run(get_model):
    """The corrupted pass stops early from inside a hook; nothing may be left behind."""
    model = get_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids)
    graph = cd.AttributionGraph.from_model(model, level="head")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3]], [[4, 5]], corrupted_prompts=[[6, 7, 8]])
    cd.attribute(model, graph, batches, objective="answer_nll", intervention="patching", progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert all(not hook.fwd_hooks and not hook.bwd_hooks for hook in model.hook_dict.values())
