"""Checkpoint directories for resumable runs: ``attribute(..., checkpoint_dir=DIR)``.

``DIR/manifest.json`` names the run (model, graph, scorer, intervention and reference
data, objective, one fingerprint per batch); ``DIR/shard-NNNNN.safetensors`` holds one
finished batch. Both are written atomically, so a run killed at any moment resumes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdiff import objectives as objectives_module
from circuitdiff.data import Batch
from circuitdiff.errors import DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.io import _checksum, write_atomically
from circuitdiff.models import describe_model

__all__ = ["CHECKPOINT_VERSION", "Checkpoints", "run_manifest"]

#: Version of the checkpoint directory layout (manifest.json + shard-NNNNN.safetensors).
CHECKPOINT_VERSION = 1
_SHARD_KEY = "circuitdiff-checkpoint"
_SIMPLE = (str, int, float, bool, type(None))


def _fingerprint_batch(batch: Batch) -> str:
    """SHA-256 over every tensor field of ``batch`` (name, dtype, shape, bytes), on CPU."""
    digest = hashlib.sha256()
    for f in fields(Batch):
        value = getattr(batch, f.name)
        digest.update(f"{f.name}|".encode())
        if value is not None:
            digest.update(_tensor_digest(value).encode())
    return digest.hexdigest()


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _qualified(kind: str, obj: Any) -> str:
    """``module.qualname`` of a function, or of an object's class; refuses local ones."""
    if isinstance(obj, functools.partial):
        raise DataError(f"checkpoint_dir cannot identify the functools.partial {kind} {obj!r}; define a "
                        "module-level function or class instead, or run without checkpoint_dir.")
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj) else type(obj)
    qualname = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise DataError(
            f"checkpoint_dir needs the {kind} to have a stable name, but {qualname!r} is a lambda or a locally "
            f"defined one, which cannot be recognised when the run is started again; define it at module "
            f"level (or register it by name), or run without checkpoint_dir."
        )
    return qualname


def _describe(kind: str, obj: Any) -> dict[str, Any]:
    """Identity of a scorer, intervention or objective: name, class, public options.

    Options are the public attributes holding plain values (dtypes by name, tensors by SHA-256);
    attributes starting with ``_`` are ignored.
    """
    options: dict[str, Any] = {}
    for key, value in sorted(getattr(obj, "__dict__", {}).items()):
        if key.startswith("_"):
            continue
        if isinstance(value, _SIMPLE):
            options[key] = value
        elif isinstance(value, torch.dtype):
            options[key] = str(value)
        elif isinstance(value, Tensor):
            options[key] = f"sha256:{_tensor_digest(value)}"
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _SIMPLE) for v in value):
            options[key] = list(value)
    return {"name": getattr(obj, "name", None), "class": _qualified(kind, obj), "options": options}


