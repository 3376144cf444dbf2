"""``attribute``: score every edge of a graph on a dataset."""

from __future__ import annotations

import datetime
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from circuitdiff import interventions as interventions_module
from circuitdiff import objectives as objectives_module
from circuitdiff import scorers
from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentTypeError, DataError
from circuitdiff.checkpoint import Checkpoints, run_manifest
from circuitdiff.graph import AttributionGraph
from circuitdiff.models import attribution_mode, describe_model
from circuitdiff.scorers.base import ScoringContext, make_context
from circuitdiff.scores import EdgeScores

__all__ = ["attribute", "checked_batches"]


def attribute(
    model: Any,
    graph: AttributionGraph,
    batches: Iterable[Batch],
    *,
    objective: str | Callable[..., torch.Tensor],
    method: str | scorers.Scorer = "eap",
    intervention: str | interventions_module.Intervention = "zero",
    per_sample: bool = True,
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> EdgeScores:
    """Score every edge of ``graph`` on ``batches``.

    Each score estimates ``objective(edge ablated) - objective(clean)`` for one sample,
    where "edge ablated" means only that receiver reads the source's replacement (given
    by ``intervention``) instead of its clean output. Positive = the edge helps.

    Args:
        model: a TransformerBridge (see :func:`circuitdiff.load_model`). It is put in
            eval mode with parameter gradients off for the run; both are restored.
        graph: ``AttributionGraph.from_model(model, level=...)``.
        batches: :class:`Batch` objects (e.g. from :func:`circuitdiff.make_batches`).
        objective: a name (``"answer_nll"``, ``"logit_diff"``, ``"kl_to_clean"``) or a
            callable ``(logits [batch, pos, vocab], batch) -> losses [batch]``.
        method: scorer name (``circuitdiff.scorers.available()``), or a scorer
            object, e.g. ``circuitdiff.scorers.get("eap-ig-inputs", steps=50)``.
        intervention: ``"zero"``, ``"patching"``, ``"mean"``, ``"mean-positional"``
            or an intervention object (see :mod:`circuitdiff.interventions`).
        per_sample: keep the ``[n_samples, n_sources, n_receivers]`` scores (on CPU).
            The mean is the same either way.
        reference_batches: the data whose average activations replace ablated
            sources, for ``"mean"`` and ``"mean-positional"``.
        progress: show a progress bar.
        checkpoint_dir: make the run resumable. Each batch's result (its float64 score
            sum, clean losses and, with ``per_sample``, its per-sample scores) is written
            atomically to ``checkpoint_dir/shard-NNNNN.safetensors`` as soon as the batch
            finishes, next to ``manifest.json`` describing the run (model, graph, method
            and options, intervention and its reference data, objective, a SHA-256 of
            each batch's token ids and labels). Called again with the same arguments,
            finished batches are read instead of scored; the result equals an
            uninterrupted run bit for bit. ``batches`` (and ``reference_batches``) are
            read into a list first. A callable ``objective`` must be a module-level
            function or class instance (it is identified by its qualified name).

    Returns:
        :class:`EdgeScores` with float32 ``mean`` (and ``per_sample``).

    Raises:
        DataError: no batches, token ids outside the vocabulary, batches without
            corrupted prompts under patching, bad loss spans; ``checkpoint_dir`` holds
            shards of a different run (the message names what differs).
        ObjectiveError: the objective is NaN/inf (the batch is named) or misshapen.
        UnknownNameError: unknown method, intervention or objective name.
        UnsupportedModelError: the model cannot be attributed.
    """
    scorer = scorers.get(method) if isinstance(method, str) else method
    if not callable(getattr(scorer, "score_batch", None)):
        raise ArgumentTypeError(f"method must be a scorer name or an object with score_batch(); got {method!r}.")
    store = None
    if checkpoint_dir is not None:
        batches = list(batches)
        reference_batches = None if reference_batches is None else list(reference_batches)
        manifest = run_manifest(model, graph, batches, objective, scorer, intervention, reference_batches, per_sample)
    context = make_context(model, graph, objective, intervention, reference_batches, progress)
    spec = describe_model(model)
    if checkpoint_dir is not None:
        store = Checkpoints(Path(checkpoint_dir), manifest)

    total = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.float64)
    kept: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    with attribution_mode(model):
        for index, batch in checked_batches(batches, context, f"{scorer.name} ({graph.level} level)"):
            done = store.load(index) if store is not None else None
            if done is None:
                scores, batch_losses = scorer.score_batch(context, batch, index)
                scores = scores.detach().to("cpu")
                done = (scores.sum(0, dtype=torch.float64), scores.to(torch.float32) if per_sample else None,
                        batch_losses.detach().to("cpu", torch.float32))
                if store is not None:
                    store.save(index, *done)
            batch_sum, batch_kept, batch_losses = done
            total += batch_sum
            if per_sample:
                kept.append(batch_kept)
            losses.append(batch_losses)
    if not losses:
        raise DataError("no batches given; attribution needs at least one sample.")
    objective_values = torch.cat(losses)
    n_samples = int(objective_values.shape[0])
    metadata = {
        "model_id": spec.model_id,
        "architecture": spec.architecture,
        "model_dtype": spec.dtype,
        "level": graph.level,
        "method": scorer.name,
        "intervention": context.intervention.name,
        "objective": objectives_module.name_of(context.objective),
        "n_samples": n_samples,
        "sign": "objective(ablated) - objective(clean); positive = edge helps",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": dict(_versions()),
    }
    return EdgeScores(
        graph=graph,
        mean=(total / n_samples).to(torch.float32),
        per_sample=torch.cat(kept) if per_sample else None,
        objective_values=objective_values,
        metadata=metadata,
    )


def checked_batches(batches: Iterable[Batch], context: ScoringContext, desc: str) -> Iterator[tuple[int, Batch]]:
    """``(index, batch)`` pairs, each batch checked and moved to the model's device.

    Refuses objects that are not :class:`Batch` and token ids outside the model's
    vocabulary (both name the batch); shows a progress bar over batches unless
    ``context.progress`` is False.
    """
    d_vocab = describe_model(context.model).d_vocab
    n_batches = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    for index, batch in enumerate(tqdm(batches, total=n_batches, disable=not context.progress, desc=desc, unit="batch")):
        if not isinstance(batch, Batch):
            raise DataError(f"batch {index} is a {type(batch).__name__}; expected circuitdiff.Batch objects "
                            "(see circuitdiff.make_batches).")
        _check_vocab(batch, d_vocab, index)
        yield index, batch.to(context.hooks.device)


def _check_vocab(batch: Batch, d_vocab: int, index: int) -> None:
    for name in ("input_ids", "corrupted_input_ids"):
        ids = getattr(batch, name)
        if ids is not None and (bool((ids < 0).any()) or bool((ids >= d_vocab).any())):
            raise DataError(
                f"batch {index}: {name} holds token ids in [{int(ids.min())}, {int(ids.max())}] but the "
                f"model's vocabulary has {d_vocab} entries; was it tokenized with another tokenizer?"
            )


@functools.cache
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("circuitdiff", "torch", "transformer-lens", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found
