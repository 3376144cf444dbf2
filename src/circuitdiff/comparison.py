"""``compare``: two models' edge-score distributions, with intervals and tests.

For each metric of :mod:`circuitdiff.metrics` and each edge group, a :class:`Comparison`
holds the base and tuned values, the difference (tuned - base), the % change, a
bootstrap confidence interval of the difference over samples
(``scipy.stats.bootstrap``, BCa) and a test over per-sample values: Wilcoxon
signed-rank when the samples are paired (the same prompts scored on both models, matched
by sample id), else Mann-Whitney U. Cross-model similarities (Spearman correlation of the mean scores, top-k
Jaccard overlap of the largest ``|mean score|`` edges, Wasserstein distance between the
pooled ``|score|`` distributions) and the per-edge relative change come with it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from circuitdiff import metrics
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, NonFiniteError, UnknownNameError
from circuitdiff.graph import AttributionGraph
from circuitdiff.io import write_atomically
from circuitdiff.scores import EdgeScores

__all__ = ["Comparison", "MetricComparison", "Similarity", "compare"]

WASSERSTEIN_BINS = 4096


@dataclass(frozen=True)
class MetricComparison:
    """One metric on one edge group. ``difference`` and the interval are tuned - base."""

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


@dataclass(frozen=True)
class Similarity:
    """How alike the two models' mean scores are on one edge group.

    ``wasserstein`` is computed on a shared histogram of ``WASSERSTEIN_BINS`` bins; its
    error is at most one bin width, ``wasserstein_resolution``.
    """

    group: str
    spearman: float
    top_k_jaccard: float
    k: int
    wasserstein: float
    wasserstein_resolution: float


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

    def get(self, metric: str, group: str = "all") -> MetricComparison:
        """The row of ``metric`` on ``group``."""
        for row in self.rows:
            if row.metric == metric and row.group == group:
                return row
        raise UnknownNameError(f"no row for metric {metric!r} on group {group!r}; metrics: "
                       f"{', '.join(metrics.PER_SAMPLE_METRICS)}; groups: {', '.join(self.groups)}.")

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
        """Everything as plain JSON-ready values (NaN becomes None)."""
        finite = np.isfinite(self.relative_change.numpy())
        changes = self.relative_change.numpy()[finite]
        return _plain({
            "settings": self.settings,
            "paired": self.paired,
            "sample_ids": self.sample_ids,
            "dropped": self.dropped,
            "structural_zeros": self.structural_zeros,
            "rows": self.to_records(),
            "similarity": [asdict(s) for s in self.similarity],
            "histogram": {"bins": self.bins, "edges": self.bin_edges.tolist(),
                          "base": self.histograms["base"].tolist(), "tuned": self.histograms["tuned"].tolist()},
            "node_entropy": {side: values.tolist() for side, values in self.node_entropy.items()},
            "sources": list(self.graph.sources),
            "relative_change": {
                "median": float(np.median(changes)) if changes.size else None,
                "fraction_increased": float((changes > 0).mean()) if changes.size else None,
                "n_edges": int(changes.size),
            },
        })

    def to_json(self, path: str | None = None) -> str:
        """:meth:`to_dict` as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_atomically(Path(path), lambda tmp: tmp.write_text(text))
        return text

    def to_markdown(self, groups: list[str] | None = None) -> str:
        """Tables of the metrics (``groups`` default: ``["all"]``) and the similarities."""
        groups = groups or ["all"]
        test = "Wilcoxon signed-rank (paired)" if self.paired else "Mann-Whitney U (unpaired)"
        lines = [
            f"Base vs tuned, {self.settings.get('n_base')} vs {self.settings.get('n_tuned')} samples "
            f"({self.settings.get('pairing', 'unpaired')}); "
            f"{self.settings.get('confidence', 0.95):.0%} bootstrap CI of tuned - base "
            f"({self.settings.get('n_resamples')} resamples); test: {test}; "
            f"{'all cells incl. structural zeros' if self.structural_zeros else 'real edges only'}; "
            f"information complexity on {self.bins} shared bins over [0, {self.bin_edges[-1]:.4g}].",
        ]
        for group in groups:
            lines += ["", f"**{group}**", "",
                      "| metric | base | tuned | change | 95% CI of difference | p |", "|---|---:|---:|---:|---|---:|"]
            for row in self.rows:
                if row.group == group:
                    lines.append(f"| {row.metric} | {row.base:.4g} | {row.tuned:.4g} | {row.percent_change:+.1f}% | "
                                 f"[{row.ci_low:.3g}, {row.ci_high:.3g}] | {row.p_value:.3g} |")
        lines += ["", "| group | Spearman | top-k Jaccard (k) | Wasserstein |", "|---|---:|---:|---:|"]
        for s in self.similarity:
            if s.group in groups:
                lines.append(f"| {s.group} | {s.spearman:.3f} | {s.top_k_jaccard:.3f} ({s.k}) | {s.wasserstein:.3g} |")
        return "\n".join(lines + self._samples_left_out(groups))

    def _samples_left_out(self, groups: list[str]) -> list[str]:
        """Markdown lines on the samples not in every row: pairing, non-finite drops, undefined metrics."""
        lines = []
        for reason in dict.fromkeys(d["reason"] for d in self.dropped):
            for side in ("base", "tuned"):
                ids = [d["id"] for d in self.dropped if d["reason"] == reason and d["side"] == side]
                if ids:
                    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
                    lines.append(f"- {side}: {len(ids)} left out ({reason}): {shown}")
        expected = (self.settings.get("n_base"), self.settings.get("n_tuned"))
        for row in self.rows:
            if row.group in groups and (row.n_base, row.n_tuned) != expected:
                lines.append(f"- {row.metric} ({row.group}): undefined on some samples (all-zero or constant "
                             f"scores); its row uses {row.n_base} base and {row.n_tuned} tuned samples")
        return ["", "**Samples left out**", ""] + lines if lines else []


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
) -> Comparison:
    """Compare two models' edge scores metric by metric, with intervals and tests.

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
        top_k: edges in the top-k Jaccard overlap (capped at each group's size).
        confidence: confidence level of the bootstrap intervals.
        n_resamples: bootstrap resamples.
        seed: of the bootstrap resampling.
        chunk_size: samples read at a time; default: about 1M scores (see
            :mod:`circuitdiff.metrics`, Memory).

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
    _check_same_settings(base, tuned)
    base, tuned = _common_graph(base, tuned, coarsen)
    pairing = _pair(base, tuned, paired is not False)
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
    profiles = {side: metrics.profile(scores, groups, tops, bins, chunk_size, selection[side])
                for side, scores in sides.items()}
    fine = {side: metrics.profile_histogram(scores, groups, tops, WASSERSTEIN_BINS, chunk_size, selection[side])
            for side, scores in sides.items()}
    means = {side: metrics.mean_scores(scores, selection[side], chunk_size) for side, scores in sides.items()}
    rng = np.random.default_rng(seed)
    rows, similarity = [], []
    for g, cells in groups.items():
        b, t = profiles["base"][g], profiles["tuned"][g]
        for metric in metrics.PER_SAMPLE_METRICS:
            rows.append(_row(metric, g, b, t, paired, confidence, n_resamples, rng))
        similarity.append(_similarity(g, means["base"][cells], means["tuned"][cells], fine["base"][g],
                                      fine["tuned"][g], tops[g], top_k))
    everything = profiles["base"]["all"], profiles["tuned"]["all"]
    return Comparison(
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
                  "top_k": top_k, "level": graph.level, "n_base": pairing.n["base"], "n_tuned": pairing.n["tuned"],
                  "pairing": pairing.description,
                  "test": "wilcoxon signed-rank" if paired else "mann-whitney u",
                  "bootstrap": "scipy.stats.bootstrap, BCa",
                  "base": dict(base.metadata), "tuned": dict(tuned.metadata)},
        sample_ids=pairing.ids,
        dropped=pairing.dropped,
    )


@dataclass(frozen=True)
class _Pairing:
    """Which samples of each side a comparison uses, in which order, and which it leaves out."""

    paired: bool
    rows: dict[str, Tensor | None]  # per side: row indices into its scores (None: all, in order)
    ids: dict[str, list[str]]
    n: dict[str, int]
    dropped: list[dict[str, Any]]
    description: str


def _pair(base: EdgeScores, tuned: EdgeScores, paired: bool) -> _Pairing:
    """Pair the samples by id (``paired``), or take every sample of both sides."""
    sides = {"base": base, "tuned": tuned}
    dropped = [{"side": side, "id": d.get("id"), "reason": "non-finite scores, dropped before scoring"}
               for side, scores in sides.items() for d in scores.metadata.get("dropped", [])]
    positional = [side for side, scores in sides.items() if scores.metadata.get("sample_ids", "position") == "position"]
    if not paired:
        return _Pairing(False, {"base": None, "tuned": None}, {s: list(x.sample_ids) for s, x in sides.items()},
                        {s: x.n_samples for s, x in sides.items()}, dropped, "unpaired")
    if positional and base.n_samples != tuned.n_samples:
        raise DataError(
            f"the {' and '.join(positional)} scores carry no sample ids (their ids are row positions) and the sides "
            f"have {base.n_samples} and {tuned.n_samples} samples, so their samples cannot be matched. Pass "
            "paired=False (command line: --unpaired) if they score different prompts, or rescore with sample ids "
            "(make_batches(sample_ids=...))."
        )
    in_tuned = {sample: row for row, sample in enumerate(tuned.sample_ids)}
    common = [sample for sample in base.sample_ids if sample in in_tuned]
    if not common:
        raise DataError(
            f"base and tuned share no sample id (base e.g. {list(base.sample_ids[:3])}, tuned e.g. "
            f"{list(tuned.sample_ids[:3])}), so no sample can be paired. If they score different prompts, pass "
            "paired=False (command line: --unpaired); if they score the same prompts, give both runs the same "
            "sample_ids (make_batches(sample_ids=...))."
        )
    if len(common) < 2:
        raise DataError(f"base and tuned share only the sample id {common[0]!r}; a paired comparison needs at least "
                        "2 common samples (diversity compares samples).")
    in_base = {sample: row for row, sample in enumerate(base.sample_ids)}
    shared = set(common)
    for side, other, scores in (("base", "tuned", base), ("tuned", "base", tuned)):
        dropped += [{"side": side, "id": sample, "reason": f"no sample with this id in {other}"}
                    for sample in scores.sample_ids if sample not in shared]
    rows = {}
    for side, index in (("base", in_base), ("tuned", in_tuned)):
        order = torch.tensor([index[sample] for sample in common], dtype=torch.long)
        rows[side] = None if torch.equal(order, torch.arange(sides[side].n_samples)) else order
    how = f"paired by sample id: {len(common)} pairs"
    if positional:
        how += (f"; the {' and '.join(positional)} ids are sample positions (batches without sample_ids), so this "
                "pairs by position")
    return _Pairing(True, rows, {"paired": common}, {"base": len(common), "tuned": len(common)}, dropped, how)


def _check_same_settings(base: EdgeScores, tuned: EdgeScores) -> None:
    """Refuse scores made with different scorers, interventions or objectives (they do not compare edge by edge)."""
    for key, what in (("method", "scorer"), ("intervention", "intervention"), ("objective", "objective")):
        b, t = base.metadata.get(key), tuned.metadata.get(key)
        if b is not None and t is not None and b != t:
            raise DataError(
                f"base was scored with {what} {b!r} and tuned with {t!r}; scores of different {what}s do not "
                "compare edge by edge. Score both models the same way (cd.agreement compares two scorers on "
                "one model)."
            )


# ---------------------------------------------------------------------- helpers
def _common_graph(base: EdgeScores, tuned: EdgeScores, coarsen: bool) -> tuple[EdgeScores, EdgeScores]:
    if base.graph == tuned.graph:
        return base, tuned
    b, t = base.to_layer_level(), tuned.to_layer_level()
    if coarsen and b.graph == t.graph:
        return b, t
    describe = lambda g: f"{g.level} level, {g.n_layers} layers, {g.n_heads} heads, {g.n_kv_heads} kv heads"  # noqa: E731
    if b.graph == t.graph:
        raise DataError(f"the two scores are on different graphs (base: {describe(base.graph)}; tuned: "
                        f"{describe(tuned.graph)}), so their edges do not correspond. Pass coarsen=True to compare "
                        "the common layer-level coarsening (exact sums of head-level scores).")
    raise DataError(f"the two scores are on graphs with different edge sets even at layer level (base: "
                    f"{describe(base.graph)}; tuned: {describe(tuned.graph)}): different architectures cannot "
                    "be compared edge by edge.")


def _row(metric: str, group: str, b: metrics.Profile, t: metrics.Profile, paired: bool, confidence: float,
         n_resamples: int, rng: np.random.Generator) -> MetricComparison:
    x, y = b.per_sample[metric], t.per_sample[metric]
    if paired:
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
    else:
        x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    base_value, tuned_value = b.value(metric), t.value(metric)
    difference = tuned_value - base_value
    percent = 100.0 * difference / abs(base_value) if base_value != 0 else math.nan
    if metric == "information_complexity":
        low, high = _bootstrap_pooled_entropy(b.histograms, t.histograms, paired, confidence, n_resamples, rng)
    else:
        low, high = _bootstrap_mean_difference(x, y, paired, confidence, n_resamples, rng)
    test, statistic, p = _test(x, y, paired)
    return MetricComparison(metric, group, base_value, tuned_value, difference, percent, low, high, test,
                            statistic, p, int(x.size), int(y.size))


def _interval(data: tuple, statistic, paired: bool, confidence: float, n_resamples: int,
              rng: np.random.Generator) -> tuple[float, float]:
    """BCa interval of a vectorized statistic; a constant bootstrap distribution gives that value twice."""
    if min(len(d) for d in data) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        # a constant bootstrap distribution (e.g. a model compared with itself) makes BCa divide 0 by 0
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=confidence,
                                 n_resamples=n_resamples, method="BCa", rng=rng, batch=100)
    distribution = result.bootstrap_distribution
    if np.ptp(distribution) == 0:  # every resample gives the same value: so does the interval
        return float(distribution.flat[0]), float(distribution.flat[0])
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _bootstrap_mean_difference(x: np.ndarray, y: np.ndarray, paired: bool, confidence: float, n_resamples: int,
                               rng: np.random.Generator) -> tuple[float, float]:
    def statistic(a, b, axis=-1):
        return np.mean(b, axis=axis) - np.mean(a, axis=axis)

    return _interval((x, y), statistic, paired, confidence, n_resamples, rng)


def _bootstrap_pooled_entropy(hb: np.ndarray, ht: np.ndarray, paired: bool, confidence: float, n_resamples: int,
                              rng: np.random.Generator) -> tuple[float, float]:
    """Resample samples (their histograms) and recompute the pooled entropies."""

    def entropy(counts):
        return metrics.histogram_entropy(torch.from_numpy(counts)).numpy()

    def statistic(i, j, axis=-1):
        return entropy(_resampled_sum(ht, j)) - entropy(_resampled_sum(hb, i))

    ib, it = np.arange(hb.shape[0], dtype=float), np.arange(ht.shape[0], dtype=float)
    return _interval((ib, it), statistic, paired, confidence, n_resamples, rng)


def _resampled_sum(histograms: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``histograms[index].sum(-2)`` for resample indices ``[..., n]``, without the ``[..., n, bins]`` temporary."""
    rows = index.reshape(-1, index.shape[-1]).astype(int)
    counts = np.zeros((rows.shape[0], histograms.shape[0]))
    np.add.at(counts, (np.arange(rows.shape[0])[:, None], rows), 1.0)
    return (counts @ histograms).reshape(*index.shape[:-1], histograms.shape[1])


