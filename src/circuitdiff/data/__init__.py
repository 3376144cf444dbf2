"""The data layer: batches for scoring, and the paper's question pipeline.

- :mod:`~circuitdiff.data.batches`: :class:`Batch` and :func:`make_batches`, token ids
  with padding masks and loss targets.
- :mod:`~circuitdiff.data.grading`: graders, which find a model's final answer and check
  it against a reference (``"math-verify"``, the default, and ``"boxed"``, the hand checker
  of :mod:`~circuitdiff.data.answers`); a registry with plugins.
- :mod:`~circuitdiff.data.questions`: read a questions file (JSONL).
- :mod:`~circuitdiff.data.datasets`: :func:`load_questions` from JSONL/JSON/Parquet files or
  datasets in the local Hugging Face cache (MATH-500, GSM8K, College Math, any Hub id).
- :mod:`~circuitdiff.data.templates`: named prompt templates (plain, chat, each model
  family's); a registry with plugins.
- :mod:`~circuitdiff.data.generation`: a model's greedy answers, graded and cached.
- :mod:`~circuitdiff.data.selection`: keep the questions both models answer, filter by
  length and choose the truncation length (method.md, section 4).
"""

from circuitdiff.data import grading
from circuitdiff.data.answers import answers_match, extract_answer
from circuitdiff.data.batches import IGNORE, Batch, make_batches
from circuitdiff.data.datasets import DATASETS, DatasetFormat, load_questions
from circuitdiff.data.generation import Generation, generate_answers
from circuitdiff.data.grading import Grade
from circuitdiff.data.questions import Question, read_questions
from circuitdiff.data.selection import LengthSelection, select_by_length
from circuitdiff.data.templates import PromptTemplate, available_templates, get_template, register_template, template_identity

__all__ = [
    "DATASETS",
    "IGNORE",
    "Batch",
    "DatasetFormat",
    "Generation",
    "Grade",
    "LengthSelection",
    "PromptTemplate",
    "Question",
    "answers_match",
    "available_templates",
    "extract_answer",
    "generate_answers",
    "get_template",
    "grading",
    "load_questions",
    "make_batches",
    "read_questions",
    "register_template",
    "select_by_length",
    "template_identity",
]
