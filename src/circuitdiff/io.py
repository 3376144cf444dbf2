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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdiff.errors import FileFormatError
from circuitdiff.graph import AttributionGraph
from circuitdiff.scores import EdgeScores

__all__ = ["FORMAT_VERSION", "save_scores", "load_scores"]

#: Version of the file layout this library writes; it reads this and older ones.
FORMAT_VERSION = 1
_KEY = "circuitdiff"


def _checksum(tensors: dict[str, Tensor], described: dict) -> str:
    """SHA-256 over the JSON description (graph, metadata) and every tensor's bytes."""
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_scores(scores: EdgeScores, path: str | os.PathLike[str]) -> None:
    """Write ``scores`` to ``path`` (written to a temporary file, then renamed)."""
    tensors = {
        "mean": scores.mean.detach().cpu().contiguous(),
        "objective_values": scores.objective_values.detach().cpu().contiguous(),
        "edge_mask": scores.graph.edge_mask,
    }
    if scores.per_sample is not None:
        tensors["per_sample"] = scores.per_sample.detach().cpu().contiguous()
    header = {"format_version": FORMAT_VERSION, "graph": scores.graph.to_dict(), "metadata": scores.metadata}
    header["sha256"] = _checksum(tensors, header)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_scores(path: str | os.PathLike[str]) -> EdgeScores:
    """Read a ``.cdiff`` file.

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
            tensors = {name: f.get_tensor(name) for name in f.keys()}
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
