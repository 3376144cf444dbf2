"""Memory planner: how much memory one attribution batch needs, and the largest batch that fits.

Every number is derived from what the code allocates, per part:

- **weights**: the model's parameter bytes (exact for a loaded model; from the shape
  for a :class:`ModelShape`).
- **saved activations** of the plain forward (what autograd keeps for the backward with
  parameter gradients off, so linear layers keep only their weights). Per layer and
  token, counted with ``torch.autograd.graph.saved_tensors_hooks`` on the bridges of the
  supported architectures: the norm inputs (float32 for RMSNorm, which upcasts; model
  dtype for LayerNorm; one shared input for parallel blocks; pre- and post-norms; the
  QK-norms' q and k); with fused attention (the scorers' default where the model
  allows it) q, k and v (k and v per key/value head), the kernel's output and its float32
  log-sum-exp; with the bridge's eager attention q, k and v after rotary with k/v repeated
  to every query head (3 x heads x d_head) and the attention probabilities (float32
  softmax output plus its copy in the model dtype: heads x pos per token, i.e. pos^2 per
  head; Gemma 2's soft-capping adds the tanh of the scores, and of the logits); and the MLP's hidden
  activations (3 x d_mlp gated, 4 x d_mlp for GPT-2's tanh GELU, 1 x d_mlp for
  GPT-NeoX; mixture-of-experts models: that and the d_model output of each of the
  experts_per_token routed experts, plus the router's float32 logits and softmax). Then the final norm's input and the logits ``[batch, pos, vocab]``.
- **objective**: float32 log-softmax over the loss positions (``loss_positions``,
  default every position: an upper bound).
- **source buffer**: ``delta [batch, n_sources, window, d_model]`` in float32 (float64
  for float64 models) or the EAP scorer's ``contraction_dtype`` (bfloat16: half),
  ``engine.sources.delta_shape``, where the window is every position or
  ``positions_per_pass`` of them (``EAP(positions_per_pass=...)``); plus the
  ``[batch, n_sources, n_receivers]`` score buffer.
- **receiver gradients**: one layer's transients in ``ReceiverGradients.attention_gradients``,
  as :func:`circuitdiff.engine.receivers.transient_bytes` lists them next to that code.
- **backward transients** of the plain model: the attention backward's tensors of one
  layer (eager: the pos^2 gradients of probabilities and scores; fused: float32 q, k, v
  gradients) or the logits' gradient, whichever is larger; EAP's receiver gradients replace them when larger (they do not coincide).

Peak = weights + saved activations + logits + objective + source buffer + scores +
max(plain backward transient, receiver gradients) [+ clean logits for EAP-IG].
Validated against CPU profiler peaks and the H200 measurements of
``benchmarks/results/gpu_7b_h200_2026-11-27.json`` (see ``tests/test_planner.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from circuitdiff.engine.architectures import FAMILIES, ModelShape, check_level
from circuitdiff.engine.products import accumulation_dtype
from circuitdiff.engine.receivers import transient_bytes
from circuitdiff.engine.run import scores_shape
from circuitdiff.engine.sources import delta_shape
from circuitdiff.errors import ArgumentError, DataError, MemoryPlanError, UnknownNameError, UnsupportedModelError
from circuitdiff.graph import AttributionGraph
from circuitdiff.report import markdown_table
from circuitdiff.scorers.base import renamed_method
from circuitdiff.scorers.eap import EAP

__all__ = ["ModelShape", "MemoryEstimate", "MemoryPlanError", "estimate_memory", "plan_batch_size", "plan_scorer",
           "measure_peak", "METHODS"]

#: Methods the planner knows: EAP, and EAP-IG (EAP's peak plus the clean logits kept across steps).
METHODS: tuple[str, ...] = ("eap", "eap-ig-inputs", "eap-ig-activations")

GIB = 2**30


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
    checkpoint_blocks: bool = False
    positions_per_chunk: int | None = None
    fused_attention: bool = False

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
        saved = "every block's input and one block's activations" if self.checkpoint_blocks else "plain model"
        saved += ", fused attention" if self.fused_attention else ", eager attention"
        rows = [("weights", self.weights), (f"activations saved for backward ({saved})", self.saved_activations),
                ("logits", self.logits), ("objective (float32 log-softmax)", self.objective),
                (f"source buffer delta ({str(self.contraction_dtype or 'float32').removeprefix('torch.')})",
                 self.source_buffer), ("score buffer", self.scores),
                ("receiver gradients (one layer" + (f", {self.positions_per_chunk} positions at a time"
                                                    if self.positions_per_chunk else "") + ", transient)",
                 self.receiver_gradients),
                ("plain backward transient", self.backward_transient)]
        if self.clean_logits:
            rows.append(("clean logits (EAP-IG)", self.clean_logits))
        total = self.total
        windows = "" if self.positions_per_pass is None else f", {self.positions_per_pass} positions per pass"
        cells = [[name, f"{value / GIB:.2f}", f"{value / total:.0%}"] for name, value in rows]
        cells.append(["**peak** (transients counted once, the larger)", f"**{total / GIB:.2f}**", ""])
        return (f"{self.method}, {self.level} level, batch {self.batch_size} x {self.seq_len} tokens{windows}\n\n"
                + markdown_table(["part", "GiB", "share"], cells))

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
    graph = graph_or_level if isinstance(graph_or_level, AttributionGraph) else AttributionGraph(
        shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.parallel_blocks, graph_or_level)
    check_level(shape.architecture, graph.level)  # no plan for a run that would be refused
    return graph


def estimate_memory(
    model_or_spec: Any,
    graph_or_level: AttributionGraph | str,
    *,
    batch_size: int,
    seq_len: int,
    scorer: str | Any = "eap",
    dtype: torch.dtype | None = None,
    loss_positions: int | None = None,
    positions_per_pass: int | None = None,
    contraction_dtype: torch.dtype | None = None,
    method: str | None = None,
    checkpoint_blocks: bool = False,
    positions_per_chunk: int | None = None,
    fused_attention: bool | None = None,
) -> MemoryEstimate:
    """Estimated peak memory (bytes) of one ``cd.attribute`` batch.

    Args:
        model_or_spec: a TransformerBridge, a :class:`ModelShape`, or a Hugging Face
            config (object or dict): no weights are needed for the last two.
        graph_or_level: an :class:`AttributionGraph` or ``"head"`` / ``"layer"``.
        batch_size: the batch's first dimension (``[batch_size, seq_len]``).
        seq_len: the batch's padded length (tokens).
        scorer: one of :data:`METHODS`, or a scorer object (e.g.
            ``cd.scorers.EAP(positions_per_pass=256)``, whose options are then used).
        dtype: the model's dtype if it differs from the spec's (default: the spec's).
        loss_positions: token positions per sample that the objective reads (default
            ``seq_len``, an upper bound; ``answer_nll`` reads the answer span only).
        positions_per_pass: the ``eap`` scorer's position window
            (``cd.scorers.get("eap", positions_per_pass=w)``); default: all positions.
        contraction_dtype: the ``eap`` scorer's ``contraction_dtype`` (e.g.
            ``torch.bfloat16``); default: the accumulation dtype (float32).
        method: deprecated alias of ``scorer`` (warns).
        checkpoint_blocks: the scorer's ``checkpoint_blocks``: autograd keeps each block's
            input (``d_model`` per token and layer) and the activations of the one block
            being rerun, instead of every block's.
        positions_per_chunk: the scorer's ``positions_per_chunk``: the receivers' per-layer
            transients cover that many positions instead of the window's.
        fused_attention: the scorer's ``fused_attention`` (default None: fused unless the
            model soft-caps its attention scores, as the scorers decide; at run time they also
            stay eager for GPT-2's ``reorder_and_upcast_attn`` and where hooks sit inside
            attention, which a shape does not show, so the estimate is then low): each layer keeps the
            fused kernel's output and log-sum-exp (``heads x (d_head + 1)`` per token) instead
            of the eager ``heads x pos`` probabilities per token, and its backward no
            ``pos^2`` transient.

    Returns:
        :class:`MemoryEstimate` (``.total`` is the peak, weights included; ``.plain`` the
        plain forward+backward peak). Intervention passes other than the scored one run
        without gradients and stay below the peak.
    """
    method, options = _scorer_options(scorer, method, _Options(positions_per_pass, contraction_dtype, checkpoint_blocks,
                                                               positions_per_chunk, fused_attention))
    positions_per_pass, contraction_dtype = options.positions_per_pass, options.contraction_dtype
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive; got {batch_size} and {seq_len}.")
    s = _shape_of(model_or_spec, dtype)
    graph = _graph_of(s, graph_or_level)
    if options.fused_attention and s.attention_softcap:  # no plan for a run that would be refused
        raise UnsupportedModelError(f"fused_attention=True: {s.architecture} soft-caps its attention scores, which "
                                    "the fused kernel does not compute; use fused_attention=False or None.")
    options = replace(options, fused_attention=not s.attention_softcap if options.fused_attention is None
                      else options.fused_attention)
    b, p, d, e = batch_size, seq_len, s.d_model, s.element_size
    acc = accumulation_dtype(s.dtype).itemsize  # float32, or float64 for float64 models
    c = acc if contraction_dtype is None else contraction_dtype.itemsize  # delta and the contraction's inputs
    tokens = b * p
    family = FAMILIES[s.architecture]
    norm, mlp_units = family.norm, family.mlp_saved_units
    qkv_heads = s.n_heads * s.d_head  # k and v are repeated to every query head before the products

    # Saved for backward, per token and layer (bytes).
    norm_input = (4 if norm == "rms" else e) * d + 8  # input (RMSNorm upcasts to float32) + per-token stats
    # pre-norms (one shared by parallel blocks), post-norms (OLMo 2, Gemma 2/3), QK-norms (float32 inputs)
    norms = norm_input * ((1 if s.parallel_blocks else 2) * family.pre_norm + 2 * family.post_norm)
    if family.qk_norm:
        norms += 4 * (s.n_heads + s.n_kv_heads) * s.d_head
    if options.fused_attention:  # q, k and v (k, v not repeated), the kernel's output and float32 log-sum-exp
        attention = e * s.d_head * (s.n_heads + 2 * s.n_kv_heads) + s.n_heads * (s.d_head * e + 4)
    else:  # q, k and v repeated to every head; the eager float32 softmax output and its model-dtype copy
        attention = 3 * e * qkv_heads + s.n_heads * p * (4 + (e if e != 4 else 0))
    if s.attention_softcap:  # the tanh of the soft-capped scores (eager only: fused attention is refused)
        attention += s.n_heads * p * e
    mlp = mlp_units * e * s.d_mlp
    if family.moe:  # each routed expert's hidden units and output; the router's float32 logits and softmax
        mlp = s.experts_per_token * (mlp + e * d) + 2 * 4 * s.n_experts
    per_layer = norms + attention + mlp
    if options.checkpoint_blocks:  # every block's input (the residual stream), and one block rerun at a time
        saved = tokens * (s.n_layers * d * e + per_layer + norm_input)
    else:
        saved = tokens * (s.n_layers * per_layer + norm_input)
    logits = tokens * s.d_vocab * e * (2 if s.logit_softcap else 1)  # and the tanh of soft-capped logits
    loss_tokens = b * min(loss_positions or p, p)
    objective = loss_tokens * s.d_vocab * 4
    # Plain backward: one layer's attention gradients (eager: probabilities, scores: float32 and model
    # dtype; fused: float32 q, k, v gradients) or the logits' gradient (float32 log-softmax gradient,
    # model-dtype logits gradient).
    if options.fused_attention:
        attention_grad = tokens * 3 * qkv_heads * 4
    else:
        attention_grad = b * s.n_heads * p * p * (8 + (e if e != 4 else 0))
    logits_grad = logits + loss_tokens * s.d_vocab * 4
    backward = max(attention_grad, logits_grad)

    # The engine's own buffers and transients (circuitdiff.engine): one description, here and there.
    width = min(positions_per_pass or p, p)  # positions in one window
    source_buffer = math.prod(delta_shape(graph, b, width, d)) * c
    scores = math.prod(scores_shape(graph, b)) * acc
    chunk = min(options.positions_per_chunk or width, width)  # positions whose receiver gradients are formed at once
    receivers = transient_bytes(graph, s.n_heads, s.n_kv_heads, s.d_head, d, window_tokens=b * chunk, tokens=tokens,
                                model_bytes=e, accumulation_bytes=acc, contraction_bytes=c)
    clean_logits = logits if method.startswith("eap-ig") else 0
    return MemoryEstimate(
        weights=s.parameter_bytes(), saved_activations=saved, logits=logits, objective=objective,
        source_buffer=source_buffer, scores=scores, receiver_gradients=receivers, backward_transient=backward,
        clean_logits=clean_logits, batch_size=b, seq_len=p, level=graph.level, method=method,
        **vars(options),
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
    scorer: str | Any = "eap",
    loss_positions: int | None = None,
    dtype: torch.dtype | None = None,
    positions_per_pass: int | None = None,
    contraction_dtype: torch.dtype | None = None,
    method: str | None = None,
    checkpoint_blocks: bool = False,
    positions_per_chunk: int | None = None,
    fused_attention: bool | None = None,
) -> int:
    """The largest batch size whose estimated peak fits ``max_memory`` bytes.

    Args:
        model: as for :func:`estimate_memory` (a bridge, a :class:`ModelShape` or a config).
        graph: an :class:`AttributionGraph` or a level.
        seq_len: the padded sequence length of every batch.
        max_memory: bytes available for the whole run, weights included. Default, for
            a model on CUDA: 90% of (free device memory + the model's parameter bytes,
            already resident); required otherwise.
        scorer: as for :func:`estimate_memory`.
        loss_positions: as for :func:`estimate_memory`.
        dtype: as for :func:`estimate_memory`.
        positions_per_pass: as for :func:`estimate_memory`.
        contraction_dtype: as for :func:`estimate_memory`.
        method: deprecated alias of ``scorer`` (warns).
        checkpoint_blocks: as for :func:`estimate_memory`.
        positions_per_chunk: as for :func:`estimate_memory`.
        fused_attention: as for :func:`estimate_memory`.

    Raises:
        MemoryPlanError: even batch size 1 does not fit; the message gives the layer-level
            estimate, the longest sequence that fits at batch 1, the largest EAP position
            window that fits, the bfloat16 contraction, and other ways out.
        ValueError: ``max_memory`` is missing for a model that is not on CUDA.
    """
    method, options = _scorer_options(scorer, method, _Options(positions_per_pass, contraction_dtype, checkpoint_blocks,
                                                               positions_per_chunk, fused_attention))
    max_memory = _max_memory(model, max_memory)
    shape = _shape_of(model, dtype)
    graph = _graph_of(shape, graph)

    peak = _peak_of(shape, graph, seq_len, method, loss_positions, options)
    if peak(1) > max_memory:
        raise MemoryPlanError(_does_not_fit(shape, graph, seq_len, max_memory, peak, method, options))
    low, high = 1, 2
    while peak(high) <= max_memory:  # the estimate grows linearly with the batch size
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if peak(mid) <= max_memory else (low, mid)
    return low


def plan_scorer(
    model: Any,
    graph: AttributionGraph | str,
    *,
    seq_len: int,
    batch_size: int = 1,
    max_memory: int | None = None,
    scorer: str = "eap",
    loss_positions: int | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The cheapest settings of ``scorer`` under which one batch of ``batch_size x seq_len`` fits ``max_memory``.

    Options are added in order of cost, each only when what came before does not fit:

    1. none (the default settings, fused attention included where the model allows it);
    2. ``positions_per_chunk``: the largest chunk that fits (no extra pass);
    3. ``checkpoint_blocks=True`` (one more forward pass of the blocks), with the largest
       chunk that then fits, or none;
    4. ``eap`` on a bfloat16 model: ``contraction_dtype=torch.bfloat16`` (the source buffer
       halved; scores summed in float32);
    5. ``eap``: ``positions_per_pass``, the largest window that fits (one pass per window).

    Args:
        model: as for :func:`estimate_memory` (a bridge, a :class:`ModelShape` or a config).
        graph: an :class:`AttributionGraph` or a level.
        seq_len: the padded sequence length of the batch.
        batch_size: samples per batch (1).
        max_memory: bytes available, weights included; default as for :func:`plan_batch_size`
            (90% of free memory plus the weights for a model on CUDA; required otherwise).
        scorer: ``"eap"``, ``"eap-ig-inputs"`` or ``"eap-ig-activations"``.
        loss_positions: as for :func:`estimate_memory`.
        dtype: as for :func:`estimate_memory`.

    Returns:
        A scorer object (``cd.scorers.get(scorer, **options)``), e.g. ``EAP(checkpoint_blocks=True,
        positions_per_chunk=1024)``; its estimate is ``estimate_memory(..., scorer=it)``.

    Raises:
        MemoryPlanError: nothing fits; the message lists what each way out would need.
    """
    from circuitdiff import scorers

    if scorer not in METHODS:
        raise UnknownNameError(f"plan_scorer plans {METHODS}; got {scorer!r}.")
    max_memory = _max_memory(model, max_memory)
    shape = _shape_of(model, dtype)
    graph = _graph_of(shape, graph)

    def fits(**options: Any) -> bool:
        return estimate_memory(shape, graph, batch_size=batch_size, seq_len=seq_len, scorer=scorer,
                               loss_positions=loss_positions, **options).total <= max_memory

    def with_chunks(**options: Any) -> dict[str, Any] | None:
        """``options``, with the largest fitting chunk if a chunk is needed; None if none fits."""
        if fits(**options):
            return options
        width = min(options.get("positions_per_pass") or seq_len, seq_len)
        chunk = _largest_fitting(width, lambda c: fits(**options, positions_per_chunk=c))
        return {**options, "positions_per_chunk": chunk} if chunk else None

    steps: list[dict[str, Any]] = [{}, {"checkpoint_blocks": True}]
    if scorer == "eap" and shape.dtype == torch.bfloat16:
        steps.append({"checkpoint_blocks": True, "contraction_dtype": torch.bfloat16})
    for options in steps:
        found = with_chunks(**options)
        if found is not None:
            return scorers.get(scorer, **found)
    if scorer == "eap":
        last = steps[-1]
        window = _largest_fitting(seq_len, lambda w: fits(**last, positions_per_pass=w, positions_per_chunk=1))
        if window:
            return scorers.get(scorer, **with_chunks(**last, positions_per_pass=window))
    peak = _peak_of(shape, graph, seq_len, scorer, loss_positions, _Options())
    raise MemoryPlanError(_does_not_fit(shape, graph, seq_len, max_memory, peak, scorer, _Options()))


