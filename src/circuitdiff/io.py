"""The ``.cdiff`` file format: one safetensors file with JSON metadata. Never pickle.

Tensors: ``mean`` [n_sources, n_receivers], ``objective_values`` [n_samples],
``edge_mask`` [n_sources, n_receivers] (bool) and, when kept, ``per_sample``
[n_samples, n_sources, n_receivers]. The safetensors header's metadata holds one key,
``"circuitdiff"``, a JSON object with ``format_version``, the graph description, the
run metadata, the ``sample_ids`` (one string per sample; since version 2) and a SHA-256
of all of these and all tensor bytes, so truncated or edited files are rejected on load
instead of giving wrong numbers. Every header field is checked against the stored
tensors before any tensor is read, so a hostile header cannot make the reader allocate
more than the file's own size.

This module knows the fields of :class:`~circuitdiff.scores.EdgeScores` but not the
class: ``EdgeScores.save`` and ``EdgeScores.load`` call :func:`write_scores_file` and
:func:`read_scores_file`, so imports run one way, from scores to io.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from circuitdiff.data.batches import check_sample_ids
from circuitdiff.errors import DataError, FileFormatError, MissingPathError
from circuitdiff.graph import LEVELS, AttributionGraph
from circuitdiff.typecheck import shape_checked

__all__ = ["FORMAT_VERSION", "write_scores_file", "read_scores_file", "check_metadata", "write_atomically"]

#: Version of the file layout this library writes; it reads this and older ones.
#: 1: no sample ids. 2: ``sample_ids`` in the header.
FORMAT_VERSION = 2
_KEY = "circuitdiff"
_HASH_BLOCK = 1 << 26  # bytes hashed at a time
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself applies
_DTYPES = {"BOOL": np.dtype("?"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_FLOATS = ("F16", "F32", "F64")
#: The tensors a .cdiff file may hold and their allowed dtypes; all but per_sample are required.
_TENSORS = {"mean": _FLOATS, "objective_values": _FLOATS, "edge_mask": ("BOOL",), "per_sample": _FLOATS}
_GRAPH_KEYS = frozenset(AttributionGraph(1, 1).to_dict())
_FIX = "The file was edited or corrupted; recompute the scores or restore the original file."


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


def _read_tensor(path: Path, entry: dict[str, Any], data_start: int, mmap: bool) -> Tensor:
    """One tensor of a checked header: read, or memory-mapped copy-on-write (read on demand)."""
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
    offset = data_start + entry["data_offsets"][0]
    if mmap and math.prod(shape):  # an empty tensor cannot be mapped
        return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape))
    return torch.from_numpy(np.fromfile(path, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape))


def check_metadata(metadata: Any) -> None:
    """Refuse metadata whose keys circuitdiff reads back have the wrong form (DataError naming the key).

    ``sample_ids``: ``"given"`` or ``"position"``; ``dropped``: a list of objects with a
    string ``id`` and ``reason``; ``identity``: an object.
    """
    if not isinstance(metadata, dict):
        raise DataError(f"metadata must be a dict, got {type(metadata).__name__}.")
    if metadata.get("sample_ids", "given") not in ("given", "position"):
        raise DataError(f"metadata['sample_ids'] must be 'given' or 'position'; got {metadata['sample_ids']!r}.")
    dropped = metadata.get("dropped", [])
    if not isinstance(dropped, list) or not all(
            isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("reason"), str) for d in dropped):
        raise DataError("metadata['dropped'] must be a list of {'id': str, 'reason': str, ...} records; got "
                        f"{str(dropped)[:120]}.")
    if not isinstance(metadata.get("identity", {}), dict):
        raise DataError(f"metadata['identity'] must be a dict; got {type(metadata['identity']).__name__}.")


@shape_checked
def write_scores_file(
    path: str | os.PathLike[str],
    *,
    graph: AttributionGraph,
    mean: Float[Tensor, "n_sources n_receivers"],
    per_sample: Float[Tensor, "n_samples n_sources n_receivers"] | None,
    objective_values: Float[Tensor, "n_samples"],
    metadata: dict[str, Any],
    sample_ids: Sequence[str],
) -> None:
    """Write the fields of an :class:`~circuitdiff.scores.EdgeScores` to ``path`` as a ``.cdiff`` file.

    Atomic (see :func:`write_atomically`). :meth:`~circuitdiff.scores.EdgeScores.save` calls this.

    Raises:
        MissingPathError: the folder of ``path`` does not exist.
    """
    if not Path(path).parent.is_dir():
        raise MissingPathError(f"cannot save scores to {str(path)!r}: the folder {str(Path(path).parent)!r} does not "
                               "exist; create it first.")
    tensors = {
        "mean": mean.detach().cpu().contiguous(),
        "objective_values": objective_values.detach().cpu().contiguous(),
        "edge_mask": graph.edge_mask,
    }
    if per_sample is not None:
        tensors["per_sample"] = per_sample.detach().cpu().contiguous()
    header = {"format_version": FORMAT_VERSION, "graph": graph.to_dict(), "metadata": metadata,
              "sample_ids": list(sample_ids)}
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


def _parse_json(text: str) -> Any:
    """Parse JSON; ValueError (a FileFormatError for our own checks) for invalid JSON, a key given twice, or nesting too deep."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            raise FileFormatError(f"a JSON object repeats a key among {_show(keys)}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        raise FileFormatError("JSON nested too deeply") from None


