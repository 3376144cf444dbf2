"""Exceptions raised by circuitdiff.

Every error names the cause and the fix. All of them derive from
:class:`CircuitDiffError`, so ``except cd.CircuitDiffError`` catches any failure the
library raises on purpose; the subclasses also derive from the matching builtin
(``ValueError``, ``TypeError``, ``RuntimeError``) so generic handlers keep working.
``MissingDependencyError.importing`` imports an optional dependency or raises the error
that says what to install.

Bad arguments raise :class:`ArgumentError` (a ``ValueError``), or
:class:`ArgumentTypeError` (also a ``TypeError``) when the argument has the wrong type.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CircuitDiffError",
    "ArgumentError",
    "ArgumentTypeError",
    "UnknownNameError",
    "UnsupportedModelError",
    "DataError",
    "NonFiniteError",
    "ObjectiveError",
    "IdentityMismatchError",
    "RunLockedError",
    "FileFormatError",
    "MissingPathError",
    "DuplicateNameError",
    "PluginLoadError",
    "MissingDependencyError",
    "MemoryPlanError",
    "DistributedError",
    "ShapeError",
]


class CircuitDiffError(Exception):
    """Base class of every error circuitdiff raises on purpose."""


class ArgumentError(CircuitDiffError, ValueError):
    """An argument has a value the function cannot use (out of range, inconsistent with another)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class UnknownNameError(ArgumentError):
    """A scorer, intervention, objective, graph level or other name is not known."""


class UnsupportedModelError(CircuitDiffError, TypeError):
    """The model cannot be attributed (wrong kind of bridge, unvalidated architecture)."""


class DataError(CircuitDiffError, ValueError):
    """Batches, spans, prompts or scores are malformed (empty data, length mismatch, bad span)."""


class NonFiniteError(DataError):
    """A score, loss or metric input is NaN or infinite; the message names where."""


class ObjectiveError(CircuitDiffError, ValueError):
    """The objective returned something unusable (wrong shape, NaN or inf)."""


class IdentityMismatchError(DataError):
    """Stored results (shards, generations, a lock) were produced by another run; the message names what changed."""


class RunLockedError(CircuitDiffError, RuntimeError):
    """Another process is writing into the same run directory."""


class FileFormatError(CircuitDiffError, ValueError):
    """A scores or cache file is corrupt, tampered with, or of an unsupported format version."""


class MissingPathError(CircuitDiffError, FileNotFoundError):
    """A file or directory the call needs does not exist (also a ``FileNotFoundError``)."""


class DuplicateNameError(CircuitDiffError, ValueError):
    """A scorer or objective name is registered twice (pass ``replace=True`` to override on purpose)."""


class PluginLoadError(CircuitDiffError, ImportError):
    """A plugin's entry point could not be imported; the original exception is chained."""


class MissingDependencyError(CircuitDiffError, ImportError):
    """An optional dependency is not installed; the message says what to install."""

    @classmethod
    def importing(cls, module: str, needed_for: str, fix: str) -> Any:
        """``import module`` (a dotted name), or this error:
        ``"{needed_for} needs {module}, which is not installed ({error}): {fix}"``."""
        try:
            return importlib.import_module(module)
        except ImportError as error:
            raise cls(f"{needed_for} needs {module}, which is not installed ({error}): {fix}") from error


class MemoryPlanError(DataError):
    """Even batch size 1 does not fit in the memory given; the message says what would."""


class DistributedError(CircuitDiffError, RuntimeError):
    """A torchrun process group is misconfigured, or another process (a rank, a device worker) failed."""


class ShapeError(ArgumentError):
    """An array's shape or dtype contradicts its annotation (see :mod:`circuitdiff.typecheck`); the message names both."""
