"""Metrics: how two models' edge-score distributions differ (method.md, section 5).

Pure functions over score tensors; nothing here runs a model. Every metric is computed
on a set of *cells* of the ``[n_sources, n_receivers]`` score matrix: by default the
graph's real edges (``structural_zeros=False``), or every cell including the structural
zeros (``structural_zeros=True``, the paper's full-matrix convention, which dilutes
intensity and inflates kurtosis as the zero fraction grows).

Per-sample metrics (``W(k)`` is sample ``k``'s matrix restricted to the cells):

- ``intensity``: mean ``|W(k)|``. The dataset value (mean over samples) is the paper's
  activation intensity.
- ``kurtosis``: excess kurtosis ``m4 / m2^2 - 3`` of the signed entries of ``W(k)``
  (population moments); averaged over samples as in the paper.
- ``diversity``: ``1 -`` the mean Pearson correlation of ``W(k)`` with every other
  sample's; the mean over samples is the paper's ``1 -`` mean pairwise correlation.
- ``gini``: Gini coefficient of ``|W(k)|`` (0 = all equal, near 1 = one edge has it all).
- ``effective_edges``: ``exp(entropy(|W(k)| / sum |W(k)|))``, between 1 and the number of cells.
- ``node_entropy``: for each source ``o``, the entropy of ``|W(k)[o, :]|`` normalised over
  its cells (its outgoing edges), averaged over sources; per-node values are kept.
- ``information_complexity``: the Shannon entropy (nats) of the histogram of ``|W|``
  pooled over samples, on explicit shared bins (``bins`` equal bins from 0 to the
  largest ``|score|`` of the two models compared). Per sample: the same entropy of the
  sample's own histogram (used for the paired test; the dataset value is the pooled one).

Every dataset value except ``information_complexity`` is the mean of the per-sample
values, so bootstrap intervals and paired tests use the per-sample values directly.
Samples where a metric is undefined (all-zero or constant scores) give NaN and are left
out of its mean, with the count reported.

**Memory.** Scores are read in chunks of ``chunk_size`` samples (default: as many as
make ``CHUNK_VALUES`` = 1M values, at least one): the temporaries are
``O(chunk_size * n_cells)`` float64 (Gini sorts each sample). Across
chunks only ``O(n_cells)`` running sums per edge group (for diversity), an
``[n_samples, bins]`` histogram and a few numbers per sample are kept. Diversity and the
histograms need a second pass over the chunks, so sources must be re-readable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, NonFiniteError
from circuitdiff.graph import AttributionGraph
from circuitdiff.scores import EdgeScores

__all__ = [
    "PER_SAMPLE_METRICS",
    "DEFAULT_BINS",
    "CHUNK_VALUES",
    "Profile",
    "edge_groups",
    "excess_kurtosis",
    "gini",
    "effective_edges",
    "histogram_entropy",
    "node_entropy",
    "diversity",
    "relative_change",
    "profile",
    "profile_histogram",
    "require_per_sample",
    "check_bins",
    "largest_magnitude",
    "mean_scores",
    "summarize",
]

#: Metrics with one value per sample (see the module docstring).
PER_SAMPLE_METRICS = ("intensity", "information_complexity", "kurtosis", "diversity", "node_entropy", "gini",
                      "effective_edges")
#: Bins of the information-complexity histograms: equal-width ``|score|`` bins from 0 to
#: the largest ``|score|`` of the two models compared (shared by both, as in :func:`circuitdiff.compare`).
DEFAULT_BINS = 100
#: Values (cells x samples) read at a time when ``chunk_size`` is None: 8 MiB of float64.
CHUNK_VALUES = 1 << 20


# ---------------------------------------------------------------------- building blocks
def excess_kurtosis(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """``m4 / m2^2 - 3`` over the last axis (population moments); NaN if constant."""
    values = values.double()
    centered = values - values.mean(-1, keepdim=True)
    m2 = centered.pow(2).mean(-1)
    m4 = centered.pow(4).mean(-1)
    return torch.where(m2 > 0, m4 / m2.pow(2) - 3.0, torch.full_like(m2, math.nan))


def gini(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Gini coefficient of ``|values|`` over the last axis; NaN if all zero."""
    a = values.double().abs().sort(-1).values
    n = a.shape[-1]
    rank = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    total = a.sum(-1)
    g = ((2 * rank - n - 1) * a).sum(-1) / (n * total)
    return torch.where(total > 0, g, torch.full_like(total, math.nan))


