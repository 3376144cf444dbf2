"""Interventions: what an ablated source's output is replaced with.

An edge score estimates the change of the objective when the receiver reads the
source's *replacement* instead of its clean output. An intervention returns the
replacement outputs of every source for one :class:`~circuitdiff.engine.Window` of a
batch (or None when they are zero); the clean pass then subtracts the clean outputs
(see :mod:`circuitdiff.engine.sources`):

- ``"zero"``: replacement 0 (the paper's choice); score = ``-<a_u, dL/dH_v>``.
- ``"patching"``: the source's output on the corrupted prompt
  (``Batch.corrupted_input_ids``, same length as the clean prompt); one extra
  forward pass without gradients per batch.
- ``"mean"``: the source's output averaged over all real tokens of a reference dataset.
- ``"mean-positional"``: averaged over the reference dataset separately per position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.choices import InterventionName
from circuitdiff.data import Batch
from circuitdiff.engine.bridge import Bridge, attribution_mode
from circuitdiff.engine.sources import SourceRecorder, Window
from circuitdiff.errors import ArgumentTypeError, DataError
from circuitdiff.typecheck import shape_checked

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun
    from circuitdiff.graph import AttributionGraph

__all__ = ["Intervention", "Zero", "Patching", "Mean", "MeanPositional", "NAMES", "resolve"]

#: The built-in intervention names, accepted wherever ``intervention=`` takes a string.
NAMES: tuple[str, ...] = tuple(name.value for name in InterventionName)


class Intervention(Protocol):
    """Returns the replacement outputs of every source for one window of a batch.

    ``replacement(run, batch, window)`` returns a ``[batch, n_sources, window, d_model]``
    tensor of dtype ``run.delta_dtype(window)`` on ``run.device`` (allocate it with
    ``run.new_delta(batch, window)``), zero at padded positions, covering the positions
    ``window.of(batch)`` only; or None when the replacement is zero. The engine takes
    the tensor over as its ``delta`` buffer (the clean pass subtracts from it in place).
    """

    name: str

    def replacement(self, run: "AttributionRun", batch: Batch, window: Window) -> Tensor | None:
        """The replacement outputs, or None for zero."""
        ...


class Zero:
    """Replace a source's output by zero."""

    name = "zero"

    def replacement(self, run: "AttributionRun", batch: Batch, window: Window) -> None:
        """None: the replacement is zero."""
        return None


class Patching:
    """Replace a source's output by its output on the corrupted prompt.

    Costs one forward pass without gradients per batch, stopped after the last layer.
    """

    name = "patching"

    def replacement(self, run: "AttributionRun", batch: Batch, window: Window) -> Tensor:
        """Every source's corrupted output (one forward pass, no gradients)."""
        if batch.corrupted_input_ids is None:
            raise DataError(
                "intervention='patching' needs corrupted prompts: build batches with "
                "make_batches(..., corrupted_prompts=[...]) of the same token lengths, or use "
                "intervention='zero'."
            )
        return run.record_sources(batch.corrupted_input_ids, batch.attention_mask, window)


class Mean:
    """Replace a source's output by its mean over the real tokens of reference data.

    Args:
        means: ``[n_sources, d_model]`` per-source means; build them with
            :meth:`from_batches`.
    """

    name = "mean"

    @shape_checked
    def __init__(self, means: Float[Tensor, "n_sources d_model"]) -> None:
        if means.ndim != 2:
            raise DataError(f"mean intervention expects means of shape [n_sources, d_model]; got {tuple(means.shape)}.")
        self.means = means

    @classmethod
    def from_batches(cls, model: Any, graph: "AttributionGraph", batches: Iterable[Batch]) -> "Mean":
        """Average every source's output over the real tokens of ``batches``."""
        sums, counts = _source_sums(model, graph, batches, positional=False)
        return cls(sums / counts[:, None])

    def replacement(self, run: "AttributionRun", batch: Batch, window: Window) -> Tensor:
        """The means, zero at padded positions."""
        _check_sources(self.means.shape[0], self.means.shape[-1], run)
        delta = run.new_delta(batch, window)
        mask = batch.attention_mask[:, window.positions].to(delta.device, delta.dtype)[:, None, :, None]
        return torch.mul(self.means.to(delta.device, delta.dtype)[None, :, None, :], mask, out=delta)


