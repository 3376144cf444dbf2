"""The metrics' building blocks: pure functions over score tensors, computed in float64.

Each reduces the last axis (the cells of one sample) and keeps any leading axes; a value
that is undefined (constant or all-zero input) is NaN. The built-in metrics of
:mod:`circuitdiff.metrics` call these; use them on any matrix (e.g. mean scores).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdiff.typecheck import shape_checked

__all__ = ["excess_kurtosis", "gini", "effective_edges", "histogram_entropy", "node_entropy", "node_entropy_of_cells",
           "diversity", "relative_change", "top_k_size"]


@shape_checked
def excess_kurtosis(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """``m4 / m2^2 - 3`` over the last axis (population moments); NaN if constant."""
    values = values.double()
    centered = values - values.mean(-1, keepdim=True)
    m2 = centered.pow(2).mean(-1)
    m4 = centered.pow(4).mean(-1)
    return torch.where(m2 > 0, m4 / m2.pow(2) - 3.0, torch.full_like(m2, math.nan))


@shape_checked
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


@shape_checked
def effective_edges(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """``exp(entropy(|v| / sum |v|))`` over the last axis; NaN if all zero."""
    a = values.double().abs()
    total = a.sum(-1, keepdim=True)
    h = _entropy(a / total.clamp_min(torch.finfo(a.dtype).tiny))
    return torch.where(total[..., 0] > 0, h.exp(), torch.full_like(h, math.nan))


@shape_checked
def histogram_entropy(counts: Float[Tensor, "... bins"]) -> Float[Tensor, "..."]:
    """Shannon entropy (nats) of histogram counts over the last axis; NaN if empty."""
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    h = _entropy(counts / total.clamp_min(1.0))
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, math.nan))


@shape_checked
def node_entropy(
    matrix: Float[Tensor, "... n_sources n_receivers"], cells: Bool[Tensor, "n_sources n_receivers"]
) -> Float[Tensor, "... n_sources"]:
    """Entropy of each source's ``|scores|`` over its cells, normalised per source.

    NaN for sources with no cell or no mass. A one-hot row gives 0, a uniform row
    ``log(number of cells)``.
    """
    rows = torch.nonzero(cells, as_tuple=True)[0].to(matrix.device)
    values = matrix[..., cells]
    h = node_entropy_of_cells(values.reshape(-1, values.shape[-1]), rows, cells.shape[0])
    return h.reshape(*matrix.shape[:-2], cells.shape[0])


def node_entropy_of_cells(
    values: Float[Tensor, "k m"], sources: Int[Tensor, "m"], n_sources: int
) -> Float[Tensor, "k n_sources"]:
    """:func:`node_entropy` from the values of ``m`` cells (``[k, m]``) and each cell's source row."""
    a = values.double().abs()
    k = a.shape[0]
    total = a.new_zeros(k, n_sources).index_add_(1, sources, a)
    p = a / total[:, sources].clamp_min(torch.finfo(a.dtype).tiny)
    h = a.new_zeros(k, n_sources).index_add_(1, sources, _minus_p_log_p(p))
    has_cells = torch.bincount(sources, minlength=n_sources) > 0
    return torch.where((total > 0) & has_cells, h, math.nan)


@shape_checked
def diversity(values: Float[Tensor, "n_samples n"]) -> float:
    """``1 -`` the mean pairwise Pearson correlation between the rows (in memory; a reference)."""
    c = np.corrcoef(values.double().numpy())
    n = c.shape[0]
    return float(1.0 - (c.sum() - np.trace(c)) / (n * (n - 1)))


@shape_checked
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


def top_k_size(requested: int, n_edges: int) -> tuple[int, bool]:
    """``(k, clamped)``: the size of a top-k set of ``n_edges`` edges.

    ``requested`` capped at ``n_edges``; but where it would reach every edge of more than
    one (any top-k overlap would then be 1 whatever the scores), half the edges instead,
    with ``clamped`` True so reports can say so.
    """
    clamped = requested >= n_edges > 1
    return (n_edges // 2 if clamped else min(requested, n_edges)), clamped
