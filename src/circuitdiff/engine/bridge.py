"""Everything the engine reads from a TransformerBridge: hook names, weights, norms, modes.

TransformerLens 4's bridge names every hook point; the engine never spells a hook
name itself but reads it from the hook point (``HookPoint.name``) through
:class:`Bridge`, so a renamed component fails here, once, with a clear message. The
shape facts of each family live in :mod:`circuitdiff.engine.architectures`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.utils.checkpoint
from jaxtyping import Float
from torch import Tensor

from circuitdiff.engine.architectures import FAMILIES, ModelSpec, describe_model
from circuitdiff.engine.products import accumulation_dtype
from circuitdiff.errors import UnsupportedModelError

__all__ = ["Bridge", "AttentionWeights", "NormParams", "attribution_mode", "linear_weight", "norm_params",
           "spread_over", "rotate_in_model_dtype"]

Projection = Literal["q", "k", "v"]


@dataclass(frozen=True)
class NormParams:
    """What the norm's vector-Jacobian product needs: y = weight * (x - [mean]) / s.

    ``s = sqrt(mean((x - [mean])^2) + eps)``; the mean is subtracted for LayerNorm only.
    """

    rms: bool
    weight: Float[Tensor, "d_model"]
    eps: float


@dataclass(frozen=True)
class AttentionWeights:
    """Views of one layer's weights: q, k, v as ``[heads, d_head, d_model]`` (k, v with the kv heads),
    o as ``[d_model, n_heads * d_head]`` (nn.Linear layout) and its bias (None without one), and the
    attention norm (None where attention reads the residual stream directly)."""

    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    b_o: Tensor | None
    norm: NormParams | None


class Bridge:
    """A validated TransformerBridge: its :class:`ModelSpec`, hook names and per-layer weights.

    Validation (:func:`describe_model`) runs once, here. ``post_norm``: the residual stream
    receives each attention and MLP output through a norm, so the sources are the norms'
    outputs (layer level only; see :class:`~circuitdiff.engine.architectures.Family`).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.spec: ModelSpec = describe_model(model)
        family = FAMILIES[self.spec.architecture]
        self.pre_norm, self.post_norm = family.pre_norm, family.post_norm
        rotate_in_model_dtype(model)
        #: True while a checkpointed block reruns its forward inside the backward pass
        #: (:meth:`checkpointed_blocks`): the engine's hooks then neither record nor watch again.
        self.recomputing = False
        first = next(model.parameters())
        self.device = first.device
        #: float32, or float64 for float64 models: what scores and ``delta`` accumulate in.
        self.dtype = accumulation_dtype(first.dtype)
        #: The model computes in the accumulation dtype (float32, float64), so the layer level may
        #: read the model's own products (each projection's input gradient, the attention output)
        #: instead of forming them again; a bfloat16 model's are rounded, so they are formed exactly.
        self.full_precision = first.dtype == self.dtype
        s = self.spec
        self.layers = [AttentionWeights(
            w_q=linear_weight(block.attn.q).reshape(s.n_heads, s.d_head, s.d_model),
            w_k=linear_weight(block.attn.k).reshape(s.n_kv_heads, s.d_head, s.d_model),
            w_v=linear_weight(block.attn.v).reshape(s.n_kv_heads, s.d_head, s.d_model),
            w_o=linear_weight(block.attn.o),
            b_o=getattr(block.attn.o.original_component, "bias", None),
            norm=norm_params(block.ln1) if self.pre_norm else None,
        ) for block in model.blocks]

    @contextlib.contextmanager
    def checkpointed_blocks(self) -> Iterator[None]:
        """Per-block activation checkpointing while the ``with`` block runs.

        Each transformer block keeps only its inputs for the backward pass and runs its
        forward again there, one block at a time (``torch.utils.checkpoint``, non-reentrant),
        so the activations the backward needs are those of one block plus every block's
        input, not those of every block. The rerun fires the same hooks; :attr:`recomputing`
        tells the engine's hooks to leave ``delta`` and their gradient hooks alone then.
        Costs one more forward pass of the blocks.
        """
        blocks = list(self.model.blocks)
        before = [vars(block).get("forward") for block in blocks]  # another wrapper's, put back after
        for block in blocks:  # an instance attribute (past the bridge's own __setattr__) shadows the method
            object.__setattr__(block, "forward", self._checkpointed(block.forward))
        try:
            yield
        finally:
            for block, forward in zip(blocks, before, strict=True):
                if forward is None:
                    object.__delattr__(block, "forward")
                else:
                    object.__setattr__(block, "forward", forward)

    @contextlib.contextmanager
    def fused_attention(self, fused: bool | None = True) -> Iterator[None]:
        """Attention through torch's ``scaled_dot_product_attention`` while the ``with`` block runs.

        ``fused`` is a scorer's ``fused_attention``: True (the default here) refuses a model
        where :meth:`unfusable_attention` names something the fused path would not run; None
        leaves such a model's attention as it is; False always does.

        TransformerLens's bridge computes attention eagerly so that ``hook_attn_scores`` and
        ``hook_pattern`` fire: it keeps the scores, their masked copy, a float32 softmax and
        the pattern, ``[batch, heads, pos, pos]`` each, for the backward pass. The engine reads
        none of them (its hooks are the projections' inputs and outputs and the attention
        output), so here every layer runs the fused kernel instead, which keeps
        ``O(pos)`` memory on GPUs and CPUs alike. The model computes its masks for it
        (Hugging Face's ``"sdpa"`` implementation: no mask for an unpadded causal batch).
        Layers with separate projections run Hugging Face's own attention ``forward``; the
        fused-qkv families (GPT-2, GPT-NeoX, Phi-3) keep the bridge's projections and
        rotation and replace only its score-softmax-value core. Same outputs up to float32
        rounding (the bridge's softmax is float32 even in float64 models; the fused one is
        not). The hook points between the projections and the attention output
        (``hook_attn_scores``, ``hook_pattern``, the rotary ones) do not fire. Refused where
        :meth:`unfusable_attention` names something it would not run (Gemma 2's soft-capped
        scores, hooks attached at those points).
        """
        unfusable = None if fused is False else self.unfusable_attention()
        if fused is False or (fused is None and unfusable is not None):
            yield
            return
        from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
        from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
            JointQKVPositionEmbeddingsAttentionBridge)

        if unfusable is not None:
            raise UnsupportedModelError(f"fused_attention: {self.spec.architecture}'s attention {unfusable}; use "
                                        "fused_attention=False (or None, which fuses only where nothing is skipped).")
        attentions = [block.attn for block in self.model.blocks]
        hf_model = self.model.original_model
        before = hf_model.config._attn_implementation
        seams = [("_reconstruct_attention", _fused_core(attn, rotary=isinstance(
                      attn, JointQKVPositionEmbeddingsAttentionBridge)))
                 if isinstance(attn, JointQKVAttentionBridge)
                 else ("forward", _fused_forward(attn)) for attn in attentions]
        kept = [vars(attn).get(name) for attn, (name, _) in zip(attentions, seams, strict=True)]  # put back after
        replaced: list[Any] = []
        try:
            hf_model.set_attn_implementation("sdpa")
            if hf_model.config._attn_implementation != "sdpa":  # transformers only warns when it cannot switch
                raise UnsupportedModelError(f"fused_attention: {type(hf_model).__name__} cannot switch to the "
                                            "\"sdpa\" attention implementation; use fused_attention=False.")
            for attn, (name, replacement) in zip(attentions, seams, strict=True):
                object.__setattr__(attn, name, replacement)  # an instance attribute shadows the method
                replaced.append(attn)
            yield
        finally:
            hf_model.set_attn_implementation(before)
            for attn, (name, _), previous in zip(replaced, seams, kept):
                if previous is None:
                    object.__delattr__(attn, name)
                else:
                    object.__setattr__(attn, name, previous)

    def fuses_attention(self, fused: bool | None) -> bool:
        """Whether a scorer's ``fused_attention`` runs the fused kernel (None: wherever nothing would be skipped)."""
        return self.unfusable_attention() is None if fused is None else fused

    def unfusable_attention(self) -> str | None:
        """What in the model's attention the fused path would not run, or None if it runs all of it.

        The kernel computes no soft-capped scores (Gemma 2) and no float32 scores of a
        bfloat16 model (GPT-2's ``reorder_and_upcast_attn``); and the hook points between the
        projections and the attention output (``hook_attn_scores``, ``hook_pattern``, the
        rotary ones...) do not fire, so hooks someone attached there would be skipped.
        circuitdiff's own rotary casts (:func:`rotate_in_model_dtype`) are not counted:
        Hugging Face's attention casts by itself.
        """
        for block in self.model.blocks:
            attn = block.attn
            if getattr(attn.original_component, "attn_logit_softcapping", None) is not None:
                return "soft-caps its scores, which the fused kernel does not compute"
            if getattr(attn, "_reorder_and_upcast_attn", False):
                return "computes its scores in float32 (reorder_and_upcast_attn), which the fused kernel does not"
            own = {attn.hook_rot_q, attn.hook_rot_k} if getattr(self.model, "_circuitdiff_rotary_cast", False) else set()
            for name, point in attn.named_children():
                if name in ("hook_in", "hook_out") or not name.startswith("hook_"):
                    continue
                hooks = len(point._forward_hooks) + len(point._forward_pre_hooks) + len(point._backward_hooks)
                if hooks > (point in own):
                    return f"has hooks on {point.name}, which the fused path skips"
        return None

    def _checkpointed(self, forward: Any) -> Any:
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            # A key/value cache would be written a second time by the rerun: off, as
            # transformers' own gradient checkpointing does.
            kwargs = {k: (False if k == "use_cache" else None) if k in _CACHE_ARGUMENTS else v for k, v in kwargs.items()}
            runs = 0

            def run(*args: Any, **kwargs: Any) -> Any:
                nonlocal runs
                runs += 1
                self.recomputing = runs > 1
                try:
                    return forward(*args, **kwargs)
                finally:
                    self.recomputing = False

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
        return checkpointed

    # Hook names, read from the bridge's own hook points.
    @property
    def input_hook(self) -> str:
        """The residual stream entering block 0 (the embeddings): the input source."""
        return self.model.blocks[0].hook_in.name

    @property
    def logits_input_hook(self) -> str:
        """The final norm's input: the logits receiver."""
        return self.model.ln_final.hook_in.name

    def attention_values_hook(self, layer: int) -> str:
        """The attention values ``z [batch, pos, heads, d_head]`` entering ``W_O``."""
        return self.model.blocks[layer].attn.o.hook_in.name

    def attention_output_hook(self, layer: int) -> str:
        """What the residual stream receives from the attention layer: its output after ``W_O``
        (all heads), or after the post-norm."""
        block = self.model.blocks[layer]
        return (block.ln1_post if self.post_norm else block.attn.o).hook_out.name

    def mlp_output_hook(self, layer: int) -> str:
        """What the residual stream receives from the MLP (its output, or after the post-norm): the MLP source."""
        block = self.model.blocks[layer]
        return (block.ln2_post if self.post_norm else block.mlp).hook_out.name

    def projection_hook(self, layer: int, projection: Projection) -> str:
        """The q, k or v projection's output ``[batch, pos, heads, d_head]``."""
        return getattr(self.model.blocks[layer].attn, projection).hook_out.name

    def projection_input_hook(self, layer: int, projection: Projection) -> str:
        """The q, k or v projection's own input (the attention norm's output, one per projection)."""
        return getattr(self.model.blocks[layer].attn, projection).hook_in.name

    def attention_input_hook(self, layer: int) -> str:
        """The residual stream the attention reads, at its norm's input or the attention's own
        (shared by the q, k, v receivers of ``layer``)."""
        block = self.model.blocks[layer]
        return (block.ln1 if self.pre_norm else block.attn).hook_in.name

    def mlp_input_hook(self, layer: int) -> str:
        """The residual stream the MLP reads (its norm's input, or its own): the MLP receiver."""
        block = self.model.blocks[layer]
        return (block.ln2 if self.pre_norm else block.mlp).hook_in.name



