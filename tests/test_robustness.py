"""Scorer robustness: the verdict flags a planted sign flip between two scorers and passes a planted agreement."""

from __future__ import annotations

import json

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.robustness import (EXACT_EDGE_LIMIT, check_scorer_robustness, choose_reference, no_reference_reason,
                                    reference_cost, scorer_robustness, select_batches, subsample)

GRAPH = cd.AttributionGraph(2, 2, level="head")
N = 24


def scores(values: torch.Tensor, scorer: str, ids: list[str] | None = None) -> cd.EdgeScores:
    values = values * GRAPH.edge_mask
    ids = ids or [f"q{i}" for i in range(values.shape[0])]
    return cd.EdgeScores(GRAPH, values.mean(0), values, torch.zeros(values.shape[0]),
                         metadata={"method": scorer, "intervention": "zero", "objective": "answer_nll"},
                         sample_ids=tuple(ids))


def base_values(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, GRAPH.n_sources, GRAPH.n_receivers, generator=g) + 0.5


def noisy(values: torch.Tensor, factor: float, seed: int) -> torch.Tensor:
    """``values`` scaled by ``factor`` with 2% multiplicative noise: a clear change of intensity."""
    g = torch.Generator().manual_seed(seed)
    return values * factor * (1 + 0.02 * torch.randn(values.shape, generator=g))


def check(primary_factor: float, reference_factor: float | torch.Tensor) -> cd.robustness.Robustness:
    """The headline: tuned = primary_factor x base on 24 samples; the reference: 16 of them, its own factor(s)."""
    b = base_values(0)
    r = base_values(1)[:16]
    ids = [f"q{i}" for i in range(16)]
    if isinstance(reference_factor, torch.Tensor):  # one factor per sample, no noise
        tuned_reference = r * reference_factor[:, None, None]
    else:
        tuned_reference = noisy(r, reference_factor, 3)
    return scorer_robustness(scores(b, "eap"), scores(noisy(b, primary_factor, 2), "eap"),
                             scores(r, "exact", ids), scores(tuned_reference, "exact", ids), n_resamples=300)


def test_planted_agreement_is_robust():
    result = check(1.3, 1.2)
    verdict = result.verdict("intensity")
    assert verdict.verdict == "robust" and verdict.reason == "exact also finds it up"
    assert verdict.headline.direction == verdict.primary.direction == verdict.reference.direction == "up"
    assert (verdict.headline.n, verdict.primary.n, verdict.reference.n) == (N, 16, 16)
    assert result.sample_ids == [f"q{i}" for i in range(16)]  # judged on the reference's samples only
    assert result.comparisons["primary"].settings["n_base"] == 16


def test_planted_sign_flip_is_scorer_dependent():
    verdict = check(1.3, 0.7).verdict("intensity")
    assert verdict.verdict == "scorer-dependent"
    assert verdict.reason == "opposite directions (eap up, exact down)"
    assert verdict.headline.row.percent_change > 20 and verdict.reference.row.percent_change < -20


def test_a_change_only_the_reference_sees_is_scorer_dependent():
    r, ids = base_values(1)[:16], [f"q{i}" for i in range(16)]
    # the headline: tuned unrelated to base sample by sample, no systematic change
    verdict = scorer_robustness(scores(base_values(0), "eap"), scores(base_values(5), "eap"), scores(r, "exact", ids),
                                scores(noisy(r, 1.3, 3), "exact", ids), n_resamples=300).verdict("intensity")
    assert verdict.headline.direction == "no clear change"
    assert verdict.verdict == "scorer-dependent"
    assert verdict.reason == f"only exact finds a change (up, on 16 samples); eap does not on {N}"


def test_an_unclear_reference_decides_by_the_sign_of_its_estimate():
    """The reference's CI spans 0: agreeing in sign is inconclusive, the other sign is scorer-dependent."""
    same_sign = check(1.3, torch.tensor([1.3, 0.75] * 8))  # mean change about +2.5%, widely spread
    verdict = same_sign.verdict("intensity")
    assert verdict.reference.direction == "no clear change" and verdict.reference.row.percent_change > 0
    assert verdict.verdict == "inconclusive"
    assert verdict.reason.startswith("exact agrees in sign (+") and verdict.reason.endswith("its CI spans 0 on 16 samples")
    other_sign = check(1.3, torch.tensor([1.25, 0.7] * 8)).verdict("intensity")  # about -2.5%
    assert other_sign.reference.direction == "no clear change" and other_sign.reference.row.percent_change < 0
    assert other_sign.verdict == "scorer-dependent"
    assert other_sign.reason.startswith("exact's estimate goes the other way (-")


