"""Circuits: sets of edges of an :class:`~circuitdiff.graph.AttributionGraph`.

Everything here is graph-side bookkeeping on edge scores; nothing runs a model.

A circuit is a boolean ``[n_sources, n_receivers]`` matrix that is True on a subset
of the graph's real edges. Three ways to select one from :class:`EdgeScores`
(all use ``scores.mean``; positive score = the edge helps):

- :func:`top_n`: the ``n`` edges with the largest score;
- :func:`threshold`: every edge whose score is at least ``tau``;
- :func:`greedy`: grow from the logits, always adding the best edge into a node that
  is already in the circuit (the ``greedy`` selection of Hanna et al.'s EAP-IG code).

``absolute=True`` (the default) ranks by ``|score|`` (edges that matter either way),
``absolute=False`` by the signed score (edges that help). Ties are broken by the
row-major order of the score matrix, the order of ``graph.edge_names()``.

**Nodes and pruning** (``prune=True``, :meth:`Circuit.pruned`: keep only edges on an
``input -> ... -> logits`` path) follow the rules in :mod:`circuitdiff.circuit_nodes`;
pruning can return fewer edges than were asked for.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from circuitdiff.circuit_nodes import connected_edges, receiver_owners, source_inputs, touched_nodes
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, UnknownNameError
from circuitdiff.graph import AttributionGraph
from circuitdiff.scores import EdgeScores
from circuitdiff.typecheck import shape_checked

if TYPE_CHECKING:
    import networkx

__all__ = ["Circuit", "greedy", "receiver_owners", "sizes_for_curve", "threshold", "top_n"]

_FORMAT = "circuitdiff.circuit"
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------- Circuit
def _checked_edges(graph: AttributionGraph, edges: Tensor) -> Tensor:
    """A CPU copy of ``edges`` after checking it against ``graph`` (type, shape, dtype, only real edges)."""
    if not isinstance(graph, AttributionGraph):
        raise ArgumentTypeError(f"graph must be an AttributionGraph, got {type(graph).__name__}.")
    if not isinstance(edges, Tensor):
        raise ArgumentTypeError(
            f"edges must be a bool torch.Tensor, got {type(edges).__name__}; "
            "use Circuit.from_edge_names(graph, names) to build one from names."
        )
    shape = (graph.n_sources, graph.n_receivers)
    if tuple(edges.shape) != shape:
        raise ArgumentError(
            f"edges has shape {tuple(edges.shape)} but this graph needs {shape} "
            f"([n_sources, n_receivers]); was the circuit built for another graph ({graph!r})?"
        )
    if edges.dtype != torch.bool:
        raise ArgumentError(f"edges must have dtype torch.bool, got {edges.dtype}; pass e.g. `mask > 0`.")
    edges = edges.detach().to("cpu").clone()
    outside = edges & ~graph.edge_mask
    if outside.any():
        r, c = (int(i) for i in torch.nonzero(outside)[0])
        raise ArgumentError(
            f"edges marks {int(outside.sum())} cell(s) that are not edges of the graph, e.g. "
            f"{graph.sources[r]}->{graph.receivers[c]}; AND it with graph.edge_mask."
        )
    return edges


@shape_checked
@dataclass(frozen=True, eq=False)
class Circuit:
    """A set of real edges of ``graph``.

    Attributes:
        graph: the graph the edges belong to.
        edges: ``[n_sources, n_receivers]`` bool, True on the circuit's edges; must be
            False wherever ``graph.edge_mask`` is (a copy on the CPU is stored).

    ``"a0.h1->m0" in circuit`` tests an edge, ``"a0.h1" in circuit`` a node (see
    :meth:`nodes`). Equality compares graph and edges.
    """

    graph: AttributionGraph
    edges: Bool[Tensor, "n_sources n_receivers"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", _checked_edges(self.graph, self.edges))

    # ------------------------------------------------------------ constructors
    @classmethod
    def full(cls, graph: AttributionGraph) -> Circuit:
        """Every real edge of ``graph``."""
        return cls(graph, graph.edge_mask)

    @classmethod
    def empty(cls, graph: AttributionGraph) -> Circuit:
        """No edges."""
        return cls(graph, torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.bool))

    @classmethod
    def from_edge_names(cls, graph: AttributionGraph, names: list[str]) -> Circuit:
        """The circuit of the named edges (``"source->receiver"``, as in ``graph.edge_names()``)."""
        edges = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.bool)
        mask = graph.edge_mask
        for name in names:
            if not isinstance(name, str) or name.count("->") != 1:
                raise UnknownNameError(f"{name!r} is not an edge name; edge names look like 'a0.h1->m0'.")
            source, receiver = name.split("->")
            r, c = graph.source_index(source), graph.receiver_index(receiver)
            if not mask[r, c]:
                raise UnknownNameError(
                    f"{name!r} is not an edge of this {graph.level}-level graph (the receiver does not read "
                    "that source); see graph.edge_names() for the real edges."
                )
            edges[r, c] = True
        return cls(graph, edges)

    # ------------------------------------------------------------ queries
    @property
    def n_edges(self) -> int:
        """Number of edges in the circuit."""
        return int(self.edges.sum())

    def edge_names(self) -> list[str]:
        """Names ``"source->receiver"`` of the circuit's edges, row-major (as ``graph.edge_names()``)."""
        rows, cols = torch.nonzero(self.edges, as_tuple=True)
        g = self.graph
        return [f"{g.sources[r]}->{g.receivers[c]}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    def nodes(self) -> list[str]:
        """Names of the nodes the circuit touches, in computation order.

        A source is in the circuit if it has an outgoing circuit edge or owns a receiver
        with an incoming one (a key/value receiver in a grouped-query model brings in all
        heads of its group); ``"logits"`` is last if any edge goes into the logits.
        """
        return touched_nodes(self.graph, self.edges)

    def __contains__(self, name: object) -> bool:
        """Edge (``"a0->m0"``) or node (``"a0.h1"``, ``"logits"``) membership."""
        if not isinstance(name, str):
            return False
        if "->" in name:
            source, _, receiver = name.partition("->")
            if source not in self.graph.sources or receiver not in self.graph.receivers:
                return False
            return bool(self.edges[self.graph.source_index(source), self.graph.receiver_index(receiver)])
        return name in self.nodes()

    def __len__(self) -> int:
        return self.n_edges

    # ------------------------------------------------------------ pruning
    def pruned(self) -> Circuit:
        """Drop edges whose source is unreachable from ``input`` or whose receiver cannot reach ``logits``.

        See :mod:`circuitdiff.circuit_nodes` for the reachability rules. Returns a new
        circuit (possibly this one's equal); idempotent.
        """
        return Circuit(self.graph, connected_edges(self.graph, self.edges))

    # ------------------------------------------------------------ identity / io
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"format", "version", "graph": graph.to_dict(), "edges": [edge names]}``."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "graph": self.graph.to_dict(),
            "edges": self.edge_names(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        """Rebuild a circuit from :meth:`to_dict` (e.g. after ``json.load``)."""
        if not isinstance(data, dict) or "graph" not in data or "edges" not in data:
            raise DataError(
                "not a circuit dictionary: expected keys 'graph' and 'edges' as written by Circuit.to_dict()."
            )
        if data.get("format", _FORMAT) != _FORMAT or data.get("version", _FORMAT_VERSION) != _FORMAT_VERSION:
            raise DataError(
                f"unsupported circuit format {data.get('format')!r} version {data.get('version')!r}; "
                f"this circuitdiff reads {_FORMAT!r} version {_FORMAT_VERSION}."
            )
        return cls.from_edge_names(AttributionGraph.from_dict(data["graph"]), list(data["edges"]))

    # ------------------------------------------------------------ exports (circuitdiff.export)
    @classmethod
    def from_eap_ig_json(cls, path: str | os.PathLike[str]) -> Circuit:
        """The edges marked ``in_graph`` in an EAP-IG / MIB graph JSON file:
        :func:`circuitdiff.export.read_eap_ig_json`."""
        from circuitdiff.export import read_eap_ig_json

        return read_eap_ig_json(path)[1]

    def to_networkx(self, scores: EdgeScores | None = None) -> networkx.DiGraph:
        """A networkx DiGraph of the circuit's edges (with ``scores``' means):
        :func:`circuitdiff.export.to_networkx`."""
        from circuitdiff.export import to_networkx

        return to_networkx(scores, circuit=self)

    def to_dot(self, scores: EdgeScores | None = None, **style: Any) -> str:
        """Graphviz DOT text of the circuit, coloured by ``scores``' signs: :func:`circuitdiff.export.to_dot`."""
        from circuitdiff.export import to_dot

        return to_dot(scores, circuit=self, **style)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Circuit) and self.graph == other.graph and torch.equal(self.edges, other.edges)

    def __hash__(self) -> int:
        return hash((self.graph, tuple(torch.nonzero(self.edges.flatten()).flatten().tolist())))

    def __repr__(self) -> str:
        return (
            f"Circuit({self.n_edges}/{self.graph.n_edges} edges, {len(self.nodes())} nodes, "
            f"{self.graph.level} level, n_layers={self.graph.n_layers})"
        )


