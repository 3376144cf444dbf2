"""The data layer: batches for scoring, and the paper's question pipeline.

- :mod:`~circuitdiff.data.batches`: :class:`Batch` and :func:`make_batches`, token ids
  with padding masks and loss targets.
- :mod:`~circuitdiff.data.answers`: extract a model's final answer and check it
  against a reference.
- :mod:`~circuitdiff.data.questions`: read a questions file (JSONL).
- :mod:`~circuitdiff.data.generation`: a model's greedy answers, checked and cached.
- :mod:`~circuitdiff.data.selection`: keep the questions both models answer, filter by
  length and choose the truncation length (method.md, section 4).
"""

from circuitdiff.data.answers import answers_match, extract_answer
from circuitdiff.data.batches import IGNORE, Batch, make_batches
from circuitdiff.data.generation import Generation, generate_answers
from circuitdiff.data.questions import Question, read_questions
from circuitdiff.data.selection import LengthSelection, select_by_length

__all__ = [
    "IGNORE",
    "Batch",
    "Generation",
    "LengthSelection",
    "Question",
    "answers_match",
    "extract_answer",
    "generate_answers",
    "make_batches",
    "read_questions",
    "select_by_length",
]