def test_no_change_under_either_scorer_is_inconclusive():
    b, r = base_values(0), base_values(1)[:16]
    ids = [f"q{i}" for i in range(16)]
    # tuned = base with independent noise of the same size: no systematic change
    result = scorer_robustness(scores(b, "eap"), scores(base_values(5), "eap"), scores(r, "exact", ids),
                               scores(base_values(6)[:16], "exact", ids), n_resamples=300)
    verdict = result.verdict("intensity")
    assert verdict.verdict == "inconclusive" and verdict.reason == "neither scorer finds a clear change"


def test_a_subsample_against_the_headline_is_named():
    """The headline goes up over all samples, but the 16 re-scored ones go down under the primary scorer too."""
    b = base_values(0)
    factors = torch.tensor([0.9] * 16 + [2.0] * (N - 16))
    primary_tuned = b * factors[:, None, None]
    ids = [f"q{i}" for i in range(16)]
    result = scorer_robustness(scores(b, "eap"), scores(primary_tuned, "eap"), scores(b[:16], "exact", ids),
                               scores(noisy(b[:16], 1.2, 3), "exact", ids), n_resamples=300)
    verdict = result.verdict("intensity")
    assert verdict.headline.direction == "up" and verdict.primary.direction == "down"
    assert verdict.verdict == "robust"
    assert verdict.reason == ("exact also finds it up; on the subsample eap itself goes the other way (-10.0%), so "
                              "the subsample may not represent the full sample")


def test_agreement_per_model_is_on_the_subsample():
    b = base_values(0)
    ids = [f"q{i}" for i in range(16)]
    same = scorer_robustness(scores(b, "eap"), scores(1.1 * b, "eap"), scores(b[:16], "exact", ids),
                             scores(1.1 * b[:16], "exact", ids), n_resamples=200)
    assert same.agreement["base"].pearson == pytest.approx(1.0) and same.agreement["tuned"].sign_agreement == 1.0
    flipped = scorer_robustness(scores(b, "eap"), scores(1.1 * b, "eap"), scores(-b[:16], "exact", ids),
                                scores(-1.1 * b[:16], "exact", ids), n_resamples=200)
    assert flipped.agreement["base"].pearson == pytest.approx(-1.0) and flipped.agreement["base"].sign_agreement == 0


def test_compare_with_reference_scores_reports_the_verdicts():
    b, r = base_values(0), base_values(1)[:16]
    ids = [f"q{i}" for i in range(16)]
    result = cd.compare(scores(b, "eap"), scores(noisy(b, 1.3, 2), "eap"), n_resamples=200, breakdown=False,
                        reference_scores=(scores(r, "exact", ids), scores(noisy(r, 0.7, 3), "exact", ids)))
    assert result.robustness is not None and result.robustness.verdict("intensity").verdict == "scorer-dependent"
    markdown = result.to_markdown()
    assert "**Scorer robustness**" in markdown and "eap vs exact on 16 paired samples" in markdown
    assert "| metric | eap, all 24 | eap, subsample | exact, subsample | verdict |" in markdown
    assert "| intensity | up, +" in markdown and "**scorer-dependent**: opposite directions" in markdown
    assert "The subsample has 16 samples (fewer than 30)" in markdown
    data = json.loads(result.to_json())
    first = data["robustness"]["verdicts"][0]
    assert first["metric"] == "intensity" and first["headline"]["n"] == 24 and first["reference"]["direction"] == "down"
    assert cd.compare(scores(b, "eap"), scores(b, "eap"), n_resamples=50, breakdown=False).robustness is None


def test_bad_reference_scores_are_refused():
    b = base_values(0)
    with pytest.raises(cd.DataError, match="made with the comparison's own scorer 'eap'"):
        scorer_robustness(scores(b, "eap"), scores(b, "eap"), scores(b, "eap"), scores(b, "eap"))
    other = cd.AttributionGraph(2, 2, level="layer")
    coarse = cd.EdgeScores(other, torch.zeros(other.n_sources, other.n_receivers),
                           torch.zeros(N, other.n_sources, other.n_receivers), torch.zeros(N),
                           metadata={"method": "exact", "intervention": "zero", "objective": "answer_nll"},
                           sample_ids=tuple(f"q{i}" for i in range(N)))
    with pytest.raises(cd.DataError, match="on another graph"):
        scorer_robustness(scores(b, "eap"), scores(b, "eap"), coarse, coarse)
    patched = scores(b, "exact")
    patched.metadata["intervention"] = "patching"
    with pytest.raises(cd.DataError, match="intervention 'patching'"):
        scorer_robustness(scores(b, "eap"), scores(b, "eap"), patched, patched)
    with pytest.raises(cd.ArgumentTypeError, match="reference_scores must be a pair"):
        cd.compare(scores(b, "eap"), scores(b, "eap"), reference_scores=scores(b, "exact"))


