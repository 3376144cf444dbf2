"""Receiver gradients contracted with ``delta``: the backward half of the engine.

``scores[b, s, r] += sum over positions and d_model of delta[b, s] * G_r[b]``, where
``G_r`` is the gradient of the objective with respect to receiver ``r``'s input, for
every real edge, inside the backward pass.

Per-receiver gradients are derived from the gradients at the q/k/v projection outputs,
through the projection weights (per head; at layer level in a float32 or float64 model
the model's own backward has formed each projection's ``W^T g`` at its input, which is read
instead) and the Jacobian
of the attention norm, as transients of one layer (no per-receiver copies of the residual
stream), optionally a chunk of positions at a time. Hooks never edit model tensors in
place: each returns a fresh view so that a gradient hook sees exactly one path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from circuitdiff.engine.bridge import Bridge
from circuitdiff.engine.products import PROFILER_LABELS, product
from circuitdiff.engine.sources import HookList, Window

if TYPE_CHECKING:
    from circuitdiff.graph import AttributionGraph, ReceiverGroup

__all__ = ["ReceiverGradients", "transient_bytes", "MEAN_CHUNKS"]

Stash = dict[tuple[int, str], Tensor]


class ReceiverGradients:
    """The backward hooks that add ``delta . G`` into a score buffer."""

    def __init__(self, bridge: Bridge, graph: "AttributionGraph") -> None:
        self.bridge, self.graph = bridge, graph

    def hooks(self, delta: Tensor, scores: Tensor, window: Window, source_rows: slice | None = None,
              positions_per_chunk: int | None = None) -> HookList:
        """Forward hooks whose gradient hooks contract ``delta`` with every receiver's gradient.

        Args:
            delta: ``[batch, n_sources, window, d_model]``, fixed during the pass.
            scores: ``[batch, n_sources, n_receivers]``, added to in the backward pass
                (the pass needs a backward from the objective).
            window: the positions ``delta`` covers; gradients elsewhere are not contracted.
            source_rows: contract only these rows of ``delta`` (default: all sources).
                Receivers that read none of them get no hooks.
            positions_per_chunk: form and contract the attention receivers' gradients this
                many positions of the window at a time (default: all at once). A score sums
                over positions, so the chunks' contributions add up to the window's; the
                per-layer transients (:func:`transient_bytes`) then scale with the chunk.
        """
        graph, bridge, positions = self.graph, self.bridge, window.positions
        source_rows = source_rows or slice(0, graph.n_sources)
        stash: Stash = {}

        def reads(group: "ReceiverGroup") -> slice:
            """The rows of ``source_rows`` that ``group`` has real edges from."""
            return slice(source_rows.start, min(source_rows.stop, group.n_sources_read))

        @torch.profiler.record_function(PROFILER_LABELS[2])
        def contract(group: "ReceiverGroup", gradient: Tensor, chunk: slice = slice(None)) -> None:
            # gradient: [batch, receivers in group, chunk of the window, d_model] (any strides); real edges only.
            gradient = gradient.to(delta.device, delta.dtype)  # device: a no-op unless layers sit on several
            rows = reads(group)
            sources = rearrange(delta[:, rows, chunk], "b s p d -> b s (p d)")
            gradient = rearrange(gradient, "b r p d -> b (p d) r")
            if delta.device.type != "cuda":
                scores[:, rows, group.columns] += product(sources, gradient)
                return
            # On CUDA one matrix product per sample, not one batched product: cuBLAS splits a
            # single product's long p*d reduction over the GPU, a batched one's not (on an
            # H200, batch 2 x 1024 tokens ran 7x slower than batch 1 x 2048 with bmm).
            for i in range(gradient.shape[0]):
                scores[i, rows, group.columns] += product(sources[i], gradient[i])

        def watch(on_gradient: Callable[[Tensor], None], keep_as: tuple[int, str] | None = None) -> Callable[..., Tensor]:
            # Return a fresh view so the gradient hook sees only the path behind this hook point
            # (also when a checkpointed block reruns, so that it rebuilds the same graph).
            def hook(x: Tensor, hook: Any) -> Tensor:
                y = x.view_as(x)
                if y.requires_grad and not bridge.recomputing:
                    if keep_as is not None:
                        stash[keep_as] = x
                    y.register_hook(on_gradient)
                return y
            return hook

        def attention_receivers(layer: int, group: "ReceiverGroup") -> None:
            width, first = delta.shape[2], window.positions.start or 0
            step = positions_per_chunk or width
            for start in range(0, width, step):
                chunk = slice(start, min(start + step, width))
                last = chunk.stop == width
                part = Window(slice(first + chunk.start, first + chunk.stop), window.dtype)
                contract(group, self.attention_gradients(layer, stash, part, keep=not last), chunk)

        def residual_receiver(group: "ReceiverGroup") -> Callable[[Tensor], None]:
            return lambda g: contract(group, g[:, positions].unsqueeze(1))

        def needed(group: "ReceiverGroup") -> bool:
            rows = reads(group)
            return rows.stop > rows.start

        hooks: HookList = [(bridge.input_hook, _requires_grad)]
        for layer in range(graph.n_layers):
            attention = graph.group("attn", layer)
            if needed(attention):
                for proj in ("q", "k", "v"):
                    if graph.level == "layer" and bridge.full_precision:  # the model's own W^T g, per projection
                        hooks.append((bridge.projection_input_hook(layer, proj),
                                      watch(lambda g, key=(layer, proj + "_in"): stash.__setitem__(key, g))))
                    else:
                        hooks.append((bridge.projection_hook(layer, proj),
                                      watch(lambda g, key=(layer, proj): stash.__setitem__(key, g))))
                # the attention input's gradient arrives after all of q, k and v have their gradients.
                on_attention = (lambda _, layer=layer, group=attention: attention_receivers(layer, group))
                hooks.append((bridge.attention_input_hook(layer), watch(on_attention, keep_as=(layer, "x"))))
            if needed(graph.group("mlp", layer)):
                hooks.append((bridge.mlp_input_hook(layer), watch(residual_receiver(graph.group("mlp", layer)))))
        hooks.append((bridge.logits_input_hook, watch(residual_receiver(graph.group("logits")))))
        return hooks

    @torch.no_grad()
    @torch.profiler.record_function(PROFILER_LABELS[1])
    def attention_gradients(
        self, layer: int, stash: Stash, window: Window = Window(), keep: bool = False
    ) -> Float[Tensor, "batch receivers window d_model"]:
        """Gradients at the q, k, v inputs of ``layer`` (per head, or summed at layer level), in the window.

        ``stash`` holds the layer's norm input ``(layer, "x")``, the gradients at its q, k,
        v outputs ``(layer, "q")`` ... and, at layer level, the model's own gradients at the
        projections' inputs ``(layer, "q_in")`` ... (popped here unless ``keep``, for a later
        chunk of positions). The input of q head h is read
        through the norm: ``q_h = norm(x) @ W_Q[h]^T``, ``norm(x) = weight * x_hat``,
        ``x_hat = (x - [mean x]) / s`` (mean for LayerNorm only),
        ``s = sqrt(mean((x - [mean x])^2) + eps)``. With ``v = W_Q[h]^T dL/dq_h`` and
        ``a = weight / s``, its input gradient is

            G_h = v * a - x_hat * mean(v * a * x_hat) - [mean(v * a)]

        and likewise for k and v. ``v`` is one product of the model's own gradients and
        weights (:func:`~circuitdiff.engine.products.product`: for bfloat16 models, exact
        products summed in float32); the rest is in-place updates of the
        ``[receivers, batch * pos, d_model]`` result and its row means, taken an eighth of
        the receivers at a time (:data:`MEAN_CHUNKS`) so that their temporary stays small.
        Without an attention norm (OLMo 2), ``G_h = v``.
        """
        weights = self.bridge.layers[layer]
        norm, positions = weights.norm, window.positions
        take = stash.get if keep else stash.pop
        x = take((layer, "x"))[:, positions]
        b, p, d = x.shape
        mats = (weights.w_q, weights.w_k, weights.w_v)

        def output_gradient(proj: str, w: Tensor) -> Tensor:
            """``dL/d(proj output)`` as ``[batch * pos, heads, d_head]`` (zero where the objective does not read it)."""
            g = take((layer, proj), None)
            if g is None:
                return torch.zeros(b * p, w.shape[0], w.shape[1], dtype=w.dtype, device=x.device)
            return rearrange(g[:, positions], "b p h e -> (b p) h e")

        if self.graph.level == "head":  # v: [heads, batch*pos, d_model]
            grads = [output_gradient(proj, w) for proj, w in zip("qkv", mats, strict=True)]
            v = product(rearrange(torch.cat(grads, 1), "bp h e -> h bp e"), torch.cat(mats, 0))
        else:  # v: [3, batch*pos, d_model], read from the model where it is exact (Bridge.full_precision)
            v = torch.empty(3, b * p, d, dtype=self.bridge.dtype, device=x.device)
            for i, (proj, w) in enumerate(zip("qkv", mats, strict=True)):
                u = take((layer, proj + "_in"), None)
                if u is not None:
                    v[i] = u[:, positions].reshape(b * p, d)
                else:
                    v[i] = product(output_gradient(proj, w).flatten(1), w.flatten(0, 1))
        if norm is None:
            return rearrange(v, "r (b p) d -> b r p d", b=b)
        x = x.to(self.bridge.dtype)
        if not norm.rms:
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()  # [batch, pos, 1]
        x_hat = (x / scale).reshape(b * p, d)
        v.mul_((norm.weight.to(x.device, self.bridge.dtype) / scale).reshape(b * p, d))  # v * a
        centre = None if norm.rms else v.mean(-1, keepdim=True)
        v.addcmul_(x_hat, _means_of_products(v, x_hat), value=-1.0)
        if centre is not None:
            v.sub_(centre)
        return rearrange(v, "r (b p) d -> b r p d", b=b)


#: The receivers' row means (:func:`_means_of_products`) are taken in this many slices of receivers.
MEAN_CHUNKS = 8


def _means_of_products(v: Tensor, x: Tensor) -> Tensor:
    """``mean(v[r] * x, -1)`` for every receiver ``r`` of ``v [receivers, n, d]``, as ``[receivers, n, 1]``.

    The products are formed a slice of :data:`MEAN_CHUNKS` at a time in one buffer
    (a batched matrix-vector product over ``n`` would need no buffer but runs about 3x
    slower on CPU).
    """
    step = -(-v.shape[0] // MEAN_CHUNKS)
    means = v.new_empty(v.shape[0], v.shape[1], 1)
    buffer = v.new_empty(min(step, v.shape[0]), *v.shape[1:])
    for start in range(0, v.shape[0], step):
        part = v[start:start + step]
        products = torch.mul(part, x, out=buffer[:part.shape[0]])
        torch.mean(products, -1, keepdim=True, out=means[start:start + step])
    return means


def transient_bytes(graph: "AttributionGraph", n_heads: int, n_kv_heads: int, d_head: int, d_model: int,
                    window_tokens: int, tokens: int, model_bytes: int, accumulation_bytes: int,
                    contraction_bytes: int) -> int:
    """Peak bytes of one layer's :meth:`ReceiverGradients.attention_gradients` and its contraction.

    What the memory planner counts, term by term as the code allocates it (``window_tokens``
    = batch x window positions, ``tokens`` = batch x every position):

    - ``v [receivers, window_tokens, d_model]`` in the accumulation dtype (q+k+v heads
      at head level, 3 at layer level);
    - the concatenated projection gradients over the window and, at head level, the
      concatenated q/k/v weights, in the model's dtype;
    - the stashed gradients of every position: at the projections' outputs, or at layer
      level in a float32/float64 model (``model_bytes == accumulation_bytes``) at their
      three inputs, kept from their arrival until the attention input's;
    - ``x``, its copy in the accumulation dtype, ``x_hat`` and ``weight / s`` over the window, and
      the buffer of :func:`_means_of_products` (an eighth of the receivers), accumulation dtype;
    - the stashed projection gradients of every position, model dtype;
    - with a contraction dtype other than the accumulation dtype, ``v``'s copy in it.

    (On CPU, bfloat16 models also make float32 copies of the concatenations; not counted.)
    """
    n_q, n_k, n_v = graph.receivers_per_attention
    proj = (n_heads + 2 * n_kv_heads) * d_head  # q, k, v projection outputs per token
    if graph.level == "head":
        v = (n_q + n_k + n_v) * window_tokens * d_model * accumulation_bytes
        qkv = window_tokens * proj * model_bytes + proj * d_model * model_bytes
    else:
        v = 3 * window_tokens * d_model * accumulation_bytes
        qkv = window_tokens * proj * model_bytes
    receivers = n_q + n_k + n_v if graph.level == "head" else 3
    norm_terms = (4 + -(-receivers // MEAN_CHUNKS)) * window_tokens * d_model * accumulation_bytes
    model_inputs = graph.level == "layer" and model_bytes == accumulation_bytes
    stashed = tokens * (3 * d_model if model_inputs else proj) * model_bytes
    total = v + qkv + norm_terms + stashed
    if contraction_bytes != accumulation_bytes:
        total += receivers * window_tokens * d_model * contraction_bytes
    return total


def _requires_grad(x: Tensor, hook: Any) -> Tensor | None:
    """The embeddings as a leaf that needs a gradient (parameters have none during attribution)."""
    if not x.requires_grad:
        return x.detach().requires_grad_(True)
    return None
