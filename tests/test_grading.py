"""Graders: both built-ins on the answer forms of math datasets, the registry and its plugins,
math-verify off the main thread and without the package, and generate_answers(grader=...)."""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import circuitdiff as cd
from circuitdiff.data import Grade, Question, generate_answers, grading
from circuitdiff.data.generation import answer_identity, generation_settings
from circuitdiff.identity import model_identity
from plugin_helpers import installed_package

DOCS = Path(__file__).resolve().parents[1] / "docs" / "graders.md"

# (form, model output, reference, correct?): verdicts from the mathematics, not from a grader.
CASES = [
    ("boxed fraction vs decimal", "Adding up gives $\\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("decimal vs fraction", "So the answer is \\boxed{0.5}.", "\\frac{1}{2}", True),
    ("wrong fraction", "So it is \\boxed{\\frac{1}{3}}.", "0.5", False),
    ("dfrac", "The probability is \\boxed{\\dfrac{1}{3}}.", "1/3", True),
    ("rounded decimal", "The answer is 0.333", "1/3", False),
    ("thousands separator", "The total cost is \\boxed{1,234}.", "1234", True),
    ("thousands separator, no box", "The total cost is 1,234 dollars.", "1234", True),
    ("percent vs number of percent", "That makes \\boxed{50\\%} of the class.", "50", True),
    ("percent vs fraction", "That makes \\boxed{50\\%} of the class.", "0.5", True),
    ("number vs percent reference", "That makes \\boxed{50} percent.", "50\\%", True),
    ("choice in text", "The answer is \\boxed{\\text{(B)}}", "(B)", True),
    ("choice, letter only", "The answer is \\boxed{(B)}", "B", True),
    ("wrong choice", "The answer is \\boxed{\\text{(C)}}", "(B)", False),
    ("half-open interval", "So $x \\in \\boxed{[1, 3)}$.", "[1,3)", True),
    ("interval, wrong ends", "So $x \\in \\boxed{(1, 3)}$.", "[1, 3)", False),
    ("interval to infinity", "The solution set is \\boxed{(-\\infty, 2]}.", "(-\\infty,2]", True),
    ("set, other order", "The roots are \\boxed{\\{2, 1\\}}.", "\\{1, 2\\}", True),
    ("set, wrong element", "The roots are \\boxed{\\{1, 3\\}}.", "\\{1, 2\\}", False),
    ("sqrt, simplified", "The side is \\boxed{2\\sqrt{2}}.", "\\sqrt{8}", True),
    ("sqrt, unsimplified", "The side is \\boxed{\\sqrt{8}}.", "2\\sqrt{2}", True),
    ("sqrt, wrong", "The side is \\boxed{2\\sqrt{3}}.", "\\sqrt{8}", False),
    ("rationalised denominator", "We get \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{\\sqrt{2}}{2}", True),
    ("pi expression", "The angle is \\boxed{\\frac{\\pi}{2}}.", "\\pi/2", True),
    ("pi, wrong", "The area is \\boxed{2\\pi}.", "\\pi", False),
    ("degrees", "The angle measures \\boxed{30^\\circ}.", "30", True),
    ("degrees in braces", "The angle measures \\boxed{30^{\\circ}}.", "30", True),
    ("degrees, wrong", "The angle measures \\boxed{60^\\circ}.", "30", False),
    ("equation x = 3", "Solving, \\boxed{x = 3}.", "3", True),
    ("equation, wrong", "Solving, \\boxed{x = 4}.", "3", False),
    ("unicode minus, no box", "The result is \u22125.", "-5", True),
    ("unicode minus, boxed", "The result is \\boxed{\u22125}.", "-5", True),
    ("sign matters", "The result is \\boxed{-5}.", "5", False),
    ("nested braces", "Hence \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}", True),
    ("several boxes: last wins", "Try \\boxed{4}. Wait, that is wrong; it is \\boxed{5}.", "5", True),
    ("several boxes: the first is not the answer", "Try \\boxed{4}. Wait, that is wrong; it is \\boxed{5}.", "4",
     False),
    ("no answer", "I cannot solve this problem.", "4", False),
    ("GSM8K ####", "Janet sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("GSM8K ####, wrong", "Janet sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18", "9", False),
    ("dollar sign", "She pays \\boxed{\\$18}.", "18", True),
    ("dollar sign with cents", "She pays \\boxed{\\$18.00}.", "18", True),
    ("unit word, no box", "She pays 18 dollars.", "18", True),
    ("unit in text", "She pays \\boxed{18 \\text{ dollars}}.", "18", True),
    ("unit, wrong number", "She pays \\boxed{18 \\text{ dollars}}.", "20", False),
    ("tuple", "The point is \\boxed{(1, 2)}.", "(1, 2)", True),
    ("tuple, swapped", "The point is \\boxed{(2, 1)}.", "(1, 2)", False),
    ("polynomial, other order", "Hence $f(x) = \\boxed{1 + x^2}$", "x^2+1", True),
    ("integer vs decimal", "The answer is 3.0", "3", True),
]
#: The forms the hand checker ("boxed") gets wrong: symbolic equivalence. docs/graders.md lists them.
BOXED_UNHANDLED = {"percent vs fraction", "set, other order", "sqrt, simplified", "sqrt, unsimplified",
                   "rationalised denominator", "pi expression", "polynomial, other order"}


def cases(grader: str):
    for form, output, reference, correct in CASES:
        unhandled = grader == "boxed" and form in BOXED_UNHANDLED
        marks = [pytest.mark.xfail(strict=True, reason="the hand checker has no symbolic equality; a known gap, tabled in "
                                                  "docs/graders.md (strict: passing would mean the table is stale)")] if unhandled else []
        yield pytest.param(grader, output, reference, correct, id=f"{grader}: {form}", marks=marks)


# ---------------------------------------------------------------------- the answer forms
@pytest.mark.parametrize(("name", "output", "reference", "correct"), [*cases("math-verify"), *cases("boxed")])
def test_answer_forms(name, output, reference, correct):
    verdict = grading.get(name)(output, reference)
    assert isinstance(verdict, Grade) and verdict.correct is correct
    assert (verdict.extracted is None) == (output == "I cannot solve this problem.")


@pytest.mark.parametrize("name", ["math-verify", "boxed"])
def test_what_is_extracted(name):
    grader = grading.get(name)
    assert grader("Try \\boxed{4}. Wait, it is \\boxed{5}.", "5").extracted == "5"
    assert grader("so 16 - 3 - 4 = 9 eggs\n#### 18", "18").extracted == "18"
    assert grader("no digits here", "4") == (None, False)


def test_docs_table_lists_what_the_hand_checker_does_not_handle():
    rows = [line.split("|")[1:-1] for line in DOCS.read_text().splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows if len(cells) == 5}
    assert BOXED_UNHANDLED <= set(table)
    for form, (output, reference, math_verify, boxed) in table.items():
        if form in {c[0] for c in CASES}:
            assert math_verify == "yes", form
            assert (boxed == "no") == (form in BOXED_UNHANDLED), form


# ---------------------------------------------------------------------- registry and plugins
def test_registry_names_and_errors():
    assert {"math-verify", "boxed"} <= set(grading.available())
    assert grading.DEFAULT_GRADER == "math-verify"
    assert isinstance(grading.resolve("math-verify"), grading.MathVerify)
    assert grading.get("boxed", rel_tol=0.01)("\\boxed{0.333}", "1/3").correct  # options go to the constructor
    with pytest.raises(cd.UnknownNameError, match=r"unknown grader 'nope'; available: boxed, math-verify"):
        grading.resolve("nope")
    with pytest.raises(cd.ArgumentTypeError, match="grader must be a name"):
        grading.resolve(42)
    with pytest.raises(cd.ArgumentError, match="timeout_seconds"):
        grading.MathVerify(timeout_seconds=0)
    with pytest.raises(cd.ArgumentTypeError, match="must return a pair"):
        grading.grade(lambda output, reference: True, "4", "4")


def test_register_in_process():
    @grading.register("test-exact")
    def exact():
        return lambda output, reference: (output.strip(), output.strip() == reference)

    try:
        assert "test-exact" in grading.available()
        assert grading.grade(grading.resolve("test-exact"), " 7 ", "7") == Grade("7", True)
        with pytest.raises(cd.DuplicateNameError):
            grading.register("boxed", exact)
    finally:
        grading.registry.unregister("test-exact")
    assert "test-exact" not in grading.available()


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A package ``my_graders`` installed after import, with an entry point in ``circuitdiff.graders``."""
    source = ("class LastWord:\n"
              "    def __call__(self, output, reference):\n"
              "        words = output.split()\n"
              "        return (words[-1] if words else None), bool(words) and words[-1] == reference\n")
    yield installed_package(tmp_path, monkeypatch, "my-graders",
                            {"circuitdiff.graders": {"last-word": "my_graders:LastWord"}}, {"my_graders": source})
    sys.modules.pop("my_graders", None)


def test_plugin_grader_is_found_by_its_entry_point(plugin_site):
    assert "last-word" in grading.available() and "my_graders" not in sys.modules  # listed, not imported
    grader = grading.resolve("last-word")
    assert grading.grade(grader, "it is blue", "blue") == Grade("blue", True)
    assert grading.grade(grader, "", "blue") == Grade(None, False)


# ---------------------------------------------------------------------- math-verify's environment
def test_math_verify_missing_names_the_install(monkeypatch, get_model):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # "import math_verify" now raises ImportError
    with pytest.raises(cd.MissingDependencyError, match="pip install math-verify"):
        grading.resolve("math-verify")
    model = get_model("llama")
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("graded before generating"))
    with pytest.raises(cd.MissingDependencyError, match="grader='boxed'"):
        generate_answers(model, [Question("a", "w1 w2", "4")], progress=False)
    assert generate_answers(model, [], grader="boxed", progress=False) == []  # the hand checker needs nothing


def test_math_verify_in_worker_threads():
    grader = grading.MathVerify()
    with ThreadPoolExecutor(max_workers=2) as pool:  # SIGALRM is for the main thread only
        verdicts = list(pool.map(lambda case: grader(case[1], case[2]).correct, CASES))
    assert verdicts == [case[3] for case in CASES]


def _grade_in_worker(output: str, reference: str) -> bool:
    return grading.MathVerify()(output, reference).correct


@pytest.mark.slow  # a spawn worker imports torch and SymPy
def test_math_verify_in_a_spawned_process():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        verdicts = pool.starmap(_grade_in_worker, [("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"), ("\\boxed{3}", "4")])
    assert verdicts == [True, False]


# ---------------------------------------------------------------------- generate_answers(grader=...)
def test_generate_answers_grades_cached_text_with_the_grader(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    questions = [Question("a", "w1 w2 w3", "\\sqrt{8}"), Question("b", "w5 w6", "0.5")]
    texts = ["so it is \\boxed{2\\sqrt{2}}", "I think \\boxed{\\frac{1}{2}} hmm"]
    cache = tmp_path / "gen.jsonl"
    identity, settings = model_identity(model), generation_settings(model, 8)
    cache.write_text("".join(json.dumps({"id": q.id, "text": text, "answer_ids": [1], "prompt_length": 2,
                                         "identity": answer_identity(identity, q.prompt, settings)}) + "\n"
                             for q, text in zip(questions, texts)))
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("cached"))

    def run(grader):
        out = generate_answers(model, questions, cache=cache, max_new_tokens=8, progress=False, grader=grader)
        return [(g.extracted, g.correct) for g in out]

    assert run("math-verify") == [("2\\sqrt{2}", True), ("\\frac{1}{2}", True)]
    assert run(grading.DEFAULT_GRADER) == run("math-verify")
    # the same cache, graded again by the hand checker: sqrt forms are beyond it
    assert run("boxed") == [("2\\sqrt{2}", False), ("\\frac{1}{2}", True)]
    assert run(lambda text, reference: (text[-3:], reference == "0.5")) == [("2}}", False), ("hmm", True)]
    with pytest.raises(cd.UnknownNameError, match=re.escape("available: boxed, math-verify")):
        run("nope")