def test_subsample_is_seeded_and_paired():
    b, t = scores(base_values(0), "eap"), scores(base_values(1)[4:], "eap", [f"q{i}" for i in range(4, N)])
    first, again = subsample(b, t, 8, seed=3), subsample(b, t, 8, seed=3)
    assert first == again and len(first) == 8 and len(set(first)) == 8
    assert set(first) <= {f"q{i}" for i in range(4, N)}  # only ids on both sides
    assert subsample(b, t, 8, seed=4) != first
    assert subsample(b, t, 100) == [f"q{i}" for i in range(4, N)]  # fewer than asked: all of them
    with pytest.raises(cd.ArgumentError, match="n >= 2"):
        subsample(b, t, 1)


def test_the_reference_is_chosen_by_cost():
    assert choose_reference(cd.AttributionGraph(4, 4, level="layer"), "eap") == "exact"
    small = cd.AttributionGraph(4, 4, level="head")
    assert small.n_edges <= EXACT_EDGE_LIMIT and choose_reference(small, "eap") == "exact"
    large = cd.AttributionGraph(32, 32, level="head")  # a 7B head-level graph: 1.6M edges
    assert choose_reference(large, "eap") == "eap-ig-inputs"
    assert choose_reference(large.layer_level(), "eap") == "exact"
    assert choose_reference(small, "exact") is None
    text = reference_cost(small, "exact", 16, "eap", 200)
    assert f"{2 * 16 * (small.n_edges + 1):,} forward-pass equivalents" in text
    assert f"({2 * 16 * (small.n_edges + 1) / (2 * 200 * 3):.1f}x the eap run over 200 samples)" in text
    assert "about 480 forward-pass" in reference_cost(large, "eap-ig-inputs", 16)  # 2 x 16 x (3 x 5 steps)


def test_check_scorer_robustness_rescores_both_models(tmp_path):
    """End to end on two tiny random Llamas: exact re-scoring of a subsample, primary EAP."""
    models = {side: cd.load_model(tm.write_checkpoint("llama", tmp_path / side, seed=seed), device="cpu")
              for side, seed in (("base", 0), ("tuned", 1))}
    graph = cd.AttributionGraph.from_model(models["base"], level="layer")
    prompts = [[1 + (3 * i + k) % 20 for k in range(5)] for i in range(6)]
    answers = [[2 + (5 * i + k) % 20 for k in range(3)] for i in range(6)]
    batches = cd.make_batches(models["base"].tokenizer, prompts, answers, batch_size=4,
                              sample_ids=[f"q{i}" for i in range(6)])
    primary = {side: cd.attribute(m, graph, batches, objective="answer_nll", progress=False)
               for side, m in models.items()}
    lines = []
    result = check_scorer_robustness(models["base"], models["tuned"], batches, batches, primary["base"],
                                     primary["tuned"], objective="answer_nll", n_samples=4, seed=0, progress=False,
                                     log=lines.append, n_resamples=100)
    assert result.primary == "eap" and result.reference == "exact" and len(result.sample_ids) == 4
    assert lines and lines[0].startswith("Robustness check: exact on 4 paired samples")
    picked = select_batches(batches, result.sample_ids)
    exact = cd.attribute(models["base"], graph, picked, objective="answer_nll", scorer="exact", progress=False)
    # the reference comparison is the exact scores of those samples, computed independently here
    expected = cd.compare(exact, exact, n_resamples=10, breakdown=False, edge_tests=False).per_sample["base"]
    assert result.comparisons["reference"].per_sample["base"]["intensity"] == pytest.approx(expected["intensity"])
    with pytest.raises(cd.DataError, match="exact ablation, the reference itself"):
        check_scorer_robustness(models["base"], models["tuned"], batches, batches, exact, exact,
                                objective="answer_nll", log=lines.append)


