"""ACDC: greedy edge pruning with exact ablation (Conmy et al. 2023).

Start from the full graph. Visit receivers from the logits backwards (reverse
topological order: logits, then each layer's MLP and attention receivers from the
last layer down); for each edge into the receiver (latest source first), ablate it
on top of the edges removed so far and measure the dataset's mean objective. If

    mean L(with the edge removed) - mean L(current) < threshold

the edge stays removed and the current value moves to the new one. Every
measurement is one forward pass per batch with exact ablation
(:mod:`circuitdiff.engine.ablation`), with the same interventions as ``attribute``.

A receiver whose owner (the head or MLP that reads it) has lost every outgoing edge
cannot affect the output any more: its incoming edges are removed without a forward
pass (their ``changes`` entry is NaN). The result is therefore already pruned towards
the logits; :meth:`Circuit.pruned` additionally drops edges unreachable from the input.

Cost: one forward per batch per remaining edge, sequential; every batch's
replacement activations are held in memory. Meant for small models or layer-level
graphs, and as a reference for faster methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.circuits import Circuit, receiver_owners
from circuitdiff.data import Batch
from circuitdiff.engine.ablation import EdgeAblation
from circuitdiff.engine.interventions import Intervention
from circuitdiff.engine.run import as_run
from circuitdiff.errors import DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.typecheck import shape_checked

__all__ = ["ACDCResult", "acdc", "visiting_order"]


@shape_checked
@dataclass(frozen=True)
class ACDCResult:
    """What :func:`acdc` kept and measured.

    Attributes:
        circuit: the edges kept.
        changes: ``[n_sources, n_receivers]`` float64, for each edge tried, the mean
            objective with it removed minus the mean before; NaN for non-edges and
            edges removed without a pass.
        threshold: the threshold used.
        clean_loss: mean objective with nothing ablated.
        circuit_loss: mean objective of ``circuit`` (every other edge ablated).
    """

    circuit: Circuit
    changes: Float[Tensor, "n_sources n_receivers"]
    threshold: float
    clean_loss: float
    circuit_loss: float


def visiting_order(graph: AttributionGraph) -> list[int]:
    """Receiver columns from the logits backwards: later layers first, MLP before attention."""
    return sorted(
        range(graph.n_receivers),
        key=lambda c: (-graph.receiver_layers[c], graph.receiver_kinds[c] not in ("logits", "mlp"), c),
    )


def acdc(
    model: Any,
    graph: AttributionGraph,
    batches: Iterable[Batch],
    *,
    threshold: float,
    objective: str | Callable[..., Tensor] | None = None,
    intervention: str | Intervention | None = None,
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
) -> ACDCResult:
    """Prune ``graph`` edge by edge, keeping an edge only if removing it costs ``threshold`` or more.

    Args:
        model: the TransformerBridge ``graph`` was built for, or a run of ``graph``
            (``graph.bind(model, objective=..., intervention=...)``; then leave
            ``objective``, ``intervention`` and ``reference_batches`` unset).
        graph: ``AttributionGraph.from_model(model, level=...)``.
        batches: the data every decision is averaged over (all held in memory).
        threshold: a finite float, or ``math.inf`` (remove everything) /
            ``-math.inf`` (keep everything). In the objective's units.
        objective: as in :func:`circuitdiff.attribute` (required with a model); ACDC's
            own choice is ``"kl_to_clean"``.
        intervention: as in :func:`circuitdiff.attribute` (default ``"zero"``).
        reference_batches: as in :func:`circuitdiff.attribute`.
        progress: as in :func:`circuitdiff.attribute`.

    Returns:
        :class:`ACDCResult`.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise DataError(f"acdc: threshold must be a number (the largest objective increase an edge may cost "
                        f"and still be removed); got {threshold!r}.")
    run = as_run(model, graph, "acdc", objective=objective, intervention=intervention,
                 reference_batches=reference_batches, progress=progress)
    with run:
        ablations = [EdgeAblation(run, batch, index) for index, batch in run.batches(batches, "acdc: clean passes")]
        if not ablations:
            raise DataError("no batches given; acdc needs at least one sample.")

        def mean_loss(removed: Tensor) -> float:
            total = sum(float(a.losses(torch.arange(a.batch.size), removed.expand(a.batch.size, -1, -1)).double().sum())
                        for a in ablations)
            return total / sum(a.batch.size for a in ablations)

        clean_loss = sum(float(a.clean_losses.double().sum()) for a in ablations) / sum(a.batch.size for a in ablations)
        kept = graph.edge_mask.clone()
        changes = torch.full(kept.shape, math.nan, dtype=torch.float64)
        owners = receiver_owners(graph)
        current = clean_loss
        bar = run.progress_bar(int(kept.sum()), "acdc: edges tried")
        for column in visiting_order(graph):
            sources = torch.nonzero(kept[:, column]).flatten().flip(0).tolist()
            if owners[column] and not any(bool(kept[row].any()) for row in owners[column]):
                kept[sources, column] = False  # its reader is disconnected from the logits
                bar.update(len(sources))
                continue
            for row in sources:
                kept[row, column] = False
                loss = mean_loss(graph.edge_mask & ~kept)
                changes[row, column] = loss - current
                if loss - current < threshold:
                    current = loss
                else:
                    kept[row, column] = True
                bar.update(1)
        bar.close()
        circuit_loss = mean_loss(graph.edge_mask & ~kept)
    return ACDCResult(Circuit(graph, kept), changes, float(threshold), clean_loss, circuit_loss)
