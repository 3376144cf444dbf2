"""Does a comparison's conclusion survive its scorer?

EAP is a first-order estimate. On the bundled demo its mean scores correlate with exact
ablation at Pearson 0.02, and the headline flips with the scorer. So a comparison made
with a fast scorer is checked against a reference scorer on a seeded subsample of the
paired samples (default 16):

1. :func:`subsample` picks the sample ids, :func:`choose_reference` the reference scorer:
   exact single-edge ablation when it is affordable (always at layer level; at head level
   up to :data:`EXACT_EDGE_LIMIT` edges), else EAP-IG. :func:`reference_cost` says what it
   costs before anything runs.
2. Both models are scored again on those samples with the reference
   (:func:`check_scorer_robustness` does it, or call :func:`circuitdiff.attribute` on
   :func:`select_batches`).
3. :func:`scorer_robustness` compares the two models under each scorer on the same
   subsample and gives, per metric, a verdict:

   - **robust**: both scorers find a change in the same direction (each 95% CI excludes 0);
   - **scorer-dependent**: they find opposite changes, or one finds a change and the other
     does not (the reason says which);
   - **inconclusive**: neither finds a change on the subsample, so it cannot tell.

   It also gives, per model, how well the scorers agree edge by edge on the subsample
   (:func:`circuitdiff.agreement`: Pearson, Spearman, sign agreement).

Both scorers are judged on the same samples, so a difference in verdict comes from the
scorer and not from the sample size. ``compare(..., reference_scores=(b, t))`` runs step 3
and puts the result in ``Comparison.robustness`` and the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

from circuitdiff.agreement import Agreement, agreement
from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentError, DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.pairing import pair
from circuitdiff.report import json_ready, markdown_table
from circuitdiff.scores import EdgeScores

if TYPE_CHECKING:
    from circuitdiff.comparison import Comparison

__all__ = ["DEFAULT_SAMPLES", "EXACT_EDGE_LIMIT", "Finding", "MetricVerdict", "Robustness", "subsample",
           "choose_reference", "reference_cost", "select_batches", "scorer_robustness", "check_scorer_robustness"]

#: Paired samples re-scored with the reference scorer by default.
DEFAULT_SAMPLES = 16
#: At head level, exact ablation is the reference up to this many edges (one forward pass
#: per edge and sample); above it EAP-IG is.
EXACT_EDGE_LIMIT = 20_000
#: Forward-pass equivalents of one forward and backward pass.
_BACKWARD_COST = 3


@dataclass(frozen=True)
class Finding:
    """One scorer's answer for one metric: the change tuned - base and its interval.

    ``direction`` is ``"up"`` or ``"down"`` when the interval excludes 0, else
    ``"no clear change"``.
    """

    scorer: str
    base: float
    tuned: float
    difference: float
    percent_change: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def direction(self) -> str:
        """``"up"``, ``"down"`` or ``"no clear change"`` (the interval contains 0 or is undefined)."""
        if self.ci_low > 0:
            return "up"
        if self.ci_high < 0:
            return "down"
        return "no clear change"

    def describe(self) -> str:
        """``eap: down, -38.1% [-51.3, -27.2]`` (CI in % of base)."""
        scale = 100 / abs(self.base) if self.base else math.nan
        return (f"{self.scorer}: {self.direction}, {self.percent_change:+.1f}% "
                f"[{self.ci_low * scale:+.1f}, {self.ci_high * scale:+.1f}]")


@dataclass(frozen=True)
class MetricVerdict:
    """Whether one metric's conclusion holds under both scorers (see the module docstring)."""

    metric: str
    verdict: str
    reason: str
    primary: Finding
    reference: Finding


