"""Faithfulness: how much of the model's behaviour a circuit keeps.

Evaluating a circuit means running the model with every real edge *outside* the
circuit ablated (its receiver reads the source's replacement, given by the
intervention) and every edge inside it intact. Three per-sample objective values
result: ``clean`` (nothing ablated), ``ablated`` (every edge ablated: the empty
circuit) and ``circuit``. The faithfulness of the circuit is

    (mean L_circuit - mean L_ablated) / (mean L_clean - mean L_ablated)

so the full graph scores 1 and the empty circuit 0 (method.md, section 4). With
``intervention="patching"`` the empty circuit is the corrupted run.

Each circuit costs ONE forward pass per batch (see :mod:`circuitdiff.engine.ablation`); the
clean and the all-ablated pass are run once per batch and shared by every circuit of
a curve.

A curve is summarised by the circuit track's two numbers of MIB (Mueller et al. 2025,
"MIB: A Mechanistic Interpretability Benchmark"), over ``x``, the requested size as a
fraction of the graph's real edges, with the trapezoid rule between the curve's points:
CPR, the area under faithfulness (higher is better), and CMD, the area under
``|1 - faithfulness|`` (lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.circuits import Circuit, greedy, sizes_for_curve, top_n
from circuitdiff.data import Batch
from circuitdiff.engine.ablation import EdgeAblation
from circuitdiff.engine.interventions import Intervention
from circuitdiff.engine.run import as_run
from circuitdiff.errors import ArgumentTypeError, DataError, UnknownNameError
from circuitdiff.report import markdown_table
from circuitdiff.scores import EdgeScores
from circuitdiff.typecheck import shape_checked

__all__ = ["MIB_FRACTIONS", "CircuitEvaluation", "FaithfulnessCurve", "evaluate_circuit", "faithfulness_curve"]

#: The edge fractions at which MIB's circuit track evaluates circuits (``int(fraction * n_edges)`` edges each).
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

SELECTIONS: dict[str, Callable[..., Circuit]] = {"top_n": top_n, "greedy": greedy}


def normalized(circuit: float, clean: float, ablated: float) -> float:
    """``(circuit - ablated) / (clean - ablated)``; NaN when clean equals ablated."""
    gap = clean - ablated
    return (circuit - ablated) / gap if gap != 0 else math.nan


@shape_checked
@dataclass(frozen=True)
class CircuitEvaluation:
    """One circuit's objective values on a dataset (float64 ``[n_samples]`` tensors on CPU).

    Attributes:
        n_edges: edges in the circuit.
        clean_losses: nothing ablated.
        ablated_losses: every edge ablated (the empty circuit).
        circuit_losses: every edge outside the circuit ablated.
    """

    n_edges: int
    clean_losses: Float[Tensor, "n_samples"]
    ablated_losses: Float[Tensor, "n_samples"]
    circuit_losses: Float[Tensor, "n_samples"]

    @property
    def faithfulness(self) -> float:
        """``(mean circuit - mean ablated) / (mean clean - mean ablated)``; NaN if clean == ablated."""
        return normalized(self.circuit_losses.mean().item(), self.clean_losses.mean().item(),
                          self.ablated_losses.mean().item())

    def to_dict(self) -> dict[str, Any]:
        """Means and faithfulness as plain numbers (JSON-ready)."""
        return {
            "n_edges": self.n_edges,
            "clean": self.clean_losses.mean().item(),
            "ablated": self.ablated_losses.mean().item(),
            "circuit": self.circuit_losses.mean().item(),
            "faithfulness": self.faithfulness,
            "n_samples": int(self.clean_losses.shape[0]),
        }


@shape_checked
@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of circuits of growing size selected from one set of scores.

    Attributes:
        requested: the sizes asked for.
        n_edges: edges actually in each circuit (pruning can remove some).
        clean_losses: ``[n_samples]`` nothing ablated.
        ablated_losses: ``[n_samples]`` every edge ablated.
        circuit_losses: ``[n_points, n_samples]`` each circuit's values.
        selection: how circuits were chosen (e.g. ``"top_n"``).
        total_edges: real edges of the graph (the denominator of :attr:`fractions`).
    """

    requested: list[int]
    n_edges: list[int]
    clean_losses: Float[Tensor, "n_samples"]
    ablated_losses: Float[Tensor, "n_samples"]
    circuit_losses: Float[Tensor, "n_points n_samples"]
    selection: str
    total_edges: int

    @property
    def faithfulness(self) -> list[float]:
        """Faithfulness of each circuit (see :func:`normalized`)."""
        clean, ablated = self.clean_losses.mean().item(), self.ablated_losses.mean().item()
        return [normalized(c, clean, ablated) for c in self.circuit_losses.mean(1).tolist()]

    @property
    def fractions(self) -> list[float]:
        """Each requested size as a fraction of the graph's real edges (``requested / total_edges``)."""
        return [n / self.total_edges for n in self.requested]

    @property
    def cpr(self) -> float:
        """MIB's CPR: the area under faithfulness against :attr:`fractions` (trapezoids; higher is better).

        Only the range of the curve's sizes is integrated (no extrapolation), so compare
        curves with the same sizes. NaN when a point's faithfulness is NaN or the curve
        has fewer than two distinct sizes.
        """
        return self._area(self.faithfulness)

    @property
    def cmd(self) -> float:
        """MIB's CMD: the area under ``|1 - faithfulness|`` against :attr:`fractions` (lower is better).

        0 when every circuit matches the full model. Integrated and NaN as :attr:`cpr`.
        """
        return self._area([abs(1.0 - f) for f in self.faithfulness])

    def _area(self, heights: list[float]) -> float:
        """Trapezoid-rule area of ``heights`` over :attr:`fractions`, the points sorted by fraction."""
        points = sorted(zip(self.fractions, heights), key=lambda point: point[0])
        if len({x for x, _ in points}) < 2:
            return math.nan
        return sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in zip(points, points[1:]))

    def to_dict(self) -> dict[str, Any]:
        """Sizes, means, faithfulness, CPR and CMD as plain numbers (JSON-ready)."""
        return {
            "selection": self.selection,
            "requested": list(self.requested),
            "n_edges": list(self.n_edges),
            "total_edges": self.total_edges,
            "fractions": self.fractions,
            "clean": self.clean_losses.mean().item(),
            "ablated": self.ablated_losses.mean().item(),
            "circuit": self.circuit_losses.mean(1).tolist(),
            "faithfulness": self.faithfulness,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "n_samples": int(self.clean_losses.shape[0]),
        }

    def to_markdown(self) -> str:
        """A table (edges, mean objective, faithfulness), then CPR and CMD."""
        rows = [[str(n), f"{loss:.4g}", f"{f:.3f}"]
                for n, loss, f in zip(self.n_edges, self.circuit_losses.mean(1).tolist(), self.faithfulness)]
        return (f"clean {self.clean_losses.mean().item():.4g}, all edges ablated "
                f"{self.ablated_losses.mean().item():.4g} ({self.selection} circuits)\n\n"
                + markdown_table(["edges", "objective", "faithfulness"], rows, align="rrr")
                + f"\n\nCPR {self.cpr:.3f} (higher is better), CMD {self.cmd:.3f} (lower is better): areas under "
                f"faithfulness and |1 - faithfulness| over edge fractions {min(self.fractions):.3g} to "
                f"{max(self.fractions):.3g} of {self.total_edges} edges")


