"""Dataset loaders: local JSONL/JSON/Parquet files and cached Hugging Face datasets, read offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import circuitdiff as cd
from circuitdiff.data.datasets import DATASETS, DatasetFormat, load_questions
from circuitdiff.data.questions import read_questions

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def plain(question: str) -> str:
    """The "plain" template, written out by hand."""
    return f"{question}\n{INSTRUCTION}\n"


# ---------------------------------------------------------------------- local files
def test_math500_file():
    questions = load_questions(FIXTURES / "math500.jsonl", dataset_format="math500")
    assert [q.id for q in questions] == ["test/algebra/1.json", "test/prealgebra/2.json",
                                         "test/number_theory/3.json", "test/algebra/4.json"]
    assert [q.answer for q in questions] == ["1024", "\\frac{3}{4}", "6", "7"]
    assert questions[1].prompt == "Simplify $\\frac{6}{8}$.\n" + INSTRUCTION + "\n"


def test_gsm8k_file_takes_the_answer_after_the_marker():
    questions = load_questions(FIXTURES / "gsm8k.jsonl", dataset_format="gsm8k")
    assert [q.answer for q in questions] == ["18", "1234", "3"]  # "#### 1,234" loses its thousands separator
    assert [q.id for q in questions] == ["line-1", "line-2", "line-3"]
    assert questions[0].prompt == plain("Ann has 3 boxes of 6 pens. How many pens does she have?")


def test_college_math_file_numbers_its_questions():
    questions = load_questions(FIXTURES / "college_math.jsonl", dataset_format="college-math")
    # question_number repeats across textbooks ("1.1" twice), so ids come from the position
    assert [q.id for q in questions] == ["line-1", "line-2", "line-3"]
    assert [q.answer for q in questions] == ["$10-4 n$", "$2$", "$2$"]
    assert questions[0].prompt == plain("Simplify: $-10-4(n-5)$")


def test_questions_file_schema_matches_read_questions():
    questions = load_questions(FIXTURES / "questions.jsonl")
    assert [(q.id, q.answer) for q in questions] == [("sum", "4"), ("line-3", "9"), ("line-4", "3")]
    assert questions[0].prompt == plain("What is 2 + 2?")
    assert questions[1].prompt == "Q: 3 * 3 = ? A:"  # a ready prompt is kept as is
    assert read_questions(FIXTURES / "questions.jsonl") == questions
    assert read_questions(FIXTURES / "questions.jsonl", "Q: {question} A:")[2].prompt == "Q: What is 10 - 7? A:"


def test_parquet_file_and_field_mapping(tmp_path):
    import pyarrow.parquet as pq  # the test extra installs the data extra: a missing one is a failure
    import pyarrow as pa

    rows = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    expected = load_questions(FIXTURES / "math500.jsonl", dataset_format="math500")
    assert load_questions(path, dataset_format="math500") == expected
    mapped = load_questions(path, fields={"question": "problem", "id": "unique_id"})
    assert mapped == expected
    unnamed = load_questions(path, fields={"question": "problem", "id": None})
    assert [q.id for q in unnamed] == ["row-1", "row-2", "row-3", "row-4"]


def test_json_array_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "What is 1 + 1?", "answer": 2}, {"question": "And 2 + 3?", "answer": 5}]))
    questions = load_questions(path)
    assert [(q.id, q.prompt, q.answer) for q in questions] == [
        ("row-1", plain("What is 1 + 1?"), "2"), ("row-2", plain("And 2 + 3?"), "5")]


def test_max_questions_keeps_the_first_and_ids_are_stable():
    first = load_questions(FIXTURES / "math500.jsonl", dataset_format="math500", max_questions=2)
    assert [q.id for q in first] == ["test/algebra/1.json", "test/prealgebra/2.json"]
    again = load_questions(FIXTURES / "math500.jsonl", dataset_format="math500")
    assert again[:2] == first and len({q.id for q in again}) == len(again) == 4
    assert len(load_questions(FIXTURES / "gsm8k.jsonl", dataset_format="gsm8k", max_questions=10)) == 3


def write(tmp_path, lines, name="q.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return path


@pytest.mark.parametrize(("lines", "options", "message"), [
    ([{"question": "q", "answer": "#### 1"}, {"question": "q"}], {"dataset_format": "gsm8k"},
     r"q\.jsonl, line 2: no reference answer \(an \"answer\" field is required\)"),
    ([{"question": "q", "answer": "It is 4."}], {"dataset_format": "gsm8k"},
     r"line 1: \"answer\" has no '#### ' marker .* gsm8k format"),
    ([{"question": "q", "answer": "1", "unique_id": "a"}], {"dataset_format": "math500"},
     r"line 1: needs a \"problem\" \(non-empty string\)"),
    ([{"problem": "p", "answer": "1", "unique_id": "a"}, {"problem": "p", "answer": "2", "unique_id": "a"}],
     {"dataset_format": "math500"}, r"line 2: id 'a' appears twice"),
    ([{"problem": "p", "answer": [1]}], {"fields": {"question": "problem"}}, r"line 1: \"answer\" must be a string"),
    ([{"question": "q", "answer": 1}, "{broken"], {}, r"q\.jsonl, line 2: not valid JSON"),
    (["", "  "], {}, r"the questions file .* holds no questions"),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, options, message):
    with pytest.raises(cd.DataError, match=message):
        load_questions(write(tmp_path, lines), **options)


def test_bad_json_and_parquet_files(tmp_path):
    import pyarrow.parquet as pq  # the test extra installs the data extra: a missing one is a failure
    import pyarrow as pa

    with pytest.raises(cd.DataError, match=r"q\.json: a \.json questions file holds an array of objects, got dict"):
        load_questions(write(tmp_path, [{"question": "q", "answer": 1}], name="q.json"))
    with pytest.raises(cd.DataError, match=r"q\.json, record 2: expected a JSON object, got int"):
        load_questions(write(tmp_path, ['[{"question": "q", "answer": 1}, 7]'], name="q.json"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(cd.DataError, match=r"cannot read the Parquet file .*bad\.parquet"):
        load_questions(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "1"}, {"question": "r", "answer": None}]),
                   tmp_path / "rows.parquet")
    with pytest.raises(cd.DataError, match=r"rows\.parquet, row 2: no reference answer"):
        load_questions(tmp_path / "rows.parquet")


def test_bad_arguments(tmp_path):
    path = FIXTURES / "questions.jsonl"
    with pytest.raises(cd.DataError, match=r"no questions file at .*missing\.jsonl"):
        load_questions(tmp_path / "missing.jsonl")
    with pytest.raises(cd.DataError, match=r"neither a questions file .* nor a known dataset \(math500, gsm8k, "
                                           r"college-math\) nor a Hub id"):
        load_questions("no-such-thing")
    with pytest.raises(cd.DataError, match=r"'questions' is neither a questions file"):
        load_questions("questions")  # a format without a Hub dataset is no dataset name
    with pytest.raises(cd.UnknownNameError, match=r"unknown dataset format 'math5000'; available: questions, "
                                                  r"math500, gsm8k, college-math"):
        load_questions(path, dataset_format="math5000")
    with pytest.raises(cd.ArgumentError, match=r"fields: unknown key\(s\) 'problem'"):
        load_questions(path, fields={"problem": "question"})
    with pytest.raises(cd.ArgumentError, match=r"fields\['answer'\] must be a field name"):
        load_questions(path, fields={"answer": None})
    with pytest.raises(cd.ArgumentError, match="split and config apply to Hub datasets"):
        load_questions(path, split="train")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(cd.ArgumentError, match="max_questions must be a positive integer"):
            load_questions(path, max_questions=bad)


def test_optional_dependencies_are_named(tmp_path, monkeypatch):
    (tmp_path / "q.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    with pytest.raises(cd.MissingDependencyError, match="pip install pyarrow"):
        load_questions(tmp_path / "q.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(cd.MissingDependencyError, match="needs datasets, which is not installed .*pip install datasets"):
        load_questions("gsm8k")


# ---------------------------------------------------------------------- Hugging Face datasets, offline
REVISION = "0123456789abcdef0123456789abcdef01234567"
GSM8K_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
# a two-row stand-in for openai/gsm8k
"""