@dataclass
class Robustness:
    """The robustness check of one comparison.

    Attributes:
        primary, reference: the two scorers' names.
        sample_ids: the subsample both were compared on.
        verdicts: one :class:`MetricVerdict` per metric (edge group ``"all"``).
        agreement: per model (``"base"``, ``"tuned"``), primary vs reference edge by
            edge on the subsample's mean scores.
        comparisons: ``"primary"`` and ``"reference"``: the full comparisons on the subsample.
        cost: what the re-scoring cost, in words (empty when the scores were given).
    """

    primary: str
    reference: str
    sample_ids: list[str]
    verdicts: list[MetricVerdict]
    agreement: dict[str, Agreement]
    comparisons: dict[str, Comparison] = field(repr=False)
    cost: str = ""

    def verdict(self, metric: str) -> MetricVerdict:
        """The verdict on ``metric``."""
        for verdict in self.verdicts:
            if verdict.metric == metric:
                return verdict
        raise ArgumentError(f"no verdict for metric {metric!r}; metrics: {', '.join(v.metric for v in self.verdicts)}.")

    def summary(self) -> str:
        """One line: how many metrics are robust, scorer-dependent, inconclusive."""
        counts = {kind: sum(v.verdict == kind for v in self.verdicts)
                  for kind in ("robust", "scorer-dependent", "inconclusive")}
        return (f"{self.primary} vs {self.reference} on {len(self.sample_ids)} paired samples: "
                + ", ".join(f"{n} {kind}" for kind, n in counts.items()))

    def to_markdown(self) -> str:
        """The verdict table and the per-model agreement table."""
        rows = [[v.metric, v.primary.describe().split(": ", 1)[1], v.reference.describe().split(": ", 1)[1],
                 f"**{v.verdict}**: {v.reason}"] for v in self.verdicts]
        agree = [[side, f"{a.pearson:.3f}", f"{a.spearman:.3f}", f"{a.sign_agreement:.3f}", str(a.n_edges)]
                 for side, a in self.agreement.items()]
        lines = [self.summary() + ". " + (self.cost + " " if self.cost else "")
                 + "Each cell: direction, change in % of base [95% CI]; both on the same subsample.", "",
                 markdown_table(["metric", self.primary, self.reference, "verdict"], rows),
                 "", f"Edge-by-edge agreement of {self.primary} with {self.reference} (mean scores on the subsample):",
                 "", markdown_table(["model", "Pearson", "Spearman", "sign agreement", "edges"], agree, "lrrrr")]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: scorers, sample ids, verdicts with both findings, agreements, cost."""
        return json_ready({
            "primary": self.primary, "reference": self.reference, "sample_ids": self.sample_ids, "cost": self.cost,
            "verdicts": [{**asdict(v), "primary": {**asdict(v.primary), "direction": v.primary.direction},
                          "reference": {**asdict(v.reference), "direction": v.reference.direction}}
                         for v in self.verdicts],
            "agreement": {side: a.to_dict() for side, a in self.agreement.items()},
        })


def subsample(base: EdgeScores, tuned: EdgeScores, n: int = DEFAULT_SAMPLES, seed: int = 0) -> list[str]:
    """``n`` sample ids common to both sides, drawn with ``seed`` (all of them if fewer), in base's order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ArgumentError(f"the robustness subsample needs n >= 2 samples; got {n!r}.")
    common = pair(base, tuned, True).ids["paired"]
    if len(common) <= n:
        return list(common)
    chosen = set(np.random.default_rng(seed).choice(len(common), size=n, replace=False).tolist())
    return [sample for i, sample in enumerate(common) if i in chosen]


def choose_reference(graph: AttributionGraph, primary: str) -> str | None:
    """The reference scorer for ``primary`` on ``graph``; None when ``primary`` is exact (it is the reference).

    Exact ablation at layer level, and at head level up to :data:`EXACT_EDGE_LIMIT`
    edges; else ``eap-ig-inputs``. An EAP-IG primary at head level above the limit gets
    no better reference than itself: exact is still chosen, whatever it costs.
    """
    if primary == "exact":
        return None
    if graph.level == "layer" or graph.n_edges <= EXACT_EDGE_LIMIT or primary.startswith("eap-ig"):
        return "exact"
    return "eap-ig-inputs"


def reference_cost(graph: AttributionGraph, reference: str, n_samples: int, primary: str = "eap",
                   scored_samples: int | None = None) -> str:
    """The reference run's cost in forward passes of one sample (a backward pass counts 2), in words.

    Both models are scored, so the count covers ``2 * n_samples`` samples; with
    ``scored_samples`` it is also put relative to the primary run over that many samples per model.
    """
    total = 2 * n_samples * _cost_per_sample(graph, reference)
    text = (f"Robustness check: {reference} on {n_samples} paired samples of each model, about {total:,} "
            f"forward-pass equivalents")
    if scored_samples:
        ratio = total / (2 * scored_samples * _cost_per_sample(graph, primary))
        text += f" ({ratio:.1f}x the {primary} run over {scored_samples} samples)"
    return text + "."


def _cost_per_sample(graph: AttributionGraph, scorer: str) -> int:
    """Forward-pass equivalents to score one sample: exact one per edge plus the clean pass; gradient
    scorers a forward and backward pass per step (EAP: one)."""
    if scorer == "exact":
        return graph.n_edges + 1
    from circuitdiff import scorers

    return _BACKWARD_COST * getattr(scorers.get(scorer), "steps", 1)


def select_batches(batches: Iterable[Batch], sample_ids: Sequence[str]) -> list[Batch]:
    """The rows of ``batches`` whose sample id is in ``sample_ids`` (batches left empty are skipped).

    Raises:
        DataError: a batch has no sample ids, or an id is not found.
    """
    wanted, found, selected = set(sample_ids), set(), []
    for batch in batches:
        if batch.sample_ids is None:
            raise DataError("select_batches needs batches with sample ids (make_batches gives them).")
        rows = [i for i, sample in enumerate(batch.sample_ids) if sample in wanted]
        found.update(batch.sample_ids[i] for i in rows)
        if rows:
            selected.append(batch.select(torch.tensor(rows, dtype=torch.long)))
    missing = [sample for sample in sample_ids if sample not in found]
    if missing:
        raise DataError(f"{len(missing)} sample id(s) are in no batch, e.g. {missing[:3]}; pass the batches the "
                        "scores were computed on.")
    return selected


def scorer_robustness(base: EdgeScores, tuned: EdgeScores, base_reference: EdgeScores, tuned_reference: EdgeScores,
                      *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                      structural_zeros: bool = False, cost: str = "") -> Robustness:
    """Compare base and tuned under the primary scorer and the reference, on the reference's samples.

    Args:
        base: the base model's scores of the comparison (primary scorer), per sample.
        tuned: the tuned model's, likewise.
        base_reference: the base model re-scored with the reference scorer on a
            subsample (same graph, intervention and objective; sample ids that are in
            the primary scores).
        tuned_reference: the tuned model, likewise, on the same samples.
        confidence: as in :func:`circuitdiff.compare`.
        n_resamples: as in :func:`circuitdiff.compare`.
        seed: as in :func:`circuitdiff.compare`.
        structural_zeros: as in :func:`circuitdiff.compare`.
        cost: a line on what the re-scoring cost, for the report.

    Raises:
        DataError: the reference scores are on another graph, scored the same way as the
            primary (nothing to check), or share fewer than 2 samples.
    """
    from circuitdiff.comparison import compare

    primary_name, reference_name = _scorer(base), _scorer(base_reference)
    if primary_name == reference_name:
        raise DataError(f"the reference scores were made with the primary scorer {primary_name!r}; re-score with "
                        "another (exact ablation, or EAP-IG).")
    for side, scores, reference in (("base", base, base_reference), ("tuned", tuned, tuned_reference)):
        if reference.graph != scores.graph:
            raise DataError(f"the {side} reference scores are on another graph ({reference.graph!r}) than the "
                            f"comparison ({scores.graph!r}); score the reference on the same graph.")
        for key in ("intervention", "objective"):
            if scores.metadata.get(key) != reference.metadata.get(key):
                raise DataError(f"the {side} reference scores were made with {key} {reference.metadata.get(key)!r} "
                                f"and the comparison with {scores.metadata.get(key)!r}; use the same {key}.")
    ids = pair(base_reference, tuned_reference, True).ids["paired"]
    primary = {"base": base.select_samples(ids), "tuned": tuned.select_samples(ids)}
    reference = {"base": base_reference.select_samples(ids), "tuned": tuned_reference.select_samples(ids)}
    options = dict(paired=True, structural_zeros=structural_zeros, breakdown=False, confidence=confidence,
                   n_resamples=n_resamples, seed=seed, edge_tests=False)
    comparisons = {"primary": compare(primary["base"], primary["tuned"], **options),
                   "reference": compare(reference["base"], reference["tuned"], **options)}
    verdicts = [_verdict(metric, _finding(primary_name, comparisons["primary"], metric),
                         _finding(reference_name, comparisons["reference"], metric))
                for metric in comparisons["primary"].metrics]
    agreements = {side: agreement(primary[side], reference[side]) for side in ("base", "tuned")}
    return Robustness(primary_name, reference_name, list(ids), verdicts, agreements, comparisons, cost)


