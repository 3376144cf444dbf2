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
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuitdiff.errors import ArgumentError, UnknownNameError

__all__ = ["AttributionGraph", "ReceiverGroup", "LEVELS"]

Level = Literal["head", "layer"]
#: The graph granularities: ``"head"`` (a source per attention head, q/k/v receivers per
#: query or key/value head) and ``"layer"`` (one per attention layer; its exact coarsening).
LEVELS: tuple[str, ...] = ("head", "layer")


@dataclass(frozen=True)
class ReceiverGroup:
    """Receivers that read the same prefix of sources.

    Every receiver in ``columns`` has a real edge from sources ``0 .. n_sources_read-1``
    and from no other source. ``kind`` is ``"attn"`` (the q, k and v receivers of one
    layer), ``"mlp"`` or ``"logits"``; ``layer`` is None for logits.
    """

    kind: str
    layer: int | None
    columns: slice
    n_sources_read: int


class AttributionGraph:
    """Sources, receivers, the real-edge mask and the index maps scorers need.

    Args:
        n_layers: the model's number of layers.
        n_heads: attention (query) heads per layer.
        n_kv_heads: key/value heads (grouped-query attention); default ``n_heads``.
        parallel_blocks: attention and MLP of a layer read the same residual stream
            (GPT-NeoX), so ``a{l} -> m{l}`` is not an edge.
        level: ``"head"`` (one source per attention head) or ``"layer"`` (one per
            attention layer, the paper's graph).
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        parallel_blocks: bool = False,
        level: Level = "head",
    ) -> None:
        if level not in LEVELS:
            raise UnknownNameError(f"unknown graph level {level!r}; use one of {LEVELS}.")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_layers < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ArgumentError(
                f"invalid shape: n_layers={n_layers}, n_heads={n_heads}, "
                f"n_kv_heads={n_kv_heads} (n_heads must be a multiple of n_kv_heads)."
            )
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.parallel_blocks = parallel_blocks
        self.level: Level = level
        self._build()

    @classmethod
    def from_model(cls, model: Any, level: Level = "head") -> "AttributionGraph":
        """The graph of a TransformerBridge (validated with ``describe_model``)."""
        from circuitdiff.models import describe_model

        spec = describe_model(model)
        return cls(spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.parallel_blocks, level)

    # ------------------------------------------------------------------ layout
    @property
    def heads_per_source_block(self) -> int:
        """Attention sources per layer: ``n_heads`` at head level, 1 at layer level."""
        return self.n_heads if self.level == "head" else 1

    @property
    def receivers_per_attention(self) -> tuple[int, int, int]:
        """(q, k, v) receivers per layer."""
        if self.level == "head":
            return self.n_heads, self.n_kv_heads, self.n_kv_heads
        return 1, 1, 1

    @staticmethod
    def dimensions(n_layers: int, n_heads: int, n_kv_heads: int, level: Level) -> tuple[int, int]:
        """``(n_sources, n_receivers)`` of a graph of this shape, computed without building it."""
        heads, n_q, n_kv = (n_heads, n_heads, n_kv_heads) if level == "head" else (1, 1, 1)
        return 1 + n_layers * (heads + 1), 1 + n_layers * (n_q + 2 * n_kv + 1)

    def _build(self) -> None:
        hs = self.heads_per_source_block
        n_q, n_k, n_v = self.receivers_per_attention
        gqa = self.n_kv_heads != self.n_heads
        sources: list[str] = ["input"]
        source_kinds, source_layers = ["input"], [-1]
        receivers: list[str] = []
        receiver_kinds: list[str] = []
        receiver_layers: list[int] = []
        groups: list[ReceiverGroup] = []
        for layer in range(self.n_layers):
            attn_reads = len(sources)
            if self.level == "head":
                sources += [f"a{layer}.h{h}" for h in range(hs)]
                kv = "kv" if gqa else "h"
                names = (
                    [f"a{layer}.h{h}<q>" for h in range(n_q)]
                    + [f"a{layer}.{kv}{g}<k>" for g in range(n_k)]
                    + [f"a{layer}.{kv}{g}<v>" for g in range(n_v)]
                )
            else:
                sources.append(f"a{layer}")
                names = [f"a{layer}<q>", f"a{layer}<k>", f"a{layer}<v>"]
            source_kinds += ["attn"] * hs
            source_layers += [layer] * hs
            start = len(receivers)
            receivers += names
            receiver_kinds += ["q"] * n_q + ["k"] * n_k + ["v"] * n_v
            receiver_layers += [layer] * len(names)
            groups.append(ReceiverGroup("attn", layer, slice(start, len(receivers)), attn_reads))
            mlp_reads = attn_reads if self.parallel_blocks else len(sources)
            groups.append(ReceiverGroup("mlp", layer, slice(len(receivers), len(receivers) + 1), mlp_reads))
            receivers.append(f"m{layer}")
            receiver_kinds.append("mlp")
            receiver_layers.append(layer)
            sources.append(f"m{layer}")
            source_kinds.append("mlp")
            source_layers.append(layer)
        groups.append(ReceiverGroup("logits", None, slice(len(receivers), len(receivers) + 1), len(sources)))
        receivers.append("logits")
        receiver_kinds.append("logits")
        receiver_layers.append(self.n_layers)

        self.sources: tuple[str, ...] = tuple(sources)
        self.receivers: tuple[str, ...] = tuple(receivers)
        #: "input" | "attn" | "mlp" per source
        self.source_kinds: tuple[str, ...] = tuple(source_kinds)
        #: layer per source (-1 for input)
        self.source_layers: tuple[int, ...] = tuple(source_layers)
        #: "q" | "k" | "v" | "mlp" | "logits" per receiver
        self.receiver_kinds: tuple[str, ...] = tuple(receiver_kinds)
        #: layer per receiver (n_layers for logits)
        self.receiver_layers: tuple[int, ...] = tuple(receiver_layers)
        self.receiver_groups: tuple[ReceiverGroup, ...] = tuple(groups)
        mask = torch.zeros(len(sources), len(receivers), dtype=torch.bool)
        for group in groups:
            mask[: group.n_sources_read, group.columns] = True
        self._edge_mask = mask
        self._source_index = {name: i for i, name in enumerate(sources)}
        self._receiver_index = {name: i for i, name in enumerate(receivers)}

    # ------------------------------------------------------------------ queries
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
        try:
            return self._source_index[name]
        except KeyError:
            raise UnknownNameError(f"no source named {name!r} in this {self.level}-level graph") from None

    def receiver_index(self, name: str) -> int:
        """Column of a receiver, e.g. ``"a3.h1<q>"``, ``"m0"`` or ``"logits"``."""
        try:
            return self._receiver_index[name]
        except KeyError:
            raise UnknownNameError(f"no receiver named {name!r} in this {self.level}-level graph") from None

    def attention_sources(self, layer: int) -> slice:
        """Rows of layer ``layer``'s attention sources (heads in order)."""
        start = 1 + layer * (self.heads_per_source_block + 1)
        return slice(start, start + self.heads_per_source_block)

    def mlp_source(self, layer: int) -> int:
        """Row of MLP ``layer``."""
        return self.attention_sources(layer).stop

    def group(self, kind: str, layer: int | None = None) -> ReceiverGroup:
        """The receiver group of ``kind`` ("attn", "mlp", "logits") at ``layer``."""
        if kind == "logits":
            return self.receiver_groups[-1]
        index = 2 * layer + (0 if kind == "attn" else 1)
        return self.receiver_groups[index]

    def edge_names(self) -> list[str]:
        """Names ``"source->receiver"`` of the real edges, in row-major order of the mask."""
        rows, cols = torch.nonzero(self._edge_mask, as_tuple=True)
        return [f"{self.sources[r]}->{self.receivers[c]}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    # ------------------------------------------------------------------ coarsening
    def layer_level(self) -> "AttributionGraph":
        """The layer-level graph of the same model."""
        return AttributionGraph(self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_blocks, "layer")

    def coarsening_index(self) -> tuple[Int[Tensor, "n_sources"], Int[Tensor, "n_receivers"]]:
        """For each source and receiver, its row / column in :meth:`layer_level`.

        Summing scores over equal indices gives the layer-level scores exactly.
        """
        coarse = self.layer_level()
        src = [coarse.source_index(name.split(".")[0]) for name in self.sources]
        recv = [
            coarse.receiver_index(name.split(".")[0] + (name[name.index("<"):] if "<" in name else ""))
            for name in self.receivers
        ]
        return torch.tensor(src), torch.tensor(recv)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description from which ``from_dict`` rebuilds the graph."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "parallel_blocks": self.parallel_blocks,
            "level": self.level,
        }

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
            f"AttributionGraph(level={self.level!r}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"n_kv_heads={self.n_kv_heads}, parallel_blocks={self.parallel_blocks}: "
            f"{self.n_sources} sources x {self.n_receivers} receivers, {self.n_edges} edges)"
        )