def snapshot(hub: Path, repo: str) -> Path:
    """An empty snapshot of dataset ``repo`` in the hub cache, laid out as huggingface_hub leaves it."""
    folder = hub / ("datasets--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "snapshots" / REVISION).mkdir(parents=True)
    return folder / "snapshots" / REVISION


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home in tmp_path, online as far as the environment says."""
    import datasets  # the test extra installs the data extra: a missing one is a failure
    import huggingface_hub
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    # both libraries read these when imported; the test process imported them already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return home


@pytest.fixture
def cached_gsm8k(hf_home) -> Path:
    import pyarrow.parquet as pq  # the test extra installs the data extra: a missing one is a failure
    import pyarrow as pa

    folder = snapshot(hf_home / "hub", "openai/gsm8k")
    (folder / "README.md").write_text(GSM8K_CARD)
    (folder / "main").mkdir()
    pq.write_table(pa.Table.from_pylist([{"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"},
                                         {"question": "What is 1000 + 1?", "answer": "#### 1,001"}]),
                   folder / "main" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "What is 1 + 1?", "answer": "#### 2"}]),
                   folder / "main" / "train-00000-of-00001.parquet")
    return folder


def test_gsm8k_by_name_from_the_hub_cache(cached_gsm8k, monkeypatch):
    import datasets
    import huggingface_hub

    flags = []
    original = datasets.load_dataset

    def spy(*args, **kwargs):
        flags.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    questions = load_questions("gsm8k")
    monkeypatch.setattr(datasets, "load_dataset", original)
    assert flags == [(True, True)]  # offline while loading, whatever the environment said
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == (False, False)  # restored
    assert [(q.id, q.answer) for q in questions] == [("gsm8k/test/0", "42"), ("gsm8k/test/1", "1001")]
    assert questions[0].prompt == plain("What is 6 * 7?")
    assert load_questions("openai/gsm8k") == questions  # the Hub id names the same dataset
    train = load_questions("gsm8k", split="train")
    assert [(q.id, q.answer) for q in train] == [("gsm8k/train/0", "2")]
    assert len(load_questions("gsm8k", max_questions=1)) == 1


def test_math500_by_name_uses_its_unique_ids(hf_home):
    folder = snapshot(hf_home / "hub", "HuggingFaceH4/MATH-500")
    (folder / "test.jsonl").write_text((FIXTURES / "math500.jsonl").read_text())
    assert load_questions("math500") == load_questions(FIXTURES / "math500.jsonl", dataset_format="math500")


def test_any_hub_id_with_fields(hf_home):
    folder = snapshot(hf_home / "hub", "someone/quiz")
    rows = [{"q": "What is 5 - 2?", "a": 3, "key": "k1"}, {"q": "What is 9 / 3?", "a": 3, "key": "k2"}]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    questions = load_questions("someone/quiz", fields={"question": "q", "answer": "a", "id": "key"})
    assert [(q.id, q.prompt, q.answer) for q in questions] == [("k1", plain("What is 5 - 2?"), "3"),
                                                               ("k2", plain("What is 9 / 3?"), "3")]
    unnamed = load_questions("someone/quiz", fields={"question": "q", "answer": "a"})
    assert [q.id for q in unnamed] == ["someone/quiz/test/0", "someone/quiz/test/1"]


def test_a_mirror_read_with_a_named_format(hf_home):
    folder = snapshot(hf_home / "hub", "someone/gsm8k-mirror")  # one JSONL file, no "main" config
    (folder / "test.jsonl").write_text((FIXTURES / "gsm8k.jsonl").read_text())
    questions = load_questions("someone/gsm8k-mirror", dataset_format="gsm8k")
    assert [(q.id, q.answer) for q in questions] == [("someone/gsm8k-mirror/test/0", "18"),
                                                     ("someone/gsm8k-mirror/test/1", "1234"),
                                                     ("someone/gsm8k-mirror/test/2", "3")]


def test_not_cached_says_how_to_fetch(hf_home):
    with pytest.raises(cd.DataError, match=r"'openai/gsm8k' is not in the Hugging Face cache .*Nothing is "
                                           r"downloaded here.*hf download openai/gsm8k --repo-type "
                                           r"dataset"):
        load_questions("gsm8k")
    assert not (hf_home / "hub" / "datasets--openai--gsm8k").exists()  # and nothing was fetched


def test_cached_snapshot_without_the_split(cached_gsm8k):
    with pytest.raises(cd.DataError, match=r"the cached snapshot of 'openai/gsm8k' .* has no usable config "
                                           r"'main', split 'validation'"):
        load_questions("gsm8k", split="validation")


def test_falls_back_to_the_datasets_cache(hf_home, monkeypatch):
    """Without a hub snapshot, ``datasets.load_dataset(name)`` reads its own prepared cache (offline)."""
    import datasets

    calls = []

    def prepared(path, config, split):
        calls.append((path, config, split, datasets.config.HF_HUB_OFFLINE))
        return [{"question": "What is 3 + 4?", "answer": "#### 7"}]

    monkeypatch.setattr(datasets, "load_dataset", prepared)
    questions = load_questions("gsm8k")
    assert calls == [("openai/gsm8k", "main", "test", True)]
    assert [(q.id, q.answer) for q in questions] == [("gsm8k/test/0", "7")]


@pytest.mark.slow
def test_by_name_in_a_fresh_process_with_hf_home(tmp_path):
    """The user's path: only HF_HOME set, the libraries imported fresh, offline forced by circuitdiff."""
    folder = snapshot(tmp_path / "hub", "HuggingFaceH4/MATH-500")
    (folder / "test.jsonl").write_text((FIXTURES / "math500.jsonl").read_text())
    code = ("from circuitdiff.data.datasets import load_questions\n"
            "print([q.id for q in load_questions('math500', max_questions=2)])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['test/algebra/1.json', 'test/prealgebra/2.json']"


def test_named_formats():
    assert DATASETS["gsm8k"] == DatasetFormat("gsm8k", id=None, prompt=None, answer_marker="#### ",
                                              hub="openai/gsm8k", config="main")
    assert (DATASETS["math500"].hub, DATASETS["math500"].question, DATASETS["math500"].id) == (
        "HuggingFaceH4/MATH-500", "problem", "unique_id")
    assert DATASETS["college-math"].hub == "di-zhang-fdu/College_Math_Test"
