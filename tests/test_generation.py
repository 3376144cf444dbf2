"""generate_answers: batched greedy generation equals plain Hugging Face generation; the cache resumes runs,
never reuses answers made under another identity and survives torn writes; bad models and long prompts fail clearly."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib import resources

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm
from circuitdiff.data import Question, generate_answers
from circuitdiff.data import generation
from circuitdiff.data.generation import kv_cache_compat, kv_cache_is_sound
from circuitdiff.identity import fingerprint, library_version, model_identity
from circuitdiff.models import describe_model

QUESTIONS = [Question("a", "w1 w2 w3", "4"), Question("b", "w5 w6", "7"), Question("c", "w9 w10 w11 w12 w13", "x")]


def answer_identity(model, prompt, max_new_tokens):
    """The identity a cached answer of ``model`` (a bridge) must carry."""
    config = {k: v for k, v in model.original_model.generation_config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    return {"circuitdiff": library_version(), "model": model_identity(model),
            "prompt": hashlib.sha256(prompt.encode()).hexdigest(),
            "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "config": fingerprint(config)}}


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


def test_cache_is_written_and_reused(checkpoints, tmp_path, monkeypatch):
    model = cd.load_model(checkpoints["llama"], device="cpu")  # its tokenizer not used yet
    cache = tmp_path / "gen.jsonl"
    first = generate_answers(model, QUESTIONS, cache=cache, batch_size=2, max_new_tokens=3, progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["identity"] == answer_identity(model, QUESTIONS[0].prompt, 3)

    def fail(*args, **kwargs):
        raise AssertionError("generate must not run: everything is cached")

    monkeypatch.setattr(model.original_model, "generate", fail)
    assert generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False) == first


def test_stub_cache_decides_correctness(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    records = [{"id": "a", "text": "so it is \\boxed{4}", "answer_ids": [1, 2], "prompt_length": 3},
               {"id": "b", "text": "I think 8", "answer_ids": [3], "prompt_length": 2},
               {"id": "c", "text": "it is \\boxed{X}", "answer_ids": [4], "prompt_length": 5}]
    cache.write_text("".join(json.dumps({**r, "identity": answer_identity(model, q.prompt, 8)}) + "\n"
                             for r, q in zip(records, QUESTIONS)))
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("cached"))
    out = generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=8, progress=False)
    assert [g.correct for g in out] == [True, False, True]
    assert [g.extracted for g in out] == ["4", "8", "X"]  # string answers compare case-insensitively


# ------------------------------------------------------------------ stale answers are refused
def demo_checkpoint(name, tmp_path):
    """A copy of a bundled demo checkpoint (``base``, ``grpo``, ``dpo``) in ``tmp_path/model``."""
    target = tmp_path / "model"
    with resources.as_file(resources.files("circuitdiff") / "demo_data" / name) as source:
        if target.exists():
            shutil.copy(source / "model.safetensors", target / "model.safetensors")
        else:
            shutil.copytree(source, target)
    return target


def demo_questions(n=2):
    lines = (resources.files("circuitdiff") / "demo_data" / "questions.jsonl").read_text().splitlines()[:n]
    return [Question(r["id"], r["prompt"], r["answer"]) for r in map(json.loads, lines)]


def refused(match, model, questions, cache, **options):
    """Assert that generate_answers refuses ``cache``; return the message."""
    with pytest.raises(cd.IdentityMismatchError, match=match) as info:
        generate_answers(model, questions, cache=cache, progress=False, **options)
    message = str(info.value)
    assert str(cache) in message and "fresh=True" in message and "--fresh on the command line" in message
    return message


def test_an_edited_prompt_is_refused(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    edited = [QUESTIONS[0], Question("b", "Answer briefly. w5 w6", "7"), QUESTIONS[2]]  # e.g. a new template
    refused(r"line 2: the cached answer to question 'b' .*the prompt changed", model, edited, cache,
            max_new_tokens=3)


def test_other_weights_at_the_same_path_are_refused(tmp_path):
    questions, cache = demo_questions(), tmp_path / "gen.jsonl"
    path = demo_checkpoint("base", tmp_path)
    generate_answers(cd.load_model(path, device="cpu"), questions, cache=cache, max_new_tokens=2, progress=False)
    demo_checkpoint("grpo", tmp_path)  # same directory, GRPO's weights
    message = refused("the model weights changed", cd.load_model(path, device="cpu"), questions, cache,
                      max_new_tokens=2)
    assert "dtype" not in message


def test_a_dtype_change_is_refused(tmp_path):
    questions, cache = demo_questions(), tmp_path / "gen.jsonl"
    path = demo_checkpoint("base", tmp_path)
    generate_answers(cd.load_model(path, device="cpu"), questions, cache=cache, max_new_tokens=2, progress=False)
    refused('the model dtype changed \\(stored "float32", now "bfloat16"\\)',
            cd.load_model(path, device="cpu", dtype=torch.bfloat16), questions, cache, max_new_tokens=2)


def test_an_in_memory_model_edited_in_place_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions, cache = demo_questions(), tmp_path / "gen.jsonl"
    path = demo_checkpoint("base", tmp_path)
    model = cd.load_model(AutoModelForCausalLM.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path))
    generate_answers(model, questions, cache=cache, max_new_tokens=2, progress=False)
    with torch.no_grad():
        next(model.original_model.parameters())[0, 0] += 1.0
    refused("the model weights changed", model, questions, cache, max_new_tokens=2)


def test_fresh_regenerates_everything(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    edited = [Question(q.id, q.prompt + " w20", q.answer) for q in QUESTIONS]
    refused("the prompt changed", model, edited, cache, max_new_tokens=3)
    again = generate_answers(model, edited, cache=cache, fresh=True, max_new_tokens=3, progress=False)
    assert again == generate_answers(model, edited, max_new_tokens=3, progress=False)
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["identity"] for r in records] == [answer_identity(model, q.prompt, 3) for q in edited]


def test_a_cache_in_a_missing_folder_fails_before_generating(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(cd.MissingPathError, match="folder that does not exist"):
        generate_answers(model, QUESTIONS, cache=tmp_path / "missing" / "gen.jsonl", progress=False)


def test_another_generation_config_is_refused(checkpoints, tmp_path):
    model = cd.load_model(checkpoints["llama"], device="cpu")
    cache = tmp_path / "gen.jsonl"
    generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    model.original_model.generation_config.eos_token_id = [tm.VOCAB - 1, 5]  # another stop token: other answers
    refused("the generation settings changed", model, QUESTIONS, cache, max_new_tokens=3)


def test_records_of_an_older_circuitdiff_are_refused(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    old = {"id": "a", "text": "w1", "answer_ids": [1], "prompt_length": 3, "model": describe_model(model).model_id,
           "max_new_tokens": 3}  # what circuitdiff wrote before records carried an identity
    cache.write_text(json.dumps(old) + "\n")
    refused("line 1: the cached answer to question 'a' was written by an older circuitdiff", model, QUESTIONS, cache,
            max_new_tokens=3)


# ------------------------------------------------------------------ torn writes
def generated_ids(monkeypatch):
    """The question ids generate_answers generates from now on (cached ones are not)."""
    seen = []
    original = generation._generate

    def record(hf_model, tokenizer, batch, *args):
        seen.extend(q.id for q in batch)
        return original(hf_model, tokenizer, batch, *args)

    monkeypatch.setattr(generation, "_generate", record)
    return seen


def test_a_complete_record_without_its_newline_is_kept(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    complete = generate_answers(model, QUESTIONS, cache=tmp_path / "complete.jsonl", max_new_tokens=3,
                                progress=False)
    generate_answers(model, QUESTIONS[:2], cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    cache.write_text(cache.read_text().rstrip("\n"))  # killed after the record, before its newline
    seen = generated_ids(monkeypatch)
    assert generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False) == complete
    assert seen == ["c"]  # "b" was kept
    lines = cache.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]  # "c" landed on its own line


def test_glued_records_are_recovered(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    complete = generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + lines[1] + "\n" + lines[2] + "\n")  # damaged by an older circuitdiff
    seen = generated_ids(monkeypatch)
    assert generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False) == complete
    assert seen == []


def test_torn_last_line_is_regenerated(get_model, tmp_path, monkeypatch):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    complete = generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])  # crash mid-write
    resumed = generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False)
    assert resumed == complete
    assert cache.read_text().splitlines() == lines
    # a complete record with an incomplete one glued on: the complete one is kept
    cache.write_text(lines[0] + "\n" + lines[1] + lines[2][: len(lines[2]) // 2])
    seen = generated_ids(monkeypatch)
    assert generate_answers(model, QUESTIONS, cache=cache, batch_size=1, max_new_tokens=3, progress=False) == complete
    assert seen == ["c"] and cache.read_text().splitlines() == lines


def test_bad_caches_are_refused(get_model, tmp_path):
    model = get_model("llama")
    cache = tmp_path / "gen.jsonl"
    generate_answers(model, QUESTIONS[:2], cache=cache, max_new_tokens=3, progress=False)
    refused(r"the generation settings changed", model, QUESTIONS, cache, max_new_tokens=5)
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\ngarbage\n" + lines[1] + "\n")
    with pytest.raises(cd.DataError, match="line 2: not a generation record"):
        generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    cache.write_text(lines[0] + "garbage\n" + lines[1] + "\n")  # not a record glued onto one
    with pytest.raises(cd.DataError, match="line 1: not a generation record"):
        generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=3, progress=False)
    with pytest.raises(cd.DataError, match="ids must be unique"):
        generate_answers(model, [QUESTIONS[0], QUESTIONS[0]], progress=False)
    with pytest.raises(cd.DataError, match="max_new_tokens must be"):
        generate_answers(model, QUESTIONS, max_new_tokens=0, progress=False)


# ------------------------------------------------------------------ bad models, long prompts
@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # learned positions (IndexError before), rotary (silently wrong)
def test_a_prompt_longer_than_the_context_is_refused_before_generating(get_model, monkeypatch, arch):
    model = get_model(arch)
    assert model.cfg.n_ctx == 64
    fits = Question("fits", " ".join(f"w{i % 30}" for i in range(20)), "1")
    long = Question("long", " ".join(f"w{i % 30}" for i in range(60)), "1")
    n = len(model.tokenizer(long.prompt)["input_ids"])
    monkeypatch.setattr(model.original_model, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(cd.DataError) as info:
        generate_answers(model, [fits, long], batch_size=1, max_new_tokens=8, progress=False)
    message = str(info.value)
    for part in ("question 'long'", f"{n} tokens", "max_new_tokens=8", f"{n + 8}", "context of 64",
                 "Lower max_new_tokens or shorten the prompt"):
        assert part in message, part
    monkeypatch.undo()
    exact = generate_answers(model, [long], max_new_tokens=64 - n, progress=False)[0]  # filling the context is fine
    assert exact.prompt_length == n and len(exact.answer_ids) <= 64 - n


def test_nan_weights_raise_naming_the_parameter(checkpoints):
    model = cd.load_model(checkpoints["llama"], device="cpu")
    with torch.no_grad():
        dict(model.original_model.named_parameters())[
            "model.layers.1._original_component.mlp._original_component.up_proj._original_component.weight"][0, 0] = \
            float("nan")
    with pytest.raises(cd.NonFiniteError, match=r"1 parameter\(s\) hold NaN or inf \(model\.layers\.1\.mlp\.up_proj"
                                                r"\.weight\)\. The checkpoint is damaged"):
        generate_answers(model, QUESTIONS, max_new_tokens=3, progress=False)


class StandInVLLM:
    """vLLM's API as generate_answers uses it (``LLM(...).generate(prompts, SamplingParams)``), backed by plain
    Hugging Face greedy generation of the checkpoint at ``model``: vLLM itself needs a GPU."""

    def __init__(self):
        self.engines = []

    def SamplingParams(self, **options):
        return dict(options)

    def LLM(self, **options):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        stand_in = self
        tokenizer, hf = AutoTokenizer.from_pretrained(options["model"]), AutoModelForCausalLM.from_pretrained(
            options["model"], dtype=getattr(torch, options["dtype"]))

        class Engine:
            def generate(self, prompts, params, use_tqdm):
                assert params == {"temperature": 0.0, "max_tokens": params["max_tokens"]} and not use_tqdm
                outputs = []
                for prompt in prompts:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                    new = hf.generate(input_ids=ids, max_new_tokens=params["max_tokens"], do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
                    completion = type("Completion", (), {"token_ids": tuple(new)})  # vLLM keeps the stop token
                    outputs.append(type("RequestOutput", (), {"prompt_token_ids": ids[0].tolist(),
                                                              "outputs": [completion]}))
                return outputs

        stand_in.engines.append(options)
        return Engine()


def test_the_vllm_backend_gives_the_answers_plain_generation_gives(get_model, checkpoints, tmp_path, monkeypatch):
    stand_in = StandInVLLM()
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (60, 100))
    model = get_model("llama", "float64")
    cache = tmp_path / "answers.jsonl"
    answers = generate_answers(model, QUESTIONS, cache=cache, batch_size=2, max_new_tokens=6, progress=False,
                               backend="vllm")
    for q, g in zip(QUESTIONS, answers):
        ids, prompt_length = plain_generation(checkpoints["llama"], q, 6)
        assert (g.answer_ids, g.prompt_length) == (ids, prompt_length), q.id
        assert g.text == model.tokenizer.decode(ids, skip_special_tokens=True)
    (engine,) = stand_in.engines  # one engine for the call, on the checkpoint's files, within the free memory
    assert engine["model"] == str(checkpoints["llama"]) and engine["dtype"] == "float64" and engine["seed"] == 0
    assert engine["gpu_memory_utilization"] == pytest.approx(0.54)
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert all(r["identity"]["generation"]["backend"] == "vllm" for r in records)
    with pytest.raises(cd.IdentityMismatchError, match="another identity"):  # never mixed with the hf backend's
        generate_answers(model, QUESTIONS, cache=cache, max_new_tokens=6, progress=False)
    with pytest.raises(cd.ArgumentError, match="unknown generation backend"):
        generate_answers(model, QUESTIONS, backend="sglang")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(cd.MissingDependencyError, match=r"circuitdiff\[vllm\]"):
        generate_answers(model, QUESTIONS, max_new_tokens=6, progress=False, backend="vllm")
