"""Does a comparison's conclusion survive its scorer?

EAP is a first-order estimate. On the bundled demo its mean scores correlate with exact
ablation at Pearson 0.02, and the headline flips with the scorer. So a comparison made
with a fast scorer is checked against a reference scorer on a seeded subsample of the
paired samples (default 16):

1. :func:`subsample` picks the sample ids, :func:`choose_reference` the reference scorer:
   exact single-edge ablation at layer level, and at head level up to
   :data:`EXACT_EDGE_LIMIT` edges; above that EAP-IG for an EAP comparison (none for an
   EAP-IG one: exact would cost millions of forward passes per sample; pass a reference
   to force one). :func:`reference_cost` says what it costs before anything runs.
2. Both models are scored again on those samples with the reference
   (:func:`check_scorer_robustness` does it, or call :func:`circuitdiff.attribute` on
   :func:`select_batches`).
3. :func:`scorer_robustness` sets each metric's **headline** (the comparison's own finding
   over all samples, with the primary scorer) against the **reference**'s finding on the
   subsample. A finding's direction is "up" or "down" when its confidence interval excludes
   0, else "no clear change". The verdict:

   - **robust**: the reference finds a change in the headline's direction;
   - **scorer-dependent**: the reference finds the opposite change; or its estimate goes
     the other way from the headline (its interval spanning 0) while the primary scorer's
     on the same samples does not; or it finds a change the headline does not (with fewer
     samples, so the primary scorer misses it);
   - **inconclusive**: the reference agrees in sign but its interval spans 0 on the
     subsample; or neither finds a change; or the primary scorer itself goes against its
     headline on the subsample, the same way as the reference (the subsample does not
     represent the full sample, so it cannot tell the scorer's part). More samples decide
     these.

   The primary scorer's own finding on the subsample is what separates the scorer from
   the subsample: both scorers are read on the same samples. Per model, the report also
   gives how well the scorers agree edge by edge on the subsample
   (:func:`circuitdiff.agreement`: Pearson, Spearman, sign agreement).

``compare(..., reference_scores=(b, t))`` runs step 3 and puts the result in
``Comparison.robustness`` and the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

from circuitdiff.agreement import Agreement, agreement
from circuitdiff.data import Batch
from circuitdiff.defaults import DEFAULT_SAMPLES, EXACT_EDGE_LIMIT
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.pairing import pair
from circuitdiff.report import change_cell, json_ready, markdown_table
from circuitdiff.scores import EdgeScores
from circuitdiff.significance import SMALL_SAMPLE

if TYPE_CHECKING:
    from circuitdiff.comparison import Comparison, MetricComparison

__all__ = ["DEFAULT_SAMPLES", "EXACT_EDGE_LIMIT", "UNCLEAR", "Finding", "MetricVerdict", "Robustness", "subsample",
           "choose_reference", "no_reference_reason", "reference_cost", "select_batches", "scorer_robustness",
           "check_scorer_robustness"]

#: Forward-pass equivalents of one forward and backward pass.
_BACKWARD_COST = 3
#: A finding's direction when its interval contains 0 (or is undefined).
UNCLEAR = "no clear change"


@dataclass(frozen=True)
class Finding:
    """One scorer's answer for one metric on some samples: its comparison row (tuned - base).

    ``direction`` is ``"up"`` or ``"down"`` when the row's interval excludes 0, else
    ``"no clear change"``. ``n``: the paired samples it rests on.
    """

    scorer: str
    row: MetricComparison

    @property
    def n(self) -> int:
        """Paired samples the row rests on."""
        return self.row.n_base

    @property
    def direction(self) -> str:
        """``"up"``, ``"down"`` or ``"no clear change"`` (the interval contains 0 or is undefined)."""
        if self.row.ci_low > 0:
            return "up"
        if self.row.ci_high < 0:
            return "down"
        return UNCLEAR

    def describe(self) -> str:
        """``down, -38.1% [-51.3, -27.2]`` (change and interval in % of base)."""
        return f"{self.direction}, {change_cell(self.row)}"

    def to_dict(self) -> dict[str, Any]:
        """The scorer, n, direction and every field of the row."""
        return {"scorer": self.scorer, "n": self.n, "direction": self.direction, **asdict(self.row)}


@dataclass(frozen=True)
class MetricVerdict:
    """Whether one metric's headline holds under the reference scorer (see the module docstring).

    ``headline``: the primary scorer on all samples; ``primary``: the primary scorer on
    the subsample; ``reference``: the reference scorer on the subsample.
    """

    metric: str
    verdict: str
    reason: str
    headline: Finding
    primary: Finding
    reference: Finding


@dataclass
class Robustness:
    """The robustness check of one comparison.

    Attributes:
        primary: the comparison's scorer.
        reference: the reference scorer.
        sample_ids: the subsample both were compared on.
        verdicts: one :class:`MetricVerdict` per metric (edge group ``"all"``).
        agreement: per model (``"base"``, ``"tuned"``), primary vs reference edge by
            edge on the subsample's mean scores.
        comparisons: ``"primary"`` and ``"reference"``: the full comparisons on the subsample.
        confidence: the level of every interval.
        cost: what the re-scoring cost, in words (empty when the scores were given).
    """

    primary: str
    reference: str
    sample_ids: list[str]
    verdicts: list[MetricVerdict]
    agreement: dict[str, Agreement]
    comparisons: dict[str, Comparison] = field(repr=False)
    confidence: float = 0.95
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
        n, total = len(self.sample_ids), self.verdicts[0].headline.n if self.verdicts else 0
        rows = [[v.metric, v.headline.describe(), v.primary.describe(), v.reference.describe(),
                 f"**{v.verdict}**: {v.reason}"] for v in self.verdicts]
        agree = [[side, f"{a.pearson:.3f}", f"{a.spearman:.3f}", f"{a.sign_agreement:.3f}", str(a.n_edges)]
                 for side, a in self.agreement.items()]
        intro = (f"{self.summary()}. {self.cost + ' ' if self.cost else ''}Each cell: direction, change in % of base "
                 f"[{self.confidence:.0%} CI].")
        if n < SMALL_SAMPLE:
            intro += (f" The subsample has {n} samples (fewer than {SMALL_SAMPLE}): its intervals rest on few "
                      "samples; re-score more (robustness_samples, --robustness-samples) to firm up the verdicts.")
        return "\n".join([intro, "", markdown_table(
            ["metric", f"{self.primary}, all {total}", f"{self.primary}, subsample", f"{self.reference}, subsample",
             "verdict"], rows),
            "", f"Edge-by-edge agreement of {self.primary} with {self.reference} (mean scores on the subsample):",
            "", markdown_table(["model", "Pearson", "Spearman", "sign agreement", "edges"], agree, "lrrrr")])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: scorers, sample ids, verdicts with the three findings, agreements, cost."""
        return json_ready({
            "primary": self.primary, "reference": self.reference, "sample_ids": self.sample_ids, "cost": self.cost,
            "confidence": self.confidence,
            "verdicts": [{"metric": v.metric, "verdict": v.verdict, "reason": v.reason,
                          "headline": v.headline.to_dict(), "primary": v.primary.to_dict(),
                          "reference": v.reference.to_dict()} for v in self.verdicts],
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
    """The reference scorer for ``primary`` on ``graph``, or None when there is no affordable better one.

    Exact ablation at layer level, and at head level up to :data:`EXACT_EDGE_LIMIT`
    edges; above it ``eap-ig-inputs`` for an EAP comparison. None for an exact comparison
    (it is the reference) and for an EAP-IG one above the limit (exact would cost a forward
    pass per edge and sample: pass a reference scorer yourself to force it).
    """
    if primary == "exact":
        return None
    if graph.level == "layer" or graph.n_edges <= EXACT_EDGE_LIMIT:
        return "exact"
    return None if primary.startswith("eap-ig") else "eap-ig-inputs"


def no_reference_reason(graph: AttributionGraph, primary: str) -> str:
    """Why :func:`choose_reference` found no reference for ``primary`` on ``graph`` (for logs and reports)."""
    if primary == "exact":
        return "not needed: the scores are exact ablation, the reference itself."
    return (f"not run: the only better reference for {primary} is exact ablation, and this head-level graph has "
            f"{graph.n_edges:,} edges (more than {EXACT_EDGE_LIMIT:,}; one forward pass per edge and sample). Pass "
            "a reference scorer to force it (--reference-scorer exact).")


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
                      *, headline: Comparison | None = None, confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0, **compare_options: Any) -> Robustness:
    """Judge each metric's headline against the reference scorer on the reference's samples.

    Args:
        base: the base model's scores of the comparison (primary scorer), per sample.
        tuned: the tuned model's, likewise.
        base_reference: the base model re-scored with the reference scorer on a
            subsample (same graph, intervention and objective; sample ids that are in
            the primary scores).
        tuned_reference: the tuned model, likewise, on the same samples.
        headline: the comparison of ``base`` and ``tuned`` over all samples, whose
            ``"all"`` rows are the headlines; default: computed here.
        confidence: the level of every interval, as in :func:`circuitdiff.compare`.
        n_resamples: as in :func:`circuitdiff.compare`.
        seed: as in :func:`circuitdiff.compare`.
        compare_options: ``structural_zeros``, ``bins``, ``top_k``, ``chunk_size``, as in
            :func:`circuitdiff.compare` (pass the comparison's own).

    Raises:
        DataError: the reference scores are on another graph, made with the primary
            scorer or another intervention or objective, or hold sample ids the primary
            scores do not have.
    """
    from circuitdiff.comparison import compare

    for name, scores in (("base", base), ("tuned", tuned), ("base reference", base_reference),
                         ("tuned reference", tuned_reference)):
        if not isinstance(scores, EdgeScores):
            raise ArgumentTypeError(f"the {name} scores must be EdgeScores, got {type(scores).__name__}.")
    primary_name, reference_name = _scorer(base), _scorer(base_reference)
    if primary_name == reference_name:
        raise DataError(f"the reference scores were made with the comparison's own scorer {primary_name!r}; re-score "
                        "with another (exact ablation, or EAP-IG).")
    for side, scores, reference in (("base", base, base_reference), ("tuned", tuned, tuned_reference)):
        if reference.graph != scores.graph:
            raise DataError(f"the {side} reference scores are on another graph ({reference.graph!r}) than the "
                            f"comparison ({scores.graph!r}); score the reference on the comparison's graph.")
        for key in ("intervention", "objective"):
            if scores.metadata.get(key) != reference.metadata.get(key):
                raise DataError(f"the {side} reference scores were made with {key} {reference.metadata.get(key)!r} "
                                f"and the comparison with {scores.metadata.get(key)!r}; use the same {key}.")
    ids = pair(base_reference, tuned_reference, True).ids["paired"]
    for side, scores in (("base", base), ("tuned", tuned)):
        missing = sorted(set(ids) - set(scores.sample_ids))  # type: ignore[arg-type]
        if missing:
            raise DataError(f"the reference scores hold {len(missing)} sample id(s) the {side} comparison scores do "
                            f"not, e.g. {missing[:3]}; re-score a subsample of the comparison's own samples.")
    options = dict(paired=True, breakdown=False, confidence=confidence, n_resamples=n_resamples, seed=seed,
                   edge_tests=False, **compare_options)
    if headline is None:
        headline = compare(base, tuned, **options)
    primary = {"base": base.select_samples(ids), "tuned": tuned.select_samples(ids)}
    reference = {"base": base_reference.select_samples(ids), "tuned": tuned_reference.select_samples(ids)}
    comparisons = {"primary": compare(primary["base"], primary["tuned"], **options),
                   "reference": compare(reference["base"], reference["tuned"], **options)}
    verdicts = [_verdict(metric, _finding(primary_name, headline, metric),
                         _finding(primary_name, comparisons["primary"], metric),
                         _finding(reference_name, comparisons["reference"], metric))
                for metric in comparisons["primary"].metrics]
    agreements = {side: agreement(primary[side], reference[side]) for side in ("base", "tuned")}
    return Robustness(primary_name, reference_name, list(ids), verdicts, agreements, comparisons, confidence)


def check_scorer_robustness(base_model: Any, tuned_model: Any, base_batches: Sequence[Batch],
                            tuned_batches: Sequence[Batch], base: EdgeScores, tuned: EdgeScores, *,
                            objective: str | Callable[..., Any], reference: str | None = None,
                            n_samples: int = DEFAULT_SAMPLES, seed: int = 0, intervention: str = "zero",
                            reference_batches: Sequence[Batch] | None = None, progress: bool = True,
                            log: Callable[[str], None] = print, **compare_options: Any) -> Robustness:
    """Re-score a seeded subsample of both models with a reference scorer and judge the comparison.

    ``base_batches`` / ``tuned_batches`` are the batches ``base`` / ``tuned`` were scored
    on (with sample ids); ``objective``, ``intervention`` and ``reference_batches`` must be
    those of the primary run. ``reference`` defaults to :func:`choose_reference`. The
    estimated cost is passed to ``log`` before anything runs. ``compare_options`` go to
    :func:`scorer_robustness`.

    Raises:
        DataError: no reference is given and none is affordable, or the scores are exact
            ablation (the reference itself).
    """
    from circuitdiff.attribution import attribute

    primary = _scorer(base)
    reference = reference or choose_reference(base.graph, primary)
    if reference is None:
        raise DataError(f"scorer robustness check {no_reference_reason(base.graph, primary)}")
    ids = subsample(base, tuned, n_samples, seed)
    cost = reference_cost(base.graph, reference, len(ids), primary, base.n_samples)
    log(cost)
    scored = {side: attribute(model, base.graph, select_batches(batches, ids), objective=objective, scorer=reference,
                              intervention=intervention, reference_batches=reference_batches, progress=progress)
              for side, model, batches in (("base", base_model, base_batches), ("tuned", tuned_model, tuned_batches))}
    result = scorer_robustness(base, tuned, scored["base"], scored["tuned"], **compare_options)
    result.cost = cost
    return result


def _scorer(scores: EdgeScores) -> str:
    """The scorer named in the scores' metadata."""
    name = scores.metadata.get("method")
    if name is None:
        raise DataError("these scores do not say which scorer made them (metadata['method'] is missing); the "
                        "robustness check needs it. Set it, e.g. scores.metadata['method'] = 'eap'.")
    return str(name)


def _finding(scorer: str, comparison: Comparison, metric: str) -> Finding:
    return Finding(scorer, comparison.get(metric))


def _verdict(metric: str, headline: Finding, primary: Finding, reference: Finding) -> MetricVerdict:
    """Robust, scorer-dependent or inconclusive, with the reason (see the module docstring)."""
    h, p, r = headline.direction, primary.direction, reference.direction
    sign = {name: _sign(f.row.difference) for name, f in (("h", headline), ("p", primary), ("r", reference))}
    if h != UNCLEAR and r == h:
        verdict, reason = "robust", f"{reference.scorer} also finds it {h}"
        if sign["p"] == -sign["h"]:
            reason += (f"; on the subsample {primary.scorer} itself goes the other way "
                       f"({primary.row.percent_change:+.1f}%), so the subsample may not represent the full sample")
    elif h != UNCLEAR and sign["r"] == sign["p"] == -sign["h"]:
        verdict, reason = "inconclusive", (f"on this subsample {primary.scorer} too goes against its headline "
                                           f"({primary.row.percent_change:+.1f}%; {reference.scorer} "
                                           f"{reference.row.percent_change:+.1f}%): the subsample does not represent the "
                                           "full sample, so it cannot tell")
    elif h != UNCLEAR and r != UNCLEAR:
        verdict, reason = "scorer-dependent", f"opposite directions ({headline.scorer} {h}, {reference.scorer} {r})"
    elif h != UNCLEAR and sign["r"] == -sign["h"]:
        verdict, reason = "scorer-dependent", (f"{reference.scorer}'s estimate goes the other way "
                                               f"({reference.row.percent_change:+.1f}%; its CI spans 0) while "
                                               f"{primary.scorer}'s on the same samples does not "
                                               f"({primary.row.percent_change:+.1f}%)")
    elif h != UNCLEAR:
        verdict, reason = "inconclusive", (f"{reference.scorer} agrees in sign ({reference.row.percent_change:+.1f}%) but "
                                           f"its CI spans 0 on {reference.n} samples")
    elif r != UNCLEAR and p == r:
        verdict, reason = "inconclusive", (f"on this subsample both scorers find it {r}, but {headline.scorer} finds "
                                           f"no clear change on all {headline.n}: the subsample does not represent the "
                                           "full sample")
    elif r != UNCLEAR:
        verdict, reason = "scorer-dependent", (f"only {reference.scorer} finds a change ({r}, on {reference.n} "
                                               f"samples); {headline.scorer} does not on {headline.n}")
    else:
        verdict, reason = "inconclusive", "neither scorer finds a clear change"
    return MetricVerdict(metric, verdict, reason, headline, primary, reference)


def _sign(value: float) -> int:
    """+1, -1, or 0 for 0 and NaN."""
    return 1 if value > 0 else -1 if value < 0 else 0
