"""Interventions: what an ablated source's output is replaced with.

An edge score estimates the change of the objective when the receiver reads the
source's *replacement* instead of its clean output. Each intervention fills the
``delta`` buffer with the replacement before the clean forward pass subtracts the
clean outputs (see :mod:`circuitdiff.hooks`):

- ``"zero"``: replacement 0 (the paper's choice); score = ``-<a_u, dL/dH_v>``.
- ``"patching"``: the source's output on the corrupted prompt
  (``Batch.corrupted_input_ids``, same length as the clean prompt); one extra
  forward pass without gradients per batch.
- ``"mean"``: the source's output averaged over all real tokens of a reference dataset.
- ``"mean-positional"``: averaged over the reference dataset separately per position.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentTypeError, DataError, UnknownNameError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hooks import EdgeHooks

__all__ = ["Intervention", "Zero", "Patching", "Mean", "MeanPositional", "NAMES", "resolve"]

#: The built-in intervention names, accepted wherever ``intervention=`` takes a string.
NAMES: tuple[str, ...] = ("zero", "patching", "mean", "mean-positional")


class Intervention(Protocol):
    """Writes the replacement outputs into ``delta [batch, n_sources, window, d_model]``.

    ``prefill`` returns True when it wrote them (the clean pass then subtracts the
    clean outputs) and False when the replacement is zero and ``delta`` was left
    untouched (the clean pass then writes ``-output``). Padded positions must be zero.
    ``delta`` covers the positions ``hooks.window(batch)`` (all of them unless the
    scorer works in position windows, e.g. ``EAP(positions_per_pass=...)``).
    """

    name: str

    def prefill(self, hooks: EdgeHooks, batch: Batch, delta: Tensor) -> bool:
        """Write the replacements into ``delta``; return whether anything was written."""
        ...


class Zero:
    """Replace a source's output by zero."""

    name = "zero"

    def prefill(self, hooks: EdgeHooks, batch: Batch, delta: Tensor) -> bool:
        """Nothing to write: the replacement is zero."""
        return False


class Patching:
    """Replace a source's output by its output on the corrupted prompt.

    Costs one forward pass without gradients per batch, stopped after the last layer.
    """

    name = "patching"

    def prefill(self, hooks: EdgeHooks, batch: Batch, delta: Tensor) -> bool:
        """Record every source's corrupted output (one forward pass, no gradients)."""
        if batch.corrupted_input_ids is None:
            raise DataError(
                "intervention='patching' needs corrupted prompts: build batches with "
                "make_batches(..., corrupted_prompts=[...]) of the same token lengths, or use "
                "intervention='zero'."
            )
        hooks.record_sources(batch.corrupted_input_ids, batch.attention_mask, delta)
        return True


class Mean:
    """Replace a source's output by its mean over the real tokens of reference data.

    Args:
        means: ``[n_sources, d_model]`` per-source means; build them with
            :meth:`from_batches`.
    """

    name = "mean"

    def __init__(self, means: Float[Tensor, "n_sources d_model"]) -> None:
        if means.ndim != 2:
            raise DataError(f"mean intervention expects means of shape [n_sources, d_model]; got {tuple(means.shape)}.")
        self.means = means

    @classmethod
    def from_batches(cls, model: Any, graph: AttributionGraph, batches: Iterable[Batch]) -> "Mean":
        """Average every source's output over the real tokens of ``batches``."""
        sums, counts = _source_sums(model, graph, batches, positional=False)
        return cls(sums / counts[:, None])

    def prefill(self, hooks: EdgeHooks, batch: Batch, delta: Tensor) -> bool:
        """Write the means (zero at padded positions) into ``delta``."""
        _check_sources(self.means.shape[0], self.means.shape[-1], hooks)
        mask = batch.attention_mask[:, hooks.positions].to(delta.device, delta.dtype)[:, None, :, None]
        torch.mul(self.means.to(delta.device, delta.dtype)[None, :, None, :], mask, out=delta)
        return True


