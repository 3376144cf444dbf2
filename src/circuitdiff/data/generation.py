"""Greedy answers of a model to questions, checked against the references and cached.

:func:`generate_answers` runs the bridge's Hugging Face model with ``generate`` (greedy,
batched, left-padded, at most ``max_new_tokens`` new tokens) and returns one
:class:`Generation` per question. Prompts that do not fit the model's context together
with ``max_new_tokens`` are refused before anything is generated.

With ``cache=path`` every finished batch is appended to a JSONL file and flushed, and
questions already in the file are not generated again. A run that is interrupted and
started again therefore continues where it stopped. Each record carries its identity:
the model's (:func:`circuitdiff.identity.model_identity`: weights, dtype, config,
tokenizer), the SHA-256 of the exact prompt, the generation settings and the circuitdiff
version. A record whose identity differs from the current one (or that has none, written
by an older circuitdiff) is an :class:`~circuitdiff.IdentityMismatchError`, never reused;
``fresh=True`` deletes the file and generates everything again. A crash mid-write is
repaired on reading: a complete last record without its newline is kept, an incomplete
one is dropped and regenerated, and records glued onto one line are split.

The bridge's KV cache is checked before the first batch. TransformerLens 4.3's attention
reads the cache from ``past_key_values``, but transformers 5.24 passes it as ``cache``:
each step then attends only to itself and GPT-2, Llama, Qwen2 and Mistral generate wrong
tokens. :func:`kv_cache_compat` hands the cache over under the old name during
generation; if the logits of a short generation with the cache still differ from those
without it, generation runs without the cache (correct, slower) and warns. NaN or
infinite logits in that check raise :class:`~circuitdiff.NonFiniteError` naming the
parameters that hold NaN or inf.

``backend="vllm"`` generates with vLLM instead (``pip install "circuitdiff[vllm]"``, CUDA
only): an engine on the files of the checkpoint the bridge was loaded from, greedy
(``temperature=0``), with at most 90% of the GPU memory still free, freed after the call.
Its answers are cut at the same stop tokens and carry the backend in their identity, so
they are never mixed with the Hugging Face backend's. vLLM's kernels need not give
bit-identical logits, so a near tie can turn the other way; this backend has been
tested against a stand-in of vLLM's API, not yet against vLLM itself (no GPU).

Grading is not cached: every call grades the (cached or new) text again with its
``grader`` (:mod:`circuitdiff.data.grading`; ``"math-verify"`` by default), so another grader
or a change to one applies to old generations too. The grader is therefore not part of a
record's identity.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from circuitdiff.data.grading import DEFAULT_GRADER, Grader, grade, resolve
from circuitdiff.data.questions import Question
from circuitdiff.defaults import DEFAULT_MAX_NEW_TOKENS
from circuitdiff.errors import (ArgumentError, DataError, IdentityMismatchError, MissingPathError, NonFiniteError,
                               MissingDependencyError)
from circuitdiff.identity import differences, fingerprint, library_version, model_identity

__all__ = ["BACKENDS", "Generation", "generate_answers", "answer_identity", "generation_settings", "kv_cache_compat",
           "kv_cache_is_sound"]

#: Generation backends: ``"hf"``, the bridge's Hugging Face model (default), and ``"vllm"``.
BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Generation:
    """One model's answer to one question.

    Attributes:
        id: the question's id.
        text: the decoded answer (special tokens removed).
        answer_ids: the generated token ids, up to (excluding) the first end-of-sequence token
            of the model's generation config.
        prompt_length: tokens in the prompt.
        extracted: the final answer the grader found in ``text`` (None if none).
        correct: the grader's verdict: whether ``extracted`` equals the question's reference answer.
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
    fresh: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    grader: str | Grader = DEFAULT_GRADER,
    backend: str = "hf",
) -> list[Generation]:
    """Greedy answers of ``model`` (a TransformerBridge from ``cd.load_model``) to ``questions``, graded.

    Returns the generations in question order. See the module docstring for the cache;
    ``fresh=True`` deletes ``cache`` first and generates every answer again. ``grader`` is a
    registered name (``circuitdiff.data.grading.available()``) or a callable
    ``grader(text, reference) -> (extracted, correct)``; it is resolved before anything is
    generated, and it grades cached answers as well as new ones (it is not part of the cache
    identity). ``backend`` is one of :data:`BACKENDS`: ``"hf"`` (default) generates with the
    bridge's Hugging Face model; ``"vllm"`` with vLLM on the checkpoint's files (CUDA only;
    see the module docstring). The backend is part of each answer's identity.

    Raises:
        UnknownNameError: no grader of that name (the message lists the available ones).
        MissingDependencyError: the grader or the backend needs a package that is not installed.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError(f"batch_size and max_new_tokens must be >= 1; got {batch_size} and {max_new_tokens}.")
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown generation backend {backend!r}; use one of {BACKENDS}.")
    grader = resolve(grader)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError("question ids must be unique.")
    if cache is not None and not Path(cache).parent.is_dir():
        raise MissingPathError(f"the generation cache {str(cache)!r} is in a folder that does not exist; create "
                               f"{str(Path(cache).parent)!r} first.")
    if cache is not None and fresh:
        Path(cache).unlink(missing_ok=True)
    identity = model_identity(model) if cache is not None else {}  # once per call: hashes the weights
    settings = generation_settings(model, max_new_tokens, backend)
    identities = {q.id: answer_identity(identity, q.prompt, settings) for q in questions}
    cached = _read_cache(Path(cache), identities) if cache is not None else {}
    todo = [q for q in questions if q.id not in cached]
    _check_context(model, todo, max_new_tokens)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="generating", unit="question",
               disable=not progress)
    engine = _vllm_batches if backend == "vllm" else _hf_batches
    with engine(model, todo, max_new_tokens) as generate_batch:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            records = generate_batch(batch)
            if cache is not None:
                _append(Path(cache), [{**r, "identity": identities[r["id"]]} for r in records])
            cached.update((r["id"], r) for r in records)
            bar.update(len(batch))
    bar.close()
    out = []
    for q in questions:
        r = cached[q.id]
        extracted, correct = grade(grader, r["text"], q.answer)
        out.append(Generation(q.id, r["text"], list(r["answer_ids"]), int(r["prompt_length"]), extracted, correct))
    return out


def generation_settings(model: Any, max_new_tokens: int, backend: str = "hf") -> dict[str, Any]:
    """What decides how answers are generated besides the weights: ``max_new_tokens``, greedy decoding, a
    fingerprint of the model's ``generation_config`` (stop tokens, penalties; without its version stamp), and the
    backend unless it is ``"hf"`` (so answers cached before backends existed keep their identity)."""
    config = {k: v for k, v in model.original_model.generation_config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    settings = {"max_new_tokens": max_new_tokens, "greedy": True, "config": fingerprint(config)}
    return settings if backend == "hf" else {**settings, "backend": backend}


@contextmanager
def _hf_batches(model: Any, todo: Sequence[Question], max_new_tokens: int) -> Iterator[Callable[..., list[dict]]]:
    """Batches generated by the bridge's Hugging Face model, with the KV cache when it is sound."""
    hf_model, tokenizer = model.original_model, model.tokenizer
    with kv_cache_compat(hf_model):
        use_cache = not todo or kv_cache_is_sound(hf_model, tokenizer, todo[0].prompt, min(8, max_new_tokens))
        if not use_cache:
            warnings.warn("generation with the KV cache gives other logits than without it on this TransformerLens/"
                          "transformers pair; generating without the cache (correct, but slower for long answers).",
                          stacklevel=4)
        yield lambda batch: _generate(hf_model, tokenizer, batch, max_new_tokens, use_cache)


