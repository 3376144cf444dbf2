"""Markdown tables and JSON files of results: every report circuitdiff writes is built here.

- :func:`markdown_table`: a GitHub-flavoured table from headers and already formatted cells;
- :func:`comparison_markdown`, :func:`comparison_dict`: what
  :meth:`~circuitdiff.comparison.Comparison.to_markdown` and
  :meth:`~circuitdiff.comparison.Comparison.to_dict` return;
- :func:`agreement_markdown`: what :meth:`~circuitdiff.agreement.Agreement.to_markdown` returns;
- :func:`json_ready` and :func:`write_json`: plain JSON values (NaN becomes ``null``), written atomically.

It reads results and never runs a model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from circuitdiff.errors import ArgumentError
from circuitdiff.io import write_atomically

if TYPE_CHECKING:
    from circuitdiff.agreement import Agreement
    from circuitdiff.comparison import Comparison, Similarity

__all__ = ["markdown_table", "change_cell", "number_cell", "json_ready", "write_json", "comparison_markdown", "comparison_dict",
           "agreement_markdown"]

_SEPARATORS = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table, one line per row, without a final newline.

    Args:
        headers: the column titles.
        rows: the cells of each row, already formatted, as many as ``headers``. An empty
            cell is written as one space (``| a | |``); ``|`` in a cell is escaped.
        align: one letter per column: ``l`` (separator ``---``, the renderer's default
            alignment), ``r`` (``---:``) or ``c`` (``:---:``); default all ``l``.

    Raises:
        ArgumentError: ``align`` or a row does not have one entry per column.
    """
    align = "l" * len(headers) if align is None else align
    if len(align) != len(headers) or set(align) - set(_SEPARATORS):
        raise ArgumentError(f"align must be one of l, r, c per column ({len(headers)} columns); got {align!r}.")
    for row in rows:
        if len(row) != len(headers):
            raise ArgumentError(f"a table row has {len(row)} cells for {len(headers)} columns: {list(row)!r}.")
    return "\n".join([_line(headers), _line([_SEPARATORS[a] for a in align], pad=False), *map(_line, rows)])


def _line(cells: Sequence[str], pad: bool = True) -> str:
    """``| a | b |`` (``pad``) or ``|a|b|``."""
    if not pad:
        return "|" + "|".join(cells) + "|"
    escaped = [str(c).replace("|", r"\|") for c in cells]
    return "|" + "|".join(f" {c} " if c else " " for c in escaped) + "|"


def change_cell(row: Any) -> str:
    """``+12.3% [+8.1, +16.0]``: a row's change in % of base and its interval in % of base.

    ``row`` has ``base``, ``percent_change``, ``ci_low`` and ``ci_high`` (a
    :class:`~circuitdiff.comparison.MetricComparison` or a robustness finding); the
    interval is of ``tuned - base`` divided by ``|base|``.
    """
    scale = 100 / abs(row.base) if row.base else math.nan
    return f"{row.percent_change:+.1f}% [{row.ci_low * scale:+.1f}, {row.ci_high * scale:+.1f}]"


def number_cell(value: float | None) -> str:
    """``value`` to 3 significant digits, ``-`` when it is None or NaN."""
    return "-" if value is None or value != value else f"{value:.3g}"


