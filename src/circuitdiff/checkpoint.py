"""Checkpoint directories for resumable runs: ``attribute(..., checkpoint_dir=DIR)``.

``DIR/manifest.json`` holds the run's identity (:mod:`circuitdiff.identity`: model
weights, config, tokenizer and dtype, graph, scorer, intervention, objective, data,
circuitdiff version) and its fingerprint; ``DIR/shard-NNNNN.safetensors`` holds one
finished batch and the fingerprint of the run that wrote it. Both are written
atomically, so a run killed at any moment resumes. Every shard is checked against the
current run when it is read: a shard of another run is an
:class:`~circuitdiff.IdentityMismatchError`, never reused. ``DIR/.lock`` keeps a second
process out while a run writes (:class:`~circuitdiff.RunLockedError`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import filelock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdiff.errors import ArgumentError, IdentityMismatchError, RunLockedError
from circuitdiff.identity import differences, fingerprint
from circuitdiff.io import _checksum, write_atomically

__all__ = ["CHECKPOINT_VERSION", "BatchResult", "Checkpoints", "directory_lock"]

#: Version of the checkpoint directory layout (manifest.json + shard-NNNNN.safetensors).
CHECKPOINT_VERSION = 2
_SHARD_KEY = "circuitdiff-checkpoint"
_FRESH = ("Pass fresh=True (on the command line: --fresh) to discard them and start over, or choose another "
          "checkpoint_dir.")


@contextlib.contextmanager
def directory_lock(directory: Path, busy: str) -> Iterator[None]:
    """Hold ``directory/.lock`` while the block runs; a lock held by another process is a RunLockedError(``busy``)."""
    lock = filelock.FileLock(str(directory / ".lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunLockedError(busy) from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class BatchResult:
    """What one batch contributes to a run.

    ``total``: ``[n_sources, n_receivers]`` float64 sum of the kept samples' scores;
    ``per_sample``: ``[kept, n_sources, n_receivers]`` float32 or None; ``losses``:
    ``[kept]`` float32 clean objective values; ``sample_ids``: the kept samples' ids;
    ``dropped``: one ``{"id", "batch", "reason"}`` record per sample left out.
    """

    total: Tensor
    per_sample: Tensor | None
    losses: Tensor
    sample_ids: tuple[str, ...]
    dropped: list[dict[str, Any]] = field(default_factory=list)


class Checkpoints:
    """A checkpoint directory, locked for one run: use it as a context manager.

    Args:
        directory: the directory (created if missing).
        identity: the run's identity (:func:`circuitdiff.identity.run_settings` plus ``"data"``).
        batches: the fingerprint of each batch, in order.
        fresh: delete the stored manifest and shards first.

    Raises:
        ArgumentError: ``directory`` is a file.
        RunLockedError: another process holds the directory's lock.
        IdentityMismatchError: the directory holds shards of another run.
    """

    def __init__(self, directory: Path, identity: dict[str, Any], batches: list[str], fresh: bool = False) -> None:
        if directory.exists() and not directory.is_dir():
            raise ArgumentError(f"checkpoint_dir {str(directory)!r} is a file; pass a directory.")
        self.directory, self.identity, self.batches, self.fresh = directory, identity, batches, fresh
        self.fingerprint = fingerprint(identity)
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "Checkpoints":
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            held.enter_context(directory_lock(self.directory, (
                f"another process is writing into checkpoint_dir {str(self.directory)!r} (it holds "
                f"{str(self.directory / '.lock')!r}); wait for it to finish, or give this run its own "
                "checkpoint_dir (e.g. one per model).")))
            self._open()
            self._held = held.pop_all()  # opened: keep the lock until __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _open(self) -> None:
        manifest = self.directory / "manifest.json"
        for leftover in self.directory.glob(".*.tmp-*"):  # temporary files of a killed writer (the lock is ours)
            leftover.unlink(missing_ok=True)
        shards = sorted(self.directory.glob("shard-*.safetensors"))
        if self.fresh:
            for path in shards:
                path.unlink()
            manifest.unlink(missing_ok=True)
        elif manifest.exists() and shards:  # no shards yet: nothing to protect
            self._check_manifest(manifest)
        record = {"format": _SHARD_KEY, "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                  "identity": self.identity, "batches": self.batches}
        write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))

    def _check_manifest(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IdentityMismatchError(f"{str(path)!r} is unreadable ({exc}), so its shards cannot be matched to "
                                        f"this run. {_FRESH}") from exc
        if not isinstance(stored, dict) or stored.get("format") != _SHARD_KEY or \
                stored.get("version") != CHECKPOINT_VERSION or not isinstance(stored.get("identity"), dict):
            raise IdentityMismatchError(
                f"checkpoint_dir {str(self.directory)!r} holds shards written by an older circuitdiff or another "
                f"tool (its manifest.json is not a version-{CHECKPOINT_VERSION} circuitdiff manifest). {_FRESH}")
        found = differences(stored["identity"], self.identity)
        old = stored.get("batches")
        if isinstance(old, list) and len(old) == len(self.batches):
            changed = [i for i, (a, b) in enumerate(zip(old, self.batches)) if a != b]
            if changed:
                listed = ", ".join(map(str, changed[:5])) + (" ..." if len(changed) > 5 else "")
                found.append(f"the token ids, labels or sample ids of batch(es) {listed} differ")
        if found:
            raise IdentityMismatchError(f"checkpoint_dir {str(self.directory)!r} holds shards of a different run ("
                                        + "; ".join(found) + f"). {_FRESH}")

    def path(self, index: int) -> Path:
        """Path of batch ``index``'s shard: ``directory/shard-NNNNN.safetensors`` (five digits, zero-padded)."""
        return self.directory / f"shard-{index:05d}.safetensors"

    def save(self, index: int, result: BatchResult) -> None:
        """Write batch ``index``'s result (atomic)."""
        tensors = {"sum": result.total.contiguous(), "losses": result.losses.contiguous()}
        if result.per_sample is not None:
            tensors["per_sample"] = result.per_sample.contiguous()
        header: dict[str, Any] = {"version": CHECKPOINT_VERSION, "batch": index, "fingerprint": self.batches[index],
                                  "run": self.fingerprint, "identity": self.identity,
                                  "sample_ids": list(result.sample_ids), "dropped": result.dropped}
        header["sha256"] = _checksum(tensors, header)
        write_atomically(self.path(index),
                         lambda tmp: save_file(tensors, str(tmp), metadata={_SHARD_KEY: json.dumps(header)}))

    def load(self, index: int) -> BatchResult | None:
        """Batch ``index``'s stored result, or None when it must be scored.

        A missing shard returns None; an unreadable or damaged one (never written by this
        library's atomic writes, e.g. damaged on disk) is reported with a warning and
        scored again.

        Raises:
            IdentityMismatchError: the shard was written by another run (another model,
                data or setting); the message names what differs.
        """
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[_SHARD_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            described = {k: v for k, v in header.items() if k != "sha256"}
            intact = header["sha256"] == _checksum(tensors, described) and header.get("version") == CHECKPOINT_VERSION
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            intact, why = False, str(exc)
        else:
            why = "checksum or format version does not match"
        if not intact:
            warnings.warn(f"checkpoint shard {str(path)!r} is damaged ({why}); scoring batch {index} again.",
                          stacklevel=3)
            return None
        if header["run"] != self.fingerprint or header["fingerprint"] != self.batches[index]:
            stored = header.get("identity") if isinstance(header.get("identity"), dict) else {}
            found = differences(stored, self.identity) or [f"the token ids, labels or sample ids of batch {index} differ"]
            raise IdentityMismatchError(f"checkpoint shard {str(path)!r} was written by a different run ("
                                        + "; ".join(found) + f"). {_FRESH}")
        return BatchResult(tensors["sum"], tensors.get("per_sample"), tensors["losses"],
                           tuple(header["sample_ids"]), list(header["dropped"]))
