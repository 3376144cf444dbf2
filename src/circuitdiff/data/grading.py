"""Graders: whether a model's output answers a question correctly.

A grader is any callable

    grader(output: str, reference: str) -> Grade(extracted: str | None, correct: bool)

taking the model's whole output text and the question's reference answer (as written in
the questions file, e.g. ``"72"`` or ``"\\frac{3}{4}"``), and returning the final answer
it found in the output (None if none) and whether that answer equals the reference.

Graders are looked up by name: :func:`get` (options go to the constructor),
:func:`available`, :func:`resolve` (a name or a callable). Built-ins:

- ``"math-verify"`` (the default, :class:`MathVerify`): Hugging Face's ``math-verify``
  parses both sides to SymPy and compares them symbolically;
- ``"boxed"`` (:class:`Boxed`): the hand checker of :mod:`circuitdiff.data.answers`, no
  dependency, numbers and normalised strings only.

Names also come from ``@register("name")`` on a grader class or factory, and from
installed packages declaring an entry point in the group ``circuitdiff.graders``
(see :mod:`circuitdiff.registry`; built-in names win).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from circuitdiff.data.answers import answers_match, extract_answer, last_boxed
from circuitdiff.errors import ArgumentError, ArgumentTypeError, MissingDependencyError
from circuitdiff.registry import Registry

__all__ = ["Grade", "Grader", "MathVerify", "Boxed", "DEFAULT_GRADER", "register", "get", "available", "resolve",
           "grade", "registry"]


class Grade(NamedTuple):
    """A grader's verdict: the final answer found in the output (None if none) and whether it is right."""

    extracted: str | None
    correct: bool


#: What a grader is: ``grader(output, reference) -> Grade`` (any ``(str | None, bool)`` pair).
Grader = Callable[[str, str], "Grade | tuple[str | None, bool]"]

#: The grader ``generate_answers`` uses when none is named.
DEFAULT_GRADER = "math-verify"


@dataclass(frozen=True)
class MathVerify:
    """``math-verify``: the model's final answer against the reference, both parsed to SymPy and
    compared numerically, symbolically, as sets, intervals, tuples or equations.

    The answer is the content of the last ``\\boxed{}``/``\\fbox{}`` (as in the paper; math-verify
    alone would join boxes separated by a comma or "and" into one multi-part answer); in an
    output without one, math-verify's own search (LaTeX after "answer", then the last LaTeX
    or plain expression). The reference is parsed as ``\\boxed{reference}``, so a bare
    ``72``, ``\\frac{3}{4}``, ``[1, 3)`` or ``x^2+1`` is read as LaTeX (a reference holding
    ``\\boxed`` is parsed as written). Unicode minus signs count as ``-``. ``extracted`` is
    the answer's text after math-verify's normalisation (``0.5`` may come back as ``\\frac{1}{2}``).

    Args:
        timeout_seconds: the limit on parsing and on each comparison, in whole seconds;
            ``None`` for none. math-verify enforces it with ``SIGALRM``, which works only in
            a process's main thread: in any other thread grading runs without the limit.
        float_rounding: decimal places floats are rounded to before comparing (math-verify's
            ``float_rounding``).

    Raises:
        MissingDependencyError: math-verify is not installed.
    """

    timeout_seconds: int | None = 5
    float_rounding: int = 6
    name = "math-verify"

    def __post_init__(self) -> None:
        if self.timeout_seconds is not None and (isinstance(self.timeout_seconds, bool)
                                                 or not isinstance(self.timeout_seconds, int)
                                                 or self.timeout_seconds < 1):
            raise ArgumentError(f"timeout_seconds must be a whole number of seconds >= 1, or None for no limit; "
                                f"got {self.timeout_seconds!r}.")
        _math_verify()  # fail at construction, before any answer is generated

    def __call__(self, output: str, reference: str) -> Grade:
        math_verify = _math_verify()
        # SIGALRM exists only in the main thread; elsewhere math-verify would raise.
        limit = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        output, reference = output.replace("\u2212", "-"), str(reference).replace("\u2212", "-")
        boxed = last_boxed(output)
        answer = math_verify.parse(output if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=limit)
        if not answer:
            return Grade(None, False)
        gold = math_verify.parse(reference if "\\boxed" in reference else f"\\boxed{{{reference}}}",
                                 parsing_timeout=limit)
        correct = bool(gold) and math_verify.verify(gold, answer, float_rounding=self.float_rounding,
                                                    timeout_seconds=limit)
        return Grade(answer[-1] if isinstance(answer[-1], str) else str(answer[0]), bool(correct))


@dataclass(frozen=True)
class Boxed:
    """The hand checker: :func:`~circuitdiff.data.answers.extract_answer` (last ``\\boxed{}``,
    else the last number) and :func:`~circuitdiff.data.answers.answers_match` (numbers within
    ``rel_tol``/``abs_tol``, else normalised strings). No symbolic equivalence; docs/graders.md
    lists the answer forms it does not handle."""

    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    name = "boxed"

    def __call__(self, output: str, reference: str) -> Grade:
        extracted = extract_answer(output)
        return Grade(extracted, answers_match(extracted, str(reference), rel_tol=self.rel_tol, abs_tol=self.abs_tol))


def _math_verify() -> Any:
    """The ``math_verify`` module, imported on first use (it loads SymPy: about half a second)."""
    return MissingDependencyError.importing("math_verify", "the math-verify grader",
                           "pip install math-verify, or grade with grader='boxed' (the built-in checker, no "
                           "dependency).")


#: The grader registry; ``register``, ``get`` and ``available`` are its methods.
registry = Registry("grader", "circuitdiff.graders",
                    hint=", or pass a grader callable (see circuitdiff.data.grading)")
register = registry.register
get = registry.get
available = registry.available

register("math-verify", MathVerify)
register("boxed", Boxed)


def resolve(grader: str | Grader) -> Grader:
    """A grader from a registered name (:func:`available`) or a callable, ready to call.

    Raises:
        UnknownNameError: no grader of that name (the message lists the available ones).
        MissingDependencyError: the grader's package is not installed.
        ArgumentTypeError: ``grader`` is neither a name nor a callable.
    """
    if isinstance(grader, str):
        return registry.get(grader)
    if not callable(grader):
        raise ArgumentTypeError(f"grader must be a name ({', '.join(available())}) or a callable "
                                f"grader(output, reference) -> (extracted, correct); got {type(grader).__name__}.")
    return grader


def grade(grader: Grader, output: str, reference: str) -> Grade:
    """``grader(output, reference)`` as a :class:`Grade`.

    Raises:
        ArgumentTypeError: the grader returned something other than an ``(extracted, correct)`` pair.
    """
    result = grader(output, reference)
    if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], (str, type(None))):
        raise ArgumentTypeError(f"grader {getattr(grader, 'name', grader)!r} must return a pair (extracted answer "
                                f"as str or None, correct as bool); got {result!r}.")
    return Grade(result[0], bool(result[1]))
