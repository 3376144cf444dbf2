"""Runtime shape checks of jaxtyping annotations (circuitdiff.typecheck), on in this test suite."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

import circuitdiff as cd
from circuitdiff import typecheck
from circuitdiff.errors import ShapeError
from circuitdiff.io import write_scores_file
from circuitdiff.typecheck import shape_checked


@shape_checked
def weighted(x: Float[Tensor, "batch n"], weights: Float[Tensor, "n"], scale: int = 1) -> Float[Tensor, "batch"]:
    return (x * weights).sum(-1) * scale


@shape_checked
def broken(x: Float[Tensor, "batch n"]) -> Float[Tensor, "batch"]:
    return x  # wrong rank: the return value should be [batch]


@pytest.fixture
def checks_off():
    previous = typecheck.is_enabled()
    typecheck.enable(False)
    yield
    typecheck.enable(previous)


@pytest.fixture(scope="module")
def graph():
    return cd.AttributionGraph(2, 2, level="layer")


def test_checks_are_on_in_the_test_suite():
    assert typecheck.is_enabled()


def test_a_correct_call_passes_and_other_arguments_are_not_checked():
    assert weighted(torch.ones(3, 4), torch.ones(4), scale=2).tolist() == [8.0] * 3
    assert weighted(torch.ones(3, 4), weights=torch.ones(4), scale=0.5).tolist() == [2.0] * 3  # `scale: int` unchecked


def test_sizes_must_agree_across_arguments():
    with pytest.raises(ShapeError) as info:
        weighted(torch.ones(3, 4), torch.ones(5))
    message = str(info.value)
    assert "test_typecheck.weighted: argument 'weights' must be Float[Tensor, 'n']; got float32 (5,)" in message
    assert message.endswith("(a dimension name stands for one size across them): argument 'x' float32 (3, 4).")


def test_wrong_rank_and_dtype_name_the_argument():
    with pytest.raises(ShapeError, match=r"argument 'x' must be Float\[Tensor, 'batch n'\]; got float32 \(3, 4, 1\)"):
        weighted(torch.ones(3, 4, 1), torch.ones(4))
    with pytest.raises(ShapeError, match=r"argument 'x' must be Float\[Tensor, 'batch n'\]; got int64 \(3, 4\)"):
        weighted(torch.ones(3, 4, dtype=torch.long), torch.ones(4))
    with pytest.raises(ShapeError, match=r"argument 'weights' must be .*; got list"):
        weighted(torch.ones(3, 4), weights=[1.0] * 4)


def test_the_return_value_is_checked():
    with pytest.raises(ShapeError, match=r"test_typecheck.broken: the return value must be Float\[Tensor, 'batch'\]; "
                                         r"got float32 \(3, 4\)\. Checked before it .*: argument 'x' float32 \(3, 4\)"):
        broken(torch.ones(3, 4))


def test_shape_errors_are_argument_errors():
    assert issubclass(ShapeError, cd.ArgumentError) and issubclass(ShapeError, ValueError)
    assert issubclass(ShapeError, cd.CircuitDiffError)


def test_disabled_checks_do_not_check(checks_off):
    assert not typecheck.is_enabled()
    assert tuple(broken(torch.ones(3, 4)).shape) == (3, 4)
    weighted(torch.ones(3, 4, dtype=torch.long), torch.ones(4, dtype=torch.long))


def test_edge_scores_fields(graph):
    n_src, n_recv = graph.n_sources, graph.n_receivers
    mean = torch.zeros(n_src, n_recv)
    cd.EdgeScores(graph, mean, torch.zeros(2, n_src, n_recv), torch.zeros(2))
    with pytest.raises(ShapeError, match=r"EdgeScores: field 'mean' must be Float\[Tensor, 'n_sources n_receivers'\]; "
                                         rf"got int64 \({n_src}, {n_recv}\)"):
        cd.EdgeScores(graph, mean.long(), None, torch.zeros(2))
    with pytest.raises(ShapeError, match=r"field 'objective_values' must be Float\[Tensor, 'n_samples'\]; "
                                         r"got float32 \(2, 1\)"):
        cd.EdgeScores(graph, mean, None, torch.zeros(2, 1))


def test_edge_scores_own_checks_come_first(graph):
    n_src, n_recv = graph.n_sources, graph.n_receivers
    with pytest.raises(cd.ArgumentError, match="mean has shape") as info:
        cd.EdgeScores(graph, torch.zeros(1, 1, dtype=torch.long), None, torch.zeros(2))
    assert not isinstance(info.value, ShapeError)
    with pytest.raises(cd.ArgumentError, match="per_sample has shape") as info:
        cd.EdgeScores(graph, torch.zeros(n_src, n_recv), torch.zeros(n_src, n_recv), torch.zeros(n_src))
    assert not isinstance(info.value, ShapeError)


def test_per_sample_with_two_dims(graph, tmp_path):
    n_src, n_recv = graph.n_sources, graph.n_receivers
    with pytest.raises(ShapeError, match=r"write_scores_file: argument 'per_sample' must be "
                                         rf"Float\[Tensor, 'n_samples n_sources n_receivers'\] \| None; got float32 "
                                         rf"\({n_src}, {n_recv}\)"):
        write_scores_file(tmp_path / "x.cdiff", graph=graph, mean=torch.zeros(n_src, n_recv),
                          per_sample=torch.zeros(n_src, n_recv), objective_values=torch.zeros(2),
                          metadata={}, sample_ids=("a", "b"))
    assert not (tmp_path / "x.cdiff").exists()


def test_mismatched_n_sources_between_arguments(graph, tmp_path):
    n_src, n_recv = graph.n_sources, graph.n_receivers
    with pytest.raises(ShapeError) as info:
        write_scores_file(tmp_path / "x.cdiff", graph=graph, mean=torch.zeros(n_src, n_recv),
                          per_sample=torch.zeros(2, n_src + 1, n_recv), objective_values=torch.zeros(2),
                          metadata={}, sample_ids=("a", "b"))
    message = str(info.value)
    assert f"argument 'per_sample' must be Float[Tensor, 'n_samples n_sources n_receivers'] | None; got float32 " \
           f"(2, {n_src + 1}, {n_recv})" in message
    assert f"argument 'mean' float32 ({n_src}, {n_recv})" in message


def test_objectives_and_batches():
    batch = cd.Batch(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[-100, 2, 3]]))
    objective = cd.objectives.answer_nll()
    assert objective(torch.randn(1, 3, 5), batch).shape == (1,)
    with pytest.raises(ShapeError, match=r"AnswerNLL.__call__: argument 'logits' must be .*; got int64 \(1, 3, 5\)"):
        objective(torch.ones(1, 3, 5, dtype=torch.long), batch)
    with pytest.raises(ShapeError, match=r"evaluate: argument 'clean_logits' .*; got float32 \(1, 4, 5\)"):
        cd.objectives.evaluate(cd.objectives.kl_to_clean(), torch.randn(1, 3, 5), batch, 0,
                               clean_logits=torch.randn(1, 4, 5))
    cd.Batch(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[True, True]]))  # bool masks are allowed
    with pytest.raises(ShapeError, match=r"Batch: field 'input_ids' must be Int\[Tensor, 'batch pos'\]; got uint8"):
        cd.Batch(torch.tensor([[1, 2]], dtype=torch.uint8))
