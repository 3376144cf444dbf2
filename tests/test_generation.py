"""generate_answers: batched greedy generation equals plain Hugging Face generation; the cache resumes runs."""

from __future__ import annotations

import json

import pytest
import torch

import circuitdiff as cd
from circuitdiff.data import Question, generate_answers
from circuitdiff.data.generation import kv_cache_compat, kv_cache_is_sound
from circuitdiff.models import describe_model

QUESTIONS = [Question("a", "w1 w2 w3", "4"), Question("b", "w5 w6", "7"), Question("c", "w9 w10 w11 w12 w13", "x")]


def plain_generation(checkpoint, question, max_new_tokens):
    """Reference: the checkpoint loaded by Hugging Face alone (no TransformerLens), one question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    ids = tokenizer(question.prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    return new[:next((i for i, t in enumerate(new) if t in stops), len(new))], ids.shape[1]  # up to the first EOS


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "mistral"])
def test_batched_answers_equal_plain_hugging_face_generation(get_model, checkpoints, arch):
    # catches a wrong BOS token and a KV cache that the bridge's attention ignores
    model = get_model(arch, "float64")
    batched = generate_answers(model, QUESTIONS, batch_size=3, max_new_tokens=6, progress=False)
    for q, g in zip(QUESTIONS, batched):
        ids, prompt_length = plain_generation(checkpoints[arch], q, 6)
        assert g.answer_ids == ids, q.id
        assert g.prompt_length == prompt_length and g.id == q.id
        assert g.text == model.tokenizer.decode(g.answer_ids, skip_special_tokens=True)


def break_kv_cache(model):
    """Hooks that hide the KV cache from every attention layer (each step then sees only itself)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def hide(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}

    return [m.register_forward_pre_hook(hide, with_kwargs=True) for m in model.original_model.modules()
            if isinstance(m, AttentionBridge)]


def test_a_broken_kv_cache_is_detected_and_avoided(get_model, checkpoints):
    model = get_model("llama", "float64")
    with kv_cache_compat(model.original_model):
        assert kv_cache_is_sound(model.original_model, model.tokenizer, QUESTIONS[0].prompt) is True
    handles = break_kv_cache(model)
    try:
        with kv_cache_compat(model.original_model):
            assert kv_cache_is_sound(model.original_model, model.tokenizer, QUESTIONS[0].prompt) is False
        with pytest.warns(UserWarning, match="without the cache"):
            answers = generate_answers(model, QUESTIONS, batch_size=2, max_new_tokens=6, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert [g.answer_ids for g in answers] == [plain_generation(checkpoints["llama"], q, 6)[0] for q in QUESTIONS]


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