def evaluate_circuit(
    model: Any,
    circuit: Circuit,
    batches: Iterable[Batch],
    *,
    objective: str | Callable[..., Tensor] | None = None,
    intervention: str | Intervention | None = None,
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
) -> CircuitEvaluation:
    """Run ``model`` with every edge outside ``circuit`` ablated; compare with clean and empty.

    Args:
        model: the TransformerBridge ``circuit.graph`` was built for, or a run of that
            graph (``circuit.graph.bind(model, objective=..., intervention=...)``; then
            leave ``objective``, ``intervention`` and ``reference_batches`` unset).
        circuit: the edges kept (e.g. ``cd.circuits.top_n(scores, 200)``).
        batches: as in :func:`circuitdiff.attribute`.
        objective: as in :func:`circuitdiff.attribute` (required with a model).
        intervention: as in :func:`circuitdiff.attribute` (default ``"zero"``).
        reference_batches: as in :func:`circuitdiff.attribute`.
        progress: as in :func:`circuitdiff.attribute`.

    Returns:
        :class:`CircuitEvaluation` (``.faithfulness``: 1 = the circuit does what the
        model does, 0 = no better than ablating everything).
    """
    if not isinstance(circuit, Circuit):
        raise ArgumentTypeError(f"circuit must be a circuitdiff Circuit, got {type(circuit).__name__}.")
    clean, ablated, losses = _evaluate(model, [circuit], batches, objective, intervention, reference_batches,
                                       progress)
    return CircuitEvaluation(circuit.n_edges, clean, ablated, losses[0])


