"""Exceptions raised by circuitdiff.

Every error names the cause and the fix. All of them derive from
:class:`CircuitDiffError`, so ``except cd.CircuitDiffError`` catches any user-facing
failure of the library; the subclasses also derive from the matching builtin
(``ValueError``, ``TypeError``) so generic handlers keep working.
"""

from __future__ import annotations


class CircuitDiffError(Exception):
    """Base class of every error circuitdiff raises on purpose."""


class UnsupportedModelError(CircuitDiffError, TypeError):
    """The model cannot be attributed (wrong kind of bridge, unvalidated architecture)."""


class DataError(CircuitDiffError, ValueError):
    """Batches, spans or prompts are malformed (empty data, length mismatch, bad span)."""


class ObjectiveError(CircuitDiffError, ValueError):
    """The objective returned something unusable (wrong shape, NaN or inf)."""


class UnknownNameError(CircuitDiffError, ValueError):
    """A method, intervention or objective name is not known."""


class FileFormatError(CircuitDiffError, ValueError):
    """A scores file is corrupt, tampered with, or of an unsupported format version."""


class DuplicateNameError(CircuitDiffError, ValueError):
    """A scorer or objective name is registered twice (pass ``replace=True`` to override on purpose)."""


class PluginLoadError(CircuitDiffError, ImportError):
    """A plugin's entry point could not be imported; the original exception is chained."""


class MemoryPlanError(DataError):
    """Even batch size 1 does not fit in the memory given; the message says what would."""
