"""Bad input to attribute() gets an error that names the cause and the fix."""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd


@pytest.fixture(scope="module")
def setup(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5, 6]], [[7], [8]], batch_size=1)
    return model, graph, batches


def test_patching_without_corrupted_prompts(setup):
    model, graph, batches = setup
    with pytest.raises(cd.DataError, match=r"needs corrupted prompts.*or use intervention='zero'"):
        cd.attribute(model, graph, batches, objective="answer_nll", intervention="patching", progress=False)


def test_empty_data(setup):
    model, graph, _ = setup
    with pytest.raises(cd.DataError, match="no batches given"):
        cd.attribute(model, graph, [], objective="answer_nll", progress=False)


def test_nan_objective_names_the_batch(setup):
    model, graph, batches = setup
    calls = []

    def flaky(logits, batch):
        calls.append(1)
        loss = cd.objectives.answer_nll()(logits, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(cd.ObjectiveError, match=r"NaN or inf in batch 1 \(samples \[0\]\)"):
        cd.attribute(model, graph, batches, objective=flaky, progress=False)


def test_misshapen_objective(setup):
    model, graph, batches = setup
    with pytest.raises(cd.ObjectiveError, match=r"shape \[batch\] = \(1,\)"):
        cd.attribute(model, graph, batches, objective=lambda logits, batch: logits.sum(), progress=False)


def test_unknown_names_list_the_valid_ones(setup):
    model, graph, batches = setup
    with pytest.raises(cd.UnknownNameError, match=r"unknown scorer 'eap-ig'; available: eap"):
        cd.attribute(model, graph, batches, objective="answer_nll", method="eap-ig", progress=False)
    with pytest.raises(cd.UnknownNameError, match="valid: zero, patching, mean, mean-positional"):
        cd.attribute(model, graph, batches, objective="answer_nll", intervention="resample", progress=False)


def test_mean_intervention_needs_reference_data(setup):
    model, graph, batches = setup
    with pytest.raises(cd.DataError, match="pass reference_batches"):
        cd.attribute(model, graph, batches, objective="answer_nll", intervention="mean", progress=False)


def test_mean_positional_needs_long_enough_reference(setup):
    model, graph, batches = setup
    short = cd.make_batches(model.tokenizer, [[1]], [[2]])
    with pytest.raises(cd.DataError, match="cover 1 positions but a sample has 3 tokens"):
        cd.attribute(model, graph, batches, objective="answer_nll", intervention="mean-positional",
                     reference_batches=short, progress=False)


def test_graph_of_another_model(setup):
    model, _, batches = setup
    with pytest.raises(cd.DataError, match="not built for this model"):
        cd.attribute(model, cd.AttributionGraph(2, 4), batches, objective="answer_nll", progress=False)


def test_token_ids_outside_the_vocabulary(setup):
    model, graph, _ = setup
    bad = [cd.Batch(torch.tensor([[1, 2, 999]]), labels=torch.tensor([[-100, 3, 4]]))]
    with pytest.raises(cd.DataError, match=r"token ids in \[1, 999\].*vocabulary has 40"):
        cd.attribute(model, graph, bad, objective="answer_nll", progress=False)


def test_batches_must_be_batch_objects(setup):
    model, graph, _ = setup
    with pytest.raises(cd.DataError, match="expected circuitdiff.Batch"):
        cd.attribute(model, graph, [torch.tensor([[1, 2]])], objective="answer_nll", progress=False)


def test_errors_share_a_base_class():
    for error in (cd.DataError, cd.ObjectiveError, cd.UnknownNameError, cd.UnsupportedModelError, cd.FileFormatError):
        assert issubclass(error, cd.CircuitDiffError)


def test_every_error_class_is_a_circuitdiff_error_and_arguments_are_value_errors():
    classes = [getattr(cd, name) for name in cd.errors.__all__]
    assert all(issubclass(c, cd.CircuitDiffError) for c in classes)
    assert issubclass(cd.ArgumentError, ValueError) and issubclass(cd.ArgumentTypeError, TypeError)
    assert issubclass(cd.UnknownNameError, cd.ArgumentError)
    assert set(cd.errors.__all__) <= set(cd.__all__)


def test_the_library_raises_no_bare_builtin_exceptions():
    """Every ``raise`` in src/ names a CircuitDiffError subclass (or re-raises); abstract methods may raise
    NotImplementedError, and a module's ``__getattr__`` AttributeError (Python's protocol for a missing name)."""
    import ast
    from pathlib import Path

    source = Path(cd.__file__).parent
    builtin = {name for name in dir(__import__("builtins")) if name.endswith(("Error", "Exception"))}
    found = []
    for path in sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text())
        protocol = {id(raised) for function in ast.walk(tree)
                    if isinstance(function, ast.FunctionDef) and function.name == "__getattr__"
                    for raised in ast.walk(function) if isinstance(raised, ast.Raise)
                    and getattr(getattr(raised.exc, "func", None), "id", None) == "AttributeError"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None and id(node) not in protocol:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(target, "id", None)
                if name in builtin - {"NotImplementedError"}:
                    found.append(f"{path.relative_to(source)}:{node.lineno} raises {name}")
    assert not found, found
