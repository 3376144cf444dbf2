"""Griffe extension for the docs site: render the docstrings' Sphinx-isms as Markdown.

circuitdiff's docstrings are Google style but use a few reStructuredText habits that
Markdown would print literally. Before mkdocstrings renders them, this extension

- turns roles (``:func:`circuitdiff.attribute```, ``:class:`~circuitdiff.graph.AttributionGraph```,
  ``:meth:`to_dict```, ...) into inline code linked to the object's API reference entry
  when there is one (an *optional* cross-reference: an unknown name stays plain code and
  never fails ``mkdocs build --strict``); ``~`` shows the last component only, as in Sphinx;
- turns a paragraph ending in ``::`` (a reStructuredText literal block) into one ending in ``:``
  (the indented block below it is already a Markdown code block);
- gives module and class attributes documented by ``#:`` comments above them (the
  Sphinx autodoc convention) those comments as their docstring.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
It changes nothing in the package itself.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(?P<target>[^`]+)`")
_LITERAL_BLOCK = re.compile(r"(?m)^(?P<text>.*\S)::[ \t]*$(?=\n[ \t]*\n[ \t]+\S)")


def _canonical(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj``'s scope, or ``target`` itself."""
    first, _, rest = target.partition(".")
    try:
        path = obj.resolve(first)
    except (griffe.NameResolutionError, KeyError, AttributeError):
        path = first
    if rest:
        path = f"{path}.{rest}"
    try:  # follow aliases (re-exports) to where the object is defined and rendered
        found = obj.modules_collection[path]
        path = found.final_target.path if found.is_alias else found.path
    except Exception:  # noqa: BLE001 (unknown or external name: keep the written path)
        pass
    return path


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        target = match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        identifier = _canonical(obj, target)
        return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'

    return _LITERAL_BLOCK.sub(r"\g<text>:", _ROLE.sub(role, text))


def _comment_docstring(attribute: griffe.Attribute) -> str | None:
    """The ``#:`` comment lines right above an attribute's assignment, if any."""
    module = attribute.module
    if attribute.lineno is None or not module.filepath:
        return None
    lines = module.lines
    comments: list[str] = []
    index = attribute.lineno - 2  # the line above, 0-based
    while index >= 0 and lines[index].strip().startswith("#:"):
        comments.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return "\n".join(comments) or None


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of a loaded package once it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._visit(pkg, loader)

    def _visit(self, obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
        if obj.is_attribute and obj.docstring is None:
            text = _comment_docstring(obj)
            if text:
                obj.docstring = griffe.Docstring(
                    text,
                    lineno=obj.lineno,
                    parent=obj,
                    parser=loader.docstring_parser,
                    parser_options=loader.docstring_options,
                )
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, loader)