def _show(value: Any) -> str:
    """``repr(value)``, cut to 200 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _int_list(value: Any) -> bool:
    """Whether ``value`` is a list of ints (bools excluded)."""
    return isinstance(value, list) and all(type(v) is int for v in value)


def _safetensors_header(path: Path) -> tuple[str, dict[str, dict[str, Any]], int]:
    """The circuitdiff JSON text, the tensor entries and the byte where tensor data starts.

    Checks the safetensors layout without reading tensor data: an 8-byte little-endian
    header length within the file, a JSON object padded with spaces, only circuitdiff's
    tensors with allowed dtypes, and data offsets that match each tensor's size and tile
    the rest of the file exactly.
    """
    unreadable = f"{str(path)!r} is not a readable safetensors file"
    size = path.stat().st_size
    if size < 8:
        raise FileFormatError(f"{unreadable}: it has {size} bytes, fewer than the 8-byte header length; "
                              "it may be truncated.")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise FileFormatError(f"{unreadable}: its header length says {length} bytes, but {size - 8} follow "
                                  f"(and at most {_MAX_HEADER_BYTES} are allowed); it may be truncated.")
        text = f.read(length)
    try:
        if text[:1] != b"{" or not text.rstrip(b" ").endswith(b"}"):
            raise FileFormatError("the header is not a JSON object padded with spaces")
        entries = _parse_json(text.decode("utf-8"))
    except ValueError as exc:
        raise FileFormatError(f"{unreadable} ({exc}); it may be truncated or corrupted.") from exc
    metadata = entries.pop("__metadata__", None)
    raw = metadata.get(_KEY) if isinstance(metadata, dict) else None
    if not isinstance(raw, str):
        raise FileFormatError(f"{str(path)!r} is a safetensors file but not one written by circuitdiff.")

    bad = f"{str(path)!r} is not a valid circuitdiff file"
    if not set(_TENSORS) - {"per_sample"} <= set(entries) <= set(_TENSORS):
        raise FileFormatError(f"{bad}: it holds the tensors {_show(sorted(entries))}; expected mean, "
                              f"objective_values, edge_mask and optionally per_sample. {_FIX}")
    for name, entry in entries.items():
        well_formed = (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
                       and entry["dtype"] in _TENSORS[name]
                       and _int_list(entry["shape"]) and all(n >= 0 for n in entry["shape"])
                       and _int_list(entry["data_offsets"]) and len(entry["data_offsets"]) == 2)
        if not well_formed:
            raise FileFormatError(f"{bad}: tensor {name!r} is described as {_show(entry)}; expected a dtype in "
                                  f"{_TENSORS[name]}, a shape of sizes >= 0 and data_offsets [begin, end]. {_FIX}")
        begin, end = entry["data_offsets"]
        nbytes = _DTYPES[entry["dtype"]].itemsize * math.prod(entry["shape"])
        if end - begin != nbytes:
            raise FileFormatError(f"{bad}: tensor {name!r} ({entry['dtype']}, shape {_show(entry['shape'])}) needs "
                                  f"{nbytes} bytes, but its data_offsets span {end - begin}. {_FIX}")
    position = 0
    for entry in sorted(entries.values(), key=lambda e: e["data_offsets"]):
        if entry["data_offsets"][0] != position:
            raise FileFormatError(f"{bad}: its tensors' data_offsets overlap or leave gaps. {_FIX}")
        position = entry["data_offsets"][1]
    if position != size - 8 - length:
        raise FileFormatError(f"{unreadable}: its tensors take {position} bytes, but {size - 8 - length} follow "
                              "the header; it may be truncated.")
    return raw, entries, 8 + length


def _circuitdiff_header(path: Path, raw: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The circuitdiff JSON with every field checked, the graph's size against the stored shapes.

    The graph is not built: its size comes from :meth:`AttributionGraph.dimensions`, so a
    header claiming a huge model fails here instead of allocating it.
    """
    bad = f"{str(path)!r} has an invalid circuitdiff header"
    try:
        header = _parse_json(raw)
    except ValueError as exc:
        raise FileFormatError(f"{str(path)!r} has an unreadable circuitdiff header ({exc}). {_FIX}") from exc
    if not isinstance(header, dict):
        raise FileFormatError(f"{bad}: it is {_show(header)}, not a JSON object. {_FIX}")
    version = header.get("format_version")
    if type(version) is not int or version < 1:
        raise FileFormatError(f"{bad}: format_version is {_show(version)}; expected an integer from 1 to "
                              f"{FORMAT_VERSION}. {_FIX}")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{str(path)!r} uses scores format version {version}; this circuitdiff reads up to "
            f"version {FORMAT_VERSION}. Upgrade circuitdiff (pip install -U circuitdiff)."
        )
    fields = {"format_version", "graph", "metadata", "sha256"} | ({"sample_ids"} if version >= 2 else set())
    if set(header) != fields:
        raise FileFormatError(f"{bad}: it has the fields {_show(sorted(header))}; format version {version} has "
                              f"{sorted(fields)}. {_FIX}")

    graph = header["graph"]
    if not isinstance(graph, dict) or set(graph) != _GRAPH_KEYS:
        raise FileFormatError(f"{bad}: graph is {_show(graph)}; expected an object with the keys "
                              f"{sorted(_GRAPH_KEYS)}. {_FIX}")
    sizes = graph["n_layers"], graph["n_heads"], graph["n_kv_heads"]
    if (any(type(n) is not int or n < 1 for n in sizes) or sizes[1] % sizes[2]
            or graph["level"] not in LEVELS or type(graph["parallel_blocks"]) is not bool):
        raise FileFormatError(f"{bad}: graph {_show(graph)} is not a valid graph: n_layers, n_heads and "
                              "n_kv_heads must be integers >= 1, n_heads a multiple of n_kv_heads, level one "
                              f"of {LEVELS} and parallel_blocks true or false. {_FIX}")
    n_sources, n_receivers = AttributionGraph.dimensions(*sizes, graph["level"])
    objective_shape = entries["objective_values"]["shape"]
    if len(objective_shape) != 1:
        raise FileFormatError(f"{bad}: objective_values has shape {_show(objective_shape)}; expected "
                              f"[n_samples]. {_FIX}")
    n_samples = objective_shape[0]
    expected = {"mean": [n_sources, n_receivers], "edge_mask": [n_sources, n_receivers],
                "objective_values": [n_samples], "per_sample": [n_samples, n_sources, n_receivers]}
    for name, entry in entries.items():
        if entry["shape"] != expected[name]:
            raise FileFormatError(f"{bad}: tensor {name!r} has shape {_show(entry['shape'])}; the graph "
                                  f"{_show(graph)} with {n_samples} samples needs {expected[name]}. {_FIX}")

    try:
        check_metadata(header["metadata"])
    except DataError as exc:
        raise FileFormatError(f"{bad}: {exc} {_FIX}") from None
    if not (isinstance(header["sha256"], str) and re.fullmatch("[0-9a-f]{64}", header["sha256"])):
        raise FileFormatError(f"{bad}: sha256 is {_show(header['sha256'])}, not 64 lowercase hex digits. {_FIX}")
    if version >= 2:
        try:
            check_sample_ids(header["sample_ids"], n_samples, "sample_ids")
        except DataError as exc:
            raise FileFormatError(f"{bad}: {exc} {_FIX}") from None
    return header


