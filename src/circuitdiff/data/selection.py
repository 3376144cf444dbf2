"""Which questions to score, and how much of each answer (method.md, section 4).

Input: the answer lengths (tokens) of the two models on the questions BOTH answered
correctly. Three rules choose the questions and the truncation length ``T_cut``:

- ``rule="paper"`` (default): ``T_bar`` = mean over questions of ``(T_base + T_tuned) / 2``.
  Keep a question if both lengths lie in ``[beta * T_bar, gamma * T_bar]`` and
  ``|T_base - T_tuned| / ((T_base + T_tuned) / 2) < delta``. ``T_cut = alpha * T_bar``.
- ``rule="code"``: the paper's public code's criteria with exact bounds: the reference
  is ``min(mean T_base, mean T_tuned)``; the *average* of the two lengths must lie in
  ``[beta * ref, gamma * ref]``; the same balance rule; if prompt lengths are given the
  two models' prompts must have the same length. ``T_cut = alpha * ref``.
- ``rule="paper-code"``: the public code as it runs: the ``code`` rule with its bounds
  truncated to integers, ``[int(beta * ref), int(gamma * ref)]``. On a pool of a few
  hundred questions this moves a question or two across each bound, and so changes
  the sampled subset (the sampler below is the code's ``random.seed(seed);
  random.sample(pool, n)`` on the pool in question order).

``T_cut`` is rounded down, at least 1 token; a question whose answer is shorter than
``T_cut`` on either side is dropped (only possible when ``alpha > beta``). Then ``n``
questions are sampled with ``seed`` (all of them if fewer remain). Every rule's drop
count is kept in :attr:`LengthSelection.dropped`, so a run can be reported.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from circuitdiff.errors import DataError

__all__ = ["LengthSelection", "select_by_length", "check_parameters", "RULES"]

RULES = ("paper", "code", "paper-code")


@dataclass(frozen=True)
class LengthSelection:
    """The outcome of :func:`select_by_length`.

    Attributes:
        kept: positions (into the input lists) of the questions to score, ascending.
        t_cut: answer tokens each model is scored on.
        reference_length: ``T_bar`` (paper rule) or ``min`` of the mean lengths (code rules).
        dropped: rule -> number of questions it removed, in the order applied.
        parameters: the rule and every parameter, for the run's report.
        removed: position -> the rule that removed that question (``"not sampled"``
            for those left out by the sampling of ``n``).
    """

    kept: list[int]
    t_cut: int
    reference_length: float
    dropped: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    removed: dict[int, str] = field(default_factory=dict)


def select_by_length(
    base_lengths: Sequence[int],
    tuned_lengths: Sequence[int],
    *,
    alpha: float,
    beta: float = 0.5,
    gamma: float = 1.5,
    delta: float = 0.5,
    rule: str = "paper",
    n: int | None = 100,
    seed: int = 42,
    prompt_lengths: tuple[Sequence[int], Sequence[int]] | None = None,
) -> LengthSelection:
    """Apply the length window, the balance rule and the truncation; sample ``n`` questions.

    Args:
        base_lengths: the base model's answer lengths in tokens, one per question, for
            the questions both models answered correctly.
        tuned_lengths: the tuned model's, for the same questions in the same order.
        alpha: truncation fraction, ``0 < alpha <= 1``.
        beta: lower end of the length window, ``0 <= beta <= 1 <= gamma``.
        gamma: upper end of the length window.
        delta: balance threshold, ``> 0``.
        rule: ``"paper"``, ``"code"`` or ``"paper-code"`` (see the module docstring).
        n: questions to sample; None keeps all.
        seed: of the sampling.
        prompt_lengths: ``(base, tuned)`` prompt lengths in tokens, for the code rules.

    Raises:
        DataError: bad parameters, no questions, or none left (naming the rule that
            removed the last ones).
    """
    check_parameters(alpha, beta, gamma, delta, rule, n)
    if len(base_lengths) != len(tuned_lengths):
        raise DataError(f"{len(base_lengths)} base lengths but {len(tuned_lengths)} tuned lengths; "
                        "give one of each per question.")
    if not base_lengths:
        raise DataError("no questions to select from: neither model answered any question correctly "
                        "(or both did not on the same question).")
    pairs = list(zip(base_lengths, tuned_lengths))
    if rule == "paper":
        reference = sum((b + t) / 2 for b, t in pairs) / len(pairs)
        window = {i for i, (b, t) in enumerate(pairs)
                  if all(beta * reference <= x <= gamma * reference for x in (b, t))}
    else:
        reference = min(sum(base_lengths) / len(pairs), sum(tuned_lengths) / len(pairs))
        low, high = beta * reference, gamma * reference
        if rule == "paper-code":
            low, high = int(low), int(high)
        window = {i for i, (b, t) in enumerate(pairs) if low <= (b + t) / 2 <= high}
    t_cut = max(1, math.floor(alpha * reference))
    remaining = list(range(len(pairs)))
    dropped: dict[str, int] = {}
    removed: dict[int, str] = {}

    def apply(name: str, keep) -> None:
        nonlocal remaining
        survivors = [i for i in remaining if keep(i)]
        dropped[name] = len(remaining) - len(survivors)
        removed.update((i, name) for i in remaining if not keep(i))
        if not survivors:
            raise DataError(f"no questions left: the {name} rule removed the last {dropped[name]} "
                            f"(drops so far: {dropped}); relax it or use more questions.")
        remaining = survivors

    apply("length window", lambda i: i in window)
    apply("balance", lambda i: abs(pairs[i][0] - pairs[i][1]) / ((pairs[i][0] + pairs[i][1]) / 2) < delta)
    if rule != "paper" and prompt_lengths is not None:
        base_prompts, tuned_prompts = prompt_lengths
        apply("equal prompt length", lambda i: base_prompts[i] == tuned_prompts[i])
    apply("shorter than T_cut", lambda i: min(pairs[i]) >= t_cut)
    if n is not None and len(remaining) > n:
        dropped["not sampled"] = len(remaining) - n
        sampled = sorted(random.Random(seed).sample(remaining, n))
        removed.update((i, "not sampled") for i in set(remaining) - set(sampled))
        remaining = sampled
    parameters = {"rule": rule, "alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta, "n": n, "seed": seed,
                  "questions_in": len(pairs)}
    return LengthSelection(remaining, t_cut, reference, dropped, parameters, removed)


def check_parameters(alpha: float, beta: float, gamma: float, delta: float, rule: str, n: int | None) -> None:
    """Refuse selection parameters out of range (see :func:`select_by_length`)."""
    if rule not in RULES:
        raise DataError(f"unknown length rule {rule!r}; use one of {RULES}.")
    if not 0 < alpha <= 1:
        raise DataError(f"alpha (the truncation fraction) must be in (0, 1]; got {alpha!r}.")
    if not 0 <= beta <= 1:
        raise DataError(f"beta (the lower length bound, a fraction of the mean) must be in [0, 1]; got {beta!r}.")
    if not gamma >= 1:
        raise DataError(f"gamma (the upper length bound, a multiple of the mean) must be >= 1; got {gamma!r}.")
    if not delta > 0:
        raise DataError(f"delta (the balance threshold) must be > 0; got {delta!r}.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"n (questions to sample) must be a positive integer or None; got {n!r}.")
