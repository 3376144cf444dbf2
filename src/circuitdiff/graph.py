"""The residual-stream graph whose edges circuitdiff scores.

A pre-norm transformer's residual stream before any sub-block is the sum of
everything written before it, so every earlier writer (a *source*) feeds every later
reader (a *receiver*):

- sources, in computation order: ``input`` (token + position embeddings), then per
  layer l the attention heads ``a{l}.h{h}`` (head level) or the whole attention layer
  ``a{l}`` (layer level), then the MLP ``m{l}``;
- receivers: per layer l the query, key and value inputs ``a{l}.h{h}<q>``,
  ``a{l}.h{h}<k>``, ``a{l}.h{h}<v>`` (head level; with grouped-query attention the
  key/value receivers are per key/value head and named ``a{l}.kv{g}<k>``), or
  ``a{l}<q>``, ``a{l}<k>``, ``a{l}<v>`` (layer level), then the MLP input ``m{l}``;
  finally ``logits`` (the final residual stream, read by the final norm).

Scores live in dense ``[n_sources, n_receivers]`` matrices; ``edge_mask`` marks the
real edges and every other cell is a structural zero. An attention source's output is
the sum of its heads' ``z_h @ W_O[h]``, without the output bias (which no edge
ablates), so the layer-level graph is the exact coarsening of the head-level one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuitdiff.choices import GroupKind, Level, ReceiverKind, SourceKind
from circuitdiff.errors import ArgumentError, UnknownNameError

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun

__all__ = ["AttributionGraph", "ReceiverGroup", "LEVELS"]

#: The graph granularities as plain strings (see :class:`~circuitdiff.choices.Level`).
LEVELS: tuple[str, ...] = tuple(level.value for level in Level)


@dataclass(frozen=True)
class ReceiverGroup:
    """Receivers that read the same prefix of sources.

    Every receiver in ``columns`` has a real edge from sources ``0 .. n_sources_read-1``
    and from no other source. ``kind`` is ``"attn"`` (the q, k and v receivers of one
    layer), ``"mlp"`` or ``"logits"`` (a :class:`~circuitdiff.choices.GroupKind`);
    ``layer`` is None for logits.
    """

    kind: GroupKind
    layer: int | None
    columns: slice
    n_sources_read: int


class _Layout(NamedTuple):
    """Names, kinds and layers of the sources and receivers, and the receiver groups, in computation order."""

    sources: tuple[str, ...]
    source_kinds: tuple[SourceKind, ...]
    source_layers: tuple[int, ...]
    receivers: tuple[str, ...]
    receiver_kinds: tuple[ReceiverKind, ...]
    receiver_layers: tuple[int, ...]
    receiver_groups: tuple[ReceiverGroup, ...]


def _attention(layer: int, level: Level, n_heads: int,
               n_kv_heads: int) -> tuple[list[str], list[tuple[str, ReceiverKind]]]:
    """Layer ``layer``'s attention source names, and its q, k and v receivers (name, kind) in order."""
    q, k, v = ReceiverKind.Q, ReceiverKind.K, ReceiverKind.V
    if level == Level.LAYER:
        return [f"a{layer}"], [(f"a{layer}<{kind}>", kind) for kind in (q, k, v)]
    kv = "kv" if n_kv_heads != n_heads else "h"
    return ([f"a{layer}.h{h}" for h in range(n_heads)],
            [(f"a{layer}.h{h}<q>", q) for h in range(n_heads)]
            + [(f"a{layer}.{kv}{g}<{kind}>", kind) for kind in (k, v) for g in range(n_kv_heads)])


def _layout(n_layers: int, n_heads: int, n_kv_heads: int, parallel_blocks: bool, level: Level) -> _Layout:
    """Lay the graph out: sources and receivers in computation order, grouped by the sources they read."""
    sources: list[tuple[str, SourceKind, int]] = [("input", SourceKind.INPUT, -1)]
    receivers: list[tuple[str, ReceiverKind, int]] = []
    groups: list[ReceiverGroup] = []

    def read(kind: GroupKind, layer: int | None, named: Iterable[tuple[str, ReceiverKind]], n_read: int) -> None:
        start = len(receivers)
        receivers.extend((name, receiver_kind, n_layers if layer is None else layer) for name, receiver_kind in named)
        groups.append(ReceiverGroup(kind, layer, slice(start, len(receivers)), n_read))

    for layer in range(n_layers):
        heads, qkv = _attention(layer, level, n_heads, n_kv_heads)
        attn_reads = len(sources)
        sources += [(name, SourceKind.ATTN, layer) for name in heads]
        read(GroupKind.ATTN, layer, qkv, attn_reads)
        read(GroupKind.MLP, layer, [(f"m{layer}", ReceiverKind.MLP)], attn_reads if parallel_blocks else len(sources))
        sources.append((f"m{layer}", SourceKind.MLP, layer))
    read(GroupKind.LOGITS, None, [("logits", ReceiverKind.LOGITS)], len(sources))
    return _Layout(*zip(*sources), *zip(*receivers), tuple(groups))