def _peak_of(shape: ModelShape, graph: AttributionGraph, seq_len: int, method: str, loss_positions: int | None,
             options: "_Options") -> Any:
    """``peak(batch, length, graph, **changed options)``: the estimated peak with the caller's settings,
    some changed (what :func:`_does_not_fit` varies one at a time)."""
    def peak(batch: int, length: int = seq_len, g: AttributionGraph = graph, **changes: Any) -> int:
        return estimate_memory(shape, g, batch_size=batch, seq_len=length, scorer=method,
                               loss_positions=loss_positions, **vars(replace(options, **changes))).total
    return peak


def _max_memory(model: Any, max_memory: int | None) -> int:
    """``max_memory``, or for a model on CUDA 90% of (free memory + the model's parameter bytes, already resident)."""
    if max_memory is not None:
        return max_memory
    resident = _model_bytes_on_cuda(model)
    if resident is None:
        raise ArgumentError("max_memory is required unless the model is on a CUDA device "
                            "(then the default is 90% of the free memory plus the model's weights).")
    free, _ = torch.cuda.mem_get_info(resident[1])
    return int(0.9 * (free + resident[0]))


@dataclass(frozen=True)
class _Options:
    """A scorer's memory options, as :class:`~circuitdiff.scorers.eap.EAP` names them."""

    positions_per_pass: int | None = None
    contraction_dtype: torch.dtype | None = None
    checkpoint_blocks: bool = False
    positions_per_chunk: int | None = None
    fused_attention: bool | None = None


