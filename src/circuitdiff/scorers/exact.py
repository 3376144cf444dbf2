"""Exact ablation: the true change of the objective when one edge is ablated.

For edge (u -> v) and sample b the score is ``L_b(v reads replacement(u)) - L_b(clean)``,
measured by running the model, with the same interventions as EAP: the ground truth
that EAP and EAP-IG approximate. Many single-edge ablations share one forward pass
(the batch axis holds copies of the samples, each with a different edge ablated; see
:mod:`circuitdiff.engine.ablation`), so a batch costs about
``batch * n_edges / edges_per_forward`` forward passes of ``edges_per_forward`` copies,
plus one clean pass (and the intervention's), and no backward pass. Practical for
small models and layer-level graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from circuitdiff.data import Batch
from circuitdiff.engine.ablation import EdgeAblation
from circuitdiff.scorers.base import ScoresAndLosses, positive_int

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun

__all__ = ["Exact"]


@dataclass(frozen=True)
class Exact:
    """One-edge-at-a-time ablation, batched.

    Args:
        edges_per_forward: copies per forward pass (each a sample with one edge
            ablated). Memory grows with it like a batch of that size (no gradients).
            Larger is faster per edge while a forward pass is dominated by fixed
            costs (small models, GPUs); see ``benchmarks/exact_batched.py``.
    """

    edges_per_forward: int = 64

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        positive_int("exact", "edges_per_forward", self.edges_per_forward)

    def score_batch(self, run: "AttributionRun", batch: Batch, batch_index: int) -> ScoresAndLosses:
        """Every real edge of every sample ablated on its own; returns changes and clean losses."""
        graph = run.graph
        ablation = EdgeAblation(run, batch, batch_index, one_edge_per_copy=True)
        sources, receivers = torch.nonzero(graph.edge_mask, as_tuple=True)
        n_edges = sources.shape[0]
        samples = torch.arange(batch.size).repeat_interleave(n_edges)
        sources, receivers = sources.repeat(batch.size), receivers.repeat(batch.size)
        scores = run.new_scores(batch)
        bar = run.progress_bar(samples.shape[0], f"exact: {n_edges:,} edges x {batch.size} samples ablated",
                               unit="ablation")
        for start in range(0, samples.shape[0], self.edges_per_forward):
            chunk = slice(start, start + self.edges_per_forward)
            rows, u, v = samples[chunk], sources[chunk], receivers[chunk]
            ablate = torch.zeros(rows.shape[0], graph.n_sources, graph.n_receivers, dtype=torch.bool)
            ablate[torch.arange(rows.shape[0]), u, v] = True
            losses = ablation.losses(rows, ablate)
            rows, u, v = (t.to(scores.device) for t in (rows, u, v))
            scores[rows, u, v] = (losses - ablation.clean_losses[rows]).to(scores.dtype)
            bar.update(rows.shape[0])
        bar.close()
        return scores, ablation.clean_losses
