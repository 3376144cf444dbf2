"""Named choices: the fixed vocabularies of circuitdiff as string enums.

Each is a ``str`` enum, so a member *is* its string: ``Level.HEAD == "head"``,
``f"{Level.HEAD}"`` is ``"head"`` and ``json.dumps(Level.HEAD)`` writes ``"head"``.
Functions accept either spelling; ``Choice.parse`` turns one into the member or raises
an :class:`~circuitdiff.errors.UnknownNameError` that lists the valid values:

    >>> Level.parse("head") is Level.HEAD
    True
"""

from __future__ import annotations

import enum
from typing import TypeVar

from circuitdiff.errors import UnknownNameError

__all__ = ["Choice", "Level", "SourceKind", "ReceiverKind", "GroupKind", "InterventionName", "NonFinitePolicy"]


_C = TypeVar("_C", bound="Choice")


class _Label:
    """``Choice.label``: what a choice is called in messages (a descriptor, so not an enum member)."""

    def __get__(self, member: object, owner: type) -> str:
        return _LABELS.get(owner.__name__, owner.__name__)


class Choice(str, enum.Enum):
    """Base of the named choices: members are strings; :meth:`parse` accepts the member or its string.

    (A ``str`` mixin rather than :class:`enum.StrEnum`, which needs Python 3.11.) Messages
    name each subclass by its ``label`` (e.g. ``"graph level"``).
    """

    label = _Label()

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls: type[_C], value: object) -> _C:
        """The member named by ``value`` (a member or its string).

        Raises:
            UnknownNameError: ``value`` names no member; the message lists the valid values.
        """
        try:
            return cls(value)
        except ValueError:
            raise UnknownNameError(f"unknown {cls.label} {value!r}; valid: {', '.join(m.value for m in cls)}.") from None


class Level(Choice):
    """The graph granularity: ``head`` (a source per attention head) or ``layer`` (one per attention layer, its coarsening)."""


    HEAD = "head"
    LAYER = "layer"


class SourceKind(Choice):
    """What writes a source's output into the residual stream: the embeddings, an attention head or layer, an MLP."""


    INPUT = "input"
    ATTN = "attn"
    MLP = "mlp"


class ReceiverKind(Choice):
    """Which input reads the residual stream: a query, key or value input, an MLP input, or the final norm (logits)."""


    Q = "q"
    K = "k"
    V = "v"
    MLP = "mlp"
    LOGITS = "logits"


class GroupKind(Choice):
    """A :class:`~circuitdiff.graph.ReceiverGroup`: a layer's q, k and v receivers (``attn``), its MLP input, or the logits."""


    ATTN = "attn"
    MLP = "mlp"
    LOGITS = "logits"


class InterventionName(Choice):
    """What an ablated source's output is replaced with (see :mod:`circuitdiff.engine.interventions`)."""


    ZERO = "zero"
    PATCHING = "patching"
    MEAN = "mean"
    MEAN_POSITIONAL = "mean-positional"


class NonFinitePolicy(Choice):
    """What a run does with a NaN or infinite score: stop (``error``) or leave the sample out (``drop``)."""


    ERROR = "error"
    DROP = "drop"


# What each choice is called in messages ("unknown graph level 'x'; valid: head, layer.").
_LABELS: dict[str, str] = {
    "Level": "graph level",
    "SourceKind": "source kind",
    "ReceiverKind": "receiver kind",
    "GroupKind": "receiver group kind",
    "InterventionName": "intervention",
    "NonFinitePolicy": "non-finite policy",
}
