"""Cross-scoring: the 2 x 2 design separates a planted model effect from a planted text effect."""

from __future__ import annotations

import json

import torch

import circuitdiff as cd
from circuitdiff.crossscore import EFFECTS, cross_compare

GRAPH = cd.AttributionGraph(2, 2, level="layer")
N = 40


def scores(values: torch.Tensor) -> cd.EdgeScores:
    values = values * GRAPH.edge_mask
    return cd.EdgeScores(GRAPH, values.mean(0), values, torch.zeros(N),
                         metadata={"method": "eap", "intervention": "zero", "objective": "answer_nll"},
                         sample_ids=tuple(f"q{i}" for i in range(N)))


def design(model_factor: float, text_factor: float) -> dict[str, cd.EdgeScores]:
    """Scores = question effect x model factor (tuned) x text factor (tuned's answers), with 2% noise."""
    g = torch.Generator().manual_seed(0)
    question = torch.rand(N, GRAPH.n_sources, GRAPH.n_receivers, generator=g) + 0.5

    def cell(model: float, text: float) -> cd.EdgeScores:
        return scores(question * model * text * (1 + 0.02 * torch.randn(question.shape, generator=g)))

    return {"B(b)": cell(1, 1), "T(t)": cell(model_factor, text_factor), "B(t)": cell(1, text_factor),
            "T(b)": cell(model_factor, 1)}


def change(result, key: str) -> tuple[str, float]:
    row = result[key].get("intensity")
    direction = "up" if row.ci_low > 0 else "down" if row.ci_high < 0 else "none"
    return direction, row.percent_change


def test_a_model_effect_shows_with_the_text_held_fixed():
    s = design(model_factor=1.4, text_factor=1.0)
    result = cross_compare(s["B(b)"], s["T(t)"], s["B(t)"], s["T(b)"], n_resamples=200, breakdown=False)
    assert change(result, "own")[0] == "up"
    assert change(result, "model|base text")[0] == change(result, "model|tuned text")[0] == "up"
    assert change(result, "text|base model")[0] == change(result, "text|tuned model")[0] == "none"


def test_a_text_effect_is_not_mistaken_for_a_model_effect():
    """The own-answer design sees a change; cross-scoring shows it comes from the text, not the model."""
    s = design(model_factor=1.0, text_factor=1.4)
    result = cross_compare(s["B(b)"], s["T(t)"], s["B(t)"], s["T(b)"], n_resamples=200, breakdown=False)
    assert change(result, "own")[0] == "up"  # what the paper's design alone would report
    assert change(result, "model|base text")[0] == change(result, "model|tuned text")[0] == "none"
    assert change(result, "text|base model")[0] == change(result, "text|tuned model")[0] == "up"
    markdown = result.to_markdown()
    assert all(label in markdown for _, label in EFFECTS) and "| intensity |" in markdown
    data = json.loads(json.dumps(cd.report.json_ready(result.to_dict())))
    assert set(data) == {key for key, _ in EFFECTS} and data["own"]["rows"][0]["metric"] == "intensity"
