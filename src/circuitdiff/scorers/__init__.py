"""Scorers: methods that turn a batch into per-sample edge scores.

A scorer has a ``name`` and a method

    score_batch(run: AttributionRun, batch: Batch, batch_index: int)
        -> (scores [batch, n_sources, n_receivers], losses [batch])

returning float32 per-sample scores (structural zeros outside ``graph.edge_mask``),
each estimating ``objective(edge ablated) - objective(clean)`` for its sample, and
the clean per-sample objective values. ``run`` is the bound
:class:`~circuitdiff.engine.run.AttributionRun` (``graph.bind(model, ...)``). Each
built-in scorer is a frozen dataclass of its options, validated at construction.
``docs/plugins.md`` describes the protocol in full, with an example plugin.

Scorers are looked up by name: :func:`get` (``get("eap")``, options go to the
constructor), :func:`available`. Names come from the built-ins below, from
``@register("name")`` on a scorer class or factory function, and from installed
packages declaring an entry point in the group ``circuitdiff.scorers``
(see :mod:`circuitdiff.registry`; built-in names win).
"""

from __future__ import annotations

from circuitdiff.registry import Registry
from circuitdiff.scorers.base import Scorer, ScoresAndLosses
from circuitdiff.scorers.eap import EAP
from circuitdiff.scorers.eap_ig import EAPIGActivations, EAPIGInputs
from circuitdiff.scorers.exact import Exact

__all__ = [
    "Scorer",
    "ScoresAndLosses",
    "EAP",
    "EAPIGInputs",
    "EAPIGActivations",
    "Exact",
    "register",
    "get",
    "available",
    "registry",
]

#: The scorer registry; ``register``, ``get`` and ``available`` are its methods.
registry = Registry("scorer", "circuitdiff.scorers", hint=", or pass a scorer object (see circuitdiff.scorers)")
register = registry.register
get = registry.get
available = registry.available

# Built-ins: one line each.
register("eap", EAP)
register("eap-ig-inputs", EAPIGInputs)
register("eap-ig-activations", EAPIGActivations)
register("exact", Exact)
