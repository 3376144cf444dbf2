"""What every scorer receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuitdiff import interventions, objectives
from circuitdiff.data import Batch
from circuitdiff.errors import DataError
from circuitdiff.graph import AttributionGraph
from circuitdiff.hooks import EdgeHooks
from circuitdiff.interventions import Intervention
from circuitdiff.models import describe_model

__all__ = ["ScoringContext", "Scorer", "make_context"]


@dataclass(frozen=True)
class ScoringContext:
    """Everything fixed for one ``attribute`` call.

    ``model`` is a validated TransformerBridge in eval mode with parameter gradients
    off; ``hooks`` is the shared hook machinery for (model, graph); ``objective``
    returns per-sample losses (see :mod:`circuitdiff.objectives`); ``progress`` says
    whether the user wants progress bars.
    """

    model: Any
    graph: AttributionGraph
    hooks: EdgeHooks
    objective: Callable[..., Tensor]
    intervention: Intervention
    progress: bool = True

    def progress_bar(self, total: int, desc: str) -> tqdm:
        """A transient progress bar for work inside one batch (closed by the caller).

        ``attribute`` already shows one bar over batches; a scorer whose batch takes
        many passes (integrated-gradient steps, exact ablation chunks) reports them
        here: ``bar.update(n)`` after each unit of work, ``bar.close()`` at the end.
        Disabled when the user passed ``progress=False``.
        """
        return tqdm(total=total, desc=desc, leave=False, disable=not self.progress)


class Scorer(Protocol):
    """A scoring method (see :mod:`circuitdiff.scorers`)."""

    name: str

    def score_batch(
        self, context: ScoringContext, batch: Batch, batch_index: int
    ) -> tuple[Float[Tensor, "batch n_sources n_receivers"], Float[Tensor, "batch"]]:
        """Per-sample scores (``objective(ablated) - objective(clean)``) and clean losses."""
        ...


def make_context(
    model: Any,
    graph: AttributionGraph,
    objective: str | Callable[..., Tensor],
    intervention: str | Intervention,
    reference_batches: Iterable[Batch] | None = None,
    progress: bool = True,
) -> ScoringContext:
    """Check that ``graph`` belongs to ``model`` and resolve the objective and intervention.

    Mean interventions run ``reference_batches`` through the model here.
    """
    spec = describe_model(model)
    if (graph.n_layers, graph.n_heads, graph.n_kv_heads, graph.parallel_blocks) != (
        spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.parallel_blocks
    ):
        raise DataError(
            f"the graph ({graph!r}) was not built for this model ({spec.n_layers} layers, "
            f"{spec.n_heads} heads, {spec.n_kv_heads} kv heads); use AttributionGraph.from_model(model)."
        )
    return ScoringContext(
        model=model,
        graph=graph,
        hooks=EdgeHooks(model, graph),
        objective=objectives.resolve(objective),
        intervention=interventions.resolve(intervention, model, graph, reference_batches),
        progress=progress,
    )