@contextmanager
def _vllm_batches(model: Any, todo: Sequence[Question], max_new_tokens: int) -> Iterator[Callable[..., list[dict]]]:
    """Batches generated by a vLLM engine on the checkpoint the bridge was loaded from; the engine is freed after."""
    if not todo:
        yield lambda batch: []
        return
    vllm = MissingDependencyError.importing("vllm", "backend='vllm'", 'pip install "circuitdiff[vllm]" on a CUDA machine, or use '
                           "backend='hf'.")
    hf_model, tokenizer = model.original_model, model.tokenizer
    path = Path(getattr(hf_model.config, "_name_or_path", "") or "")
    if not (path / "config.json").is_file():
        raise ArgumentError("backend='vllm' loads the checkpoint's own files, but this model was not loaded from a "
                            "checkpoint directory (load it with cd.load_model(path or Hub id)), or use backend='hf'.")
    free, total = torch.cuda.mem_get_info()  # the bridges already hold their weights: vLLM takes part of the rest
    dtype = str(next(hf_model.parameters()).dtype).removeprefix("torch.")
    llm = vllm.LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=0,
                   gpu_memory_utilization=0.9 * free / total, max_model_len=model.cfg.n_ctx)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    stops = _stop_tokens(hf_model)
    try:
        yield lambda batch: [_record(q, len(o.prompt_token_ids), list(o.outputs[0].token_ids), stops, tokenizer)
                             for q, o in zip(batch, llm.generate([q.prompt for q in batch], params, use_tqdm=False),
                                             strict=True)]
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def answer_identity(model: dict[str, Any], prompt: str, generation: dict[str, Any]) -> dict[str, Any]:
    """The identity a cached answer carries: ``model`` (from ``identity.model_identity``), the SHA-256 of
    ``prompt``, the ``generation`` settings (:func:`generation_settings`) and the circuitdiff version."""
    return {"circuitdiff": library_version(), "model": model,
            "prompt": hashlib.sha256(prompt.encode("utf-8")).hexdigest(), "generation": generation}


