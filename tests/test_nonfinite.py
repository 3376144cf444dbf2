"""Scenario 4 of the trust issue: NaN and infinite numbers are refused or listed, never averaged in.

Before the finite guard, NaN gradients behind a finite loss gave NaN scores silently, and
one inf or NaN in ``compare`` still produced a report ("+inf%", information complexity
0/0, p = 1, samples dropped without a word).
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff.cli import main
from test_resume import CountingEAP

NAN_GRADIENT_SAMPLE = 1


def nll_with_nan_gradient(logits, batch):
    """answer_nll, plus a term that is 0 in value but NaN in gradient for one sample of each batch.

    ``sqrt`` has an infinite derivative at 0, and ``0 * inf`` is NaN: the loss stays
    finite, the gradient reaching the logits of that sample does not.
    """
    loss = cd.objectives.answer_nll()(logits, batch)
    zero = (logits[NAN_GRADIENT_SAMPLE] - logits[NAN_GRADIENT_SAMPLE].detach()).abs().sum()
    poisoned = torch.zeros_like(loss)
    poisoned[NAN_GRADIENT_SAMPLE] = 0.0 * torch.sqrt(zero)
    return loss + poisoned


def nll_with_nan_gradient_unless_x(logits, batch):
    """:func:`nll_with_nan_gradient`, except in the batch whose first sample is "x" (module level: resumable)."""
    if batch.sample_ids[0] == "x":
        return cd.objectives.answer_nll()(logits, batch)
    return nll_with_nan_gradient(logits, batch)


@pytest.fixture(scope="module")
def setup(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    batches = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], [[13, 14]] * 4,
                              batch_size=2, sample_ids=["a", "b", "c", "d"])
    return model, graph, batches


def test_nan_gradients_behind_a_finite_loss_are_an_error(setup):
    model, graph, batches = setup
    with pytest.raises(cd.NonFiniteError, match=r"batch 0, sample 1 \(id 'b'\): \d+ of \d+ scores are NaN or inf, on "
                                                r"edges into .* receivers .*nonfinite='drop'"):
        cd.attribute(model, graph, batches, objective=nll_with_nan_gradient, progress=False)


def test_dropped_samples_are_left_out_and_listed(setup, tmp_path):
    model, graph, batches = setup
    scores = cd.attribute(model, graph, batches, objective=nll_with_nan_gradient, progress=False, nonfinite="drop")
    clean = cd.attribute(model, graph, batches, objective="answer_nll", progress=False)
    assert scores.sample_ids == ("a", "c") and torch.isfinite(scores.per_sample).all()
    assert [(d["id"], d["batch"]) for d in scores.metadata["dropped"]] == [("b", 0), ("d", 1)]
    assert "NaN or inf" in scores.metadata["dropped"][0]["reason"]
    torch.testing.assert_close(scores.per_sample, clean.per_sample[[0, 2]], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.mean, clean.per_sample[[0, 2]].mean(0), rtol=1e-5, atol=1e-7)
    # resumed from shards, the drops are remembered
    first = cd.attribute(model, graph, batches, objective=nll_with_nan_gradient, progress=False, nonfinite="drop",
                         checkpoint_dir=tmp_path / "ckpt")
    again = cd.attribute(model, graph, batches, objective=nll_with_nan_gradient, progress=False, nonfinite="drop",
                         checkpoint_dir=tmp_path / "ckpt")
    assert again.metadata["dropped"] == first.metadata["dropped"] == scores.metadata["dropped"]
    assert again.sample_ids == ("a", "c")
    # and the comparison report lists them
    report = cd.compare(first, scores, n_resamples=100, breakdown=False).to_markdown()
    for side in ("base", "tuned"):
        assert f"- {side}: 2 left out (non-finite scores, dropped before scoring): b, d" in report


def test_a_run_stopped_by_non_finite_scores_resumes_with_drop(setup, tmp_path):
    model, graph, batches = setup
    ckpt, scorer = tmp_path / "ckpt", CountingEAP()
    finite_first = [batches[1], batches[0]]  # fine on batch 0, NaN gradients in batch 1
    finite_first[0] = cd.make_batches(model.tokenizer, [[1, 2, 3], [4, 5, 6]], [[13, 14]] * 2,
                                      sample_ids=["x", "y"])[0]

    with pytest.raises(cd.NonFiniteError, match="batch 1"):
        cd.attribute(model, graph, finite_first, objective=nll_with_nan_gradient_unless_x, method=scorer,
                     progress=False, checkpoint_dir=ckpt)
    assert scorer._scored == [0, 1] and (ckpt / "shard-00000.safetensors").is_file()
    scorer._scored.clear()
    dropped = cd.attribute(model, graph, finite_first, objective=nll_with_nan_gradient_unless_x, method=scorer,
                           progress=False, checkpoint_dir=ckpt, nonfinite="drop")
    assert scorer._scored == [1]  # batch 0 came from its shard
    assert dropped.sample_ids == ("x", "y", "a") and [d["id"] for d in dropped.metadata["dropped"]] == ["b"]
    # a shard that dropped samples is refused by a run that must not drop any
    with pytest.raises(cd.NonFiniteError, match="batch 1's stored shard left out 1 sample.*nonfinite='drop'"):
        cd.attribute(model, graph, finite_first, objective=nll_with_nan_gradient_unless_x, method=CountingEAP(),
                     progress=False, checkpoint_dir=ckpt)
    with pytest.raises(cd.ArgumentError, match="unknown non-finite policy .ignore.; valid: error, drop"):
        cd.attribute(model, graph, batches, objective="answer_nll", progress=False, nonfinite="ignore")


def scores_with(value: float, row: int = 3, n: int = 8) -> cd.EdgeScores:
    graph = cd.AttributionGraph(2, 2, level="layer")
    per_sample = torch.randn(n, graph.n_sources, graph.n_receivers, generator=torch.Generator().manual_seed(0))
    per_sample = per_sample * graph.edge_mask
    per_sample[row, 0, 0] = value
    return cd.EdgeScores(graph, per_sample.mean(0), per_sample, torch.zeros(n),
                         sample_ids=tuple(f"s{i}" for i in range(n)))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_compare_refuses_non_finite_scores(value):
    clean = scores_with(0.5)
    with pytest.raises(cd.NonFiniteError, match="tuned scores: sample 's3' \\(row 3\\) holds 1 NaN or infinite"):
        cd.compare(clean, scores_with(value))
    with pytest.raises(cd.NonFiniteError, match="base scores: sample 's3'"):
        cd.compare(scores_with(value), clean)
    with pytest.raises(cd.NonFiniteError, match="sample 's3'"):
        cd.metrics.summarize(scores_with(value))


def test_compare_scores_command_refuses_non_finite_files(tmp_path, capsys):
    scores_with(0.5).save(tmp_path / "base.cdiff")
    scores_with(float("nan")).save(tmp_path / "tuned.cdiff")
    assert main(["compare-scores", str(tmp_path / "base.cdiff"), str(tmp_path / "tuned.cdiff")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite" in err and "Traceback" not in err
