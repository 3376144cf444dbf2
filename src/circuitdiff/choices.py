"""Named choices: the fixed vocabularies of circuitdiff as string enums.

Each is an :class:`enum.StrEnum`, so a member *is* its string: ``Level.HEAD == "head"``,
``f"{Level.HEAD}"`` is ``"head"`` and ``json.dumps(Level.HEAD)`` writes ``"head"``.
Functions accept either spelling; ``Choice.parse`` turns one into the member or raises
an :class:`~circuitdiff.errors.UnknownNameError` that lists the valid values:

    >>> Level.parse("head") is Level.HEAD
    True
"""

from __future__ import annotations

import enum
from typing import Self

from circuitdiff.errors import UnknownNameError

__all__ = ["Choice", "Level", "SourceKind", "ReceiverKind", "GroupKind", "InterventionName", "NonFinitePolicy"]


class Choice(enum.StrEnum):
    """Base of the named choices: members are strings; :meth:`parse` accepts the member or its string.

    Each subclass names itself for messages in ``label`` (e.g. ``"graph level"``).
    """

    label: str

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member named by ``value`` (a member or its string).

        Raises:
            UnknownNameError: ``value`` names no member; the message lists the valid values.
        """
        try:
            return cls(value)
        except ValueError:
            raise UnknownNameError(f"unknown {cls.label} {value!r}; valid: {', '.join(cls)}.") from None


class Level(Choice):
    """The graph granularity: ``head`` (a source per attention head) or ``layer`` (one per attention layer, its coarsening)."""

    label = enum.nonmember("graph level")

    HEAD = "head"
    LAYER = "layer"


class SourceKind(Choice):
    """What writes a source's output into the residual stream: the embeddings, an attention head or layer, an MLP."""

    label = enum.nonmember("source kind")

    INPUT = "input"
    ATTN = "attn"
    MLP = "mlp"


class ReceiverKind(Choice):
    """Which input reads the residual stream: a query, key or value input, an MLP input, or the final norm (logits)."""

    label = enum.nonmember("receiver kind")

    Q = "q"
    K = "k"
    V = "v"
    MLP = "mlp"
    LOGITS = "logits"


class GroupKind(Choice):
    """A :class:`~circuitdiff.graph.ReceiverGroup`: a layer's q, k and v receivers (``attn``), its MLP input, or the logits."""

    label = enum.nonmember("receiver group kind")

    ATTN = "attn"
    MLP = "mlp"
    LOGITS = "logits"


class InterventionName(Choice):
    """What an ablated source's output is replaced with (see :mod:`circuitdiff.engine.interventions`)."""

    label = enum.nonmember("intervention")

    ZERO = "zero"
    PATCHING = "patching"
    MEAN = "mean"
    MEAN_POSITIONAL = "mean-positional"


class NonFinitePolicy(Choice):
    """What a run does with a NaN or infinite score: stop (``error``) or leave the sample out (``drop``)."""

    label = enum.nonmember("non-finite policy")

    ERROR = "error"
    DROP = "drop"
