"""Tiny random Hugging Face models and a slow reference for exact edge patching.

The reference uses TransformerLens's own split-qkv / attn-result / mlp-in flags: every
receiver gets its own copy of the residual stream, so patching one edge is adding a
tensor to one hook. It shares no code with circuitdiff's hook machinery.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 40
ARCHITECTURES = ("gpt2", "llama", "qwen2", "neox", "mistral", "qwen3", "llama3", "phi3", "qwen3_moe", "mixtral", "olmo2",
                 "olmo3", "gemma2", "gemma3")
#: Post-norm families: attributed at layer level only.
LAYER_LEVEL_ONLY = ("olmo2", "olmo3", "gemma2", "gemma3")
#: Sliding-window attention spans of the tiny checkpoints: shorter than the test sequences (6-7 tokens).
SLIDING_WINDOW = 3


def levels(arch: str) -> tuple[str, ...]:
    """The graph levels ``arch`` is attributed at."""
    return ("layer",) if arch in LAYER_LEVEL_ONLY else ("head", "layer")


def finest_level(arch: str) -> str:
    """Head level, or layer level for the post-norm families."""
    return levels(arch)[0]


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"[UNK]": VOCAB - 3, "[PAD]": VOCAB - 2, "[BOS]": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    fast.save_pretrained(directory)


def hf_config(arch: str, n_layers: int = 3, d_model: int = 32, n_heads: int = 4):
    from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              MixtralConfig, Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config, Qwen3Config, Qwen3MoeConfig)

    common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                  pad_token_id=VOCAB - 2)
    if arch == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=64, **common)
    if arch == "neox":
        return GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, max_position_embeddings=64, use_parallel_residual=True,
                             rotary_pct=0.5, **common)
    gated = dict(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                 num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, max_position_embeddings=64, **common)
    if arch == "phi3":  # fused qkv and gate/up projections
        return Phi3Config(**gated)
    if arch == "qwen3":  # per-head RMSNorm of q and k after the projections (QK-norm)
        return Qwen3Config(head_dim=d_model // n_heads, **gated)
    if arch == "qwen3_moe":  # 4 experts, top-2 routing with renormalised weights; QK-norm as Qwen3
        return Qwen3MoeConfig(head_dim=d_model // n_heads, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=d_model, norm_topk_prob=True, **gated)
    if arch == "mixtral":  # 4 experts, top-2 routing
        return MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **gated)
    if arch == "olmo2":  # norms after attention and MLP only; QK-norm across all heads
        return Olmo2Config(**gated)
    if arch == "olmo3":  # OLMo 2's blocks, with sliding-window attention in layers 0 and 2
        layer_types = ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(n_layers)]
        return Olmo3Config(sliding_window=SLIDING_WINDOW, layer_types=layer_types, **gated)
    if arch in ("gemma2", "gemma3"):  # norms before and after attention and MLP; sliding windows in layers 0 and 2
        layer_types = ["sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(n_layers)]
        if arch == "gemma2":  # soft-capped attention scores and final logits, low enough to bend these models' values
            return Gemma2Config(head_dim=d_model // n_heads, sliding_window=SLIDING_WINDOW, layer_types=layer_types,
                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **gated)
        return Gemma3TextConfig(head_dim=d_model // n_heads, sliding_window=SLIDING_WINDOW, layer_types=layer_types,
                                **gated)  # per-head QK-norm; separate rotary bases for local and global layers
    if arch == "llama3":  # Llama 3.x rope scaling: frequencies rescaled beyond the original context
        return LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}, **gated)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**gated)


def write_checkpoint(arch: str, directory: Path, seed: int = 0, **shape) -> Path:
    """Save a tiny random model + tokenizer with save_pretrained; return the directory.

    Norm weights (ones, or zeros where stored as offsets from 1) get noise of scale 0.2, so
    the proofs see a norm whose weights matter. Weights are rounded to
    bfloat16-representable values, so a float32 and a bfloat16 load of the checkpoint hold
    identical weights and differ only in arithmetic.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **shape))
    noise = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".ln" in name):
                p.add_(0.2 * torch.randn(p.shape, generator=noise))
            p.copy_(p.to(torch.bfloat16).float())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def random_ids(batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 3, (batch, pos), generator=g)