class MeanPositional:
    """Replace a source's output at position p by its mean at position p over reference data.

    Args:
        means: ``[n_sources, pos, d_model]``; position p averages the reference samples
            that are at least p+1 tokens long. Build with :meth:`from_batches`.
    """

    name = "mean-positional"

    def __init__(self, means: Float[Tensor, "n_sources pos d_model"]) -> None:
        if means.ndim != 3:
            raise DataError(
                f"mean-positional intervention expects means of shape [n_sources, pos, d_model]; "
                f"got {tuple(means.shape)}."
            )
        self.means = means

    @classmethod
    def from_batches(cls, model: Any, graph: AttributionGraph, batches: Iterable[Batch]) -> "MeanPositional":
        """Average every source's output per position over the real tokens of ``batches``."""
        sums, counts = _source_sums(model, graph, batches, positional=True)
        covered = counts > 0
        length = int(covered.sum())  # right padding: positions 0 .. length-1 are covered
        return cls(sums[:, :length] / counts[:length, None])

    def prefill(self, hooks: EdgeHooks, batch: Batch, delta: Tensor) -> bool:
        """Write each position's means (zero at padded positions) into ``delta``."""
        _check_sources(self.means.shape[0], self.means.shape[-1], hooks)
        needed = int(batch.lengths.max())
        if needed > self.means.shape[1]:
            raise DataError(
                f"mean-positional means cover {self.means.shape[1]} positions but a sample has "
                f"{needed} tokens; pass reference batches at least as long as the data scored."
            )
        window = hooks.window(batch)
        # later positions are padding in every sample
        covered = range(window.start, min(window.stop, self.means.shape[1]))
        means = self.means[:, covered.start:covered.stop].to(delta.device, delta.dtype)
        mask = batch.attention_mask[:, covered.start:covered.stop].to(delta.device, delta.dtype)[:, None, :, None]
        torch.mul(means[None], mask, out=delta[:, :, :len(covered)])
        delta[:, :, len(covered):] = 0
        return True


def _check_sources(n_sources: int, d_model: int, hooks: EdgeHooks) -> None:
    if n_sources != hooks.graph.n_sources or d_model != hooks.d_model:
        raise DataError(
            f"the means were computed for {n_sources} sources x d_model {d_model}, but this graph has "
            f"{hooks.graph.n_sources} sources x d_model {hooks.d_model}; compute them with the same "
            "model and graph level."
        )


def _source_sums(
    model: Any, graph: AttributionGraph, batches: Iterable[Batch], positional: bool
) -> tuple[Tensor, Tensor]:
    """Sum of every source's output over real tokens, and the token counts.

    Returns ``([n_sources, d] , [1])`` or, positional, ``([n_sources, pos, d], [pos])``.
    """
    from circuitdiff.models import attribution_mode, describe_model

    describe_model(model)
    hooks = EdgeHooks(model, graph)
    sums: Tensor | None = None
    counts: Tensor | None = None
    with attribution_mode(model):
        for batch in batches:
            batch = batch.to(hooks.device)
            delta = hooks.new_delta(batch)
            hooks.record_sources(batch.input_ids, batch.attention_mask, delta)
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
    graph: AttributionGraph,
    reference_batches: Iterable[Batch] | None = None,
) -> Intervention:
    """An intervention object from a name (``NAMES``) or an object with ``prefill``."""
    if not isinstance(intervention, str):
        if not hasattr(intervention, "prefill"):
            raise ArgumentTypeError(f"intervention must be one of {NAMES} or an object with prefill(); got {intervention!r}.")
        return intervention
    if intervention == "zero":
        return Zero()
    if intervention == "patching":
        return Patching()
    if intervention in ("mean", "mean-positional"):
        if reference_batches is None:
            raise DataError(
                f"intervention={intervention!r} needs reference data: pass reference_batches=[...] "
                "(the batches whose average activations replace ablated sources)."
            )
        kind = Mean if intervention == "mean" else MeanPositional
        return kind.from_batches(model, graph, reference_batches)
    raise UnknownNameError(f"unknown intervention {intervention!r}; valid: {', '.join(NAMES)}.")
