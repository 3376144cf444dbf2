"""MkDocs hooks for the docs site (loaded by ``mkdocs.yml``'s ``hooks:``).

GitHub-flavoured Markdown needs ``\\|`` for a pipe inside a table cell, even inside a code
span (`` `\\|W(k)\\|` ``), and shows ``|``; Python-Markdown keeps the backslash inside code
spans. So the pages stay correct on GitHub, and the site drops that backslash here: only in
``<code>`` inside table cells.
"""

from __future__ import annotations

import re
from typing import Any

_CELL = re.compile(r"<(td|th)([^>]*)>(.*?)</\1>", re.DOTALL)
_CODE = re.compile(r"<code>(.*?)</code>", re.DOTALL)


def _unescape_pipes(cell: re.Match[str]) -> str:
    body = _CODE.sub(lambda code: "<code>" + code[1].replace("\\|", "|") + "</code>", cell[3])
    return f"<{cell[1]}{cell[2]}>{body}</{cell[1]}>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _CELL.sub(_unescape_pipes, html)
