"""Fingerprints: SHA-256 digests of values, tensors, batches, tokenizers and model weights.

The building blocks of run identities (:mod:`circuitdiff.identity`):

- :func:`fingerprint`: SHA-256 of a value as canonical JSON;
- :func:`tensor_digest`: SHA-256 of one small tensor (token ids, labels);
- :func:`batch_fingerprint`: SHA-256 over every field of a batch;
- :func:`tokenizer_fingerprint`: what a tokenizer does (definition, special tokens, chat template);
- :func:`weights_fingerprint`: every parameter and buffer of a model, hashed on its own
  device by an exact integer mix whose result does not depend on the devices.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["fingerprint", "tensor_digest", "batch_fingerprint", "tokenizer_fingerprint", "weights_fingerprint"]

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


_MASK32 = (1 << 32) - 1
_MASK62 = (1 << 62) - 1
# odd multipliers below 2**31, so every product of a 32-bit value with one stays below 2**63 (exact in int64):
# the position term, the two multipliers of the murmur-style finaliser, and the second sum's multiplier
_K_INDEX, _K_MIX1, _K_MIX2, _K_SECOND = 0x5E3779B1, 0x5BD1E995, 0x27D4EB2D, 0x45EBCA77
_CHUNK_CPU, _CHUNK_ACCELERATOR = 1 << 15, 1 << 24  # words mixed at a time (CPU: in cache)


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
