"""What every scorer receives and returns."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Protocol

from jaxtyping import Float
from torch import Tensor

from circuitdiff.data import Batch
from circuitdiff.errors import ArgumentError

if TYPE_CHECKING:
    from circuitdiff.engine.run import AttributionRun

__all__ = ["Scorer", "ScoresAndLosses", "positive_int", "renamed_method"]

#: ``(scores [batch, n_sources, n_receivers], clean losses [batch])``.
ScoresAndLosses = tuple[Float[Tensor, "batch n_sources n_receivers"], Float[Tensor, "batch"]]


class Scorer(Protocol):
    """A scoring method (see :mod:`circuitdiff.scorers`).

    ``score_batch`` receives the bound :class:`~circuitdiff.engine.run.AttributionRun`
    (model, graph, objective, intervention; entered: eval mode, no parameter
    gradients), one batch on the run's device and its index in the dataset.
    """

    name: str

    def score_batch(self, run: "AttributionRun", batch: Batch, batch_index: int) -> ScoresAndLosses:
        """Per-sample scores (``objective(ablated) - objective(clean)``) and clean losses."""
        ...


def renamed_method(scorer: Any, method: Any, stacklevel: int = 2) -> Any:
    """``scorer``, or the deprecated alias ``method`` when given (with a DeprecationWarning).

    ``method=`` (and ``--method``) name the scorer one more release; ``stacklevel`` counts
    from the caller of this function, as :func:`warnings.warn` does.
    """
    if method is None:
        return scorer
    warnings.warn("method= is deprecated and will be removed in the next release; pass scorer= instead (the same "
                  "names and objects).", DeprecationWarning, stacklevel=stacklevel + 1)
    return method


def positive_int(scorer: str, option: str, value: object, allow_none: bool = False) -> None:
    """Refuse ``value`` unless it is a positive int (or None with ``allow_none``); names the scorer's option."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ArgumentError(f"{scorer}: {option} must be a positive integer{extra}; got {value!r}.")


def boolean(scorer: str, option: str, value: object, allow_none: bool = False) -> None:
    """Refuse ``value`` unless it is True or False (or None, with ``allow_none``); names the scorer's option."""
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise ArgumentError(f"{scorer}: {option} must be True or False{' or None' if allow_none else ''}; "
                            f"got {value!r}.")