def _check_context(model: Any, todo: Sequence[Question], max_new_tokens: int) -> None:
    """Refuse prompts whose tokens plus ``max_new_tokens`` exceed the model's context."""
    n_ctx = model.cfg.n_ctx
    lengths = [len(ids) for ids in model.tokenizer([q.prompt for q in todo])["input_ids"]] if todo else []
    too_long = [(q, n) for q, n in zip(todo, lengths) if n + max_new_tokens > n_ctx]
    if too_long:
        q, n = too_long[0]
        raise DataError(f"question {q.id!r}: its prompt has {n} tokens, which with max_new_tokens={max_new_tokens} "
                        f"makes {n + max_new_tokens}, more than the model's context of {n_ctx} tokens "
                        f"({len(too_long)} of {len(todo)} questions do not fit). Lower max_new_tokens or shorten "
                        "the prompt.")


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

    Raises:
        NonFiniteError: the logits are NaN or infinite (the message names the parameters
            holding NaN or inf).
    """
    logits = []
    for use_cache in (True, False):
        output, _ = _greedy(hf_model, tokenizer, [prompt], steps, use_cache,
                            output_logits=True, return_dict_in_generate=True)
        logits.append(torch.stack(output.logits).float())
    cached, plain = logits
    if not cached.isfinite().all():
        raise NonFiniteError(_nonfinite_logits(hf_model))
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
    stops = _stop_tokens(hf_model)
    return [_record(q, int(encoded["attention_mask"][i].sum()), output[i, width:].tolist(), stops, tokenizer)
            for i, q in enumerate(batch)]


def _stop_tokens(hf_model: Any) -> set[int]:
    """What generation stops at: the generation config's end-of-sequence id(s)."""
    stops = hf_model.generation_config.eos_token_id  # an id, a list, or None
    return set(stops if isinstance(stops, list) else [] if stops is None else [stops])


def _record(question: Question, prompt_length: int, new: list[int], stops: set[int], tokenizer: Any) -> dict:
    """A cache record: the generated ids up to (excluding) the first stop token, their text, the prompt's length."""
    new = new[:next((j for j, t in enumerate(new) if t in stops), len(new))]
    return {"id": question.id, "text": tokenizer.decode(new, skip_special_tokens=True), "answer_ids": new,
            "prompt_length": prompt_length}


def _nonfinite_logits(hf_model: Any) -> str:
    """Why the logits are not finite: the parameters that hold NaN or inf, or an overflow."""
    bad = [name.replace("._original_component", "") for name, p in hf_model.named_parameters()
           if p.device.type != "meta" and not p.isfinite().all()]
    if not bad:
        return (f"the model's logits are NaN or infinite although every parameter is finite: the activations "
                f"overflow in {next(hf_model.parameters()).dtype}; load the model in float32 or bfloat16.")
    return (f"the model's logits are NaN or infinite: {len(bad)} parameter(s) hold NaN or inf ("
            + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            + "). The checkpoint is damaged; load an intact copy of it.")


def _append(path: Path, records: list[dict]) -> None:
    """Append ``records`` to the cache, one JSON line each, on a new line; flush and fsync."""
    with open(path, "a+b") as f:  # writes go to the end whatever the read position
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a complete record whose newline a kill cut off
                f.write(b"\n")
        f.write("".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


_SPACE, _DECODER = re.compile(r"\s*"), json.JSONDecoder()


def _read_cache(path: Path, identities: dict[str, dict]) -> dict[str, dict]:
    """Records by id from a generation cache; records of the questions in ``identities`` must carry that identity.

    Records glued onto one line are split; an incomplete last record is cut off the file.
    """
    if not path.exists():
        return {}
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # offsets below map back to bytes exactly
    lines = text.split("\n")  # the last item is "" unless the file ends mid-line
    records: dict[str, dict] = {}
    start = 0  # offset of the current line in text
    for number, line in enumerate(lines, start=1):
        found, good = [], 0
        try:
            while (pos := _SPACE.match(line, good).end()) < len(line):
                record, good = _DECODER.raw_decode(line, pos)
                found.append(({"id": str(record["id"]), "text": str(record["text"]),
                               "answer_ids": [int(t) for t in record["answer_ids"]],
                               "prompt_length": int(record["prompt_length"])}, record.get("identity")))
        except (KeyError, TypeError, ValueError):  # ValueError includes JSONDecodeError
            if number < len(lines):
                raise DataError(f"{path}, line {number}: not a generation record; delete the cache file to "
                                "regenerate.") from None
            # interrupted while writing: cut off the incomplete record, regenerate that question
            os.truncate(path, len(text[:start + good].encode("utf-8", "surrogateescape")))
        for parsed, stored in found:
            if parsed["id"] in identities:
                _check_identity(path, number, parsed["id"], stored, identities[parsed["id"]])
            records[parsed["id"]] = parsed
        start += len(line) + 1
    return records


def _check_identity(path: Path, number: int, qid: str, stored: Any, current: dict[str, Any]) -> None:
    """Raise IdentityMismatchError when a cached answer was made under another identity than ``current``."""
    if not isinstance(stored, dict):
        changes = "was written by an older circuitdiff (without an identity)"
    elif found := differences(stored, current):
        changes = "was generated under another identity: " + "; ".join(found)
    else:
        return
    raise IdentityMismatchError(
        f"{path}, line {number}: the cached answer to question {qid!r} {changes}. It is not reused. Generate "
        f"again with generate_answers(..., fresh=True) (--fresh on the command line), or delete {path}.")
