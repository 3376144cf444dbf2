"""Memory planner: how much memory one attribution batch needs, and the largest batch that fits.

Every number is derived from what the code allocates, per part:

- **weights**: the model's parameter bytes (exact for a loaded model; from the shape
  for a :class:`ModelShape`).
- **saved activations** of the plain forward (what autograd keeps for the backward with
  parameter gradients off, so linear layers keep only their weights). Per layer and
  token, counted with ``torch.autograd.graph.saved_tensors_hooks`` on the bridges of the
  supported architectures: the norm input (float32 for RMSNorm, which upcasts; model
  dtype for LayerNorm; one shared input for parallel blocks), q, k and v after rotary
  with k/v repeated to every query head (3 x heads x d_head), the attention
  probabilities of the bridge's eager attention (float32 softmax output plus its copy in
  the model dtype: heads x pos per token, i.e. pos^2 per head), and the MLP's hidden
  activations (3 x d_mlp gated, 4 x d_mlp for GPT-2's tanh GELU, 1 x d_mlp for
  GPT-NeoX). Then the final norm's input and the logits ``[batch, pos, vocab]``.
- **objective**: float32 log-softmax over the loss positions (``loss_positions``,
  default every position: an upper bound).
- **source buffer**: ``delta [batch, n_sources, window, d_model]`` in float32 (float64
  for float64 models) or the EAP scorer's ``contraction_dtype`` (bfloat16: half),
  ``hooks.EdgeHooks.new_delta``, where the window is every position or
  ``positions_per_pass`` of them (``EAP(positions_per_pass=...)``); plus the
  ``[batch, n_sources, n_receivers]`` score buffer.
- **receiver gradients**: one layer's transients in ``EdgeHooks._attention_receivers``:
  ``u [receivers, batch*window, d_model]`` float32 (q+k+v heads at head level, 3 at
  layer level, where the stack doubles it), the concatenated projection gradients (over
  the window) and q/k/v weights of one layer in the model's dtype, ``x``, ``x_hat`` and
  the norm's scale terms in float32 (over the window), and the model-dtype projection
  gradients of every position; with a bfloat16 contraction, also ``u``'s bfloat16 copy.
  (On CPU, bfloat16 models also make float32 copies of the concatenations; not counted.)
- **backward transients** of the plain model: the attention backward's pos^2 tensors of
  one layer (gradients of probabilities and scores) or the logits' gradient, whichever
  is larger; EAP's receiver gradients replace them when larger (they do not coincide).

Peak = weights + saved activations + logits + objective + source buffer + scores +
max(plain backward transient, receiver gradients) [+ clean logits for EAP-IG].
Validated against CPU profiler peaks and the H200 measurements of
``benchmarks/results/gpu_7b_h200_2026-11-27.json`` (see ``tests/test_planner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from circuitdiff.errors import ArgumentError, DataError, MemoryPlanError, UnknownNameError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hooks import CONTRACTION_DTYPES, is_contraction_dtype

__all__ = ["ModelShape", "MemoryEstimate", "MemoryPlanError", "estimate_memory", "plan_batch_size", "METHODS"]

#: Methods the planner knows: EAP, and EAP-IG (EAP's peak plus the clean logits kept across steps).
METHODS: tuple[str, ...] = ("eap", "eap-ig-inputs", "eap-ig-activations")

# Per architecture: norm kind, MLP hidden activations saved per token (in units of d_mlp),
# gated MLP (3 weight matrices), learned position embeddings.
_ARCHITECTURES: dict[str, tuple[str, int, bool, bool]] = {
    "LlamaForCausalLM": ("rms", 3, True, False),
    "MistralForCausalLM": ("rms", 3, True, False),
    "Qwen2ForCausalLM": ("rms", 3, True, False),
    "GPT2LMHeadModel": ("layer", 4, False, True),
    "GPTNeoXForCausalLM": ("layer", 1, False, False),
}
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The shape facts the planner needs; build one from a config, no weights needed.

    ``weight_bytes`` None means: computed from the shape (untied embeddings unless
    ``tied_embeddings``).
    """

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    dtype: torch.dtype = torch.float32
    parallel_blocks: bool = False
    tied_embeddings: bool = False
    qkv_bias: bool = False
    n_positions: int = 0
    weight_bytes: int | None = None

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape":
        """The shape of a TransformerBridge, with its exact parameter bytes."""
        from circuitdiff.models import describe_model

        spec = describe_model(model)
        params = list(model.parameters())
        return cls(
            architecture=spec.architecture, n_layers=spec.n_layers, n_heads=spec.n_heads,
            n_kv_heads=spec.n_kv_heads, d_model=spec.d_model, d_head=spec.d_head,
            d_mlp=int(model.cfg.d_mlp), d_vocab=spec.d_vocab, dtype=params[0].dtype,
            parallel_blocks=spec.parallel_blocks,
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
        )

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> "ModelShape":
        """The shape of a Hugging Face config (``PretrainedConfig`` or its ``to_dict()``)."""
        c = config if isinstance(config, dict) else config.to_dict()
        architecture = (c.get("architectures") or [""])[0] or {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}.get(c.get("model_type", ""), "")
        if architecture not in _ARCHITECTURES:
            raise UnknownNameError(f"no memory model for architecture {architecture!r}; "
                                   f"known: {', '.join(_ARCHITECTURES)}.")
        if dtype is None:
            name = c.get("torch_dtype") or c.get("dtype") or "float32"
            dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))
        if architecture == "GPT2LMHeadModel":
            d, heads = c["n_embd"], c["n_head"]
            return cls(architecture, c["n_layer"], heads, heads, d, d // heads, c.get("n_inner") or 4 * d,
                       c["vocab_size"], dtype, tied_embeddings=c.get("tie_word_embeddings", True),
                       qkv_bias=True, n_positions=c.get("n_positions", 1024))
        d, heads = c["hidden_size"], c["num_attention_heads"]
        return cls(
            architecture, c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads, d,
            c.get("head_dim") or d // heads, c["intermediate_size"], c["vocab_size"], dtype,
            parallel_blocks=architecture == "GPTNeoXForCausalLM" and c.get("use_parallel_residual", True),
            tied_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=architecture in ("Qwen2ForCausalLM", "GPTNeoXForCausalLM") or c.get("attention_bias", False),
        )

    @property
    def element_size(self) -> int:
        """Bytes per parameter element of ``dtype``."""
        return torch.empty((), dtype=self.dtype).element_size()

    def parameter_bytes(self) -> int:
        """``weight_bytes`` if known, else the parameter count of the shape times the element size."""
        if self.weight_bytes is not None:
            return self.weight_bytes
        norm, _, gated, learned_positions = _ARCHITECTURES[self.architecture]
        d, qkv = self.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.d_head
        layered = norm == "layer"  # LayerNorm has a bias; these models also bias o and the MLP
        per_layer = (d * qkv + (qkv if self.qkv_bias else 0) + self.n_heads * self.d_head * d
                     + (3 if gated else 2) * d * self.d_mlp + 2 * d * (2 if layered else 1))
        if layered:
            per_layer += d + self.d_mlp + d
        total = self.n_layers * per_layer + d * (2 if layered else 1)
        total += self.d_vocab * d * (1 if self.tied_embeddings else 2) + self.n_positions * d
        return total * self.element_size


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one attribution batch, in bytes, by part.

    ``total`` is the peak: the sum of the parts, with ``backward_transient`` (the plain
    backward's largest temporaries) and ``receiver_gradients`` (EAP's per-layer
    temporaries) counted as their maximum, since they do not coexist.
    """

    weights: int
    saved_activations: int
    logits: int
    objective: int
    source_buffer: int
    scores: int
    receiver_gradients: int
    backward_transient: int
    clean_logits: int
    batch_size: int
    seq_len: int
    level: str
    method: str
    positions_per_pass: int | None = None
    contraction_dtype: torch.dtype | None = None

    @property
    def total(self) -> int:
        """Estimated peak bytes, weights included."""
        return (self.weights + self.saved_activations + self.logits + self.objective + self.source_buffer
                + self.scores + max(self.receiver_gradients, self.backward_transient) + self.clean_logits)

    @property
    def plain(self) -> int:
        """Estimated peak of a plain forward+backward of the same batch (no hooks, no parameter gradients)."""
        return self.weights + self.saved_activations + self.logits + self.objective + self.backward_transient

    def to_markdown(self) -> str:
        """A two-column table: part, GiB (and share of the peak)."""
        rows = [("weights", self.weights), ("activations saved for backward (plain model)", self.saved_activations),
                ("logits", self.logits), ("objective (float32 log-softmax)", self.objective),
                (f"source buffer delta ({str(self.contraction_dtype or 'float32').removeprefix('torch.')})",
                 self.source_buffer), ("score buffer", self.scores),
                ("receiver gradients (one layer, transient)", self.receiver_gradients),
                ("plain backward transient", self.backward_transient)]
        if self.clean_logits:
            rows.append(("clean logits (EAP-IG)", self.clean_logits))
        total = self.total
        windows = "" if self.positions_per_pass is None else f", {self.positions_per_pass} positions per pass"
        lines = [f"{self.method}, {self.level} level, batch {self.batch_size} x {self.seq_len} tokens{windows}",
                 "", "| part | GiB | share |", "|---|---|---|"]
        lines += [f"| {name} | {value / GIB:.2f} | {value / total:.0%} |" for name, value in rows]
        lines.append(f"| **peak** (transients counted once, the larger) | **{total / GIB:.2f}** | |")
        return "\n".join(lines)

    __str__ = to_markdown


def _shape_of(model_or_spec: Any, dtype: torch.dtype | None) -> ModelShape:
    if isinstance(model_or_spec, ModelShape):
        shape = model_or_spec
    elif hasattr(model_or_spec, "to_dict") and not hasattr(model_or_spec, "parameters"):
        shape = ModelShape.from_config(model_or_spec, dtype)
    elif isinstance(model_or_spec, dict):
        shape = ModelShape.from_config(model_or_spec, dtype)
    else:
        shape = ModelShape.from_model(model_or_spec)
    if dtype is not None and dtype != shape.dtype:
        weights = shape.weight_bytes
        scaled = None if weights is None else weights // shape.element_size * torch.empty((), dtype=dtype).element_size()
        shape = replace(shape, dtype=dtype, weight_bytes=scaled)
    return shape


def _graph_of(shape: ModelShape, graph_or_level: AttributionGraph | str) -> AttributionGraph:
    if isinstance(graph_or_level, AttributionGraph):
        return graph_or_level
    return AttributionGraph(shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.parallel_blocks, graph_or_level)


def estimate_memory(
    model_or_spec: Any,
    graph_or_level: AttributionGraph | str,
    *,
    batch_size: int,
    seq_len: int,
    method: str = "eap",
    dtype: torch.dtype | None = None,
    loss_positions: int | None = None,
    positions_per_pass: int | None = None,
    contraction_dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """Estimated peak memory (bytes) of one ``cd.attribute`` batch.

    Args:
        model_or_spec: a TransformerBridge, a :class:`ModelShape`, or a Hugging Face
            config (object or dict): no weights are needed for the last two.
        graph_or_level: an :class:`AttributionGraph` or ``"head"`` / ``"layer"``.
        batch_size: the batch's first dimension (``[batch_size, seq_len]``).
        seq_len: the batch's padded length (tokens).
        method: one of :data:`METHODS`.
        dtype: the model's dtype if it differs from the spec's (default: the spec's).
        loss_positions: token positions per sample that the objective reads (default
            ``seq_len``, an upper bound; ``answer_nll`` reads the answer span only).
        positions_per_pass: the ``eap`` scorer's position window
            (``cd.scorers.get("eap", positions_per_pass=w)``); default: all positions.
        contraction_dtype: the ``eap`` scorer's ``contraction_dtype`` (e.g.
            ``torch.bfloat16``); default: the accumulation dtype (float32).

    Returns:
        :class:`MemoryEstimate` (``.total`` is the peak, weights included; ``.plain`` the
        plain forward+backward peak). Intervention passes other than the scored one run
        without gradients and stay below the peak.
    """
    if method not in METHODS:
        raise UnknownNameError(f"the memory planner knows methods {METHODS}; got {method!r}.")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive; got {batch_size} and {seq_len}.")
    if positions_per_pass is not None and (method != "eap" or positions_per_pass < 1):
        raise DataError(f"positions_per_pass must be a positive integer and needs method='eap'; "
                        f"got {positions_per_pass!r} with method={method!r}.")
    if contraction_dtype is not None and (method != "eap" or not is_contraction_dtype(contraction_dtype)):
        raise DataError(f"contraction_dtype must be torch.float32, torch.float64 or one of {CONTRACTION_DTYPES} and "
                        f"needs method='eap'; got {contraction_dtype!r} with method={method!r}.")
    s = _shape_of(model_or_spec, dtype)
    graph = _graph_of(s, graph_or_level)
    b, p, d, e = batch_size, seq_len, s.d_model, s.element_size
    acc = max(e, 4)  # hooks.accumulation_dtype: float32, or float64 for float64 models
    c = acc if contraction_dtype is None else contraction_dtype.itemsize  # delta and the contraction's inputs
    tokens = b * p
    norm, mlp_units, _, _ = _ARCHITECTURES[s.architecture]
    qkv_heads = s.n_heads * s.d_head  # k and v are repeated to every query head before the products

    # Saved for backward, per token and layer (bytes).
    norm_input = (4 if norm == "rms" else e) * d + 8  # input (RMSNorm upcasts to float32) + per-token stats
    norms = norm_input * (1 if s.parallel_blocks else 2)
    probs = s.n_heads * p * (4 + (e if e != 4 else 0))  # float32 softmax output and its model-dtype copy
    per_layer = norms + 3 * e * qkv_heads + probs + mlp_units * e * s.d_mlp
    saved = tokens * (s.n_layers * per_layer + norm_input)
    logits = tokens * s.d_vocab * e
    loss_tokens = b * min(loss_positions or p, p)
    objective = loss_tokens * s.d_vocab * 4
    # Plain backward: one layer's attention gradients (probabilities, scores: float32 and model dtype)
    # or the logits' gradient (float32 log-softmax gradient, model-dtype logits gradient).
    attention_grad = b * s.n_heads * p * p * (8 + (e if e != 4 else 0))
    logits_grad = logits + loss_tokens * s.d_vocab * 4
    backward = max(attention_grad, logits_grad)

    window = b * min(positions_per_pass or p, p)  # tokens in one position window
    source_buffer = graph.n_sources * window * d * c
    scores = b * graph.n_sources * graph.n_receivers * acc
    n_q, n_k, n_v = graph.receivers_per_attention
    proj = (s.n_heads + 2 * s.n_kv_heads) * s.d_head  # q, k, v projection outputs per token
    if graph.level == "head":
        u = (n_q + n_k + n_v) * window * d * acc
        qkv = window * proj * e + proj * d * e  # concatenated q/k/v gradients and weights, model dtype
    else:
        u = 2 * 3 * window * d * acc  # three products, then their stack
        qkv = window * proj * e  # the projection gradients over the window
    norm_terms = 4 * window * d * acc  # x, x_hat, weight / s, x_hat * weight / s
    receivers = u + qkv + norm_terms + tokens * proj * e  # + the stashed gradients of every position
    if c != acc:  # the contraction's copy of u
        receivers += (n_q + n_k + n_v if graph.level == "head" else 3) * window * d * c
    clean_logits = logits if method.startswith("eap-ig") else 0
    return MemoryEstimate(
        weights=s.parameter_bytes(), saved_activations=saved, logits=logits, objective=objective,
        source_buffer=source_buffer, scores=scores, receiver_gradients=receivers, backward_transient=backward,
        clean_logits=clean_logits, batch_size=b, seq_len=p, level=graph.level, method=method,
        positions_per_pass=positions_per_pass, contraction_dtype=contraction_dtype,
    )


def _model_bytes_on_cuda(model: Any) -> tuple[int, Any] | None:
    try:
        params = list(model.parameters())
    except AttributeError:
        return None
    if not params or params[0].device.type != "cuda":
        return None
    return sum(q.numel() * q.element_size() for q in params), params[0].device


def plan_batch_size(
    model: Any,
    graph: AttributionGraph | str,
    *,
    seq_len: int,
    max_memory: int | None = None,
    method: str = "eap",
    loss_positions: int | None = None,
    dtype: torch.dtype | None = None,
    positions_per_pass: int | None = None,
    contraction_dtype: torch.dtype | None = None,
) -> int:
    """The largest batch size whose estimated peak fits ``max_memory`` bytes.

    Args:
        model: as for :func:`estimate_memory` (a bridge, a :class:`ModelShape` or a config).
        graph: an :class:`AttributionGraph` or a level.
        seq_len: the padded sequence length of every batch.
        max_memory: bytes available for the whole run, weights included. Default, for
            a model on CUDA: 90% of (free device memory + the model's parameter bytes,
            already resident); required otherwise.
        method: as for :func:`estimate_memory`.
        loss_positions: as for :func:`estimate_memory`.
        dtype: as for :func:`estimate_memory`.
        positions_per_pass: as for :func:`estimate_memory`.
        contraction_dtype: as for :func:`estimate_memory`.

    Raises:
        MemoryPlanError: even batch size 1 does not fit; the message gives the layer-level
            estimate, the longest sequence that fits at batch 1, the largest EAP position
            window that fits, the bfloat16 contraction, and other ways out.
        ValueError: ``max_memory`` is missing for a model that is not on CUDA.
    """
    if max_memory is None:
        resident = _model_bytes_on_cuda(model)
        if resident is None:
            raise ArgumentError("max_memory is required unless the model is on a CUDA device "
                             "(then the default is 90% of the free memory plus the model's weights).")
        free, _ = torch.cuda.mem_get_info(resident[1])
        max_memory = int(0.9 * (free + resident[0]))
    shape = _shape_of(model, dtype)
    graph = _graph_of(shape, graph)

    def peak(batch: int, length: int = seq_len, g: AttributionGraph = graph,
             window: int | None = positions_per_pass, contraction: torch.dtype | None = contraction_dtype) -> int:
        return estimate_memory(shape, g, batch_size=batch, seq_len=length, method=method,
                               loss_positions=loss_positions, positions_per_pass=window,
                               contraction_dtype=contraction).total

    if peak(1) > max_memory:
        raise MemoryPlanError(_does_not_fit(shape, graph, seq_len, max_memory, peak, method, contraction_dtype))
    low, high = 1, 2
    while peak(high) <= max_memory:  # the estimate grows linearly with the batch size
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if peak(mid) <= max_memory else (low, mid)
    return low


def _does_not_fit(shape: ModelShape, graph: AttributionGraph, seq_len: int, max_memory: int, peak: Any,
                  method: str, contraction_dtype: torch.dtype | None) -> str:
    need = peak(1)
    parts = [f"even batch size 1 does not fit: {graph.level}-level attribution of {seq_len} tokens needs about "
             f"{need / GIB:.1f} GiB, but {max_memory / GIB:.1f} GiB are available. What would fit:"]
    if graph.level == "head":
        layer = peak(1, seq_len, graph.layer_level())
        verdict = "fits" if layer <= max_memory else "does not fit either"
        parts.append(f"- the layer-level graph (level='layer'): about {layer / GIB:.1f} GiB at batch 1 ({verdict});")
    low = _largest_fitting(seq_len, lambda length: peak(1, length) <= max_memory)
    if low:
        parts.append(f"- shorter sequences: at most {low} tokens at this level and batch 1 "
                     f"(about {peak(1, low) / GIB:.1f} GiB);")
    else:
        parts.append("- shorter sequences: none fits at this level (the weights alone take "
                     f"{shape.parameter_bytes() / GIB:.1f} GiB);")
    window = _largest_fitting(seq_len, lambda w: peak(1, seq_len, graph, w) <= max_memory) if method == "eap" else 0
    if window:
        passes = -(-seq_len // window)
        parts.append(f"- position chunking: method=cd.scorers.get('eap', positions_per_pass={window}) fits at batch 1 "
                     f"(about {peak(1, seq_len, graph, window) / GIB:.1f} GiB), at the cost of {passes} forward and "
                     "backward passes per batch;")
    else:
        parts.append("- position chunking (EAP only, positions_per_pass): no window fits at this level;")
    if method == "eap" and contraction_dtype is not torch.bfloat16:
        half = peak(1, seq_len, graph, None, torch.bfloat16)
        verdict = "fits" if half <= max_memory else "does not fit either"
        parts.append(f"- a bfloat16 contraction: method=cd.scorers.get('eap', contraction_dtype=torch.bfloat16) "
                     f"halves the source buffer: about {half / GIB:.1f} GiB at batch 1 ({verdict}; it combines "
                     "with positions_per_pass);")
    parts.append("- a device with more memory, or a lower-precision dtype for the weights.")
    return "\n".join(parts)


def _largest_fitting(limit: int, fits: Any) -> int:
    """The largest n in 1..limit with ``fits(n)`` (``fits`` monotonic decreasing), or 0 if none."""
    low, high = 0, limit + 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
