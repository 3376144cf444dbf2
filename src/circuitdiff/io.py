"""The ``.cdiff`` file format: one safetensors file with JSON metadata. Never pickle.

Tensors: ``mean`` [n_sources, n_receivers], ``objective_values`` [n_samples],
``edge_mask`` [n_sources, n_receivers] (bool) and, when kept, ``per_sample``
[n_samples, n_sources, n_receivers]. The safetensors header's metadata holds one key,
``"circuitdiff"``, a JSON object with ``format_version``, the graph description, the
run metadata and a SHA-256 of that description and all tensor bytes, so truncated or edited files are
rejected on load instead of giving wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdiff.errors import FileFormatError
from circuitdiff.graph import AttributionGraph
from circuitdiff.scores import EdgeScores

__all__ = ["FORMAT_VERSION", "save_scores", "load_scores", "write_atomically"]

#: Version of the file layout this library writes; it reads this and older ones.
FORMAT_VERSION = 1
_KEY = "circuitdiff"
_HASH_BLOCK = 1 << 26  # bytes hashed at a time


def _checksum(tensors: dict[str, Tensor], described: dict) -> str:
    """SHA-256 over the JSON description (graph, metadata) and every tensor's bytes.

    Bytes are hashed in blocks, so a memory-mapped tensor is never copied whole.
    """
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.reshape(-1).view(torch.uint8)
        for start in range(0, data.numel(), _HASH_BLOCK):
            digest.update(data[start:start + _HASH_BLOCK].numpy())
    return digest.hexdigest()


def _memory_mapped(path: Path, name: str) -> Tensor:
    """Tensor ``name`` of a safetensors file as a copy-on-write memory map (read on demand)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
    dtype = {"F32": np.float32, "F64": np.float64, "F16": np.float16}[entry["dtype"]]
    begin, _ = entry["data_offsets"]
    array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + begin, shape=tuple(entry["shape"]))
    return torch.from_numpy(array)


def save_scores(scores: EdgeScores, path: str | os.PathLike[str]) -> None:
    """Write ``scores`` to ``path`` atomically (see :func:`write_atomically`)."""
    tensors = {
        "mean": scores.mean.detach().cpu().contiguous(),
        "objective_values": scores.objective_values.detach().cpu().contiguous(),
        "edge_mask": scores.graph.edge_mask,
    }
    if scores.per_sample is not None:
        tensors["per_sample"] = scores.per_sample.detach().cpu().contiguous()
    header = {"format_version": FORMAT_VERSION, "graph": scores.graph.to_dict(), "metadata": scores.metadata}
    header["sha256"] = _checksum(tensors, header)
    write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)}))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, fsync it, rename it over ``path``.

    The temporary file is ``.NAME.tmp-PID``; the file and the directory are fsynced, so a
    crash or power loss leaves either the old file or the complete new one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_scores(path: str | os.PathLike[str], mmap: bool = False) -> EdgeScores:
    """Read a ``.cdiff`` file.

    With ``mmap=True`` the per-sample scores are memory-mapped instead of read: the
    operating system pages them in as they are used (e.g. chunk by chunk by
    :mod:`circuitdiff.metrics`), so files larger than RAM can be analysed. Changing
    the tensor in memory never writes to the file. The checksum is still verified
    (one streaming read of the file).

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a circuitdiff file, corrupt or modified (checksum
            mismatch), or written by a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scores file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_KEY)
            lazy = {"per_sample"} if mmap else set()
            tensors = {name: _memory_mapped(path, name) if name in lazy else f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{str(path)!r} is not a readable safetensors file ({exc}); it may be truncated.") from exc
    if raw is None:
        raise FileFormatError(f"{str(path)!r} is a safetensors file but not one written by circuitdiff.")
    try:
        header = json.loads(raw)
        version = int(header["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FileFormatError(f"{str(path)!r} has an unreadable circuitdiff header ({exc}).") from exc
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{str(path)!r} uses scores format version {version}; this circuitdiff reads up to "
            f"version {FORMAT_VERSION}. Upgrade circuitdiff (pip install -U circuitdiff)."
        )
    described = {k: header.get(k) for k in ("format_version", "graph", "metadata")}
    if _checksum(tensors, described) != header.get("sha256"):
        raise FileFormatError(
            f"{str(path)!r} failed its checksum: the file was modified or corrupted after it was "
            "written. Recompute the scores or restore the original file."
        )
    graph = AttributionGraph.from_dict(header["graph"])
    if not torch.equal(tensors["edge_mask"], graph.edge_mask):
        raise FileFormatError(f"{str(path)!r}: stored edge mask does not match its graph description.")
    return EdgeScores(
        graph=graph,
        mean=tensors["mean"],
        per_sample=tensors.get("per_sample"),
        objective_values=tensors["objective_values"],
        metadata=header["metadata"],
    )
