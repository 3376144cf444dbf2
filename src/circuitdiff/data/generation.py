"""Greedy answers of a model to questions, checked against the references and cached.

:func:`generate_answers` runs the bridge's Hugging Face model with ``generate`` (greedy,
batched, left-padded, at most ``max_new_tokens`` new tokens) and returns one
:class:`Generation` per question. With ``cache=path`` every finished batch is appended to
a JSONL file and flushed, and questions already in the file are not generated again. A
run that is interrupted and started again therefore continues where it stopped. A torn
last line (from a crash mid-write) is ignored and regenerated.

The bridge's KV cache is checked before the first batch. TransformerLens 4.3's attention
reads the cache from ``past_key_values``, but transformers 5.24 passes it as ``cache``:
each step then attends only to itself and GPT-2, Llama, Qwen2 and Mistral generate wrong
tokens. :func:`kv_cache_compat` hands the cache over under the old name during
generation; if the logits of a short generation with the cache still differ from those
without it, generation runs without the cache (correct, slower) and warns.

Correctness is not cached: it is recomputed from the cached text on every call, so a
change to the answer checking applies to old generations too.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from circuitdiff.data.answers import answers_match, extract_answer
from circuitdiff.data.questions import Question
from circuitdiff.errors import DataError

__all__ = ["Generation", "generate_answers", "kv_cache_compat", "kv_cache_is_sound"]


@dataclass(frozen=True)
class Generation:
    """One model's answer to one question.

    Attributes:
        id: the question's id.
        text: the decoded answer (special tokens removed).
        answer_ids: the generated token ids, up to (excluding) the first end-of-sequence token
            of the model's generation config.
        prompt_length: tokens in the prompt.
        extracted: the final answer found in ``text`` (None if none).
        correct: whether ``extracted`` matches the question's reference answer.
    """

    id: str
    text: str
    answer_ids: list[int]
    prompt_length: int
    extracted: str | None
    correct: bool


def generate_answers(
    model: Any,
    questions: Sequence[Question],
    *,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    progress: bool = True,
) -> list[Generation]:
    """Greedy answers of ``model`` (a TransformerBridge from ``cd.load_model``) to ``questions``.

    Returns the generations in question order. See the module docstring for the cache.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError(f"batch_size and max_new_tokens must be >= 1; got {batch_size} and {max_new_tokens}.")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError("question ids must be unique.")
    from circuitdiff.models import describe_model

    source = {"model": describe_model(model).model_id, "max_new_tokens": max_new_tokens}
    cached = _read_cache(Path(cache), source) if cache is not None else {}
    todo = [q for q in questions if q.id not in cached]
    hf_model, tokenizer = model.original_model, model.tokenizer
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="generating", unit="question",
               disable=not progress)
    with kv_cache_compat(hf_model):
        use_cache = not todo or kv_cache_is_sound(hf_model, tokenizer, todo[0].prompt)
        if not use_cache:
            warnings.warn("generation with the KV cache gives other logits than without it on this TransformerLens/"
                          "transformers pair; generating without the cache (correct, but slower for long answers).",
                          stacklevel=2)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            records = [{**r, **source} for r in _generate(hf_model, tokenizer, batch, max_new_tokens, use_cache)]
            if cache is not None:
                with open(cache, "a", encoding="utf-8") as f:
                    for record in records:
                        f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            cached.update((r["id"], r) for r in records)
            bar.update(len(batch))
    bar.close()
    out = []
    for q in questions:
        r = cached[q.id]
        extracted = extract_answer(r["text"])
        out.append(Generation(q.id, r["text"], list(r["answer_ids"]), int(r["prompt_length"]), extracted,
                              answers_match(extracted, q.answer)))
    return out


@contextmanager
def kv_cache_compat(hf_model: Any) -> Iterator[None]:
    """While active, TransformerLens's attention components find a KV cache passed as
    ``cache`` (transformers >= 5.2x) under ``past_key_values``, the name they read."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def rename(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [m.register_forward_pre_hook(rename, with_kwargs=True)
               for m in hf_model.modules() if isinstance(m, AttentionBridge)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def kv_cache_is_sound(hf_model: Any, tokenizer: Any, prompt: str, steps: int = 8) -> bool:
    """Whether greedy generation with the KV cache gives the logits it gives without it.

    ``steps`` tokens are generated from ``prompt`` both ways; the cache is sound when the
    largest logit difference is at most 2% of the largest logit (bfloat16 rounding stays
    well inside that; a broken cache differs by the logits' own size).
    """
    logits = []
    for use_cache in (True, False):
        output, _ = _greedy(hf_model, tokenizer, [prompt], steps, use_cache,
                            output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(output.logits).float())
    cached, plain = logits
    if cached.shape != plain.shape:
        return False
    return bool((cached - plain).abs().max() <= 0.02 * plain.abs().max())


def _greedy(hf_model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, use_cache: bool,
            **options: Any) -> tuple[Any, Any]:
    """``hf_model.generate`` greedily on left-padded ``prompts``; returns (output, encoded prompts)."""
    side = tokenizer.padding_side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        tokenizer.padding_side = "left"  # generation continues from the last position of every row
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        output = hf_model.generate(
            input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, use_cache=use_cache, **options,
        )
    return output, encoded


def _generate(hf_model: Any, tokenizer: Any, batch: Sequence[Question], max_new_tokens: int,
              use_cache: bool) -> list[dict]:
    """One batched greedy ``generate`` call; JSON-ready records."""
    output, encoded = _greedy(hf_model, tokenizer, [q.prompt for q in batch], max_new_tokens, use_cache)
    width = encoded["input_ids"].shape[1]
    stops = hf_model.generation_config.eos_token_id  # what generate stops at: an id, a list, or None
    stops = set(stops if isinstance(stops, list) else [] if stops is None else [stops])
    records = []
    for i, q in enumerate(batch):
        new = output[i, width:].tolist()
        end = next((j for j, t in enumerate(new) if t in stops), len(new))
        new = new[:end]
        records.append({"id": q.id, "text": tokenizer.decode(new, skip_special_tokens=True), "answer_ids": new,
                        "prompt_length": int(encoded["attention_mask"][i].sum())})
    return records


def _read_cache(path: Path, source: dict[str, Any]) -> dict[str, dict]:
    """Records by id from a generation cache; a torn last line is dropped (rewritten without it).

    Refuses a cache written for another model or ``max_new_tokens`` (``source``).
    """
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            parsed = {"id": str(record["id"]), "text": str(record["text"]),
                      "answer_ids": [int(t) for t in record["answer_ids"]],
                      "prompt_length": int(record["prompt_length"])}
            written_for = {key: record[key] for key in source}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):  # interrupted while writing: forget it, regenerate that question
                path.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
                break
            raise DataError(f"{path}, line {number}: not a generation record; delete the cache file to "
                            "regenerate.") from None
        if written_for != source:
            raise DataError(f"{path}, line {number}: cached for {written_for}, but this run is {source}; use "
                            "another cache file per model and setting (or delete it to regenerate).")
        records[parsed["id"]] = parsed
    return records
