"""Runtime checks of the jaxtyping shape annotations at the public boundary.

:func:`shape_checked` wraps a function, method or dataclass. While checks are on, every
argument whose annotation involves a jaxtyping array (``Float[Tensor, "n_sources
n_receivers"]``, ``Int[Tensor, "batch pos"] | None``, ...) and the return value are
checked against their annotations, rank, sizes and dtype; a dimension name stands for
one size across all of them within one call. A dataclass has its annotated fields
checked after ``__init__`` (and ``__post_init__``), so its own validation and messages
come first. A failure raises :class:`~circuitdiff.errors.ShapeError` naming the
function, the argument, the annotation, the actual shape and dtype, and the arrays
checked before it in the same call. Arguments without array annotations are skipped.

Checks are off unless the environment variable ``CIRCUITDIFF_TYPECHECK`` is ``1``
when circuitdiff is imported (the test suite sets it), or :func:`enable` turns them on.
They are off by default, as they cost over 1% of an ``attribute`` call on the demo model:
about ten checks per batch take 0.7% of the call with batches of 8 x 32 tokens, 1.4% with
batches of one 8-token prompt, and the end-to-end medians differ by 1-4%
(``benchmarks/typecheck_overhead.py``; "Shape checks" in ``docs/concepts.md``).

How the check works (measured with jaxtyping 0.3.11, typeguard 4.6.1, beartype 0.23.1):

- ``jaxtyped(typechecker=typeguard.typechecked)`` and jaxtyping's import hook with
  ``"typeguard.typechecked"`` both fail with ``SyntaxError`` on any shape string with
  more than one dimension (``"batch pos d"``): typeguard 4 parses the string as a
  forward reference, at decoration or at import.
- ``typeguard.check_type(value, annotation)`` inside a jaxtyping context
  (``@jaxtyped(typechecker=None)`` or ``with jaxtyped("context")``) works: rank, dtype,
  and sizes shared by name across the checks in the context. Outside a context every
  ``check_type`` call stands alone, so a size mismatch between two arguments passes.
- ``jaxtyped(typechecker=beartype.beartype)`` works too, but checks every annotation,
  not only the arrays, and cannot be switched off after decoration.
- This module uses ``with jaxtyped("context")``: the same shape memo as the decorator,
  without its ``inspect.Signature.bind`` per call and without the note it adds to
  every exception raised inside the function.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from typing import Any, Callable, TypeVar

import typeguard
from jaxtyping import AbstractArray, jaxtyped

from circuitdiff.errors import ShapeError

__all__ = ["ENV_VAR", "shape_checked", "enable", "is_enabled"]

#: The environment variable read at import: ``1`` turns the checks on.
ENV_VAR = "CIRCUITDIFF_TYPECHECK"

_enabled = os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")

_T = TypeVar("_T")


def enable(on: bool = True) -> None:
    """Turn the checks of every :func:`shape_checked` function on (or off with ``on=False``)."""
    global _enabled
    _enabled = bool(on)


def is_enabled() -> bool:
    """Whether :func:`shape_checked` functions check their arguments now."""
    return _enabled


def shape_checked(target: _T) -> _T:
    """Check the jaxtyping annotations of ``target`` (a function, method or dataclass) while checks are on.

    Functions: the annotated arguments before the call, the return value after it.
    Dataclasses: the annotated fields after ``__init__``. Raises
    :class:`~circuitdiff.errors.ShapeError` on a mismatch.
    """
    if isinstance(target, type):
        return _checked_fields(target)  # type: ignore[return-value]
    return _checked_call(target)  # type: ignore[arg-type,return-value]


def _checked_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    positional = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    where = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _enabled:
            return fn(*args, **kwargs)
        hints = _array_hints(fn)
        seen: list[str] = []
        with jaxtyped("context"):
            for name, value in (*zip(positional, args), *kwargs.items()):
                if name in hints:
                    _check(where, f"argument {name!r}", value, hints[name], seen)
            result = fn(*args, **kwargs)
            if "return" in hints:
                _check(where, "the return value", result, hints["return"], seen)
        return result

    return wrapper


def _checked_fields(cls: type) -> type:
    init = cls.__init__
    where = f"{cls.__module__}.{cls.__qualname__}"

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _enabled:
            seen: list[str] = []
            with jaxtyped("context"):
                for name, hint in _array_hints(cls).items():
                    _check(where, f"field {name!r}", getattr(self, name), hint, seen)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@functools.cache
def _array_hints(target: Any) -> dict[str, Any]:
    """The resolved annotations of ``target`` that involve a jaxtyping array, by name (``"return"`` included)."""
    return {name: hint for name, hint in typing.get_type_hints(target).items() if _involves_array(hint)}


def _involves_array(hint: Any) -> bool:
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_involves_array(arg) for arg in typing.get_args(hint))


def _check(where: str, what: str, value: Any, hint: Any, seen: list[str]) -> None:
    """``typeguard.check_type`` in the caller's jaxtyping context; ShapeError naming everything on failure."""
    if value is None and type(None) in typing.get_args(hint):
        return  # an optional array left out: typeguard would first try (and fail) the array type
    try:
        typeguard.check_type(value, hint)
    except typeguard.TypeCheckError:
        expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("jaxtyping.", "")
        before = (f" Checked before it in this call (a dimension name stands for one size across them): "
                  f"{', '.join(seen)}." if seen else "")
        raise ShapeError(f"{where}: {what} must be {expected}; got {_describe(value)}.{before}") from None
    if hasattr(value, "shape"):
        seen.append(f"{what} {_describe(value)}")


def _describe(value: Any) -> str:
    """E.g. ``"float32 (2, 3, 4)"`` for an array, the type name otherwise."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__
