"""The seven built-in metrics (method.md, section 5), registered in the order reports list them.

Each class is the whole definition of its metric: the first docstring line is its
description, then its units, direction and per-sample computation (``W(k)`` is sample
``k``'s scores on the group's cells).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitdiff.metrics.base import Chunk, SampleMetric, register_metric
from circuitdiff.metrics.functions import effective_edges, excess_kurtosis, gini, histogram_entropy

if TYPE_CHECKING:
    from circuitdiff.metrics.streaming import Profile

__all__ = ["Intensity", "InformationComplexity", "Kurtosis", "Diversity", "NodeEntropy", "Gini", "EffectiveEdges"]


@register_metric("intensity")
class Intensity(SampleMetric):
    """Mean |score| over the cells (the paper's activation intensity).

    Per sample: mean ``|W(k)|``. Scales with the scores.
    """

    units = "score units"
    higher_means = "edges matter more on average"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return chunk.values.abs().mean(-1)


@register_metric("information_complexity")
class InformationComplexity(SampleMetric):
    """Entropy of the |score| histogram on the bins shared by the two models.

    Per sample: the entropy of the sample's own histogram (used by the test). Dataset
    value: the entropy of the histogram pooled over the samples, not the mean of the
    per-sample values; its bootstrap interval resamples the samples' histograms.
    """

    units = "nats"
    higher_means = "|score| spreads over more bins"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return histogram_entropy(chunk.histogram)

    def pooled_value(self, profile: Profile) -> float:
        """The entropy of the histogram pooled over all the samples of ``profile``."""
        return float(histogram_entropy(torch.from_numpy(profile.histograms.sum(0))))

    def resampled_values(self, profile: Profile, index: Int[np.ndarray, "... n"]) -> Float[np.ndarray, "..."]:
        """The pooled entropy of each resample ``index[..., :]`` of the samples."""
        return histogram_entropy(torch.from_numpy(_resampled_sum(profile.histograms, index))).numpy()


@register_metric("kurtosis")
class Kurtosis(SampleMetric):
    """Excess kurtosis m4 / m2^2 - 3 of the signed scores (population moments).

    Averaged over samples as in the paper; NaN for constant samples.
    """

    units = "1"
    higher_means = "heavier tails: a few edges far from the rest"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return excess_kurtosis(chunk.values)


@register_metric("diversity")
class Diversity(SampleMetric):
    """1 - mean Pearson correlation with the other samples.

    Per sample: ``1 -`` the mean correlation of ``W(k)`` with every other sample's; the
    mean over samples is the paper's ``1 -`` mean pairwise correlation. Two passes: the
    first sums the standardised samples, so only ``O(cells)`` numbers are kept.
    """

    units = "1"
    higher_means = "samples use less similar edge patterns"
    passes = 2

    def __init__(self) -> None:
        self.total: Tensor | None = None  # [m]: sum of the standardised samples
        self.valid = 0  # samples that are not constant

    def observe(self, chunk: Chunk) -> None:
        """Add the chunk's standardised samples to the running sum."""
        z, ok = _standardized(chunk.values)
        if self.total is None:
            self.total = torch.zeros(z.shape[1], dtype=torch.float64)
        self.total += z.sum(0)
        self.valid += int(ok.sum())

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        m = chunk.values.shape[1]
        z, ok = _standardized(chunk.values)
        others = max(self.valid - 1, 1)
        mean_corr = ((z @ self.total) - m) / (m * others)
        return torch.where(ok & (self.valid >= 2), 1.0 - mean_corr, math.nan)


@register_metric("node_entropy")
class NodeEntropy(SampleMetric):
    """Mean over source nodes of the entropy of each node's outgoing |score|.

    ``H_o = -sum_i p_oi log p_oi`` with ``p_oi = |W(k)[o, i]| / sum_i |W(k)[o, i]|`` over
    ``o``'s cells; sources without a cell or mass are skipped.
    """

    units = "nats"
    higher_means = "nodes spread their influence over more edges"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return chunk.node_entropy.nanmean(-1)


@register_metric("gini")
class Gini(SampleMetric):
    """Gini coefficient of |score| (0: all equal, near 1: one edge has it all)."""

    units = "1"
    higher_means = "|score| concentrates on fewer edges"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return gini(chunk.values)


@register_metric("effective_edges")
class EffectiveEdges(SampleMetric):
    """exp(entropy of |score| / sum |score|): between 1 and the number of cells."""

    units = "edges"
    higher_means = "|score| spreads over more edges"

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        return effective_edges(chunk.values)


def _standardized(values: Tensor) -> tuple[Tensor, Tensor]:
    """Each row minus its mean, over its (population) std; 0 and ``ok`` False for constant rows."""
    std = values.std(-1, unbiased=False, keepdim=True)
    ok = std[:, 0] > 0
    return torch.where(ok[:, None], (values - values.mean(-1, keepdim=True)) / std.clamp_min(1e-300), 0.0), ok


def _resampled_sum(histograms: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``histograms[index].sum(-2)`` for resample indices ``[..., n]``, without the ``[..., n, bins]`` temporary."""
    rows = index.reshape(-1, index.shape[-1]).astype(int)
    counts = np.zeros((rows.shape[0], histograms.shape[0]))
    np.add.at(counts, (np.arange(rows.shape[0])[:, None], rows), 1.0)
    return (counts @ histograms).reshape(*index.shape[:-1], histograms.shape[1])
