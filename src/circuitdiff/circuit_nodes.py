"""The nodes of a circuit: which source owns each receiver, which nodes a set of edges
touches, and which edges lie on a path from ``input`` to ``logits``.

Pure functions of an :class:`~circuitdiff.graph.AttributionGraph` and a boolean
``[n_sources, n_receivers]`` edge matrix; :class:`~circuitdiff.circuits.Circuit` and
the selections in :mod:`circuitdiff.circuits` build on them.

**Nodes.** Every receiver is an input of some source node: ``a{l}.h{h}<q>`` belongs
to head ``a{l}.h{h}``; a key/value receiver of key/value head ``g`` (``a{l}.kv{g}<k>``
with grouped-query attention, ``a{l}.h{g}<k>`` otherwise) belongs to every query head
``h`` with ``h // (n_heads // n_kv_heads) == g``; at layer level ``a{l}<q|k|v>``
belongs to ``a{l}``; ``m{l}`` (receiver) belongs to ``m{l}`` (source); ``logits``
belongs to the terminal ``logits`` node, which writes nothing.

**Pruning** (:func:`connected_edges`) keeps an edge ``u -> v`` only if ``u`` is
reachable from ``input`` and ``v`` reaches ``logits`` through circuit edges:

- forward: ``input`` is reachable; a circuit edge from a reachable source makes its
  receiver reachable; a reachable receiver makes its owner source(s) reachable;
- backward: ``logits`` reaches the logits; a source reaches the logits if one of its
  circuit edges goes into a receiver that does; a receiver reaches the logits if one
  of its owner sources does.

Pruning can therefore return fewer edges than were asked for. It is idempotent.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from circuitdiff.choices import GroupKind, Level, ReceiverKind
from circuitdiff.graph import AttributionGraph

__all__ = ["connected_edges", "receiver_owners", "source_inputs", "touched_nodes"]


def receiver_owners(graph: AttributionGraph) -> list[tuple[int, ...]]:
    """For each receiver column, the source rows whose computation reads it.

    ``q`` receivers belong to their head (or to the layer's attention source at layer
    level), key/value receivers of kv head ``g`` to every query head ``h`` with
    ``h // (n_heads // n_kv_heads) == g``, ``m{l}`` to source ``m{l}``. The ``logits``
    receiver belongs to the terminal logits node, which is not a source: its entry is
    the empty tuple.
    """
    owners: list[tuple[int, ...]] = []
    for column, kind in enumerate(graph.receiver_kinds):
        layer = graph.receiver_layers[column]
        if kind == ReceiverKind.LOGITS:
            owners.append(())
        elif kind == ReceiverKind.MLP:
            owners.append((graph.mlp_source(layer),))
        else:
            heads = graph.attention_sources(layer)
            if graph.level == Level.LAYER:
                owners.append((heads.start,))
                continue
            n_q, n_k, _ = graph.receivers_per_attention
            offset = column - graph.group(GroupKind.ATTN, layer).columns.start
            if kind == ReceiverKind.Q:
                owners.append((heads.start + offset,))
            else:
                g = offset - n_q if kind == ReceiverKind.K else offset - n_q - n_k
                per_group = graph.n_heads // graph.n_kv_heads
                owners.append(tuple(range(heads.start + g * per_group, heads.start + (g + 1) * per_group)))
    return owners


def source_inputs(graph: AttributionGraph, owners: list[tuple[int, ...]]) -> list[list[int]]:
    """For each source row, the receiver columns it owns (its inputs); ``owners`` from :func:`receiver_owners`."""
    inputs: list[list[int]] = [[] for _ in range(graph.n_sources)]
    for column, rows in enumerate(owners):
        for row in rows:
            inputs[row].append(column)
    return inputs


def touched_nodes(graph: AttributionGraph, edges: Bool[Tensor, "n_sources n_receivers"]) -> list[str]:
    """Names of the nodes ``edges`` touch, in computation order.

    A source is touched if it has an outgoing edge or owns a receiver with an incoming
    one (a key/value receiver in a grouped-query model brings in all heads of its
    group); ``"logits"`` is last if any edge goes into the logits.
    """
    owners = receiver_owners(graph)
    used = edges.any(dim=1).tolist()
    into_logits = False
    for column in torch.nonzero(edges.any(dim=0)).flatten().tolist():
        if not owners[column]:
            into_logits = True
        for row in owners[column]:
            used[row] = True
    names = [name for name, keep in zip(graph.sources, used, strict=True) if keep]
    return names + (["logits"] if into_logits else [])


def connected_edges(graph: AttributionGraph,
                    edges: Bool[Tensor, "n_sources n_receivers"]) -> Bool[Tensor, "n_sources n_receivers"]:
    """The edges among ``edges`` whose source is reachable from ``input`` and whose receiver reaches ``logits``.

    See the module docstring for the reachability rules; a new CPU bool matrix.
    """
    owners = receiver_owners(graph)
    groups = graph.receiver_groups  # in computation order: attn l, mlp l, ..., logits

    # forward: which sources are reachable from input (via their receivers)
    src_fwd = torch.zeros(graph.n_sources, dtype=torch.bool)
    src_fwd[0] = True
    for group in groups:
        cols = group.columns
        reached = (edges[:, cols] & src_fwd[:, None]).any(dim=0)
        for offset, hit in enumerate(reached.tolist()):
            if hit:
                for row in owners[cols.start + offset]:
                    src_fwd[row] = True

    # backward: which receivers / sources reach the logits
    recv_bwd = torch.zeros(graph.n_receivers, dtype=torch.bool)
    src_bwd = torch.zeros(graph.n_sources, dtype=torch.bool)
    for group in reversed(groups):
        cols = group.columns
        if group.kind == GroupKind.LOGITS:
            recv_bwd[cols] = True
            continue
        # the owners of this group only write to later groups, already settled
        group_owners = sorted({row for c in range(cols.start, cols.stop) for row in owners[c]})
        for row in group_owners:
            src_bwd[row] = bool((edges[row] & recv_bwd).any())
        for c in range(cols.start, cols.stop):
            recv_bwd[c] = any(bool(src_bwd[row]) for row in owners[c])

    return edges & src_fwd[:, None] & recv_bwd[None, :]
