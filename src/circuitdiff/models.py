"""Turning a checkpoint, a Hugging Face model or a TransformerBridge into a model circuitdiff can attribute.

circuitdiff works on TransformerLens 4's :class:`transformer_lens.TransformerBridge`
without any of its per-head hook flags (``use_split_qkv_input``, ``use_attn_result``):
per-head inputs and outputs are derived from the projection weights inside the
attribution hooks, so the forward pass keeps the plain model's memory. This module
owns everything circuitdiff needs to know about the model's structure: which
architectures are validated, where the weights live and how the norms are computed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.errors import ArgumentError, MissingPathError, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelSpec",
    "load_model",
    "describe_model",
    "attribution_mode",
]

# The validated classes and the ``model_type`` of their configs.
_MODEL_TYPES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPTNeoXForCausalLM": "gpt_neox",
}
#: Hugging Face model classes whose bridges were validated against finite differences and
#: exact patching in the test suite (``tests/test_eap_correctness.py``). The check reads
#: the loaded model's class and config ``model_type``, not the ``architectures`` label of
#: config.json, which a checkpoint may get wrong.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODEL_TYPES)


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


def load_model(
    source: Any,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> Any:
    """Return a TransformerBridge ready for attribution, in eval mode.

    Args:
        source: one of
            - a path to a local checkpoint directory written by ``save_pretrained``
              (model + tokenizer); nothing is downloaded;
            - a Hugging Face ``PreTrainedModel`` (then ``tokenizer`` is required);
            - an existing ``TransformerBridge`` (validated and returned as is).
        tokenizer: the tokenizer for an in-memory Hugging Face model.
        dtype: parameter dtype, e.g. ``torch.bfloat16``. Default: float32 for a path,
            unchanged for an in-memory model or bridge.
        device: default ``"cuda"`` if available, else ``"cpu"`` (paths only; an
            in-memory model stays where it is unless ``device`` is given).
        device_map: for a path: spread the layers over devices with accelerate, e.g.
            ``"auto"`` or ``{"model.layers.0": 0, ...}`` (Hugging Face's ``device_map``;
            instead of ``device``). Attribution then keeps its buffers on the first
            device and moves each layer's tensors there (EAP; see the Scaling guide).
        max_memory: with ``device_map``: the most each device may hold, e.g.
            ``{0: "70GiB", 1: "70GiB"}`` (accelerate's format).

    Raises:
        UnsupportedModelError: the model cannot be attributed (see ``describe_model``).
        MissingPathError: ``source`` is a path that does not exist (also a FileNotFoundError).
    """
    from transformer_lens import TransformerBridge
    from transformers import PreTrainedModel

    if device_map is not None and device is not None:
        raise ArgumentError("pass either device or device_map, not both: device_map places every layer itself.")
    if (device_map is not None or max_memory is not None) and not isinstance(source, (str, os.PathLike)):
        raise ArgumentError("device_map and max_memory apply to a checkpoint path; an in-memory model or bridge "
                         "is already placed (load it with from_pretrained(..., device_map=...) and pass it).")
    if max_memory is not None and device_map is None:
        raise ArgumentError("max_memory needs device_map (e.g. device_map='auto').")
    if isinstance(source, TransformerBridge):
        bridge = source
    elif isinstance(source, PreTrainedModel):
        if _is_wrapped(source):
            raise UnsupportedModelError(
                "this Hugging Face model is already wrapped by a TransformerBridge: an earlier load_model (or "
                "TransformerBridge.boot_transformers) call replaced its layers with bridge components in place. "
                "Pass that bridge instead (load_model(bridge)), or load a fresh copy of the model "
                "(from_pretrained) to wrap it again.")
        bridge = _boot_from_hf_model(source, tokenizer, dtype=dtype, device=device)
        _keep_checkpoint_bos(bridge, tokenizer)
    elif isinstance(source, (str, os.PathLike)):
        bridge = _boot_from_directory(Path(source), dtype=dtype, device=device, device_map=device_map,
                                      max_memory=max_memory)
        _keep_checkpoint_bos(bridge, _checkpoint_tokenizer(Path(source)))
    else:
        raise UnsupportedModelError(
            f"load_model got a {type(source).__name__}; pass a local checkpoint directory, "
            "a Hugging Face PreTrainedModel (with tokenizer=...), or a TransformerBridge."
        )
    describe_model(bridge)
    bridge.eval()
    return bridge


def _is_wrapped(hf_model: Any) -> bool:
    """Whether TransformerLens bridge components already sit inside ``hf_model``."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return any(isinstance(module, GeneralizedComponent) for module in hf_model.modules())


def _boot_from_directory(path: Path, *, dtype: torch.dtype | None, device: Any, device_map: Any = None,
                         max_memory: Any = None) -> Any:
    from transformer_lens import TransformerBridge

    if not path.is_dir():
        raise MissingPathError(
            f"{str(path)!r} is not a local directory. circuitdiff never downloads weights: "
            "fetch the checkpoint first (e.g. `huggingface-cli download NAME --local-dir DIR`) "
            "and pass the directory."
        )
    if not (path / "config.json").is_file():
        raise MissingPathError(
            f"{str(path)!r} has no config.json; pass a directory written by save_pretrained."
        )
    # An absolute path: TransformerLens maps some bare names (e.g. "neox") to Hub aliases.
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {
        "device": device or _default_device()}
    return TransformerBridge.boot_transformers(str(path.resolve()), dtype=dtype or torch.float32, **placement)


def _boot_from_hf_model(hf_model: Any, tokenizer: Any, *, dtype: Any, device: Any) -> Any:
    from transformer_lens import TransformerBridge

    if tokenizer is None:
        raise UnsupportedModelError(
            "an in-memory Hugging Face model needs its tokenizer: "
            "load_model(hf_model, tokenizer=tok). Without it TransformerLens would try to "
            "download one by name."
        )
    tokenizer = _tokenizer_with_name(tokenizer)
    name_or_path = str(getattr(hf_model.config, "name_or_path", "") or "")
    # A bare name could be resolved against the Hub; only a local directory is safe.
    name = str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else "in-memory-model"
    kwargs: dict[str, Any] = {
        "hf_model": hf_model,
        "tokenizer": tokenizer,
        "dtype": dtype or next(hf_model.parameters()).dtype,
    }
    if device is not None:
        kwargs["device"] = device
    return TransformerBridge.boot_transformers(name, **kwargs)


def _checkpoint_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _keep_checkpoint_bos(bridge: Any, tokenizer: Any) -> None:
    """Tokenize as the checkpoint's own ``tokenizer`` does with respect to the BOS token.

    TransformerLens reloads every tokenizer that defines a BOS token with
    ``add_bos_token=True``, so a model trained without one (GPT-2, the bundled demo
    models) would be fed a first token it never saw in training or generation. Where the
    checkpoint's tokenizer adds none, the bridge's stops adding it too.
    """
    ids = list(tokenizer("1 a")["input_ids"])
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    if adds_bos or not bridge.cfg.tokenizer_prepends_bos:
        return
    bridge.tokenizer.add_bos_token = False
    if list(bridge.tokenizer("1 a")["input_ids"]) != ids:
        raise UnsupportedModelError(
            f"cannot stop TransformerLens's {type(bridge.tokenizer).__name__} from adding a BOS token that the "
            "checkpoint's tokenizer does not add; load the model yourself and pass a bridge whose tokenizer "
            "encodes like the checkpoint's.")
    bridge.cfg.tokenizer_prepends_bos = False
    bridge.cfg.default_prepend_bos = False


def _tokenizer_with_name(tokenizer: Any) -> Any:
    """TransformerLens needs ``name_or_path``; a tokenizer built in memory has none.

    Such a tokenizer is saved to a temporary directory and reloaded from there.
    """
    if getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="circuitdiff-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
        raise UnsupportedModelError(
            f"architecture {architecture!r} has not been validated for edge attribution. "
            f"Validated: {', '.join(SUPPORTED_ARCHITECTURES)}. Architectures with post-norms, "
            "embedding scaling or other residual-stream changes need their own checks."
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
    for layer, block in enumerate(model.blocks):
        for part in ("ln1", "ln2", "attn", "mlp"):
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
    expected = _MODEL_TYPES.get(label)
    if expected is not None and (loaded != label or model_type != expected):
        raise UnsupportedModelError(
            f"config.json labels this checkpoint {label!r}, but the loaded model is a {loaded} with model_type "
            f"{model_type!r} (a {label} has model_type {expected!r}). TransformerLens chose its adapter from the "
            "label, so the hooks would not match the layers and the scores would be wrong. Fix the "
            "\"architectures\" entry of config.json to the model's real class; circuitdiff validates "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}.")


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


@dataclass(frozen=True)
class NormParams:
    """What the norm's vector-Jacobian product needs: y = weight * (x - [mean]) / s.

    ``s = sqrt(mean((x - [mean])^2) + eps)``; the mean is subtracted for LayerNorm only.
    """

    rms: bool
    weight: Float[Tensor, "d_model"]
    eps: float


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