def faithfulness_curve(
    model: Any,
    scores: EdgeScores,
    batches: Iterable[Batch],
    *,
    objective: str | Callable[..., Tensor] | None = None,
    intervention: str | Intervention | None = None,
    sizes: Sequence[int] | None = None,
    selection: str | Callable[[EdgeScores, int], Circuit] = "top_n",
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
) -> FaithfulnessCurve:
    """Faithfulness of circuits of each size in ``sizes``, selected from ``scores``.

    Args:
        model: the TransformerBridge ``scores.graph`` was built for, or a run of that
            graph (as in :func:`evaluate_circuit`).
        scores: edge scores to select circuits from.
        batches: evaluation data (one pass over it evaluates every size).
        objective: as in :func:`circuitdiff.attribute`; usually the one ``scores`` was
            computed with (likewise ``intervention`` and ``reference_batches``).
        intervention: as in :func:`circuitdiff.attribute`.
        reference_batches: as in :func:`circuitdiff.attribute`.
        progress: as in :func:`circuitdiff.attribute`.
        sizes: circuit sizes in edges; default :func:`~circuitdiff.circuits.sizes_for_curve`
            (10 points, log-spaced, ending at every edge). MIB's sizes:
            ``[int(f * graph.n_edges) for f in MIB_FRACTIONS]``.
        selection: ``"top_n"`` or ``"greedy"`` (by ``|score|``, pruned; see
            :mod:`circuitdiff.circuits`), or a callable ``(scores, n) -> Circuit``.

    Returns:
        :class:`FaithfulnessCurve`; ``.to_markdown()`` prints it.
    """
    if not isinstance(scores, EdgeScores):
        raise ArgumentTypeError(f"scores must be EdgeScores, got {type(scores).__name__}.")
    n_real = int(scores.graph.edge_mask.sum())
    sizes = sizes_for_curve(n_real) if sizes is None else list(sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_real for n in sizes):
        raise DataError(f"sizes must be a non-empty list of integers in [0, {n_real}] (the graph's edges); "
                        f"got {sizes!r}.")
    if isinstance(selection, str):
        if selection not in SELECTIONS:
            raise UnknownNameError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}, "
                                   "or a callable (scores, n) -> Circuit.")
        select, selection_name = SELECTIONS[selection], selection
    else:
        select, selection_name = selection, getattr(selection, "__name__", type(selection).__name__)
    circuits = [select(scores, n) for n in sizes]
    clean, ablated, losses = _evaluate(model, circuits, batches, objective, intervention, reference_batches,
                                       progress)
    return FaithfulnessCurve(sizes, [c.n_edges for c in circuits], clean, ablated, losses, selection_name, n_real)


def _evaluate(
    model: Any,
    circuits: list[Circuit],
    batches: Iterable[Batch],
    objective: str | Callable[..., Tensor] | None,
    intervention: str | Intervention | None,
    reference_batches: Iterable[Batch] | None,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clean ``[n]``, all-ablated ``[n]`` and per-circuit ``[k, n]`` losses over the samples."""
    graph = circuits[0].graph
    for circuit in circuits:
        if circuit.graph != graph:
            raise DataError("all circuits must belong to the same graph.")
    run = as_run(model, graph, "faithfulness", objective=objective, intervention=intervention,
                 reference_batches=reference_batches, progress=progress)
    clean, ablated, kept = [], [], []
    with run:
        for index, batch in run.batches(batches, f"faithfulness ({len(circuits)} circuits)"):
            ablation = EdgeAblation(run, batch, index)
            rows = torch.arange(batch.size)
            everything = graph.edge_mask.expand(batch.size, -1, -1)
            clean.append(ablation.clean_losses.double().cpu())
            ablated.append(ablation.losses(rows, everything).double().cpu())
            kept.append(torch.stack([
                ablation.losses(rows, (graph.edge_mask & ~c.edges).expand(batch.size, -1, -1)).double().cpu()
                for c in circuits
            ]))
    if not clean:
        raise DataError("no batches given; evaluating a circuit needs at least one sample.")
    return torch.cat(clean), torch.cat(ablated), torch.cat(kept, dim=1)
