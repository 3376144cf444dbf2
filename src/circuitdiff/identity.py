"""Run identity: fingerprints of everything that determines a result.

Anything circuitdiff stores to reuse later (score shards of a resumable run, cached
generations, saved ``.cdiff`` files) carries an *identity*: a JSON object naming what
produced it, and its SHA-256 *fingerprint*. Loading compares the stored identity with the
current one; a difference is an :class:`~circuitdiff.IdentityMismatchError` that names
what changed, never a silent reuse. ``docs/identity.md`` lists the fields.

The parts:

- :func:`model_identity`: architecture, model type, dtype, the Hugging Face config, the
  tokenizer and the weights (:func:`weights_fingerprint`, every parameter and buffer);
- :func:`tensor_digest`: SHA-256 of one small tensor (token ids, labels);
- :func:`fingerprint`: SHA-256 of a canonical JSON text;
- :func:`differences`: what differs between a stored and a current identity, in words.

The model's id (its path) is recorded in score metadata but is not part of the identity:
a checkpoint moved to another folder is the same model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import fields
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

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

_MASK32 = (1 << 32) - 1
_MASK62 = (1 << 62) - 1
# odd multipliers below 2**31, so every product of a 32-bit value with one stays below 2**63 (exact in int64):
# the position term, the two multipliers of the murmur-style finaliser, and the second sum's multiplier
_K_INDEX, _K_MIX1, _K_MIX2, _K_SECOND = 0x5E3779B1, 0x5BD1E995, 0x27D4EB2D, 0x45EBCA77
_CHUNK_CPU, _CHUNK_ACCELERATOR = 1 << 15, 1 << 24  # words mixed at a time (CPU: in cache)


def fingerprint(value: Any) -> str:
    """SHA-256 hex digest of ``value`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (copied to CPU; for small tensors such as token ids)."""
    t = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_fingerprint(batch: Any) -> str:
    """SHA-256 over every field of a :class:`~circuitdiff.Batch`: token ids, masks, labels and sample ids."""
    digest = hashlib.sha256()
    for f in fields(batch):
        value = getattr(batch, f.name)
        digest.update(f"{f.name}|".encode())
        if isinstance(value, Tensor):
            digest.update(tensor_digest(value).encode())
        elif value is not None:
            digest.update(json.dumps(value).encode())
    return digest.hexdigest()


_PLAIN = (str, int, float, bool, type(None))


def _qualified_name(kind: str, obj: Any, stable: bool) -> str:
    """``module.qualname`` of a function, or of an object's class.

    With ``stable``, a name that cannot be recognised when the run is started again (a
    lambda, a local function, a ``functools.partial``) is an ArgumentError.
    """
    from circuitdiff.errors import ArgumentError

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
        return {"name": obj}
    options: dict[str, Any] = {}
    skipped = set(getattr(obj, "not_in_identity", ()))
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        if key.startswith("_") or key in skipped:
            continue
        options[key] = _option_value(value)
        if options[key] is None and value is not None:
            if stable:
                from circuitdiff.errors import ArgumentError

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
                 reference_batches: Sequence[Any] | None, per_sample: bool, stable: bool = False) -> dict[str, Any]:
    """The identity of an attribution run, all but its data (see :func:`circuitdiff.attribute`).

    ``intervention`` and ``objective`` are what the caller passed (a name or an object);
    ``reference_batches`` the data of a mean intervention. Add ``"data"`` (a fingerprint
    of the batches' fingerprints, :func:`batch_fingerprint`) for the full identity.
    The non-finite policy is not part of it: a shard holds the samples it kept and the
    ones it dropped, and ``attribute`` checks those against the policy.
    """
    from circuitdiff import objectives

    intervention_id = describe_component("intervention", intervention, stable)
    if reference_batches is not None:
        intervention_id["reference_batches"] = fingerprint([batch_fingerprint(b) for b in reference_batches])
    objective_id = describe_component("objective", objective if isinstance(objective, str)
                                      else objectives.resolve(objective), stable)
    return {
        "circuitdiff": library_version(),
        "model": model_identity(model),
        "graph": graph.to_dict(),
        "scorer": describe_component("scorer", scorer, stable),
        "intervention": intervention_id,
        "objective": objective_id,
        "per_sample": per_sample,
    }


class _Stream:
    """Two running 62-bit sums over words on one device: a bijective mix of each word with its position.

    Each word ``w`` at position ``i`` becomes ``h = fmix(w ^ (i * K) mod 2^32)``, where
    ``fmix`` is a murmur-style finaliser (``x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2;
    x ^= x >> 16``, modulo 2^32): a bijection in which every input bit moves about half the
    output bits. The first sum adds ``h``, the second ``(h ^ (h >> 13)) * M3``.

    Words (the raw bits of each tensor added, as 32-, 16- or 8-bit integers) are copied
    into a fixed buffer and mixed a chunk at a time, so many small tensors cost one
    copy each and a large one never needs a temporary of its own size. Positions are
    global across devices and the sums are additive, so the devices' sums add up to the
    sums of one stream: the result does not depend on where the tensors are. The
    arithmetic is exact integer arithmetic (no product or sum overflows int64), so CPU
    and GPU give the same numbers. Changing any one word changes both sums (the mix is a
    bijection for a fixed position); changes of several words cancel in both only by a
    coincidence of about 2^-60 (tested with pairs of sign flips, the edit a weaker mix misses).
    """

    chunk: int
    words: Any  # the buffer of ``chunk`` words, filled up to ``filled``, starting at global ``position``

    def add(self, words: Tensor, position: int) -> None:
        """Mix ``words`` (1-d integers) in at global positions ``position, position + 1, ...``."""
        if self.filled and self.position + self.filled != position:
            self._mix()
        if not self.filled:
            self.position = position
        words = self._prepare(words)
        done = 0
        while done < len(words):
            take = min(self.chunk - self.filled, len(words) - done)
            self.words[self.filled:self.filled + take] = words[done:done + take]
            self.filled, done = self.filled + take, done + take
            if self.filled == self.chunk:
                self._mix()

    def result(self) -> list[int]:
        """The two sums (after mixing what is left)."""
        if self.filled:
            self._mix()
        return [int(v) for v in self.sums]

    def _prepare(self, words: Tensor) -> Any:
        return words

    def _mix(self) -> None:
        raise NotImplementedError


class _WordStream(_Stream):
    """The stream on an accelerator (any torch device): int64 arithmetic with masks."""

    def __init__(self, device: torch.device) -> None:
        self.chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCELERATOR
        self.words = torch.empty(self.chunk, dtype=torch.int64, device=device)
        self.scratch = torch.empty(self.chunk, dtype=torch.int64, device=device)
        self.offsets = _mixed_offsets(self.chunk, device)
        self.sums = torch.zeros(2, dtype=torch.int64, device=device)
        self.filled = self.position = 0

    def _mix(self) -> None:
        n, v, s = self.filled, self.words[:self.filled], self.scratch[:self.filled]
        v.bitwise_and_(_MASK32)  # the word as an unsigned value
        torch.add(self.offsets[:n], (self.position * _K_INDEX) & _MASK32, out=s).bitwise_and_(_MASK32)
        v.bitwise_xor_(s)
        for shift, multiplier in ((16, _K_MIX1), (15, _K_MIX2)):
            v.bitwise_xor_(torch.bitwise_right_shift(v, shift, out=s)).mul_(multiplier).bitwise_and_(_MASK32)
        v.bitwise_xor_(torch.bitwise_right_shift(v, 16, out=s))
        self.sums[0].add_(v.sum()).bitwise_and_(_MASK62)
        torch.bitwise_right_shift(v, 13, out=s).bitwise_xor_(v).mul_(_K_SECOND).bitwise_and_(_MASK32)
        self.sums[1].add_(s.sum()).bitwise_and_(_MASK62)
        self.position, self.filled = self.position + n, 0


class _CpuWordStream(_Stream):
    """The stream for CPU tensors, in numpy's uint32 arithmetic (which wraps modulo 2^32 by definition).

    The same numbers as the int64 path with its masks, in half the memory traffic.
    """

    def __init__(self) -> None:
        self.chunk = _CHUNK_CPU
        self.words = np.empty(self.chunk, dtype=np.uint32)
        self.scratch = np.empty(self.chunk, dtype=np.uint32)
        self.offsets = _mixed_offsets(self.chunk, torch.device("cpu")).numpy().astype(np.uint32)
        self.sums = [0, 0]
        self.filled = self.position = 0

    def _prepare(self, words: Tensor) -> Any:
        values = words.numpy()
        if values.dtype != np.uint8:  # sign-extend 16- and 32-bit words as the int64 path does
            values = values.astype(np.int32, copy=False).view(np.uint32)
        return values

    def _mix(self) -> None:
        n, v, s = self.filled, self.words[:self.filled], self.scratch[:self.filled]
        np.add(self.offsets[:n], np.uint32((self.position * _K_INDEX) & _MASK32), out=s)
        np.bitwise_xor(v, s, out=v)
        for shift, multiplier in ((16, _K_MIX1), (15, _K_MIX2)):
            np.bitwise_xor(v, np.right_shift(v, shift, out=s), out=v)
            np.multiply(v, np.uint32(multiplier), out=v)
        np.bitwise_xor(v, np.right_shift(v, 16, out=s), out=v)
        self.sums[0] = (self.sums[0] + int(v.sum(dtype=np.uint64))) & _MASK62
        np.right_shift(v, 13, out=s)
        np.bitwise_xor(s, v, out=s)
        np.multiply(s, np.uint32(_K_SECOND), out=s)
        self.sums[1] = (self.sums[1] + int(s.sum(dtype=np.uint64))) & _MASK62
        self.position, self.filled = self.position + n, 0


@functools.lru_cache(maxsize=4)
def _mixed_offsets(n: int, device: torch.device) -> Tensor:
    """``(i * K) mod 2^32`` for ``i < n``: the position term of a chunk, computed once per device."""
    return torch.arange(n, dtype=torch.int64, device=device).mul_(_K_INDEX).bitwise_and_(_MASK32)


def _words(t: Tensor) -> Tensor:
    """The raw bits of ``t`` as a 1-d tensor of 32-bit words (16- or 8-bit when its size is not a multiple of 4 bytes)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    n_bytes = flat.numel() * flat.element_size()
    return flat.view(torch.int32 if n_bytes % 4 == 0 else torch.int16 if n_bytes % 2 == 0 else torch.uint8)


def weights_fingerprint(model: Any) -> str:
    """Fingerprint of every parameter and buffer of ``model`` (names, dtypes, shapes and values).

    Any change to any element of any parameter tensor changes it, including edits made
    in place on an in-memory model. Each tensor is hashed on its own device, and the result
    does not depend on the devices (see ``benchmarks/fingerprint_cost.py`` for the cost).
    Tensors on the ``meta`` device (offloaded by accelerate) contribute their name, dtype
    and shape only.
    """
    module = getattr(model, "original_model", model)
    entries: list[list[Any]] = []
    streams: dict[torch.device, _Stream] = {}
    position = 0
    named = [*module.named_parameters(), *module.named_buffers()]  # each tensor once (tied weights under one name)
    for name, tensor in sorted(named, key=lambda item: item[0]):
        entries.append([name, str(tensor.dtype), list(tensor.shape)])
        if tensor.device.type == "meta":
            continue
        words = _words(tensor)
        if tensor.device not in streams:
            streams[tensor.device] = _CpuWordStream() if tensor.device.type == "cpu" else _WordStream(tensor.device)
        streams[tensor.device].add(words, position)
        position += words.numel()
    sums = [sum(column) & _MASK62 for column in zip(*(s.result() for s in streams.values()))]
    return fingerprint({"tensors": entries, "words": [*sums, position]})


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of what a tokenizer does: its definition (or vocabulary), special tokens, BOS/EOS flags, chat template.

    The definition leaves out the padding and truncation state, which every padded call
    changes and which does not change how a text is tokenized.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        definition = tokenizer.get_vocab()
    return fingerprint({
        "class": type(tokenizer).__name__,
        "definition": fingerprint(definition),
        "special_tokens": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def _config_fingerprint(model: Any) -> str:
    """Fingerprint of the Hugging Face config, without its path, version stamp, dtype and private fields."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    if config is None:
        return fingerprint(None)
    values = {k: v for k, v in config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return fingerprint(values)


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model for reuse: architecture, model type, dtype, config, tokenizer, weights.

    ``model`` is a TransformerBridge from :func:`circuitdiff.load_model`.
    """
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
