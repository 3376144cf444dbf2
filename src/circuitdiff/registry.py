"""Name -> factory registries, filled in-process and by installed plugin packages.

One :class:`Registry` each holds the scorers (:mod:`circuitdiff.scorers`, entry-point
group ``circuitdiff.scorers``) and the objectives (:mod:`circuitdiff.objectives`, group
``circuitdiff.objectives``). A name comes from one of two places:

- ``register(name, factory)`` (or ``@register(name)`` on a class or function): the
  built-ins and anything registered in the running process;
- an entry point ``name = "module:attribute"`` in the group, declared by an installed
  distribution. Entry points are read at every lookup (so a package installed after
  ``import circuitdiff`` is found) and imported only when their name is requested.

Registered names win: an entry point with the name of a built-in is ignored, with a
warning. Among entry points of one name, the first distribution on ``sys.path`` wins.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Any, Callable, TypeVar, overload

from circuitdiff.errors import ArgumentTypeError, DuplicateNameError, PluginLoadError, UnknownNameError

__all__ = ["Registry"]

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Factories by name; ``get(name, **options)`` returns ``factory(**options)``.

    Args:
        kind: what the names are, as error messages say it (``"method"``).
        group: the entry-point group searched for plugins.
        hint: appended to the unknown-name message (``", or pass ..."``).
    """

    def __init__(self, kind: str, group: str, hint: str = "") -> None:
        self.kind, self.group, self.hint = kind, group, hint
        self._factories: dict[str, Callable[..., Any]] = {}
        self._warned: set[str] = set()

    @overload
    def register(self, name: str, factory: None = None, *, replace: bool = False) -> Callable[[F], F]: ...
    @overload
    def register(self, name: str, factory: F, *, replace: bool = False) -> F: ...

    def register(self, name: str, factory: Callable[..., Any] | None = None, *, replace: bool = False) -> Any:
        """Register ``factory`` under ``name``; as ``@register(name)`` it decorates a class
        or function and returns it unchanged.

        Raises:
            DuplicateNameError: ``name`` is taken by another factory and ``replace`` is False.
        """
        if factory is None:
            return lambda f: self.register(name, f, replace=replace)
        if not isinstance(name, str) or not name.strip():
            raise ArgumentTypeError(f"a {self.kind} name must be a non-empty string; got {name!r}.")
        if not callable(factory):
            raise ArgumentTypeError(f"{self.kind} {name!r}: the factory must be a class or function; got {factory!r}.")
        taken = self._factories.get(name)
        if taken is not None and taken is not factory and not replace:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is already registered ({_describe(taken)}); choose another "
                "name, or pass replace=True to override it."
            )
        self._factories[name] = factory
        return factory

    def unregister(self, name: str) -> None:
        """Forget an in-process registration (entry points stay visible)."""
        self._factories.pop(name, None)

    def available(self) -> list[str]:
        """Every known name, sorted; plugins are listed without being imported."""
        return sorted({*self._factories, *self._entry_points()})

    def get(self, name: str, **options: Any) -> Any:
        """A new instance: ``factory(**options)`` of the factory registered as ``name``.

        Raises:
            UnknownNameError: no such name (the message lists the available ones).
            PluginLoadError: the plugin providing ``name`` failed to import.
        """
        factory = self._factories.get(name)
        if factory is None:
            entry_point = self._entry_points().get(name)
            if entry_point is None:
                raise UnknownNameError(
                    f"unknown {self.kind} {name!r}; available: {', '.join(self.available()) or 'none'}{self.hint}."
                )
            factory = self._load(entry_point)
        return factory(**options)

    def _entry_points(self) -> dict[str, metadata.EntryPoint]:
        found: dict[str, metadata.EntryPoint] = {}
        for entry_point in metadata.entry_points(group=self.group):
            taken = self._factories.get(entry_point.name)
            # A plugin may also register itself on import; only a foreign name clash is news.
            if taken is not None and getattr(taken, "__module__", None) != entry_point.module:
                if entry_point.name not in self._warned:
                    self._warned.add(entry_point.name)
                    warnings.warn(
                        f"{_origin(entry_point)} is ignored: {self.kind} {entry_point.name!r} is "
                        f"already registered ({_describe(taken)}). Rename the entry point.",
                        stacklevel=3,
                    )
                continue
            found.setdefault(entry_point.name, entry_point)
        return found

    def _load(self, entry_point: metadata.EntryPoint) -> Callable[..., Any]:
        try:
            factory = entry_point.load()
        except Exception as error:
            raise PluginLoadError(
                f"{self.kind} {entry_point.name!r}: {_origin(entry_point)} failed to load: "
                f"{type(error).__name__}: {error}. Fix or uninstall that package."
            ) from error
        if not callable(factory):
            raise PluginLoadError(f"{self.kind} {entry_point.name!r}: {_origin(entry_point)} is not callable.")
        return factory


def _origin(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    where = f"distribution {dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"entry point '{entry_point.name} = {entry_point.value}' (group {entry_point.group!r}, {where})"


def _describe(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
