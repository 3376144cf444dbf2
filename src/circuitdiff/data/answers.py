"""Final answers of math solutions: extract them and check them against a reference (the ``"boxed"`` grader).

:func:`extract_answer` takes the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``),
braces balanced (:func:`last_boxed`), else the last number in the text. :func:`answers_match`
compares two answers numerically when both parse as numbers (integers, decimals, thousands
separators, ``a/b``, ``\\frac{a}{b}``, percentages), with a tolerance, and otherwise as
normalised strings (LaTeX spacing, ``\\text{}``, ``$``, ``\\left``/``\\right``, degree signs,
a leading ``x =``, trailing unit words, parentheses around a choice letter, case and
whitespace removed). There is no symbolic equivalence: ``\\sqrt{8}`` is not ``2\\sqrt{2}``.
"""

from __future__ import annotations

import math
import re

__all__ = ["extract_answer", "last_boxed", "answers_match", "to_number", "normalize"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FRACTION = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def extract_answer(text: str) -> str | None:
    """The final answer in a model's output, or None if there is none.

    The last ``\\boxed{...}``/``\\fbox{...}`` wins (nested braces allowed); without one,
    the last number (``"#### 72"``, ``"the answer is 1,234.5."``).
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (braces balanced), or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def normalize(answer: str) -> str:
    """A canonical string form: LaTeX decoration, ``$``, degree signs, a leading ``x =``, trailing
    unit words, parentheses around a choice letter, spaces and case removed."""
    s = answer.replace("\u2212", "-").strip()
    s = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r" \1", s)  # "18\\text{ dollars}" keeps its space
    s = re.sub(r"\\(?:left|right|!|,|;|:|\s)", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\u00b0", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s.strip())  # "x = 3"
    s = re.sub(r"(?<=\d)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?$", "", s)  # "18 dollars", not "2 x"
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return re.sub(r"^\(([a-z])\)$", r"\1", s)  # "(B)" is choice "b"


def to_number(answer: str) -> float | None:
    """The value of a numeric answer (``"1,234"``, ``"-0.5"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"50%"``), or None."""
    s = normalize(answer).rstrip("%")
    fraction = _FRACTION.match(s) or re.match(r"^([-+]?[\d.,]+)/([-+]?[\d.,]+)$", s)
    if fraction:
        numerator, denominator = (to_number(part) for part in fraction.groups())
        if numerator is None or denominator in (None, 0.0):
            return None
        return numerator / denominator
    if not re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+", s):
        return None
    return float(s.replace(",", ""))


def answers_match(predicted: str | None, reference: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether ``predicted`` equals ``reference``: numerically within tolerance, else as normalised strings."""
    if predicted is None:
        return False
    a, b = to_number(predicted), to_number(str(reference))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize(predicted) == normalize(str(reference))
