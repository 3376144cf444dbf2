"""Objectives: the per-sample losses whose change edge scores estimate.

An objective is any callable

    objective(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, "batch"]

returning one loss per sample, oriented so that **lower is better** (a "higher is
better" metric such as a logit difference is negated). Scores then estimate
``objective(edge ablated) - objective(clean)`` per sample: positive means the edge
helps. An objective that compares against the clean run's output sets the attribute
``needs_clean_logits = True`` and is called as ``objective(logits, batch,
clean_logits=...)``; the clean logits are detached.

Objectives must be differentiable in ``logits`` and must not edit them in place.

``attribute(objective=...)`` takes a callable or a name: the built-ins
(``answer_nll``, ``logit_diff``, ``kl_to_clean``), names registered with
``@register("name")`` on a class or function that takes no arguments and returns an
objective, and names declared by installed packages in the entry-point group
``circuitdiff.objectives`` (see ``docs/plugins.md``). :func:`available` lists them.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import IGNORE, Batch
from circuitdiff.errors import ArgumentTypeError, DataError, ObjectiveError
from circuitdiff.registry import Registry
from circuitdiff.typecheck import shape_checked

__all__ = [
    "Objective", "answer_nll", "logit_diff", "kl_to_clean", "register", "resolve", "available", "registry",
    "evaluate", "name_of",
]


class Objective(Protocol):
    """What ``attribute`` calls: per-sample losses ``[batch]`` from logits."""

    def __call__(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, "batch"]: ...


def _span(logits: Tensor, batch: Batch, who: str) -> tuple[Tensor, Tensor, Tensor]:
    """Labelled positions: (mask [batch, pos], sample index per position, counts [batch])."""
    if batch.labels is None:
        raise DataError(
            f"{who} needs labels (the loss span); build batches with "
            "make_batches(tokenizer, prompts, answers=...) or pass Batch(labels=...)."
        )
    selected = batch.labels != IGNORE
    counts = selected.sum(1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise DataError(f"{who}: samples {empty} have an empty loss span (no labelled position).")
    labels = batch.labels[selected]
    if bool((labels < 0).any()) or bool((labels >= logits.shape[-1]).any()):
        raise DataError(
            f"{who}: labels must be token ids in [0, {logits.shape[-1]}) or {IGNORE}; "
            f"got values in [{int(labels.min())}, {int(labels.max())}]."
        )
    rows = torch.nonzero(selected, as_tuple=True)[0]
    return selected, rows, counts


def _accumulation_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _mean_per_sample(values: Tensor, rows: Tensor, counts: Tensor) -> Tensor:
    total = torch.zeros(counts.shape[0], dtype=values.dtype, device=values.device)
    return total.index_add(0, rows, values) / counts.to(values.dtype)


class AnswerNLL:
    """Mean negative log-likelihood of the labelled tokens, per sample.

    With the model's own (truncated) answer as labels this is the paper's
    "self-entropy" objective. Computed in float32 (float64 for float64 models) on the
    labelled positions only.
    """

    name = "answer_nll"

    @shape_checked
    def __call__(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, "batch"]:
        selected, rows, counts = _span(logits, batch, "answer_nll")
        log_probs = torch.log_softmax(logits[selected].to(_accumulation_dtype(logits)), dim=-1)
        nll = -log_probs.gather(1, batch.labels[selected][:, None]).squeeze(1)
        return _mean_per_sample(nll, rows, counts)


class LogitDiff:
    """Negated mean logit difference ``-(logit[label] - logit[contrast_label])``.

    A loss: lower means the model prefers the labelled token more strongly.
    """

    name = "logit_diff"

    @shape_checked
    def __call__(self, logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Float[Tensor, "batch"]:
        selected, rows, counts = _span(logits, batch, "logit_diff")
        if batch.contrast_labels is None:
            raise DataError(
                "logit_diff needs contrast_labels: make_batches(..., answers=..., contrast_answers=...)."
            )
        picked = logits[selected].to(_accumulation_dtype(logits))
        good = picked.gather(1, batch.labels[selected][:, None]).squeeze(1)
        bad = picked.gather(1, batch.contrast_labels[selected][:, None]).squeeze(1)
        return -_mean_per_sample(good - bad, rows, counts)


class KLToClean:
    """KL(p_clean || p) per sample, averaged over the labelled positions.

    Without labels, the last real position of each sample is used. Note: at the clean
    point this loss and its gradient are exactly zero, so first-order EAP scores with
    it are all zero; it is meant for integrated-gradient and exact scorers.
    """

    name = "kl_to_clean"
    needs_clean_logits = True

    @shape_checked
    def __call__(
        self,
        logits: Float[Tensor, "batch pos vocab"],
        batch: Batch,
        clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
    ) -> Float[Tensor, "batch"]:
        if clean_logits is None:
            raise ObjectiveError("kl_to_clean must be called with clean_logits=...")
        if batch.labels is not None:
            selected, rows, counts = _span(logits, batch, "kl_to_clean")
        else:
            selected = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=logits.device)
            selected[torch.arange(batch.size), batch.lengths - 1] = True
            rows = torch.arange(batch.size, device=logits.device)
            counts = torch.ones(batch.size, dtype=torch.long, device=logits.device)
        dtype = _accumulation_dtype(logits)
        log_p = torch.log_softmax(logits[selected].to(dtype), dim=-1)
        log_q = torch.log_softmax(clean_logits[selected].to(dtype), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        return _mean_per_sample(kl, rows, counts)


def answer_nll() -> AnswerNLL:
    """Mean NLL of the labelled answer tokens per sample (the paper's self-entropy)."""
    return AnswerNLL()


def logit_diff() -> LogitDiff:
    """Negated logit difference between ``labels`` and ``contrast_labels``."""
    return LogitDiff()


def kl_to_clean() -> KLToClean:
    """KL divergence of the current output from the clean output."""
    return KLToClean()


#: The objective registry: built-ins, ``@register("name")`` and entry points in the group
#: ``circuitdiff.objectives`` (see :mod:`circuitdiff.registry`). A factory takes no
#: arguments and returns an objective.
registry = Registry(
    "objective", "circuitdiff.objectives", hint=", or pass your own callable (see circuitdiff.objectives)"
)
register = registry.register
available = registry.available

register("answer_nll", answer_nll)
register("logit_diff", logit_diff)
register("kl_to_clean", kl_to_clean)


def resolve(objective: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A callable objective from a registered name (:func:`available`) or a callable."""
    if isinstance(objective, str):
        return registry.get(objective)
    if not callable(objective):
        raise ArgumentTypeError(f"objective must be a name or a callable, got {type(objective).__name__}.")
    return objective


def name_of(objective: Callable[..., Tensor]) -> str:
    """A readable name: the ``name`` attribute, else the function or class name."""
    return getattr(objective, "name", getattr(objective, "__name__", type(objective).__name__))


@shape_checked
def evaluate(
    objective: Callable[..., Tensor],
    logits: Float[Tensor, "batch pos vocab"],
    batch: Batch,
    batch_index: int,
    clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
) -> Float[Tensor, "batch"]:
    """Call ``objective`` and check its output: shape ``[batch]``, all finite.

    ``clean_logits`` defaults to ``logits.detach()`` (right when ``logits`` come from
    the clean run, as in EAP); scorers that evaluate elsewhere pass the clean ones.
    """
    if getattr(objective, "needs_clean_logits", False):
        reference = logits.detach() if clean_logits is None else clean_logits
        losses = objective(logits, batch, clean_logits=reference)
    else:
        losses = objective(logits, batch)
    name = name_of(objective)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch.size,):
        raise ObjectiveError(
            f"objective {name} must return a tensor of shape [batch] = ({batch.size},) with one "
            f"loss per sample; got {getattr(losses, 'shape', type(losses).__name__)}."
        )
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        raise ObjectiveError(
            f"objective {name} is NaN or inf in batch {batch_index} (samples "
            f"{torch.nonzero(bad).flatten().tolist()}). Check the inputs and labels of that batch; "
            "in bf16 try dtype=torch.float32."
        )
    return losses
