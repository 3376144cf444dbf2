"""EAP in position windows (``positions_per_pass``): the same scores as one pass, less memory.

One-pass EAP is validated against finite differences in test_eap_correctness.py; here
every window size must reproduce it, for every architecture, level and intervention.
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff.engine import Window
from test_eap_correctness import eap_scores, make_data
from test_planner import planned_and_measured_peak


def _assert_windows_reproduce(model, level, intervention, windows):
    whole = eap_scores(model, level, intervention)
    assert whole.per_sample.abs().max() > 0
    for window in windows:
        windowed = eap_scores(model, level, intervention, positions_per_pass=window)
        torch.testing.assert_close(windowed.per_sample, whole.per_sample, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"positions_per_pass={window}: {m}")
        torch.testing.assert_close(windowed.objective_values, whole.objective_values, rtol=0, atol=0)


@pytest.mark.parametrize("level", ["head", "layer"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "mistral"])
def test_windows_reproduce_one_pass(get_model, arch, level):
    _assert_windows_reproduce(get_model(arch, "float64"), level, "zero", windows=(3,))  # a short last window


@pytest.mark.parametrize("intervention", ["patching", "mean", "mean-positional"])
def test_windows_reproduce_one_pass_for_every_intervention(get_model, intervention):
    _assert_windows_reproduce(get_model("llama", "float64"), "head", intervention, windows=(1, 3))


def test_window_wider_than_the_batch_is_one_pass(get_model):
    model = get_model("qwen2")
    whole = eap_scores(model, "head")
    wide = eap_scores(model, "head", positions_per_pass=100)
    assert torch.equal(wide.per_sample, whole.per_sample)


def test_each_window_scores_only_its_positions(get_model):
    """Windows [0, 4) and [4, 7) of a padded batch each contribute, and add up to the one-pass scores."""
    model = get_model("llama", "float64")
    graph = cd.AttributionGraph.from_model(model, level="head")
    batch = make_data(model)[0]
    scorer = cd.scorers.get("eap")
    parts = []
    with graph.bind(model, objective="answer_nll", intervention="zero") as run:
        for window in (slice(0, 4), slice(4, 7)):
            scores = run.new_scores(batch)
            scorer._add_window(run, batch, 0, Window.over(window), scores)
            parts.append(scores)
        whole, _ = scorer.score_batch(run, batch, 0)
    assert parts[0].abs().max() > 0 and parts[1].abs().max() > 0
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "64"])
def test_bad_positions_per_pass_is_refused(bad):
    with pytest.raises(ValueError, match="positions_per_pass must be a positive integer"):
        cd.scorers.get("eap", positions_per_pass=bad)


@pytest.mark.parametrize("bad", [slice(None), slice(3, 3), slice(0, 8, 2), slice(-1, 4)])
def test_bad_window_is_refused(bad):
    with pytest.raises(ValueError, match="slice\\(start, stop\\)"):
        Window.over(bad)


class _FullLengthMean:
    """A custom intervention written for one pass: it fills every position, not the window."""

    name = "full-length-mean"

    def replacement(self, run, batch, window):
        mask = batch.attention_mask.to(run.dtype)[:, None, :, None]
        return torch.ones(run.graph.n_sources, run.spec.d_model, dtype=run.dtype)[None, :, None, :] * mask


def test_intervention_that_ignores_the_window_is_refused(get_model):
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)
    cd.attribute(model, graph, batches, objective="answer_nll", intervention=_FullLengthMean(), progress=False)
    with pytest.raises(cd.DataError, match="window.of\\(batch\\)"):
        cd.attribute(model, graph, batches, objective="answer_nll", intervention=_FullLengthMean(),
                     method=cd.scorers.get("eap", positions_per_pass=2), progress=False)


def test_resuming_with_other_windows_reuses_the_shards(get_model, tmp_path):
    """Windows change memory, not the scores: a run resumed with another window size reads its shards."""
    model = get_model("gpt2")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = make_data(model)
    first = cd.attribute(model, graph, batches, objective="answer_nll", progress=False, checkpoint_dir=tmp_path,
                         method=cd.scorers.get("eap", positions_per_pass=2))
    again = cd.attribute(model, graph, batches, objective="answer_nll", progress=False, checkpoint_dir=tmp_path,
                         method=cd.scorers.get("eap", positions_per_pass=3))
    assert torch.equal(first.per_sample, again.per_sample)  # read from the shards, not rescored
    with pytest.raises(cd.IdentityMismatchError, match="contraction_dtype"):  # this one changes the scores
        cd.attribute(model, graph, batches, objective="answer_nll", progress=False, checkpoint_dir=tmp_path,
                     method=cd.scorers.get("eap", positions_per_pass=2, contraction_dtype=torch.bfloat16))


def test_windows_lower_the_measured_peak_as_planned():
    """CPU profiler peaks of one batch of 128 tokens, head level, one pass vs windows of 16 positions."""
    planned, measured = planned_and_measured_peak("llama-256", "head", 1, 128)
    planned_windows, measured_windows = planned_and_measured_peak("llama-256", "head", 1, 128, positions_per_pass=16)
    assert measured - measured_windows > 0.5 * (planned - planned_windows) > 0
