"""Batches of token ids with padding masks and loss targets.

A :class:`Batch` is right-padded. Its ``labels`` say, for every position, which token
the logits at that position should predict (``IGNORE`` where the position is not part
of the loss), the Hugging Face convention before shifting. Objectives read them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Int, Integer
from torch import Tensor

from circuitdiff.errors import DataError
from circuitdiff.typecheck import shape_checked

__all__ = ["Batch", "IGNORE", "make_batches", "content_ids", "check_sample_ids"]

#: Label value of positions outside the loss span.
IGNORE = -100


@shape_checked
@dataclass(frozen=True)
class Batch:
    """One right-padded batch.

    Attributes:
        input_ids: ``[batch, pos]`` token ids.
        attention_mask: ``[batch, pos]``, 1 for real tokens, 0 for padding (right
            padding only). Padded positions contribute nothing to any score.
        labels: ``[batch, pos]`` target token predicted by the logits at each position,
            ``IGNORE`` (-100) outside the loss span. None if the objective needs none.
        corrupted_input_ids: ``[batch, pos]`` the corrupted prompts for
            ``intervention="patching"`` (same length and padding as ``input_ids``).
        contrast_labels: ``[batch, pos]`` the competing token at each labelled position,
            for :func:`circuitdiff.objectives.logit_diff`.
        sample_ids: one unique name per sample (e.g. the question id). Scores keep them,
            and :func:`circuitdiff.compare` pairs two models' samples by them. None: the
            samples are named by their position in the run (``"0"``, ``"1"``, ...).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Integer[Tensor, "batch pos"] | Bool[Tensor, "batch pos"] | None = None
    labels: Int[Tensor, "batch pos"] | None = None
    corrupted_input_ids: Int[Tensor, "batch pos"] | None = None
    contrast_labels: Int[Tensor, "batch pos"] | None = None
    sample_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point:
            raise DataError(
                "input_ids must be an integer tensor of shape [batch, pos]; got "
                f"{type(ids).__name__} {getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}."
            )
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DataError(f"empty batch: input_ids has shape {tuple(ids.shape)}.")
        if self.attention_mask is None:
            object.__setattr__(self, "attention_mask", torch.ones_like(ids))
        if self.sample_ids is not None:
            object.__setattr__(self, "sample_ids", check_sample_ids(self.sample_ids, ids.shape[0], "sample_ids"))
        if self.attention_mask.dtype.is_floating_point or bool(
                ((self.attention_mask != 0) & (self.attention_mask != 1)).any()):
            raise DataError(
                f"attention_mask must hold only 0 and 1 (integers or bools); got dtype {self.attention_mask.dtype} "
                f"with values {sorted(set(self.attention_mask.unique().tolist()))[:6]}. Pass the tokenizer's mask."
            )
        for name in ("attention_mask", "labels", "corrupted_input_ids", "contrast_labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(ids.shape):
                raise DataError(
                    f"{name} has shape {tuple(value.shape)} but input_ids has {tuple(ids.shape)}; "
                    "they must match."
                )
        mask = self.attention_mask.bool()
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise DataError(f"samples {_where(lengths == 0)} have no real tokens (attention_mask all 0).")
        right_padded = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        if not torch.equal(right_padded, mask):
            raise DataError(
                f"samples {_where((right_padded != mask).any(1))} are not right-padded: the "
                "attention_mask must be 1s followed by 0s. Pad on the right "
                "(tokenizer.padding_side = 'right')."
            )
        if self.labels is not None:
            outside = (self.labels != IGNORE) & ~mask
            if bool(outside.any()):
                raise DataError(
                    f"the loss span of samples {_where(outside.any(1))} reaches padded positions "
                    "outside the sequence; labels must be IGNORE (-100) where attention_mask is 0."
                )
        if self.contrast_labels is not None:
            if self.labels is None or not torch.equal(self.labels != IGNORE, self.contrast_labels != IGNORE):
                raise DataError("contrast_labels must be set exactly where labels are set.")

    @property
    def size(self) -> int:
        """Number of samples."""
        return int(self.input_ids.shape[0])

    @property
    @shape_checked
    def lengths(self) -> Int[Tensor, "batch"]:
        """Real (unpadded) length of each sample."""
        return self.attention_mask.sum(1)

    def select(self, rows: Tensor) -> "Batch":
        """The samples at ``rows`` (``[n]`` integer indices, repeats allowed), in that order.

        Sample ids are dropped when a sample is repeated (ids must be unique).
        """
        picked = {
            name: (value[rows] if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        if self.sample_ids is not None:
            chosen = [self.sample_ids[i] for i in rows.tolist()]
            picked["sample_ids"] = tuple(chosen) if len(set(chosen)) == len(chosen) else None
        return replace(self, **picked)

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on ``device``."""
        moved = {
            name: (value.to(device) if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return replace(self, **moved)


def _where(flags: Tensor) -> list[int]:
    return torch.nonzero(flags).flatten().tolist()


def check_sample_ids(ids: Sequence[str], n: int, what: str) -> tuple[str, ...]:
    """``ids`` as a tuple of ``n`` unique non-empty strings, or a DataError naming the problem."""
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise DataError(f"{what} must be a sequence of strings, one per sample; got {type(ids).__name__}.")
    ids = tuple(ids)
    if len(ids) != n:
        raise DataError(f"{what} has {len(ids)} entries for {n} samples; give one id per sample.")
    bad = [i for i, x in enumerate(ids) if not isinstance(x, str) or not x]
    if bad:
        raise DataError(f"{what}: entries {bad[:5]} are not non-empty strings (e.g. {ids[bad[0]]!r}); "
                        "use str(id).")
    if len(set(ids)) != n:
        seen: set[str] = set()
        twice = sorted({x for x in ids if x in seen or seen.add(x)})
        raise DataError(f"{what} must be unique; {len(twice)} appear more than once, e.g. {twice[:3]}.")
    return ids


def content_ids(prompts: Sequence[str | Sequence[int]]) -> tuple[str, ...]:
    """Default sample ids: ``"p-"`` + the first 12 hex digits of the prompt's SHA-256.

    The same prompt gets the same id in every run, whatever its position, so two models
    scored on the same prompts pair up even in another order. A prompt that occurs again
    gets ``"#2"``, ``"#3"``, ... appended in order of occurrence.
    """
    out, counts = [], {}
    for prompt in prompts:
        text = prompt if isinstance(prompt, str) else json.dumps([int(t) for t in prompt])
        base = "p-" + hashlib.sha256(text.encode()).hexdigest()[:12]
        counts[base] = counts.get(base, 0) + 1
        out.append(base if counts[base] == 1 else f"{base}#{counts[base]}")
    return tuple(out)


def make_batches(
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    answers: Sequence[str | Sequence[int]] | None = None,
    *,
    corrupted_prompts: Sequence[str | Sequence[int]] | None = None,
    contrast_answers: Sequence[str | Sequence[int]] | None = None,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    sample_ids: Sequence[str] | None = None,
) -> list[Batch]:
    """Tokenize prompts (and answers) into right-padded batches, in input order.

    With ``answers``, each sample is ``prompt + answer[:-1]`` and the labels are the
    answer tokens at the positions that predict them, so the objective scores the
    whole answer and no position is wasted (this is the paper's "feed prompt +
    answer[:T_cut - 1], score the first T_cut answer tokens"). Without answers, the
    last prompt position predicts nothing and ``labels`` is None.

    Strings are tokenized (the prompt with ``add_special_tokens``, answers without);
    lists of ints are used as given, which is how a model's own generated answer
    should be passed.

    ``sample_ids`` names each sample (e.g. question ids); scores keep the names and
    :func:`circuitdiff.compare` pairs two models' samples by them. Default: a hash of
    each prompt (see :func:`content_ids`), so runs on the same prompts pair up whatever
    their order.

    Raises:
        DataError: no prompts; mismatched list lengths; an empty answer; corrupted
            prompts whose token length differs from the clean one.
    """
    if len(prompts) == 0:
        raise DataError("no prompts given; attribution needs at least one sample.")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    for name, other in (("answers", answers), ("corrupted_prompts", corrupted_prompts),
                        ("contrast_answers", contrast_answers)):
        if other is not None and len(other) != len(prompts):
            raise DataError(f"{len(prompts)} prompts but {len(other)} {name}; give one per prompt.")
    if contrast_answers is not None and answers is None:
        raise DataError("contrast_answers needs answers (the tokens they compete with).")
    names = content_ids(prompts) if sample_ids is None else check_sample_ids(sample_ids, len(prompts), "sample_ids")

    def encode(text: str | Sequence[int], special: bool) -> list[int]:
        if isinstance(text, str):
            return list(tokenizer(text, add_special_tokens=special)["input_ids"])
        return [int(t) for t in text]

    samples: list[dict[str, list[int] | None]] = []
    for i, prompt in enumerate(prompts):
        prompt_ids = encode(prompt, add_special_tokens)
        if not prompt_ids:
            raise DataError(f"prompt {i} tokenizes to no tokens.")
        answer_ids = encode(answers[i], False) if answers is not None else []
        if answers is not None and not answer_ids:
            raise DataError(f"answer {i} tokenizes to no tokens; the loss span would be empty.")
        contrast_ids = encode(contrast_answers[i], False) if contrast_answers is not None else None
        if contrast_ids is not None and len(contrast_ids) != len(answer_ids):
            raise DataError(
                f"sample {i}: answer has {len(answer_ids)} tokens but contrast answer has "
                f"{len(contrast_ids)}; logit difference needs them aligned."
            )
        corrupted_ids = None
        if corrupted_prompts is not None:
            corrupted_ids = encode(corrupted_prompts[i], add_special_tokens)
            if len(corrupted_ids) != len(prompt_ids):
                raise DataError(
                    f"clean and corrupted prompts of sample {i} tokenize to {len(prompt_ids)} and "
                    f"{len(corrupted_ids)} tokens; patching needs equal lengths (pad them or use "
                    "intervention='zero')."
                )
        tail = answer_ids[:-1]
        samples.append({
            "ids": prompt_ids + tail,
            "corrupted": None if corrupted_ids is None else corrupted_ids + tail,
            "start": len(prompt_ids) - 1,
            "answer": answer_ids,
            "contrast": contrast_ids,
        })

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    batches = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        width = max(len(s["ids"]) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long) if answers is not None else None
        contrast = labels.clone() if contrast_answers is not None else None
        corrupted = ids.clone() if corrupted_prompts is not None else None
        for row, s in enumerate(chunk):
            n = len(s["ids"])
            ids[row, :n] = torch.tensor(s["ids"])
            mask[row, :n] = 1
            if corrupted is not None:
                corrupted[row, :n] = torch.tensor(s["corrupted"])
            span = slice(s["start"], s["start"] + len(s["answer"]))
            if labels is not None:
                labels[row, span] = torch.tensor(s["answer"])
            if contrast is not None:
                contrast[row, span] = torch.tensor(s["contrast"])
        batches.append(Batch(ids, mask, labels, corrupted, contrast, names[first:first + batch_size]))
    return batches
