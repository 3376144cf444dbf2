"""Questions files: JSONL, one question per line.

Each line is a JSON object with

- ``"answer"`` (required): the reference answer, a string or a number;
- ``"prompt"``: the ready prompt given to the model, or ``"question"``: the question
  text, put into ``template`` (which must contain ``{question}``);
- ``"id"`` (optional): a unique name; default ``"line-{n}"``.

Blank lines are skipped. Every problem is a :class:`~circuitdiff.DataError` that names
the file and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from circuitdiff.errors import DataError

__all__ = ["Question", "read_questions", "DEFAULT_TEMPLATE"]

#: Used when a line has ``"question"`` but no ``"prompt"``.
DEFAULT_TEMPLATE = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n"
)


@dataclass(frozen=True)
class Question:
    """One question: its ``id``, the ``prompt`` the models see and the reference ``answer``."""

    id: str
    prompt: str
    answer: str


def read_questions(path: str | os.PathLike[str], template: str = DEFAULT_TEMPLATE) -> list[Question]:
    """Read a questions file (see the module docstring for the format)."""
    path = Path(path)
    if "{question}" not in template:
        raise DataError(f"the prompt template must contain {{question}}; got {template!r}.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"no questions file at {str(path)!r}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the questions file {str(path)!r}: {exc}.") from None
    questions: list[Question] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        answer = record.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DataError(f"{where}: no reference answer (an \"answer\" field is required).")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: \"answer\" must be a string or a number, got {type(answer).__name__}.")
        if isinstance(record.get("prompt"), str) and record["prompt"].strip():
            prompt = record["prompt"]
        elif isinstance(record.get("question"), str) and record["question"].strip():
            prompt = template.format(question=record["question"])
        else:
            raise DataError(f"{where}: needs a \"prompt\" or a \"question\" (non-empty string).")
        qid = str(record.get("id", f"line-{number}"))
        if qid in seen:
            raise DataError(f"{where}: id {qid!r} appears twice; ids must be unique.")
        seen.add(qid)
        questions.append(Question(qid, prompt, str(answer)))
    if not questions:
        raise DataError(f"the questions file {str(path)!r} holds no questions.")
    return questions
