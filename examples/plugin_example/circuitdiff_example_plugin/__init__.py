"""An example circuitdiff plugin: one scorer and one objective.

Installed (``pip install examples/plugin_example``), it makes
``cd.attribute(..., scorer="eap-abs", objective="answer_prob")`` work without any
import: circuitdiff finds both through the entry points in ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

import circuitdiff as cd
from circuitdiff.engine import AttributionRun
from circuitdiff.scorers import EAP

__all__ = ["AbsEAP", "AnswerProb"]


@dataclass(frozen=True)
class AbsEAP:
    """EAP magnitudes: ``|EAP score|`` per sample and edge.

    The mean over samples is then the mean *absolute* effect, so an edge that helps
    some samples and hurts others as much still stands out (its signed mean is ~0).
    Scores are magnitudes, no longer signed estimates of
    ``objective(ablated) - objective(clean)``; files record ``method = "eap-abs"``.
    """

    name: ClassVar[str] = "eap-abs"

    def score_batch(self, run: AttributionRun, batch: cd.Batch, batch_index: int) -> tuple[Tensor, Tensor]:
        """EAP's per-sample scores, made absolute; the clean losses unchanged."""
        scores, losses = EAP().score_batch(run, batch, batch_index)
        return scores.abs(), losses  # |0| = 0: structural zeros stay zero


class AnswerProb:
    """Minus the mean probability of the labelled answer tokens (lower is better)."""

    name = "answer_prob"

    def __call__(self, logits: Tensor, batch: cd.Batch) -> Tensor:
        """One loss per sample: ``-mean over labelled positions of p(label)``."""
        if batch.labels is None:
            raise cd.DataError("answer_prob needs labels: make_batches(tokenizer, prompts, answers).")
        selected = batch.labels != cd.IGNORE
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits.to(dtype), dim=-1)
        picked = probs.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(picked * selected).sum(1) / selected.sum(1)
