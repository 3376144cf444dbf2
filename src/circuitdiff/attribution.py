"""``attribute``: score every edge of a graph on a dataset."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from circuitdiff import objectives as objectives_module
from circuitdiff import scorers
from circuitdiff.checkpoint import BatchResult, Checkpoints
from circuitdiff.choices import NonFinitePolicy
from circuitdiff.data import Batch
from circuitdiff.engine.interventions import Intervention
from circuitdiff.engine.run import AttributionRun
from circuitdiff.errors import ArgumentError, ArgumentTypeError, DataError, NonFiniteError
from circuitdiff.graph import AttributionGraph
from circuitdiff.identity import batch_fingerprint, fingerprint, run_settings
from circuitdiff.scorers.base import renamed_method
from circuitdiff.scores import EdgeScores

__all__ = ["attribute", "resolve_scorer", "NONFINITE_POLICIES"]


def attribute(
    model: Any,
    graph: AttributionGraph,
    batches: Iterable[Batch],
    *,
    objective: str | Callable[..., torch.Tensor],
    scorer: str | scorers.Scorer = "eap",
    intervention: str | Intervention = "zero",
    per_sample: bool = True,
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    nonfinite: str = "error",
    method: str | scorers.Scorer | None = None,
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
            Their ``sample_ids`` name the samples (default: their positions).
        objective: a name (``"answer_nll"``, ``"logit_diff"``, ``"kl_to_clean"``) or a
            callable ``(logits [batch, pos, vocab], batch) -> losses [batch]``.
        scorer: scorer name (``circuitdiff.scorers.available()``), or a scorer
            object, e.g. ``circuitdiff.scorers.get("eap-ig-inputs", steps=50)``.
        intervention: ``"zero"``, ``"patching"``, ``"mean"``, ``"mean-positional"``
            or an intervention object (see :mod:`circuitdiff.engine.interventions`).
        per_sample: keep the ``[n_samples, n_sources, n_receivers]`` scores (on CPU).
            The mean is the same either way.
        reference_batches: the data whose average activations replace ablated
            sources, for ``"mean"`` and ``"mean-positional"``.
        progress: show a progress bar.
        checkpoint_dir: make the run resumable. Each batch's result (its float64 score
            sum, clean losses, sample ids and, with ``per_sample``, its per-sample scores)
            is written atomically to ``checkpoint_dir/shard-NNNNN.safetensors`` as soon
            as the batch finishes, with the fingerprint of the run's identity (model
            weights, config, tokenizer and dtype, graph, scorer and options, intervention
            and its reference data, objective, every batch's token ids, labels and sample
            ids, circuitdiff version; see :mod:`circuitdiff.identity`), which
            ``manifest.json`` also holds. Called again with the same arguments, finished
            batches are read instead of scored; the result equals an uninterrupted run
            bit for bit. Anything else that differs is an error naming it. A lock keeps
            two processes from writing into one directory at once. ``batches`` (and
            ``reference_batches``) are read into a list first. A callable ``objective``
            must be a module-level function or class instance (it is identified by its
            qualified name).
        fresh: with ``checkpoint_dir``: delete its manifest and shards first and start
            over (what to do after an :class:`~circuitdiff.IdentityMismatchError`).
        nonfinite: what a NaN or infinite score or loss does: ``"error"`` (default)
            raises :class:`~circuitdiff.NonFiniteError` naming the batch, the sample and
            the edges; ``"drop"`` leaves such samples out and lists them in
            ``scores.metadata["dropped"]``. Not part of the run's identity: a run stopped
            by a NonFiniteError resumes with ``"drop"`` from its finished shards.
        method: deprecated alias of ``scorer`` (one release; warns).

    Returns:
        :class:`EdgeScores` with float32 ``mean`` (and ``per_sample``), the kept
        samples' ``sample_ids`` and ``metadata["identity"]`` (the run's identity and
        its ``fingerprint``).

    Raises:
        DataError: no batches, token ids outside the vocabulary, sequences longer than
            the model's context, repeated sample ids, batches without corrupted prompts
            under patching, bad loss spans.
        NonFiniteError: a NaN or infinite score (with ``nonfinite="error"``).
        IdentityMismatchError: ``checkpoint_dir`` holds shards of another run (the
            message names what differs).
        RunLockedError: another process is writing into ``checkpoint_dir``.
        ObjectiveError: the objective is NaN/inf (the batch is named) or misshapen.
        UnknownNameError: unknown scorer, intervention or objective name.
        ArgumentError: bad options (``nonfinite``, ``fresh`` without ``checkpoint_dir``).
        UnsupportedModelError: the model cannot be attributed.
    """
    scorer = resolve_scorer(scorer, method)
    nonfinite = NonFinitePolicy.parse(nonfinite)
    if fresh and checkpoint_dir is None:
        raise ArgumentError("fresh=True discards a checkpoint_dir's shards; it needs checkpoint_dir.")
    if checkpoint_dir is not None:
        batches = list(batches)
        reference_batches = None if reference_batches is None else list(reference_batches)
    run = AttributionRun(model, graph, objective=objective, intervention=intervention,
                         reference_batches=reference_batches, progress=progress)
    fused = run.bridge.fuses_attention(getattr(scorer, "fused_attention", False))  # scorers without it: eager
    settings = run_settings(model, graph, scorer, intervention, objective, reference_batches, per_sample,
                            stable=checkpoint_dir is not None, spec=run.spec, fused_attention=fused)
    with contextlib.ExitStack() as stack:
        store, prints = None, None
        if checkpoint_dir is not None:
            prints = [batch_fingerprint(b) for b in batches]  # type: ignore[union-attr]
            store = stack.enter_context(Checkpoints(Path(checkpoint_dir), {**settings, "data": fingerprint(prints)},
                                                    prints, fresh))
        kept = _Accumulator(graph, per_sample)
        stack.enter_context(run)
        for index, batch in run.batches(batches, f"{scorer.name} ({graph.level} level)"):
            ids = kept.ids_of(batch, index)
            done = store.load(index) if store is not None else None
            if done is not None and done.dropped and nonfinite == "error":
                raise NonFiniteError(
                    f"batch {index}'s stored shard left out {len(done.dropped)} sample(s) for non-finite scores (a "
                    f"run with nonfinite='drop'; first: id {done.dropped[0]['id']!r}, {done.dropped[0]['reason']}). "
                    "Pass nonfinite='drop' to resume it, or fresh=True to score again.")
            if done is None:
                scores, losses = scorer.score_batch(run, batch, index)
                done = _batch_result(scores.detach().to("cpu"), losses.detach().to("cpu", torch.float32), ids,
                                     index, graph, per_sample, nonfinite)
                if store is not None:
                    store.save(index, done)
            kept.add(prints[index] if prints is not None else batch_fingerprint(batch), done)
    identity = {**settings, "data": fingerprint(kept.fingerprints)}
    spec = run.spec
    metadata = {
        "model_id": spec.model_id,
        "architecture": spec.architecture,
        "model_dtype": spec.dtype,
        "level": graph.level,
        "method": scorer.name,
        "intervention": run.intervention.name,
        "objective": objectives_module.name_of(run.objective),
        "n_samples": kept.n_kept,
        "sample_ids": "given" if kept.ids_given else "position",
        "nonfinite": nonfinite.value,
        "dropped": kept.dropped,
        "sign": "objective(ablated) - objective(clean); positive = edge helps",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": dict(_versions()),
        "identity": {"fingerprint": fingerprint(identity), **identity},
    }
    return kept.scores(metadata)


