"""``compare``: two models' edge-score distributions, with intervals and tests.

For each registered metric (:mod:`circuitdiff.metrics`) and each edge group, a
:class:`Comparison` holds the base and tuned values, the difference (tuned - base), the
% change, a bootstrap confidence interval of the difference over samples
(``scipy.stats.bootstrap``, BCa) and a test over per-sample values: Wilcoxon
signed-rank when the samples are paired (the same prompts scored on both models, matched
by sample id), else Mann-Whitney U (:mod:`circuitdiff.significance`), with Holm-adjusted
p-values across the metrics of each group and the smallest change the sample could
detect. Per-edge tests (:mod:`circuitdiff.differential`) say which edges changed, and
reference scores make it check whether the conclusions survive the scorer
(:mod:`circuitdiff.robustness`). Cross-model
similarities (Spearman correlation of the mean scores, top-k Jaccard overlap of the
largest ``|mean score|`` edges, Wasserstein distance between the pooled ``|score|``
distributions) and the per-edge relative change come with it. Its Markdown and JSON are
written by :mod:`circuitdiff.report`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats
from torch import Tensor

from circuitdiff import metrics, report
from circuitdiff.errors import ArgumentError, ArgumentTypeError, NonFiniteError, UnknownNameError
from circuitdiff.differential import EdgeTests, check_fdr
from circuitdiff.differential import edge_tests as test_every_edge  # compare's option has the function's name
from circuitdiff.graph import AttributionGraph
from circuitdiff.pairing import check_same_settings, common_graph, pair
from circuitdiff.scores import EdgeScores
from circuitdiff.significance import (SMALL_SAMPLE, difference_test, holm, mean_difference_interval,
                                      minimum_detectable_effect, pooled_difference_interval)

if TYPE_CHECKING:
    from circuitdiff.robustness import Robustness

__all__ = ["Comparison", "MetricComparison", "Similarity", "compare"]

#: Bins of the shared ``|score|`` histogram the Wasserstein distance is computed on.
WASSERSTEIN_BINS = 4096


@dataclass(frozen=True)
class MetricComparison:
    """One metric on one edge group. ``difference`` and the interval are tuned - base.

    ``p_holm``: ``p_value`` adjusted by Holm's method across the metrics of the group (the
    family-wise error rate). ``detectable``: the smallest difference of means the sample
    detects with 80% power (:func:`~circuitdiff.significance.minimum_detectable_effect`),
    in the metric's units; NaN where undefined.
    """

    metric: str
    group: str
    base: float
    tuned: float
    difference: float
    percent_change: float
    ci_low: float
    ci_high: float
    test: str
    statistic: float
    p_value: float
    n_base: int
    n_tuned: int
    p_holm: float = math.nan
    detectable: float = math.nan


@dataclass(frozen=True)
class Similarity:
    """How alike the two models' mean scores are on one edge group.

    ``wasserstein`` is computed on a shared histogram of ``WASSERSTEIN_BINS`` bins; its
    error is at most one bin width, ``wasserstein_resolution``. ``k`` is the top-k size
    used: the requested ``top_k``, clamped to half the group's edges when it would reach
    every edge (where the overlap is 1 whatever the scores); ``k_clamped`` says so.
    """

    group: str
    spearman: float
    top_k_jaccard: float
    k: int
    wasserstein: float
    wasserstein_resolution: float
    k_clamped: bool = False


@dataclass
class Comparison:
    """What :func:`compare` found. ``rows``: one :class:`MetricComparison` per (group, metric).

    The ``"all"`` group's details, for plots and your own analysis:
    ``per_sample[side][metric]`` ``[n_samples]`` arrays, ``node_entropy[side]``
    ``[n_sources]``, ``histograms[side]`` pooled counts on ``bin_edges``, and
    ``relative_change`` ``[n_sources, n_receivers]`` (NaN off the cells and where the
    base mean is 0). ``side`` is ``"base"`` or ``"tuned"``. ``sample_ids``: the samples
    compared, in the order of the per-sample arrays (paired: one list for both sides).
    ``dropped``: every sample left out and why (see :meth:`dropped_samples`).
    ``definitions``: per metric, its ``description``, ``units`` and ``higher_means``.
    ``warnings``: what limits the conclusions (few samples, intervals spanning 0 with
    the smallest detectable change). ``edge_tests``: the per-edge tests
    (:class:`~circuitdiff.differential.EdgeTests`), None when not run. ``robustness``:
    the scorer check (:class:`~circuitdiff.robustness.Robustness`), None without
    reference scores.
    """

    graph: AttributionGraph
    rows: list[MetricComparison]
    similarity: list[Similarity]
    paired: bool
    structural_zeros: bool
    bins: int
    bin_edges: np.ndarray
    histograms: dict[str, np.ndarray]
    per_sample: dict[str, dict[str, np.ndarray]]
    node_entropy: dict[str, np.ndarray]
    relative_change: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    sample_ids: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    definitions: dict[str, dict[str, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    edge_tests: EdgeTests | None = None
    robustness: Robustness | None = None

    def get(self, metric: str, group: str = "all") -> MetricComparison:
        """The row of ``metric`` on ``group``."""
        for row in self.rows:
            if row.metric == metric and row.group == group:
                return row
        raise UnknownNameError(f"no row for metric {metric!r} on group {group!r}; metrics: "
                               f"{', '.join(self.metrics)}; groups: {', '.join(self.groups)}.")

    @property
    def metrics(self) -> list[str]:
        """Metrics compared, in report order."""
        return list(dict.fromkeys(row.metric for row in self.rows))

    @property
    def groups(self) -> list[str]:
        """Edge groups compared, ``"all"`` first."""
        return list(dict.fromkeys(row.group for row in self.rows))

    def dropped_samples(self) -> list[dict[str, Any]]:
        """Every sample left out of the comparison: ``{"side", "id", "reason"}``.

        Reasons: no partner on the other side (pairing by id), dropped before scoring
        for non-finite scores (``attribute(nonfinite="drop")``), or a metric undefined
        on it (per metric; see ``MetricComparison.n_base`` / ``n_tuned``).
        """
        return list(self.dropped)

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per row (``pandas.DataFrame(comparison.to_records())``)."""
        return [asdict(row) for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (NaN becomes None); see :func:`circuitdiff.report.comparison_dict`."""
        return report.comparison_dict(self)

    def to_json(self, path: str | None = None) -> str:
        """:meth:`to_dict` as JSON text; also written to ``path`` if given."""
        return report.write_json(self.to_dict(), path)

    def to_markdown(self, groups: list[str] | None = None) -> str:
        """Tables of the metrics (``groups`` default: ``["all"]``) and the similarities."""
        return report.comparison_markdown(self, groups)


def compare(
    base: EdgeScores,
    tuned: EdgeScores,
    *,
    paired: bool | None = None,
    structural_zeros: bool = False,
    breakdown: bool = True,
    coarsen: bool = False,
    bins: int = metrics.DEFAULT_BINS,
    top_k: int = 100,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    chunk_size: int | None = None,
    edge_tests: bool = True,
    fdr: float = 0.05,
    reference_scores: tuple[EdgeScores, EdgeScores] | None = None,
    bin_tops: dict[str, float] | None = None,
) -> Comparison:
    """Compare two models' edge scores metric by metric, with intervals and tests.

    Every registered metric is compared (:func:`circuitdiff.metrics.available`: the
    built-ins, then metrics added with :func:`circuitdiff.metrics.register_metric` or
    by plugins).

    Args:
        base: per-sample :class:`EdgeScores` of the base model.
        tuned: per-sample :class:`EdgeScores` of the tuned model, on the same graph.
        paired: pair the samples by their ``sample_ids`` (paired tests and bootstrap).
            Default (None): paired; samples whose id is on one side only are left out
            and listed in the report. False: the two sides score different prompts
            (unpaired tests on all samples). Two sides without a common id are refused
            unless ``paired=False``.
        structural_zeros: compute on every cell of the matrix, structural zeros
            included (the paper's convention) instead of real edges only.
        breakdown: also compute every metric by receiver kind, source kind and layer.
        coarsen: when the graphs differ (head vs layer level, or a different number of
            heads), compare the common layer-level coarsening instead of refusing.
        bins: histogram bins for information complexity, shared by both models.
        top_k: edges in the top-k Jaccard overlap (clamped to half a group's edges
            where it would reach every edge; labelled in the report).
        confidence: confidence level of the bootstrap intervals.
        n_resamples: bootstrap resamples.
        seed: of the bootstrap resampling.
        chunk_size: samples read at a time; default: about 1M scores (see
            :mod:`circuitdiff.metrics`, Memory).
        edge_tests: also test every edge (:func:`circuitdiff.differential.edge_tests`),
            at false discovery rate ``fdr``.
        fdr: the Benjamini-Hochberg false discovery rate of the per-edge tests.
        reference_scores: ``(base, tuned)`` re-scored with a reference scorer on a
            subsample, on the compared graph (the layer level with ``coarsen``): the
            result's ``robustness`` says, per metric, whether the conclusion holds under
            the reference (:func:`circuitdiff.robustness.scorer_robustness`).
        bin_tops: the top of each edge group's ``|score|`` histogram range, by group
            name; default: the larger of the two models' largest ``|score|``. A checkpoint
            series shares one range (:func:`circuitdiff.trajectory.shared_bin_tops`), so
            its information complexities are on the same bins; a top below a model's
            largest ``|score|`` is refused.

    Returns:
        :class:`Comparison`; ``print(result.to_markdown())``.

    Raises:
        DataError: no sample id in common (pass ``paired=False`` for different
            prompts); the two sides were scored with different scorers, interventions
            or objectives; graphs that do not correspond.
        NonFiniteError: a NaN or infinite score (the side and sample are named).
    """
    for name, scores in (("base", base), ("tuned", tuned)):
        if not isinstance(scores, EdgeScores):
            raise ArgumentTypeError(f"{name} must be EdgeScores, got {type(scores).__name__}.")
        metrics.require_per_sample(scores, f"compare ({name})")
    _check_options(bins, confidence, top_k, n_resamples, seed, paired, fdr)
    if reference_scores is not None and (not isinstance(reference_scores, (tuple, list)) or len(reference_scores) != 2):
        raise ArgumentTypeError("reference_scores must be a pair (base, tuned) of EdgeScores re-scored with a "
                                f"reference scorer; got {type(reference_scores).__name__}.")
    check_same_settings(base, tuned)
    base, tuned = common_graph(base, tuned, coarsen)
    pairing = pair(base, tuned, paired is not False)
    paired, selection = pairing.paired, pairing.rows
    graph = base.graph
    groups = metrics.edge_groups(graph, structural_zeros, breakdown)
    sides = {"base": base, "tuned": tuned}
    tops_by_side = {}
    for side, scores in sides.items():
        try:
            tops_by_side[side] = metrics.largest_magnitude(scores, groups, chunk_size, selection[side])
        except NonFiniteError as exc:
            raise NonFiniteError(f"{side} scores: {exc}") from None
    tops = {g: max(tops_by_side["base"][g], tops_by_side["tuned"][g]) for g in groups}
    if bin_tops is not None:
        tops = _given_tops(bin_tops, tops)
    names = metrics.available()
    profiles = {side: metrics.profile(scores, groups, tops, bins, chunk_size, selection[side], names)
                for side, scores in sides.items()}
    fine = {side: metrics.profile_histogram(scores, groups, tops, WASSERSTEIN_BINS, chunk_size, selection[side])
            for side, scores in sides.items()}
    means = {side: metrics.mean_scores(scores, selection[side], chunk_size) for side, scores in sides.items()}
    rng = np.random.default_rng(seed)
    rows, similarity = [], []
    for g, cells in groups.items():
        b, t = profiles["base"][g], profiles["tuned"][g]
        family = [_row(metric, g, b, t, paired, confidence, n_resamples, rng) for metric in names]
        adjusted = holm(np.array([row.p_value for row in family], dtype=float))
        rows += [replace(row, p_holm=float(p)) for row, p in zip(family, adjusted)]
        similarity.append(_similarity(g, means["base"][cells], means["tuned"][cells], fine["base"][g],
                                      fine["tuned"][g], tops[g], top_k))
    everything = profiles["base"]["all"], profiles["tuned"]["all"]
    tests = None
    if edge_tests:
        tests = test_every_edge(base, tuned, paired=paired, fdr=fdr, chunk_size=chunk_size)
    result = Comparison(
        graph=graph,
        rows=rows,
        similarity=similarity,
        paired=paired,
        structural_zeros=structural_zeros,
        bins=bins,
        bin_edges=everything[0].bin_edges,
        histograms={"base": everything[0].histograms.sum(0), "tuned": everything[1].histograms.sum(0)},
        per_sample={"base": everything[0].per_sample, "tuned": everything[1].per_sample},
        node_entropy={"base": everything[0].node_entropy, "tuned": everything[1].node_entropy},
        relative_change=metrics.relative_change(means["base"], means["tuned"], groups["all"]),
        settings={"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "bins": bins,
                  "bin_tops": "both models' largest |score|" if bin_tops is None else tops,
                  "top_k": top_k, "level": graph.level, "n_base": pairing.n["base"], "n_tuned": pairing.n["tuned"],
                  "pairing": pairing.description,
                  "test": "wilcoxon signed-rank" if paired else "mann-whitney u",
                  "multiplicity": "holm across the metrics of each group", "fdr": fdr,
                  "bootstrap": "scipy.stats.bootstrap, BCa",
                  "base": dict(base.metadata), "tuned": dict(tuned.metadata)},
        sample_ids=pairing.ids,
        dropped=pairing.dropped,
        definitions={name: {"description": m.description, "units": m.units, "higher_means": m.higher_means}
                     for name, m in everything[0].definitions.items()},
        warnings=_warnings(rows, pairing.n, confidence, {name for name, m in everything[0].definitions.items()
                                                          if isinstance(m, metrics.PooledMetric)}),
        edge_tests=tests,
    )
    if reference_scores is not None:
        from circuitdiff.robustness import scorer_robustness

        result.robustness = scorer_robustness(
            base, tuned, *reference_scores, headline=result, confidence=confidence, n_resamples=n_resamples, seed=seed,
            structural_zeros=structural_zeros, bins=bins, top_k=top_k, chunk_size=chunk_size)
    return result


def _warnings(rows: list[MetricComparison], n: dict[str, int], confidence: float, pooled: set[str]) -> list[str]:
    """What limits the conclusions: few samples; intervals of the ``"all"`` group that span 0.

    ``pooled``: the metrics whose row shows a pooled value (their detectable size is of
    the per-sample values the test compares).
    """
    lines = []
    small = {side: count for side, count in n.items() if count < SMALL_SAMPLE}
    if small:
        lines.append(f"few samples ({', '.join(f'{side} {count}' for side, count in small.items())}; fewer than "
                     f"{SMALL_SAMPLE}): the tests and intervals rest on few samples and small changes go undetected.")
    for row in rows:
        if row.group == "all" and not (row.ci_low > 0 or row.ci_high < 0):
            line = (f"{row.metric}: the {confidence:.0%} CI [{row.ci_low:.3g}, {row.ci_high:.3g}] spans 0 (or is "
                    "undefined)")
            if math.isfinite(row.detectable):
                size = f"±{row.detectable:.3g}"
                if row.metric in pooled:  # the test's per-sample values, not the pooled value of the row
                    size += " in the per-sample values"
                elif row.base:
                    size += f" ({100 * row.detectable / abs(row.base):.1f}% of base)"
                line += (f"; changes smaller than {size} are not detectable at n = {row.n_base}/{row.n_tuned} "
                         "(80% power)")
            lines.append(line + ".")
    return lines


def _check_options(bins: object, confidence: object, top_k: object, n_resamples: object, seed: object,
                   paired: object, fdr: object) -> None:
    """Refuse option values :func:`compare` cannot use (ArgumentError naming the option)."""
    metrics.check_bins(bins)
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ArgumentError(f"confidence must be in (0, 1); got {confidence!r}.")
    for name, value, least in (("top_k", top_k, 1), ("n_resamples", n_resamples, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ArgumentError(f"{name} must be an integer >= {least}; got {value!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ArgumentError(f"seed must be an integer or None; got {seed!r}.")
    if paired not in (None, True, False):
        raise ArgumentError(f"paired must be None, True or False; got {paired!r}.")
    check_fdr(fdr)


def _given_tops(given: dict[str, float], largest: dict[str, float]) -> dict[str, float]:
    """``given`` checked against the groups and each group's largest ``|score|`` (``largest``)."""
    if not isinstance(given, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                          for v in given.values()):
        raise ArgumentError(f"bin_tops must map edge groups to finite numbers; got {given!r}.")
    missing = sorted(set(largest) - set(given))
    if missing:
        raise ArgumentError(f"bin_tops has no top for the edge groups {missing}; give one per group "
                            "(circuitdiff.trajectory.shared_bin_tops computes them, with the same breakdown).")
    low = {g: (given[g], largest[g]) for g in largest if not given[g] >= largest[g]}
    if low:
        raise ArgumentError(f"bin_tops is below the largest |score| of these groups (given, largest): {low}; "
                            "values above the top would pile into the last bin. Compute the tops over every "
                            "model compared (circuitdiff.trajectory.shared_bin_tops).")
    return {g: float(given[g]) for g in largest}


def _row(metric: str, group: str, b: metrics.Profile, t: metrics.Profile, paired: bool, confidence: float,
         n_resamples: int, rng: np.random.Generator) -> MetricComparison:
    """The metric's row: dataset values, change, interval and test (undefined samples left out)."""
    x, y = b.per_sample[metric], t.per_sample[metric]
    if paired:
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
    else:
        x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    base_value, tuned_value = b.value(metric), t.value(metric)
    difference = tuned_value - base_value
    percent = 100.0 * difference / abs(base_value) if base_value != 0 else math.nan
    definition = b.definitions[metric]
    if isinstance(definition, metrics.PooledMetric):
        low, high = pooled_difference_interval(definition, b, t, paired, confidence, n_resamples, rng)
    else:
        low, high = mean_difference_interval(x, y, paired, confidence, n_resamples, rng)
    test, statistic, p = difference_test(x, y, paired)
    return MetricComparison(metric, group, base_value, tuned_value, difference, percent, low, high, test,
                            statistic, p, int(x.size), int(y.size),
                            detectable=minimum_detectable_effect(x, y, paired, 1 - confidence))


def _similarity(group: str, base: Tensor, tuned: Tensor, hist_b: np.ndarray, hist_t: np.ndarray, top: float,
                top_k: int) -> Similarity:
    """Spearman, top-k Jaccard and Wasserstein of the two models on one group."""
    b, t = base.double().numpy(), tuned.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, documented
        spearman = float(stats.spearmanr(b, t).statistic) if b.size > 1 else math.nan
    k, clamped = metrics.functions.top_k_size(top_k, b.size)
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    top_t = set(np.argsort(-np.abs(t), kind="stable")[:k].tolist())
    jaccard = len(top_b & top_t) / len(top_b | top_t) if k else math.nan
    width = (top if top > 0 else 1.0) / WASSERSTEIN_BINS
    centers = (np.arange(WASSERSTEIN_BINS) + 0.5) * width
    if hist_b.sum() > 0 and hist_t.sum() > 0:
        distance = float(stats.wasserstein_distance(centers, centers, hist_b, hist_t))
    else:
        distance = math.nan
    return Similarity(group, spearman, jaccard, k, distance, width, clamped)
