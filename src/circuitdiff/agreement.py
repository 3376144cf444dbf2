"""Agreement between two sets of edge scores: is an approximation trustworthy here?

Typical use compares a cheap estimate with a reference on the same model and data::

    report = agreement(eap_scores, exact_scores)
    print(report.to_markdown())

Only the real edges (``graph.edge_mask``) of the two ``.mean`` matrices are compared.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError
from circuitdiff.metrics.functions import top_k_size
from circuitdiff.report import agreement_markdown
from circuitdiff.scores import EdgeScores

__all__ = ["DEFAULT_K", "Agreement", "agreement"]

#: ``k`` used when none is given (half the edges when it would reach every edge).
DEFAULT_K = 100


@dataclass(frozen=True)
class Agreement:
    """How well ``scores`` agree with ``reference`` on the real edges.

    Attributes:
        pearson: Pearson correlation of the mean edge scores; NaN when either side is
            constant (or there are fewer than 2 edges), where it is undefined.
        spearman: Spearman rank correlation (same NaN rule). 1 means the two rank the
            edges identically, which is what circuit selection by score depends on.
        top_k_overlap: ``|top_k(|scores|) ∩ top_k(|reference|)| / k``, in [0, 1]; ties
            in ``|score|`` are broken by row-major edge order.
        k: the ``k`` used.
        k_clamped: the default ``k`` (100) would reach every edge, where the overlap is 1
            whatever the scores, so half the edges were used.
        sign_agreement: among edges where both scores are nonzero, the fraction with the
            same sign (does the estimate say "helps" where the reference does?); NaN if
            no edge is nonzero in both.
        top_k_sign_agreement: the same over the reference's top-``k`` edges by
            ``|reference|`` only, where the sign matters most.
        n_edges: number of real edges compared.
    """

    pearson: float
    spearman: float
    top_k_overlap: float
    k: int
    sign_agreement: float
    top_k_sign_agreement: float
    n_edges: int
    k_clamped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (NaN stays ``float('nan')``)."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A two-column Markdown table of the numbers (see :func:`circuitdiff.report.agreement_markdown`)."""
        return agreement_markdown(self)

    def __str__(self) -> str:
        return (
            f"Agreement over {self.n_edges} edges: pearson={self.pearson:.3f}, spearman={self.spearman:.3f}, "
            f"top-{self.k} overlap={self.top_k_overlap:.3f}, sign agreement={self.sign_agreement:.3f} "
            f"(top-{self.k}: {self.top_k_sign_agreement:.3f})"
        )


def _edge_values(scores: EdgeScores, name: str) -> np.ndarray:
    if not isinstance(scores, EdgeScores):
        raise ArgumentTypeError(f"agreement: {name} must be an EdgeScores, got {type(scores).__name__}.")
    values = scores.edge_values().detach().to("cpu").double().numpy()
    if np.isnan(values).any():
        raise DataError(
            f"agreement: {name} has {int(np.isnan(values).sum())} NaN edge score(s); the attribution run "
            "produced NaN (check the objective and dtype) — rerun it before comparing."
        )
    return values


def _correlation(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|values|``, ties in edge order."""
    return np.argsort(-np.abs(values), kind="stable")[:k]


def _sign_fraction(a: np.ndarray, b: np.ndarray) -> float:
    both = (a != 0) & (b != 0)
    if not both.any():
        return float("nan")
    return float(np.mean(np.sign(a[both]) == np.sign(b[both])))


def agreement(scores: EdgeScores, reference: EdgeScores, *, k: int | None = None) -> Agreement:
    """Compare ``scores`` (e.g. EAP) with ``reference`` (e.g. exact patching) edge by edge.

    Args:
        scores: the scores to judge; ``scores.mean`` ``[n_sources, n_receivers]``.
        reference: the scores taken as truth, on the same graph.
        k: size of the top sets, ``1 <= k <= n_edges``; default 100, or half the edges
            when 100 would reach every edge (``k_clamped``).

    Returns:
        An :class:`Agreement`. Correlations are NaN (without warnings) when either side
        is constant; sign agreements are NaN when no compared edge is nonzero in both.

    Raises:
        DataError: the graphs differ (different models, or one head-level and one
            layer-level: call ``.to_layer_level()`` on the head-level one), or a score is NaN.
        ArgumentError: ``k`` out of range (ArgumentTypeError: not an integer).
    """
    a = _edge_values(scores, "scores")
    b = _edge_values(reference, "reference")
    if scores.graph != reference.graph:
        ga, gb = scores.graph, reference.graph
        if ga.level != gb.level and ga.layer_level() == gb.layer_level():
            fix = "call .to_layer_level() on the head-level one to compare at layer level."
        else:
            fix = "compare scores of the same model (same layers, heads and block layout) at the same level."
        raise DataError(f"agreement: the scores are on different graphs ({ga!r} vs {gb!r}); {fix}")
    n_edges = int(a.size)
    clamped = False
    if k is None:
        k, clamped = top_k_size(DEFAULT_K, n_edges)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ArgumentTypeError(f"agreement: k must be an int, got {type(k).__name__}.")
    if not 1 <= k <= n_edges:
        raise ArgumentError(f"agreement: k={k} is out of range; use 1 <= k <= {n_edges} (the number of edges).")
    k = int(k)

    top_a, top_b = _top_k(a, k), _top_k(b, k)
    overlap = len(set(top_a.tolist()) & set(top_b.tolist())) / k
    return Agreement(
        pearson=_correlation(stats.pearsonr, a, b),
        spearman=_correlation(stats.spearmanr, a, b),
        top_k_overlap=float(overlap),
        k=k,
        sign_agreement=_sign_fraction(a, b),
        top_k_sign_agreement=_sign_fraction(a[top_b], b[top_b]),
        n_edges=n_edges,
        k_clamped=clamped,
    )