#: What ``attribute(nonfinite=...)`` accepts.
NONFINITE_POLICIES: tuple[str, ...] = tuple(policy.value for policy in NonFinitePolicy)


def resolve_scorer(scorer: str | scorers.Scorer, method: str | scorers.Scorer | None = None) -> scorers.Scorer:
    """A scorer object from a name or an object; ``method`` is the deprecated alias of ``scorer`` (warns)."""
    scorer = renamed_method(scorer, method, stacklevel=3)
    found = scorers.get(scorer) if isinstance(scorer, str) else scorer
    if not callable(getattr(found, "score_batch", None)):
        raise ArgumentTypeError(f"scorer must be a scorer name or an object with score_batch(); got {scorer!r}.")
    return found


class _Accumulator:
    """The kept samples of a run, batch by batch: score sum, per-sample scores, losses, ids, drops."""

    def __init__(self, graph: AttributionGraph, per_sample: bool) -> None:
        self.graph, self.per_sample = graph, per_sample
        self.total = torch.zeros(graph.n_sources, graph.n_receivers, dtype=torch.float64)
        self.kept: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.sample_ids: list[str] = []
        self.seen: set[str] = set()
        self.dropped: list[dict[str, Any]] = []
        self.fingerprints: list[str] = []
        self.ids_given = True
        self.position = 0

    def ids_of(self, batch: Batch, index: int) -> tuple[str, ...]:
        """The batch's sample ids (its positions in the run when it has none); refuses repeats."""
        ids = batch.sample_ids
        if ids is None:
            self.ids_given = False
            ids = tuple(str(self.position + i) for i in range(batch.size))
        self.position += batch.size
        repeated = [i for i in ids if i in self.seen]
        if repeated:
            raise DataError(f"batch {index} repeats sample ids of earlier batches (e.g. {repeated[:3]}); every "
                            "sample needs its own id (see make_batches(sample_ids=...)).")
        self.seen.update(ids)
        return ids

    def add(self, batch_print: str, result: BatchResult) -> None:
        self.fingerprints.append(batch_print)
        self.total += result.total
        if self.per_sample:
            self.kept.append(result.per_sample)  # type: ignore[arg-type]
        self.losses.append(result.losses)
        self.sample_ids.extend(result.sample_ids)
        self.dropped.extend(result.dropped)

    @property
    def n_kept(self) -> int:
        return len(self.sample_ids)

    def scores(self, metadata: dict[str, Any]) -> EdgeScores:
        if not self.fingerprints:
            raise DataError("no batches given; attribution needs at least one sample.")
        if not self.n_kept:
            raise NonFiniteError(f"every sample was dropped for non-finite scores ({len(self.dropped)} samples; "
                                 f"first: {self.dropped[0]['reason']}); nothing is left to return.")
        return EdgeScores(
            graph=self.graph,
            mean=(self.total / self.n_kept).to(torch.float32),
            per_sample=torch.cat(self.kept) if self.per_sample else None,
            objective_values=torch.cat(self.losses),
            metadata=metadata,
            sample_ids=tuple(self.sample_ids),
        )