def run_manifest(model: Any, graph: AttributionGraph, batches: list[Batch], objective: Any, scorer: Any,
              intervention: Any, reference_batches: list[Batch] | None, per_sample: bool) -> dict[str, Any]:
    """What identifies a run whose shards may be reused (JSON-ready)."""
    spec = describe_model(model)
    described_graph = json.dumps(graph.to_dict(), sort_keys=True, default=str).encode()
    if isinstance(intervention, str):
        intervention_id: dict[str, Any] = {"name": intervention}
    else:
        intervention_id = _describe("intervention", intervention)
    if reference_batches is not None:
        intervention_id["reference_batches"] = hashlib.sha256(
            "".join(_fingerprint_batch(b) for b in reference_batches).encode()).hexdigest()
    if isinstance(objective, str):
        objective_id: dict[str, Any] = {"name": objective}
    else:
        objective_id = _describe("objective", objectives_module.resolve(objective))
        objective_id["name"] = objectives_module.name_of(objective)
    return {
        "format": _SHARD_KEY,
        "version": CHECKPOINT_VERSION,
        "model": {"model_id": spec.model_id, "architecture": spec.architecture, "dtype": spec.dtype},
        "graph": {"level": graph.level, "n_sources": graph.n_sources, "n_receivers": graph.n_receivers,
                  "sha256": hashlib.sha256(described_graph).hexdigest()},
        "method": _describe("scorer", scorer),
        "intervention": intervention_id,
        "objective": objective_id,
        "per_sample": per_sample,
        "n_batches": len(batches),
        "batches": [_fingerprint_batch(b) for b in batches],
    }


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two manifests."""
    if stored.get("format") != _SHARD_KEY:
        return ["manifest.json is not a circuitdiff attribute() checkpoint manifest (written by an older "
                "version or another tool)"]
    found = []
    for key in ("version", "model", "graph", "method", "intervention", "objective", "per_sample", "n_batches"):
        if stored.get(key) != current.get(key):
            found.append(f"{key}: stored {json.dumps(stored.get(key))}, now {json.dumps(current.get(key))}")
    if stored.get("n_batches") == current.get("n_batches"):
        changed = [i for i, (a, b) in enumerate(zip(stored.get("batches", []), current["batches"])) if a != b]
        if changed:
            listed = ", ".join(map(str, changed[:5])) + (" ..." if len(changed) > 5 else "")
            found.append(f"the token ids or labels of batch(es) {listed} differ")
    return found


class Checkpoints:
    """A checkpoint directory: ``manifest.json`` and one ``shard-NNNNN.safetensors`` per batch.

    A directory with a manifest but no shard yet (a run that failed before finishing its
    first batch) is taken over by the new run.

    A shard holds ``sum`` [n_sources, n_receivers] float64 (the batch's scores summed
    over samples, exactly as ``attribute`` accumulates them), ``losses`` [batch] float32
    and, when the run keeps them, ``per_sample`` [batch, n_sources, n_receivers] float32;
    its safetensors metadata (key ``"circuitdiff-checkpoint"``) is a JSON object with the
    checkpoint version, batch index, batch fingerprint and a SHA-256 of all of it.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory, self.manifest = directory, manifest
        if directory.exists() and not directory.is_dir():
            raise DataError(f"checkpoint_dir {str(directory)!r} is a file; pass a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "manifest.json"
        if path.exists() and any(directory.glob("shard-*.safetensors")):  # no shards yet: nothing to protect
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{str(path)!r} is unreadable ({exc}); delete the directory {str(directory)!r} "
                                "or choose another checkpoint_dir.") from exc
            differences = _differences(stored if isinstance(stored, dict) else {}, manifest)
            if differences:
                raise DataError(
                    f"checkpoint_dir {str(directory)!r} holds shards of a different run ("
                    + "; ".join(differences)
                    + "). Delete that directory to start over, or choose another checkpoint_dir."
                )
        else:
            write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))

    def path(self, index: int) -> Path:
        """Path of batch ``index``'s shard: ``directory/shard-NNNNN.safetensors`` (five digits, zero-padded)."""
        return self.directory / f"shard-{index:05d}.safetensors"

    def save(self, index: int, batch_sum: Tensor, per_sample: Tensor | None, losses: Tensor) -> None:
        """Write batch ``index``'s result (atomic)."""
        tensors = {"sum": batch_sum.contiguous(), "losses": losses.contiguous()}
        if per_sample is not None:
            tensors["per_sample"] = per_sample.contiguous()
        header: dict[str, Any] = {"version": CHECKPOINT_VERSION, "batch": index,
                                  "fingerprint": self.manifest["batches"][index]}
        header["sha256"] = _checksum(tensors, header)
        write_atomically(self.path(index),
                          lambda tmp: save_file(tensors, str(tmp), metadata={_SHARD_KEY: json.dumps(header)}))

    def load(self, index: int) -> tuple[Tensor, Tensor | None, Tensor] | None:
        """Batch ``index``'s (sum, per_sample or None, losses), or None when it must be scored.

        A missing shard returns None; an unreadable or inconsistent one (never written
        by this library's atomic writes, e.g. damaged on disk) is reported with a
        warning and scored again.
        """
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[_SHARD_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            described = {k: header[k] for k in ("version", "batch", "fingerprint")}
            ok = (header["sha256"] == _checksum(tensors, described)
                  and header["fingerprint"] == self.manifest["batches"][index]
                  and ("per_sample" in tensors) == self.manifest["per_sample"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            ok, why = False, str(exc)
        else:
            why = "checksum, batch fingerprint or content does not match"
        if not ok:
            warnings.warn(f"checkpoint shard {str(path)!r} is damaged ({why}); scoring batch {index} again.",
                          stacklevel=3)
            return None
        return tensors["sum"], tensors.get("per_sample"), tensors["losses"]
