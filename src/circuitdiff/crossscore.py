"""Cross-scoring: separate what changed in the model from what changed in the text.

The paper's design scores each model on its own answers, so a difference mixes two
causes: the weights changed (the model effect) and the scored text changed (the text
effect). Scoring each model on both models' answers gives a 2 x 2 design:

+-------------------+------------------------+------------------------+
|                   | base's answers         | tuned's answers        |
+===================+========================+========================+
| base model        | B(b) (own answers)     | B(t)                   |
+-------------------+------------------------+------------------------+
| tuned model       | T(b)                   | T(t) (own answers)     |
+-------------------+------------------------+------------------------+

- own-answer change (the paper's): ``B(b) -> T(t)``;
- model effect, text held fixed: ``B(b) -> T(b)`` and ``B(t) -> T(t)``;
- text effect, model held fixed: ``B(b) -> B(t)`` and ``T(b) -> T(t)``.

Each is a paired :func:`circuitdiff.compare` (the same questions; sample ids are question
ids). When the model effect holds on both texts and the text effects are small, the
own-answer design measured the model; when the text effect is as large as the model
effect, it did not. Both answers must be scored on the same number of tokens (the
pipeline's ``T_cut``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from circuitdiff.comparison import Comparison, compare
from circuitdiff.report import change_cell, markdown_table
from circuitdiff.scores import EdgeScores

__all__ = ["CrossComparison", "cross_compare"]

#: The five comparisons, in report order: (key, label).
EFFECTS = (("own", "own answers: B(b) -> T(t)"),
           ("model|base text", "model effect on base's text: B(b) -> T(b)"),
           ("model|tuned text", "model effect on tuned's text: B(t) -> T(t)"),
           ("text|base model", "text effect in base: B(b) -> B(t)"),
           ("text|tuned model", "text effect in tuned: T(b) -> T(t)"))


@dataclass
class CrossComparison:
    """The five comparisons of the 2 x 2 cross-scoring design (keys: see :data:`EFFECTS`)."""

    comparisons: dict[str, Comparison]

    def __getitem__(self, key: str) -> Comparison:
        return self.comparisons[key]

    def to_markdown(self, group: str = "all") -> str:
        """Per metric and effect: the change in % of the first side, its CI and p-value."""
        first = self.comparisons["own"]
        rows = []
        for metric in first.metrics:
            cells = []
            for key, _ in EFFECTS:
                row = self.comparisons[key].get(metric, group)
                cells.append(f"{change_cell(row)} p={row.p_value:.2g}")
            rows.append([metric, *cells])
        confidence = first.settings.get("confidence", 0.95)
        intro = ("B = base model, T = tuned model; (b) = scored on base's answers, (t) = on tuned's. Each cell: "
                 f"change in % of the first side [{confidence:.0%} CI] and the paired test's p-value.")
        return intro + "\n\n" + markdown_table(["metric", *(label for _, label in EFFECTS)], rows)

    def to_dict(self) -> dict[str, Any]:
        """Each comparison's :meth:`~circuitdiff.comparison.Comparison.to_dict` rows, by effect."""
        return {key: {"label": label, "rows": self.comparisons[key].to_dict()["rows"]} for key, label in EFFECTS}


def cross_compare(base_on_base: EdgeScores, tuned_on_tuned: EdgeScores, base_on_tuned: EdgeScores,
                  tuned_on_base: EdgeScores, **compare_options: Any) -> CrossComparison:
    """The 2 x 2 design's five paired comparisons (see the module docstring).

    All four score sets are on the same graph, scored the same way, with the questions'
    ids as sample ids.

    Args:
        base_on_base: the base model on base's answers, B(b).
        tuned_on_tuned: the tuned model on tuned's answers, T(t).
        base_on_tuned: the base model on tuned's answers, B(t).
        tuned_on_base: the tuned model on base's answers, T(b).
        compare_options: passed to :func:`circuitdiff.compare` (``paired`` is always True).
    """
    options = {**compare_options, "paired": True}
    pairs = {"own": (base_on_base, tuned_on_tuned),
             "model|base text": (base_on_base, tuned_on_base),
             "model|tuned text": (base_on_tuned, tuned_on_tuned),
             "text|base model": (base_on_base, base_on_tuned),
             "text|tuned model": (tuned_on_base, tuned_on_tuned)}
    return CrossComparison({key: compare(a, b, **options) for key, (a, b) in pairs.items()})
