"""Trend statistics of a metric along a checkpoint series.

Each checkpoint of a training run is compared with the initial model
(:func:`circuitdiff.compare`), which gives, per metric, a difference (checkpoint -
initial) with its confidence interval at every step. :func:`trend` summarises that
series:

- **Monotone trend**: the Mann-Kendall test, i.e. Kendall's tau between the step and the
  difference (``scipy.stats.kendalltau``; exact p-values for short series without
  ties), two-sided.
- **First significant step**: the first step whose interval excludes 0. The intervals
  are marginal, one per step, with no correction across steps: over K steps the chance
  that some interval excludes 0 by chance grows towards ``1 - 0.95^K``.
- **Correlation with accuracy and reward** across the steps: Kendall's tau too (exact
  p-values; where at least three steps have both values).

Every checkpoint is compared with the same initial samples, so the differences share
the initial model's value: a trend in the differences is a trend in the checkpoints'
own metric. :meth:`circuitdiff.Trajectory.trends` starts the series at the initial
step with difference 0 (the initial model's own value), so a change made early and
kept counts towards the trend. The test's false-positive rate is at most its alpha when
the metric's values at every step, the initial one included, are exchangeable: the
same model measured again with independent noise (``tests/test_trajectory.py`` checks
it). A change made before the first checkpoint and kept is, by design, a trend. Checkpoints of one run are serially
dependent; a metric that wanders as a random walk moves monotonically often enough to
be called a trend (38% of 2,000 driftless Gaussian random walks of 8 steps, at alpha 0.05). Read
"up" as "moved up along the run", not as a drift beyond what such wandering explains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from circuitdiff.errors import ArgumentError

__all__ = ["Trend", "trend", "MIN_STEPS"]

#: The fewest steps a trend test is computed on (fewer: NaN).
MIN_STEPS = 3


@dataclass(frozen=True)
class Trend:
    """How one metric on one edge group moves along a checkpoint series.

    ``values`` are the differences (checkpoint - initial) at ``steps``. ``tau`` and
    ``p_value``: Mann-Kendall (Kendall's tau against the step, two-sided).
    ``direction`` is ``"up"``, ``"down"`` or ``"none"`` at ``alpha``.
    ``first_significant_step``: the first step whose interval excludes 0 (None: none
    does; marginal, see the module docstring). ``with_accuracy`` / ``with_reward``:
    Kendall's tau of the values against the accuracy / reward at the same steps, with
    p-values (NaN where fewer than three steps have both).
    """

    metric: str
    group: str
    steps: tuple[int, ...]
    values: tuple[float, ...]
    tau: float
    p_value: float
    direction: str
    alpha: float
    first_significant_step: int | None
    with_accuracy: float = math.nan
    with_accuracy_p: float = math.nan
    with_reward: float = math.nan
    with_reward_p: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def trend(
    metric: str,
    group: str,
    steps: Sequence[int],
    values: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    *,
    accuracy: Mapping[int, float] | None = None,
    reward: Mapping[int, float] | None = None,
    alpha: float = 0.05,
) -> Trend:
    """The :class:`Trend` of one metric's differences ``values`` at ``steps``.

    Args:
        metric: the metric's name (carried into the result).
        group: the edge group's name (carried into the result).
        steps: strictly increasing training steps.
        values: the difference (checkpoint - initial) at each step; NaN steps are left out.
        ci_low: the lower end of its confidence interval at each step.
        ci_high: the upper end.
        accuracy: ``{step: value}`` to correlate with (steps missing from it are skipped).
        reward: likewise.
        alpha: the level ``direction`` is decided at.
    """
    steps_a = np.asarray(steps, dtype=np.int64)
    arrays = [np.asarray(v, dtype=np.float64) for v in (values, ci_low, ci_high)]
    if any(a.shape != steps_a.shape for a in arrays) or steps_a.ndim != 1:
        raise ArgumentError(f"steps, values, ci_low and ci_high must be 1-D of one length; got lengths "
                            f"{[len(steps), len(values), len(ci_low), len(ci_high)]}.")
    if np.any(np.diff(steps_a) <= 0):
        raise ArgumentError(f"steps must be strictly increasing; got {steps_a.tolist()}.")
    if not 0 < alpha < 1:
        raise ArgumentError(f"alpha must be in (0, 1); got {alpha!r}.")
    value, low, high = arrays
    keep = ~np.isnan(value)
    tau = p = math.nan
    if keep.sum() >= MIN_STEPS and np.ptp(value[keep]) > 0:
        tau, p = _kendall(steps_a[keep].astype(np.float64), value[keep])
    direction = "none" if not p < alpha else ("up" if tau > 0 else "down")
    excludes = np.flatnonzero((low > 0) | (high < 0))
    first = int(steps_a[excludes[0]]) if excludes.size else None
    with_accuracy = _correlation(steps_a, value, accuracy)
    with_reward = _correlation(steps_a, value, reward)
    return Trend(metric, group, tuple(int(s) for s in steps_a), tuple(float(v) for v in value), tau, p, direction,
                 alpha, first, *with_accuracy, *with_reward)


def _kendall(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Kendall's tau-b and its two-sided p-value (exact without ties, for short series; scipy's default)."""
    tau, p = stats.kendalltau(x, y)
    return float(tau), float(p)


def _correlation(steps: np.ndarray, values: np.ndarray, log: Mapping[int, float] | None) -> tuple[float, float]:
    """Kendall's (tau, p) of ``values`` against ``log`` at the steps both have; NaN with fewer than 3."""
    if not log:
        return math.nan, math.nan
    pairs = [(v, float(log[int(s)])) for s, v in zip(steps, values, strict=True)
             if int(s) in log and not math.isnan(v) and not math.isnan(float(log[int(s)]))]
    if len(pairs) < MIN_STEPS:
        return math.nan, math.nan
    x, y = np.array(pairs).T
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return _kendall(x, y)