def _test(x: np.ndarray, y: np.ndarray, paired: bool) -> tuple[str, float, float]:
    if paired:
        name = "wilcoxon signed-rank"
        if x.size == 0:
            return name, math.nan, math.nan
        if np.all(y - x == 0):
            return name, 0.0, 1.0  # no difference at all: nothing to test
        result = stats.wilcoxon(y, x)
    else:
        name = "mann-whitney u"
        if x.size == 0 or y.size == 0:
            return name, math.nan, math.nan
        result = stats.mannwhitneyu(y, x)
    return name, float(result.statistic), float(result.pvalue)


def _similarity(group: str, base: Tensor, tuned: Tensor, hist_b: np.ndarray, hist_t: np.ndarray, top: float,
                top_k: int) -> Similarity:
    b, t = base.double().numpy(), tuned.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN, documented
        spearman = float(stats.spearmanr(b, t).statistic) if b.size > 1 else math.nan
    k = min(top_k, b.size)
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    top_t = set(np.argsort(-np.abs(t), kind="stable")[:k].tolist())
    jaccard = len(top_b & top_t) / len(top_b | top_t) if k else math.nan
    width = (top if top > 0 else 1.0) / WASSERSTEIN_BINS
    centers = (np.arange(WASSERSTEIN_BINS) + 0.5) * width
    if hist_b.sum() > 0 and hist_t.sum() > 0:
        distance = float(stats.wasserstein_distance(centers, centers, hist_b, hist_t))
    else:
        distance = math.nan
    return Similarity(group, spearman, jaccard, k, distance, width)


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    return value