# ---------------------------------------------------------------------------- reference
def reference_bridge(directory: Path, dtype=torch.float64):
    """A second bridge on the same checkpoint with TransformerLens's per-receiver flags on."""
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=dtype)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_attn_result(True)
    bridge.set_use_hook_mlp_in(True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


def source_outputs(bridge, graph, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """Every source's output [batch, pos, d_model] from TransformerLens's own hooks."""
    cache: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(x, hook):
            cache[name] = x.detach().clone()
        return hook

    hooks = [("blocks.0.hook_resid_pre", keep("input"))]
    for layer in range(graph.n_layers):
        hooks.append((attention_source_hook(bridge, layer), keep(f"a{layer}")))
        hooks.append((f"blocks.{layer}.hook_mlp_out", keep(f"m{layer}")))
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        bridge(input_ids, attention_mask=attention_mask)
    out = {"input": cache["input"]}
    for layer in range(graph.n_layers):
        heads = cache[f"a{layer}"]  # [batch, pos, n_heads, d_model]; post-norm: [batch, pos, d_model]
        if post_norm(bridge):
            out[f"a{layer}"] = heads
        elif graph.level == "head":
            for h in range(graph.n_heads):
                out[f"a{layer}.h{h}"] = heads[:, :, h]
        else:
            out[f"a{layer}"] = heads.sum(2)
        out[f"m{layer}"] = cache[f"m{layer}"]
    return out


def post_norm(bridge) -> bool:
    """The bridge normalises attention and MLP outputs before the residual stream (OLMo 2)."""
    return hasattr(bridge.blocks[0], "ln1_post")


def attention_source_hook(bridge, layer: int) -> str:
    """Per-head results ``[batch, pos, heads, d_model]``, or a post-norm layer's normalised output."""
    return f"blocks.{layer}.hook_attn_out" if post_norm(bridge) else f"blocks.{layer}.attn.hook_result"


def receiver_site(receiver: str) -> tuple[str, int | str | None]:
    """Where a receiver reads its own copy of the residual stream: (hook name, head).

    head is None for [batch, pos, d] hooks, an index into the head axis of a
    [batch, pos, heads, d] hook, or "all" for a layer-level attention receiver.
    """
    if receiver == "logits":
        return "ln_final.hook_in", None
    if "<" not in receiver:  # m{l}
        return f"blocks.{receiver[1:]}.hook_mlp_in", None
    node, kind = receiver[:-3], receiver[-2]
    layer = node.split(".")[0][1:]
    return f"blocks.{layer}.hook_{kind}_input", "all" if "." not in node else int(node.split(".")[1].lstrip("hkv"))


def shifted(x: torch.Tensor, head, add: torch.Tensor) -> torch.Tensor:
    """``x`` with ``add`` [batch, pos, d] added where ``head`` (from receiver_site) reads."""
    if head is None:
        return x + add
    shift = torch.zeros_like(x)
    if head == "all":
        shift += add[:, :, None, :]
    else:
        shift[:, :, head] = add
    return x + shift


def _losses(bridge, batch, objective, hooks) -> torch.Tensor:
    if getattr(objective, "needs_clean_logits", False):
        raise NotImplementedError("reference objectives with clean logits are not needed here")
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        logits = bridge(batch.input_ids, attention_mask=batch.attention_mask)
    return objective(logits, batch)


def patched_losses(bridge, graph, batch, objective, receiver: str, add: torch.Tensor) -> torch.Tensor:
    """Per-sample objective when only ``receiver``'s input is shifted by ``add`` [batch, pos, d]."""
    hook_name, head = receiver_site(receiver)
    return _losses(bridge, batch, objective, [(hook_name, lambda x, hook: shifted(x, head, add))])


def ablated_losses(bridge, graph, batch, objective, replacement: dict, ablate: torch.Tensor) -> torch.Tensor:
    """Per-sample objective with every edge in ``ablate`` [n_sources, n_receivers] ablated.

    Each source's output in *this* run is recorded as the pass reaches it (it changes
    when upstream edges are ablated); each receiver's own input copy is shifted by
    ``sum over its ablated sources of (replacement - current output)`` at real tokens.
    """
    current: dict[str, torch.Tensor] = {}
    mask = batch.attention_mask.to(torch.float64)[:, :, None]

    def record(name):
        def hook(x, hook):
            current[name] = x
        return hook

    def record_heads(layer):
        def hook(x, hook):  # [batch, pos, heads, d]; post-norm: [batch, pos, d]
            if post_norm(bridge):
                current[f"a{layer}"] = x
            elif graph.level == "head":
                for h in range(graph.n_heads):
                    current[f"a{layer}.h{h}"] = x[:, :, h]
            else:
                current[f"a{layer}"] = x.sum(2)
        return hook

    hooks = [("blocks.0.hook_resid_pre", record("input"))]
    for layer in range(graph.n_layers):
        hooks += [(attention_source_hook(bridge, layer), record_heads(layer)),
                  (f"blocks.{layer}.hook_mlp_out", record(f"m{layer}"))]
    by_site: dict[str, list] = {}
    for column, receiver in enumerate(graph.receivers):
        rows = torch.nonzero(ablate[:, column] & graph.edge_mask[:, column]).flatten().tolist()
        if rows:
            hook_name, head = receiver_site(receiver)
            by_site.setdefault(hook_name, []).append((head, [graph.sources[r] for r in rows]))

    def shift_site(entries):
        def hook(x, hook):
            for head, names in entries:
                x = shifted(x, head, sum((replacement[n] - current[n]) * mask for n in names))
            return x
        return hook

    hooks += [(name, shift_site(entries)) for name, entries in by_site.items()]
    return _losses(bridge, batch, objective, hooks)


def float64_throughout(bridge) -> None:
    """Make a float64 bridge compute its attention softmax, RMS norms and experts in float64.

    The bridge's softmax and Hugging Face's RMSNorm cast to float32 even in float64
    models, which limits finite differences to ~1e-7 relative noise. Tests that need
    float64 throughout apply this to every bridge they compare.
    """
    config = bridge.original_model.config
    if getattr(config, "_experts_implementation", None) is not None:  # MoE: grouped_mm takes no float64
        config._experts_implementation = "eager"
    for router in (m for m in bridge.original_model.modules() if type(m).__name__.endswith("TopKRouter")):
        router.forward = lambda x, r=router: _float64_router(r, x)
    modules = [bridge.ln_final]
    for block in bridge.blocks:
        original = block.attn._masked_softmax
        block.attn._masked_softmax = lambda scores, dtype=None, f=original: f(scores, dtype=None)
        modules += [getattr(block, name) for name in ("ln1", "ln2", "ln1_post", "ln2_post") if hasattr(block, name)]
        modules += [getattr(block.attn, name) for name in ("q_norm", "k_norm") if hasattr(block.attn, name)]  # QK-norm
    for norm in modules:
        hf = norm.original_component
        if type(hf).__name__.startswith("Gemma"):  # eps, and weights stored as offsets from 1
            hf.forward = lambda x, hf=hf: (1.0 + hf.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.eps)
        elif "RMSNorm" in type(hf).__name__:
            eps = hf.variance_epsilon
            hf.forward = lambda x, hf=hf, eps=eps: hf.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@contextlib.contextmanager
def dense_routing(*bridges):
    """Route every token to every expert of the MoE bridges in the block (top-k = all experts), then restore.

    Top-k routing makes the objective jump where a token's experts change; with every
    expert routed, an MoE block is smooth, as integrated gradients' completeness needs.
    """
    routers = [m for b in bridges for m in b.original_model.modules() if type(m).__name__.endswith("TopKRouter")]
    kept = [router.top_k for router in routers]
    try:
        for router in routers:
            router.top_k = router.num_experts
        yield
    finally:
        for router, top_k in zip(routers, kept):
            router.top_k = top_k


def _float64_router(router, x: torch.Tensor):
    """Hugging Face's top-k router (Mixtral, Qwen3-MoE) with its softmax in the input's dtype, not float32."""
    logits = torch.nn.functional.linear(x.reshape(-1, router.hidden_dim), router.weight)
    top, indices = torch.topk(torch.softmax(logits, dim=-1), router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, indices


# ------------------------------------------------------------ shaped random models (the planner's CPU checks)
@dataclass(frozen=True)
class Shape:
    """A Llama or Qwen2 shape for a random-weight model (benchmarks/gpu_7b.py builds its models with these too)."""

    arch: str  # "llama" | "qwen2"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab: int


TINY_SHAPES = {  # also benchmarks/gpu_7b.py --tiny
    "tiny-llama": Shape("llama", 2, 64, 4, 4, 128, 128),
    "tiny-qwen2": Shape("qwen2", 2, 64, 4, 2, 128, 128),
}


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight HF model of ``shape``, created on ``device`` in ``dtype`` (no float32 detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                  num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                  num_key_value_heads=shape.n_kv_heads, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    config, cls = (LlamaConfig(**common), LlamaForCausalLM) if shape.arch == "llama" else \
        (Qwen2Config(**common), Qwen2ForCausalLM)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does; rotary inv_freq stays float32
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"parameters built in {wrong}, not {dtype}")
    return model.eval()


def build_tokenizer(vocab: int, directory: Path):
    """A word-level tokenizer with ``vocab`` entries, saved and reloaded (TransformerLens needs a path)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="[UNK]")),
                                   unk_token="[UNK]")
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
