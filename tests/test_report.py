"""circuitdiff.report: Markdown tables and JSON, and the comparison report built from them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import circuitdiff as cd
from circuitdiff import report

GRAPH = cd.AttributionGraph(2, 4, level="head")


def test_markdown_table_alignment_and_cells():
    table = report.markdown_table(["name", "value", "mid"], [["a", "1", "x"], ["b|c", "", "y"]], align="lrc")
    assert table.splitlines() == [
        "| name | value | mid |",
        "|---|---:|:---:|",
        "| a | 1 | x |",
        r"| b\|c | | y |",  # a pipe is escaped, an empty cell is one space
    ]
    assert report.markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"


@pytest.mark.parametrize("align", ["lr", "lrx", "LRR"])
def test_markdown_table_refuses_a_bad_alignment(align):
    with pytest.raises(cd.ArgumentError, match="align must be one of l, r, c per column"):
        report.markdown_table(["a", "b", "c"], [], align=align)


def test_markdown_table_refuses_a_short_row():
    with pytest.raises(cd.ArgumentError, match="a table row has 1 cells for 2 columns"):
        report.markdown_table(["a", "b"], [["only"]])


def test_json_ready_and_write_json(tmp_path):
    value = {"a": np.float32(1.5), "b": [np.int64(3), math.nan, -math.inf], "c": torch.tensor([1.0, 2.0]),
             "d": (np.float64(2.0), "text", None)}
    plain = report.json_ready(value)
    assert plain == {"a": 1.5, "b": [3, None, None], "c": [1.0, 2.0], "d": [2.0, "text", None]}
    assert type(plain["b"][0]) is int
    text = report.write_json(plain, tmp_path / "out.json")
    assert json.loads(text) == plain and (tmp_path / "out.json").read_text() == text
    assert not list(tmp_path.glob("*.tmp*"))


def test_comparison_report_layout():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, GRAPH.n_sources, GRAPH.n_receivers, generator=g, dtype=torch.float64) * GRAPH.edge_mask
    base[0] = 0.0  # undefined for the shape metrics: listed under "Samples left out"
    make = lambda x: cd.EdgeScores(GRAPH, x.mean(0), x, torch.zeros(8))  # noqa: E731
    result = cd.compare(make(base), make(1.5 * base), n_resamples=100, breakdown=False)
    lines = report.comparison_markdown(result).splitlines()
    assert lines[0].startswith("Base vs tuned, 8 vs 8 samples (paired by sample id: 8 pairs; the base and tuned ids")
    assert "; 95% bootstrap CI of tuned - base (100 resamples); test: Wilcoxon signed-rank (paired), p (Holm) " \
           "adjusted across the metrics of each group; " in lines[0]
    assert lines[2:6] == ["**all**", "", "| metric | base | tuned | change | 95% CI of difference | p | p (Holm) | "
                                         "detectable |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    assert [line.split(" | ")[0] for line in lines[6:13]] == [f"| {m}" for m in cd.metrics.available()]
    assert lines[14:17] == ["**Warnings**", "", "- few samples (base 8, tuned 8; fewer than 30): the tests and "
                            "intervals rest on few samples and small changes go undetected."]
    similarity = lines.index("| group | Spearman | top-k Jaccard (k) | Wasserstein |")
    assert similarity > 17 and lines[similarity + 1] == "|---|---:|---:|---:|"
    assert lines.index("**Per-edge tests**") > similarity
    assert lines.index("**Samples left out**") > lines.index("**Per-edge tests**")
    assert "- kurtosis (all): undefined on some samples (all-zero or constant scores); its row uses 7 base and 7 " \
           "tuned samples" in lines
    assert result.to_markdown() == report.comparison_markdown(result)
    data = report.comparison_dict(result)
    assert data == result.to_dict() and data["rows"] == json.loads(json.dumps(data))["rows"]
    assert data["definitions"]["information_complexity"]["units"] == "nats"


def test_agreement_markdown():
    x = torch.randn(3, GRAPH.n_sources, GRAPH.n_receivers, generator=torch.Generator().manual_seed(1)) * GRAPH.edge_mask
    scores = cd.EdgeScores(GRAPH, x.mean(0), x, torch.zeros(3))
    table = report.agreement_markdown(cd.agreement(scores, scores, k=5))
    assert table.splitlines()[:3] == ["| metric | value |", "|---|---|", "| Pearson r | 1.000 |"]
    assert "| top-5 sign agreement | 1.000 |" in table and table.endswith(f"| edges compared | {GRAPH.n_edges} |")
