"""Data-parallel attribution over processes with ``torch.distributed``.

Run the same script in every process (``torchrun --nproc_per_node N script.py``); each
process loads the model and builds the same list of batches, then calls::

    scores = circuitdiff.distributed.attribute(model, graph, batches, objective="answer_nll")

Batch ``i`` is scored by rank ``i % world_size`` with :func:`circuitdiff.attribute`; the
per-sample scores and objective values are gathered and put back in the order of
``batches``, so the result is the single-process result (see :func:`attribute` for the
tolerance). Put each process on its own GPU with :func:`local_device`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import warnings
from typing import Any, Iterable

import torch
import torch.distributed as dist

from circuitdiff.attribution import attribute as attribute_one, resolve_scorer
from circuitdiff.engine import interventions as interventions_module
from circuitdiff.engine.bridge import Bridge
from circuitdiff.data import Batch
from circuitdiff.data.batches import check_sample_ids
from circuitdiff.errors import ArgumentError, DataError, DistributedError
from circuitdiff.graph import AttributionGraph
from circuitdiff.identity import batch_fingerprint, fingerprint, run_settings
from circuitdiff.scores import EdgeScores

__all__ = ["attribute", "local_device", "init_process_group", "shard"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (made current) when CUDA is available, else CPU.

    Load the model with ``cd.load_model(path, device=local_device())`` in every process.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_process_group(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes, unless one is already initialised.

    The backend is NCCL when ``device`` (default: :func:`local_device`) is a CUDA device,
    gloo otherwise. Returns False, doing nothing, outside torchrun (no ``WORLD_SIZE`` in
    the environment) and True when a process group is ready. A group created here is
    destroyed at interpreter exit.

    Raises:
        RuntimeError: an initialised group whose world size or rank disagrees with
            torchrun's ``WORLD_SIZE`` / ``RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        _check_environment()
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this torch build; run without torchrun.")
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with torchrun "
                           "(python -m torch.distributed.run), which sets all of them.")
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_environment() -> None:
    for name, actual in (("WORLD_SIZE", dist.get_world_size()), ("RANK", dist.get_rank())):
        expected = os.environ.get(name)
        if expected is not None and int(expected) != actual:
            raise DistributedError(
                f"the initialised process group has {name.lower()} {actual} but the environment says "
                f"{name}={expected}; initialise the group from torchrun's variables "
                "(dist.init_process_group() with no world_size/rank) or let circuitdiff do it."
            )


def shard(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The indices of the batches rank ``rank`` scores: ``i`` with ``i % world_size == rank``."""
    return list(range(rank, n_batches, world_size))


