"""Turning a checkpoint, a Hugging Face model or a TransformerBridge into a model circuitdiff can attribute.

circuitdiff works on TransformerLens 4's :class:`transformer_lens.TransformerBridge`
without any of its per-head hook flags (``use_split_qkv_input``, ``use_attn_result``):
per-head inputs and outputs are derived from the projection weights inside the
attribution hooks, so the forward pass keeps the plain model's memory. This module
loads models; what circuitdiff knows about each architecture lives in
:mod:`circuitdiff.engine.architectures` (validated families, shapes) and
:mod:`circuitdiff.engine.bridge` (hook names, weights, norms).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from circuitdiff.engine.architectures import SUPPORTED_ARCHITECTURES, ModelSpec, describe_model, supported_levels
from circuitdiff.engine.bridge import attribution_mode, rotate_in_model_dtype
from circuitdiff.errors import ArgumentError, MissingPathError, UnsupportedModelError
from circuitdiff.hub import resolve_checkpoint

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelSpec",
    "load_model",
    "describe_model",
    "supported_levels",
    "attribution_mode",
]


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
            - a Hugging Face Hub id (``"org/name"`` or ``"org/name@revision"``) of a model
              in the local Hugging Face cache (:func:`circuitdiff.hub.resolve_checkpoint`;
              never downloaded);
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
        path = resolve_checkpoint(source)
        bridge = _boot_from_directory(path, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
        _keep_checkpoint_bos(bridge, _checkpoint_tokenizer(path))
    else:
        raise UnsupportedModelError(
            f"load_model got a {type(source).__name__}; pass a local checkpoint directory, "
            "a Hugging Face PreTrainedModel (with tokenizer=...), or a TransformerBridge."
        )
    describe_model(bridge)
    rotate_in_model_dtype(bridge)
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
            "fetch the checkpoint first (e.g. `hf download NAME`) and pass its Hub id (read from the "
            "Hugging Face cache) or a directory."
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