def _minus_p_log_p(p: Tensor) -> Tensor:
    """``-p log p`` elementwise, with ``0 log 0 = 0``."""
    return -(p * torch.where(p > 0, p.log(), 0.0))


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``-sum p log p`` over ``dim`` (``p`` already normalised)."""
    return _minus_p_log_p(p).sum(dim)


def effective_edges(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """``exp(entropy(|v| / sum |v|))`` over the last axis; NaN if all zero."""
    a = values.double().abs()
    total = a.sum(-1, keepdim=True)
    h = _entropy(a / total.clamp_min(torch.finfo(a.dtype).tiny))
    return torch.where(total[..., 0] > 0, h.exp(), torch.full_like(h, math.nan))


def histogram_entropy(counts: Float[Tensor, "... bins"]) -> Float[Tensor, "..."]:
    """Shannon entropy (nats) of histogram counts over the last axis; NaN if empty."""
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    h = _entropy(counts / total.clamp_min(1.0))
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, math.nan))


def node_entropy(
    matrix: Float[Tensor, "... n_sources n_receivers"], cells: Bool[Tensor, "n_sources n_receivers"]
) -> Float[Tensor, "... n_sources"]:
    """Entropy of each source's ``|scores|`` over its cells, normalised per source.

    NaN for sources with no cell or no mass. A one-hot row gives 0, a uniform row
    ``log(number of cells)``.
    """
    rows = torch.nonzero(cells, as_tuple=True)[0].to(matrix.device)
    values = matrix[..., cells]
    h = _node_entropy(values.reshape(-1, values.shape[-1]), rows, cells.shape[0])
    return h.reshape(*matrix.shape[:-2], cells.shape[0])


def _node_entropy(values: Float[Tensor, "k m"], sources: Tensor, n_sources: int) -> Float[Tensor, "k n_sources"]:
    """:func:`node_entropy` from the values of the cells (``[k, m]``) and each cell's source row."""
    a = values.double().abs()
    k = a.shape[0]
    total = a.new_zeros(k, n_sources).index_add_(1, sources, a)
    p = a / total[:, sources].clamp_min(torch.finfo(a.dtype).tiny)
    h = a.new_zeros(k, n_sources).index_add_(1, sources, _minus_p_log_p(p))
    has_cells = torch.bincount(sources, minlength=n_sources) > 0
    return torch.where((total > 0) & has_cells, h, math.nan)


def diversity(values: Float[Tensor, "n_samples n"]) -> float:
    """``1 -`` the mean pairwise Pearson correlation between the rows (in memory; a reference)."""
    c = np.corrcoef(values.double().numpy())
    n = c.shape[0]
    return float(1.0 - (c.sum() - np.trace(c)) / (n * (n - 1)))


def relative_change(
    base: Float[Tensor, "n_sources n_receivers"],
    tuned: Float[Tensor, "n_sources n_receivers"],
    cells: Bool[Tensor, "n_sources n_receivers"],
) -> Float[Tensor, "n_sources n_receivers"]:
    """``(|tuned| - |base|) / |base|`` per cell (the paper's Fig. 2, on mean scores).

    NaN outside ``cells`` and where ``base`` is 0 (the change is undefined there).
    """
    b, t = base.double().abs(), tuned.double().abs()
    change = (t - b) / b
    return torch.where(cells & (b > 0), change, torch.full_like(change, math.nan))