def _scorer_options(scorer: Any, method: str | None, options: _Options) -> tuple[str, _Options]:
    """The scorer's name and memory options (a scorer object's own, else ``options``), validated by EAP."""
    scorer = renamed_method(scorer, method, stacklevel=3)
    if not isinstance(scorer, str):
        if options != _Options():
            raise ArgumentError(f"pass {', '.join(f.name for f in fields(_Options))} through the scorer object "
                                f"({scorer!r}), not beside it.")
        name = getattr(scorer, "name", None)
        options = _Options(**{f.name: getattr(scorer, f.name, f.default) for f in fields(_Options)})
    else:
        name = scorer
    if name not in METHODS:
        raise UnknownNameError(f"the memory planner knows scorers {METHODS}; got {name!r}.")
    if (options.positions_per_pass is not None or options.contraction_dtype is not None) and name != "eap":
        raise ArgumentError(f"positions_per_pass and contraction_dtype are options of scorer='eap'; got them with "
                            f"scorer={name!r}.")
    EAP(**vars(options))  # validates them
    return name, options


def _does_not_fit(shape: ModelShape, graph: AttributionGraph, seq_len: int, max_memory: int, peak: Any,
                  method: str, options: _Options) -> str:
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
    window = (_largest_fitting(seq_len, lambda w: peak(1, positions_per_pass=w) <= max_memory)
              if method == "eap" else 0)
    if window:
        passes = -(-seq_len // window)
        parts.append(f"- position chunking: scorer=cd.scorers.EAP(positions_per_pass={window}) fits at batch 1 "
                     f"(about {peak(1, positions_per_pass=window) / GIB:.1f} GiB), at the cost of {passes} forward and "
                     "backward passes per batch;")
    else:
        parts.append("- position chunking (EAP only, positions_per_pass): no window fits at this level;")
    if method == "eap" and options.contraction_dtype is not torch.bfloat16:
        half = peak(1, contraction_dtype=torch.bfloat16)
        verdict = "fits" if half <= max_memory else "does not fit either"
        parts.append(f"- a bfloat16 contraction: scorer=cd.scorers.EAP(contraction_dtype=torch.bfloat16) "
                     f"halves the source buffer: about {half / GIB:.1f} GiB at batch 1 ({verdict}; it combines "
                     "with positions_per_pass);")
    if options.fused_attention is False and not shape.attention_softcap:
        fused = peak(1, fused_attention=None)
        verdict = "fits" if fused <= max_memory else "does not fit either"
        parts.append(f"- fused attention, the default: scorer=cd.scorers.get({method!r}) without fused_attention=False "
                     f"keeps no pos x pos attention pattern: about {fused / GIB:.1f} GiB at batch 1 ({verdict}; no "
                     "extra cost; it combines with the options above);")
    if not options.checkpoint_blocks:
        checkpointed = peak(1, checkpoint_blocks=True)
        verdict = "fits" if checkpointed <= max_memory else "does not fit either"
        parts.append(f"- checkpointed blocks: scorer=cd.scorers.get({method!r}, checkpoint_blocks=True) keeps one "
                     f"block's activations, not every block's: about {checkpointed / GIB:.1f} GiB at batch 1 "
                     f"({verdict}; one more forward pass; it combines with the options above);")
    parts.append("- a device with more memory, or a lower-precision dtype for the weights.")
    return "\n".join(parts)


def _largest_fitting(limit: int, fits: Any) -> int:
    """The largest n in 1..limit with ``fits(n)`` (``fits`` monotonic decreasing), or 0 if none."""
    low, high = 0, limit + 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def measure_peak(run: Any, device: str | torch.device = "cpu", baseline_bytes: int = 0) -> int:
    """Measured peak memory (bytes) of one call of ``run()``, to set against :func:`estimate_memory`.

    CUDA: ``torch.cuda.max_memory_allocated()`` over the call, after
    ``reset_peak_memory_stats()`` (absolute: it includes what was allocated before, such as
    the weights; ``baseline_bytes`` is not added). CPU: ``baseline_bytes`` (pass the
    parameters' bytes) plus the peak of the running sum of the PyTorch profiler's allocation
    and free events, in time order; exact for tensors, blind to the C allocator's caching.
    Run ``run()`` once before to leave one-time allocations (caches, lazy init) out.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return baseline_bytes + peak
