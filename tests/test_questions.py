"""The question pipeline's data layer: answer extraction and checking, questions files, length selection."""

from __future__ import annotations

import json
import math
import random

import pytest

import circuitdiff as cd
from circuitdiff.data import answers_match, extract_answer, read_questions, select_by_length

# ---------------------------------------------------------------------- answers
OUTPUTS = [  # (model output, reference, expected extraction, correct?)
    ("Adding them up gives $\\boxed{\\frac{3}{4}}$.", "0.75", "\\frac{3}{4}", True),
    ("So the probability is \\boxed{\\dfrac{1}{3}}.", "1/3", "\\dfrac{1}{3}", True),
    ("The total cost is 1,234 dollars.", "1234", "1,234", True),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18", "18", True),
    ("First 3 apples, then 5 more... The answer is \\boxed{12} (we used 2 steps).", "12", "12", True),
    ("We get \\boxed{\\sqrt{2}} and check: \\sqrt{2}^2 = 2.", "\\sqrt{2}", "\\sqrt{2}", True),
    ("Try \\boxed{4}. Wait, that is wrong; it is \\boxed{5}.", "5", "5", True),
    ("Hence $x = \\boxed{x^2 + 1}$", "x^2+1", "x^2 + 1", True),
    ("The answer is 3.0", "3", "3.0", True),
    ("The result is \u22125.", "-5", "-5", True),
    ("The answer is \\boxed{\\text{(B)}}", "(B)", "\\text{(B)}", True),
    ("That makes \\boxed{50\\%} of the class.", "50", "50\\%", True),
    ("The answer is 0.333", "1/3", "0.333", False),  # close, but not within tolerance
    ("The answer is 17.", "71", "17", False),
    ("I cannot solve this problem.", "4", None, False),
    ("Unfinished \\boxed{12", "12", "12", True),  # unbalanced box: fall back to the last number
    ("The angle is \\boxed{30^{\\circ}}.", "30", "30^{\\circ}", True),
    ("It is \\boxed{45\u00b0}.", "45", "45\u00b0", True),
    ("So \\boxed{x = -2}", "-2", "x = -2", True),
    ("So \\boxed{x = -2}", "2", "x = -2", False),
    ("She pays \\boxed{18 \\text{ dollars}}.", "18", "18 \\text{ dollars}", True),
    ("She pays \\boxed{18\\text{ dollars}}.", "18", "18\\text{ dollars}", True),
    ("The answer is \\boxed{(C)}", "C", "(C)", True),
    ("The answer is \\boxed{2 x}", "2", "2 x", False),  # one letter is a variable, not a unit
    ("The answer is \\boxed{3x}", "3", "3x", False),
]


@pytest.mark.parametrize(("output", "reference", "extracted", "correct"), OUTPUTS)
def test_extract_and_check(output, reference, extracted, correct):
    assert extract_answer(output) == extracted
    assert answers_match(extract_answer(output), reference) is correct


def test_numeric_tolerance():
    assert answers_match("0.1", "0.1000000001") and not answers_match("0.1", "0.11")
    assert answers_match("1e-12", "0") is False  # not a number in our grammar: compared as strings
    assert not answers_match("3/0", "3")  # division by zero is no number


def test_last_boxed():
    from circuitdiff.data.answers import last_boxed

    assert last_boxed("a \\boxed{1} b \\fbox{ {2} } c") == "{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}} then \\boxed{3") == "\\frac{1}{2}"  # an unclosed box is skipped
    assert last_boxed("no box, 7") is None


# ---------------------------------------------------------------------- questions files
def write(tmp_path, lines) -> str:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return str(path)


def test_read_questions(tmp_path):
    path = write(tmp_path, [{"id": "a", "prompt": "P: 1+1=", "answer": 2}, "",
                            {"question": "What is 2+2?", "answer": "4"}])
    questions = read_questions(path)
    assert [q.id for q in questions] == ["a", "line-3"]
    assert questions[0].prompt == "P: 1+1=" and questions[0].answer == "2"
    assert questions[1].prompt.startswith("What is 2+2?\n") and "\\boxed{}" in questions[1].prompt
    assert read_questions(path, template="Q: {question} A:")[1].prompt == "Q: What is 2+2? A:"


@pytest.mark.parametrize(("lines", "message"), [
    ([{"prompt": "x", "answer": 1}, "{not json"], r"line 2: not valid JSON"),
    ([{"prompt": "x"}], r"line 1: no reference answer"),
    ([{"prompt": "x", "answer": "  "}], r"line 1: no reference answer"),
    ([{"answer": 3}], r"line 1: needs a \"prompt\" or a \"question\""),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    ([{"id": 1, "prompt": "x", "answer": 1}, {"id": 1, "prompt": "y", "answer": 2}], r"line 2: id '1' appears twice"),
    ([""], r"holds no questions"),
])
def test_bad_questions_files(tmp_path, lines, message):
    with pytest.raises(cd.DataError, match=message):
        read_questions(write(tmp_path, lines))


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(cd.DataError, match="no questions file"):
        read_questions(tmp_path / "nope.jsonl")
    with pytest.raises(cd.DataError, match="must contain"):
        read_questions(write(tmp_path, [{"question": "q", "answer": 1}]), template="no placeholder")