def _checked_kv_heads(n_layers: int, n_heads: int, n_kv_heads: int | None) -> int:
    """``n_kv_heads`` (default ``n_heads``) after checking the shape."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ArgumentError(
            f"invalid shape: n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads} (n_heads must be a multiple of n_kv_heads)."
        )
    return n_kv_heads


def _edge_mask(groups: tuple[ReceiverGroup, ...], n_sources: int, n_receivers: int) -> Tensor:
    """``[n_sources, n_receivers]`` bool, True where a receiver of a group reads the source."""
    mask = torch.zeros(n_sources, n_receivers, dtype=torch.bool)
    for group in groups:
        mask[: group.n_sources_read, group.columns] = True
    return mask


def _find(index: dict[str, int], name: str, what: str, level: Level) -> int:
    """``index[name]``, or an UnknownNameError naming the ``what`` ("source", "receiver") and the graph level."""
    try:
        return index[name]
    except KeyError:
        raise UnknownNameError(f"no {what} named {name!r} in this {level}-level graph") from None


def _coarse_name(name: str) -> str:
    """The layer-level name of a source or receiver: ``a1.h3`` -> ``a1``, ``a1.kv1<v>`` -> ``a1<v>``, ``m0`` -> ``m0``."""
    layer, _, rest = name.partition(".")
    return layer + rest[rest.index("<"):] if "<" in rest else layer


class AttributionGraph:
    """Sources, receivers, the real-edge mask and the index maps scorers need.

    Args:
        n_layers: the model's number of layers.
        n_heads: attention (query) heads per layer.
        n_kv_heads: key/value heads (grouped-query attention); default ``n_heads``.
        parallel_blocks: attention and MLP of a layer read the same residual stream
            (GPT-NeoX), so ``a{l} -> m{l}`` is not an edge.
        level: ``"head"`` (one source per attention head) or ``"layer"`` (one per
            attention layer, the paper's graph); a string or a :class:`~circuitdiff.choices.Level`.

    Attributes: ``level`` (a :class:`~circuitdiff.choices.Level`, equal to its string);
    ``sources`` and ``receivers``, names in computation order (rows and columns of every
    score matrix); ``source_kinds`` (``SourceKind``: input, attn, mlp) and ``source_layers``
    (-1 for input); ``receiver_kinds`` (``ReceiverKind``: q, k, v, mlp, logits) and
    ``receiver_layers`` (``n_layers`` for logits); ``receiver_groups`` (attn 0, mlp 0, ..., logits).
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel_blocks: bool = False,
                 level: Level | str = Level.HEAD) -> None:
        level = Level.parse(level)
        n_kv_heads = _checked_kv_heads(n_layers, n_heads, n_kv_heads)
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.parallel_blocks, self.level = parallel_blocks, level
        (self.sources, self.source_kinds, self.source_layers, self.receivers, self.receiver_kinds,
         self.receiver_layers, self.receiver_groups) = _layout(n_layers, n_heads, n_kv_heads, parallel_blocks, level)
        self._edge_mask = _edge_mask(self.receiver_groups, len(self.sources), len(self.receivers))
        self._source_index = {name: i for i, name in enumerate(self.sources)}
        self._receiver_index = {name: i for i, name in enumerate(self.receivers)}

    @classmethod
    def from_model(cls, model: Any, level: Level | str = Level.HEAD) -> "AttributionGraph":
        """The graph of a TransformerBridge (validated with ``describe_model``; post-norm families
        such as OLMo 2 have a layer-level graph only)."""
        from circuitdiff.engine.architectures import check_level
        from circuitdiff.models import describe_model

        spec = describe_model(model)
        check_level(spec.architecture, level)
        return cls(spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.parallel_blocks, level)

    def bind(self, model: Any, *, objective: Any, intervention: Any = "zero", reference_batches: Any = None,
             progress: bool = True) -> "AttributionRun":
        """A run of this graph on model: validated once, owns the hooks; see circuitdiff.engine.run."""
        from circuitdiff.engine.run import AttributionRun

        return AttributionRun(model, self, objective=objective, intervention=intervention,
                              reference_batches=reference_batches, progress=progress)

    @property
    def heads_per_source_block(self) -> int:
        """Attention sources per layer: ``n_heads`` at head level, 1 at layer level."""
        return self.n_heads if self.level == Level.HEAD else 1

    @property
    def receivers_per_attention(self) -> tuple[int, int, int]:
        """(q, k, v) receivers per layer."""
        return (self.n_heads, self.n_kv_heads, self.n_kv_heads) if self.level == Level.HEAD else (1, 1, 1)

    @staticmethod
    def dimensions(n_layers: int, n_heads: int, n_kv_heads: int, level: Level | str) -> tuple[int, int]:
        """``(n_sources, n_receivers)`` of a graph of this shape, computed without building it."""
        heads, n_q, n_kv = (n_heads, n_heads, n_kv_heads) if level == Level.HEAD else (1, 1, 1)
        return 1 + n_layers * (heads + 1), 1 + n_layers * (n_q + 2 * n_kv + 1)

    @property
    def n_sources(self) -> int:
        """Number of sources (rows of every score matrix)."""
        return len(self.sources)

    @property
    def n_receivers(self) -> int:
        """Number of receivers (columns of every score matrix)."""
        return len(self.receivers)

    @property
    def edge_mask(self) -> Bool[Tensor, "n_sources n_receivers"]:
        """True where an edge exists (a copy; editing it does not change the graph)."""
        return self._edge_mask.clone()

    @property
    def n_edges(self) -> int:
        """Number of real edges (True cells of ``edge_mask``)."""
        return int(self._edge_mask.sum())

    def source_index(self, name: str) -> int:
        """Row of a source, e.g. ``"a3.h1"`` or ``"m0"``."""
        return _find(self._source_index, name, "source", self.level)

    def receiver_index(self, name: str) -> int:
        """Column of a receiver, e.g. ``"a3.h1<q>"``, ``"m0"`` or ``"logits"``."""
        return _find(self._receiver_index, name, "receiver", self.level)

    def attention_sources(self, layer: int) -> slice:
        """Rows of layer ``layer``'s attention sources (heads in order)."""
        start = 1 + layer * (self.heads_per_source_block + 1)
        return slice(start, start + self.heads_per_source_block)

    def mlp_source(self, layer: int) -> int:
        """Row of MLP ``layer``."""
        return self.attention_sources(layer).stop

    def group(self, kind: GroupKind | str, layer: int | None = None) -> ReceiverGroup:
        """The receiver group of ``kind`` ("attn", "mlp", "logits") at ``layer``."""
        kind = GroupKind.parse(kind)
        if kind == GroupKind.LOGITS:
            return self.receiver_groups[-1]
        return self.receiver_groups[2 * layer + (0 if kind == GroupKind.ATTN else 1)]

    def edge_names(self) -> list[str]:
        """Names ``"source->receiver"`` of the real edges, in row-major order of the mask."""
        rows, cols = torch.nonzero(self._edge_mask, as_tuple=True)
        return [f"{self.sources[r]}->{self.receivers[c]}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    def layer_level(self) -> "AttributionGraph":
        """The layer-level graph of the same model."""
        return AttributionGraph(self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_blocks, Level.LAYER)

    def coarsening_index(self) -> tuple[Int[Tensor, "n_sources"], Int[Tensor, "n_receivers"]]:
        """For each source and receiver, its row / column in :meth:`layer_level`.

        Summing scores over equal indices gives the layer-level scores exactly.
        """
        coarse = self.layer_level()
        return (torch.tensor([coarse.source_index(_coarse_name(name)) for name in self.sources]),
                torch.tensor([coarse.receiver_index(_coarse_name(name)) for name in self.receivers]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description from which ``from_dict`` rebuilds the graph (``level`` as a plain string)."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "parallel_blocks": self.parallel_blocks, "level": self.level.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttributionGraph":
        """Rebuild a graph from :meth:`to_dict`."""
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AttributionGraph) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        return (
            f"AttributionGraph(level={self.level.value!r}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"n_kv_heads={self.n_kv_heads}, parallel_blocks={self.parallel_blocks}: "
            f"{self.n_sources} sources x {self.n_receivers} receivers, {self.n_edges} edges)"
        )