def attribute(
    model: Any,
    graph: AttributionGraph,
    batches: Iterable[Batch],
    *,
    dst: int | None = None,
    **attribute_kwargs: Any,
) -> EdgeScores | None:
    """:func:`circuitdiff.attribute` split over the processes of a ``torch.distributed`` group.

    Every process must call this with the same model, graph, batches (same order) and
    arguments. Batch ``i`` is scored by rank ``i % world_size``; ranks without a batch
    (fewer batches than processes) idle and still take part in the gather.

    The process group: an initialised one is used (its world size and rank must agree
    with torchrun's ``WORLD_SIZE`` / ``RANK`` when those are set); otherwise one is made
    from torchrun's variables (see :func:`init_process_group`); with neither, this is
    plain :func:`circuitdiff.attribute` in one process.

    Result: ``per_sample`` and ``objective_values`` in the order of ``batches``, exactly
    the values a single process computes on the same device (each batch is scored the same
    way). ``mean`` is recomputed over all samples: from the gathered per-sample scores
    (float64 sum) or, with ``per_sample=False``, as the sample-weighted mean of the ranks'
    float32 means; either way it matches a single-process run to float32 rounding
    (``rtol=1e-6``; only the summation order differs). The metadata is rank 0's, with
    ``n_samples`` for all samples and ``world_size`` added.

    Interventions ``"mean"`` / ``"mean-positional"``: pass the *whole* ``reference_batches``
    to every rank (each computes the means from them, not from its shard of ``batches``);
    the ranks' means are compared and differing means raise.

    Args:
        model: as for :func:`circuitdiff.attribute`.
        graph: as for :func:`circuitdiff.attribute`.
        batches: as for :func:`circuitdiff.attribute`; made a list (its length must be
            known on every rank).
        dst: None (default) returns the scores on every rank; a rank number gathers them
            on that rank only and returns None on the others (less memory).
        **attribute_kwargs: ``objective``, ``scorer``, ``intervention``, ``per_sample``,
            ``reference_batches``, ``progress`` (default: rank 0 only), ... as for
            :func:`circuitdiff.attribute`.

    Raises:
        DataError: no batches; mean interventions whose means differ across ranks.
        DistributedError: a process group whose world size or rank disagrees with torchrun's
            environment; another rank failed (the failing rank re-raises its own error,
            the others name it).
        CircuitDiffError: anything :func:`circuitdiff.attribute` raises.
    """

    batches = list(batches)
    if not init_process_group(_model_device(model)):
        return attribute_one(model, graph, batches, **attribute_kwargs)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if not batches:
        raise DataError("no batches given; attribution needs at least one sample.")
    if dst is not None and not 0 <= dst < world_size:
        raise ArgumentError(f"dst={dst} is not a rank of this group of {world_size} processes.")
    _warn_on_shared_gpu(model)
    named = _with_positional_ids(batches)
    ids = [sample for batch in named for sample in batch.sample_ids]  # type: ignore[union-attr]
    check_sample_ids(ids, len(ids), "the batches' sample ids")  # before sharding: each rank sees only its own
    kwargs = dict(attribute_kwargs)
    kwargs["scorer"] = resolve_scorer(kwargs.get("scorer", "eap"), kwargs.pop("method", None))
    fused = Bridge(model).fuses_attention(getattr(kwargs["scorer"], "fused_attention", False))  # as attribute's
    identity = {**run_settings(model, graph, kwargs["scorer"], attribute_kwargs.get("intervention", "zero"), attribute_kwargs.get("objective"),
                               attribute_kwargs.get("reference_batches"), attribute_kwargs.get("per_sample", True),
                               fused_attention=fused),
                "data": fingerprint([batch_fingerprint(b) for b in batches])}

    kwargs.setdefault("progress", rank == 0)
    if kwargs.get("checkpoint_dir") is not None:  # one directory per rank: shards never collide
        kwargs["checkpoint_dir"] = os.path.join(os.fspath(kwargs["checkpoint_dir"]), f"rank{rank}-of-{world_size}")
    mine = shard(len(batches), rank, world_size)

    outcome: dict[str, Any]
    error: BaseException | None = None
    try:
        intervention = kwargs.pop("intervention", "zero")
        reference = kwargs.pop("reference_batches", None)
        intervention = interventions_module.resolve(intervention, model, graph, reference)
        outcome = {"fingerprint": _fingerprint(intervention)}
    except Exception as exc:  # every rank must still reach the collective below
        error, outcome = exc, {"error": f"{type(exc).__name__}: {exc}"}
    _agree(outcome, error, rank, world_size, "preparing the intervention")
    fingerprints = [o["fingerprint"] for o in _all_gather(outcome, world_size)]
    _check_same_means(fingerprints)

    scores: EdgeScores | None = None
    try:
        if mine:
            scores = attribute_one(model, graph, [named[i] for i in mine], intervention=intervention, **kwargs)
        outcome = {"part": _cpu_part(scores)}
    except Exception as exc:
        error, outcome = exc, {"error": f"{type(exc).__name__}: {exc} (rank {rank} scores batches {mine} of "
                                        f"{len(batches)}, as its batches 0..{len(mine) - 1})"}
    _agree(outcome, error, rank, world_size, "scoring")
    parts = _gather(outcome, world_size, dst)
    if parts is None:
        return None
    ids_from = "position" if any(b.sample_ids is None for b in batches) else "given"
    return _combine([p["part"] for p in parts], named, graph, identity, ids_from)


