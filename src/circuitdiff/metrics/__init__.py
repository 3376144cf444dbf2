"""Metrics: how two models' edge-score distributions differ (method.md, section 5).

Pure functions over score tensors; nothing here runs a model. Every metric is computed
on a set of *cells* of the ``[n_sources, n_receivers]`` score matrix: by default the
graph's real edges (``structural_zeros=False``), or every cell including the structural
zeros (``structural_zeros=True``, the paper's full-matrix convention, which dilutes
intensity and inflates kurtosis as the zero fraction grows).

Each metric is one class registered by name (:class:`Metric`, :func:`register_metric`,
:func:`available`); comparisons, reports and plots list whatever is registered, plugins
(entry-point group ``circuitdiff.metrics``) included. The built-ins, per sample (``W(k)``
is sample ``k``'s matrix restricted to the cells):

- ``intensity``: mean ``|W(k)|``. The dataset value (mean over samples) is the paper's
  activation intensity.
- ``information_complexity``: the Shannon entropy (nats) of the histogram of ``|W|``
  pooled over samples, on explicit shared bins (``bins`` equal bins from 0 to the
  largest ``|score|`` of the two models compared). Per sample: the same entropy of the
  sample's own histogram (used for the paired test; the dataset value is the pooled one).
- ``kurtosis``: excess kurtosis ``m4 / m2^2 - 3`` of the signed entries of ``W(k)``
  (population moments); averaged over samples as in the paper.
- ``diversity``: ``1 -`` the mean Pearson correlation of ``W(k)`` with every other
  sample's; the mean over samples is the paper's ``1 -`` mean pairwise correlation.
- ``node_entropy``: for each source ``o``, the entropy of ``|W(k)[o, :]|`` normalised over
  its cells (its outgoing edges), averaged over sources; per-node values are kept.
- ``gini``: Gini coefficient of ``|W(k)|`` (0 = all equal, near 1 = one edge has it all).
- ``effective_edges``: ``exp(entropy(|W(k)| / sum |W(k)|))``, between 1 and the number of cells.

Every dataset value except ``information_complexity`` (a :class:`PooledMetric`) is the
mean of the per-sample values, so bootstrap intervals and paired tests use the
per-sample values directly. Samples where a metric is undefined (all-zero or constant
scores) give NaN and are left out of its mean, with the count reported.

**Memory.** Scores are read in chunks of ``chunk_size`` samples (default: as many as
make ``CHUNK_VALUES`` = 1M values, at least one): the temporaries are
``O(chunk_size * n_cells)`` float64 (Gini sorts each sample). Across
chunks only ``O(n_cells)`` running sums per edge group (for diversity), an
``[n_samples, bins]`` histogram and a few numbers per sample are kept. Diversity needs
a second pass over the chunks, so sources must be re-readable.
"""

from circuitdiff.metrics.base import (
    Chunk,
    Metric,
    PooledMetric,
    SampleMetric,
    available,
    get,
    register_metric,
    registry,
)
from circuitdiff.metrics.builtin import (
    Diversity,
    EffectiveEdges,
    Gini,
    InformationComplexity,
    Intensity,
    Kurtosis,
    NodeEntropy,
)
from circuitdiff.metrics.functions import (
    diversity,
    effective_edges,
    excess_kurtosis,
    gini,
    histogram_entropy,
    node_entropy,
    relative_change,
)
from circuitdiff.metrics.streaming import (
    CHUNK_VALUES,
    DEFAULT_BINS,
    Profile,
    check_bins,
    edge_groups,
    largest_magnitude,
    mean_scores,
    profile,
    profile_histogram,
    require_per_sample,
    summarize,
)

__all__ = [
    # the registry and what a metric is
    "Metric",
    "PooledMetric",
    "SampleMetric",
    "Chunk",
    "register_metric",
    "available",
    "get",
    "registry",
    # the built-in metrics, in report order
    "Intensity",
    "InformationComplexity",
    "Kurtosis",
    "Diversity",
    "NodeEntropy",
    "Gini",
    "EffectiveEdges",
    # computing them on score files
    "DEFAULT_BINS",
    "CHUNK_VALUES",
    "Profile",
    "edge_groups",
    "profile",
    "profile_histogram",
    "require_per_sample",
    "check_bins",
    "largest_magnitude",
    "mean_scores",
    "summarize",
    # building blocks
    "excess_kurtosis",
    "gini",
    "effective_edges",
    "histogram_entropy",
    "node_entropy",
    "diversity",
    "relative_change",
]