# ---------------------------------------------------------------------- selection
def _keys(scores: EdgeScores, absolute: bool, caller: str) -> Tensor:
    """Ranking keys ``[n_sources, n_receivers]`` float64 (``|mean|`` or ``mean``); -inf off the mask."""
    if not isinstance(scores, EdgeScores):
        hint = (
            " Wrap a score matrix as cd.EdgeScores(graph, mean=M, per_sample=None, objective_values=torch.zeros(1))."
            if isinstance(scores, Tensor)
            else ""
        )
        raise ArgumentTypeError(f"{caller} needs an EdgeScores, got {type(scores).__name__}.{hint}")
    mask = scores.graph.edge_mask
    mean = scores.mean.detach().to("cpu", torch.float64)
    if torch.isnan(mean[mask]).any():
        n = int(torch.isnan(mean[mask]).sum())
        raise DataError(
            f"{n} edge score(s) are NaN, so edges cannot be ranked; the attribution run produced NaN "
            "(check the objective and the model's dtype) — rerun, or replace them explicitly before selecting."
        )
    keys = mean.abs() if absolute else mean
    return keys.masked_fill(~mask, -math.inf)


def _check_count(n: object, n_edges: int, caller: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ArgumentTypeError(f"{caller}: n must be an int, got {type(n).__name__}.")
    if not 0 <= int(n) <= n_edges:
        raise ArgumentError(
            f"{caller}: n={int(n)} is out of range; this graph has {n_edges} edges, use 0 <= n <= {n_edges}."
        )
    return int(n)


def _finish(graph: AttributionGraph, edges: Tensor, prune: bool) -> Circuit:
    circuit = Circuit(graph, edges)
    return circuit.pruned() if prune else circuit


def top_n(scores: EdgeScores, n: int, *, absolute: bool = True, prune: bool = True) -> Circuit:
    """The ``n`` real edges with the largest score.

    Args:
        scores: edge scores; ``scores.mean`` ``[n_sources, n_receivers]`` is ranked
            (positive = the edge helps).
        n: how many edges, ``0 <= n <= graph.n_edges``.
        absolute: rank by ``|score|`` (default) or by the signed score.
        prune: drop edges not on an ``input -> ... -> logits`` path afterwards, so the
            result can have fewer than ``n`` edges.

    Ties are broken by row-major edge order (``graph.edge_names()`` order).
    """
    keys = _keys(scores, absolute, "top_n")
    graph = scores.graph
    n = _check_count(n, graph.n_edges, "top_n")
    flat = keys.flatten()
    # stable sort on -key: equal keys keep row-major order
    order = torch.sort(-flat, stable=True).indices[:n]
    edges = torch.zeros(flat.shape[0], dtype=torch.bool)
    edges[order] = True
    return _finish(graph, edges.view(graph.n_sources, graph.n_receivers), prune)


def threshold(scores: EdgeScores, tau: float, *, absolute: bool = True, prune: bool = True) -> Circuit:
    """Every real edge with score ``>= tau`` (``|score| >= tau`` when ``absolute``).

    Args:
        scores: edge scores (``scores.mean``, ``[n_sources, n_receivers]``; positive = helps).
        tau: the threshold, in the objective's units.
        absolute: compare ``|score|`` (default) or the signed score.
        prune: drop edges not on an ``input -> ... -> logits`` path afterwards.
    """
    keys = _keys(scores, absolute, "threshold")
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)) or math.isnan(tau):
        raise ArgumentError(f"threshold: tau must be a real number, got {tau!r}.")
    return _finish(scores.graph, keys >= float(tau), prune)


