"""Pooling one metric's change over many settings: the paper's summary and a random-effects meta-analysis.

The paper states its headline over 41 settings (diversity up 7.6% on average, up in
95.1% of settings). :func:`meta_analysis` gives, per metric, that summary (mean relative
change, fraction of settings where the metric went up) and the DerSimonian-Laird
random-effects pooled difference, which weighs each setting by its precision and
allows the true change to differ between settings:

- each setting contributes its difference ``y_i`` (tuned - base) and a variance
  ``v_i = (half-width of its interval / z)^2``, the interval being the comparison's
  bootstrap interval at its ``confidence`` (BCa intervals need not be symmetric; the
  half-width is their average);
- ``Q = sum w_i (y_i - y_fixed)^2`` with ``w_i = 1 / v_i``; ``tau^2 = max(0, (Q - (k - 1)) / C)``,
  ``C = sum w_i - sum w_i^2 / sum w_i``; ``I^2 = max(0, (Q - (k - 1)) / Q)``;
- the pooled difference weighs by ``1 / (v_i + tau^2)``; its interval and p-value are
  normal (``z``); ``Q``'s p-value is chi-square with ``k - 1`` degrees of freedom.

Settings with a non-finite difference or an interval of zero width cannot be weighed;
they are left out of the pool and named (``Pooled.left_out``). With fewer than two
settings left the pooled values are NaN. The interval is normal, which is optimistic for
a handful of settings (Knapp-Hartung's t-based interval is wider; not computed here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from circuitdiff.comparison import Comparison
from circuitdiff.errors import ArgumentError

__all__ = ["Pooled", "PooledEstimate", "dersimonian_laird", "meta_analysis"]


@dataclass(frozen=True)
class PooledEstimate:
    """A DerSimonian-Laird random-effects estimate (see the module docstring)."""

    estimate: float
    standard_error: float
    ci_low: float
    ci_high: float
    p_value: float
    tau2: float
    i2: float
    q: float
    q_p_value: float


def dersimonian_laird(estimates: Sequence[float], variances: Sequence[float],
                      confidence: float = 0.95) -> PooledEstimate:
    """The random-effects pooled estimate of ``estimates`` with sampling ``variances``."""
    y, v = np.asarray(estimates, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    if y.shape != v.shape or y.ndim != 1:
        raise ArgumentError(f"estimates and variances must be 1-D of one length; got {y.shape} and {v.shape}.")
    if not 0 < confidence < 1:
        raise ArgumentError(f"confidence must be in (0, 1); got {confidence!r}.")
    nan = PooledEstimate(*([math.nan] * 9))
    if y.size < 2 or not np.all(np.isfinite(y)) or not np.all(np.isfinite(v)) or np.any(v <= 0):
        return nan
    w = 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    df = y.size - 1
    c = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
    tau2 = max(0.0, (q - df) / c)
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    w_star = 1.0 / (v + tau2)
    estimate = float(np.sum(w_star * y) / np.sum(w_star))
    se = float(math.sqrt(1.0 / np.sum(w_star)))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = float(2 * stats.norm.sf(abs(estimate) / se))
    return PooledEstimate(estimate, se, estimate - z * se, estimate + z * se, p, tau2, i2, q,
                          float(stats.chi2.sf(q, df)))


@dataclass(frozen=True)
class Pooled:
    """One metric over the settings of a study.

    ``mean_percent_change``: the average of the settings' relative changes (the paper's
    headline); ``fraction_up``: the share of settings whose difference is positive; both
    over the settings with a finite difference and relative change (``n_summarised``).
    ``pooled``: the random-effects estimate of the difference, over the settings not in
    ``left_out`` (non-finite difference or zero-width interval). ``settings``: the
    names, ``differences`` and ``intervals`` per setting (the forest plot's rows).
    """

    metric: str
    group: str
    settings: tuple[str, ...]
    differences: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]
    mean_percent_change: float
    fraction_up: float
    n_summarised: int
    pooled: PooledEstimate
    left_out: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def meta_analysis(comparisons: Mapping[str, Comparison], group: str = "all") -> list[Pooled]:
    """Every metric on ``group`` pooled over the named comparisons (one per setting), in metric order."""
    if not comparisons:
        raise ArgumentError("meta_analysis needs at least one comparison.")
    names = list(comparisons)
    by_metric: dict[str, list[Any]] = {}
    for name in names:
        rows = [row for row in comparisons[name].rows if row.group == group]
        if not rows:
            raise ArgumentError(f"setting {name!r} has no rows on group {group!r}.")
        for row in rows:
            by_metric.setdefault(row.metric, []).append(row)
    result = []
    for metric, rows in by_metric.items():
        if len(rows) != len(names):
            raise ArgumentError(f"metric {metric!r} is missing from some settings; compare them all with the same "
                                "registered metrics.")
        confidences = [float(comparisons[name].settings.get("confidence", 0.95)) for name in names]
        z = np.array([stats.norm.ppf(0.5 + c / 2) for c in confidences])
        differences = np.array([r.difference for r in rows], dtype=np.float64)
        variances = np.array([((r.ci_high - r.ci_low) / 2) ** 2 for r in rows], dtype=np.float64) / z ** 2
        changes = np.array([r.percent_change for r in rows], dtype=np.float64)
        summarised = np.isfinite(differences) & np.isfinite(changes)
        weighable = np.isfinite(differences) & np.isfinite(variances) & (variances > 0)
        result.append(Pooled(
            metric, group, tuple(names), tuple(float(d) for d in differences),
            tuple((float(r.ci_low), float(r.ci_high)) for r in rows),
            float(changes[summarised].mean()) if summarised.any() else math.nan,
            float(np.mean(differences[summarised] > 0)) if summarised.any() else math.nan,
            int(summarised.sum()),
            dersimonian_laird(differences[weighable], variances[weighable], confidences[0]),
            tuple(name for name, ok in zip(names, weighable) if not ok),
        ))
    return result