def read_scores_file(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, Any]:
    """Read a ``.cdiff`` file: the fields of an :class:`~circuitdiff.scores.EdgeScores`, by name.

    Returns ``graph``, ``mean``, ``per_sample`` (None when not stored),
    ``objective_values``, ``metadata`` and ``sample_ids`` (None in version 1 files);
    :meth:`~circuitdiff.scores.EdgeScores.load` builds the scores from them.

    Every header field is checked before any tensor is read; then the checksum is
    verified.

    With ``mmap=True`` the per-sample scores are memory-mapped instead of read: the
    operating system pages them in as they are used (e.g. chunk by chunk by
    :mod:`circuitdiff.metrics`), so files larger than RAM can be analysed. Changing
    the tensor in memory never writes to the file. The checksum is still verified
    (one streaming read of the file).

    Raises:
        MissingPathError: no such file (also a FileNotFoundError).
        FileFormatError: not a circuitdiff file, malformed, corrupt or modified (checksum
            mismatch), or written by a newer format version; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"no scores file at {str(path)!r}.")
    raw, entries, data_start = _safetensors_header(path)
    header = _circuitdiff_header(path, raw, entries)
    tensors = {name: _read_tensor(path, entry, data_start, mmap and name == "per_sample")
               for name, entry in entries.items()}
    if _checksum(tensors, {key: value for key, value in header.items() if key != "sha256"}) != header["sha256"]:
        raise FileFormatError(
            f"{str(path)!r} failed its checksum: the file was modified or corrupted after it was "
            "written. Recompute the scores or restore the original file."
        )
    graph = AttributionGraph.from_dict(header["graph"])
    if not torch.equal(tensors["edge_mask"], graph.edge_mask):
        raise FileFormatError(f"{str(path)!r}: stored edge mask does not match its graph description. {_FIX}")
    return {"graph": graph, "mean": tensors["mean"], "per_sample": tensors.get("per_sample"),
            "objective_values": tensors["objective_values"], "metadata": header["metadata"],
            "sample_ids": header.get("sample_ids")}
