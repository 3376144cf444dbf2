"""Scenario 1 of the trust issue: comparisons pair samples by id, never by position.

Before sample ids, ``compare`` paired the i-th base sample with the i-th tuned sample
whenever the counts matched: the same prompts in another order gave intensity p = 0.79
instead of 0.0005, and disjoint prompts were paired without a word.
"""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff.cli import main

GRAPH = cd.AttributionGraph(2, 2, level="head")


def scores(per_sample: torch.Tensor, ids: list[str], **metadata) -> cd.EdgeScores:
    per_sample = per_sample * GRAPH.edge_mask
    return cd.EdgeScores(GRAPH, per_sample.mean(0), per_sample, torch.zeros(per_sample.shape[0]),
                         metadata={"sample_ids": "given", **metadata}, sample_ids=tuple(ids))


def paired_models(n: int = 40, seed: int = 0) -> tuple[cd.EdgeScores, torch.Tensor, list[str]]:
    """Base scores whose per-sample scale varies a lot, and tuned = 1.05 x base: only pairing sees the change."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(n, 1, 1, generator=g))
    base = scale * torch.randn(n, GRAPH.n_sources, GRAPH.n_receivers, generator=g)
    ids = [f"q{i}" for i in range(n)]
    return scores(base, ids), 1.05 * base, ids


def test_the_same_ids_in_another_order_pair_by_id():
    base, tuned_values, ids = paired_models()
    in_order = cd.compare(base, scores(tuned_values, ids), n_resamples=300, breakdown=False)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    shuffled = scores(tuned_values[order], [ids[i] for i in order.tolist()])
    reordered = cd.compare(base, shuffled, n_resamples=300, breakdown=False)
    row, same = in_order.get("intensity"), reordered.get("intensity")
    assert row.p_value < 1e-6 and row.percent_change == pytest.approx(5.0, abs=1e-4)  # float32 scores
    assert same.p_value == pytest.approx(row.p_value) and same.statistic == row.statistic
    assert reordered.get("diversity").base == pytest.approx(in_order.get("diversity").base)
    assert reordered.sample_ids["paired"] == ids and reordered.dropped == []
    # the pairing by position the old code did loses the effect entirely
    positional = cd.compare(base, scores(tuned_values[order], ids), n_resamples=300, breakdown=False)
    assert positional.get("intensity").p_value > 0.01


def test_partial_overlap_pairs_the_common_ids_and_reports_the_rest():
    base, tuned_values, ids = paired_models(n=30)
    tuned = scores(tuned_values[5:], ids[5:])
    extra = scores(torch.cat([tuned_values[5:], tuned_values[:2]]), ids[5:] + ["new-a", "new-b"])
    for other in (tuned, extra):
        result = cd.compare(base, other, n_resamples=200, breakdown=False)
        assert result.settings["n_base"] == result.settings["n_tuned"] == 25
        assert result.sample_ids["paired"] == ids[5:]
    dropped = result.dropped_samples()
    assert {(d["side"], d["id"]) for d in dropped} == {("base", i) for i in ids[:5]} | {("tuned", "new-a"),
                                                                                         ("tuned", "new-b")}
    report = result.to_markdown()
    assert "paired by sample id: 25 pairs" in report
    assert "- base: 5 left out (no sample with this id in tuned): q0, q1, q2, q3, q4" in report
    assert "- tuned: 2 left out (no sample with this id in base): new-a, new-b" in report
    assert result.to_dict()["dropped"] == dropped


def test_ids_given_to_edge_scores_pair_by_id_after_a_round_trip(tmp_path):
    base, tuned_values, ids = paired_models(n=12)
    per_sample = base.per_sample
    plain = cd.EdgeScores(GRAPH, per_sample.mean(0), per_sample, torch.zeros(12), sample_ids=ids)
    tuned = cd.EdgeScores(GRAPH, tuned_values[2:].mean(0), tuned_values[2:], torch.zeros(10), sample_ids=ids[2:])
    assert plain.metadata["sample_ids"] == "given"
    plain.save(tmp_path / "b.cdiff")
    tuned.save(tmp_path / "t.cdiff")
    result = cd.compare(cd.EdgeScores.load(tmp_path / "b.cdiff"), cd.EdgeScores.load(tmp_path / "t.cdiff"),
                        n_resamples=100, breakdown=False)
    assert result.settings["pairing"] == "paired by sample id: 10 pairs"
    assert [d["id"] for d in result.dropped_samples()] == ["q0", "q1"]


def test_disjoint_ids_are_refused_unless_unpaired():
    base, tuned_values, _ = paired_models(n=12)
    other = scores(tuned_values, [f"other{i}" for i in range(12)])
    with pytest.raises(cd.DataError, match="share no sample id.*paired=False"):
        cd.compare(base, other)
    with pytest.raises(cd.DataError, match="share no sample id"):
        cd.compare(base, other, paired=True)
    result = cd.compare(base, other, paired=False, n_resamples=200, breakdown=False)
    assert not result.paired and result.get("intensity").test == "mann-whitney u"
    with pytest.raises(cd.DataError, match="share only the sample id 'q0'"):
        cd.compare(base, scores(tuned_values[:2], ["q0", "zz"]))


def test_duplicate_ids_are_refused():
    per_sample = torch.randn(3, GRAPH.n_sources, GRAPH.n_receivers)
    with pytest.raises(cd.DataError, match="must be unique; 1 appear more than once, e.g. \\['a'\\]"):
        scores(per_sample, ["a", "b", "a"])
    with pytest.raises(cd.DataError, match="3 entries for 2 samples"):
        scores(per_sample[:2], ["a", "b", "c"])
    with pytest.raises(cd.DataError, match="must be unique"):
        cd.make_batches(None, [[1, 2], [3, 4]], sample_ids=["x", "x"])


def test_attribution_keeps_the_ids_and_reordered_prompts_pair_up(get_model):
    model = get_model("llama")
    graph = cd.AttributionGraph.from_model(model, level="layer")
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15, 16, 17]]
    answers = [[20, 21], [22], [23, 24], [25, 26], [27]]

    def run(order, **kwargs):
        batches = cd.make_batches(model.tokenizer, [prompts[i] for i in order], [answers[i] for i in order],
                                  batch_size=2, **kwargs)
        return cd.attribute(model, graph, batches, objective="answer_nll", progress=False)

    forward, backward = run(range(5)), run([4, 3, 2, 1, 0])
    assert forward.sample_ids == tuple(reversed(backward.sample_ids))  # content ids follow the prompts
    assert forward.metadata["sample_ids"] == "given" and forward.sample_ids[0].startswith("p-")
    result = cd.compare(forward, backward, n_resamples=100, breakdown=False)
    assert result.get("intensity").difference == pytest.approx(0.0, abs=1e-7)  # each sample met itself
    named = run(range(5), sample_ids=[f"q{i}" for i in range(5)])
    assert named.sample_ids == ("q0", "q1", "q2", "q3", "q4")
    same_prompt_twice = cd.make_batches(model.tokenizer, [[1, 2], [1, 2]], [[3], [4]])
    assert same_prompt_twice[0].sample_ids[1] == same_prompt_twice[0].sample_ids[0] + "#2"


def test_compare_scores_command_pairs_by_id(tmp_path, capsys):
    base, tuned_values, ids = paired_models()
    order = list(reversed(range(len(ids))))
    base.save(tmp_path / "base.cdiff")
    scores(tuned_values[order], [ids[i] for i in order]).save(tmp_path / "tuned.cdiff")
    assert main(["compare-scores", str(tmp_path / "base.cdiff"), str(tmp_path / "tuned.cdiff")]) == 0
    report = capsys.readouterr().out
    assert "paired by sample id: 40 pairs" in report and "| intensity |" in report and "+5.0%" in report


def test_concatenate_keeps_ids_and_renumbers_positions():
    per_sample = torch.randn(5, GRAPH.n_sources, GRAPH.n_receivers, generator=torch.Generator().manual_seed(3))
    per_sample = per_sample * GRAPH.edge_mask

    def part(rows, ids=None, dropped=()):
        values = per_sample[rows]
        return cd.EdgeScores(GRAPH, values.mean(0), values, torch.zeros(len(rows)), sample_ids=ids,
                             metadata={"dropped": [{"id": d, "reason": "non-finite"} for d in dropped],
                                       "identity": {"fingerprint": f"f{rows[0]}"}})

    joined = cd.EdgeScores.concatenate([part([0, 1], ["a", "b"], ["x"]), part([2, 3, 4], ["c", "d", "e"], ["y"])])
    assert joined.sample_ids == ("a", "b", "c", "d", "e") and torch.equal(joined.per_sample, per_sample)
    torch.testing.assert_close(joined.mean, per_sample.mean(0))
    assert [d["id"] for d in joined.metadata["dropped"]] == ["x", "y"]
    assert joined.metadata["identity"] == {"parts": ["f0", "f2"]} and joined.metadata["n_samples"] == 5
    positional = cd.EdgeScores.concatenate([part([0, 1]), part([2, 3, 4])])
    assert positional.sample_ids == ("0", "1", "2", "3", "4") and positional.metadata["sample_ids"] == "position"
    with pytest.raises(cd.ArgumentError, match="parts with sample ids and parts named by row position"):
        cd.EdgeScores.concatenate([part([0, 1], ["a", "b"]), part([2, 3])])
    with pytest.raises(cd.DataError, match="must be unique"):
        cd.EdgeScores.concatenate([part([0, 1], ["a", "b"]), part([2, 3], ["b", "c"])])


def test_scores_of_different_scorers_are_refused():
    base, tuned_values, ids = paired_models(n=8)
    for key, other in (("method", "exact"), ("intervention", "patching"), ("objective", "logit_diff")):
        tuned = scores(tuned_values, ids, **{key: other})
        with pytest.raises(cd.DataError, match=f"tuned with '{other}'.*do not compare edge by edge"):
            cd.compare(scores(base.per_sample, ids, method="eap", intervention="zero", objective="answer_nll"), tuned)