# ---------------------------------------------------------------------- edge groups
def edge_groups(
    graph: AttributionGraph, structural_zeros: bool = False, breakdown: bool = True
) -> dict[str, Bool[Tensor, "n_sources n_receivers"]]:
    """Cell masks of the groups every metric is computed on.

    ``"all"``; with ``breakdown``, also ``"receiver:{q,k,v,mlp,logits}"`` (edges into
    that receiver kind), ``"source:{input,attn,mlp}"`` (edges leaving that source kind)
    and ``"layer:{l}"`` (edges into the receivers of layer ``l``; ``"layer:logits"`` for
    the logits). Real edges only unless ``structural_zeros``.
    """
    base = torch.ones_like(graph.edge_mask) if structural_zeros else graph.edge_mask.clone()
    groups = {"all": base}
    if not breakdown:
        return groups
    receiver_kinds = torch.tensor([["q", "k", "v", "mlp", "logits"].index(k) for k in graph.receiver_kinds])
    for i, kind in enumerate(["q", "k", "v", "mlp", "logits"]):
        groups[f"receiver:{kind}"] = base & (receiver_kinds == i)[None, :]
    source_kinds = torch.tensor([["input", "attn", "mlp"].index(k) for k in graph.source_kinds])
    for i, kind in enumerate(["input", "attn", "mlp"]):
        groups[f"source:{kind}"] = base & (source_kinds == i)[:, None]
    layers = torch.tensor(graph.receiver_layers)
    for layer in range(graph.n_layers + 1):
        name = f"layer:{layer}" if layer < graph.n_layers else "layer:logits"
        groups[name] = base & (layers == layer)[None, :]
    return {name: cells for name, cells in groups.items() if bool(cells.any())}


# ---------------------------------------------------------------------- per-sample profile
@dataclass
class Profile:
    """One model's per-sample metric values on one edge group.

    Attributes:
        per_sample: metric name -> ``[n_samples]`` float64 numpy array (NaN where undefined).
        histograms: ``[n_samples, bins]`` counts of ``|score|`` on ``bin_edges``.
        bin_edges: ``[bins + 1]`` the shared histogram edges.
        node_entropy: ``[n_sources]`` each source's entropy averaged over samples (NaN
            for sources with no cell in the group).
        n_cells: cells per sample in the group.
    """

    per_sample: dict[str, np.ndarray]
    histograms: np.ndarray
    bin_edges: np.ndarray
    node_entropy: np.ndarray
    n_cells: int

    def value(self, metric: str) -> float:
        """The dataset value: the pooled histogram entropy, or the mean of the defined per-sample values."""
        if metric == "information_complexity":
            return float(histogram_entropy(torch.from_numpy(self.histograms.sum(0))))
        values = self.per_sample[metric]
        defined = values[~np.isnan(values)]
        return float(defined.mean()) if defined.size else math.nan


