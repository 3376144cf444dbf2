"""Scenarios 5 and 8 of the trust issue: models and inputs that used to give silent nonsense or a confusing error.

- a Gemma checkpoint labelled Llama in config.json loaded under the Llama adapter, and
  every q/k/v edge scored 0;
- attention_mask values other than 0/1 were accepted;
- prompts longer than the model's context raised IndexError (GPT-2) or were silently
  wrong (rotary models);
- loading the same Hugging Face model twice gave "LinearBridge is neither nn.Linear nor
  Conv1D" at attribution time.
"""

from __future__ import annotations

import json

import pytest
import torch

import circuitdiff as cd
import tiny_models as tm


def test_a_checkpoint_labelled_with_another_architecture_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, GemmaConfig

    config = GemmaConfig(vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         bos_token_id=tm.VOCAB - 1, eos_token_id=tm.VOCAB - 1, pad_token_id=tm.VOCAB - 2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tm.save_tokenizer(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(cd.UnsupportedModelError, match="labels this checkpoint 'LlamaForCausalLM', but the loaded "
                                                       "model is a GemmaForCausalLM with model_type 'gemma'"):
        cd.load_model(tmp_path, device="cpu")


def test_a_relabelled_supported_architecture_is_refused_too(checkpoints, tmp_path):
    import shutil

    shutil.copytree(checkpoints["qwen2"], tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    written["architectures"] = ["LlamaForCausalLM"]  # Qwen2 has q/k/v biases the Llama adapter would not see
    (tmp_path / "m" / "config.json").write_text(json.dumps(written))
    with pytest.raises(cd.UnsupportedModelError, match="loaded model is a Qwen2ForCausalLM"):
        cd.load_model(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("mask", [[[1, 1, 2]], [[1.0, 1.0, 0.5]], [[1, -1, 0]]], ids=["two", "half", "negative"])
def test_attention_mask_must_be_zeros_and_ones(mask):
    with pytest.raises(cd.DataError, match="attention_mask must hold only 0 and 1"):
        cd.Batch(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor(mask))
    assert cd.Batch(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[True, True, False]])).size == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # learned positions raise IndexError, rotary ones were silent
def test_sequences_longer_than_the_context_are_refused(get_model, arch):
    model = get_model(arch)
    assert model.cfg.n_ctx == 64
    graph = cd.AttributionGraph.from_model(model, level="layer")
    long = cd.make_batches(model.tokenizer, [[1, 2], list(range(1, 31)) * 2], [[3, 4, 5, 6, 7, 8]] * 2)
    with pytest.raises(cd.DataError, match="batch 0: sample 1 has 65 tokens but the model's context is 64 positions"):
        cd.attribute(model, graph, long, objective="answer_nll", progress=False)
    fits = cd.make_batches(model.tokenizer, [list(range(1, 31)) * 2], [[3, 4, 5, 6, 7]])  # 60 + 4 = 64 positions
    assert cd.attribute(model, graph, fits, objective="answer_nll", progress=False).n_samples == 1


def test_loading_the_same_hugging_face_model_twice_says_what_happened(checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"])
    bridge = cd.load_model(hf_model, tokenizer=tokenizer)
    with pytest.raises(cd.UnsupportedModelError, match="already wrapped by a TransformerBridge.*load a fresh copy"):
        cd.load_model(hf_model, tokenizer=tokenizer)
    assert cd.load_model(bridge) is bridge  # the bridge itself is fine
