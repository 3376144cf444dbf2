"""Every public name has a docstring (the API reference renders them).

Checked: every name in ``circuitdiff.__all__``; every name in the ``__all__`` of the
public submodules listed there (``scorers``, ``metrics``, ...) and of the modules the API
reference renders (``::: circuitdiff.x`` in ``docs/reference/*.md``), and those modules
themselves; every public method and property of every class among them.

- Modules, classes and functions need their own docstring. A class's docstring must be
  written in its body: the signature a dataclass generates when there is none, or the
  docstring of a builtin base (``Exception``, ``tuple``), does not count. A method may
  inherit its docstring from a circuitdiff base class.
- Constants (``IGNORE``, ``SUPPORTED_ARCHITECTURES``, registries) have their type's
  docstring at runtime, so they need a ``#:`` comment on the line(s) right above their
  assignment in the module that defines them (what ``docs/_ext/griffe_sphinx_roles.py`` gives
  mkdocstrings as their docstring), or a string literal right below it (griffe's own
  attribute docstring).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import textwrap
import types
from pathlib import Path

import circuitdiff

#: The API reference pages; the modules they render are checked too.
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
#: Members of a class that are methods or properties (anything else is data).
_ROUTINES = (types.FunctionType, classmethod, staticmethod, property, functools.cached_property)


def _reference_modules() -> list[str]:
    """The modules the API reference renders (``::: circuitdiff.x`` in ``docs/reference/*.md``)."""
    return sorted({line.split()[1] for page in REFERENCE.glob("*.md") for line in page.read_text().splitlines()
                   if line.startswith("::: circuitdiff")})


def _public_objects() -> list[tuple[str, str, object]]:
    """``(module name, name, object)`` for every name to check, the modules themselves included."""
    found = [("circuitdiff", name, getattr(circuitdiff, name)) for name in circuitdiff.__all__]
    modules = {value for _, _, value in found if isinstance(value, types.ModuleType)}
    modules |= {importlib.import_module(name) for name in _reference_modules()}
    for module in sorted(modules, key=lambda m: m.__name__):
        parent, _, name = module.__name__.rpartition(".")
        found.append((parent, name, module))
        found += [(module.__name__, member, getattr(module, member)) for member in getattr(module, "__all__", [])]
    return found


def _own_docstring(value: object) -> str | None:
    """The docstring written in the source of a class or function (None if none or no source)."""
    try:
        source = textwrap.dedent(inspect.getsource(value))
    except (OSError, TypeError):
        return inspect.getdoc(value) if getattr(value, "__doc__", None) else None
    node = ast.parse(source).body[0]
    return ast.get_docstring(node) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _assignment(module_name: str, name: str, seen: frozenset = frozenset()) -> tuple[Path, ast.stmt] | None:
    """The module-level statement that assigns ``name``, following ``from ... import name`` re-exports
    and the package's lazy exports."""
    if (module_name, name) in seen:
        return None
    module = importlib.import_module(module_name)
    lazy = getattr(module, "_EXPORTS", {})  # the package's names imported on first use
    if name in lazy:
        return _assignment(lazy[name], name, seen | {(module_name, name)})
    path = Path(module.__file__)
    tree = ast.parse(path.read_text())
    for statement in tree.body:
        targets: list[ast.expr] = []
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return path, statement
        if isinstance(statement, ast.ImportFrom) and any((a.asname or a.name) == name for a in statement.names):
            original = next(a.name for a in statement.names if (a.asname or a.name) == name)
            package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
            source = importlib.util.resolve_name("." * statement.level + (statement.module or ""), package) \
                if statement.level else statement.module
            return _assignment(source, original, seen | {(module_name, name)})
    return None


def _constant_is_documented(module_name: str, name: str) -> bool:
    """A ``#:`` comment right above the assignment, or a string literal right below it."""
    found = _assignment(module_name, name)
    if found is None:
        return False
    path, statement = found
    lines = path.read_text().splitlines()
    if statement.lineno >= 2 and lines[statement.lineno - 2].strip().startswith("#:"):
        return True
    tree = ast.parse(path.read_text())
    following = [s for s in tree.body if s.lineno > statement.end_lineno]
    return bool(following) and isinstance(following[0], ast.Expr) \
        and isinstance(following[0].value, ast.Constant) and isinstance(following[0].value.value, str)


def _member_doc(cls: type, name: str) -> str | None:
    """The docstring of a method or property, its own or one from a circuitdiff base class."""
    for klass in cls.__mro__:
        member = klass.__dict__.get(name)
        if member is None:
            continue
        target = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        doc = target.__doc__
        if doc and doc.strip() and klass.__module__.startswith("circuitdiff"):
            return doc
    return None


def _undocumented() -> list[str]:
    missing: list[str] = []
    checked: set[int] = set()
    for module_name, name, value in _public_objects():
        label = f"{module_name}.{name}"
        if id(value) in checked and not isinstance(value, (int, float, str, tuple, frozenset)):
            continue
        checked.add(id(value))
        if isinstance(value, types.ModuleType):
            if not (value.__doc__ or "").strip():
                missing.append(f"{label} (module docstring)")
        elif inspect.isclass(value) or inspect.isroutine(value):
            function = inspect.unwrap(value) if inspect.isroutine(value) else value
            if not (_own_docstring(function) or "").strip():
                missing.append(f"{label} ({'class' if inspect.isclass(value) else 'function'} docstring)")
            if inspect.isclass(value) and value.__module__.startswith("circuitdiff"):
                for member, attribute in vars(value).items():
                    if not member.startswith("_") and isinstance(attribute, _ROUTINES) \
                            and not _member_doc(value, member):
                        missing.append(f"{label}.{member} (method or property docstring)")
        elif not _constant_is_documented(module_name, name):
            missing.append(f"{label} (constant: no #: comment above its assignment)")
    return missing


def test_every_public_name_has_a_docstring():
    missing = _undocumented()
    assert not missing, f"{len(missing)} public names without a docstring:\n  " + "\n  ".join(missing)


def test_the_check_catches_what_it_should(tmp_path, monkeypatch):
    """The rules themselves: dataclass signatures, builtin docstrings and bare constants fail."""
    (tmp_path / "docstring_probe.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        #: Documented.
        DOCUMENTED = 1
        BELOW = (1, 2)
        """Documented by griffe's own rule."""
        BARE = 3


        @dataclass
        class Bare:
            x: int


        class Error(Exception):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("docstring_probe")
    assert probe.Bare.__doc__ and not _own_docstring(probe.Bare)  # the dataclass signature is not a docstring
    assert inspect.getdoc(probe.Error) and not _own_docstring(probe.Error)  # nor is Exception's
    assert _constant_is_documented("docstring_probe", "DOCUMENTED")
    assert _constant_is_documented("docstring_probe", "BELOW")
    assert not _constant_is_documented("docstring_probe", "BARE")
    assert _own_docstring(circuitdiff.EdgeScores)
    assert _constant_is_documented("circuitdiff", "IGNORE")  # re-exported twice, defined in data/batches.py