class _Layout:
    """Where each group's cells sit in one flat vector of the union of all groups' cells."""

    def __init__(self, groups: dict[str, Tensor]) -> None:
        union = torch.stack(list(groups.values())).any(0)
        self.n_sources = union.shape[0]
        self.flat = torch.nonzero(union.flatten()).flatten()  # positions in the flattened matrix
        self.sources = self.flat // union.shape[1]  # source row of each cell
        position = torch.full((union.numel(),), -1, dtype=torch.long)
        position[self.flat] = torch.arange(self.flat.numel())
        self.columns = {g: position[torch.nonzero(cells.flatten()).flatten()] for g, cells in groups.items()}

    def chunks(self, scores: EdgeScores, chunk_size: int | None,
               rows: Tensor | None = None) -> Iterator[tuple[slice, Iterator[tuple[str, Tensor]]]]:
        """For each chunk of samples: its positions, and the pairs ``(group, [samples, cells] float64)``, one at a time.

        ``rows``: the samples to read, in this order (default: all, in order); positions
        count within ``rows``. A NaN or infinite score is a NonFiniteError naming its sample.
        """
        if chunk_size is None:
            chunk_size = max(1, CHUNK_VALUES // max(self.flat.numel(), 1))
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ArgumentError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
        n = scores.n_samples if rows is None else int(rows.numel())
        for start in range(0, n, chunk_size):
            if rows is None:
                chunk = scores.per_sample[start:start + chunk_size]  # type: ignore[index]
            else:
                chunk = scores.per_sample[rows[start:start + chunk_size]]  # type: ignore[index]
            values = chunk.reshape(chunk.shape[0], -1).index_select(1, self.flat).double()
            finite = torch.isfinite(values).all(1)
            if not bool(finite.all()):
                row = int(torch.nonzero(~finite)[0])
                index = start + row if rows is None else int(rows[start + row])
                count, name = int((~torch.isfinite(values[row])).sum()), scores.sample_ids[index]  # type: ignore[index]
                raise NonFiniteError(
                    f"sample {name!r} (row {index}) holds {count} NaN or infinite scores; the "
                    "metrics need finite scores. Rescore it, or leave such samples out with "
                    "cd.attribute(..., nonfinite='drop')."
                )
            yield slice(start, start + chunk.shape[0]), ((g, values.index_select(1, columns))
                                                         for g, columns in self.columns.items())


def require_per_sample(scores: EdgeScores, caller: str) -> None:
    """Refuse scores without per-sample matrices or with fewer than 2 samples."""
    if not isinstance(scores, EdgeScores):
        raise ArgumentTypeError(f"{caller} takes EdgeScores, got {type(scores).__name__}.")
    if scores.per_sample is None:
        raise DataError(f"{caller}: these scores have no per-sample matrices; rerun cd.attribute(..., "
                        "per_sample=True) (the metrics are distributions over samples).")
    if scores.n_samples < 2:
        raise DataError(f"{caller}: needs at least 2 samples (diversity compares samples); got {scores.n_samples}.")


def check_bins(bins: object) -> None:
    """Refuse a bin count that is not a positive integer."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ArgumentError(f"bins must be a positive integer; got {bins!r}.")


def largest_magnitude(scores: EdgeScores, groups: dict[str, Tensor], chunk_size: int | None = None,
                      rows: Tensor | None = None) -> dict[str, float]:
    """The largest ``|score|`` in each group (the top of the histogram range), over ``rows`` (default all samples)."""
    top = {name: 0.0 for name in groups}
    for _, chunk in _Layout(groups).chunks(scores, chunk_size, rows):
        for g, v in chunk:
            if v.numel():
                top[g] = max(top[g], float(v.abs().max()))
    return top


def profile(
    scores: EdgeScores,
    groups: dict[str, Tensor],
    bin_tops: dict[str, float],
    bins: int = DEFAULT_BINS,
    chunk_size: int | None = None,
    rows: Tensor | None = None,
) -> dict[str, Profile]:
    """Per-sample metric values of ``scores`` on each group, in two passes over chunks of samples.

    ``bin_tops[group]`` is the upper end of that group's histogram range (shared with
    the model compared against; see :func:`largest_magnitude`). ``rows``: the samples
    to use, in this order (default: all); the per-sample arrays follow that order.
    """
    require_per_sample(scores, "metrics")
    check_bins(bins)
    n = scores.n_samples if rows is None else int(rows.numel())
    # Outputs are allocated up front and filled in place: long-lived small allocations made
    # between the large per-chunk temporaries would fragment the heap and keep it growing.
    values = {g: {m: torch.full((n,), math.nan, dtype=torch.float64) for m in PER_SAMPLE_METRICS} for g in groups}
    histograms = {g: torch.zeros(n, bins, dtype=torch.float64) for g in groups}
    nodes = {g: torch.zeros(scores.graph.n_sources, dtype=torch.float64) for g in groups}
    node_counts = {g: torch.zeros(scores.graph.n_sources, dtype=torch.float64) for g in groups}
    z_sums = {g: torch.zeros(int(cells.sum()), dtype=torch.float64) for g, cells in groups.items()}
    valid = {g: 0 for g in groups}
    edges = {g: torch.linspace(0.0, top if top > 0 else 1.0, bins + 1, dtype=torch.float64)
             for g, top in bin_tops.items()}
    layout = _Layout(groups)
    sources = {g: layout.sources[columns] for g, columns in layout.columns.items()}

    def standardized(v: Tensor) -> tuple[Tensor, Tensor]:
        std = v.std(-1, unbiased=False, keepdim=True)
        ok = std[:, 0] > 0
        return torch.where(ok[:, None], (v - v.mean(-1, keepdim=True)) / std.clamp_min(1e-300), 0.0), ok

    # pass 1: everything per sample, and the running sums diversity needs
    for part, chunk in layout.chunks(scores, chunk_size, rows):
        for g, v in chunk:
            out = values[g]
            out["intensity"][part] = v.abs().mean(-1)
            out["kurtosis"][part] = excess_kurtosis(v)
            out["gini"][part] = gini(v)
            out["effective_edges"][part] = effective_edges(v)
            h = _node_entropy(v, sources[g], layout.n_sources)  # [chunk, n_sources]
            out["node_entropy"][part] = h.nanmean(-1)
            defined = ~torch.isnan(h)
            nodes[g] += torch.where(defined, h, 0.0).sum(0)
            node_counts[g] += defined.sum(0)
            z, ok = standardized(v)
            z_sums[g] += z.sum(0)
            valid[g] += int(ok.sum())
    # pass 2: diversity (needs the sums) and histograms (need the shared range)
    for part, chunk in layout.chunks(scores, chunk_size, rows):
        for g, v in chunk:
            m = v.shape[1]
            z, ok = standardized(v)
            others = max(valid[g] - 1, 1)
            mean_corr = ((z @ z_sums[g]) - m) / (m * others)
            defined = ok & (valid[g] >= 2)
            values[g]["diversity"][part] = torch.where(defined, 1.0 - mean_corr, math.nan)
            index = torch.bucketize(v.abs(), edges[g][1:-1], right=True)  # [chunk, m] in 0..bins-1
            histograms[g][part].scatter_add_(1, index, torch.ones_like(v))
            values[g]["information_complexity"][part] = histogram_entropy(histograms[g][part])
    result = {}
    for g, cells in groups.items():
        node_values = torch.where(node_counts[g] > 0, nodes[g] / node_counts[g].clamp_min(1), math.nan)
        result[g] = Profile({m: values[g][m].numpy() for m in PER_SAMPLE_METRICS}, histograms[g].numpy(),
                            edges[g].numpy(), node_values.numpy(), int(cells.sum()))
    return result


def profile_histogram(
    scores: EdgeScores, groups: dict[str, Tensor], bin_tops: dict[str, float], bins: int,
    chunk_size: int | None = None, rows: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Pooled ``[bins]`` counts of ``|score|`` per group on ``bins`` equal bins from 0 to ``bin_tops[group]``."""
    counts = {g: torch.zeros(bins, dtype=torch.float64) for g in groups}
    for _, chunk in _Layout(groups).chunks(scores, chunk_size, rows):
        for g, v in chunk:
            top = bin_tops[g] if bin_tops[g] > 0 else 1.0
            index = (v.abs().flatten() / top * bins).long().clamp_(0, bins - 1)
            counts[g] += torch.bincount(index, minlength=bins).double()
    return {g: c.numpy() for g, c in counts.items()}