def check_scorer_robustness(base_model: Any, tuned_model: Any, base_batches: Sequence[Batch],
                            tuned_batches: Sequence[Batch], base: EdgeScores, tuned: EdgeScores, *,
                            objective: str | Callable[..., Any], reference: str | None = None,
                            n_samples: int = DEFAULT_SAMPLES, seed: int = 0, intervention: str = "zero",
                            reference_batches: Sequence[Batch] | None = None, progress: bool = True,
                            log: Callable[[str], None] = print,
                            **compare_options: Any) -> Robustness:
    """Re-score a seeded subsample of both models with a reference scorer and judge the comparison.

    ``base_batches`` / ``tuned_batches`` are the batches ``base`` / ``tuned`` were scored
    on (with sample ids); ``objective``, ``intervention`` and ``reference_batches`` must be
    those of the primary run. ``reference`` defaults to :func:`choose_reference`. The
    estimated cost is passed to ``log`` before anything runs. ``compare_options`` go to
    :func:`scorer_robustness`.

    Raises:
        DataError: the primary scorer is exact (it is the reference; nothing to check).
    """
    from circuitdiff.attribution import attribute

    primary = _scorer(base)
    reference = reference or choose_reference(base.graph, primary)
    if reference is None:
        raise DataError("these scores were made with exact ablation, the reference itself: there is nothing to "
                        "check them against.")
    ids = subsample(base, tuned, n_samples, seed)
    cost = reference_cost(base.graph, reference, len(ids), primary, base.n_samples)
    log(cost)
    scored = {side: attribute(model, base.graph, select_batches(batches, ids), objective=objective, scorer=reference,
                              intervention=intervention, reference_batches=reference_batches, progress=progress)
              for side, model, batches in (("base", base_model, base_batches), ("tuned", tuned_model, tuned_batches))}
    return scorer_robustness(base, tuned, scored["base"], scored["tuned"], cost=cost, **compare_options)


def _scorer(scores: EdgeScores) -> str:
    return str(scores.metadata.get("method", "?"))


def _finding(scorer: str, comparison: Comparison, metric: str) -> Finding:
    row = comparison.get(metric)
    return Finding(scorer, row.base, row.tuned, row.difference, row.percent_change, row.ci_low, row.ci_high,
                   row.p_value)


def _verdict(metric: str, primary: Finding, reference: Finding) -> MetricVerdict:
    """Robust, scorer-dependent or inconclusive, with the reason (see the module docstring)."""
    a, b = primary.direction, reference.direction
    if a == b == "no clear change":
        return MetricVerdict(metric, "inconclusive", "neither scorer finds a clear change on this subsample",
                             primary, reference)
    if a == b:
        return MetricVerdict(metric, "robust", f"both scorers: {a}", primary, reference)
    if "no clear change" not in (a, b):
        reason = f"opposite directions ({primary.scorer} {a}, {reference.scorer} {b})"
    else:
        clear, unclear = (primary, reference) if b == "no clear change" else (reference, primary)
        reason = f"only {clear.scorer} finds a change ({clear.direction}); {unclear.scorer}'s CI spans 0"
    return MetricVerdict(metric, "scorer-dependent", reason, primary, reference)