def json_ready(value: Any) -> Any:
    """``value`` with numpy scalars and tensors as Python numbers and lists, NaN and infinities as None."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    return value


def write_json(data: Any, path: str | os.PathLike[str] | None = None) -> str:
    """``data`` as indented JSON text; also written atomically to ``path`` if given."""
    text = json.dumps(data, indent=2)
    if path is not None:
        write_atomically(Path(path), lambda tmp: tmp.write_text(text))
    return text


def comparison_markdown(comparison: Comparison, groups: Sequence[str] | None = None) -> str:
    """The settings, a metrics table per group (default ``["all"]``), the scorer check, warnings,
    similarities, the per-edge tests and the samples left out."""
    groups = list(groups or ["all"])
    settings = comparison.settings
    confidence = settings.get("confidence", 0.95)
    test = "Wilcoxon signed-rank (paired)" if comparison.paired else "Mann-Whitney U (unpaired)"
    lines = [
        f"Base vs tuned, {settings.get('n_base')} vs {settings.get('n_tuned')} samples "
        f"({settings.get('pairing', 'unpaired')}); "
        f"{confidence:.0%} bootstrap CI of tuned - base "
        f"({settings.get('n_resamples')} resamples); test: {test}, p (Holm) adjusted across the metrics of each "
        "group; detectable: the smallest difference the sample detects with 80% power; "
        f"{'all cells incl. structural zeros' if comparison.structural_zeros else 'real edges only'}; "
        f"information complexity on {comparison.bins} shared bins over [0, {comparison.bin_edges[-1]:.4g}].",
    ]
    for group in groups:
        rows = [[r.metric, f"{r.base:.4g}", f"{r.tuned:.4g}", f"{r.percent_change:+.1f}%",
                 f"[{r.ci_low:.3g}, {r.ci_high:.3g}]", f"{r.p_value:.3g}", f"{r.p_holm:.3g}", f"±{r.detectable:.3g}"]
                for r in comparison.rows if r.group == group]
        lines += ["", f"**{group}**", "",
                  markdown_table(["metric", "base", "tuned", "change", f"{confidence:.0%} CI of difference",
                                  "p", "p (Holm)", "detectable"], rows, "lrrrlrrr")]
    if comparison.robustness is not None:
        lines += ["", "**Scorer robustness**", "", comparison.robustness.to_markdown()]
    if comparison.warnings:
        lines += ["", "**Warnings**", "", *(f"- {warning}" for warning in comparison.warnings)]
    similarity = [[s.group, f"{s.spearman:.3f}", _top_k_cell(s, settings.get("top_k")), f"{s.wasserstein:.3g}"]
                  for s in comparison.similarity if s.group in groups]
    lines += ["", markdown_table(["group", "Spearman", "top-k Jaccard (k)", "Wasserstein"], similarity, "lrrr")]
    if comparison.edge_tests is not None:
        lines += ["", "**Per-edge tests**", "", comparison.edge_tests.to_markdown()]
    return "\n".join(lines + _samples_left_out(comparison, groups))


def _top_k_cell(similarity: Similarity, requested: Any) -> str:
    """``0.429 (100)``, or ``0.551 (38; clamped from 100, which reaches every edge)``."""
    if not similarity.k_clamped:
        return f"{similarity.top_k_jaccard:.3f} ({similarity.k})"
    return (f"{similarity.top_k_jaccard:.3f} ({similarity.k}; clamped from {requested}, which reaches every edge)")


def _samples_left_out(comparison: Comparison, groups: list[str]) -> list[str]:
    """Markdown lines on the samples not in every row: pairing, non-finite drops, undefined metrics."""
    lines = []
    dropped = comparison.dropped
    for reason in dict.fromkeys(d["reason"] for d in dropped):
        for side in ("both", "base", "tuned"):
            ids = [d["id"] for d in dropped if d["reason"] == reason and d["side"] == side]
            if ids:
                shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
                who = "questions" if side == "both" else side
                lines.append(f"- {who}: {len(ids)} left out ({reason}): {shown}")
    expected = (comparison.settings.get("n_base"), comparison.settings.get("n_tuned"))
    for row in comparison.rows:
        if row.group in groups and (row.n_base, row.n_tuned) != expected:
            lines.append(f"- {row.metric} ({row.group}): undefined on some samples (all-zero or constant "
                         f"scores); its row uses {row.n_base} base and {row.n_tuned} tuned samples")
    return ["", "**Samples left out**", ""] + lines if lines else []


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """Everything in a comparison as plain JSON-ready values (NaN becomes None); see ``docs/metrics.md``."""
    changes = comparison.relative_change.numpy()
    changes = changes[np.isfinite(changes)]
    return json_ready({
        "settings": comparison.settings,
        "paired": comparison.paired,
        "sample_ids": comparison.sample_ids,
        "dropped": comparison.dropped,
        "structural_zeros": comparison.structural_zeros,
        "rows": comparison.to_records(),
        "similarity": [asdict(s) for s in comparison.similarity],
        "histogram": {"bins": comparison.bins, "edges": comparison.bin_edges.tolist(),
                      "base": comparison.histograms["base"].tolist(), "tuned": comparison.histograms["tuned"].tolist()},
        "node_entropy": {side: values.tolist() for side, values in comparison.node_entropy.items()},
        "sources": list(comparison.graph.sources),
        "relative_change": {
            "median": float(np.median(changes)) if changes.size else None,
            "fraction_increased": float((changes > 0).mean()) if changes.size else None,
            "n_edges": int(changes.size),
        },
        "definitions": comparison.definitions,
        "warnings": comparison.warnings,
        "edge_tests": None if comparison.edge_tests is None else comparison.edge_tests.to_dict(),
        "robustness": None if comparison.robustness is None else comparison.robustness.to_dict(),
    })


def agreement_markdown(agreement: Agreement) -> str:
    """A two-column table (metric, value) of an :class:`~circuitdiff.agreement.Agreement`."""
    a = agreement
    rows = [["Pearson r", f"{a.pearson:.3f}"], ["Spearman ρ", f"{a.spearman:.3f}"],
            [f"top-{a.k} overlap" + (" (k clamped to half the edges)" if a.k_clamped else ""),
             f"{a.top_k_overlap:.3f}"], ["sign agreement", f"{a.sign_agreement:.3f}"],
            [f"top-{a.k} sign agreement", f"{a.top_k_sign_agreement:.3f}"], ["edges compared", str(a.n_edges)]]
    return markdown_table(["metric", "value"], rows)