def mean_scores(scores: EdgeScores, rows: Tensor | None = None,
                chunk_size: int | None = None) -> Float[Tensor, "n_sources n_receivers"]:
    """The mean score matrix over ``rows`` (default: the stored ``scores.mean``), read in chunks."""
    if rows is None:
        return scores.mean
    everything = {"all": torch.ones(scores.graph.n_sources, scores.graph.n_receivers, dtype=torch.bool)}
    total = torch.zeros(scores.graph.n_sources * scores.graph.n_receivers, dtype=torch.float64)
    for _, chunk in _Layout(everything).chunks(scores, chunk_size, rows):
        for _, v in chunk:
            total += v.sum(0)
    return (total / max(int(rows.numel()), 1)).to(scores.mean.dtype).reshape(scores.mean.shape)


def summarize(
    scores: EdgeScores,
    *,
    structural_zeros: bool = False,
    breakdown: bool = False,
    bins: int = DEFAULT_BINS,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """One model's dataset values: ``{group: {metric: value}}``.

    The histogram range is this model's own largest ``|score|``, so information
    complexity here is not comparable across models; :func:`circuitdiff.compare`
    shares the bins.
    """
    require_per_sample(scores, "summarize")
    groups = edge_groups(scores.graph, structural_zeros, breakdown)
    profiles = profile(scores, groups, largest_magnitude(scores, groups, chunk_size), bins, chunk_size)
    return {g: {m: p.value(m) for m in PER_SAMPLE_METRICS} for g, p in profiles.items()}
