"""What circuitdiff knows about each model family: the only place shape facts live.

:data:`FAMILIES` describes every validated architecture once (its Hugging Face class,
config ``model_type``, norm kind, MLP shape, position embeddings, biases).
:func:`describe_model` validates a loaded TransformerBridge and returns its
:class:`ModelSpec`; :class:`ModelShape` is the fuller shape the memory planner needs,
built from a loaded model or from a config alone (no weights).

Adding an architecture: one :class:`Family` entry here, then the proof tests on a tiny
random checkpoint (``tests/tiny_models.py``): EAP == central finite differences and
layer == coarsened head (``tests/test_eap_correctness.py``), exact == one-edge ablation
and EAP-IG completeness (``tests/test_scorers.py``), for every intervention; then the
support table in ``docs/support.md`` (``python tests/test_support_table.py`` prints it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from circuitdiff.errors import UnknownNameError, UnsupportedModelError

__all__ = ["Family", "FAMILIES", "SUPPORTED_ARCHITECTURES", "NOT_YET_VALIDATED", "ModelSpec", "ModelShape", "describe_model",
           "check_level", "supported_levels"]


@dataclass(frozen=True)
class Family:
    """One validated architecture family.

    Attributes:
        hf_class: the Hugging Face model class (config.json's ``architectures`` label).
        model_type: the config's ``model_type`` for that class.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm with bias).
        mlp_saved_units: MLP hidden activations autograd saves per token, in units of
            ``d_mlp`` (3 gated, 4 for GPT-2's tanh GELU, 1 for GPT-NeoX).
        gated_mlp: three MLP weight matrices instead of two.
        learned_positions: learned position embeddings (``n_positions`` of them).
        qkv_bias: the q/k/v projections have biases whatever the config says.
        qk_norm: an RMSNorm of q and k after their projections: ``"per-head"`` over each
            head's d_head (Qwen3), ``"across-heads"`` over all heads' outputs together
            (OLMo 2). The receiver gradient is read at the projection output, before that
            norm, so it needs nothing else; its weights count in the planner's parameter bytes.
        pre_norm: attention and MLP read the residual stream through a norm (``ln1``,
            ``ln2``); without, they read it directly (OLMo 2).
        post_norm: the attention and MLP outputs are normalised before the residual
            stream receives them (``ln1_post``, ``ln2_post``: OLMo 2, Gemma 2/3). The
            attention source is then the normalised layer output, which is not a sum
            over heads: such families are attributed at layer level only.
        moe: the MLP is a mixture of experts (a router picks the top-k experts per
            token). The whole block, router inside, is one MLP node: its source is the
            block's output, its receiver the block's input.
    """

    hf_class: str
    model_type: str
    norm: Literal["rms", "layer"]
    mlp_saved_units: int
    gated_mlp: bool
    learned_positions: bool = False
    qkv_bias: bool = False
    qk_norm: Literal["", "per-head", "across-heads"] = ""
    moe: bool = False
    pre_norm: bool = True
    post_norm: bool = False


#: The validated families by Hugging Face class, each proven against finite differences
#: and exact patching in the test suite (``tests/test_eap_correctness.py``).
FAMILIES: dict[str, Family] = {f.hf_class: f for f in (
    Family("GPT2LMHeadModel", "gpt2", "layer", 4, gated_mlp=False, learned_positions=True, qkv_bias=True),
    Family("LlamaForCausalLM", "llama", "rms", 3, gated_mlp=True),
    Family("MistralForCausalLM", "mistral", "rms", 3, gated_mlp=True),
    Family("Qwen2ForCausalLM", "qwen2", "rms", 3, gated_mlp=True, qkv_bias=True),
    Family("GPTNeoXForCausalLM", "gpt_neox", "layer", 1, gated_mlp=False, qkv_bias=True),
    Family("Qwen3ForCausalLM", "qwen3", "rms", 3, gated_mlp=True, qk_norm="per-head"),
    # fused qkv and gate/up projections: the bridge exposes q, k, v and gate, in as views of them
    Family("Phi3ForCausalLM", "phi3", "rms", 3, gated_mlp=True),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "rms", 3, gated_mlp=True, qk_norm="per-head", moe=True),
    Family("MixtralForCausalLM", "mixtral", "rms", 3, gated_mlp=True, moe=True),
    # post-norm only: attention and MLP read the residual stream directly; layer level only
    Family("Olmo2ForCausalLM", "olmo2", "rms", 3, gated_mlp=True, qk_norm="across-heads", pre_norm=False,
           post_norm=True),
    # OLMo 2's blocks with sliding-window attention in some layers
    Family("Olmo3ForCausalLM", "olmo3", "rms", 3, gated_mlp=True, qk_norm="across-heads", pre_norm=False,
           post_norm=True),
    # norms before and after attention and MLP (weights stored as offsets from 1); sliding windows
    Family("Gemma2ForCausalLM", "gemma2", "rms", 3, gated_mlp=True, post_norm=True),
    Family("Gemma3ForCausalLM", "gemma3_text", "rms", 3, gated_mlp=True, qk_norm="per-head", post_norm=True),
)}
#: Families TransformerLens bridges but circuitdiff has not proven yet: why each is
#: refused, and the closest validated family (the support table, docs/support.md).
NOT_YET_VALIDATED: dict[str, str] = {
    "GemmaForCausalLM": "Gemma 1 has no proof test yet (pre-norm only, with Gemma's offset norm weights and "
                        "scaled embeddings); the closest validated family is Gemma2ForCausalLM (layer level).",
    "Qwen2MoeForCausalLM": "Its MoE block adds a gated shared expert, which has no proof test yet; the closest "
                           "validated family is Qwen3MoeForCausalLM.",
    "OlmoeForCausalLM": "OLMoE (pre-norm MoE with QK-norm across heads) has no proof test yet; the closest "
                        "validated family is Qwen3MoeForCausalLM.",
}
#: Hugging Face model classes whose bridges were validated. The check reads the loaded
#: model's class and config ``model_type``, not the ``architectures`` label of
#: config.json, which a checkpoint may get wrong.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts about a model that the graph and the scorers need.

    ``n_kv_heads`` equals ``n_heads`` unless the model uses grouped-query attention.
    ``parallel_blocks`` is True when attention and MLP read the same residual stream
    (GPT-NeoX / Pythia, GPT-J), so attention layer l does not feed MLP l.
    """

    architecture: str
    model_id: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    parallel_blocks: bool
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (used in saved score files)."""
        return asdict(self)



def supported_levels(model: Any) -> tuple[str, ...]:
    """The graph levels ``model`` (a TransformerBridge) can be attributed at, finest first.

    ``("head", "layer")``, or ``("layer",)`` for post-norm families (OLMo 2/3, Gemma 2/3).
    """
    return ("layer",) if FAMILIES[describe_model(model).architecture].post_norm else ("head", "layer")


def check_level(architecture: str, level: str) -> None:
    """Refuse head level for post-norm families (see :attr:`Family.post_norm`)."""
    family = FAMILIES.get(architecture)
    if str(level) == "head" and family is not None and family.post_norm:
        raise UnsupportedModelError(
            f"{architecture} normalises each attention layer's output before adding it to the residual stream "
            "(post-norm), so the stream receives norm(sum of heads), not a sum of per-head outputs: a head's edge "
            "has no output of its own to ablate, and its score would depend on the other heads. Use "
            "level=\"layer\" (AttributionGraph.from_model(model, level=\"layer\"), --level layer); "
            "see docs/support.md.")


def describe_model(model: Any) -> ModelSpec:
    """Validate that ``model`` can be attributed and return its :class:`ModelSpec`.

    Raises:
        UnsupportedModelError: not a TransformerBridge; a ``boot_native`` bridge (no
            per-head projections); an architecture outside ``SUPPORTED_ARCHITECTURES``;
            split-qkv / attn-in mode switched on; folded layer norms; missing submodules.
    """
    from transformer_lens import TransformerBridge
    from transformers.pytorch_utils import Conv1D

    if not isinstance(model, TransformerBridge):
        raise UnsupportedModelError(
            f"expected a transformer_lens.TransformerBridge, got {type(model).__name__}. "
            "HookedTransformer (TransformerLens 3) is not supported; load the checkpoint with "
            "cd.load_model(path) or cd.load_model(hf_model, tokenizer=tok)."
        )
    cfg = model.cfg
    architecture = str(cfg.architecture)
    _check_loaded_architecture(model, architecture)
    if architecture == "TransformerLensNative":
        raise UnsupportedModelError(
            "this bridge was built with TransformerBridge.boot_native(...), which exposes no "
            "per-head q/k/v projections to attribute through. Build a Hugging Face model "
            "instead (e.g. LlamaForCausalLM(LlamaConfig(...)) for a small random model) and "
            "load it with cd.load_model(hf_model, tokenizer=tok)."
        )
    if architecture not in SUPPORTED_ARCHITECTURES:
        closest = NOT_YET_VALIDATED.get(architecture)
        hint = (f" {closest}" if closest else " Architectures with post-norms, embedding scaling or other "
                "residual-stream changes need their own checks.")
        raise UnsupportedModelError(
            f"architecture {architecture!r} has not been validated for edge attribution. "
            f"Validated: {', '.join(SUPPORTED_ARCHITECTURES)}.{hint} See docs/support.md."
        )
    for flag, setter in (("use_split_qkv_input", "set_use_split_qkv_input"),
                         ("use_attn_in", "set_use_attn_in")):
        if getattr(cfg, flag, False):
            raise UnsupportedModelError(
                f"the bridge has {flag}=True. circuitdiff derives per-head inputs itself "
                f"without copying the residual stream; call model.{setter}(False) first."
            )
    if getattr(cfg, "layer_norm_folding", False):
        raise UnsupportedModelError(
            "the bridge has folded layer norms (compatibility mode / processed weights). "
            "Load the checkpoint without enable_compatibility_mode(); scores do not depend on it."
        )
    family = FAMILIES[architecture]
    if family.moe:
        _experts(model.original_model.config.to_dict())  # refuses dense layers between the MoE ones
    norms = ("ln1", "ln2") * family.pre_norm + ("ln1_post", "ln2_post") * family.post_norm
    for layer, block in enumerate(model.blocks):
        for part in (*norms, "attn", "mlp"):
            if not hasattr(block, part):
                raise UnsupportedModelError(
                    f"block {layer} has no '{part}' component, which edge attribution needs."
                )
        for proj in ("q", "k", "v", "o"):
            module = getattr(block.attn, proj, None)
            original = getattr(module, "original_component", None)
            if original is None:
                raise UnsupportedModelError(
                    f"blocks.{layer}.attn has no '{proj}' projection with weights; the "
                    "bridge cannot expose per-head hooks for this model."
                )
            if not isinstance(original, (torch.nn.Linear, Conv1D)):
                raise UnsupportedModelError(
                    f"blocks.{layer}.attn.{proj} wraps a {type(original).__name__}, not a linear layer: the Hugging "
                    "Face model was wrapped by a TransformerBridge twice (load_model on a model an earlier bridge "
                    "already wrapped). Load a fresh copy of the model.")
    n_heads = int(cfg.n_heads)
    n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    return ModelSpec(
        architecture=architecture,
        model_id=str(getattr(cfg, "model_name", "") or ""),
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        d_vocab=int(cfg.d_vocab),
        parallel_blocks=bool(getattr(cfg, "parallel_attn_mlp", False)),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def _check_loaded_architecture(model: Any, label: str) -> None:
    """Refuse a bridge whose loaded Hugging Face model is not the validated class its label names.

    TransformerLens picks its adapter from config.json's ``architectures`` label; a
    checkpoint labelled ``LlamaForCausalLM`` with ``model_type: gemma`` loads Gemma layers
    under the Llama adapter, and its scores are silently wrong.
    """
    hf_model = getattr(model, "original_model", None)
    if hf_model is None or label == "TransformerLensNative":
        return
    loaded = type(hf_model).__name__
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    expected = getattr(FAMILIES.get(label), "model_type", None)
    if expected is not None and (loaded != label or model_type != expected):
        raise UnsupportedModelError(
            f"config.json labels this checkpoint {label!r}, but the loaded model is a {loaded} with model_type "
            f"{model_type!r} (a {label} has model_type {expected!r}). TransformerLens chose its adapter from the "
            "label, so the hooks would not match the layers and the scores would be wrong. Fix the "
            "\"architectures\" entry of config.json to the model's real class; circuitdiff validates "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}.")



@dataclass(frozen=True)
class ModelShape:
    """The shape facts the planner needs; build one from a config, no weights needed.

    ``weight_bytes`` None means: computed from the shape (untied embeddings unless
    ``tied_embeddings``). Mixture-of-experts models have ``n_experts`` experts of
    ``d_mlp`` hidden units each, ``experts_per_token`` of them routed per token (0 and 0
    for dense models). ``attention_softcap`` / ``logit_softcap``: Gemma 2's tanh soft-capping
    of attention scores / final logits.
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
    n_experts: int = 0
    experts_per_token: int = 0
    attention_softcap: bool = False
    logit_softcap: bool = False

    @classmethod
    def from_model(cls, model: Any) -> "ModelShape":
        """The shape of a TransformerBridge, with its exact parameter bytes."""
        spec = describe_model(model)
        params = list(model.parameters())
        d_mlp, n_experts, experts_per_token = int(model.cfg.d_mlp), 0, 0
        config = model.original_model.config.to_dict()
        if FAMILIES[spec.architecture].moe:
            d_mlp, n_experts, experts_per_token = _experts(config)
        return cls(
            architecture=spec.architecture, n_layers=spec.n_layers, n_heads=spec.n_heads,
            n_kv_heads=spec.n_kv_heads, d_model=spec.d_model, d_head=spec.d_head,
            d_mlp=d_mlp, d_vocab=spec.d_vocab, dtype=params[0].dtype,
            parallel_blocks=spec.parallel_blocks,
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            n_experts=n_experts, experts_per_token=experts_per_token,
            attention_softcap=config.get("attn_logit_softcapping") is not None,
            logit_softcap=config.get("final_logit_softcapping") is not None,
        )

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> "ModelShape":
        """The shape of a Hugging Face config (``PretrainedConfig`` or its ``to_dict()``)."""
        c = config if isinstance(config, dict) else config.to_dict()
        by_type = {f.model_type: f.hf_class for f in FAMILIES.values()}
        architecture = (c.get("architectures") or [""])[0] or by_type.get(c.get("model_type", ""), "")
        if architecture not in FAMILIES:
            raise UnknownNameError(f"no memory model for architecture {architecture!r}; "
                                   f"known: {', '.join(FAMILIES)}.")
        if dtype is None:
            name = c.get("torch_dtype") or c.get("dtype") or "float32"
            dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))
        if architecture == "GPT2LMHeadModel":
            d, heads = c["n_embd"], c["n_head"]
            return cls(architecture, c["n_layer"], heads, heads, d, d // heads, c.get("n_inner") or 4 * d,
                       c["vocab_size"], dtype, tied_embeddings=c.get("tie_word_embeddings", True),
                       qkv_bias=True, n_positions=c.get("n_positions", 1024))
        d, heads = c["hidden_size"], c["num_attention_heads"]
        d_mlp, n_experts, experts_per_token = _experts(c) if FAMILIES[architecture].moe else (c["intermediate_size"], 0, 0)
        return cls(
            architecture, c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads, d,
            c.get("head_dim") or d // heads, d_mlp, c["vocab_size"], dtype,
            parallel_blocks=architecture == "GPTNeoXForCausalLM" and c.get("use_parallel_residual", True),
            tied_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=FAMILIES[architecture].qkv_bias or c.get("attention_bias", False),
            n_experts=n_experts, experts_per_token=experts_per_token,
            attention_softcap=c.get("attn_logit_softcapping") is not None,
            logit_softcap=c.get("final_logit_softcapping") is not None,
        )

    @property
    def element_size(self) -> int:
        """Bytes per parameter element of ``dtype``."""
        return torch.empty((), dtype=self.dtype).element_size()

    def parameter_bytes(self) -> int:
        """``weight_bytes`` if known, else the parameter count of the shape times the element size."""
        if self.weight_bytes is not None:
            return self.weight_bytes
        family = FAMILIES[self.architecture]
        gated = family.gated_mlp
        d, qkv = self.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.d_head
        layered = family.norm == "layer"  # LayerNorm has a bias; these models also bias o and the MLP
        mlp = (3 if gated else 2) * d * self.d_mlp
        if family.moe:  # every expert's weights, and the router's [n_experts, d_model]
            mlp = self.n_experts * mlp + self.n_experts * d
        n_norms = 2 * family.pre_norm + 2 * family.post_norm
        per_layer = (d * qkv + (qkv if self.qkv_bias else 0) + self.n_heads * self.d_head * d
                     + mlp + n_norms * d * (2 if layered else 1))
        if layered:
            per_layer += d + self.d_mlp + d
        if family.qk_norm == "per-head":
            per_layer += 2 * self.d_head
        elif family.qk_norm == "across-heads":
            per_layer += (self.n_heads + self.n_kv_heads) * self.d_head
        total = self.n_layers * per_layer + d * (2 if layered else 1)
        total += self.d_vocab * d * (1 if self.tied_embeddings else 2) + self.n_positions * d
        return total * self.element_size


def _experts(config: dict[str, Any]) -> tuple[int, int, int]:
    """``(d_mlp per expert, n_experts, experts_per_token)`` of a mixture-of-experts config.

    Qwen3-MoE names them ``moe_intermediate_size`` and ``num_experts``; Mixtral
    ``intermediate_size`` and ``num_local_experts``. Configs with dense layers between
    the MoE ones (Qwen3-MoE's ``mlp_only_layers``, ``decoder_sparse_step`` > 1, no
    experts) are refused: the proofs cover all-MoE models only.
    """
    n_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1 or n_experts < 1:
        raise UnsupportedModelError(
            "this mixture-of-experts config has dense MLP layers (mlp_only_layers, decoder_sparse_step > 1 or no "
            "experts), which no proof test covers yet; only models whose every layer is an MoE block are "
            "supported. See docs/support.md.")
    d_mlp = config.get("moe_intermediate_size") or config["intermediate_size"]
    return int(d_mlp), int(n_experts), int(config["num_experts_per_tok"])