def test_compare_scores_command_takes_reference_scores(tmp_path, capsys):
    from circuitdiff.cli import main

    b, r = base_values(0), base_values(1)[:16]
    ids = [f"q{i}" for i in range(16)]
    files = {"base": scores(b, "eap"), "tuned": scores(noisy(b, 1.3, 2), "eap"),
             "base.ref": scores(r, "exact", ids), "tuned.ref": scores(noisy(r, 0.7, 3), "exact", ids)}
    for name, value in files.items():
        value.save(tmp_path / f"{name}.cdiff")
    path = lambda name: str(tmp_path / f"{name}.cdiff")  # noqa: E731
    assert main(["compare-scores", path("base"), path("tuned"), "--reference-scores", path("base.ref"),
                 path("tuned.ref"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "**scorer-dependent**: opposite directions (eap up, exact down)" in printed
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["robustness"]["reference"] == "exact" and len(saved["robustness"]["sample_ids"]) == 16


def test_compare_passes_its_settings_and_its_compared_graph_to_the_check():
    b, r = base_values(0), base_values(1)[:16]
    ids = [f"q{i}" for i in range(16)]
    reference = (scores(r, "exact", ids), scores(noisy(r, 1.2, 3), "exact", ids))
    result = cd.compare(scores(b, "eap"), scores(noisy(b, 1.3, 2), "eap"), n_resamples=100, breakdown=False, bins=50,
                        top_k=3, reference_scores=reference)
    assert all(c.bins == 50 and c.settings["top_k"] == 3 for c in result.robustness.comparisons.values())
    # the headline of the check is the comparison's own row
    assert result.robustness.verdict("intensity").headline.row is result.get("intensity")
    # coarsen: a head-level and a layer-level side are compared at layer level, and so is the check
    layer = GRAPH.layer_level()

    def layer_scores(values: torch.Tensor, scorer: str, names: list[str]) -> cd.EdgeScores:
        values = values * layer.edge_mask
        return cd.EdgeScores(layer, values.mean(0), values, torch.zeros(values.shape[0]), sample_ids=tuple(names),
                             metadata={"method": scorer, "intervention": "zero", "objective": "answer_nll"})

    all_ids = [f"q{i}" for i in range(N)]
    g = torch.Generator().manual_seed(4)
    tuned_layer = layer_scores(torch.rand(N, layer.n_sources, layer.n_receivers, generator=g) + 2, "eap", all_ids)
    coarse_reference = tuple(layer_scores(torch.rand(16, layer.n_sources, layer.n_receivers, generator=g) + k,
                                          "exact", ids) for k in (0.5, 1.0))
    coarsened = cd.compare(scores(b, "eap"), tuned_layer, coarsen=True, n_resamples=100, breakdown=False,
                           reference_scores=coarse_reference)
    assert coarsened.graph == layer and coarsened.robustness.verdict("intensity").reference.direction == "up"
    with pytest.raises(cd.DataError, match="score the reference on the comparison's graph"):
        cd.compare(scores(b, "eap"), tuned_layer, coarsen=True, n_resamples=100, breakdown=False,
                   reference_scores=reference)


def test_reference_scores_must_be_of_the_comparisons_samples_and_say_their_scorer():
    b = base_values(0)
    strangers = [f"x{i}" for i in range(16)]
    with pytest.raises(cd.DataError, match="sample id\\(s\\) the base comparison scores do not"):
        scorer_robustness(scores(b, "eap"), scores(b, "eap"), scores(b[:16], "exact", strangers),
                          scores(b[:16], "exact", strangers))
    unnamed = scores(b, "eap")
    del unnamed.metadata["method"]
    with pytest.raises(cd.DataError, match="metadata\\['method'\\] is missing"):
        scorer_robustness(unnamed, unnamed, scores(b, "exact"), scores(b, "exact"))
    with pytest.raises(cd.ArgumentTypeError, match="base reference scores must be EdgeScores"):
        scorer_robustness(scores(b, "eap"), scores(b, "eap"), "base.cdiff", scores(b, "exact"))


def test_no_affordable_reference_for_eap_ig_on_a_large_head_graph():
    large = cd.AttributionGraph(32, 32, level="head")
    assert choose_reference(large, "eap-ig-inputs") is None
    assert "1,592,881 edges" in no_reference_reason(large, "eap-ig-inputs")
    assert "--reference-scorer exact" in no_reference_reason(large, "eap-ig-inputs")
    assert no_reference_reason(large, "exact").startswith("not needed")


def test_a_subsample_going_against_the_headline_under_both_scorers_is_inconclusive():
    """Headline up; on the 16 re-scored samples both scorers go down: the subsample, not the scorer."""
    b = base_values(0)
    factors = torch.tensor([0.9] * 16 + [2.0] * (N - 16))
    ids = [f"q{i}" for i in range(16)]
    result = scorer_robustness(scores(b, "eap"), scores(b * factors[:, None, None], "eap"),
                               scores(b[:16], "exact", ids), scores(noisy(b[:16], 0.8, 3), "exact", ids),
                               n_resamples=300)
    verdict = result.verdict("intensity")
    assert (verdict.headline.direction, verdict.primary.direction, verdict.reference.direction) == ("up", "down", "down")
    assert verdict.verdict == "inconclusive" and "the subsample does not represent the full sample" in verdict.reason
