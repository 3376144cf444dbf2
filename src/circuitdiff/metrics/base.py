"""What a metric is (:class:`Metric`), what it reads (:class:`Chunk`), and the registry of metrics.

A metric gives one value per sample of one model's scores on one edge group.
:func:`circuitdiff.compare` and :func:`~circuitdiff.metrics.summarize` stream the
scores: for every model and edge group they take a new instance of each metric from the
registry (:func:`get`), show it the samples one :class:`Chunk` at a time (twice when
``passes`` is 2) and keep what ``per_sample`` returns. The dataset value is the mean of
the defined per-sample values, unless the metric is a :class:`PooledMetric`.

Names come from the built-ins, from ``@register_metric("name")`` on a metric class, and
from installed packages declaring an entry point in the group ``circuitdiff.metrics``
(see :mod:`circuitdiff.registry`; built-in names win). :func:`available` lists them in
the order reports show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitdiff.errors import ArgumentTypeError
from circuitdiff.metrics.functions import node_entropy_of_cells
from circuitdiff.registry import Registry

if TYPE_CHECKING:
    from circuitdiff.metrics.streaming import Profile

__all__ = ["Chunk", "Metric", "PooledMetric", "SampleMetric", "registry", "register_metric", "available", "get"]


@dataclass(eq=False)
class Chunk:
    """Some samples' scores on one edge group's cells: what a metric reads.

    Attributes:
        values: ``[k, m]`` float64 signed scores of ``k`` samples on the group's ``m``
            cells (finite; the structural zeros are cells only with ``structural_zeros=True``).
        sources: ``[m]`` the row of the score matrix (the source node) of each cell.
        n_sources: rows of the score matrix.
        bin_edges: ``[bins + 1]`` the group's ``|score|`` histogram edges, shared by the
            two models compared.
    """

    values: Float[Tensor, "k m"]
    sources: Int[Tensor, "m"]
    n_sources: int
    bin_edges: Float[Tensor, "n_bin_edges"]

    @cached_property
    def histogram(self) -> Float[Tensor, "k bins"]:
        """Counts of each sample's ``|values|`` on ``bin_edges`` (the largest value in the last bin)."""
        index = torch.bucketize(self.values.abs(), self.bin_edges[1:-1], right=True)  # [k, m] in 0..bins-1
        counts = torch.zeros(self.values.shape[0], self.bin_edges.numel() - 1, dtype=torch.float64)
        return counts.scatter_add_(1, index, torch.ones_like(self.values))

    @cached_property
    def node_entropy(self) -> Float[Tensor, "k n_sources"]:
        """Entropy (nats) of each source's normalised ``|values|`` over its cells; NaN: no cell or no mass."""
        return node_entropy_of_cells(self.values, self.sources, self.n_sources)


@runtime_checkable
class Metric(Protocol):
    """A metric: its definition and how it is computed, sample by sample.

    Each model and edge group gets a new instance, so an instance may keep state between
    chunks. With ``passes = 1`` every chunk goes to ``per_sample`` once; with
    ``passes = 2`` every chunk goes to ``observe`` first, then to ``per_sample``.
    Subclass :class:`SampleMetric` to get the defaults.

    Attributes:
        description: one line: what it measures (JSON reports and plot labels show it).
        units: the unit of its values: ``"nats"``, ``"score units"`` (those of the
            objective), ``"1"`` (dimensionless).
        higher_means: what a higher value says about the model (its direction).
        passes: 1, or 2 when one sample's value depends on all the samples.
    """

    description: str
    units: str
    higher_means: str
    passes: int

    def observe(self, chunk: Chunk) -> None:
        """First pass of a two-pass metric: take what ``per_sample`` needs from all the samples."""

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        """The metric of each sample of ``chunk``: ``[k]``, NaN where undefined (e.g. all-zero scores)."""


@runtime_checkable
class PooledMetric(Metric, Protocol):
    """A metric whose dataset value pools the samples instead of averaging their values.

    A plain :class:`Metric`'s dataset value is the mean of its defined per-sample values,
    and its bootstrap interval resamples those values. A pooled metric computes the
    dataset value of all samples, and of each resample, from the per-sample records of a
    :class:`~circuitdiff.metrics.Profile` (``information_complexity``: the entropy of the
    summed histograms).
    """

    def pooled_value(self, profile: Profile) -> float:
        """The dataset value of all the samples of ``profile``."""

    def resampled_values(self, profile: Profile, index: Int[np.ndarray, "... n"]) -> Float[np.ndarray, "..."]:
        """The dataset value of each resample: ``index[..., :]`` lists rows of ``profile`` (with repeats)."""


class SampleMetric:
    """Base class of metrics: one pass, dataset value the mean of the per-sample values.

    Subclass it, set ``units`` and ``higher_means``, write ``per_sample``; the first line
    of the subclass's docstring is its ``description``. For a metric that needs all the
    samples first, set ``passes = 2`` and write ``observe`` too.
    """

    units: str = ""
    higher_means: str = ""
    passes: int = 1

    @property
    def description(self) -> str:
        """The first line of the class's own docstring, without its final period ("" without one)."""
        return ((type(self).__doc__ or "").strip().splitlines() or [""])[0].rstrip(".")

    def observe(self, chunk: Chunk) -> None:
        """Nothing to observe in one pass."""

    def per_sample(self, chunk: Chunk) -> Float[Tensor, "k"]:
        """The metric of each sample of ``chunk``: ``[k]``, NaN where undefined (e.g. all-zero scores)."""
        raise NotImplementedError


class _MetricRegistry(Registry):
    """A :class:`~circuitdiff.registry.Registry` whose names keep the order of the reports."""

    def available(self) -> list[str]:
        """Every known name: registered ones in registration order (the built-ins first), then plugins, sorted."""
        return list(dict.fromkeys([*self._factories, *sorted(self._entry_points())]))


#: The metric registry: the built-ins, ``@register_metric("name")`` and entry points in the
#: group ``circuitdiff.metrics``. A factory takes no arguments and returns a :class:`Metric`.
registry = _MetricRegistry("metric", "circuitdiff.metrics",
                           hint="; register one with circuitdiff.metrics.register_metric")
#: ``register_metric(name, factory)``, or ``@register_metric(name)`` on a metric class: it then
#: appears in every comparison and summary, after the metrics registered before it.
register_metric = registry.register
#: Every metric name, in the order comparisons and reports list them.
available = registry.available


def get(name: str) -> Metric:
    """A new instance of the metric registered as ``name``.

    Raises:
        UnknownNameError: no such metric (the message lists the available ones).
        ArgumentTypeError: its factory made something that is not a :class:`Metric`.
        PluginLoadError: the plugin providing ``name`` failed to import.
    """
    metric = registry.get(name)
    if not isinstance(metric, Metric):
        raise ArgumentTypeError(
            f"metric {name!r}: its factory made a {type(metric).__name__}, not a metric: a metric has description, "
            "units, higher_means, passes, observe(chunk) and per_sample(chunk) (subclass "
            "circuitdiff.metrics.SampleMetric)."
        )
    return metric