def _fused_forward(attn: Any) -> Any:
    """``attn``'s forward as Hugging Face's own attention module runs it (the model's implementation)."""
    hf_attn = attn.original_component

    def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, *args = args
        # The projections (and QK norms) are the bridge's own components: their hooks fire.
        output, _ = hf_attn.forward(attn.hook_in(hidden), *args, **kwargs)  # accelerate's wrapper, if any
        return attn.hook_out(output), None

    return forward


def _fused_core(attn: Any, rotary: bool) -> Any:
    """A fused-qkv bridge's ``_reconstruct_attention`` (q, k, v already projected) with the fused kernel."""
    def reconstruct(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, None]:
        n_heads = attn.config.n_heads
        n_kv_heads = getattr(attn.config, "n_key_value_heads", None) or n_heads
        q, k, v, batch, pos, d_head = attn._reshape_qkv_to_heads(q, k, v, n_heads, n_kv_heads)
        if rotary:
            position_embeddings = kwargs.get("position_embeddings")
            if isinstance(position_embeddings, tuple):
                q, k = attn._apply_rotary_pos_emb(q, k, *attn._apply_position_embedding_hooks(position_embeddings))
        k, v = attn._update_kv_cache(k, v, **kwargs)
        mask = kwargs.get("attention_mask")  # the model's "sdpa" mask: None for an unpadded causal batch
        if n_kv_heads != n_heads and mask is not None:  # as Hugging Face's sdpa: kernels take GQA without a mask
            k, v = (x.repeat_interleave(n_heads // n_kv_heads, dim=1) for x in (k, v))
        scale = d_head ** -0.5
        if getattr(attn.config, "scale_attn_by_inverse_layer_idx", False) and attn._layer_idx is not None:
            scale /= float(attn._layer_idx + 1)
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                             is_causal=mask is None and pos > 1,
                                                             enable_gqa=k.shape[1] != n_heads)
        return attn._apply_output_projection(z.transpose(1, 2).reshape(batch, pos, n_heads * d_head)), None

    return reconstruct


_CACHE_ARGUMENTS = ("use_cache", "cache", "layer_past", "past_key_values", "past_key_value")


@contextlib.contextmanager
def attribution_mode(model: Any) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; both restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if was_training:  # toggling modes walks every submodule: skip it when possible
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if was_training:
            model.train()


def spread_over(model: Any) -> list[str]:
    """The devices ``model``'s parameters are spread over (a device map), or [] when on one."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return devices if len(devices) > 1 else []


def linear_weight(component: Any) -> Float[Tensor, "d_out d_in"]:
    """The weight of a bridge's linear component as ``[d_out, d_in]`` (nn.Linear layout).

    GPT-2's ``Conv1D`` stores ``[d_in, d_out]`` and is transposed (a view, no copy).
    """
    from transformers.pytorch_utils import Conv1D

    module = component.original_component
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, torch.nn.Linear):
        return module.weight
    raise UnsupportedModelError(
        f"{type(module).__name__} is neither nn.Linear nor Conv1D; cannot read its weight."
    )


def norm_params(norm: Any) -> NormParams:
    """Read a bridge normalization component exactly as the bridge computes it."""
    module = norm.original_component
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = torch.ones(norm.config.d_model)
    if getattr(norm, "uses_weight_offset", False):
        weight = weight + 1.0
    native = getattr(norm, "use_native_layernorm_autograd", False)
    eps = getattr(module, "eps", None) if native else None
    if native and eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm.config, "eps", 1e-5)
    return NormParams(rms=bool(norm.uses_rms_norm), weight=weight, eps=float(eps))


def rotate_in_model_dtype(bridge: Any) -> None:
    """Give OLMo 2/3's rotated q and k the model's dtype, as Hugging Face's OLMo attention does.

    TransformerLens 4.3's attention bridge rotates q and k with float32 cos/sin and keeps
    the float32 result, so a bfloat16 OLMo fails in its attention product ("expected
    scalar type Float but found BFloat16"). Permanent hooks on ``hook_rot_q`` and
    ``hook_rot_k`` cast back (a no-op in float32 and float64 models); added once per
    bridge, by ``cd.load_model`` and by :class:`Bridge` (for bridges built without it).
    """
    olmo = str(bridge.cfg.architecture) in ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
    if not olmo or getattr(bridge, "_circuitdiff_rotary_cast", False):
        return
    for block in bridge.blocks:
        weight = block.attn.q.original_component.weight  # read at each call: the model may change dtype
        for point in (block.attn.hook_rot_q, block.attn.hook_rot_k):
            point.add_hook(lambda x, hook, weight=weight: x.to(weight.dtype), is_permanent=True)
    bridge._circuitdiff_rotary_cast = True
