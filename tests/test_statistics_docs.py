"""The worked examples of docs/statistics.md print what the page shows (each ```python block followed by a ```text block)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).parent.parent / "docs" / "statistics.md"
EXAMPLES = re.findall(r"```python\n((?:(?!```).)*)```\n\n```text\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_worked_examples():
    assert len(EXAMPLES) == 4


@pytest.mark.parametrize("code, shown", EXAMPLES, ids=["compare", "robustness", "edge_tests", "cross_scoring"])
def test_worked_example_output_is_real(code, shown):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec("import torch\nimport circuitdiff as cd\n" + code, {})
    lines = printed.getvalue().splitlines()
    for line in shown.splitlines():
        if line != "...":
            assert line in lines, f"the page shows {line!r}, the code does not print it"
