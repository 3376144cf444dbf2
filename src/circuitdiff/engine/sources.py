"""Source outputs into ``delta``: the forward half of the engine.

``delta[b, s, p, :]`` is replacement minus clean output of source ``s`` at position ``p``
(zero at padded positions), for the positions of one :class:`Window`. An intervention
returns the replacement outputs (corrupted run, means) and the clean forward subtracts
the clean outputs; for zero ablation the clean forward writes ``-output`` directly.

Per-head source outputs are computed from the attention values ``z`` and ``W_O``
straight into ``delta`` (stored source-major, so each head's rows are one block of it):
the model runs without TransformerLens's split-qkv / attn-result flags, so the forward
keeps the plain model's activations. Products of two of the model's own bfloat16 tensors
are exact in float32 and summed in float32 (:func:`~circuitdiff.engine.products.product`).
At layer level in float32 and float64 models the attention source is the attention output
the model computed, less ``W_O``'s bias (in post-norm families such as OLMo 2, the
post-norm's output as it is, at any dtype).
Hooks never edit model tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from circuitdiff.engine.architectures import check_level
from circuitdiff.engine.bridge import Bridge
from circuitdiff.engine.products import CONTRACTION_DTYPES, PROFILER_LABELS, add_product, product
from circuitdiff.errors import ArgumentError, UnsupportedModelError

if TYPE_CHECKING:
    from circuitdiff.data import Batch
    from circuitdiff.graph import AttributionGraph

__all__ = ["Window", "Record", "HookList", "SourceRecorder", "delta_shape"]

HookList = list[tuple[str, Callable[..., Any]]]

#: How a pass writes source outputs into ``delta``: ``"set"`` (delta = output, for
#: replacement runs), ``"negate"`` (delta = -output, clean run under zero ablation),
#: ``"subtract"`` (delta -= output, clean run after the replacement was written).
Record = Literal["set", "negate", "subtract"]

@dataclass(frozen=True)
class Window:
    """The positions of each batch a pass covers, and the dtype its ``delta`` is stored in.

    Since a score sums over positions, a batch can be scored in several passes, each
    covering a window (``Window.over(slice(start, stop))``); ``delta`` and the receiver
    gradients then hold only its positions, and the scores of consecutive windows add
    up to the whole batch's. ``dtype`` None is the accumulation dtype; ``torch.bfloat16``
    rounds ``delta`` and each receiver gradient before their product (summed in float32).
    """

    positions: slice = field(default_factory=lambda: slice(None))
    dtype: torch.dtype | None = None

    @classmethod
    def over(cls, positions: slice, dtype: torch.dtype | None = None) -> "Window":
        """A window of ``positions`` (``slice(start, stop)``, ``0 <= start < stop``)."""
        if positions.step not in (None, 1) or positions.start is None or positions.start < 0 or (
                positions.stop is not None and positions.stop <= positions.start):
            raise ArgumentError(f"positions must be slice(start, stop) with 0 <= start < stop; got {positions!r}.")
        return cls(positions, dtype)

    def of(self, batch: "Batch") -> range:
        """The positions of ``batch`` this window covers (fewer at the end of a short batch)."""
        return self.within(batch.input_ids.shape[1])

    def within(self, width: int) -> range:
        """The positions of a ``width``-token sequence this window covers."""
        return range(width)[self.positions]

class _SourcesRecorded(Exception):
    """Raised from a hook to end a forward pass once every source has been recorded."""

class SourceRecorder:
    """Allocates ``delta`` and returns the forward hooks that fill it."""

    def __init__(self, bridge: Bridge, graph: "AttributionGraph") -> None:
        check_level(bridge.spec.architecture, graph.level)  # post-norm layers have no per-head outputs
        self.bridge, self.graph = bridge, graph

    def delta_dtype(self, window: Window) -> torch.dtype:
        """The window's dtype: the accumulation dtype or one of :data:`CONTRACTION_DTYPES`."""
        if window.dtype is None or window.dtype == self.bridge.dtype:
            return self.bridge.dtype
        if window.dtype not in CONTRACTION_DTYPES:
            raise ArgumentError(f"contraction dtype must be {self.bridge.dtype} or one of {CONTRACTION_DTYPES}; "
                                f"got {window.dtype!r}.")
        return window.dtype

    def new_delta(self, input_ids: Tensor, window: Window) -> Float[Tensor, "batch n_sources window d_model"]:
        """An uninitialised ``delta`` for the window of ``input_ids [batch, pos]`` (every pass that records fills it).

        Stored source-major (``[n_sources, batch, window, d_model]`` in memory, returned as a
        ``[batch, n_sources, ...]`` view), so each source's rows are one block that the
        head outputs are multiplied straight into (:func:`add_product`).
        """
        b, n, w, d = delta_shape(self.graph, input_ids.shape[0], len(window.within(input_ids.shape[1])),
                                 self.bridge.spec.d_model)
        return torch.empty((n, b, w, d), dtype=self.delta_dtype(window), device=self.bridge.device).transpose(0, 1)

    def record(self, input_ids: Tensor, attention_mask: Tensor, delta: Tensor, window: Window) -> None:
        """Write every source's output on ``input_ids`` into ``delta`` (no gradients).

        The forward stops once the last MLP has written, skipping the final norm and the
        unembedding, which no source needs.
        """
        last = self.bridge.mlp_output_hook(self.graph.n_layers - 1)

        def stop(x: Tensor, hook: Any) -> None:
            raise _SourcesRecorded

        hooks = self.hooks(delta, attention_mask, "set", window) + [(last, stop)]
        try:
            with torch.no_grad(), self.bridge.model.hooks(fwd_hooks=hooks):
                self.bridge.model(input_ids, attention_mask=attention_mask)
        except _SourcesRecorded:
            return
        raise UnsupportedModelError(f"{last} never fired; the model did not run its last MLP.")

    def hooks(self, delta: Tensor, attention_mask: Tensor, record: Record, window: Window) -> HookList:
        """Forward hooks writing every source's output of one pass into ``delta``.

        Args:
            delta: ``[batch, n_sources, window, d_model]`` for ``window``'s positions.
            attention_mask: ``[batch, pos]``; padded positions are recorded as zero.
            record: how source outputs go into ``delta`` (see :data:`Record`).
            window: the positions ``delta`` covers.
        """
        bridge, positions = self.bridge, window.positions
        attention_mask = attention_mask[:, positions]
        padded = not bool(attention_mask.all())
        mask = attention_mask.to(device=delta.device, dtype=delta.dtype)[:, None, :, None]
        factor = -mask if record == "negate" else mask

        def write(rows: slice, value: Tensor) -> None:
            # value: [batch, n, window, d_model]; delta is our own buffer, edited in place.
            # With layers on several devices (device_map), delta lives on the first one.
            if bridge.recomputing:  # a checkpointed block's second forward: recorded already
                return
            target, value = delta[:, rows], value.detach().to(delta.device, delta.dtype)
            if record == "subtract" and padded:
                target.addcmul_(value, mask, value=-1.0)
            elif record == "subtract":
                target.sub_(value)
            elif padded:
                torch.mul(value, factor, out=target)
            elif record == "set":
                target.copy_(value)
            else:
                torch.neg(value, out=target)

        def write_product(rows: slice, a: Tensor, b: Tensor) -> None:
            # a @ b: [n, batch * window, d_model], the outputs of the n sources in rows.
            target = delta[:, rows].transpose(0, 1)  # [n, batch, window, d_model]
            # detached (the weights' views may carry autograd history); with layers on several
            # devices (device_map), delta lives on the first one
            a, b = a.detach().to(delta.device), b.detach().to(delta.device)
            if not target.is_contiguous():  # an intervention's own buffer: form the product, then write it
                write(rows, rearrange(product(a, b), "n (b p) d -> b n p d", b=target.shape[1]))
                return
            alpha, beta = (-1.0, 1.0) if record == "subtract" else (-1.0, 0.0) if record == "negate" else (1.0, 0.0)
            add_product(target.view(a.shape[0], a.shape[1], -1), a, b, alpha=alpha, beta=beta)
            if padded:
                target.mul_(mask.transpose(0, 1))

        def residual(rows: slice) -> Callable[..., None]:
            return lambda x, hook: write(rows, x[:, positions].unsqueeze(1))

        def attention_output(layer: int) -> Callable[..., None]:
            # layer level: the attention's output as the model computed it, less W_O's bias
            rows, bias = self.graph.attention_sources(layer), self.bridge.layers[layer].b_o
            if bias is None or bridge.post_norm:
                return residual(rows)
            bias = bias.detach().to(delta.device, delta.dtype)
            return lambda x, hook: write(rows, (x[:, positions].detach().to(delta.device, delta.dtype) - bias)
                                         .unsqueeze(1))

        hooks: HookList = [(bridge.input_hook, residual(slice(0, 1)))]
        for layer in range(self.graph.n_layers):
            # The model's own attention output where it is exact (float32 and float64 models) or
            # is the source itself (post-norm); else each head's output (or their sum) formed exactly.
            if self.graph.level == "layer" and (bridge.full_precision or bridge.post_norm):
                hooks.append((bridge.attention_output_hook(layer), attention_output(layer)))
            else:
                hooks.append((bridge.attention_values_hook(layer), self.attention_hook(layer, write_product, window)))
            row = self.graph.mlp_source(layer)
            hooks.append((bridge.mlp_output_hook(layer), residual(slice(row, row + 1))))
        return hooks

    def attention_hook(self, layer: int, write_product: Callable[[slice, Tensor, Tensor], None],
                       window: Window) -> Callable[..., None]:
        """The hook on ``layer``'s attention values ``z`` that writes its heads' outputs (``z_h @ W_O[h]``, or their sum)."""
        w_o = self.bridge.layers[layer].w_o
        rows = self.graph.attention_sources(layer)
        per_head = self.graph.level == "head"

        @torch.profiler.record_function(PROFILER_LABELS[0])
        def hook(z: Tensor, hook: Any) -> None:
            # z: [batch, pos, n_heads, d_head]; head h writes z_h @ W_O[h] (no bias), summed in float32.
            if self.bridge.recomputing:  # a checkpointed block's second forward: recorded already
                return
            z = z[:, window.positions].detach()
            if per_head:
                write_product(rows, rearrange(z, "b p h e -> h (b p) e"), rearrange(w_o, "d (h e) -> h e d", h=z.shape[2]))
            else:
                write_product(rows, rearrange(z, "b p h e -> 1 (b p) (h e)"), w_o.T.unsqueeze(0))

        return hook


def delta_shape(graph: "AttributionGraph", batch_size: int, window_width: int, d_model: int) -> tuple[int, ...]:
    """``[batch, n_sources, window, d_model]``: what ``delta`` holds (allocated here, counted by the memory planner)."""
    return (batch_size, graph.n_sources, window_width, d_model)
