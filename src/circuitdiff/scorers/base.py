"""What every scorer receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.graph import AttributionGraph
from circuitdiff.hooks import EdgeHooks
from circuitdiff.interventions import Intervention

__all__ = ["ScoringContext", "Scorer"]


@dataclass(frozen=True)
class ScoringContext:
    """Everything fixed for one ``attribute`` call.

    ``model`` is a validated TransformerBridge in eval mode with parameter gradients
    off; ``hooks`` is the shared hook machinery for (model, graph); ``objective``
    returns per-sample losses (see :mod:`circuitdiff.objectives`).
    """

    model: Any
    graph: AttributionGraph
    hooks: EdgeHooks
    objective: Callable[..., Tensor]
    intervention: Intervention


class Scorer(Protocol):
    """A scoring method (see :mod:`circuitdiff.scorers`)."""

    name: str

    def score_batch(
        self, context: ScoringContext, batch: Batch, batch_index: int
    ) -> tuple[Float[Tensor, "batch n_sources n_receivers"], Float[Tensor, "batch"]]:
        """Per-sample scores (``objective(ablated) - objective(clean)``) and clean losses."""
        ...
