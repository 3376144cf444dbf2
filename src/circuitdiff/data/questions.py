"""Questions: the :class:`Question` record, and questions files (JSONL, one question a line).

Each line of a questions file is a JSON object with

- ``"answer"`` (required): the reference answer, a string or a number;
- ``"prompt"``: the ready prompt given to the model, or ``"question"``: the question
  text, put into the prompt template (the default: :data:`DEFAULT_TEMPLATE`);
- ``"id"`` (optional): a unique name; default ``"line-{n}"``.

Blank lines are skipped. Every problem is a :class:`~circuitdiff.DataError` that names
the file and the line. :func:`circuitdiff.data.datasets.load_questions` reads these files
too, as well as JSON, Parquet and cached Hugging Face datasets, with named prompt
templates (:mod:`circuitdiff.data.templates`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    """Read a questions file (see the module docstring); ``template`` is a format string with ``{question}``.

    The same as :func:`~circuitdiff.data.datasets.load_questions` with
    ``template=PromptTemplate("custom", template)`` and the questions-file schema.
    """
    from circuitdiff.data.datasets import DATASETS, load_questions  # datasets.py builds on Question
    from circuitdiff.data.templates import PromptTemplate

    if "{question}" not in template:
        raise DataError(f"the prompt template must contain {{question}}; got {template!r}.")
    return load_questions(path, template=PromptTemplate("custom", template), dataset_format=DATASETS["questions"])
