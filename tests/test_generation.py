"""generate_answers: batched greedy generation equals one question at a time; the cache resumes runs."""

from __future__ import annotations

import json

import pytest

import circuitdiff as cd
from circuitdiff.data import Question, generate_answers
from circuitdiff.models import describe_model

QUESTIONS = [Question("a", "w1 w2 w3", "4"), Question("b", "w5 w6", "7"), Question("c", "w9 w10 w11 w12 w13", "x")]


def test_batched_equals_one_at_a_time(get_model, tmp_path):
    model = get_model("llama", "float64")
    batched = generate_answers(model, QUESTIONS, batch_size=3, max_new_tokens=4, progress=False)
    for q, g in zip(QUESTIONS, batched):
        ids = model.tokenizer(q.prompt, return_tensors="pt")["input_ids"]
        alone = model.original_model.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                              pad_token_id=model.tokenizer.pad_token_id)
        assert g.answer_ids == alone[0, ids.shape[1]:].tolist(), q.id
        assert g.prompt_length == ids.shape[1] and g.id == q.id
        assert g.text == model.tokenizer.decode(g.answer_ids, skip_special_tokens=True)


def test_cache_is_written_and_reused(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    first = generate_answers(model, QUESTIONS, cache=cache, batch_size=2, max_new_tokens=3, progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["model"] == describe_model(model).model_id

    def fail(*args, **kwargs):
        raise AssertionError("generate must not run: everything is cached")

    monkeypatch.setattr(model.original_model, "generate", fail)
    assert generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False) == first


def test_stub_cache_decides_correctness(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    source = {"model": describe_model(model).model_id, "max_new_tokens": 8}
    cache = tmp_path / "gen.jsonl"
    records = [{"id": "a", "text": "so it is \\boxed{4}", "answer_ids": [1, 2], "prompt_length": 3, **source},
               {"id": "b", "text": "I think 8", "answer_ids": [3], "prompt_length": 2, **source},
               {"id": "c", "text": "it is \\boxed{X}", "answer_ids": [4], "prompt_length": 5, **source}]
    cache.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("cached"))
    out = generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=8, progress=False)
    assert [g.correct for g in out] == [True, False, True]
    assert [g.extracted for g in out] == ["4", "8", "X"]  # string answers compare case-insensitively


def test_torn_last_line_is_regenerated(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    complete = generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])  # crash mid-write
    resumed = generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    assert resumed == complete
    assert len(cache.read_text().splitlines()) == 3


def test_bad_caches_are_refused(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    generate_answers(model, QUESTIONS[:2], cache=cache, max_new_tokens=3, progress=False)
    with pytest.raises(cd.DataError, match="cached for .* but this run is"):
        generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=5, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text("garbage\n" + "\n".join(lines) + "\n")
    with pytest.raises(cd.DataError, match="line 1: not a generation record"):
        generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    with pytest.raises(cd.DataError, match="ids must be unique"):
        generate_answers(model, [QUESTIONS[0], QUESTIONS[0]], progress=False)
    with pytest.raises(cd.DataError, match="max_new_tokens must be"):
        generate_answers(model, QUESTIONS, max_new_tokens=0, progress=False)