def greedy(scores: EdgeScores, n: int, *, absolute: bool = True, prune: bool = True) -> Circuit:
    """Grow a circuit of ``n`` edges backwards from the logits.

    Start with the node set ``{logits}``; candidates are real edges into a receiver
    owned by a node already in the circuit. Repeatedly add the candidate with the
    largest score (ties: row-major edge order); adding ``u -> v`` brings source node
    ``u`` into the circuit, making the edges into ``u``'s receivers candidates. Stops
    after ``n`` edges or when no candidate is left (only possible when ``n`` is more
    than the edges reachable backwards from the logits, i.e. never on a full graph).

    Args:
        scores: edge scores (``scores.mean``, ``[n_sources, n_receivers]``; positive = helps).
        n: how many edges to add, ``0 <= n <= graph.n_edges``.
        absolute: rank by ``|score|`` (default) or by the signed score.
        prune: afterwards drop edges whose source is unreachable from ``input``
            (every greedy edge already reaches the logits).
    """
    keys = _keys(scores, absolute, "greedy")
    graph = scores.graph
    n = _check_count(n, graph.n_edges, "greedy")
    owners = receiver_owners(graph)
    inputs = source_inputs(graph, owners)
    mask = graph.edge_mask
    n_receivers = graph.n_receivers
    keys_np = keys.numpy()

    # k-way merge over activated receiver columns, each sorted by (-key, row):
    # heap items (-key, flat index, column, position in that column's order)
    column_order: dict[int, np.ndarray] = {}
    heap: list[tuple[float, int, int, int]] = []

    def activate(column: int) -> None:
        if column in column_order:
            return
        rows = np.flatnonzero(mask[:, column].numpy())
        if rows.size == 0:
            return
        col_keys = keys_np[rows, column]
        rows = rows[np.lexsort((rows, -col_keys))]
        column_order[column] = rows
        r = int(rows[0])
        heapq.heappush(heap, (-float(keys_np[r, column]), r * n_receivers + column, column, 0))

    in_circuit = torch.zeros(graph.n_sources, dtype=torch.bool)
    activate(graph.receiver_index("logits"))
    edges = torch.zeros(graph.n_sources, n_receivers, dtype=torch.bool)
    added = 0
    while added < n and heap:
        _, flat, column, position = heapq.heappop(heap)
        rows = column_order[column]
        if position + 1 < rows.size:
            nxt = int(rows[position + 1])
            heapq.heappush(heap, (-float(keys_np[nxt, column]), nxt * n_receivers + column, column, position + 1))
        row = flat // n_receivers
        edges[row, column] = True
        added += 1
        if not in_circuit[row]:
            in_circuit[row] = True
            for receiver in inputs[row]:
                activate(receiver)
    return _finish(graph, edges, prune)


def sizes_for_curve(n_edges: int, points: int = 10) -> list[int]:
    """Roughly log-spaced distinct circuit sizes from 1 to ``n_edges`` inclusive, increasing.

    Useful for faithfulness curves, e.g. ``[top_n(s, k) for k in sizes_for_curve(graph.n_edges)]``.
    Returns at most ``points`` sizes (fewer when ``n_edges`` is small).
    """
    if isinstance(n_edges, bool) or not isinstance(n_edges, (int, np.integer)) or n_edges < 1:
        raise ArgumentError(f"n_edges must be a positive int, got {n_edges!r}.")
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1:
        raise ArgumentError(f"points must be a positive int, got {points!r}.")
    if points == 1:
        return [int(n_edges)]
    raw = np.geomspace(1, int(n_edges), int(points))
    sizes = sorted({round(float(x)) for x in raw} | {int(n_edges)})
    return [s for s in sizes if 1 <= s <= n_edges]
