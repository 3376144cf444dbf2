"""Objectives: values against plain formulas, orientation, and misuse."""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff import IGNORE


@pytest.fixture
def batch():
    return cd.Batch(
        torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        labels=torch.tensor([[IGNORE, 3, 4, 9], [IGNORE, IGNORE, 8, IGNORE]]),
        contrast_labels=torch.tensor([[IGNORE, 5, 5, 5], [IGNORE, IGNORE, 1, IGNORE]]),
    )


def test_answer_nll_is_mean_cross_entropy_over_the_span(batch):
    logits = torch.randn(2, 4, 10)
    got = cd.objectives.answer_nll()(logits, batch)
    expected0 = torch.nn.functional.cross_entropy(logits[0, 1:4], torch.tensor([3, 4, 9]))
    expected1 = torch.nn.functional.cross_entropy(logits[1, 2:3], torch.tensor([8]))
    assert torch.allclose(got, torch.stack([expected0, expected1]))


def test_logit_diff_is_a_loss(batch):
    logits = torch.zeros(2, 4, 10)
    logits[0, 1:4, 3:5] = 2.0  # labels 3, 4 (and 9) vs contrast 5
    logits[0, 3, 9] = 2.0
    logits[1, 2, 1] = 3.0  # contrast wins in sample 1
    got = cd.objectives.logit_diff()(logits, batch)
    assert torch.allclose(got, torch.tensor([-2.0, 3.0]))


def test_kl_to_clean_is_zero_at_clean_and_positive_elsewhere(batch):
    logits = torch.randn(2, 4, 10)
    kl = cd.objectives.kl_to_clean()
    assert torch.allclose(kl(logits, batch, clean_logits=logits), torch.zeros(2), atol=1e-6)
    assert (kl(logits + torch.randn(2, 4, 10), batch, clean_logits=logits) > 0).all()
    with pytest.raises(cd.ObjectiveError, match="clean_logits"):
        kl(logits, batch)


def test_objectives_need_their_labels(batch):
    unlabelled = cd.Batch(batch.input_ids, batch.attention_mask)
    with pytest.raises(cd.DataError, match="answer_nll needs labels"):
        cd.objectives.answer_nll()(torch.randn(2, 4, 10), unlabelled)
    no_contrast = cd.Batch(batch.input_ids, batch.attention_mask, labels=batch.labels)
    with pytest.raises(cd.DataError, match="logit_diff needs contrast_labels"):
        cd.objectives.logit_diff()(torch.randn(2, 4, 10), no_contrast)
    empty_span = cd.Batch(batch.input_ids, batch.attention_mask,
                          labels=torch.tensor([[IGNORE, 3, 4, 9], [IGNORE] * 4]))
    with pytest.raises(cd.DataError, match=r"samples \[1\] have an empty loss span"):
        cd.objectives.answer_nll()(torch.randn(2, 4, 10), empty_span)
    with pytest.raises(cd.DataError, match=r"labels must be token ids in \[0, 8\)"):
        cd.objectives.answer_nll()(torch.randn(2, 4, 8), batch)


def test_resolve_by_name():
    assert isinstance(cd.objectives.resolve("answer_nll"), cd.objectives.AnswerNLL)
    with pytest.raises(cd.UnknownNameError, match="available: answer_nll, kl_to_clean, logit_diff"):
        cd.objectives.resolve("accuracy")


def test_custom_objective_runs_through_attribute(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5, 6]], [[7], [8]], batch_size=2)

    def last_logit(logits, batch):  # a user's own loss: minus the logit of token 0 at the last position
        return -logits[torch.arange(batch.size), batch.lengths - 1, 0]

    scores = cd.attribute(model, graph, batches, objective=last_logit, progress=False)
    assert scores.metadata["objective"] == "last_logit"
    with torch.no_grad():
        expected = last_logit(model(batches[0].input_ids), batches[0])
    assert torch.allclose(scores.objective_values, expected, atol=1e-5)
    assert scores.mean.abs().sum() > 0


def test_kl_to_clean_gives_zero_eap_scores(get_model):
    """The documented first-order property: KL's gradient vanishes at the clean point."""
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3]], [[7, 8]])
    scores = cd.attribute(model, graph, batches, objective="kl_to_clean", progress=False)
    assert scores.mean.abs().max() < 1e-6
