"""Scorers: methods that turn a batch into per-sample edge scores.

A scorer has a ``name`` and a method

    score_batch(context: ScoringContext, batch: Batch, batch_index: int)
        -> (scores [batch, n_sources, n_receivers], losses [batch])

returning float32 per-sample scores (structural zeros outside ``graph.edge_mask``),
each estimating ``objective(edge ablated) - objective(clean)`` for its sample, and
the clean per-sample objective values. Look one up with :func:`get`.
"""

from __future__ import annotations

from typing import Callable

from circuitdiff.errors import UnknownNameError
from circuitdiff.scorers.base import Scorer, ScoringContext
from circuitdiff.scorers.eap import EAP

__all__ = ["Scorer", "ScoringContext", "EAP", "get", "available"]

_REGISTRY: dict[str, Callable[[], Scorer]] = {"eap": EAP}


def available() -> list[str]:
    """Names of the scorers :func:`get` knows."""
    return sorted(_REGISTRY)


def get(name: str) -> Scorer:
    """A new scorer instance by name, e.g. ``get("eap")``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UnknownNameError(f"unknown method {name!r}; available: {', '.join(available())}.") from None
