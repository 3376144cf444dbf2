"""The shared hook machinery: source differences in, per-edge contractions out.

Two buffers per batch, both float32 (float64 for float64 models) unless ``delta`` is
stored in bfloat16 (:meth:`EdgeHooks.contracting_in`):

- ``delta[b, s, p, :]``: replacement minus clean output of source ``s`` at position
  ``p`` (zero at padded positions). An intervention writes the replacement outputs
  (corrupted run, means) and the clean forward subtracts the clean outputs; for zero
  ablation the clean forward writes ``-output`` directly.
- ``scores[b, s, r]``: sum over positions and d_model of ``delta[b, s] * G_r[b]``,
  where ``G_r`` is the gradient of the objective with respect to receiver ``r``'s input.

Memory: the model runs without TransformerLens's split-qkv / attn-result flags, so the
forward keeps the plain model's activations. Per-head source outputs are computed from
the attention values ``z`` and ``W_O`` straight into ``delta``. Per-receiver gradients
are derived inside the backward pass from the gradients at the q/k/v projection
outputs, through the projection weights and the Jacobian of the attention norm, as
transients of one layer. Products of two of the model's own bfloat16 tensors (``z``
and ``W_O``, projection gradients and weights) are exact in float32 and are summed in
float32 (:func:`_product`). Hooks never edit model tensors in place: each returns a fresh
view so that a gradient hook sees exactly one path.

Position windows: since a score sums over positions, a batch can be scored in several
passes, each covering a window of positions (:meth:`EdgeHooks.restricted_to`). A
window's ``delta`` and receiver-gradient transients hold only its positions, so their
memory shrinks with the window while every pass repeats the forward and backward.

Profiling: the per-head source outputs, the attention receivers' gradients and the
contractions run under ``torch.profiler.record_function`` labels (:data:`PROFILER_LABELS`),
so a profile shows what EAP adds to a plain pass (``benchmarks/gpu_7b.py --profile``).

bfloat16 contraction (:meth:`EdgeHooks.contracting_in`): ``delta`` and each receiver
gradient are rounded to bfloat16 before their product, which is summed in float32 (the
products of bfloat16 numbers are exact in float32) and added to the float32 ``scores``.
``delta`` takes half the memory and, on GPUs, the products run on bfloat16 matrix units;
each factor carries bfloat16's relative rounding error (2^-9).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentError, UnsupportedModelError
from circuitdiff.graph import AttributionGraph, ReceiverGroup
from circuitdiff.models import NormParams, linear_weight, norm_params

__all__ = ["EdgeHooks", "accumulation_dtype", "Record", "CONTRACTION_DTYPES", "is_contraction_dtype", "PROFILER_LABELS"]

HookList = list[tuple[str, Callable[..., Any]]]

#: How a pass writes source outputs into ``delta``: ``"set"`` (delta = output, for
#: replacement runs), ``"negate"`` (delta = -output, clean run under zero ablation),
#: ``"subtract"`` (delta -= output, clean run after a replacement was written).
Record = Literal["set", "negate", "subtract"]

#: The dtypes ``delta`` may be stored in besides the accumulation dtype. float16 is left
#: out: its range (6e-8 to 65504) loses small gradients and large activations of 7B models.
CONTRACTION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)


def is_contraction_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` may be asked for as a contraction dtype: an accumulation dtype or one of CONTRACTION_DTYPES."""
    return any(dtype is allowed for allowed in (torch.float32, torch.float64, *CONTRACTION_DTYPES))

#: ``torch.profiler`` labels of EAP's own work: per-head source outputs (forward), the
#: attention receivers' gradients and the ``delta . G`` contractions (backward).
PROFILER_LABELS: tuple[str, ...] = ("circuitdiff.head_outputs", "circuitdiff.receiver_gradients",
                                    "circuitdiff.contract")

INPUT_HOOK = "blocks.0.hook_in"
LOGITS_INPUT_HOOK = "ln_final.hook_in"


class _SourcesRecorded(Exception):
    """Raised from a hook to end a forward pass once every source has been recorded."""


