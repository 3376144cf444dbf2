"""Batches: tokenization, label alignment, padding, validation."""

from __future__ import annotations

import pytest
import torch

import circuitdiff as cd
from circuitdiff import IGNORE


@pytest.fixture(scope="module")
def tokenizer(get_model):
    return get_model("llama").tokenizer


def test_answer_labels_sit_where_the_logits_predict_them(tokenizer):
    batches = cd.make_batches(tokenizer, ["w1 w2 w3", "w4 w5"], ["w6 w7", "w8 w9 w10"],
                              batch_size=2, add_special_tokens=False)
    (batch,) = batches
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    # sample 0: input w1 w2 w3 w6, labels predict w6 (at w3) and w7 (at w6)
    assert batch.input_ids[0].tolist() == ids("w1 w2 w3 w6")
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, *ids("w6 w7")]
    # sample 1 is one longer: w4 w5 w8 w9, labels at positions 1, 2, 3
    assert batch.input_ids[1].tolist() == ids("w4 w5 w8 w9")
    assert batch.labels[1].tolist() == [IGNORE, *ids("w8 w9 w10")]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_right_padding_and_token_id_inputs(tokenizer):
    batches = cd.make_batches(tokenizer, [[1, 2, 3], [4]], [[5], [6, 7]], batch_size=8)
    (batch,) = batches
    assert batch.input_ids.shape == (2, 3)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.input_ids[1, 2] == tokenizer.pad_token_id
    assert batch.labels.tolist() == [[IGNORE, IGNORE, 5], [6, 7, IGNORE]]
    assert batch.lengths.tolist() == [3, 2]


def test_batches_keep_input_order_and_size(tokenizer):
    prompts = [[i + 1] * (1 + i % 3) for i in range(7)]
    batches = cd.make_batches(tokenizer, prompts, [[9]] * 7, batch_size=3)
    assert [b.size for b in batches] == [3, 3, 1]
    firsts = [int(b.input_ids[i, 0]) for b in batches for i in range(b.size)]
    assert firsts == list(range(1, 8))


def test_corrupted_prompts_share_the_answer(tokenizer):
    (batch,) = cd.make_batches(tokenizer, [[1, 2]], [[3, 4]], corrupted_prompts=[[7, 8]])
    assert batch.corrupted_input_ids.tolist() == [[7, 8, 3]]
    assert batch.input_ids.tolist() == [[1, 2, 3]]


def test_contrast_answers_align_with_answers(tokenizer):
    (batch,) = cd.make_batches(tokenizer, [[1, 2]], [[3]], contrast_answers=[[5]])
    assert batch.contrast_labels.tolist() == [[IGNORE, 5]]


def test_patching_length_mismatch_is_explained(tokenizer):
    with pytest.raises(cd.DataError, match=r"tokenize to 3 and 4 tokens; patching needs equal lengths"):
        cd.make_batches(tokenizer, [[1, 2, 3]], [[4]], corrupted_prompts=[[1, 2, 3, 4]])


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[]), "no prompts given"),
    (dict(prompts=[[1]], answers=[[]]), "answer 0 tokenizes to no tokens"),
    (dict(prompts=[[1], [2]], answers=[[3]]), "2 prompts but 1 answers"),
    (dict(prompts=[[1]], contrast_answers=[[3]]), "contrast_answers needs answers"),
    (dict(prompts=[[1]], answers=[[2, 3]], contrast_answers=[[4]]), "contrast answer has 1"),
    (dict(prompts=[[1]], batch_size=0), "batch_size must be >= 1"),
])
def test_make_batches_rejects_bad_input(tokenizer, kwargs, message):
    with pytest.raises(cd.DataError, match=message):
        cd.make_batches(tokenizer, **kwargs)


def test_batch_validation():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(cd.DataError, match="not right-padded"):
        cd.Batch(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(cd.DataError, match="reaches padded positions outside the sequence"):
        cd.Batch(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                 labels=torch.tensor([[IGNORE, 2, 3], [IGNORE, 5, 7]]))
    with pytest.raises(cd.DataError, match="labels has shape"):
        cd.Batch(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(cd.DataError, match="integer tensor"):
        cd.Batch(ids.float())
    with pytest.raises(cd.DataError, match="empty batch"):
        cd.Batch(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(cd.DataError, match="no real tokens"):
        cd.Batch(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    batch = cd.Batch(ids)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
