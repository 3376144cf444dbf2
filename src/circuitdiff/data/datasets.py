"""Questions from local files or cached Hugging Face datasets, rendered with a prompt template.

:func:`load_questions` is the one entry point. ``source`` is

- a local file: ``.jsonl`` (one JSON object a line), ``.json`` (an array of objects) or
  ``.parquet`` (needs ``pyarrow``);
- a known dataset by name (:data:`DATASETS`: ``"math500"``, ``"gsm8k"``,
  ``"college-math"``, or their Hub ids such as ``"openai/gsm8k"``);
- any other Hub dataset id (``"org/name"``), with ``fields=`` naming its columns.

Records are read with a :class:`DatasetFormat`: which field holds the question (put into
the prompt template), which a ready prompt (used as is), the reference answer (GSM8K's
is the text after ``"#### "``) and the id. Local files default to the questions-file
schema of :mod:`circuitdiff.data.questions`; ``dataset_format="math500"`` reads a local
copy of MATH-500, and ``fields={"question": "problem", ...}`` renames single fields.
Without an id field, ids are ``"line-{n}"`` (JSONL line), ``"row-{n}"`` (JSON or Parquet
row, from 1) or ``"{dataset}/{split}/{index}"`` (Hub dataset, index from 0).

Hub datasets are read from the local caches only, never downloaded: first the snapshot
that ``hf download NAME --repo-type dataset`` (or ``datasets.load_dataset``
on a machine with network) leaves in the Hugging Face hub cache (``$HF_HUB_CACHE``,
default ``$HF_HOME/hub``), else the ``datasets`` library's prepared cache
(``$HF_DATASETS_CACHE``). Offline mode is forced for the call. Problems are
:class:`~circuitdiff.DataError` naming the file and line or row, or the dataset and how
to fetch it.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from circuitdiff.data.questions import Question
from circuitdiff.data.templates import PromptTemplate, get_template
from circuitdiff.errors import ArgumentError, DataError, MissingDependencyError, MissingPathError, UnknownNameError
from circuitdiff.hub import cached_snapshot, hub_cache_dir, is_hub_id

__all__ = ["DatasetFormat", "DATASETS", "load_questions"]


@dataclass(frozen=True)
class DatasetFormat:
    """Where a dataset's records keep the question, the answer and the id.

    Attributes:
        name: the format's name (``"gsm8k"``); also the first part of default Hub ids.
        question: field with the question text, put into the prompt template.
        answer: field with the reference answer (a string or a number).
        id: field with a unique id; None: ids from the position.
        prompt: field with a ready prompt, used as is when present; None: none.
        answer_marker: the answer is the text after the last occurrence of this marker
            (GSM8K: ``"#### "``), thousands separators removed; None: the whole field.
        hub: the Hugging Face dataset id it is loaded from by name; None: local files only.
        config: the dataset configuration (``"main"`` for GSM8K); None: the default.
        split: the split loaded by default.
    """

    name: str
    question: str = "question"
    answer: str = "answer"
    id: str | None = "id"
    prompt: str | None = "prompt"
    answer_marker: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str = "test"

    def question_from(self, record: Any, where: str, default_id: str, template: PromptTemplate,
                      tokenizer: Any = None) -> Question:
        """One :class:`~circuitdiff.data.questions.Question` from one record; errors start with ``where``."""
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        answer = record.get(self.answer)
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DataError(f"{where}: no reference answer (an \"{self.answer}\" field is required).")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: \"{self.answer}\" must be a string or a number, got {type(answer).__name__}.")
        answer = str(answer)
        if self.answer_marker is not None:
            if self.answer_marker not in answer:
                raise DataError(f"{where}: \"{self.answer}\" has no {self.answer_marker!r} marker before the final "
                                f"answer (it ends {answer[-40:]!r}); is this the {self.name} format?")
            answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer.rsplit(self.answer_marker, 1)[1].strip())
        if self.prompt is not None and _text(record.get(self.prompt)):
            prompt = record[self.prompt]
        elif _text(record.get(self.question)):
            prompt = template.render(record[self.question], tokenizer)
        else:
            wanted = f"a \"{self.prompt}\" or a \"{self.question}\"" if self.prompt else f"a \"{self.question}\""
            raise DataError(f"{where}: needs {wanted} (non-empty string).")
        qid = record.get(self.id) if self.id is not None else None
        return Question(default_id if qid is None else str(qid), prompt, answer)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


#: The named formats: the questions-file schema and the paper's datasets (MATH-500, GSM8K, College Math).
DATASETS: dict[str, DatasetFormat] = {
    "questions": DatasetFormat("questions"),
    "math500": DatasetFormat("math500", question="problem", id="unique_id", prompt=None, hub="HuggingFaceH4/MATH-500"),
    "gsm8k": DatasetFormat("gsm8k", id=None, prompt=None, answer_marker="#### ", hub="openai/gsm8k", config="main"),
    "college-math": DatasetFormat("college-math", id=None, prompt=None, hub="di-zhang-fdu/College_Math_Test"),
}

_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_questions(
    source: str | os.PathLike[str],
    *,
    template: str | PromptTemplate = "plain",
    tokenizer: Any = None,
    dataset_format: str | DatasetFormat | None = None,
    fields: Mapping[str, str | None] | None = None,
    split: str | None = None,
    config: str | None = None,
    max_questions: int | None = None,
) -> list[Question]:
    """Questions from a local file or a cached Hugging Face dataset (see the module docstring).

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file, a name of :data:`DATASETS`, or a Hub id.
        template: a prompt template name (:func:`~circuitdiff.data.templates.available_templates`)
            or a :class:`~circuitdiff.data.templates.PromptTemplate`; records with a ready
            prompt keep it.
        tokenizer: the model's tokenizer; needed by chat templates.
        dataset_format: the record format, a :data:`DATASETS` name or a
            :class:`DatasetFormat`; default: the named dataset's, else the questions-file schema.
        fields: field names replacing the format's (keys ``question``, ``answer``, ``id``,
            ``prompt``; None drops ``id`` or ``prompt``).
        split: the split of a Hub dataset (default: the format's, ``"test"``).
        config: the configuration of a Hub dataset (default: the format's, when ``source`` is
            the format's own Hub dataset).
        max_questions: keep the first this many records (None: all).

    Raises:
        DataError: a missing or malformed file or record (naming file and line or row), a
            duplicate id, no questions, or a Hub dataset that is not in the local caches.
        UnknownNameError: an unknown template or dataset format.
        MissingDependencyError: ``pyarrow`` (Parquet) or ``datasets`` (Hub) is not installed.
    """
    if max_questions is not None and (isinstance(max_questions, bool) or not isinstance(max_questions, int)
                                      or max_questions < 1):
        raise ArgumentError(f"max_questions must be a positive integer or None; got {max_questions!r}.")
    template = get_template(template)
    name = os.fspath(source)
    local = Path(name).suffix.lower() in _SUFFIXES or Path(name).exists()
    named = None if local else _named(name, on_hub=True)
    if not local and named is None and not is_hub_id(name):
        raise DataError(f"{name!r} is neither a questions file (.jsonl, .json, .parquet) nor a known dataset "
                        f"({', '.join(n for n, f in DATASETS.items() if f.hub)}) nor a Hub id 'org/name'.")
    if isinstance(dataset_format, DatasetFormat):
        fmt = dataset_format
    elif dataset_format is not None:
        fmt = _named(dataset_format, required=True)
    else:
        fmt = named or DATASETS["questions"]
    fmt = _with_fields(fmt, fields)
    if local:
        if split is not None or config is not None:
            raise ArgumentError(f"split and config apply to Hub datasets; {name!r} is a local file.")
        records, describe = _read_file(Path(name)), f"the questions file {name!r}"
    else:
        split = split or fmt.split
        hub, short = (named.hub, named.name) if named else (name, name)
        config = config or (fmt.config if fmt.hub == hub else None)  # a format's config belongs to its own repo
        records = _hub_records(hub, short, config, split)
        describe = f"the dataset {hub!r} (split {split!r})"
    questions: list[Question] = []
    seen: set[str] = set()
    for where, default_id, record in records:
        if max_questions is not None and len(questions) == max_questions:
            break
        question = fmt.question_from(record, where, default_id, template, tokenizer)
        if question.id in seen:
            raise DataError(f"{where}: id {question.id!r} appears twice; ids must be unique.")
        seen.add(question.id)
        questions.append(question)
    if not questions:
        raise DataError(f"{describe} holds no questions.")
    return questions


def _named(name: str, required: bool = False, on_hub: bool = False) -> DatasetFormat | None:
    """The format of :data:`DATASETS` (``on_hub``: with a Hub id) of this name or Hub id (None, or an error if
    ``required``)."""
    for known in DATASETS.values():
        if name in (known.name, known.hub) and (known.hub or not on_hub):
            return known
    if required:
        raise UnknownNameError(f"unknown dataset format {name!r}; available: {', '.join(DATASETS)}, or pass "
                               "fields={'question': ..., 'answer': ..., 'id': ...}.")
    return None


def _with_fields(fmt: DatasetFormat, fields: Mapping[str, str | None] | None) -> DatasetFormat:
    if not fields:
        return fmt
    allowed = ("question", "answer", "id", "prompt")
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ArgumentError(f"fields: unknown key(s) {', '.join(map(repr, unknown))}; use {', '.join(allowed)}.")
    for key, value in fields.items():
        if not (isinstance(value, str) and value) and not (value is None and key in ("id", "prompt")):
            raise ArgumentError(f"fields[{key!r}] must be a field name (None only for 'id' and 'prompt'); "
                                f"got {value!r}.")
    return replace(fmt, **dict(fields))


def _read_file(path: Path) -> list[tuple[str, str, Any]]:
    """``(where, default id, record)`` for every record of a local file."""
    if not path.is_file():
        raise DataError(f"no questions file at {str(path)!r}." if not path.exists() else
                        f"{str(path)!r} is not a file; pass a .jsonl, .json or .parquet file.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(f"{path}, row {n}", f"row-{n}", row) for n, row in enumerate(_read_parquet(path), start=1)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the questions file {str(path)!r}: {exc}.") from None
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json questions file holds an array of objects, got {type(rows).__name__}; "
                            "for one object a line use .jsonl.")
        return [(f"{path}, record {n}", f"row-{n}", row) for n, row in enumerate(rows, start=1)]
    records = []  # JSONL, whatever the suffix
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"{path}, line {number}", f"line-{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    pq = MissingDependencyError.importing("pyarrow.parquet", f"reading {str(path)!r}", "pip install pyarrow, or convert the file to "
                         "JSONL.")
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read the Parquet file {str(path)!r}: {exc}.") from None


def _hub_records(hub: str, short: str, config: str | None, split: str) -> Iterator[tuple[str, str, Any]]:
    """``(where, default id, record)`` for every row of a cached Hub dataset."""
    label = hub + (f" ({config})" if config else "")
    for index, row in enumerate(_load_cached(hub, config, split)):
        yield f"{label}, split {split!r}, row {index}", f"{short}/{split}/{index}", row


def _load_cached(name: str, config: str | None, split: str) -> Any:
    """The rows of Hub dataset ``name`` from the local caches, offline."""
    import huggingface_hub  # a dependency of transformers

    datasets = MissingDependencyError.importing("datasets", f"loading the dataset {name!r} by name",
                               "pip install datasets, or pass a local .jsonl/.parquet file.")
    fetch = (f"Nothing is downloaded here: fetch it on a machine with network (`hf download {name} --repo-type "
             f"dataset`, or datasets.load_dataset({name!r}{f', {config!r}' if config else ''})) "
             "and copy its Hugging Face cache here, or pass a local .jsonl/.parquet file.")
    with _offline(datasets, huggingface_hub):
        try:
            snapshot: Path | None = cached_snapshot(name, repo_type="dataset")
        except MissingPathError:
            snapshot = None
        try:
            return datasets.load_dataset(str(snapshot) if snapshot else name, config, split=split)
        except Exception as error:  # datasets raises many kinds; every one means "not usable offline"
            if snapshot is None:
                raise DataError(f"the dataset {name!r} is not in the Hugging Face cache "
                                f"({hub_cache_dir()}) nor in the datasets cache "
                                f"({datasets.config.HF_DATASETS_CACHE}), and no local file has that name. "
                                f"{fetch}") from None
            raise DataError(f"the cached snapshot of {name!r} ({snapshot}) has no usable config {config!r}, split "
                            f"{split!r}: {type(error).__name__}: {str(error)[:300]}. {fetch}") from None


@contextmanager
def _offline(datasets: Any, huggingface_hub: Any) -> Iterator[None]:
    """Hugging Face offline mode for the block, whatever ``HF_HUB_OFFLINE`` said when the libraries were imported."""
    hub, config = huggingface_hub.constants, datasets.config
    saved = hub.HF_HUB_OFFLINE, config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved
