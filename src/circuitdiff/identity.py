"""Run identity: fingerprints of everything that determines a result.

Anything circuitdiff stores to reuse later (score shards of a resumable run, cached
generations, saved ``.cdiff`` files) carries an *identity*: a JSON object naming what
produced it, and its SHA-256 *fingerprint*. Loading compares the stored identity with the
current one; a difference is an :class:`~circuitdiff.IdentityMismatchError` that names
what changed, never a silent reuse. ``docs/identity.md`` lists the fields.

The parts:

- :func:`model_identity`: architecture, model type, dtype, the Hugging Face config, the
  tokenizer and the weights (:func:`weights_fingerprint`, every parameter and buffer);
- :func:`describe_component` and :func:`run_settings`: the scorer, intervention,
  objective and settings of an attribution run;
- :func:`differences`: what differs between a stored and a current identity, in words.

The digests themselves (:func:`fingerprint`, :func:`tensor_digest`,
:func:`batch_fingerprint`, :func:`tokenizer_fingerprint`, :func:`weights_fingerprint`)
live in :mod:`circuitdiff.fingerprints` and are importable from here too.

The model's id (its path) is recorded in score metadata but is not part of the identity:
a checkpoint moved to another folder is the same model.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitdiff.errors import ArgumentError, ArgumentTypeError
from circuitdiff.fingerprints import (
    batch_fingerprint,
    fingerprint,
    tensor_digest,
    tokenizer_fingerprint,
    weights_fingerprint,
)

__all__ = [
    "fingerprint",
    "tensor_digest",
    "batch_fingerprint",
    "describe_component",
    "run_settings",
    "weights_fingerprint",
    "tokenizer_fingerprint",
    "model_identity",
    "library_version",
    "differences",
]

_PLAIN = (str, int, float, bool, type(None))


def _qualified_name(kind: str, obj: Any, stable: bool) -> str:
    """``module.qualname`` of a function, or of an object's class.

    With ``stable``, a name that cannot be recognised when the run is started again (a
    lambda, a local function, a ``functools.partial``) is an ArgumentError.
    """
    if isinstance(obj, functools.partial):
        if stable:
            raise ArgumentError(f"checkpoint_dir cannot identify the functools.partial {kind} {obj!r}; define a "
                                "module-level function or class instead, or run without checkpoint_dir.")
        return f"functools.partial({_qualified_name(kind, obj.func, False)})"
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj) else type(obj)
    qualname = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    if stable and ("<lambda>" in qualname or "<locals>" in qualname):
        raise ArgumentError(
            f"checkpoint_dir needs the {kind} to have a stable name, but {qualname!r} is a lambda or a locally "
            f"defined one, which cannot be recognised when the run is started again; define it at module "
            f"level (or register it by name), or run without checkpoint_dir."
        )
    return qualname


def _option_value(value: Any) -> Any:
    """An option as JSON: plain values and lists/dicts of them as they are, dtypes by name, arrays by SHA-256.

    Anything else has no identity here: ``None`` is returned for it.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Tensor):
        return f"sha256:{tensor_digest(value)}"
    if isinstance(value, np.ndarray):
        return f"sha256:{tensor_digest(torch.from_numpy(np.ascontiguousarray(value)))}"
    if isinstance(value, (list, tuple)):
        items = [_option_value(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _option_value(v) for k, v in value.items()}
        return None if any(items[k] is None and v is not None for k, v in value.items()) else items
    return None


def describe_component(kind: str, obj: Any, stable: bool = False) -> dict[str, Any]:
    """Identity of a scorer, intervention or objective: its name, class and public options.

    Options are the public attributes (plain values, lists and dicts of them, dtypes by
    name, tensors and arrays by SHA-256); attributes starting with ``_`` and those named
    in the class's ``not_in_identity`` (options that change memory or speed, not the
    scores) are left out. The code of a callable is not part of it, only its qualified
    name. A name given as a string stands for itself. ``stable``: refuse objects whose
    name or options would not be recognised when the run is started again.
    """
    if isinstance(obj, str):
        return {"name": str(obj)}
    options: dict[str, Any] = {}
    skipped = set(getattr(obj, "not_in_identity", ()))
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        if key.startswith("_") or key in skipped:
            continue
        options[key] = _option_value(value)
        if options[key] is None and value is not None:
            if stable:
                raise ArgumentError(
                    f"checkpoint_dir cannot identify the {kind} option {key}={type(value).__name__}(...): only numbers, "
                    "strings, dtypes, tensors, arrays and lists or dicts of them are recorded. Make it private "
                    f"(_{key}) if it does not change the scores, or run without checkpoint_dir.")
            options[key] = f"<{type(value).__name__}>"
    name = getattr(obj, "name", None)
    if name is None and kind == "objective":
        name = getattr(obj, "__name__", type(obj).__name__)
    return {"name": name, "class": _qualified_name(kind, obj, stable), "options": options}


def run_settings(model: Any, graph: Any, scorer: Any, intervention: Any, objective: Any,
                 reference_batches: Sequence[Any] | None, per_sample: bool, stable: bool = False,
                 spec: Any = None, fused_attention: bool = False) -> dict[str, Any]:
    """The identity of an attribution run, all but its data (see :func:`circuitdiff.attribute`).

    ``intervention`` and ``objective`` are what the caller passed (a name or an object;
    an objective that is neither a name nor a callable is an ArgumentTypeError);
    ``reference_batches`` the data of a mean intervention. Add ``"data"`` (a fingerprint
    of the batches' fingerprints, :func:`batch_fingerprint`) for the full identity.
    The non-finite policy is not part of it: a shard holds the samples it kept and the
    ones it dropped, and ``attribute`` checks those against the policy. ``spec``: the
    model's :class:`~circuitdiff.ModelSpec` when already validated (else it is here).
    ``fused_attention``: the run's attention is torch's fused kernel, recorded as
    ``"attention": "fused"`` (in a bfloat16 model its scores differ from the eager
    attention's by bfloat16 rounding, so shards of the two are not mixed; an eager run adds
    nothing, so its identity is that of runs from before fused attention existed).
    """
    if not isinstance(objective, str) and not callable(objective):
        raise ArgumentTypeError(f"objective must be a name or a callable, got {type(objective).__name__}.")
    intervention_id = describe_component("intervention", intervention, stable)
    if reference_batches is not None:
        intervention_id["reference_batches"] = fingerprint([batch_fingerprint(b) for b in reference_batches])
    objective_id = describe_component("objective", objective, stable)
    settings = {
        "circuitdiff": library_version(),
        "model": model_identity(model, spec),
        "graph": graph.to_dict(),
        "scorer": describe_component("scorer", scorer, stable),
        "intervention": intervention_id,
        "objective": objective_id,
        "per_sample": per_sample,
    }
    return {**settings, "attention": "fused"} if fused_attention else settings


def _config_fingerprint(model: Any) -> str:
    """Fingerprint of the Hugging Face config, without its path, version stamp, dtype and private fields."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    if config is None:
        return fingerprint(None)
    values = {k: v for k, v in config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return fingerprint(values)


def model_identity(model: Any, spec: Any = None) -> dict[str, Any]:
    """What identifies a model for reuse: architecture, model type, dtype, config, tokenizer, weights.

    ``model`` is a TransformerBridge from :func:`circuitdiff.load_model`; ``spec`` its
    :class:`~circuitdiff.ModelSpec` if already validated (else :func:`describe_model` runs here).
    """
    if spec is None:
        from circuitdiff.models import describe_model

        spec = describe_model(model)
    config = getattr(getattr(model, "original_model", None), "config", None)
    tokenizer = getattr(model, "tokenizer", None)
    return {
        "architecture": spec.architecture,
        "model_type": getattr(config, "model_type", None),
        "dtype": spec.dtype,
        "config": _config_fingerprint(model),
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "prepends_bos": bool(getattr(model.cfg, "tokenizer_prepends_bos", False)),
        "weights": weights_fingerprint(model),
    }


@functools.cache
def library_version() -> str:
    """The installed circuitdiff version ("unknown" when running from an uninstalled source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("circuitdiff")
    except PackageNotFoundError:
        return "unknown"


#: Words for the identity fields a mismatch message names.
_LABELS = {
    "circuitdiff": "the circuitdiff version",
    "model.architecture": "the model's architecture",
    "model.model_type": "the model type",
    "model.dtype": "the model dtype",
    "model.config": "the model's config.json",
    "model.tokenizer": "the tokenizer",
    "model.prepends_bos": "whether the tokenizer prepends a BOS token",
    "model.weights": "the model weights",
    "graph": "the graph",
    "scorer": "the scorer or its options",
    "intervention": "the intervention or its reference data",
    "objective": "the objective",
    "data": "the data (token ids, labels or sample ids)",
    "per_sample": "per_sample",
    "attention": "the attention (\"fused\": torch's fused kernel; absent: the bridge's eager attention)",
    "prompt": "the prompt",
    "generation": "the generation settings",
}


def differences(stored: dict[str, Any], current: dict[str, Any], fields: Iterable[str] | None = None) -> list[str]:
    """What differs between two identities, one phrase per field, e.g. ``"the model weights changed"``.

    Nested dicts are compared field by field; ``fields`` limits the top-level keys compared.
    """
    found: list[str] = []

    def shown(v: Any) -> str:
        return str(v)[:12] + "…" if isinstance(v, str) and len(v) == 64 else json.dumps(v, default=str)

    def walk(a: Any, b: Any, path: str) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict) and path not in _LABELS:
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            return
        label = _LABELS.get(path, path)
        if isinstance(a, dict) and isinstance(b, dict):  # a labelled group: name the fields inside it
            keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts = [f"{k}: stored {shown(a.get(k))}, now {shown(b.get(k))}" for k in keys[:3]]
            found.append(f"{label} changed ({'; '.join(parts)})")
        else:
            found.append(f"{label} changed (stored {shown(a)}, now {shown(b)})")

    keys = sorted(set(stored) | set(current)) if fields is None else list(fields)
    for key in keys:
        walk(stored.get(key), current.get(key), key)
    return found