class MeanPositional:
    """Replace a source's output at position p by its mean at position p over reference data.

    Args:
        means: ``[n_sources, pos, d_model]``; position p averages the reference samples
            that are at least p+1 tokens long. Build with :meth:`from_batches`.
    """

    name = "mean-positional"

    @shape_checked
    def __init__(self, means: Float[Tensor, "n_sources pos d_model"]) -> None:
        if means.ndim != 3:
            raise DataError(
                f"mean-positional intervention expects means of shape [n_sources, pos, d_model]; "
                f"got {tuple(means.shape)}."
            )
        self.means = means

    @classmethod
    def from_batches(cls, model: Any, graph: "AttributionGraph", batches: Iterable[Batch]) -> "MeanPositional":
        """Average every source's output per position over the real tokens of ``batches``."""
        sums, counts = _source_sums(model, graph, batches, positional=True)
        covered = counts > 0
        length = int(covered.sum())  # right padding: positions 0 .. length-1 are covered
        return cls(sums[:, :length] / counts[:length, None])

    def replacement(self, run: "AttributionRun", batch: Batch, window: Window) -> Tensor:
        """Each position's means, zero at padded positions."""
        _check_sources(self.means.shape[0], self.means.shape[-1], run)
        needed = int(batch.lengths.max())
        if needed > self.means.shape[1]:
            raise DataError(
                f"mean-positional means cover {self.means.shape[1]} positions but a sample has "
                f"{needed} tokens; pass reference batches at least as long as the data scored."
            )
        delta = run.new_delta(batch, window)
        positions = window.of(batch)
        # later positions are padding in every sample
        covered = range(positions.start, min(positions.stop, self.means.shape[1]))
        means = self.means[:, covered.start:covered.stop].to(delta.device, delta.dtype)
        mask = batch.attention_mask[:, covered.start:covered.stop].to(delta.device, delta.dtype)[:, None, :, None]
        torch.mul(means[None], mask, out=delta[:, :, :len(covered)])
        delta[:, :, len(covered):] = 0
        return delta


def _check_sources(n_sources: int, d_model: int, run: "AttributionRun") -> None:
    if n_sources != run.graph.n_sources or d_model != run.spec.d_model:
        raise DataError(
            f"the means were computed for {n_sources} sources x d_model {d_model}, but this graph has "
            f"{run.graph.n_sources} sources x d_model {run.spec.d_model}; compute them with the same "
            "model and graph level."
        )


def _source_sums(
    model: Any, graph: "AttributionGraph", batches: Iterable[Batch], positional: bool
) -> tuple[Tensor, Tensor]:
    """Sum of every source's output over real tokens, and the token counts.

    Returns ``([n_sources, d] , [1])`` or, positional, ``([n_sources, pos, d], [pos])``.
    """
    bridge = Bridge(model)
    recorder = SourceRecorder(bridge, graph)
    sums: Tensor | None = None
    counts: Tensor | None = None
    with attribution_mode(model):
        for batch in batches:
            batch = batch.to(bridge.device)
            delta = recorder.new_delta(batch.input_ids, Window())
            recorder.record(batch.input_ids, batch.attention_mask, delta, Window())
            mask = batch.attention_mask.to(delta.dtype)
            if positional:  # batches may differ in length: pad the shorter sum with zeros
                sums = _add_padded(sums, delta.sum(0), dim=1)
                counts = _add_padded(counts, mask.sum(0), dim=0)
            else:
                sums = _add_padded(sums, delta.sum((0, 2)), dim=0)
                counts = _add_padded(counts, mask.sum().reshape(1), dim=0)
    if sums is None or counts is None:
        raise DataError("no reference batches given for the mean intervention.")
    return sums, counts


def _add_padded(total: Tensor | None, part: Tensor, dim: int) -> Tensor:
    """``total + part``, zero-padding the shorter one at the end of ``dim``."""
    if total is None:
        return part
    width = max(total.shape[dim], part.shape[dim])

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, [0, 0] * (t.ndim - 1 - dim) + [0, width - t.shape[dim]])

    return pad(total) + pad(part)


def resolve(
    intervention: str | Intervention,
    model: Any,
    graph: "AttributionGraph",
    reference_batches: Iterable[Batch] | None = None,
) -> Intervention:
    """An intervention object from a name (``NAMES``) or an object with ``replacement``."""
    if not isinstance(intervention, str):
        if not callable(getattr(intervention, "replacement", None)):
            hint = (" Its prefill(hooks, batch, delta) method is the earlier protocol: return the "
                    "replacement tensor from replacement(run, batch, window) instead (see docs/plugins.md)."
                    if hasattr(intervention, "prefill") else "")
            raise ArgumentTypeError(
                f"intervention must be one of {NAMES} or an object with replacement(); got {intervention!r}.{hint}")
        return intervention
    name = InterventionName.parse(intervention)
    if name is InterventionName.ZERO:
        return Zero()
    if name is InterventionName.PATCHING:
        return Patching()
    if reference_batches is None:
        raise DataError(
            f"intervention={intervention!r} needs reference data: pass reference_batches=[...] "
            "(the batches whose average activations replace ablated sources)."
        )
    kind = Mean if name is InterventionName.MEAN else MeanPositional
    return kind.from_batches(model, graph, reference_batches)