def _with_positional_ids(batches: list[Batch]) -> list[Batch]:
    """The batches, those without sample ids named by their samples' positions in the whole run (as one process does)."""
    named, position = [], 0
    for batch in batches:
        if batch.sample_ids is None:
            batch = dataclasses.replace(batch, sample_ids=tuple(str(position + i) for i in range(batch.size)))
        named.append(batch)
        position += batch.size
    return named


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _warn_on_shared_gpu(model: Any) -> None:
    device = _model_device(model)
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and local is not None and device.index is not None and device.index != int(local):
        warnings.warn(f"the model is on {device} but LOCAL_RANK is {local}; load it with "
                      "device=circuitdiff.distributed.local_device() to give each process its own GPU.",
                      stacklevel=3)


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _gather(obj: Any, world_size: int, dst: int | None) -> list[Any] | None:
    if dst is None:
        return _all_gather(obj, world_size)
    out: list[Any] | None = [None] * world_size if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def _agree(outcome: dict[str, Any], error: BaseException | None, rank: int, world_size: int, stage: str) -> None:
    """Raise on every rank if any rank failed (so no rank waits forever in a later collective)."""
    failures = [(r, o) for r, o in enumerate(_all_gather({"error": outcome.get("error")}, world_size)) if o["error"]]
    if not failures:
        return
    if error is not None:
        raise error
    listing = "; ".join(f"rank {r}: {o['error']}" for r, o in failures)
    raise DistributedError(f"distributed attribution failed while {stage} on another process ({listing}).")


def _fingerprint(intervention: Any) -> tuple[tuple[int, ...], float, float] | None:
    means = getattr(intervention, "means", None)
    if not isinstance(means, torch.Tensor):
        return None
    m = means.detach().to("cpu", torch.float64)
    weights = torch.linspace(1.0, 2.0, m.numel(), dtype=torch.float64).view_as(m)
    return tuple(m.shape), float(m.abs().sum()), float((m * weights).sum())


def _check_same_means(fingerprints: list[Any]) -> None:
    first = fingerprints[0]
    for rank, other in enumerate(fingerprints[1:], start=1):
        same = (first is None) == (other is None) and (
            first is None or (first[0] == other[0] and all(
                abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-30) for a, b in zip(first[1:], other[1:], strict=True))))
        if not same:
            raise DataError(
                f"the replacement means differ between rank 0 and rank {rank}: a mean intervention needs the same "
                "reference data on every rank. Pass the whole reference_batches to every process (they are not "
                "sharded), or build cd.interventions.Mean.from_batches(...) once and pass the same means everywhere."
            )


def _cpu_part(scores: EdgeScores | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    return {
        "per_sample": None if scores.per_sample is None else scores.per_sample.detach().cpu(),
        "mean": scores.mean.detach().cpu(),
        "objective_values": scores.objective_values.detach().cpu(),
        "sample_ids": scores.sample_ids,
        "metadata": scores.metadata,
    }


def _combine(parts: list[dict[str, Any] | None], batches: list[Batch], graph: AttributionGraph,
             identity: dict[str, Any], ids_from: str) -> EdgeScores:
    """Put the ranks' samples back in batch order (by sample id; dropped samples stay out) and recompute the mean.

    ``identity``: the whole run's (what one process computes for the same call), in place of the ranks' own.
    """
    present = [p for p in parts if p is not None]
    where = {sample: (k, row) for k, p in enumerate(present) for row, sample in enumerate(p["sample_ids"])}
    order = [where[sample] for batch in batches for sample in batch.sample_ids if sample in where]  # type: ignore[union-attr]
    if len(order) != len(where):
        raise DistributedError("the ranks returned samples that are not in the batches; did every rank get the same "
                               "batches?")
    objective_values = torch.stack([present[k]["objective_values"][row] for k, row in order])
    n = len(order)
    if all(p["per_sample"] is not None for p in present):
        per_sample = torch.stack([present[k]["per_sample"][row] for k, row in order])
        mean = per_sample.sum(0, dtype=torch.float64) / n
    else:
        per_sample = None
        mean = sum(p["mean"].double() * p["objective_values"].shape[0] for p in present) / n
    first = present[0]["metadata"]
    metadata = {**first, "n_samples": n, "world_size": len(parts), "sample_ids": ids_from,
                "dropped": [d for p in present for d in p["metadata"]["dropped"]],
                "identity": {"fingerprint": fingerprint(identity), **identity}}
    return EdgeScores(graph=graph, mean=mean.to(present[0]["mean"].dtype), per_sample=per_sample,
                      objective_values=objective_values, metadata=metadata,
                      sample_ids=tuple(present[k]["sample_ids"][row] for k, row in order))