def _batch_result(scores: torch.Tensor, losses: torch.Tensor, ids: tuple[str, ...], index: int,
                  graph: AttributionGraph, per_sample: bool, nonfinite: str) -> BatchResult:
    """One batch's contribution; samples with a NaN or infinite score or loss raise or are dropped."""
    finite = torch.isfinite(scores).flatten(1).all(1) & torch.isfinite(losses)
    dropped = []
    for row in torch.nonzero(~finite).flatten().tolist():
        reason = _describe_nonfinite(scores[row], losses[row], graph)
        if nonfinite == "error":
            raise NonFiniteError(
                f"batch {index}, sample {row} (id {ids[row]!r}): {reason}. A finite loss with non-finite scores "
                "means the gradients overflowed or the model produced NaN inside (try dtype=torch.float32, check "
                "the weights); pass nonfinite='drop' to leave such samples out (they are listed in "
                "scores.metadata['dropped'])."
            )
        dropped.append({"id": ids[row], "batch": index, "reason": reason})
    if dropped:  # otherwise no copy of the batch's scores
        keep = torch.nonzero(finite).flatten()
        scores, losses, ids = scores[keep], losses[keep], tuple(ids[i] for i in keep.tolist())
    return BatchResult(scores.sum(0, dtype=torch.float64), scores.to(torch.float32) if per_sample else None,
                       losses, ids, dropped)


def _describe_nonfinite(scores: torch.Tensor, loss: torch.Tensor, graph: AttributionGraph) -> str:
    """E.g. ``"12 of 459 scores are NaN or inf, on edges into q, k receivers from attn sources (first a0.h1->a1.h0<q>)"``."""
    bad = ~torch.isfinite(scores) & graph.edge_mask
    if not bool(bad.any()):
        return f"its clean loss is {float(loss)}"
    rows, cols = torch.nonzero(bad, as_tuple=True)
    receivers = sorted({graph.receiver_kinds[c] for c in cols.tolist()})
    sources = sorted({graph.source_kinds[r] for r in rows.tolist()})
    first = f"{graph.sources[int(rows[0])]}->{graph.receivers[int(cols[0])]}"
    return (f"{int(bad.sum())} of {graph.n_edges} scores are NaN or inf, on edges into {', '.join(receivers)} "
            f"receivers from {', '.join(sources)} sources (first {first})")


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