# ---------------------------------------------------------------------- length selection
def test_paper_rule_by_hand():
    base = [100, 100, 40, 100, 300, 120]
    tuned = [100, 140, 60, 30, 100, 100]
    # T_bar = mean of (100, 120, 50, 65, 200, 110) = 645 / 6 = 107.5; window [53.75, 161.25]
    # q2: 40 < 53.75 out; q3: 30 out; q4: 300 out. Balance: q1 |100-140|/120 = 0.33 < 0.5 keeps.
    s = select_by_length(base, tuned, alpha=0.1, n=None)
    assert s.reference_length == pytest.approx(107.5)
    assert s.kept == [0, 1, 5]
    assert s.t_cut == math.floor(0.1 * 107.5) == 10
    assert s.dropped == {"length window": 3, "balance": 0, "shorter than T_cut": 0}
    tight = select_by_length(base, tuned, alpha=0.1, delta=0.3, n=None)
    assert tight.kept == [0, 5] and tight.dropped["balance"] == 1  # 0.33 >= 0.3


def test_code_rule_by_hand():
    base = [100, 100, 40, 100, 300, 120]
    tuned = [100, 140, 60, 30, 100, 100]
    # ref = min(mean base 126.67, mean tuned 88.33) = 88.33; window on the average: [44.17, 132.5]
    # averages 100, 120, 50, 65, 200, 110: only q4 (200) is out. Balance (< 0.5): q3 |70|/65 out.
    s = select_by_length(base, tuned, alpha=0.3, rule="code", n=None,
                         prompt_lengths=([5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 6]))
    assert s.reference_length == pytest.approx(265 / 3)
    assert s.kept == [0, 1, 2]
    assert s.t_cut == math.floor(0.3 * 265 / 3) == 26
    assert s.dropped == {"length window": 1, "balance": 1, "equal prompt length": 1, "shorter than T_cut": 0}


def test_paper_code_rule_truncates_the_bounds_to_integers():
    base, tuned = [5, 17] + [12] * 6, [6, 18] + [12] * 6
    # ref = min(94/8, 100/8) = 11.75. code: [5.875, 17.625] keeps average 17.5, drops 5.5.
    # paper-code: [int(5.875), int(17.625)] = [5, 17] keeps 5.5, drops 17.5.
    code = select_by_length(base, tuned, alpha=0.1, rule="code", n=None)
    truncated = select_by_length(base, tuned, alpha=0.1, rule="paper-code", n=None)
    assert code.reference_length == truncated.reference_length == pytest.approx(11.75)
    assert code.kept == [1, 2, 3, 4, 5, 6, 7] and code.removed == {0: "length window"}
    assert truncated.kept == [0, 2, 3, 4, 5, 6, 7] and truncated.removed == {1: "length window"}
    assert truncated.parameters["rule"] == "paper-code"


def test_sampling_is_seeded_and_capped():
    lengths = [100] * 50
    a = select_by_length(lengths, lengths, alpha=0.1, n=10, seed=42)
    b = select_by_length(lengths, lengths, alpha=0.1, n=10, seed=42)
    c = select_by_length(lengths, lengths, alpha=0.1, n=10, seed=7)
    assert a.kept == b.kept != c.kept and len(a.kept) == 10 and a.dropped["not sampled"] == 40
    assert len(select_by_length(lengths, lengths, alpha=0.1, n=100).kept) == 50  # fewer than n: all


def test_sampling_draws_what_the_public_code_draws():
    """The paper's code samples with random.seed(seed); random.sample(pool, n) on the pool in question order."""
    lengths = [100] * 40
    pool = [f"q{i}" for i in range(40)]
    random.seed(42)
    expected = set(random.sample(pool, 10))
    s = select_by_length(lengths, lengths, alpha=0.1, rule="paper-code", n=10, seed=42)
    assert {pool[i] for i in s.kept} == expected


def test_alpha_above_beta_drops_short_answers():
    s = select_by_length([60, 100, 140], [60, 100, 140], alpha=0.9, beta=0.5, n=None)
    # T_bar 100, T_cut 90: the 60-token answers cannot be cut at 90 tokens
    assert s.t_cut == 90 and s.kept == [1, 2] and s.dropped["shorter than T_cut"] == 1


def test_selection_errors():
    with pytest.raises(cd.DataError, match="no questions to select"):
        select_by_length([], [], alpha=0.1)
    with pytest.raises(cd.DataError, match="balance rule removed the last 2"):
        select_by_length([100, 110], [40, 40], alpha=0.1, beta=0.0, gamma=10.0)  # 60/70, 70/75 >= 0.5
    with pytest.raises(cd.DataError, match="length window rule removed the last 2"):
        select_by_length([10, 1000], [10, 1000], alpha=0.1)
    for kwargs, message in [(dict(alpha=0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=0.1, beta=-1), "beta"),
                            (dict(alpha=0.1, gamma=0.5), "gamma"), (dict(alpha=0.1, delta=0), "delta"),
                            (dict(alpha=0.1, rule="other"), "unknown length rule"), (dict(alpha=0.1, n=0), "n \\(")]:
        with pytest.raises(cd.DataError, match=message):
            select_by_length([100], [100], **kwargs)
    with pytest.raises(cd.DataError, match="2 base lengths but 1 tuned"):
        select_by_length([1, 2], [1], alpha=0.1)
