"""Computing the metrics on large score files: edge groups, chunks of samples, profiles.

:func:`profile` reads the per-sample scores in chunks and gives every registered metric
each chunk (see :mod:`circuitdiff.metrics.base`); :func:`summarize` is one model's
dataset values. Memory: see :mod:`circuitdiff.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, NonFiniteError
from circuitdiff.graph import AttributionGraph
from circuitdiff.metrics.base import Chunk, Metric, PooledMetric, available, get
from circuitdiff.scores import EdgeScores
from circuitdiff.typecheck import shape_checked

__all__ = ["DEFAULT_BINS", "CHUNK_VALUES", "Profile", "edge_groups", "profile", "profile_histogram",
           "require_per_sample", "check_bins", "largest_magnitude", "mean_scores", "summarize"]

#: Bins of the information-complexity histograms: equal-width ``|score|`` bins from 0 to
#: the largest ``|score|`` of the two models compared (shared by both, as in :func:`circuitdiff.compare`).
DEFAULT_BINS = 100
#: Values (cells x samples) read at a time when ``chunk_size`` is None: 8 MiB of float64.
CHUNK_VALUES = 1 << 20


@shape_checked
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
        definitions: metric name -> the :class:`~circuitdiff.metrics.Metric` that computed it.
    """

    per_sample: dict[str, np.ndarray]
    histograms: np.ndarray
    bin_edges: np.ndarray
    node_entropy: np.ndarray
    n_cells: int
    definitions: dict[str, Metric] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        """The dataset value: a pooled metric's own, else the mean of the defined per-sample values."""
        definition = self.definitions.get(metric)
        if isinstance(definition, PooledMetric):
            return definition.pooled_value(self)
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


class _GroupProfile:
    """One edge group's profile while the chunks stream by.

    Every output is allocated up front: long-lived small allocations made between the
    large per-chunk temporaries would fragment the heap and keep it growing. (A two-pass
    metric allocates its own ``O(cells)`` state once, at the first chunk.)
    """

    def __init__(self, names: Sequence[str], n: int, bin_edges: Tensor, sources: Tensor, n_sources: int) -> None:
        self.definitions = {name: get(name) for name in names}
        for name, metric in self.definitions.items():
            if metric.passes not in (1, 2):
                raise ArgumentError(f"metric {name!r} has passes={metric.passes!r}; a metric makes 1 or 2 passes.")
        self.values = {name: torch.full((n,), math.nan, dtype=torch.float64) for name in names}
        self.histograms = torch.zeros(n, bin_edges.numel() - 1, dtype=torch.float64)
        self.node_sums = torch.zeros(n_sources, dtype=torch.float64)
        self.node_counts = torch.zeros(n_sources, dtype=torch.float64)
        self.bin_edges, self.sources, self.n_sources = bin_edges, sources, n_sources

    def update(self, step: int, part: slice, values: Tensor) -> None:
        """Pass ``step`` (0 or 1) over the samples ``part``: their ``[k, cells]`` float64 scores."""
        chunk = Chunk(values, self.sources, self.n_sources, self.bin_edges)
        if step == 0:
            self.histograms[part] = chunk.histogram
            h = chunk.node_entropy
            defined = ~torch.isnan(h)
            self.node_sums += torch.where(defined, h, 0.0).sum(0)
            self.node_counts += defined.sum(0)
        for name, metric in self.definitions.items():
            if metric.passes == step + 1:
                self.values[name][part] = _one_per_sample(name, metric.per_sample(chunk), values.shape[0])
            elif step == 0:
                metric.observe(chunk)

    def result(self, n_cells: int) -> Profile:
        """The finished :class:`Profile`."""
        nodes = torch.where(self.node_counts > 0, self.node_sums / self.node_counts.clamp_min(1), math.nan)
        return Profile({m: v.numpy() for m, v in self.values.items()}, self.histograms.numpy(),
                       self.bin_edges.numpy(), nodes.numpy(), n_cells, self.definitions)


def _one_per_sample(name: str, values: object, k: int) -> Tensor:
    """A metric's ``per_sample`` result as ``[k]`` float64, or the error naming the metric."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.shape != (k,):
        raise ArgumentError(f"metric {name!r}: per_sample returned shape {tuple(values.shape)} for a chunk of {k} "
                            f"samples; it must return one value per sample ([{k}]).")
    return values


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
    metrics: Sequence[str] | None = None,
) -> dict[str, Profile]:
    """Per-sample metric values of ``scores`` on each group, in one or two passes over chunks of samples.

    ``bin_tops[group]`` is the upper end of that group's histogram range (shared with
    the model compared against; see :func:`largest_magnitude`). ``rows``: the samples
    to use, in this order (default: all); the per-sample arrays follow that order.
    ``metrics``: the names to compute (default: every registered metric,
    :func:`~circuitdiff.metrics.available`).
    """
    require_per_sample(scores, "metrics")
    check_bins(bins)
    names = available() if metrics is None else list(metrics)
    n = scores.n_samples if rows is None else int(rows.numel())
    layout = _Layout(groups)
    states = {g: _GroupProfile(names, n, torch.linspace(0.0, bin_tops[g] if bin_tops[g] > 0 else 1.0, bins + 1,
                                                        dtype=torch.float64), layout.sources[columns], layout.n_sources)
              for g, columns in layout.columns.items()}
    passes = max((m.passes for state in states.values() for m in state.definitions.values()), default=1)
    for step in range(passes):
        for part, chunk in layout.chunks(scores, chunk_size, rows):
            for g, v in chunk:
                states[g].update(step, part, v)
    return {g: state.result(int(groups[g].sum())) for g, state in states.items()}


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


@shape_checked
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
    """One model's dataset values: ``{group: {metric: value}}``, every registered metric.

    The histogram range is this model's own largest ``|score|``, so information
    complexity here is not comparable across models; :func:`circuitdiff.compare`
    shares the bins.
    """
    require_per_sample(scores, "summarize")
    groups = edge_groups(scores.graph, structural_zeros, breakdown)
    profiles = profile(scores, groups, largest_magnitude(scores, groups, chunk_size), bins, chunk_size)
    return {g: {m: p.value(m) for m in p.per_sample} for g, p in profiles.items()}