def accumulation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 models."""
    return torch.promote_types(model_dtype, torch.float32)


def _matmul_has_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=...)`` (2.8 and later)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a [..., m, k] @ b [..., k, n]`` (2-d or batched 3-d); bfloat16/float16 factors are summed in float32.

    Products of two bfloat16 (or two float16) numbers are exact in float32, so for such
    factors the result is the exact product up to float32 summation order, and it is float32.
    CUDA: ``torch.mm`` / ``torch.bmm`` with ``out_dtype=torch.float32``, on the GPU's
    low-precision matrix units; cuBLAS then also sums its split-K partial products in
    float32 (for a bfloat16 result PyTorch lets it sum them in bfloat16). Elsewhere, and
    with torch before 2.8 (no ``out_dtype``), the factors are upcast to float32: whole for
    a short reduction (``k <= m + n``: the receivers' and source outputs' products), a
    slice of ``k`` at a time for a long one (the contraction over positions x d_model), so
    that the copies stay a fraction of the buffer they come from. (torch's own CPU bfloat16
    product rounds its result to bfloat16, and one of its kernels, torch 2.13.0 with one
    thread on a ``[3, 524288] @ [524288, 3]`` product, dies with SIGFPE.)

    Other factors: ``a @ b`` in their promoted dtype, at least float32.
    """
    if a.dtype != b.dtype or a.dtype not in _EXACT_IN_FLOAT32:
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dtype) @ b.to(dtype)
    if a.device.type in _FLOAT32_OUTPUT_DEVICES and _matmul_has_out_dtype():
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
    (m, k), n = a.shape[-2:], b.shape[-1]
    if k <= m + n:
        return a.float() @ b.float()
    per_k = (a.numel() + b.numel()) // k  # float32 elements copied per unit of k
    step = max(1, min(-(-k // _CPU_SLICES), _CPU_SLICE_ELEMENTS // per_k))
    out = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=torch.float32, device=a.device)
    for start in range(0, k, step):
        out += a[..., start:start + step].float() @ b[..., start:start + step, :].float()
    return out


# Dtypes whose products are exact in float32 (8- and 11-bit significands).
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16)
# Devices whose bfloat16/float16 matrix products can return float32 (``torch.mm(..., out_dtype=)``).
_FLOAT32_OUTPUT_DEVICES = ("cuda",)
# CPU bfloat16/float16 products with a long reduction (k > m + n: the contraction over
# positions x d_model): at least this many slices of k, each with at most this many
# elements in its two float32 copies (2**24 elements: 64 MiB).
_CPU_SLICES = 8
_CPU_SLICE_ELEMENTS = 2**24


@dataclass
class _AttentionLayer:
    """Views of one layer's weights: q, k, v as ``[heads, d_head, d_model]``, o as
    ``[d_model, n_heads * d_head]`` (nn.Linear layout)."""

    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    norm: NormParams


class EdgeHooks:
    """Forward hooks that fill ``delta`` and register the backward contractions.

    Built once per (model, graph); every call of :meth:`hooks` returns fresh hook
    functions bound to one batch's buffers. ``positions`` is the window of each batch's
    positions that buffers and hooks cover (all of them unless :meth:`restricted_to`).
    """

    positions: slice = slice(None)

    def __init__(self, model: Any, graph: AttributionGraph) -> None:
        self.model = model
        self.graph = graph
        cfg = model.cfg
        d_head, d_model = int(cfg.d_head), int(cfg.d_model)
        self.d_model = d_model
        self.dtype = accumulation_dtype(next(model.parameters()).dtype)
        self.delta_dtype = self.dtype
        self.device = next(model.parameters()).device
        self.layers: list[_AttentionLayer] = []
        for block in model.blocks:
            attn = block.attn
            self.layers.append(_AttentionLayer(
                w_q=linear_weight(attn.q).reshape(graph.n_heads, d_head, d_model),
                w_k=linear_weight(attn.k).reshape(graph.n_kv_heads, d_head, d_model),
                w_v=linear_weight(attn.v).reshape(graph.n_kv_heads, d_head, d_model),
                w_o=linear_weight(attn.o),
                norm=norm_params(block.ln1),
            ))

    def restricted_to(self, positions: slice) -> "EdgeHooks":
        """A copy whose buffers and hooks cover only ``positions`` (``slice(start, stop)``) of each batch.

        ``delta`` then has ``stop - start`` positions (fewer at the end of a short batch);
        source outputs outside the window are not recorded and receiver gradients
        outside it are not contracted. The scores of consecutive windows add up to the
        scores of the whole batch.
        """
        if positions.step not in (None, 1) or positions.start is None or positions.start < 0 or (
                positions.stop is not None and positions.stop <= positions.start):
            raise ArgumentError(f"positions must be slice(start, stop) with 0 <= start < stop; got {positions!r}.")
        window = copy.copy(self)
        window.positions = positions
        return window

    def contracting_in(self, dtype: torch.dtype) -> "EdgeHooks":
        """A copy whose ``delta`` is stored, and contracted with receiver gradients, in ``dtype``.

        ``dtype`` is the accumulation dtype (no change) or one of :data:`CONTRACTION_DTYPES`.
        Products are accumulated in float32 and scores stay in the accumulation dtype.
        """
        if dtype != self.dtype and dtype not in CONTRACTION_DTYPES:
            raise ArgumentError(f"contraction dtype must be {self.dtype} or one of {CONTRACTION_DTYPES}; got {dtype!r}.")
        copied = copy.copy(self)
        copied.delta_dtype = dtype
        return copied

    def window(self, batch: Batch) -> range:
        """The positions of ``batch`` that this object's buffers and hooks cover."""
        return range(batch.input_ids.shape[1])[self.positions]

    # ------------------------------------------------------------------ buffers
    def new_delta(self, batch: Batch) -> Float[Tensor, "batch n_sources window d_model"]:
        """An uninitialised ``delta`` buffer for ``batch``'s window (every pass that records fills it)."""
        b, p = batch.size, len(self.window(batch))
        return torch.empty(b, self.graph.n_sources, p, self.d_model, dtype=self.delta_dtype, device=self.device)

    def new_scores(self, batch: Batch) -> Float[Tensor, "batch n_sources n_receivers"]:
        """A zero per-sample score buffer for ``batch``."""
        g = self.graph
        return torch.zeros(batch.size, g.n_sources, g.n_receivers, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ passes
    def clean_pass(self, intervention: Any, batch: Batch, record: bool) -> tuple[Tensor, bool, Tensor]:
        """Prefill ``intervention``'s replacements, then run the clean batch once without gradients.

        Returns ``(buffer, replaced, clean_logits)``. With ``record`` the clean outputs are
        subtracted as the pass goes, so ``buffer`` is the fixed ``delta = replacement -
        clean`` (``-clean`` for a zero replacement). Without, ``buffer`` holds the
        replacements when ``replaced`` is True (False: they are zero).
        """
        buffer = self.new_delta(batch)
        replaced = intervention.prefill(self, batch, buffer)
        mode: Record | None = ("subtract" if replaced else "negate") if record else None
        with torch.no_grad(), self.model.hooks(fwd_hooks=self.hooks(buffer, batch.attention_mask, mode)):
            logits = self.model(batch.input_ids, attention_mask=batch.attention_mask)
        return buffer, replaced, logits

    def record_sources(self, input_ids: Tensor, attention_mask: Tensor, delta: Tensor) -> None:
        """Write every source's output on ``input_ids`` into ``delta`` (no gradients).

        The forward stops once the last MLP has written, skipping the final norm and the
        unembedding, which no source needs.
        """
        last = f"blocks.{self.graph.n_layers - 1}.mlp.hook_out"

        def stop(x: Tensor, hook: Any) -> None:
            raise _SourcesRecorded

        try:
            with torch.no_grad(), self.model.hooks(fwd_hooks=self.hooks(delta, attention_mask, "set") + [(last, stop)]):
                self.model(input_ids, attention_mask=attention_mask)
        except _SourcesRecorded:
            return
        raise UnsupportedModelError(f"{last} never fired; the model did not run its last MLP.")

    # ------------------------------------------------------------------ hooks
    def hooks(
        self,
        delta: Tensor,
        attention_mask: Tensor,
        record: Record | None,
        scores: Tensor | None = None,
        source_rows: slice | None = None,
    ) -> HookList:
        """Forward hooks for one pass.

        Args:
            delta: ``[batch, n_sources, window, d_model]`` buffer for :attr:`positions`.
            attention_mask: ``[batch, pos]``; padded positions are recorded as zero.
            record: how source outputs go into ``delta`` (see :data:`Record`); None
                records nothing.
            scores: if given, ``[batch, n_sources, n_receivers]`` into which the backward
                pass adds ``delta . G`` for every real edge. The pass then needs a
                backward from the objective.
            source_rows: with ``scores``, contract only these rows of ``delta``
                (default: all sources). Receivers that read none of them get no hooks.
        """
        graph, window = self.graph, self.positions
        attention_mask = attention_mask[:, window]
        padded = not bool(attention_mask.all())
        mask = attention_mask.to(device=delta.device, dtype=delta.dtype)[:, None, :, None]
        factor = -mask if record == "negate" else mask

        def write(rows: slice, value: Tensor) -> None:
            # value: [batch, n, window, d_model]; delta is our own buffer, edited in place.
            # With layers on several devices (device_map), delta lives on the first one.
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

        def input_hook(x: Tensor, hook: Any) -> Tensor | None:
            if record is not None:
                write(slice(0, 1), x[:, window].unsqueeze(1))
            if scores is not None and not x.requires_grad:
                return x.detach().requires_grad_(True)
            return None

        hooks: HookList = [(INPUT_HOOK, input_hook)]
        if record is not None:
            for layer in range(graph.n_layers):
                hooks.append((f"blocks.{layer}.attn.o.hook_in", self._attention_source_hook(layer, write)))
                row = graph.mlp_source(layer)
                hooks.append((f"blocks.{layer}.mlp.hook_out",
                              lambda x, hook, rows=slice(row, row + 1): write(rows, x[:, window].unsqueeze(1))))
        if scores is not None:
            hooks += self._gradient_hooks(delta, scores, source_rows or slice(0, graph.n_sources))
        return hooks

    def _attention_source_hook(self, layer: int, write: Callable[[slice, Tensor], None]) -> Callable[..., None]:
        w_o = self.layers[layer].w_o
        rows = self.graph.attention_sources(layer)

        @torch.profiler.record_function(PROFILER_LABELS[0])
        def hook(z: Tensor, hook: Any) -> None:
            # z: [batch, pos, n_heads, d_head]; head h writes z_h @ W_O[h] (no bias).
            # In the model's dtype: _product sums bfloat16/float16 products in float32.
            z = z[:, self.positions].detach()
            b, p, h, e = z.shape
            if self.graph.level == "head":
                w_per_head = w_o.view(-1, h, e).permute(1, 2, 0)  # [h, e, d]
                per_head = _product(z.reshape(b * p, h, e).transpose(0, 1), w_per_head)  # [h, b*p, d]
                write(rows, per_head.view(h, b, p, -1).transpose(0, 1))
            else:
                write(rows, _product(z.reshape(b * p, h * e), w_o.T).view(b, 1, p, -1))

        return hook

    def _gradient_hooks(self, delta: Tensor, scores: Tensor, source_rows: slice) -> HookList:
        graph, window = self.graph, self.positions
        stash: dict[tuple[int, str], Tensor] = {}

        def reads(group: ReceiverGroup) -> slice:
            """The rows of ``source_rows`` that ``group`` has real edges from."""
            return slice(source_rows.start, min(source_rows.stop, group.n_sources_read))

        @torch.profiler.record_function(PROFILER_LABELS[2])
        def contract(group: ReceiverGroup, gradient: Tensor) -> None:
            # gradient: [batch, receivers in group, window, d_model] (any strides); real edges only.
            b, n, p, d = gradient.shape
            gradient = gradient.to(delta.device, delta.dtype)  # device: a no-op unless layers sit on several
            rows = reads(group)
            sources = delta[:, rows].reshape(b, rows.stop - rows.start, p * d)
            gradient = gradient.reshape(b, n, p * d)
            # One matrix product per sample, not one batched product: cuBLAS splits a single
            # product's long p*d reduction over the GPU, a batched one's not (on an H200,
            # batch 2 x 1024 tokens ran 7x slower than batch 1 x 2048 with bmm).
            for i in range(b):
                scores[i, rows, group.columns] += _product(sources[i], gradient[i].T)

        def watch(on_gradient: Callable[[Tensor], None], keep_as: tuple[int, str] | None = None) -> Callable[..., Tensor]:
            # Return a fresh view so the gradient hook sees only the path behind this hook point.
            def hook(x: Tensor, hook: Any) -> Tensor:
                y = x.view_as(x)
                if y.requires_grad:
                    if keep_as is not None:
                        stash[keep_as] = x
                    y.register_hook(on_gradient)
                return y
            return hook

        def residual_receiver(group: ReceiverGroup) -> Callable[[Tensor], None]:
            return lambda g: contract(group, g[:, window].unsqueeze(1))

        def needed(group: ReceiverGroup) -> bool:
            rows = reads(group)
            return rows.stop > rows.start

        hooks: HookList = []
        for layer in range(graph.n_layers):
            attention = graph.group("attn", layer)
            if needed(attention):
                for proj in ("q", "k", "v"):
                    hooks.append((f"blocks.{layer}.attn.{proj}.hook_out",
                                  watch(lambda g, key=(layer, proj): stash.__setitem__(key, g))))
                # ln1's input gradient arrives after all of q, k and v have their gradients.
                on_attention = (lambda _, layer=layer, group=attention:
                                contract(group, self._attention_receivers(layer, stash)))
                hooks.append((f"blocks.{layer}.ln1.hook_in", watch(on_attention, keep_as=(layer, "x"))))
            if needed(graph.group("mlp", layer)):
                hooks.append((f"blocks.{layer}.ln2.hook_in", watch(residual_receiver(graph.group("mlp", layer)))))
        hooks.append((LOGITS_INPUT_HOOK, watch(residual_receiver(graph.group("logits")))))
        return hooks

    @torch.profiler.record_function(PROFILER_LABELS[1])
    def _attention_receivers(
        self, layer: int, stash: dict[tuple[int, str], Tensor]
    ) -> Float[Tensor, "batch receivers window d_model"]:
        """Gradients at the q, k, v inputs of ``layer`` (per head, or summed at layer level), in the window.

        The input of q head h is read through the norm: ``q_h = norm(x) @ W_Q[h]^T``,
        ``norm(x) = weight * x_hat``, ``x_hat = (x - [mean x]) / s`` (mean for LayerNorm
        only), ``s = sqrt(mean((x - [mean x])^2) + eps)``. With ``v = W_Q[h]^T dL/dq_h``
        and ``a = weight / s``, its input gradient is

            G_h = v * a - x_hat * mean(v * a * x_hat) - [mean(v * a)]

        and likewise for k and v. ``v`` is one product of the model's own gradients and
        weights (:func:`_product`: for bfloat16 models, exact products summed in float32 on
        the GPU's bfloat16 units); the rest is one reduction and two in-place updates over
        the ``[receivers, batch * pos, d_model]`` result (three for LayerNorm).
        """
        weights = self.layers[layer]
        norm = weights.norm
        window = self.positions
        x = stash.pop((layer, "x"))[:, window].to(self.dtype)
        b, p, d = x.shape
        if not norm.rms:
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()  # [batch, pos, 1]
        x_hat = (x / scale).reshape(b * p, d)
        a = (norm.weight.to(x.device, self.dtype) / scale).reshape(b * p, d)
        mats = (weights.w_q, weights.w_k, weights.w_v)
        grads = []
        for proj, w in zip("qkv", mats, strict=True):
            g = stash.pop((layer, proj), None)
            if g is None:  # the objective does not depend on this projection
                g = torch.zeros(b, p, w.shape[0], w.shape[1], dtype=w.dtype, device=x.device)
            else:
                g = g[:, window]
            grads.append(g.reshape(b * p, w.shape[0], w.shape[1]))
        if self.graph.level == "head":  # v: [heads, batch*pos, d_model]
            v = _product(torch.cat(grads, 1).transpose(0, 1), torch.cat(mats, 0))
        else:
            v = torch.stack([_product(g.flatten(1), w.flatten(0, 1)) for g, w in zip(grads, mats, strict=True)])
        basis = torch.stack([x_hat * a] if norm.rms else [x_hat * a, a], -1)  # [b*p, d_model, 1 or 2]
        means = torch.bmm(v.transpose(0, 1), basis).transpose(0, 1) / d  # [heads, b*p, 1 or 2]
        v.mul_(a)
        v.addcmul_(x_hat.unsqueeze(0), means[..., :1], value=-1.0)
        if not norm.rms:
            v.sub_(means[..., 1:])
        return v.view(-1, b, p, d).transpose(0, 1)
